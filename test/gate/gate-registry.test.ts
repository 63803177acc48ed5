import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockError } from '../../src/errors/index.js';
import { validateRequest } from '../../src/device/index.js';
import { GATE, GATE_FLAG, GateRegistry, ManualClock, type GateStartRequest } from '../../src/gate/index.js';
import { GateUnit, type GateStartResult } from '../../src/gate/gate-unit.js';
import { V, failedWith, rejectsWith, setup, track, turns, until } from './helpers.js';

/** Narrows a start result to a request (fails the test otherwise). */
function req(r: GateStartResult | undefined): GateStartRequest {
  assert.ok(r !== undefined && r.error === 0, `expected a request, got ${JSON.stringify(r)}`);
  return r;
}

// ---------------------------------------------------------------- Q1: two error channels

test('Q1 a bad version rejects every call with EINVAL', async () => {
  const { reg, unit } = await setup();
  await rejectsWith(reg.create({ version: 2, mediasize: 4096, sectorsize: 512 }), 'EINVAL');
  await rejectsWith(reg.modify({ version: 2, unit, mediasize: 8192 }), 'EINVAL');
  await rejectsWith(reg.destroy({ version: 2, unit, force: true }), 'EINVAL');
  await rejectsWith(reg.cancel({ version: 2, unit, seq: 0 }), 'EINVAL');
  await rejectsWith(reg.start({ version: 2, unit, length: 4096 }), 'EINVAL');
  await rejectsWith(reg.done({ version: 2, unit, seq: 1, error: 0 }), 'EINVAL');
  assert.equal(reg.list().length, 1, 'nothing was destroyed by the rejected call');
  await reg.close();
});

test('Q1 an unknown unit rejects start/modify/destroy/cancel ENXIO and done ENOENT', async () => {
  const reg = new GateRegistry({ clock: new ManualClock() });
  await rejectsWith(reg.start({ version: V, unit: 7, length: 4096 }), 'ENXIO');
  await rejectsWith(reg.modify({ version: V, unit: 7, mediasize: 4096 }), 'ENXIO');
  await rejectsWith(reg.destroy({ version: V, unit: 7, force: true }), 'ENXIO');
  await rejectsWith(reg.cancel({ version: V, unit: 7, seq: 0 }), 'ENXIO');
  await rejectsWith(reg.done({ version: V, unit: 7, seq: 1, error: 0 }), 'ENOENT');
  assert.throws(() => reg.open(7), (e: unknown) => e instanceof BlockError && e.code === 'ENXIO');
});

test('Q1 a destroyed gate resolves a blocked start with ECANCELED (instance channel, not a rejection)', async () => {
  const { reg, unit, dev } = await setup();
  await dev.close();
  const s = track(reg.start({ version: V, unit, length: 4096 }));
  await turns();
  assert.equal(s.settled, false);
  await reg.destroy({ version: V, unit, force: false });
  await s.promise;
  assert.deepEqual(s.value, { error: 'ECANCELED' });
  assert.equal(s.error, undefined);
});

test('Q1 internal wake-ups never surface: start stays pending and later returns a real request', async () => {
  const { reg, unit, dev } = await setup();
  const s = track(reg.start({ version: V, unit, length: 4096 }));
  await until(() => reg.list()[0]!.sleeping === 1);

  // 1. An explicit spurious wake-up (nothing added).
  reg.wakeup(unit);
  await turns();
  assert.equal(s.settled, false, 'a bare wake-up must not end start');
  assert.equal(reg.list()[0]!.sleeping, 1, 'the handler went back to sleep');

  // 2. cancel(0) with nothing in flight wakes the sleepers (as FreeBSD does) but moves nothing.
  await reg.cancel({ version: V, unit, seq: 0 });
  await turns();
  assert.equal(s.settled, false);

  // 3. done of an unknown seq is a no-op and must not disturb the sleeper either.
  await reg.done({ version: V, unit, seq: 999, error: 0 });
  await turns();
  assert.equal(s.settled, false);

  // A real request still reaches the same start call.
  const w = track(dev.write(Buffer.alloc(512, 1), 1024, 0));
  const r = req(await s.promise);
  assert.equal(r.cmd, 'write');
  assert.equal(r.offset, 1024);
  await reg.done({ version: V, unit, seq: r.seq, error: 0 });
  await w.promise;
  await reg.close();
});

