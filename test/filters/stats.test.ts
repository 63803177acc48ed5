import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { REQ } from '../../src/device/types.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import { BlockError } from '../../src/errors/index.js';
import { FILTERS, ReadonlyFilter } from '../../src/filters/index.js';
import { ErrorFilter } from '../../src/filters/error.js';
import { DelayFilter, type FilterClock } from '../../src/filters/delay.js';
import {
  BUCKET_UPPER_US,
  HISTOGRAM_BUCKETS,
  STATS_OPS,
  StatsFilter,
  latencyBucket,
  statsFilter,
  statsOf,
  type StatsSnapshot,
} from '../../src/filters/stats.js';
import { runContract } from '../backends/contract.js';

const SIZE = 2 ** 20;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-stats-test-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

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

runContract(
  'stats filter over memory',
  async () => ({ dev: new StatsFilter(new MemoryDevice({ size: SIZE })), cleanup: async () => undefined }),
  { initial: (_o, n) => Buffer.alloc(n) },
);

describe('latency histogram buckets', () => {
  test('bucket 0 is under 1 µs, bucket i is [2^(i-1), 2^i) µs, the last is 2^24 µs and more', () => {
    assert.equal(HISTOGRAM_BUCKETS, 26);
    const cases: [number, number][] = [
      [0, 0],
      [0.999, 0],
      [1, 1],
      [1.999, 1],
      [2, 2],
      [3.5, 2],
      [4, 3],
      [1000, 10],
      [1024, 11],
      [2 ** 23 - 0.5, 23],
      [2 ** 23, 24],
      [2 ** 24 - 1, 24],
      [2 ** 24, 25],
      [1e12, 25],
      [NaN, 0],
    ];
    for (const [us, b] of cases) assert.equal(latencyBucket(us), b, `${us} µs`);
    for (let i = 1; i <= 24; i++) {
      assert.equal(latencyBucket(2 ** (i - 1)), i, `lower bound of ${i}`);
      assert.equal(latencyBucket(2 ** i - 2 ** -10), i, `just under the upper bound of ${i}`);
      assert.equal(BUCKET_UPPER_US[i], 2 ** i);
    }
    assert.equal(BUCKET_UPPER_US[0], 1);
    assert.equal(BUCKET_UPPER_US[25], null);
  });
});

