/**
 * Interop, the network GEOM Gate path end to end with real processes: a `blockgate
 * ggated` child on loopback (exports file allowing 127.0.0.1), a `blockgate serve` child
 * with its control socket, and `blockgate ggatec` children forwarding gates to the
 * ggated; qemu-img and nbdsh use the gates as the NBD exports `ggate<N>`.
 *
 * Covered: qemu-img convert of a seeded 24 MiB file into ggate0 and back out, compared
 * (qemu-img compare and byte for byte, also against the file behind ggated); nbdsh
 * flushes through the chain, succeeding, then failing EIO while an `error` filter of
 * ggated's --config stack fails flushes; trim answered EOPNOTSUPP; ggated killed (by
 * PID) and restarted on its port while nbdsh streams writes: ggatec reconnects with a
 * fresh token and resends, nbdsh sees no error, the data verifies, and `blockgate status
 * --json` shows nothing recorded in the export's ErrSeq; SIGTERM leaves the gate for
 * `ggatec rescue`; destroy ends ggatec with status 0; refusals end create with status 1.
 *
 * Every child is started from the sources, every wait is bounded, and every child still
 * alive is killed by PID in `after`.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { runOk } from '../helpers/run.js';
import { seededBytes } from '../helpers/data.js';
import { assertSameBytes } from '../helpers/assertions.js';
import { streamWritesScript, streamedBytes } from '../helpers/nbdsh-script.js';
import { CHILD_WAIT_MS, ChildSet, blockgateOk, blockgateRun, statusJson, untilGates, type Child } from '../helpers/children.js';

const MiB = 1024 * 1024;
/** Bound of a whole test. */
const TEST = { timeout: 300_000 };

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-interop-ggatec-'));
const CTL = path.join(tmp, 'run', 'ctl.sock');
const NBD = path.join(tmp, 'nbd.sock');
const children = new ChildSet();

const uri = (name: string): string => `nbd+unix:///${name}?socket=${NBD}`;

/** A `blockgate ggated` child; resolves once it listens, with the port it got. */
async function ggated(exportsFile: string, configFile: string, port = 0): Promise<{ child: Child; port: number }> {
  const child = children.blockgate(['ggated', '-a', '127.0.0.1', '-p', String(port), '-c', configFile, exportsFile]);
  const [, p] = await child.waitFor(/listening on port (\d+)/, 'stderr');
  return { child, port: Number(p) };
}

const DISK = path.join(tmp, 'disk0.img');
const FLAKY = path.join(tmp, 'flaky.img');
const FLAKY_PATH = '/blockgate/flaky';
const TRIGGER = path.join(tmp, 'fail-flushes');
const EXPORTS = path.join(tmp, 'gg.exports');
const CONFIG = path.join(tmp, 'stacks.json');
const SIZE = 24 * MiB;

let server: Child;
let gg: { child: Child; port: number };

before(async () => {
  fs.writeFileSync(DISK, Buffer.alloc(SIZE));
  fs.writeFileSync(FLAKY, Buffer.alloc(MiB));
  fs.writeFileSync(EXPORTS, [`127.0.0.1 RW ${DISK}`, `127.0.0.1 RW ${FLAKY_PATH}`, ''].join('\n'));
  fs.writeFileSync(
    CONFIG,
    JSON.stringify({
      [FLAKY_PATH]: { backend: { type: 'file', path: FLAKY }, filters: [{ type: 'error', ops: ['flush'], error: 'EIO', file: TRIGGER }] },
    }),
  );
  server = children.blockgate(['serve', '--print-uri', '--control', CTL, '-U', NBD, 'memory:1M']);
  gg = await ggated(EXPORTS, CONFIG);
  await server.waitFor(/nbd\+unix/);
});