test('Q1 a handler that loses the race for a request goes back to sleep without noticing', async () => {
  const { reg, unit, dev } = await setup();
  const a = track(reg.start({ version: V, unit, length: 4096 }));
  const b = track(reg.start({ version: V, unit, length: 4096 }));
  await until(() => reg.list()[0]!.sleeping === 2);
  // One request wakes both sleepers; exactly one gets it, the other sleeps on.
  const r1 = track(dev.read(Buffer.alloc(512), 0, 0));
  await until(() => a.settled || b.settled);
  await turns();
  assert.equal([a, b].filter((t) => t.settled).length, 1);
  assert.equal(reg.list()[0]!.sleeping, 1);
  const winner = a.settled ? a : b;
  const loser = a.settled ? b : a;
  assert.equal(loser.error, undefined);
  // The loser gets the next request.
  const r2 = track(dev.read(Buffer.alloc(512), 512, 0));
  const second = req(await loser.promise);
  assert.equal(second.offset, 512);
  await reg.done({ version: V, unit, seq: req(winner.value).seq, error: 0, data: Buffer.alloc(512, 7) });
  await reg.done({ version: V, unit, seq: second.seq, error: 0, data: Buffer.alloc(512, 8) });
  await r1.promise;
  await r2.promise;
  await reg.close();
});

test('Q1 the caller\'s AbortSignal rejects a waiting start EINTR; the next request is not lost', async () => {
  const { reg, unit, dev } = await setup();
  const ac = new AbortController();
  const s = track(reg.start({ version: V, unit, length: 4096, signal: ac.signal }));
  await until(() => reg.list()[0]!.sleeping === 1);
  ac.abort(new Error('SIGUSR1'));
  await until(() => s.settled);
  failedWith(s, 'EINTR');
  assert.equal(reg.list()[0]!.sleeping, 0, 'the interrupted caller is no longer a sleeper');

  // A request arriving now waits in the queue for the retried start.
  const w = track(dev.write(Buffer.alloc(512, 3), 0, 0));
  await turns();
  assert.equal(reg.list()[0]!.queued, 1);
  const r = req(await reg.start({ version: V, unit, length: 4096 }));
  assert.equal(r.cmd, 'write');
  assert.equal(r.seq, 1);
  await reg.done({ version: V, unit, seq: r.seq });
  await w.promise;
  await reg.close();
});

test('Q1 an already-aborted signal rejects EINTR without taking the queued request', async () => {
  const { reg, unit, dev } = await setup();
  const w = track(dev.write(Buffer.alloc(512, 3), 512, 0));
  const ac = new AbortController();
  ac.abort();
  await rejectsWith(reg.start({ version: V, unit, length: 4096, signal: ac.signal }), 'EINTR');
  assert.equal(reg.list()[0]!.queued, 1, 'the request is still queued');
  assert.equal(reg.list()[0]!.inFlight, 0);
  const r = req(await reg.start({ version: V, unit, length: 4096 }));
  assert.equal(r.offset, 512);
  await reg.done({ version: V, unit, seq: r.seq });
  await w.promise;
  await reg.close();
});

test('Q1 an abort racing with a wake-up never loses the request', async () => {
  const { reg, unit, dev } = await setup();
  const ac = new AbortController();
  const s = track(reg.start({ version: V, unit, length: 4096, signal: ac.signal }));
  await until(() => reg.list()[0]!.sleeping === 1);
  // The request wakes the sleeper, and the signal fires before its continuation runs.
  const w = track(dev.write(Buffer.alloc(512, 9), 0, 0));
  ac.abort();
  await until(() => s.settled);
  // The woken call re-checks its signal before taking anything, so it fails EINTR and
  // the request stays at the head of the queue for the next start.
  failedWith(s, 'EINTR');
  assert.deepEqual([reg.list()[0]!.queued, reg.list()[0]!.inFlight], [1, 0]);
  const r = req(await reg.start({ version: V, unit, length: 4096 }));
  assert.equal(r.offset, 0);
  await reg.done({ version: V, unit, seq: r.seq });
  await w.promise;
  await reg.close();
});

// ---------------------------------------------------------------- Q2: sequence numbers

test('Q2 sequence numbers start at 1 and increase by one per admitted request', async () => {
  const { reg, unit, dev } = await setup({ maxcount: 3 });
  const reqs = [0, 1, 2].map((i) => track(dev.read(Buffer.alloc(512), i * 512, 0)));
  // A refused request (queue full) does not use up a sequence number.
  await rejectsWith(dev.read(Buffer.alloc(512), 0, 0), 'ENOMEM');
  const seqs: number[] = [];
  for (let i = 0; i < 3; i++) seqs.push(req(await reg.start({ version: V, unit, length: 0 })).seq);
  assert.deepEqual(seqs, [1, 2, 3]);
  for (const seq of seqs) await reg.done({ version: V, unit, seq, data: Buffer.alloc(512) });
  for (const t of reqs) await t.promise;
  const next = track(dev.flush(0));
  assert.equal(req(await reg.start({ version: V, unit, length: 0 })).seq, 4);
  await reg.done({ version: V, unit, seq: 4 });
  await next.promise;
  await reg.close();
});

