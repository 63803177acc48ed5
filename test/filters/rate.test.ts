import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { MemoryDevice } from '../../src/backends/memory.js';
import { ManualClock } from '../../src/gate/clock.js';
import { BlockError } from '../../src/errors/index.js';
import { FILTERS } from '../../src/filters/index.js';
import { filterClockOf, type FilterClock } from '../../src/filters/delay.js';
import { RateFilter, TokenBucket, rateFilter } from '../../src/filters/rate.js';
import { runContract } from '../backends/contract.js';
import { settle, track } from './recording.js';

const SIZE = 2 ** 20;

/** A virtual clock whose sleep returns at once, having moved time by exactly the time slept. */
function instantClock(): FilterClock {
  let t = 0;
  return {
    now: () => t,
    sleep: async (ms) => {
      t += ms;
    },
  };
}

/** A bucket of `rate` bytes/s holding `capacity` bytes, on a manual clock. */
function manualBucket(rate: number, capacity: number): { bucket: TokenBucket; clock: ManualClock } {
  const clock = new ManualClock();
  return { bucket: new TokenBucket(rate, capacity, filterClockOf(clock)), clock };
}

/** take() as a tracked promise (an immediate grant is a settled one). */
function take(bucket: TokenBucket, n: number) {
  return track(bucket.take(n) ?? Promise.resolve());
}

runContract(
  'rate filter (1 MiB/s both ways, virtual clock) over memory',
  async () => ({
    dev: new RateFilter(new MemoryDevice({ size: SIZE }), { readRate: 2 ** 20, writeRate: 2 ** 20, clock: instantClock() }),
    cleanup: async () => undefined,
  }),
  { initial: (_o, n) => Buffer.alloc(n) },
);

describe('token bucket (manual clock; 1000 bytes/s = 1 byte/ms)', () => {
  test('starts full: admits its capacity at once, then one byte per ms', async () => {
    const { bucket, clock } = manualBucket(1000, 1000);
    assert.equal(bucket.take(600), undefined, 'granted at once');
    assert.equal(bucket.take(400), undefined, 'granted at once: the bucket held exactly 1000');
    const r = take(bucket, 100);
    await settle();
    assert.equal(r.settled(), false);
    clock.advance(99);
    await settle();
    assert.equal(r.settled(), false, 'one byte short');
    clock.advance(1);
    await settle();
    assert.equal(r.settled(), true);
    assert.equal(bucket.waiting, 0);
  });

  test('a quiet spell refills it to its capacity, no more', async () => {
    const { bucket, clock } = manualBucket(1000, 500);
    assert.equal(bucket.take(500), undefined);
    clock.advance(10_000);
    assert.equal(bucket.level, 500);
    assert.equal(bucket.take(500), undefined);
    const r = take(bucket, 1);
    await settle();
    assert.equal(r.settled(), false);
    clock.advance(1);
    await settle();
    assert.equal(r.settled(), true);
  });

  test('a request larger than the bucket waits in proportion to its size (no starvation)', async () => {
    const { bucket, clock } = manualBucket(1000, 1000);
    const big = take(bucket, 5000);
    await settle();
    assert.equal(big.settled(), false);
    clock.advance(3999);
    await settle();
    assert.equal(big.settled(), false);
    clock.advance(1);
    await settle();
    assert.equal(big.settled(), true, '(5000 - 1000 in the bucket) / 1000 per s = 4 s');
  });

  test('requests leave in arrival order: a small one behind a big one waits for it (FIFO)', async () => {
    const { bucket, clock } = manualBucket(1000, 100);
    const big = take(bucket, 1100);
    const small = take(bucket, 10);
    await settle();
    clock.advance(1000);
    await settle();
    assert.equal(big.settled(), true);
    assert.equal(small.settled(), false, 'no overtaking even though 10 bytes were refilled long ago');
    clock.advance(9);
    await settle();
    assert.equal(small.settled(), false);
    clock.advance(1);
    await settle();
    assert.equal(small.settled(), true);
  });

  test('property: request k of a burst goes exactly at (bytes up to k - capacity) / rate', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.integer({ min: 1, max: 3000 }), { minLength: 1, maxLength: 12 }), fc.integer({ min: 1, max: 4000 }), async (sizes, capacity) => {
        const { bucket, clock } = manualBucket(1000, capacity);
        const reqs = sizes.map((n) => take(bucket, n));
        let sum = 0;
        const due = sizes.map((n) => Math.max(0, (sum += n) - capacity));
        let now = 0;
        for (let k = 0; k < reqs.length; k++) {
          if (due[k]! > now) {
            clock.advance(due[k]! - 1 - now);
            now = due[k]! - 1;
            await settle(2);
            assert.equal(reqs[k]!.settled(), false, `request ${k} is not granted 1 ms early`);
            clock.advance(1);
            now++;
          }
          await settle(2);
          assert.equal(reqs[k]!.settled(), true, `request ${k} is granted at ${due[k]} ms`);
          for (let j = k + 1; j < reqs.length; j++) if (due[j]! > now) assert.equal(reqs[j]!.settled(), false);
        }
      }),
      { numRuns: 40 },
    );
  });
});