after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe('gates forwarded by blockgate ggatec to blockgate ggated, used by real NBD clients', () => {
  test('create prints ggate0; qemu-img convert in and out through the chain verifies; trim is EOPNOTSUPP at the gate and EINVAL on the NBD wire; destroy ends ggatec with 0', TEST, async () => {
    const handler = children.blockgate(['ggatec', 'create', '-p', String(gg.port), '--control', CTL, '127.0.0.1', DISK]);
    const [name] = await handler.waitFor(/ggate\d+/);
    assert.equal(name, 'ggate0');
    const [gate] = (await statusJson(CTL)).gates;
    assert.equal(gate?.info, `127.0.0.1:${gg.port} ${DISK}`);

    const src = path.join(tmp, 'src0.img');
    const original = seededBytes(11, SIZE);
    fs.writeFileSync(src, original);
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri('ggate0')], { timeoutMs: CHILD_WAIT_MS });
    assertSameBytes(fs.readFileSync(DISK), original, 'the file behind ggated after qemu-img convert');
    const out = path.join(tmp, 'out0.img');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri('ggate0'), out], { timeoutMs: CHILD_WAIT_MS });
    await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, out]);
    assertSameBytes(fs.readFileSync(out), original, 'qemu-img convert out of ggate0');

    const r = await runOk('nbdsh', [
      '-u',
      uri('ggate0'),
      '-c',
      [
        'h.pwrite(b"\\xcd" * 65536, 65536)',
        'h.flush()',
        'try:',
        '    h.trim(4096, 0)',
        '    print("trim ok")',
        'except nbd.Error as e:',
        '    print("trim errno", e.errno)',
        'assert h.pread(65536, 65536) == b"\\xcd" * 65536',
        'print("nbdsh ok")',
      ].join('\n'),
    ]);
    // The gate answers EOPNOTSUPP (DELETE is not on the ggate wire); NBD reserves NBD_ENOTSUP for FAST_ZERO, so a TRIM gets EINVAL, as from nbdkit.
    assert.match(r.stdout, /trim errno (EINVAL|22)\n/, 'DELETE is not on the wire: EOPNOTSUPP, sent as NBD_EINVAL');
    assert.match(r.stdout, /nbdsh ok/);
    assertSameBytes(fs.readFileSync(DISK).subarray(65536, 131072), Buffer.alloc(65536, 0xcd), 'the nbdsh write at ggated');

    const list = await blockgateRun(['ggatec', 'list', '--control', CTL]);
    assert.equal(list.stdout, 'ggate0\n');
    const d = await blockgateRun(['ggatec', 'destroy', '-u', '0', '--control', CTL]);
    assert.equal(d.code, 0, d.stderr);
    assert.equal(await handler.exited(), 0, 'ggatec exits 0 on ECANCELED');
    assert.deepEqual((await statusJson(CTL)).gates, []);
  });

  test('flushes go through the chain: success, then EIO while ggated’s error filter fails flushes', TEST, async () => {
    const handler = children.blockgate(['ggatec', 'create', '-u', '1', '-p', String(gg.port), '--control', CTL, '127.0.0.1', FLAKY_PATH]);
    await untilGates(CTL, (g) => g.some((x) => x.name === 'ggate1' && x.sleeping > 0), 'ggate1 served');
    assert.equal(handler.stdout(), '', 'no name printed with -u, as in FreeBSD');
    const flush = (): Promise<{ stdout: string }> =>
      runOk('nbdsh', ['-u', uri('ggate1'), '-c', 'h.pwrite(b"\\x01" * 4096, 0)\ntry:\n    h.flush()\n    print("flush ok")\nexcept nbd.Error as e:\n    print("flush errno", e.errno)']);
    assert.match((await flush()).stdout, /flush ok/);
    fs.writeFileSync(TRIGGER, '');
    try {
      assert.match((await flush()).stdout, new RegExp(`flush errno (EIO|${os.constants.errno.EIO})\\n`));
    } finally {
      fs.rmSync(TRIGGER);
    }
    assert.match((await flush()).stdout, /flush ok/);
    assert.doesNotMatch(handler.stderr(), /lost connection/, 'a device error is not a transport event');
    await blockgateOk(['ggatec', 'destroy', '-u', '1', '--control', CTL]);
    assert.equal(await handler.exited(), 0);
  });

  test('ggated killed and restarted on its port while nbdsh streams writes: ggatec reconnects with a fresh token, nbdsh sees no error, the data verifies, no ErrSeq records anything', TEST, async () => {
    const BS = 65536;
    const N = 256;
    const disk = path.join(tmp, 'disk2.img');
    fs.writeFileSync(disk, Buffer.alloc(N * BS));
    const exportsFile = path.join(tmp, 'gg2.exports');
    fs.writeFileSync(exportsFile, `127.0.0.1 RW ${disk}\n`);
    let own = await ggated(exportsFile, CONFIG);
    const port = own.port;
    const handler = children.blockgate(['ggatec', 'create', '-v', '-p', String(port), '--control', CTL, '127.0.0.1', disk]);
    const [name] = await handler.waitFor(/ggate\d+/);
    const [, firstToken] = await handler.waitFor(/forwarding to .* token (0x[0-9a-f]+)\)/, 'stderr');

    const script = streamWritesScript(BS, N);
    const client = children.start('nbdsh', ['-u', uri(name!), '-c', script]);
    await client.waitFor(/^40$/m);
    own.child.proc.kill('SIGKILL');
    assert.equal(await own.child.exited(), 'SIGKILL');
    await handler.waitFor(/lost connection/, 'stderr');
    assert.doesNotMatch(client.stdout(), /VERIFIED/);
    own = await ggated(exportsFile, CONFIG, port);
    assert.equal(own.port, port);

    await client.waitFor(/VERIFIED/);
    assert.equal(await client.exited(), 0, client.stderr());
    const [, secondToken] = /reconnected to .* \(token (0x[0-9a-f]+)\)/.exec(handler.stderr()) ?? [];
    assert.ok(secondToken, handler.stderr());
    assert.notEqual(secondToken, firstToken, 'a fresh token after the restart');
    assertSameBytes(fs.readFileSync(disk), streamedBytes(BS, N), 'the file behind the restarted ggated');

    const st = await statusJson(CTL);
    const exp = st.exports.find((e) => e.name === name);
    assert.ok(exp, 'the gate is an export');
    assert.deepEqual(exp.errseq, { error: 0, seen: false, counter: 0, value: 0 }, 'nothing recorded in the export’s ErrSeq');
    const unit = st.gates.find((g) => g.name === name)!.unit;
    await blockgateOk(['ggatec', 'destroy', '-u', String(unit), '--control', CTL]);
    assert.equal(await handler.exited(), 0);
    own.child.proc.kill('SIGTERM');
    assert.equal(await own.child.exited(), 0);
  });

  test('SIGTERM stops ggatec and leaves the gate; ggatec rescue serves it again', TEST, async () => {
    const handler = children.blockgate(['ggatec', 'create', '-u', '4', '-p', String(gg.port), '--control', CTL, '127.0.0.1', DISK]);
    await untilGates(CTL, (g) => g.some((x) => x.name === 'ggate4' && x.sleeping > 0), 'ggate4 served');
    handler.proc.kill('SIGTERM');
    assert.equal(await handler.exited(), 0);
    assert.match(handler.stderr(), /the gate remains/);
    const list = await blockgateRun(['ggatec', 'list', '-v', '-u', '4', '--control', CTL]);
    assert.match(list.stdout, /Geom name: ggate4/);

    const rescuer = children.blockgate(['ggatec', 'rescue', '-u', '4', '-p', String(gg.port), '--control', CTL, '127.0.0.1', DISK]);
    await untilGates(CTL, (g) => g.some((x) => x.name === 'ggate4' && x.sleeping > 0), 'ggate4 served again');
    const r = await runOk('nbdsh', ['-u', uri('ggate4'), '-c', 'h.pwrite(b"\\x42" * 4096, 8192)\nh.flush()\nassert h.pread(4096, 8192) == b"\\x42" * 4096\nprint("ok")']);
    assert.match(r.stdout, /ok/);
    assertSameBytes(fs.readFileSync(DISK).subarray(8192, 12288), Buffer.alloc(4096, 0x42), 'the write at ggated');
    await blockgateOk(['ggatec', 'destroy', '-u', '4', '--control', CTL]);
    assert.equal(await rescuer.exited(), 0);
  });

  test('refusals end create with status 1 and make no gate: a path not exported (EPERM), no ggated (ECONNREFUSED), an incompatible -s', TEST, async () => {
    const notExported = await blockgateRun(['ggatec', 'create', '-p', String(gg.port), '--control', CTL, '127.0.0.1', '/not/exported']);
    assert.equal(notExported.code, 1);
    assert.match(notExported.stderr, /cannot connect: .*refused the connection.*\(EPERM\)/);
    const ro = await blockgateRun(['ggatec', 'create', '-p', String(gg.port), '-s', '256', '--control', CTL, '127.0.0.1', DISK]);
    assert.equal(ro.code, 1);
    assert.match(ro.stderr, /not a multiple of the server's sector size 512 \(EINVAL\)/);
    const none = await blockgateRun(['ggatec', 'create', '-p', '1', '--control', CTL, '127.0.0.1', DISK]);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /ECONNREFUSED/);
    const rescue = await blockgateRun(['ggatec', 'rescue', '-u', '42', '-p', String(gg.port), '--control', CTL, '127.0.0.1', DISK]);
    assert.equal(rescue.code, 1);
    assert.match(rescue.stderr, /no gate unit 42 \(ENXIO\)/);
    assert.deepEqual((await statusJson(CTL)).gates, []);
  });
});