test('Q2 seq 0 is never handed out, and a requeued request keeps its seq', async () => {
  const { reg, unit, dev } = await setup();
  const w = track(dev.write(Buffer.alloc(512), 0, 0));
  const r1 = req(await reg.start({ version: V, unit, length: 512 }));
  assert.notEqual(r1.seq, 0);
  await reg.done({ version: V, unit, seq: r1.seq, error: 'EAGAIN' });
  const r2 = req(await reg.start({ version: V, unit, length: 512 }));
  assert.equal(r2.seq, r1.seq);
  await reg.done({ version: V, unit, seq: r2.seq });
  await w.promise;
  await reg.close();
});

// ---------------------------------------------------------------- Q3: done

test('Q3 done of an unknown seq is a no-op success', async () => {
  const { reg, unit, dev } = await setup();
  const w = track(dev.write(Buffer.alloc(512), 0, 0));
  await reg.done({ version: V, unit, seq: 42, error: 'EIO' });
  await reg.done({ version: V, unit, seq: 1, error: 'EIO' }); // queued, not in flight: unknown to done
  await turns();
  assert.equal(w.settled, false);
  assert.deepEqual([reg.list()[0]!.queued, reg.list()[0]!.inFlight], [1, 0]);
  const r = req(await reg.start({ version: V, unit, length: 512 }));
  await reg.done({ version: V, unit, seq: r.seq });
  await w.promise;
  // A second done for the same seq is now unknown too.
  await reg.done({ version: V, unit, seq: r.seq, error: 'EIO' });
  await reg.close();
});

test('Q3 done with EAGAIN requeues the request at the head, ahead of older pending ones', async () => {
  const { reg, unit, dev } = await setup();
  const a = track(dev.read(Buffer.alloc(512), 0, 0));
  const ra = req(await reg.start({ version: V, unit, length: 0 }));
  const b = track(dev.read(Buffer.alloc(512), 512, 0));
  await turns();
  await reg.done({ version: V, unit, seq: ra.seq, error: 'EAGAIN' });
  await turns();
  assert.equal(a.settled, false, 'EAGAIN does not fail the request');
  const again = req(await reg.start({ version: V, unit, length: 0 }));
  assert.equal(again.seq, ra.seq, 'the retried request comes first');
  const rb = req(await reg.start({ version: V, unit, length: 0 }));
  assert.equal(rb.offset, 512);
  await reg.done({ version: V, unit, seq: again.seq, data: Buffer.alloc(512, 1) });
  await reg.done({ version: V, unit, seq: rb.seq, data: Buffer.alloc(512, 2) });
  await a.promise;
  await b.promise;
  await reg.close();
});

test('Q3 done with any other error fails the request with that error; success completes it', async () => {
  const { reg, unit, dev } = await setup();
  const buf = Buffer.alloc(1024);
  const rd = track(dev.read(buf, 2048, 0));
  const wr = track(dev.write(Buffer.alloc(512, 5), 0, 0));
  const fl = track(dev.flush(0));
  const r1 = req(await reg.start({ version: V, unit, length: 4096 }));
  const r2 = req(await reg.start({ version: V, unit, length: 4096 }));
  const r3 = req(await reg.start({ version: V, unit, length: 4096 }));
  assert.deepEqual([r1.cmd, r2.cmd, r3.cmd], ['read', 'write', 'flush']);
  const data = Buffer.alloc(1024);
  for (let i = 0; i < data.length; i++) data[i] = i & 0xff;
  await reg.done({ version: V, unit, seq: r1.seq, error: 0, data });
  await reg.done({ version: V, unit, seq: r2.seq, error: 'ENOSPC' });
  await reg.done({ version: V, unit, seq: r3.seq, error: 'EIO' });
  await rd.promise;
  assert.deepEqual(buf, data, 'read data is copied into the caller\'s buffer');
  await until(() => wr.settled && fl.settled);
  failedWith(wr, 'ENOSPC');
  failedWith(fl, 'EIO');
  assert.equal((wr.error as BlockError).offset, 0);
  await reg.close();
});

test('Q3 a read completed with too little data fails EIO for the requester and EFAULT for done', async () => {
  const { reg, unit, dev } = await setup();
  const rd = track(dev.read(Buffer.alloc(1024), 0, 0));
  const r = req(await reg.start({ version: V, unit, length: 0 }));
  await rejectsWith(reg.done({ version: V, unit, seq: r.seq, data: Buffer.alloc(100) }), 'EFAULT');
  await until(() => rd.settled);
  failedWith(rd, 'EIO');
  assert.equal(reg.list()[0]!.inFlight, 0);
  await rejectsWith(reg.done({ version: V, unit, seq: 1, error: 'EBOGUS' as never }), 'EINVAL');
  await reg.close();
});

// ---------------------------------------------------------------- Q4: cancel

