import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { REQ } from '../../src/device/types.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import { ManualClock } from '../../src/gate/clock.js';
import { BlockError } from '../../src/errors/index.js';
import { FILTERS } from '../../src/filters/index.js';
import { ErrorFilter } from '../../src/filters/error.js';
import {
  DELAY_OPS,
  DelayFilter,
  delayFilter,
  filterClockOf,
  parseDuration,
  type DelayOp,
  type FilterClock,
} from '../../src/filters/delay.js';
import { runContract } from '../backends/contract.js';
import { settle, track } from './recording.js';

const SIZE = 2 ** 20;

/** A virtual clock whose sleep returns at once, having moved time by exactly the time slept. */
function instantClock(): FilterClock & { t: number } {
  const c = {
    t: 0,
    now: () => c.t,
    sleep: async (ms: number) => {
      c.t += ms;
    },
  };
  return c;
}

/** Runs one request of `op`. */
function run(dev: DelayFilter, op: DelayOp, flags = 0): Promise<unknown> {
  switch (op) {
    case 'read':
      return dev.read(Buffer.alloc(512), 0, flags);
    case 'write':
      return dev.write(Buffer.alloc(512, 1), 0, flags);
    case 'zero':
      return dev.zero(0, 512, flags);
    case 'trim':
      return dev.trim(0, 512, flags);
    case 'flush':
      return dev.flush(flags);
    case 'extents':
      return dev.extents(0, 512, flags);
    case 'cache':
      return dev.cache(0, 512, flags);
  }
}

/** The delay (virtual ms) each operation gets under a filter built from `settings`. */
async function delaysOf(settings: Record<string, unknown>): Promise<Record<DelayOp, number>> {
  const built = delayFilter(new MemoryDevice({ size: SIZE }), { type: 'delay', ...settings });
  // The factory's filter runs on the real clock: measure one with its delays on a virtual one.
  const clock = instantClock();
  const delays = Object.fromEntries(Object.entries(built.delays).filter(([, d]) => d !== undefined));
  const probe = new DelayFilter(built.next, { delays, clock });
  const out = {} as Record<DelayOp, number>;
  for (const op of DELAY_OPS) {
    const t0 = clock.t;
    await run(probe, op);
    out[op] = clock.t - t0;
  }
  return out;
}

runContract(
  'delay filter (every operation, virtual clock) over memory',
  async () => {
    const delays = Object.fromEntries(DELAY_OPS.map((op) => [op, 1])) as Record<DelayOp, number>;
    const dev = new DelayFilter(new MemoryDevice({ size: SIZE }), { delays, jitter: 2, seed: 1, clock: instantClock() });
    return { dev, cleanup: async () => undefined };
  },
  { initial: (_o, n) => Buffer.alloc(n) },
);

