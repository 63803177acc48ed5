import { afterEach, beforeEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { spawn } from 'node:child_process';
import path from 'node:path';
import fc from 'fast-check';
import { BlockError } from '../../../src/errors/index.js';
import { GATE, GATE_FLAG } from '../../../src/gate/index.js';
import { NBD_CMD } from '../../../src/nbd/constants.js';
import { ControlServer } from '../../../src/gate/control/server.js';
import { GateService } from '../../../src/gate/control/gates.js';
import { CONTROL, CONTROL_OP, encodeRequest } from '../../../src/gate/control/protocol.js';
import { startControl, until, type ControlFixture } from './fixture.js';
import { rejectsWith } from '../../helpers/assertions.js';

/** Observes a promise without awaiting it. */
function track<T>(p: Promise<T>): { settled: boolean; value?: T; error?: unknown; promise: Promise<T> } {
  const t: { settled: boolean; value?: T; error?: unknown; promise: Promise<T> } = { settled: false, promise: p };
  p.then(
    (v) => Object.assign(t, { settled: true, value: v }),
    (e: unknown) => Object.assign(t, { settled: true, error: e }),
  );
  return t;
}

const NBD_EIO = 5;

let fx: ControlFixture;
beforeEach(async () => {
  fx = await startControl();
});
afterEach(async () => {
  await fx.close();
});

describe('control socket: access', () => {
  test('the socket is mode 0600 and a directory it creates is 0700', () => {
    assert.equal(fs.statSync(fx.ctlPath).mode & 0o777, 0o600);
    assert.equal(fs.statSync(path.dirname(fx.ctlPath)).mode & 0o777, 0o700);
  });

  test('a second server on the same path fails EBUSY; a stale socket file is replaced', async () => {
    const other = new ControlServer({ gates: new GateService(fx.registry) });
    await rejectsWith(other.listen(fx.ctlPath), 'EBUSY', /already listening/);
    // A socket file nobody listens on (a server killed with SIGKILL) is taken over.
    const stale = path.join(fx.dir, 'stale.sock');
    const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(stale)}, () => console.log('up'))`], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('child did not listen')), 10_000);
      child.stdout!.once('data', () => {
        clearTimeout(t);
        resolve();
      });
    });
    child.kill('SIGKILL');
    await new Promise<void>((resolve) => child.once('exit', () => resolve()));
    assert.ok(fs.statSync(stale).isSocket(), 'the dead server left its socket file');
    await other.listen(stale);
    assert.equal(fs.statSync(stale).mode & 0o777, 0o600);
    await other.close();
    assert.equal(fs.existsSync(stale), false);
  });

  test('a directory others can write to (not sticky) is refused: they could swap the socket', async () => {
    const open = path.join(fx.dir, 'open');
    fs.mkdirSync(open);
    fs.chmodSync(open, 0o777);
    await rejectsWith(new ControlServer({ gates: fx.gates }).listen(path.join(open, 'ctl.sock')), 'EACCES', /writable by others/);
    assert.equal(fs.existsSync(path.join(open, 'ctl.sock')), false);
    // With the sticky bit (like /tmp) it is fine.
    fs.chmodSync(open, 0o1777);
    const ok = new ControlServer({ gates: new GateService(fx.registry) });
    await ok.listen(path.join(open, 'ctl.sock'));
    await ok.close();
  });

  test('a path that is not a socket is refused (EEXIST), never deleted', async () => {
    const file = path.join(fx.dir, 'plain');
    fs.writeFileSync(file, 'keep me');
    await rejectsWith(new ControlServer({ gates: fx.gates }).listen(file), 'EEXIST');
    assert.equal(fs.readFileSync(file, 'utf8'), 'keep me');
  });
});

describe('control socket: the two error channels', () => {
  test('call failures reject: bad version EINVAL, unknown unit ENXIO (DONE: ENOENT), bad arguments EINVAL', async () => {
    const c = await fx.connect();
    await rejectsWith(c.create({ version: 2, mediasize: 1 << 20, sectorsize: 512 }), 'EINVAL', /version 2/);
    await rejectsWith(c.start({ version: 2, unit: 0, length: 512 }), 'EINVAL', /version 2/);
    await rejectsWith(c.start({ unit: 5, length: 512 }), 'ENXIO');
    await rejectsWith(c.done({ unit: 5, seq: 1 }), 'ENOENT');
    await rejectsWith(c.destroy({ unit: 5, force: true }), 'ENXIO');
    await rejectsWith(c.cancel({ unit: 5, seq: 0 }), 'ENXIO');
    await rejectsWith(c.create({ mediasize: 1000, sectorsize: 512 }), 'EINVAL', /multiple/);
    // Unknown keys are refused by the server's schema.
    await rejectsWith(c.create({ mediasize: 1 << 20, sectorsize: 512, bogus: 1 } as never), 'EINVAL', /bogus/);
    await rejectsWith(c.modify({ unit: 0, mediasize: 1 << 21 }), 'ENXIO');
    // The connection is still usable after failed calls.
    assert.deepEqual(await c.list(), []);
  });

  test('a destroyed gate resolves START with ECANCELED (an instance condition, not a failure)', async () => {
    const c = await fx.connect();
    const unit = await c.create({ mediasize: 1 << 20, sectorsize: 512 });
    assert.equal(unit, 0);
    const waiting = [track(c.start({ unit, length: 4096 })), track(c.start({ unit, length: 4096 }))];
    await until(() => fx.registry.list()[0]?.sleeping === 2, 'two sleeping STARTs');
    const admin = await fx.connect();
    await admin.destroy({ unit, force: false });
    for (const w of waiting) assert.deepEqual(await w.promise, { error: 'ECANCELED' });
    // The unit is gone now: a new START is a call failure.
    await rejectsWith(c.start({ unit, length: 4096 }), 'ENXIO');
  });

  test('a WRITE larger than the buffer: START resolves ENOMEM with the length, the request stays at the head', async () => {
    const c = await fx.connect();
    const unit = await c.create({ mediasize: 1 << 20, sectorsize: 512 });
    const dev = fx.registry.open(unit);
    const data = Buffer.alloc(8192, 0x5a);
    const w = track(dev.write(data, 4096, 0));
    assert.deepEqual(await c.start({ unit, length: 512 }), { error: 'ENOMEM', length: 8192 });
    const r = await c.start({ unit, length: 8192 });
    assert.equal(r.error, 0);
    if (r.error !== 0) return;
    assert.equal(r.cmd, 'write');
    assert.equal(r.seq, 1, 'sequence numbers start at 1');
    assert.equal(r.offset, 4096);
    assert.deepEqual(r.data, data);
    assert.equal(w.settled, false);
    await c.done({ unit, seq: r.seq });
    await w.promise;
    await dev.close();
  });

  test('DONE of a READ carries the data; DONE with an error fails the request; EAGAIN requeues it', async () => {
    const c = await fx.connect();
    const unit = await c.create({ mediasize: 1 << 20, sectorsize: 512 });
    const dev = fx.registry.open(unit);
    const buf = Buffer.alloc(1024);
    const rd = track(dev.read(buf, 512, 0));
    const r1 = await c.start({ unit, length: 0 });
    assert.ok(r1.error === 0 && r1.cmd === 'read' && r1.length === 1024);
    await c.done({ unit, seq: r1.seq, error: 'EAGAIN' });
    const r2 = await c.start({ unit, length: 0 });
    assert.ok(r2.error === 0 && r2.seq === r1.seq, 'the same request again');
    await c.done({ unit, seq: r2.seq, data: Buffer.alloc(1024, 0xab) });
    await rd.promise;
    assert.deepEqual(buf, Buffer.alloc(1024, 0xab));
    const fl = track(dev.flush(0));
    const r3 = await c.start({ unit, length: 0 });
    assert.ok(r3.error === 0 && r3.cmd === 'flush');
    await c.done({ unit, seq: r3.seq, error: 'ENOSPC' });
    await rejectsWith(fl.promise, 'ENOSPC');
    // A short READ answer fails the call (EFAULT) and the request (EIO).
    const rd2 = track(dev.read(Buffer.alloc(512), 0, 0));
    const r4 = await c.start({ unit, length: 0 });
    await rejectsWith(c.done({ unit, seq: r4.error === 0 ? r4.seq : 0, data: Buffer.alloc(100) }), 'EFAULT');
    await rejectsWith(rd2.promise, 'EIO');
    // DONE of an unknown seq is a no-op success.
    await c.done({ unit, seq: 999 });
    await dev.close();
  });

  test('START interrupted by the caller rejects EINTR and loses nothing; internal wake-ups never surface', async () => {
    const c = await fx.connect();
    const unit = await c.create({ mediasize: 1 << 20, sectorsize: 512 });
    const ac = new AbortController();
    const s = track(c.start({ unit, length: 4096, signal: ac.signal }));
    await until(() => fx.registry.list()[0]?.sleeping === 1, 'sleeping START');
    // Internal wake-ups (another handler was faster, a cancel that moved nothing).
    fx.registry.wakeup(unit);
    await c.cancel({ unit, seq: 0 });
    await until(() => fx.registry.list()[0]?.sleeping === 1, 'back asleep');
    assert.equal(s.settled, false);
    ac.abort();
    await rejectsWith(s.promise, 'EINTR');
    assert.equal(fx.registry.list()[0]!.sleeping, 0);
    // A request queued afterwards goes to the next START.
    const dev = fx.registry.open(unit);
    const w = track(dev.flush(0));
    const r = await c.start({ unit, length: 0 });
    assert.ok(r.error === 0 && r.cmd === 'flush');
    await c.done({ unit, seq: r.seq });
    await w.promise;
    // An already aborted signal fails at once.
    await rejectsWith(c.start({ unit, length: 0, signal: AbortSignal.abort() }), 'EINTR');
    await dev.close();
  });

  test('several STARTs in flight on one connection each get their own request', async () => {
    const c = await fx.connect();
    const unit = await c.create({ mediasize: 1 << 20, sectorsize: 512 });
    const starts = [0, 1, 2].map(() => c.start({ unit, length: 4096 }));
    await until(() => fx.registry.list()[0]?.sleeping === 3, 'three sleeping STARTs');
    const dev = fx.registry.open(unit);
    const reads = [0, 1, 2].map((i) => dev.read(Buffer.alloc(512), i * 512, 0));
    const got = await Promise.all(starts);
    const seqs = got.map((r) => (r.error === 0 ? r.seq : -1)).sort();
    assert.deepEqual(seqs, [1, 2, 3]);
    await Promise.all(got.map((r) => c.done({ unit, seq: r.error === 0 ? r.seq : 0, data: Buffer.alloc(512) })));
    await Promise.all(reads);
    await dev.close();
  });
});

describe('control socket: connections', () => {
  test('a closing connection interrupts its STARTs and fails nothing; cancel(0) hands taken requests to a rescuer', async () => {
    const a = await fx.connect();
    const unit = await a.create({ mediasize: 1 << 20, sectorsize: 512 });
    const dev = fx.registry.open(unit);
    const taken = track(a.start({ unit, length: 4096 }));
    const waiting = track(a.start({ unit, length: 4096 }));
    await until(() => fx.registry.list()[0]?.sleeping === 2, 'two sleeping STARTs');
    const w = track(dev.write(Buffer.alloc(512, 1), 0, 0));
    await until(() => taken.settled || waiting.settled, 'a START took the write');
    await a.close();
    await until(() => fx.control.connectionCount === 0, 'connection gone on the server');
    const g = fx.registry.list()[0]!;
    assert.equal(g.sleeping, 0, 'the waiting START was interrupted');
    assert.equal(g.inFlight, 1, 'the taken request stays in flight');
    assert.equal(w.settled, false, 'and is not failed');
    // A rescuer puts it back and serves it.
    const b = await fx.connect();
    await b.cancel({ unit, seq: 0 });
    const r = await b.start({ unit, length: 4096 });
    assert.ok(r.error === 0 && r.cmd === 'write' && r.seq === 1);
    await b.done({ unit, seq: r.seq });
    await w.promise;
    await dev.close();
  });

  test('bad frames close that connection only; duplicate call ids too; unknown ops get EOPNOTSUPP', async () => {
    const good = await fx.connect();
    /** Sends bytes; ends after `replyBytes` bytes came back, else waits for the server to close (10 s bound). */
    const raw = (bytes: Buffer[], replyBytes?: number): Promise<{ closedByServer: boolean; data: Buffer }> =>
      new Promise((resolve) => {
        const s = net.connect(fx.ctlPath);
        const got: Buffer[] = [];
        let n = 0;
        let byServer = true;
        const guard = setTimeout(() => {
          byServer = false;
          s.destroy();
        }, 10_000);
        s.on('data', (b: Buffer) => {
          got.push(b);
          n += b.length;
          if (replyBytes !== undefined && n >= replyBytes) {
            byServer = false;
            s.end();
          }
        });
        s.on('error', () => undefined);
        s.on('close', () => {
          clearTimeout(guard);
          resolve({ closedByServer: byServer, data: Buffer.concat(got) });
        });
        s.on('connect', () => {
          for (const b of bytes) s.write(b);
        });
      });
    const garbage = await raw([Buffer.from('GET / HTTP/1.0\r\n\r\n')]);
    assert.deepEqual(garbage, { closedByServer: true, data: Buffer.alloc(0) }, 'garbage: closed without a reply');
    const huge = Buffer.from('62674331000300040000000100ffffff', 'hex');
    assert.deepEqual(await raw([huge]), { closedByServer: true, data: Buffer.alloc(0) }, 'oversized body: closed');
    // Unknown op, well framed: a failed call with EOPNOTSUPP (Linux 95).
    const unknown = Buffer.from('62674331000300630000000700000000', 'hex');
    const u = await raw([unknown], 20 + 1);
    assert.equal(u.closedByServer, false, 'a well-framed unknown op does not close the connection');
    assert.equal(u.data.readUInt32BE(8), 7);
    assert.equal(u.data.readInt32BE(12), 95);
    // Two STARTs with one call id: the connection is closed, the first START interrupted.
    const unit = await good.create({ mediasize: 1 << 20, sectorsize: 512 });
    const dup = encodeRequest({ op: 'start', version: GATE.VERSION, callId: 9, unit, length: 0 });
    const d = await raw([...dup, ...dup]);
    assert.equal(d.closedByServer, true);
    await until(() => fx.registry.list()[0]?.sleeping === 0, 'START interrupted');
    // The server and the other connection are fine.
    assert.equal((await good.list()).length, 1);
    assert.equal(CONTROL_OP.START, 4);
  });

  test('a connection with MAX_CALLS_IN_FLIGHT calls in flight is not read further until some finish', async () => {
    const c = await fx.connect();
    const unit = await c.create({ mediasize: 1 << 20, sectorsize: 512 });
    const extra = 10;
    const starts = Array.from({ length: CONTROL.MAX_CALLS_IN_FLIGHT + extra }, () => track(c.start({ unit, length: 0 })));
    await until(() => fx.registry.list()[0]?.sleeping === CONTROL.MAX_CALLS_IN_FLIGHT, 'the limit reached');
    for (let i = 0; i < 20; i++) await new Promise<void>((resolve) => setImmediate(resolve));
    assert.equal(fx.registry.list()[0]!.sleeping, CONTROL.MAX_CALLS_IN_FLIGHT, 'no call beyond the limit was read');
    // Destroying the gate ends the STARTs in flight; the server reads on, and the rest
    // find no gate.
    const admin = await fx.connect();
    await admin.destroy({ unit, force: false });
    await until(() => starts.every((s) => s.settled), 'every START answered', 200_000);
    assert.equal(starts.filter((s) => (s.value as { error?: string } | undefined)?.error === 'ECANCELED').length, CONTROL.MAX_CALLS_IN_FLIGHT);
    const failed = starts.filter((s) => s.error !== undefined);
    assert.equal(failed.length, extra);
    assert.ok(failed.every((s) => s.error instanceof BlockError && s.error.code === 'ENXIO'));
  });

  test('random bytes, with and without a valid header in front, never take the server down', async () => {
    const unit = await (await fx.connect()).create({ mediasize: 1 << 20, sectorsize: 512 });
    const header = (op: number, len: number): Buffer => {
      const h = Buffer.alloc(16);
      h.writeUInt32BE(CONTROL.REQUEST_MAGIC, 0);
      h.writeUInt16BE(GATE.VERSION, 4);
      h.writeUInt16BE(op, 6);
      h.writeUInt32BE(1, 8);
      h.writeUInt32BE(len, 12);
      return h;
    };
    const inputs = fc.sample(
      fc.oneof(
        fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)),
        fc
          .tuple(fc.constantFrom(0, 1, 2, 3, 4, 5, 16, 17, 18, 99), fc.uint8Array({ maxLength: 300 }))
          .map(([op, body]) => Buffer.concat([header(op, body.length), Buffer.from(body)])),
      ),
      { numRuns: 60, seed: 4242 },
    );
    for (const bytes of inputs) {
      await new Promise<void>((resolve) => {
        const s = net.connect(fx.ctlPath, () => s.end(bytes));
        s.on('error', () => undefined);
        s.on('data', () => undefined);
        s.on('close', () => resolve());
      });
    }
    await until(() => fx.control.connectionCount === 1, 'fuzz connections closed (the creator’s remains)');
    const c = await fx.connect();
    const g = (await c.list()).find((x) => x.unit === unit);
    assert.ok(g, 'the server still answers');
    assert.equal(g.sleeping, 0, 'no START left behind by closed connections');
  });

  test('calls on a closed client reject ECONNRESET; a server that goes away fails calls in flight', async () => {
    const c = await fx.connect();
    const unit = await c.create({ mediasize: 1 << 20, sectorsize: 512 });
    const s = track(c.start({ unit, length: 0 }));
    await until(() => fx.registry.list()[0]?.sleeping === 1, 'sleeping START');
    await fx.control.close();
    await rejectsWith(s.promise, 'ECONNRESET');
    await rejectsWith(c.list(), 'ECONNRESET');
    await until(() => fx.registry.list()[0]?.sleeping === 0, 'the server side interrupted the START');
  });
});

describe('control socket: gates as NBD exports', () => {
  test('a gate is the NBD export ggate<unit> while it exists, or its given name', async () => {
    const c = await fx.connect();
    const unit = await c.create({ mediasize: 1 << 20, sectorsize: 512, info: 'x' });
    assert.ok(fx.nbd.findExport('ggate0'));
    const named = await c.create({ unit: GATE.NAME_GIVEN, name: 'scratch', mediasize: 4096, sectorsize: 4096, flags: GATE_FLAG.READONLY });
    assert.equal(named, 1);
    const exp = fx.nbd.findExport('scratch')!;
    assert.equal(exp.readOnly, true);
    assert.equal(exp.device.size, 4096);
    // MODIFY resizes what new clients see.
    await c.modify({ unit, mediasize: 2 << 20 });
    assert.equal(fx.nbd.findExport('ggate0')!.device.size, 2 << 20);
    await c.destroy({ unit, force: false });
    assert.equal(fx.nbd.findExport('ggate0'), undefined);
    await c.destroy({ unit: GATE.NAME_GIVEN, name: 'scratch', force: false });
    assert.equal(fx.nbd.findExport('scratch'), undefined);
    assert.deepEqual(await c.list(), []);
    // A name that is already an export: the create fails and leaves no gate behind.
    await rejectsWith(c.create({ unit: GATE.NAME_GIVEN, name: 'mem', mediasize: 4096, sectorsize: 512 }), 'EEXIST', /mem/);
    assert.deepEqual(await c.list(), []);
  });

  test('NBD clients read and write through a handler; destroy while attached is EBUSY; forced, pending and later requests fail EIO', async () => {
    const c = await fx.connect();
    const unit = await c.create({ mediasize: 1 << 20, sectorsize: 512 });
    const nbd = await fx.nbdClient('ggate0');
    assert.equal(fx.registry.list()[0]!.openCount, 1, 'the attached NBD client holds the gate open');
    // A write, served by hand.
    nbd.request(0, NBD_CMD.NBD_CMD_WRITE, 1n, 1024, 512, false, Buffer.alloc(512, 0x42));
    const r = await c.start({ unit, length: 4096 });
    assert.ok(r.error === 0 && r.cmd === 'write' && r.offset === 1024);
    assert.deepEqual(r.data, Buffer.alloc(512, 0x42));
    await c.done({ unit, seq: r.seq });
    const wr = await nbd.reply();
    assert.equal(wr.h.cookie, 1n);
    assert.equal(wr.h.error, 0);

    await rejectsWith(c.destroy({ unit, force: false }), 'EBUSY');
    assert.ok(fx.nbd.findExport('ggate0'), 'still exported');

    // A READ nobody serves, then a forced destroy.
    nbd.request(0, NBD_CMD.NBD_CMD_READ, 2n, 0, 512);
    await until(() => fx.registry.list()[0]?.queued === 1, 'READ queued');
    await c.destroy({ unit, force: true });
    const pending = await nbd.reply();
    assert.equal(pending.h.cookie, 2n);
    assert.equal(pending.h.error, NBD_EIO);
    nbd.request(0, NBD_CMD.NBD_CMD_FLUSH, 3n, 0, 0);
    const later = await nbd.reply();
    assert.equal(later.h.cookie, 3n);
    assert.equal(later.h.error, NBD_EIO);
    assert.equal(fx.nbd.findExport('ggate0'), undefined);
  });

  test('closing the NBD client closes the gate: an unforced destroy then succeeds', async () => {
    const c = await fx.connect();
    const unit = await c.create({ mediasize: 1 << 20, sectorsize: 512 });
    const nbd = await fx.nbdClient('ggate0');
    assert.equal((await c.list())[0]!.openCount, 1);
    nbd.close();
    await until(() => fx.registry.list()[0]?.openCount === 0, 'gate closed');
    await c.destroy({ unit, force: false });
  });
});

describe('control socket: status', () => {
  test('shows each export’s errseq and which sessions have an error pending, and looking changes nothing', async () => {
    const c = await fx.connect();
    await c.create({ mediasize: 1 << 20, sectorsize: 512 });
    const a = await fx.nbdClient('mem');
    const b = await fx.nbdClient('mem');
    let st = await c.status();
    const mem = st.exports.find((e) => e.name === 'mem')!;
    assert.deepEqual(mem.errseq, { error: 0, seen: false, counter: 0, value: 0 });
    assert.equal(mem.sessions.length, 2);
    assert.ok(mem.sessions.every((s) => !s.errorPending));
    const gateExp = st.exports.find((e) => e.name === 'ggate0')!;
    assert.equal(gateExp.gate, 0);
    assert.deepEqual(st.gates.map((g) => g.name), ['ggate0']);

    // A write-back error nobody has seen yet.
    fx.mem.errseq.set(5);
    for (let i = 0; i < 3; i++) {
      st = await c.status();
      const m = st.exports.find((e) => e.name === 'mem')!;
      assert.equal(m.errseq.error, 5);
      assert.equal(m.errseq.errorName, 'EIO');
      assert.equal(m.errseq.seen, false);
      assert.ok(m.sessions.every((s) => s.errorPending), 'both sessions have it pending');
    }
    // Looking did not consume it: each session's FLUSH reports it once.
    a.request(0, NBD_CMD.NBD_CMD_FLUSH, 1n, 0, 0);
    assert.equal((await a.reply()).h.error, NBD_EIO);
    st = await c.status();
    const after = st.exports.find((e) => e.name === 'mem')!;
    assert.equal(after.errseq.seen, true);
    assert.deepEqual(
      after.sessions.map((s) => s.errorPending),
      [false, true],
      'a has seen it, b has not',
    );
    b.request(0, NBD_CMD.NBD_CMD_FLUSH, 2n, 0, 0);
    assert.equal((await b.reply()).h.error, NBD_EIO);
    a.request(0, NBD_CMD.NBD_CMD_FLUSH, 3n, 0, 0);
    assert.equal((await a.reply()).h.error, 0, 'once per session');
    st = await c.status();
    assert.ok(st.exports.find((e) => e.name === 'mem')!.sessions.every((s) => !s.errorPending));
  });
});