test('Q4 cancel(0) moves every in-flight request back to the head in original order, failing none', async () => {
  const { reg, unit, dev } = await setup();
  const reqs = [0, 1, 2, 3].map((i) => track(dev.read(Buffer.alloc(512), i * 512, 0)));
  const taken = [];
  for (let i = 0; i < 3; i++) taken.push(req(await reg.start({ version: V, unit, length: 0 })));
  assert.deepEqual(
    taken.map((r) => r.seq),
    [1, 2, 3],
  );
  await reg.cancel({ version: V, unit, seq: 0 });
  await turns();
  assert.ok(reqs.every((t) => !t.settled), 'nothing failed');
  assert.deepEqual([reg.list()[0]!.queued, reg.list()[0]!.inFlight], [4, 0]);
  const order = [];
  for (let i = 0; i < 4; i++) order.push(req(await reg.start({ version: V, unit, length: 0 })).seq);
  assert.deepEqual(order, [1, 2, 3, 4]);
  // A late answer from the old handler for a moved request is not special: it is the
  // same seq, now in flight again, so it completes it (the data is the same).
  for (const seq of order) await reg.done({ version: V, unit, seq, data: Buffer.alloc(512, seq) });
  for (const t of reqs) await t.promise;
  await reg.close();
});

test('Q4 cancel(n) moves only request n; other in-flight requests stay in flight', async () => {
  const { reg, unit, dev } = await setup();
  const reqs = [0, 1, 2].map((i) => track(dev.read(Buffer.alloc(512), i * 512, 0)));
  for (let i = 0; i < 3; i++) await reg.start({ version: V, unit, length: 0 });
  await reg.cancel({ version: V, unit, seq: 2 });
  assert.deepEqual([reg.list()[0]!.queued, reg.list()[0]!.inFlight], [1, 2]);
  // Answering the cancelled request before it is re-taken is an unknown seq: ignored.
  await reg.done({ version: V, unit, seq: 2, error: 'EIO' });
  await turns();
  assert.equal(reqs[1]!.settled, false);
  const again = req(await reg.start({ version: V, unit, length: 0 }));
  assert.equal(again.seq, 2);
  // Cancelling a seq that is not in flight is a no-op.
  await reg.cancel({ version: V, unit, seq: 77 });
  assert.equal(reg.list()[0]!.inFlight, 3);
  for (const seq of [1, 2, 3]) await reg.done({ version: V, unit, seq, data: Buffer.alloc(512) });
  for (const t of reqs) await t.promise;
  await reg.close();
});

test('Q4 cancel(0) puts in-flight requests ahead of requests still pending and wakes a sleeper', async () => {
  const { reg, unit, dev } = await setup();
  const a = track(dev.read(Buffer.alloc(512), 0, 0));
  const ra = req(await reg.start({ version: V, unit, length: 0 }));
  const s = track(reg.start({ version: V, unit, length: 0 }));
  await until(() => reg.list()[0]!.sleeping === 1);
  await reg.cancel({ version: V, unit, seq: 0 });
  const again = req(await s.promise);
  assert.equal(again.seq, ra.seq);
  await reg.done({ version: V, unit, seq: again.seq, data: Buffer.alloc(512) });
  await a.promise;
  await reg.close();
});

// ---------------------------------------------------------------- Q5: buffer too small

test('Q5 a WRITE larger than the handler buffer resolves ENOMEM with the needed length and stays first', async () => {
  const { reg, unit, dev } = await setup();
  const big = Buffer.alloc(8192, 0xab);
  const w = track(dev.write(big, 0, 0));
  const r = track(dev.read(Buffer.alloc(512), 0, 0));
  await turns();
  const res = await reg.start({ version: V, unit, length: 4096 });
  assert.deepEqual(res, { error: 'ENOMEM', length: 8192 });
  const again = await reg.start({ version: V, unit, length: 4096 });
  assert.deepEqual(again, { error: 'ENOMEM', length: 8192 }, 'the small read behind it is not served first');
  assert.deepEqual([reg.list()[0]!.queued, reg.list()[0]!.inFlight], [2, 0]);
  const got = req(await reg.start({ version: V, unit, length: 8192 }));
  assert.equal(got.cmd, 'write');
  assert.equal(got.length, 8192);
  assert.deepEqual(got.data, big);
  await reg.done({ version: V, unit, seq: got.seq });
  const rd = req(await reg.start({ version: V, unit, length: 8192 }));
  await reg.done({ version: V, unit, seq: rd.seq, data: Buffer.alloc(512) });
  await w.promise;
  await r.promise;
  await reg.close();
});

