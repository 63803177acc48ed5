/**
 * The truncate filter over memory: the backend contract when it truncates, reads and
 * extents of the zero tail when it extends, writes there (zeroes only, else ENOSPC with
 * nothing written), rounding, and the settings.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { EXTENT, REQ, type Capabilities } from '../../src/device/types.js';
import { FilterDevice } from '../../src/device/filter.js';
import { MemoryDevice, PAGE_SIZE } from '../../src/backends/memory.js';
import { TruncateFilter, truncateFilter } from '../../src/filters/truncate.js';
import { runContract } from '../backends/contract.js';
import { RecordingDevice } from './recording.js';

const REAL = 300_007;
const Z = EXTENT.HOLE | EXTENT.ZERO;

async function below(): Promise<MemoryDevice> {
  const m = new MemoryDevice({ size: REAL });
  await m.write(Buffer.alloc(REAL, 0x5a), 0, 0);
  return m;
}

async function readAt(dev: { read(b: Buffer, o: number, f: number): Promise<void> }, offset: number, length: number) {
  const buf = Buffer.alloc(length, 0xa5);
  await dev.read(buf, offset, 0);
  return buf;
}

runContract(
  'truncate filter (smaller) over memory',
  async () => ({ dev: new TruncateFilter(new MemoryDevice({ size: 2 ** 21 }), { size: 2 ** 20 + 77 }), cleanup: async () => undefined }),
  { initial: (_o, n) => Buffer.alloc(n) },
);

runContract(
  'truncate filter (roundDown) over memory',
  async () => ({ dev: new TruncateFilter(new MemoryDevice({ size: 2 ** 20 + 4097 }), { roundDown: 4096 }), cleanup: async () => undefined }),
  { initial: (_o, n) => Buffer.alloc(n) },
);

describe('truncate filter', () => {
  test('size: set, then rounded up, then rounded down (the order nbdkit applies them in)', async () => {
    const b = await below();
    assert.equal(new TruncateFilter(b).size, REAL);
    assert.equal(new TruncateFilter(b, { size: 1000 }).size, 1000);
    assert.equal(new TruncateFilter(b, { roundUp: 512 }).size, 300_032);
    assert.equal(new TruncateFilter(b, { roundDown: 512 }).size, 299_520);
    assert.equal(new TruncateFilter(b, { roundUp: 4096, roundDown: 512 }).size, 303_104);
    assert.equal(new TruncateFilter(b, { size: 1000, roundUp: 1024, roundDown: 4096 }).size, 0);
    assert.equal(new TruncateFilter(b, { size: 10 ** 6 }).description, 'memory 300007B (truncated to 1000000B)');
  });

  test('extended: the tail reads as zeroes, alone or after real bytes', async () => {
    const dev = new TruncateFilter(await below(), { size: 10 ** 6 });
    assert.equal(dev.size, 10 ** 6);
    assert.equal(dev.realSize, REAL);
    assert.deepEqual(await readAt(dev, REAL, 5000), Buffer.alloc(5000));
    assert.deepEqual(await readAt(dev, 10 ** 6 - 1, 1), Buffer.alloc(1));
    const across = await readAt(dev, REAL - 7, 20);
    assert.deepEqual(across, Buffer.concat([Buffer.alloc(7, 0x5a), Buffer.alloc(13)]));
  });

  test('extended: writing zeroes in the tail succeeds and does nothing; anything else fails ENOSPC before writing', async () => {
    const rec = new RecordingDevice(await below());
    const dev = new TruncateFilter(rec, { size: 10 ** 6 });
    await dev.write(Buffer.alloc(70000), REAL + 10, 0);
    assert.equal(rec.of('write').length, 0, 'nothing to write below');
    // Across the end: the part below is written, the zero tail dropped.
    const data = Buffer.concat([randomBytes(100), Buffer.alloc(50)]);
    await dev.write(data, REAL - 100, REQ.FUA);
    assert.deepEqual(rec.of('write').map((c) => [c.offset, c.length, c.flags]), [[REAL - 100, 100, REQ.FUA]]);
    assert.deepEqual(await readAt(dev, REAL - 100, 150), data);
    // A non-zero byte past the end: ENOSPC, and the part below the end is not written either.
    const bad = Buffer.alloc(200, 7);
    await assert.rejects(dev.write(bad, REAL - 100, 0), { code: 'ENOSPC', message: /non-zero data past the end of memory 300007B/ });
    assert.equal(rec.of('write').length, 1);
    assert.deepEqual(await readAt(dev, REAL - 100, 100), data.subarray(0, 100));
  });

  test('extended: trim, zero and cache of the tail do nothing; across the end they are clipped', async () => {
    const rec = new RecordingDevice(await below());
    const dev = new TruncateFilter(rec, { size: 10 ** 6 });
    await dev.trim(REAL, 1000, 0);
    await dev.zero(REAL + 1, 1000, REQ.FAST_ZERO);
    await dev.cache(REAL, 1000, 0);
    assert.equal(rec.calls.length, 0);
    await dev.zero(REAL - 10, 1000, REQ.NO_HOLE);
    await dev.trim(REAL - 20, 1000, 0);
    assert.deepEqual(rec.calls.map((c) => [c.op, c.offset, c.length, c.flags]), [
      ['zero', REAL - 10, 10, REQ.NO_HOLE],
      ['trim', REAL - 20, 20, 0],
    ]);
    assert.equal(dev.capabilities.fastZero, true, 'zeroing the tail is fast (nbdkit says so too)');
  });

  test('FAST_ZERO below the end fails EOPNOTSUPP when the device below cannot zero fast', async () => {
    class Slow extends FilterDevice {
      override get capabilities(): Capabilities {
        return { ...this.next.capabilities, fastZero: false };
      }
    }
    const dev = new TruncateFilter(new Slow(await below()), { size: 10 ** 6 });
    assert.equal(dev.capabilities.fastZero, true);
    await assert.rejects(dev.zero(0, 10, REQ.FAST_ZERO), { code: 'EOPNOTSUPP' });
    await dev.zero(REAL, 10, REQ.FAST_ZERO);
    assert.deepEqual(await readAt(dev, 0, 10), Buffer.alloc(10, 0x5a), 'unchanged');
  });

  test('extents: the tail is a hole of zeroes; REQ_ONE stops at the real end', async () => {
    const m = new MemoryDevice({ size: 3 * PAGE_SIZE + 100 });
    await m.write(Buffer.alloc(1, 1), PAGE_SIZE, 0);
    const dev = new TruncateFilter(m, { size: 10 * PAGE_SIZE });
    const real = 3 * PAGE_SIZE + 100;
    assert.deepEqual(await dev.extents(0, dev.size, 0), [
      { offset: 0, length: PAGE_SIZE, flags: Z },
      { offset: PAGE_SIZE, length: PAGE_SIZE, flags: 0 },
      { offset: 2 * PAGE_SIZE, length: PAGE_SIZE + 100, flags: Z },
      { offset: real, length: 10 * PAGE_SIZE - real, flags: Z },
    ]);
    assert.deepEqual(await dev.extents(2 * PAGE_SIZE, dev.size - 2 * PAGE_SIZE, REQ.REQ_ONE), [{ offset: 2 * PAGE_SIZE, length: PAGE_SIZE + 100, flags: Z }]);
    assert.deepEqual(await dev.extents(real + 5, 10, 0), [{ offset: real + 5, length: 10, flags: Z }]);
    assert.deepEqual(await dev.extents(real + 5, 0, 0), [{ offset: real + 5, length: 10 * PAGE_SIZE - real - 5, flags: Z }]);
    // Truncated smaller, nothing past the new end is reported.
    const small = new TruncateFilter(m, { size: PAGE_SIZE + 10 });
    assert.deepEqual(await small.extents(0, 0, 0), [
      { offset: 0, length: PAGE_SIZE, flags: Z },
      { offset: PAGE_SIZE, length: 10, flags: 0 },
    ]);
    assert.equal(new TruncateFilter(m).capabilities.extents, true);
  });

  test('the factory: sizes with suffixes; rounding must be a power of two; unknown keys named', async () => {
    const b = await below();
    assert.equal(truncateFilter(b, { type: 'truncate', size: '1M' }).size, 2 ** 20);
    assert.equal(truncateFilter(b, { type: 'truncate', roundUp: '4k' }).size, 303_104);
    assert.equal(truncateFilter(b, { type: 'truncate' }).size, REAL);
    const bad = (desc: Record<string, unknown>, re: RegExp) => assert.throws(() => truncateFilter(b, { type: 'truncate', ...desc }), { code: 'EINVAL', message: re });
    bad({ roundUp: 3 }, /^truncate: roundUp: 3 must be a power of two from 1 to 4G$/);
    bad({ roundDown: 0 }, /^truncate: roundDown: 0 must be a power of two/);
    bad({ roundDown: '8G' }, /^truncate: roundDown: 8589934592 must be a power of two from 1 to 4G$/);
    bad({ size: -1 }, /^truncate: size: invalid size: -1$/);
    bad({ 'round-up': 512 }, /^truncate: round-up: unknown setting \(known: type, size, roundUp, roundDown\)$/);
    bad({ size: 2 ** 53 - 1, roundUp: 2 ** 20 }, /^truncate: cannot round the size up past 2\^53 - 1$/);
  });
});