describe('stats filter', () => {
  test('is registered as "stats"; settings name the bad key', () => {
    assert.equal(FILTERS.get('stats'), statsFilter);
    const mem = new MemoryDevice({ size: SIZE });
    const plain = statsFilter(mem, { type: 'stats' });
    assert.ok(plain instanceof StatsFilter);
    assert.equal(plain.description, 'memory 1MiB (stats)');
    assert.throws(() => statsFilter(mem, { type: 'stats', statsfile: '' }), /^BlockError: stats: statsfile: must not be empty/);
    assert.throws(() => statsFilter(mem, { type: 'stats', statsappend: 'yes' }), /stats: statsappend: expected true or false/);
    assert.throws(() => statsFilter(mem, { type: 'stats', statsthreshold: 10 }), /stats: statsthreshold: unknown setting/);
  });

  test('counts, bytes and errors are exact per operation; failed requests count no bytes', async () => {
    const mem = new MemoryDevice({ size: SIZE });
    // Writes and zeroes at or above 64 KiB fail.
    const err = new ErrorFilter(mem, { ops: ['write', 'zero'], offset: 65536 });
    const dev = new StatsFilter(err);
    for (let i = 0; i < 5; i++) await dev.read(Buffer.alloc(4096), i * 4096, 0);
    await dev.write(Buffer.alloc(512), 0, REQ.FUA);
    await dev.write(Buffer.alloc(1000), 1000, 0);
    await assert.rejects(dev.write(Buffer.alloc(512), 65536, 0), { code: 'EIO' });
    await dev.zero(0, 8192, 0);
    await assert.rejects(dev.zero(65536, 8192, 0), { code: 'EIO' });
    await dev.trim(0, 3000, 0);
    await dev.flush(0);
    await dev.flush(0);
    await dev.extents(0, SIZE, 0);
    await dev.cache(0, 77, 0);
    const s = dev.snapshot();
    const brief = Object.fromEntries(STATS_OPS.map((op) => [op, [s.ops[op].count, s.ops[op].bytes, s.ops[op].errors]]));
    assert.deepEqual(brief, {
      read: [5, 5 * 4096, 0],
      write: [3, 1512, 1],
      zero: [2, 8192, 1],
      trim: [1, 3000, 0],
      flush: [2, 0, 0],
      extents: [1, SIZE, 0],
      cache: [1, 77, 0],
    });
    for (const op of STATS_OPS) {
      assert.equal(s.ops[op].histogram.length, HISTOGRAM_BUCKETS);
      assert.equal(s.ops[op].histogram.reduce((a, b) => a + b, 0), s.ops[op].count, `${op}: every request is in the histogram`);
    }
  });

  test('latencies land in the right bucket; p50/p99 are the upper bound of their bucket (virtual clock)', async () => {
    const clock = instantClock();
    const mem = new MemoryDevice({ size: SIZE });
    const delays = { read: 0.3, write: 3, flush: 20_000 };
    const dev = new StatsFilter(new DelayFilter(mem, { delays, clock }), { clock });
    // 98 reads of 300 µs, 2 slower ones of 300 µs + 5 ms (a second delay filter for those).
    for (let i = 0; i < 98; i++) await dev.read(Buffer.alloc(1), 0, 0);
    const slow = new StatsFilter(new DelayFilter(new DelayFilter(mem, { delays, clock }), { delays: { read: 5 }, clock }), { clock });
    await slow.read(Buffer.alloc(1), 0, 0);
    await dev.write(Buffer.alloc(1), 0, 0);
    await dev.flush(0);
    const s = dev.snapshot();
    assert.equal(s.ops.read.histogram[latencyBucket(300)], 98);
    assert.equal(latencyBucket(300), 9, '300 µs is in [256, 512)');
    assert.equal(s.ops.read.p50Us, 300, 'the bucket bound 512 capped by the largest latency seen');
    assert.equal(s.ops.read.maxUs, 300);
    assert.equal(s.ops.read.timeUs, 98 * 300);
    assert.equal(s.ops.write.histogram[12], 1, '3 ms is in [2048, 4096) µs');
    assert.equal(s.ops.flush.histogram[25], 1, '20 s is past the last bound');
    assert.equal(s.ops.flush.p99Us, 20_000_000);
    assert.equal(s.ops.zero.p50Us, null, 'no requests, no percentile');
    const mixed = slow.snapshot().ops.read;
    assert.equal(mixed.histogram[latencyBucket(5300)], 1);
    assert.equal(mixed.p50Us, 5300);

    // 100 reads under one stats filter: 98 of 400 µs, in [256, 512), then 2 of 6 ms, in [4096, 8192).
    const slowPath = new DelayFilter(mem, { delays: { read: 6 }, clock });
    class Chooser extends DelayFilter {
      n = 0;
      override read(buf: Buffer, offset: number, flags: number): Promise<void> {
        return ++this.n > 98 ? slowPath.read(buf, offset, flags) : super.read(buf, offset, flags);
      }
    }
    const chooser = new StatsFilter(new Chooser(mem, { delays: { read: 0.4 }, clock }), { clock });
    for (let i = 0; i < 100; i++) await chooser.read(Buffer.alloc(1), 0, 0);
    const c = chooser.snapshot().ops.read;
    assert.equal(c.histogram[9], 98);
    assert.equal(c.histogram[13], 2);
    assert.equal(c.p50Us, 512, 'the 50th request is in [256, 512): its upper bound');
    assert.equal(c.p99Us, 6000, 'the 99th is in [4096, 8192), capped by the largest seen');
  });

  test('snapshot is plain JSON: since, elapsed (s), bucket bounds, per-op figures', async () => {
    const clock = instantClock();
    const dev = new StatsFilter(new MemoryDevice({ size: SIZE }), { clock });
    await dev.read(Buffer.alloc(512), 0, 0);
    clock.t += 2500;
    const s = dev.snapshot();
    assert.deepEqual(JSON.parse(JSON.stringify(s)), s);
    assert.equal(s.elapsed, 2.5);
    assert.ok(!Number.isNaN(Date.parse(s.since)));
    assert.deepEqual(Object.keys(s.ops), [...STATS_OPS]);
    assert.deepEqual(Object.keys(s.ops.read), ['count', 'bytes', 'errors', 'timeUs', 'maxUs', 'p50Us', 'p99Us', 'histogram']);
    assert.equal(s.bucketsUs.length, HISTOGRAM_BUCKETS);
  });

  test('statsfile: the summary is written at close (replaced, or appended with statsappend)', async () => {
    const file = path.join(dir, 'stats.json');
    fs.writeFileSync(file, 'old\n');
    const mem = new MemoryDevice({ size: SIZE });
    const a = statsFilter(mem, { type: 'stats', statsfile: file });
    await a.read(Buffer.alloc(4096), 0, 0);
    assert.equal(fs.readFileSync(file, 'utf8'), 'old\n', 'nothing written before close');
    await a.close();
    const lines = fs.readFileSync(file, 'utf8').trimEnd().split('\n');
    assert.equal(lines.length, 1);
    assert.equal((JSON.parse(lines[0]!) as StatsSnapshot).ops.read.bytes, 4096);
    await assert.rejects(mem.read(Buffer.alloc(1), 0, 0), 'the device below is closed');

    const b = statsFilter(new MemoryDevice({ size: SIZE }), { type: 'stats', statsfile: file, statsappend: true });
    await b.write(Buffer.alloc(100), 0, 0);
    await b.close();
    const two = fs.readFileSync(file, 'utf8').trimEnd().split('\n').map((l) => JSON.parse(l) as StatsSnapshot);
    assert.deepEqual(two.map((x) => [x.ops.read.bytes, x.ops.write.bytes]), [[4096, 0], [0, 100]]);
  });

  test('a statsfile that cannot be written fails close, after closing the device below', async () => {
    const mem = new MemoryDevice({ size: SIZE });
    const dev = new StatsFilter(mem, { statsfile: path.join(dir, 'missing-dir', 'stats.json') });
    await assert.rejects(dev.close(), (e: unknown) => e instanceof BlockError && e.code === 'ENOENT' && /^stats: statsfile .*missing-dir/.test(e.message));
    await assert.rejects(mem.read(Buffer.alloc(1), 0, 0));
  });

  test('statsOf finds the topmost stats filter in a stack, or nothing', () => {
    const mem = new MemoryDevice({ size: SIZE });
    const stats = new StatsFilter(mem);
    const stack = new ReadonlyFilter(new DelayFilter(stats, {}));
    assert.equal(statsOf(stack), stats);
    assert.equal(statsOf(stats), stats);
    const top = new StatsFilter(stack);
    assert.equal(statsOf(top), top);
    assert.equal(statsOf(new ReadonlyFilter(mem)), undefined);
    assert.equal(statsOf(mem), undefined);
  });
});