test('Q5 READ, DELETE and FLUSH carry no payload and reach a handler with a zero-length buffer', async () => {
  const { reg, unit, dev } = await setup();
  const ops = [
    track(dev.read(Buffer.alloc(65536), 0, 0)),
    track(dev.trim(0, 65536, 0)),
    track(dev.flush(0)),
  ];
  const got = [];
  for (let i = 0; i < 3; i++) got.push(req(await reg.start({ version: V, unit, length: 0 })));
  assert.deepEqual(
    got.map((r) => [r.cmd, r.length, r.data]),
    [
      ['read', 65536, undefined],
      ['delete', 65536, undefined],
      ['flush', 0, undefined],
    ],
  );
  await reg.done({ version: V, unit, seq: got[0]!.seq, data: Buffer.alloc(65536) });
  await reg.done({ version: V, unit, seq: got[1]!.seq });
  await reg.done({ version: V, unit, seq: got[2]!.seq });
  for (const t of ops) await t.promise;
  await reg.close();
});

// ---------------------------------------------------------------- Q6: queue limit

test('Q6 exactly maxcount requests are admitted (queued + in flight); maxcount + 1 fails ENOMEM', async () => {
  const { reg, unit, dev } = await setup({ maxcount: 4 });
  const admitted = [0, 1, 2, 3].map((i) => track(dev.read(Buffer.alloc(512), i * 512, 0)));
  // Take two so the limit is seen to count in-flight requests too.
  const r1 = req(await reg.start({ version: V, unit, length: 0 }));
  req(await reg.start({ version: V, unit, length: 0 }));
  assert.deepEqual([reg.list()[0]!.queued, reg.list()[0]!.inFlight], [2, 2]);
  await rejectsWith(dev.read(Buffer.alloc(512), 0, 0), 'ENOMEM');
  await rejectsWith(dev.flush(0), 'ENOMEM');
  await turns();
  assert.ok(admitted.every((t) => !t.settled), 'the refusal touched no admitted request');
  // Completing one frees one slot, exactly.
  await reg.done({ version: V, unit, seq: r1.seq, data: Buffer.alloc(512) });
  const fifth = track(dev.flush(0));
  await rejectsWith(dev.flush(0), 'ENOMEM');
  await reg.close();
  await until(() => fifth.settled && admitted.every((t) => t.settled));
  failedWith(fifth, 'ENXIO');
});

test('Q6 the queue-full ENOMEM goes to the requester; the handler never sees it', async () => {
  const { reg, unit, dev } = await setup({ maxcount: 1 });
  const first = track(dev.write(Buffer.alloc(512), 0, 0));
  await rejectsWith(dev.write(Buffer.alloc(512), 512, 0), 'ENOMEM');
  const r = await reg.start({ version: V, unit, length: 512 });
  assert.equal(r.error, 0, 'the handler gets the admitted request, not an ENOMEM');
  await reg.done({ version: V, unit, seq: req(r).seq });
  await first.promise;
  await reg.close();
});

test('Q6 maxcount 0 is unlimited and larger values are capped at 4096', async () => {
  const unlimited = await setup({ maxcount: 0 });
  const many = Array.from({ length: GATE.MAX_QUEUE_SIZE + 10 }, () => track(unlimited.dev.flush(0)));
  await turns();
  assert.equal(unlimited.reg.list()[0]!.queued, GATE.MAX_QUEUE_SIZE + 10);
  assert.ok(many.every((t) => !t.settled));
  await unlimited.reg.close();

  const capped = await setup({ maxcount: 100_000 });
  assert.equal(capped.reg.list()[0]!.maxcount, GATE.MAX_QUEUE_SIZE);
  const admitted = Array.from({ length: GATE.MAX_QUEUE_SIZE }, () => track(capped.dev.flush(0)));
  await rejectsWith(capped.dev.flush(0), 'ENOMEM');
  assert.ok(admitted.every((t) => !t.settled));
  await capped.reg.close();
  await rejectsWith(capped.reg.create({ version: V, mediasize: 512, sectorsize: 512, maxcount: -1 }), 'EINVAL');
});

// ---------------------------------------------------------------- Q7: timeout

test('Q7 with timeout t a queued request fails EIO once it is t seconds old, not before', async () => {
  const { reg, dev, clock } = await setup({ timeout: 2 });
  const w = track(dev.write(Buffer.alloc(512), 0, 0));
  clock.advance(1999);
  await turns();
  assert.equal(w.settled, false);
  clock.advance(1);
  await until(() => w.settled);
  failedWith(w, 'EIO');
  assert.equal(reg.list()[0]!.queued, 0);
  await reg.close();
});

test('Q7 an in-flight request times out too; the late done is an unknown seq', async () => {
  const { reg, unit, dev, clock } = await setup({ timeout: 1 });
  clock.advance(100);
  const rd = track(dev.read(Buffer.alloc(512), 0, 0));
  const r = req(await reg.start({ version: V, unit, length: 0 }));
  clock.advance(900); // guard runs every 250 ms; at 1000 ms the age is 900: too young
  await turns();
  assert.equal(rd.settled, false);
  clock.advance(250); // guard at 1250 ms: age 1150
  await until(() => rd.settled);
  failedWith(rd, 'EIO');
  assert.equal(reg.list()[0]!.inFlight, 0);
  await reg.done({ version: V, unit, seq: r.seq, data: Buffer.alloc(512) });
  await reg.close();
});