describe('delay filter', () => {
  test('is registered as "delay"', () => {
    assert.equal(FILTERS.get('delay'), delayFilter);
  });

  test('durations: milliseconds as numbers, strings with a unit (ms, s, us, ns)', () => {
    assert.equal(parseDuration(10), 10);
    assert.equal(parseDuration(0.5), 0.5);
    assert.equal(parseDuration('10ms'), 10);
    assert.equal(parseDuration('1s'), 1000);
    assert.equal(parseDuration('1.5s'), 1500);
    assert.equal(parseDuration(' 250us '), 0.25);
    assert.equal(parseDuration('250μs'), 0.25);
    assert.equal(parseDuration('1000ns'), 0.001);
    for (const bad of ['10', '1.5', 'fast', '-1ms', '1 min', '']) {
      assert.throws(() => parseDuration(bad), { code: 'EINVAL' }, bad);
    }
    assert.throws(() => parseDuration(-1), /negative/);
    assert.throws(() => parseDuration(Infinity), { code: 'EINVAL' });
    assert.throws(() => parseDuration('30d'), { code: 'EINVAL' });
    assert.throws(() => parseDuration(2 ** 31), /too long/);
  });

  test('settings: the bad key is named; rdelay/delay-read are one setting', () => {
    const mem = new MemoryDevice({ size: SIZE });
    const bad = (settings: Record<string, unknown>, re: RegExp) =>
      assert.throws(() => delayFilter(mem, { type: 'delay', ...settings }), (e: unknown) => e instanceof BlockError && e.code === 'EINVAL' && re.test(e.message));
    bad({ 'delay-read': '10' }, /^delay: delay-read: invalid duration '10'/);
    bad({ wdelay: true }, /^delay: wdelay: expected a duration/);
    bad({ jitter: -5 }, /^delay: jitter: .*negative/);
    bad({ 'delay-fast-zero': 'no' }, /^delay: delay-fast-zero: expected true or false/);
    bad({ seed: 1.5 }, /^delay: seed: expected a whole number/);
    bad({ 'delay-open': '1s' }, /^delay: delay-open: unknown setting \(known: type, rdelay, wdelay, delay-read/);
    bad({ rdelay: 1, 'delay-read': 2 }, /^delay: delay-read: the same setting as rdelay/);
    bad({ wdelay: 1, 'delay-write': 2 }, /^delay: delay-write: the same setting as wdelay/);
  });

  test('rdelay is delay-read; wdelay delays write, zero and trim (as nbdkit); delay-X wins for X', async () => {
    const none = { read: 0, write: 0, zero: 0, trim: 0, flush: 0, extents: 0, cache: 0 };
    assert.deepEqual(await delaysOf({}), none);
    assert.deepEqual(await delaysOf({ rdelay: '200ms' }), { ...none, read: 200 });
    assert.deepEqual(await delaysOf({ 'delay-read': 200 }), { ...none, read: 200 });
    assert.deepEqual(await delaysOf({ wdelay: '1s' }), { ...none, write: 1000, zero: 1000, trim: 1000 });
    assert.deepEqual(await delaysOf({ wdelay: '1s', 'delay-zero': '5ms' }), { ...none, write: 1000, zero: 5, trim: 1000 });
    assert.deepEqual(
      await delaysOf({ 'delay-write': 1, 'delay-zero': 2, 'delay-trim': 3, 'delay-flush': 4, 'delay-extents': 5, 'delay-cache': 6 }),
      { ...none, write: 1, zero: 2, trim: 3, flush: 4, extents: 5, cache: 6 },
    );
    const dev = delayFilter(new MemoryDevice({ size: SIZE }), { type: 'delay', rdelay: '1.5s', jitter: '20ms' });
    assert.equal(dev.description, 'memory 1MiB (delay: read 1.5s + jitter 20ms)');
  });

  test('a delayed request completes when the clock has moved by its delay, not before (manual clock)', async () => {
    const manual = new ManualClock();
    const mem = new MemoryDevice({ size: SIZE });
    await mem.write(Buffer.alloc(512, 7), 0, 0);
    const dev = new DelayFilter(mem, { delays: { read: 200 }, clock: filterClockOf(manual) });
    const buf = Buffer.alloc(512);
    const r = track(dev.read(buf, 0, 0));
    await settle();
    assert.equal(r.settled(), false);
    assert.equal(buf[0], 0, 'the read has not reached the device yet');
    const w = track(dev.write(Buffer.alloc(512, 9), 512, 0));
    await settle();
    assert.equal(w.settled(), true, 'writes have no delay here');
    manual.advance(199);
    await settle();
    assert.equal(r.settled(), false);
    manual.advance(1);
    await settle();
    assert.equal(r.settled(), true);
    await r.promise;
    assert.equal(buf[0], 7);
    assert.equal(manual.activeTimers, 0);
  });

  test('jitter: delays in [base, base + jitter), the same sequence for the same seed', async () => {
    const sequence = async (seed: number): Promise<number[]> => {
      const clock = instantClock();
      const dev = new DelayFilter(new MemoryDevice({ size: SIZE }), { delays: { read: 10 }, jitter: 5, seed, clock });
      const out: number[] = [];
      for (let i = 0; i < 50; i++) {
        const t0 = clock.t;
        await dev.read(Buffer.alloc(1), 0, 0);
        out.push(clock.t - t0);
      }
      // Operations without a delay get no jitter.
      const t0 = clock.t;
      await dev.flush(0);
      assert.equal(clock.t, t0);
      return out;
    };
    const a = await sequence(42);
    assert.deepEqual(await sequence(42), a);
    assert.notDeepEqual(await sequence(43), a);
    for (const d of a) assert.ok(d >= 10 && d < 15, `${d}`);
    assert.ok(new Set(a).size > 40, 'the delays vary');
  });

  test('a delay of 0 with jitter gives random delays in [0, jitter)', async () => {
    const clock = instantClock();
    const dev = new DelayFilter(new MemoryDevice({ size: SIZE }), { delays: { write: 0 }, jitter: 3, seed: 7, clock });
    let max = 0;
    for (let i = 0; i < 20; i++) {
      const t0 = clock.t;
      await dev.write(Buffer.alloc(1), 0, 0);
      max = Math.max(max, clock.t - t0);
    }
    assert.ok(max > 0 && max < 3);
  });

  test('delay-fast-zero false: a FAST_ZERO zero fails EOPNOTSUPP at once; other zeroes wait', async () => {
    const manual = new ManualClock();
    const mem = new MemoryDevice({ size: SIZE });
    const dev = new DelayFilter(mem, { delays: { zero: 100 }, fastZero: false, clock: filterClockOf(manual) });
    await assert.rejects(dev.zero(0, 512, REQ.FAST_ZERO), { code: 'EOPNOTSUPP' });
    const z = track(dev.zero(0, 512, REQ.NO_HOLE));
    await settle();
    assert.equal(z.settled(), false);
    manual.advance(100);
    await z.promise;
    // By default fast zeroes wait like the others.
    const dflt = new DelayFilter(mem, { delays: { zero: 100 }, clock: filterClockOf(manual) });
    const f = track(dflt.zero(0, 512, REQ.FAST_ZERO));
    await settle();
    assert.equal(f.settled(), false);
    manual.advance(100);
    await f.promise;
  });

  test('close cancels nothing: it waits for the delayed requests, which succeed, then closes below', async () => {
    const manual = new ManualClock();
    const mem = new MemoryDevice({ size: SIZE });
    const dev = new DelayFilter(mem, { delays: { write: 50 }, clock: filterClockOf(manual) });
    const w = track(dev.write(Buffer.alloc(512, 3), 0, 0));
    await settle();
    assert.equal(dev.inFlight, 1);
    const c = track(dev.close());
    await settle();
    assert.equal(c.settled(), false);
    assert.equal(w.settled(), false);
    manual.advance(50);
    await w.promise;
    await c.promise;
    await assert.rejects(mem.read(Buffer.alloc(1), 0, 0), 'the device below is closed');
  });

  test('errors of the layer below come through after the delay', async () => {
    const clock = instantClock();
    const dev = new DelayFilter(new ErrorFilter(new MemoryDevice({ size: SIZE }), { error: 'ENOSPC' }), { delays: { read: 5 }, clock });
    await assert.rejects(dev.read(Buffer.alloc(2), 0, 0), { code: 'ENOSPC' });
    assert.equal(clock.t, 5);
  });

  test('real clock: a 50 ms delay takes at least 50 ms (a lower bound only)', async () => {
    const dev = new DelayFilter(new MemoryDevice({ size: SIZE }), { delays: { read: 50 } });
    const t0 = performance.now();
    await dev.read(Buffer.alloc(512), 0, 0);
    assert.ok(performance.now() - t0 >= 49.9, `${performance.now() - t0} ms`);
  });
});
