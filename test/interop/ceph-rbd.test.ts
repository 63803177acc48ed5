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
import { BLOCKGATE_CLI, ChildSet, blockgateOk, type Child } from '../helpers/children.js';
import { runOk, run } from '../helpers/run.js';
import { PY_ERRNO_OF, nbdshOut } from '../helpers/nbdsh-script.js';
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
async function serveConfig(image: string, backend: Record<string, unknown> = {}, logLevel = 'warn'): Promise<{ child: Child; uri: string; socket: string }> {
  const socket = local('nbd.sock');
  const config = local('config.json');
  fs.writeFileSync(config, JSON.stringify({
    listen: [{ path: socket }],
    exports: [{ name: '', backend: { type: 'rbd', pool: ceph.pool, image, conf: ceph.conf, ...backend } }],
  }));
  const child = children.blockgate(['serve', '--no-control', '--print-uri', '-l', logLevel, '-c', config]);
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
      // A READ of a hole is one data chunk of zeroes: the rbd device asks for no extents
      // beside reads (extentsOnRead false), since each query is an OSD round trip per object.
      const read = await nbdshOut(`${CONNECT}
chunks = []
def chunk(buf, offset, status, err):
    chunks.append([status, len(buf), buf == bytes(len(buf))])
    return 0
h.pread_structured(1 << 20, 30 << 20, chunk)
out['chunks'] = chunks
out['data'] = nbd.READ_DATA
`, gw.uri);
      assert.deepEqual(read.chunks, [[read.data, MiB, true]]);
    } finally {
      await stop(gw.child);
    }
  });
});

/** Python: block(i), the BS bytes block i holds in the multi-gateway tests (its index, repeated). */
const PY_BLOCK = `BS = 1 << 20
def block(i):
    return (b'%08d' % i) * (BS // 8)`;

describe('several gateways on one image', () => {
  test('two gateways: writes through A then FLUSH are read through B and back; both advertise multi-conn (cache off), not with rbd cache on', async () => {
    await rbdCreate('shared1', '32M');
    const a = await serve([`rbd:${ceph.pool}/shared1`]);
    const b = await serve([`rbd:${ceph.pool}/shared1`]);
    const cached = await serveConfig('shared1', { cache: true });
    try {
      const out = await nbdshOut(`${CONNECT}
${PY_BLOCK}
g = nbd.NBD()
g.connect_uri(${JSON.stringify(b.uri)})
c = nbd.NBD()
c.connect_uri(${JSON.stringify(cached.uri)})
out['multi'] = [h.can_multi_conn(), g.can_multi_conn(), c.can_multi_conn()]
bad = []
for i in range(8):
    h.pwrite(block(i), i * BS)
h.zero(65536, 3 * BS)
h.flush()
for i in range(8):
    want = bytearray(block(i))
    if i == 3:
        want[:65536] = bytes(65536)
    if g.pread(BS, i * BS) != bytes(want):
        bad.append(('A->B', i))
# Ping-pong on one object: each gateway takes the exclusive lock in turn.
for k in range(20):
    w, r = (h, g) if k % 2 == 0 else (g, h)
    w.pwrite(b'%08d' % k * 512, 4096, nbd.CMD_FLAG_FUA)
    if r.pread(4096, 4096) != b'%08d' % k * 512:
        bad.append(('ping-pong', k))
out['bad'] = bad
`, a.uri);
      assert.deepEqual(out.multi, [true, true, false]);
      assert.deepEqual(out.bad, []);
    } finally {
      await Promise.all([stop(a.child), stop(b.child), stop(cached.child)]);
    }
  });

  test('a gateway killed with SIGKILL mid-write: every write acknowledged before its FLUSH reads back through another gateway', async () => {
    await rbdCreate('crash1', '64M');
    const a = await serve([`rbd:${ceph.pool}/crash1`]);
    // Writes blocks 0..15, FLUSH, says so, then keeps 8 more writes in flight until the
    // gateway dies under it.
    const writer = children.start('nbdsh', ['-c', `import nbd, sys
h = nbd.NBD()
h.connect_uri(${JSON.stringify(a.uri)})
${PY_BLOCK}
for i in range(16):
    h.pwrite(block(i), i * BS)
h.flush()
print('FLUSHED', flush=True)
i = 16
while True:
    while h.aio_in_flight() < 8:
        h.aio_pwrite(block(i), (i % 64) * BS)
        i += 1
    h.poll(-1)
`]);
    await writer.waitFor(/^FLUSHED$/m);
    a.child.proc.kill('SIGKILL');
    assert.equal(await a.child.exited(), 'SIGKILL');
    writer.proc.kill('SIGKILL');
    await writer.exited();
    const b = await serve([`rbd:${ceph.pool}/crash1`]);
    try {
      const out = await nbdshOut(`${CONNECT}
${PY_BLOCK}
out['bad'] = [i for i in range(16) if h.pread(BS, i * BS) != block(i)]
`, b.uri);
      assert.deepEqual(out.bad, []);
    } finally {
      await stop(b.child);
    }
  });
});