test('Q7 a request requeued by EAGAIN keeps its age; young requests survive the guard', async () => {
  const { reg, unit, dev, clock } = await setup({ timeout: 4 });
  const old = track(dev.read(Buffer.alloc(512), 0, 0));
  const r = req(await reg.start({ version: V, unit, length: 0 }));
  clock.advance(3000);
  await reg.done({ version: V, unit, seq: r.seq, error: 'EAGAIN' });
  const young = track(dev.read(Buffer.alloc(512), 512, 0));
  clock.advance(1000);
  await until(() => old.settled);
  failedWith(old, 'EIO');
  assert.equal(young.settled, false);
  assert.equal(reg.list()[0]!.queued, 1);
  await reg.close();
});

test('Q7 timeout 0 disables the guard; destroy releases it', async () => {
  const { reg, unit, dev, clock } = await setup({ timeout: 0 });
  assert.equal(clock.activeTimers, 0);
  const w = track(dev.flush(0));
  clock.advance(24 * 3600 * 1000);
  await turns();
  assert.equal(w.settled, false);
  const u2 = await reg.create({ version: V, mediasize: 512, sectorsize: 512, timeout: 5 });
  assert.equal(clock.activeTimers, 1);
  await reg.destroy({ version: V, unit: u2, force: false });
  assert.equal(clock.activeTimers, 0);
  await reg.destroy({ version: V, unit, force: true });
  await until(() => w.settled);
  failedWith(w, 'ENXIO');
  await rejectsWith(
    reg.create({ version: V, mediasize: 512, sectorsize: 512, timeout: GATE.MAX_TIMEOUT + 1 }),
    'EINVAL',
  );
});

// ---------------------------------------------------------------- Q8: destroy

test('Q8 destroy without force while the device is open fails EBUSY and changes nothing', async () => {
  const { reg, unit, dev } = await setup();
  const w = track(dev.write(Buffer.alloc(512), 0, 0));
  await rejectsWith(reg.destroy({ version: V, unit, force: false }), 'EBUSY');
  assert.equal(reg.list()[0]!.queued, 1);
  const r = req(await reg.start({ version: V, unit, length: 512 }));
  await reg.done({ version: V, unit, seq: r.seq });
  await w.promise;
  // A second opener keeps it busy until both have closed.
  const dev2 = reg.open(`ggate${unit}`);
  await dev.close();
  await dev.close(); // closing twice releases once
  await rejectsWith(reg.destroy({ version: V, unit, force: false }), 'EBUSY');
  await dev2.close();
  await reg.destroy({ version: V, unit, force: false });
  assert.deepEqual(reg.list(), []);
});

test('Q8 forced destroy fails queued and in-flight requests ENXIO and ends blocked starts with ECANCELED', async () => {
  const { reg, unit, dev } = await setup();
  const inflight = track(dev.read(Buffer.alloc(512), 0, 0));
  const r = req(await reg.start({ version: V, unit, length: 0 }));
  const queued = [track(dev.write(Buffer.alloc(8192), 0, 0)), track(dev.flush(0))];
  // A handler blocked because its buffer is too small is not asleep; one that is asleep:
  const sleeperGate = await reg.create({ version: V, mediasize: 512, sectorsize: 512 });
  const sleeper = track(reg.start({ version: V, unit: sleeperGate, length: 0 }));
  const sleeper2 = track(reg.start({ version: V, unit: sleeperGate, length: 0 }));
  await until(() => reg.list()[1]!.sleeping === 2);

  await reg.destroy({ version: V, unit, force: true });
  await reg.destroy({ version: V, unit: sleeperGate, force: true });
  await until(() => inflight.settled && queued.every((t) => t.settled) && sleeper.settled && sleeper2.settled);
  failedWith(inflight, 'ENXIO');
  for (const t of queued) failedWith(t, 'ENXIO');
  assert.deepEqual(sleeper.value, { error: 'ECANCELED' });
  assert.deepEqual(sleeper2.value, { error: 'ECANCELED' });

  // New requests on the still-open device fail ENXIO; the late done finds no unit.
  await rejectsWith(dev.read(Buffer.alloc(512), 0, 0), 'ENXIO');
  await rejectsWith(dev.flush(0), 'ENXIO');
  await rejectsWith(reg.done({ version: V, unit, seq: r.seq, data: Buffer.alloc(512) }), 'ENOENT');
  await rejectsWith(reg.start({ version: V, unit, length: 0 }), 'ENXIO');
  // The unit is free at once.
  assert.equal(await reg.create({ version: V, unit, mediasize: 512, sectorsize: 512 }), unit);
  await dev.close();
  await reg.close();
});