describe('rate filter', () => {
  test('is registered as "rate"', () => {
    assert.equal(FILTERS.get('rate'), rateFilter);
  });

  test('settings: rates are sizes per second; rate sets both ways, read-rate/write-rate override', () => {
    const mem = new MemoryDevice({ size: SIZE });
    const f = rateFilter(mem, { type: 'rate', rate: '4M' });
    assert.equal(f.readBucket!.rate, 4 * 2 ** 20);
    assert.equal(f.writeBucket!.rate, 4 * 2 ** 20);
    assert.equal(f.readBucket!.capacity, 4 * 2 ** 20, 'burst: one second of rate by default');
    assert.equal(f.description, 'memory 1MiB (rate: read 4MiB/s, write 4MiB/s)');
    const g = rateFilter(mem, { type: 'rate', rate: 1000, 'write-rate': '1K', burstiness: 0.5 });
    assert.equal(g.readBucket!.rate, 1000);
    assert.equal(g.writeBucket!.rate, 1024);
    assert.equal(g.writeBucket!.capacity, 512);
    const r = rateFilter(mem, { type: 'rate', 'read-rate': '10M' });
    assert.equal(r.writeBucket, undefined, 'writes unlimited');
    assert.equal(r.description, 'memory 1MiB (rate: read 10MiB/s)');
  });

  test('settings: bad values name the key; connection-rate is refused with the reason', () => {
    const mem = new MemoryDevice({ size: SIZE });
    const bad = (settings: Record<string, unknown>, re: RegExp) =>
      assert.throws(() => rateFilter(mem, { type: 'rate', ...settings }), (e: unknown) => e instanceof BlockError && e.code === 'EINVAL' && re.test(e.message));
    bad({}, /^rate: rate: required setting is missing/);
    bad({ rate: 0 }, /^rate: rate: must be at least 1/);
    bad({ rate: 'fast' }, /^rate: rate: invalid size: 'fast'/);
    bad({ 'read-rate': -1 }, /^rate: read-rate: invalid size/);
    bad({ rate: '1M', burstiness: 0 }, /^rate: burstiness: must be more than 0/);
    bad({ rate: '1M', burstiness: '2' }, /^rate: burstiness: expected a number of seconds/);
    bad({ rate: '1M', 'connection-rate': '1M' }, /^rate: connection-rate: per-connection limits are not supported: the device stack has no notion of connections/);
    bad({ rate: '1M', 'rate-file': '/tmp/r' }, /^rate: rate-file: changing the rate while serving is not supported/);
    bad({ rate: '1M', burst: '1M' }, /^rate: burst: unknown setting/);
  });

  test('reads and writes have separate buckets; zero, trim, flush, extents, cache are not limited', async () => {
    const manual = new ManualClock();
    const dev = new RateFilter(new MemoryDevice({ size: SIZE }), { readRate: 1000, writeRate: 1000, clock: filterClockOf(manual) });
    await dev.read(Buffer.alloc(1000), 0, 0);
    await dev.write(Buffer.alloc(1000), 0, 0);
    const r = track(dev.read(Buffer.alloc(10), 0, 0));
    const w = track(dev.write(Buffer.alloc(20), 0, 0));
    await settle();
    assert.equal(r.settled() || w.settled(), false);
    await dev.zero(0, SIZE, 0);
    await dev.trim(0, SIZE, 0);
    await dev.flush(0);
    await dev.extents(0, SIZE, 0);
    await dev.cache(0, SIZE, 0);
    manual.advance(10);
    await settle();
    assert.deepEqual([r.settled(), w.settled()], [true, false]);
    manual.advance(10);
    await settle();
    assert.equal(w.settled(), true);
  });

  test('a waiting write keeps the caller\'s buffer (no copy) and writes what it holds when it goes', async () => {
    const manual = new ManualClock();
    const mem = new MemoryDevice({ size: SIZE });
    const dev = new RateFilter(mem, { writeRate: 1000, burstiness: 0.001, clock: filterClockOf(manual) });
    const data = Buffer.alloc(100, 1);
    const w = track(dev.write(data, 0, 0));
    await settle();
    assert.equal(w.settled(), false);
    manual.advance(99);
    await settle();
    assert.equal(w.settled(), true);
    const back = Buffer.alloc(100);
    await mem.read(back, 0, 0);
    assert.deepEqual(back, data);
  });

  test('close waits for the requests waiting for tokens, which succeed', async () => {
    const manual = new ManualClock();
    const mem = new MemoryDevice({ size: SIZE });
    const dev = new RateFilter(mem, { readRate: 1000, burstiness: 0.001, clock: filterClockOf(manual) });
    const r = track(dev.read(Buffer.alloc(500), 0, 0));
    await settle();
    const c = track(dev.close());
    await settle();
    assert.equal(c.settled(), false);
    manual.advance(499);
    await r.promise;
    await c.promise;
    assert.equal(manual.activeTimers, 0);
  });
});
