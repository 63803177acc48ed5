/**
 * Interop, the GEOM Gate path end to end with real processes: a `blockgate serve` child
 * with its control socket on a temp path, `blockgate ggatel` children serving gates from
 * files, and libnbd's tools and qemu-img reading and writing the gate exports `ggate<N>`.
 *
 * Covered: data through a handler process (nbdcopy, qemu-img, nbdsh, with trim and
 * flush); SIGKILL of the handler while nbdsh streams writes, `ggatel rescue`, and the
 * client seeing no error with every byte verified; destroy without force while a client
 * is attached (EBUSY) and forced (pending and later requests fail EIO); `blockgate
 * status` and `ggatel list`; a control socket left by a killed server is reused.
 *
 * Every child is started from the sources, every wait is bounded, and every child still
 * alive is killed by PID in `after`.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run, runOk } from '../helpers/run.js';
import { assertSameBytes } from '../helpers/assertions.js';
import { streamWritesScript, streamedBytes } from '../helpers/nbdsh-script.js';
import { ChildSet, blockgateOk, blockgateRun, statusJson, untilGates, type Child, type GateJson } from '../helpers/children.js';

const MiB = 1024 * 1024;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-interop-gate-'));
const CTL = path.join(tmp, 'run', 'ctl.sock');
const NBD = path.join(tmp, 'nbd.sock');
const children = new ChildSet();

const uri = (name: string): string => `nbd+unix:///${name}?socket=${NBD}`;

async function gates(): Promise<GateJson[]> {
  return (await statusJson(CTL)).gates;
}

function seeded(seed: number, n: number): Buffer {
  const b = Buffer.alloc(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i += 4) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    b.writeUInt32LE(s, i);
  }
  return b;
}

let server: Child;

before(async () => {
  server = children.blockgate(['serve', '--print-uri', '--control', CTL, '-U', NBD, 'memory:1M']);
  await server.waitFor(/nbd\+unix/);
});

after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe('gates served by blockgate ggatel, used by real NBD clients', () => {
  test('create prints ggate0; nbdcopy, qemu-img and nbdsh read and write it with the data verified; destroy ends the handler with 0', async () => {
    const disk = path.join(tmp, 'disk0.img');
    const original = seeded(1, 8 * MiB);
    fs.writeFileSync(disk, original);
    const handler = children.blockgate(['ggatel', 'create', '--control', CTL, disk]);
    const [name] = await handler.waitFor(/ggate\d+/);
    assert.equal(name, 'ggate0');
    assert.equal(fs.statSync(CTL).mode & 0o777, 0o600, 'the control socket is owner-only');

    // Read: the file's bytes come out through the handler.
    const out = path.join(tmp, 'out0.img');
    await runOk('nbdcopy', [uri('ggate0'), out]);
    assertSameBytes(fs.readFileSync(out), original, 'nbdcopy from ggate0');

    // Write with qemu-img, compare with qemu-img and with the file itself.
    const src = path.join(tmp, 'src0.img');
    const fresh = seeded(2, 8 * MiB);
    fs.writeFileSync(src, fresh);
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri('ggate0')]);
    await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri('ggate0')]);
    assertSameBytes(fs.readFileSync(disk), fresh, 'the file behind ggate0 after qemu-img convert');

    // nbdsh: write, trim (DELETE writes zeroes), flush, read back.
    const r = await runOk('nbdsh', [
      '-u',
      uri('ggate0'),
      '-c',
      [
        'h.pwrite(b"\\xab" * 65536, 1048576)',
        'h.trim(8192, 1048576)',
        'h.flush()',
        'b = h.pread(65536, 1048576)',
        'assert b[:8192] == bytes(8192) and b[8192:] == b"\\xab" * (65536 - 8192), "trim/write mismatch"',
        'print("nbdsh ok")',
      ].join('\n'),
    ]);
    assert.match(r.stdout, /nbdsh ok/);
    const after = fs.readFileSync(disk);
    assertSameBytes(after.subarray(1048576 + 8192, 1048576 + 65536), Buffer.alloc(65536 - 8192, 0xab), 'write landed in the file');
    assertSameBytes(after.subarray(1048576, 1048576 + 8192), Buffer.alloc(8192), 'trim zeroed the file range');

    // list and status show it.
    const list = await blockgateRun(['ggatel', 'list', '--control', CTL]);
    assert.equal(list.stdout, 'ggate0\n');
    const verbose = await blockgateRun(['ggatel', 'list', '-v', '--control', CTL]);
    assert.match(verbose.stdout, new RegExp(`info: ${disk.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
    assert.match(verbose.stdout, /Mediasize: 8388608/);
    const status = await blockgateRun(['status', '--control', CTL]);
    assert.equal(status.code, 0, status.stderr);
    assert.match(status.stdout, /export ggate0: gate ggate0 8MiB, 8MiB, read-write, gate unit 0/);
    assert.match(status.stdout, /no write-back error recorded/);

    const d = await blockgateRun(['ggatel', 'destroy', '-u', '0', '--control', CTL]);
    assert.equal(d.code, 0, d.stderr);
    assert.equal(await handler.exited(), 0, 'the handler exits cleanly on ECANCELED');
    assert.deepEqual(await gates(), []);
    const gone = await run('nbdinfo', [uri('ggate0')]);
    assert.notEqual(gone.code, 0, 'the export is gone with the gate');
  });

  test('SIGKILL of the handler while nbdsh streams writes, then ggatel rescue: the client sees no error and the data verifies', async () => {
    const BS = 65536;
    const N = 256;
    const disk = path.join(tmp, 'disk1.img');
    fs.writeFileSync(disk, Buffer.alloc(N * BS));
    const handler = children.blockgate(['ggatel', 'create', '--control', CTL, disk]);
    const [name] = await handler.waitFor(/ggate\d+/);

    // Up to 8 writes in flight, each completion checked; progress is printed as writes are submitted.
    const script = streamWritesScript(BS, N);
    const client = children.start('nbdsh', ['-u', uri(name!), '-c', script]);
    await client.waitFor(/^40$/m);
    handler.proc.kill('SIGKILL');
    assert.equal(await handler.exited(), 'SIGKILL');
    // With no handler, the writes pile up in the gate: 8 in flight or queued, none failed.
    const mine = (g: GateJson[]): GateJson | undefined => g.find((x) => x.name === name);
    const gate = mine(await untilGates(CTL, (g) => mine(g)!.queued + mine(g)!.inFlight === 8, 'eight writes waiting'))!;
    assert.equal(gate.sleeping, 0, 'the dead handler’s STARTs were withdrawn');
    assert.doesNotMatch(client.stdout(), /VERIFIED/);

    const rescuer = children.blockgate(['ggatel', 'rescue', '-u', String(gate.unit), '--control', CTL, disk]);
    await client.waitFor(/VERIFIED/);
    assert.equal(await client.exited(), 0, client.stderr());
    assertSameBytes(fs.readFileSync(disk), streamedBytes(BS, N), 'the file behind the rescued gate');

    await blockgateOk(['ggatel', 'destroy', '-u', String(gate.unit), '--control', CTL]);
    assert.equal(await rescuer.exited(), 0);
  });

  test('destroy while a client is attached: EBUSY; forced: pending and later requests fail EIO', async () => {
    const disk = path.join(tmp, 'disk2.img');
    fs.writeFileSync(disk, Buffer.alloc(MiB, 0x11));
    const handler = children.blockgate(['ggatel', 'create', '-u', '3', '--control', CTL, disk]);
    // With -u the name is not printed (as FreeBSD); wait for the gate instead.
    await untilGates(CTL, (g) => g.some((x) => x.name === 'ggate3' && x.sleeping > 0), 'ggate3 served');
    assert.equal(handler.stdout(), '');

    const script = `
import sys
assert h.pread(512, 0) == b"\\x11" * 512
print("connected", flush=True)
sys.stdin.readline()
buf = nbd.Buffer(512)
c = h.aio_pread(buf, 0)
print("queued", flush=True)
sys.stdin.readline()
while h.aio_in_flight() > 0:
    h.poll(-1)
try:
    h.aio_command_completed(c)
    print("pending ok")
except nbd.Error as e:
    print("pending errno", e.errno)
for name, f in (("read", lambda: h.pread(512, 0)), ("write", lambda: h.pwrite(bytes(512), 0)), ("flush", lambda: h.flush())):
    try:
        f()
        print(name, "ok")
    except nbd.Error as e:
        print(name, "errno", e.errno)
print("done", flush=True)
`;
    const client = children.start('nbdsh', ['-u', uri('ggate3'), '-c', script]);
    await client.waitFor(/connected/);
    const busy = await blockgateRun(['ggatel', 'destroy', '-u', '3', '--control', CTL]);
    assert.equal(busy.code, 1);
    assert.match(busy.stderr, /EBUSY/);
    assert.equal((await gates()).find((g) => g.unit === 3)?.openCount, 1);

    // Without a handler the next read waits in the gate.
    handler.proc.kill('SIGKILL');
    await handler.exited();
    client.proc.stdin!.write('\n');
    await client.waitFor(/queued/);
    await untilGates(CTL, (g) => g.find((x) => x.unit === 3)?.queued === 1, 'read queued');
    const forced = await blockgateRun(['ggatel', 'destroy', '-f', '-u', '3', '--control', CTL]);
    assert.equal(forced.code, 0, forced.stderr);
    client.proc.stdin!.write('\n');
    await client.waitFor(/done/);
    assert.equal(await client.exited(), 0, client.stderr());
    // nbd.Error.errno is the errno's name in this libnbd (a number in older ones).
    const EIO = `(EIO|${os.constants.errno.EIO})`;
    for (const what of ['pending', 'read', 'write', 'flush']) {
      assert.match(client.stdout(), new RegExp(`${what} errno ${EIO}\\n`), `${what} failed EIO`);
    }
    assert.equal((await gates()).find((g) => g.unit === 3), undefined);
  });

  test('status --json: exports with their errseq state and sessions, gates with their queues', async () => {
    const disk = path.join(tmp, 'disk3.img');
    fs.writeFileSync(disk, Buffer.alloc(MiB));
    const handler = children.blockgate(['ggatel', 'create', '--control', CTL, disk]);
    const [name] = await handler.waitFor(/ggate\d+/);
    const client = children.start('nbdsh', ['-u', uri(name!), '-c', 'import sys\nprint("attached", flush=True)\nsys.stdin.readline()']);
    await client.waitFor(/attached/);
    const r = await blockgateRun(['status', '--json', '--control', CTL]);
    assert.equal(r.code, 0, r.stderr);
    const st = JSON.parse(r.stdout) as {
      exports: { name: string; gate?: number; errseq: { error: number; seen: boolean; counter: number }; sessions: { errorPending: boolean }[] }[];
      gates: GateJson[];
    };
    const exp = st.exports.find((e) => e.name === name)!;
    assert.ok(exp, 'the gate is listed among the exports');
    assert.deepEqual(exp.errseq, { error: 0, seen: false, counter: 0, value: 0 });
    assert.deepEqual(exp.sessions.map((s) => s.errorPending), [false]);
    const g = st.gates.find((x) => x.name === name)!;
    assert.equal(g.openCount, 1);
    assert.equal(g.info, disk);
    assert.ok(st.exports.some((e) => e.name === '' && e.gate === undefined), 'the memory export is there too');
    client.proc.stdin!.end('\n');
    assert.equal(await client.exited(), 0);
    await blockgateOk(['ggatel', 'destroy', '-u', String(g.unit), '--control', CTL]);
    assert.equal(await handler.exited(), 0);
  });

  test('errors of the tools: no server on the control path, unknown unit, bad flags', async () => {
    const disk = path.join(tmp, 'disk4.img');
    fs.writeFileSync(disk, Buffer.alloc(MiB));
    const none = await blockgateRun(['status', '--control', path.join(tmp, 'nothing.sock')]);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /cannot connect to the control socket/);
    const rescue = await blockgateRun(['ggatel', 'rescue', '-u', '42', '--control', CTL, disk]);
    assert.equal(rescue.code, 1);
    assert.match(rescue.stderr, /no gate unit 42 \(ENXIO\)/);
    const sector = await blockgateRun(['ggatel', 'create', '-s', '1000', '--control', CTL, disk]);
    assert.equal(sector.code, 1);
    assert.match(sector.stderr, /power of two|multiple/);
    const mode = await blockgateRun(['ggatel', 'create', '-o', 'xx', '--control', CTL, disk]);
    assert.notEqual(mode.code, 0);
    assert.equal((await gates()).length, 0);
  });

  test('a control socket left by a killed server is taken over by the next one; a live one is not', async () => {
    const ctl = path.join(tmp, 'second', 'ctl.sock');
    const first = children.blockgate(['serve', '--print-uri', '--control', ctl, '-U', path.join(tmp, 'nbd2.sock'), 'memory:1M']);
    await first.waitFor(/nbd\+unix/);
    const clash = await blockgateRun(['serve', '--control', ctl, '-U', path.join(tmp, 'nbd3.sock'), 'memory:1M']);
    assert.equal(clash.code, 1);
    assert.match(clash.stderr, /already listening/);
    first.proc.kill('SIGKILL');
    await first.exited();
    assert.ok(fs.statSync(ctl).isSocket(), 'the killed server left its socket');
    const next = children.blockgate(['serve', '--print-uri', '--control', ctl, '-U', path.join(tmp, 'nbd4.sock'), 'memory:1M']);
    await next.waitFor(/nbd\+unix/);
    const st = await blockgateRun(['status', '--control', ctl]);
    assert.equal(st.code, 0, st.stderr);
    next.proc.kill('SIGTERM');
    assert.equal(await next.exited(), 0);
    assert.equal(fs.existsSync(ctl), false, 'a clean shutdown removes the socket');
  });
});