test('Q8 destroy by name (unit NAME_GIVEN) and opening a destroyed gate', async () => {
  const { reg, dev } = await setup();
  const u = await reg.create({ version: V, unit: GATE.NAME_GIVEN, name: 'disk-a', mediasize: 512, sectorsize: 512 });
  const d = reg.open('disk-a');
  assert.equal(d.unit, u);
  await rejectsWith(reg.destroy({ version: V, unit: GATE.NAME_GIVEN, name: 'disk-a', force: false }), 'EBUSY');
  await reg.destroy({ version: V, unit: GATE.NAME_GIVEN, name: 'disk-a', force: true });
  assert.throws(() => reg.open('disk-a'), (e: unknown) => e instanceof BlockError && e.code === 'ENXIO');
  await rejectsWith(reg.destroy({ version: V, unit: GATE.NAME_GIVEN, name: 'disk-a', force: true }), 'ENXIO');
  await dev.close();
  await reg.close();
});

// ---------------------------------------------------------------- Q9: access modes

test('Q9 a read-only gate fails WRITE, DELETE and FLUSH with EPERM before any handler sees them', async () => {
  const { reg, unit, dev } = await setup({ flags: GATE_FLAG.READONLY });
  const handler = track(reg.start({ version: V, unit, length: 1 << 20 }));
  await rejectsWith(dev.write(Buffer.alloc(512), 0, 0), 'EPERM');
  await rejectsWith(dev.trim(0, 512, 0), 'EPERM');
  await rejectsWith(dev.zero(0, 512, 0), 'EPERM');
  await rejectsWith(dev.flush(0), 'EPERM');
  await turns();
  assert.equal(handler.settled, false, 'the handler saw nothing');
  assert.equal(reg.list()[0]!.queued, 0);
  assert.equal(dev.capabilities.write, false);
  assert.equal(dev.capabilities.flush, false);
  // Reads still work.
  const buf = Buffer.alloc(512);
  const rd = track(dev.read(buf, 0, 0));
  const r = req(await handler.promise);
  assert.equal(r.cmd, 'read');
  await reg.done({ version: V, unit, seq: r.seq, data: Buffer.alloc(512, 0x5a) });
  await rd.promise;
  assert.equal(buf[0], 0x5a);
  await reg.close();
});

test('Q9 a write-only gate fails READ with EPERM before any handler sees it; writes pass', async () => {
  const { reg, unit, dev } = await setup({ flags: GATE_FLAG.WRITEONLY });
  const handler = track(reg.start({ version: V, unit, length: 1 << 20 }));
  await rejectsWith(dev.read(Buffer.alloc(512), 0, 0), 'EPERM');
  await turns();
  assert.equal(handler.settled, false);
  const w = track(dev.write(Buffer.alloc(512, 1), 0, 0));
  const r = req(await handler.promise);
  assert.equal(r.cmd, 'write');
  await reg.done({ version: V, unit, seq: r.seq });
  await w.promise;
  await reg.close();
});

test('Q9 an unsupported command fails EOPNOTSUPP before any handler sees it', async () => {
  const clock = new ManualClock();
  const g = new GateUnit(
    { unit: 0, name: 'ggate0', mediasize: 4096, sectorsize: 512, flags: 0, maxcount: 0, timeout: 0, info: '' },
    clock,
  );
  await rejectsWith(g.submit('getattr' as never, 0, 0), 'EOPNOTSUPP');
  assert.equal(g.queued, 0);
  g.destroy();
});

// ---------------------------------------------------------------- Q10: units and names

test('Q10 explicit unit in use fails EEXIST; unit >= maxunits fails EINVAL', async () => {
  const reg = new GateRegistry({ clock: new ManualClock(), maxUnits: 4 });
  const base = { version: V, mediasize: 4096, sectorsize: 512 };
  assert.equal(await reg.create({ ...base, unit: 3 }), 3);
  await rejectsWith(reg.create({ ...base, unit: 3 }), 'EEXIST');
  await rejectsWith(reg.create({ ...base, unit: 4 }), 'EINVAL');
  await rejectsWith(reg.create({ ...base, unit: -3 }), 'EINVAL');
  assert.equal(new GateRegistry().maxUnits, GATE.DEFAULT_MAX_UNITS);
  await reg.close();
});

test('Q10 auto allocation picks the lowest free unit and fails ENFILE when none is free', async () => {
  const reg = new GateRegistry({ clock: new ManualClock(), maxUnits: 3 });
  const base = { version: V, mediasize: 4096, sectorsize: 512 };
  assert.equal(await reg.create({ ...base, unit: 1 }), 1);
  assert.equal(await reg.create(base), 0);
  assert.equal(await reg.create({ ...base, unit: GATE.UNIT_AUTO }), 2);
  await rejectsWith(reg.create(base), 'ENFILE');
  await reg.destroy({ version: V, unit: 1, force: false });
  assert.equal(await reg.create(base), 1);
  await reg.close();
});