describe('cluster faults', () => {
  test('the OSD stopped: reads and writes fail with an error after the configured timeout, the gateway stays up, and works again once the OSD resumes', async () => {
    await rbdCreate('fault1', '16M');
    // Debug logging: device errors are logged at debug (the client has them).
    const gw = await serveConfig('fault1', { timeout: 3 }, 'debug');
    const osdPid = Number(fs.readFileSync(path.join(ceph.dir, 'run', 'osd.0.pid'), 'utf8').trim());
    try {
      await nbdshOut(`${CONNECT}
h.pwrite(b'\\x42' * 65536, 0)
h.flush()
`, gw.uri);
      process.kill(osdPid, 'SIGSTOP');
      let stopped: Record<string, unknown>;
      try {
        stopped = await nbdshOut(`${CONNECT}
${PY_ERRNO_OF}
out['read'] = errno_of(lambda: h.pread(4096, 0))
out['write'] = errno_of(lambda: h.pwrite(b'\\x43' * 4096, 8 << 20))
`, gw.uri);
      } finally {
        process.kill(osdPid, 'SIGCONT');
      }
      // NBD has no ETIMEDOUT: the client gets EIO, the log says what happened.
      assert.deepEqual(stopped, { read: 'EIO', write: 'EIO' });
      assert.match(gw.child.stderr(), /read at offset 0: Connection timed out \(errno 110\)/);
      assert.equal(gw.child.proc.exitCode, null, 'the gateway is still running');
      // Bounded wait for the OSD to answer again after SIGCONT.
      const again = await nbdshOut(`${CONNECT}
${PY_ERRNO_OF}
for k in range(30):
    if errno_of(lambda: h.pread(4096, 0)) is None:
        break
    time.sleep(1)
out['read'] = h.pread(65536, 0) == b'\\x42' * 65536
h.pwrite(b'\\x44' * 4096, 4 << 20)
h.flush()
out['write'] = h.pread(4096, 4 << 20) == b'\\x44' * 4096
`, gw.uri);
      assert.deepEqual(again, { read: true, write: true });
    } finally {
      await stop(gw.child);
    }
  });

  test('both gateways blocklisted by the cluster: the next FLUSH of every session of each gateway fails with EIO; the gateways stay up', async () => {
    await rbdCreate('fence1', '16M');
    const a = await serve([`rbd:${ceph.pool}/fence1`]);
    const b = await serve([`rbd:${ceph.pool}/fence1`]);
    try {
      const script = children.start('nbdsh', ['-c', `import nbd, sys, json
${PY_ERRNO_OF}
hs = []
for u in [${JSON.stringify(a.uri)}, ${JSON.stringify(a.uri)}, ${JSON.stringify(b.uri)}, ${JSON.stringify(b.uri)}]:
    x = nbd.NBD()
    x.connect_uri(u)
    hs.append(x)
for k, x in enumerate(hs):
    x.pwrite(b'%d' % k * 4096, k * 4096)
    x.flush()
print('READY', flush=True)
sys.stdin.readline()
out = {'flush': [errno_of(x.flush) for x in hs]}
out['again'] = errno_of(hs[0].flush)
print('RESULT ' + json.dumps(out), flush=True)
`]);
      await script.waitFor(/^READY$/m);
      const status = JSON.parse(await ceph.cli('rbd', ['status', `${ceph.pool}/fence1`, '--format', 'json'])) as { watchers: { address: string }[] };
      assert.equal(status.watchers.length, 2, JSON.stringify(status));
      for (const w of status.watchers) await ceph.cli('ceph', ['osd', 'blocklist', 'add', w.address]);
      script.proc.stdin!.write('go\n');
      const m = await script.waitFor(/^RESULT (.*)$/m);
      const out = JSON.parse(m[1]!) as { flush: (string | null)[]; again: string | null };
      assert.deepEqual(out.flush, ['EIO', 'EIO', 'EIO', 'EIO']);
      assert.equal(out.again, 'EIO', 'a fenced gateway keeps failing: it may not write any more');
      assert.equal(a.child.proc.exitCode, null);
      assert.equal(b.child.proc.exitCode, null);
      for (const w of status.watchers) await ceph.cli('ceph', ['osd', 'blocklist', 'rm', w.address]);
    } finally {
      await Promise.all([stop(a.child), stop(b.child)]);
    }
  });
});