test('Q10 gates are named ggate<unit> unless a name is given; names are unique', async () => {
  const reg = new GateRegistry({ clock: new ManualClock() });
  const base = { version: V, mediasize: 4096, sectorsize: 512 };
  await reg.create({ ...base, unit: 5 });
  const u = await reg.create({ ...base, unit: GATE.NAME_GIVEN, name: 'mydisk', info: 'host:3080 /img' });
  assert.equal(u, 0, 'a named gate still gets a unit number');
  assert.deepEqual(
    reg.list().map((g) => [g.unit, g.name, g.info]),
    [
      [0, 'mydisk', 'host:3080 /img'],
      [5, 'ggate5', ''],
    ],
  );
  await rejectsWith(reg.create({ ...base, unit: GATE.NAME_GIVEN, name: 'mydisk' }), 'EEXIST');
  await rejectsWith(reg.create({ ...base, unit: GATE.NAME_GIVEN, name: 'ggate5' }), 'EEXIST');
  await rejectsWith(reg.create({ ...base, unit: GATE.NAME_GIVEN }), 'EINVAL');
  await rejectsWith(reg.create({ ...base, unit: GATE.NAME_GIVEN, name: '' }), 'EINVAL');
  await rejectsWith(reg.create({ ...base, unit: GATE.NAME_GIVEN, name: 'x'.repeat(GATE.NAME_MAX) }), 'EINVAL');
  await rejectsWith(reg.create({ ...base, name: 'ignored?' }), 'EINVAL');
  // A gate named like an auto name blocks that auto unit with EEXIST (FreeBSD's name check).
  await reg.create({ ...base, unit: GATE.NAME_GIVEN, name: 'ggate2' });
  await rejectsWith(reg.create({ ...base, unit: 2 }), 'EEXIST');
  await reg.close();
});

test('Q10 create validates media geometry and flags like FreeBSD', async () => {
  const reg = new GateRegistry({ clock: new ManualClock() });
  const bad = [
    { mediasize: 0, sectorsize: 512 },
    { mediasize: -512, sectorsize: 512 },
    { mediasize: 1000, sectorsize: 512 },
    { mediasize: 4096, sectorsize: 0 },
    { mediasize: 4096, sectorsize: 384 },
    { mediasize: 1 << 20, sectorsize: 1 << 17 },
    { mediasize: 2 ** 53, sectorsize: 512 },
    { mediasize: 4096, sectorsize: 512, flags: GATE_FLAG.READONLY | GATE_FLAG.WRITEONLY },
    { mediasize: 4096, sectorsize: 512, info: 'i'.repeat(GATE.INFO_SIZE) },
    { mediasize: 4096, sectorsize: 512, timeout: 1.5 },
  ];
  for (const args of bad) await rejectsWith(reg.create({ version: V, ...args }), 'EINVAL');
  assert.deepEqual(reg.list(), []);
  // Unknown flag bits are masked off, as G_GATE_USERFLAGS does.
  const u = await reg.create({ version: V, mediasize: 4096, sectorsize: 4096, flags: 0x1000 | GATE_FLAG.READONLY });
  assert.equal(reg.list()[0]!.flags, GATE_FLAG.READONLY);
  await reg.destroy({ version: V, unit: u, force: false });
  assert.throws(() => new GateRegistry({ maxUnits: 0 }), (e: unknown) => e instanceof BlockError && e.code === 'EINVAL');
});

// ---------------------------------------------------------------- MODIFY

test('modify resizes the gate (the device size follows) and replaces info; bad sizes fail EINVAL', async () => {
  const { reg, unit, dev } = await setup();
  assert.equal(dev.size, 1 << 20);
  await reg.modify({ version: V, unit, mediasize: 2 << 20, info: 'resized' });
  assert.equal(dev.size, 2 << 20);
  assert.equal(reg.list()[0]!.info, 'resized');
  await rejectsWith(reg.modify({ version: V, unit, mediasize: 1000 }), 'EINVAL');
  await rejectsWith(reg.modify({ version: V, unit, mediasize: 0 }), 'EINVAL');
  await rejectsWith(reg.modify({ version: V, unit, info: 'x'.repeat(GATE.INFO_SIZE) }), 'EINVAL');
  assert.equal(dev.size, 2 << 20);
  // The protocol edge validates against the new size: past the new end is refused there
  // (the device itself does not re-check); inside it is admitted.
  assert.throws(() => validateRequest(dev, 'write', 2 << 20, 512), (e: unknown) => e instanceof BlockError && e.code === 'ENOSPC');
  const w = track(dev.write(Buffer.alloc(512), (2 << 20) - 512, 0));
  const r = req(await reg.start({ version: V, unit, length: 512 }));
  await reg.done({ version: V, unit, seq: r.seq });
  await w.promise;
  await reg.close();
});
