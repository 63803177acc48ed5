/**
 * The blocksize filter over a device that insists on 4096-byte alignment (no built-in
 * backend can be given a minimum block size, so a small FilterDevice over memory plays
 * that device here: it says minimum 4096, rejects anything unaligned or too long, and
 * yields to the event loop before each call so that concurrent requests interleave).
 * The backend contract through the filter, read-modify-write of unaligned writes and
 * zeroes, concurrent unaligned writes into shared blocks against a model (property),
 * splitting at maxdata and maxlen, trims, FAST_ZERO, extents, the range lock, settings.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { EXTENT, REQ, type BlockDevice, type BlockSize, type Extent } from '../../src/device/types.js';
import { FilterDevice } from '../../src/device/filter.js';
import { MemoryDevice, PAGE_SIZE } from '../../src/backends/memory.js';
import { BlockError } from '../../src/errors/index.js';
import { BlocksizeFilter, RangeLock, blocksizeFilter } from '../../src/filters/blocksize.js';
import { TruncateFilter } from '../../src/filters/truncate.js';
import { runContract } from '../backends/contract.js';

const B = 4096;
const SIZE = 2 ** 20 + 2 * B + 77;

interface StrictCall {
  readonly op: string;
  readonly offset: number;
  readonly length: number;
  readonly flags: number;
}

/** A device with a 4096-byte minimum block size that it enforces (see the module comment). */
class Strict4k extends FilterDevice {
  readonly calls: StrictCall[] = [];
  readonly #blockSize: BlockSize;

  constructor(next: BlockDevice, maximum = 2 ** 25) {
    super(next);
    this.#blockSize = { minimum: B, preferred: B, maximum };
  }
  override get blockSize(): BlockSize {
    return this.#blockSize;
  }
  async #check(op: string, offset: number, length: number, flags: number, data: boolean): Promise<void> {
    this.calls.push({ op, offset, length, flags });
    if (offset % B !== 0 || length % B !== 0) throw new BlockError('EINVAL', `${op} ${offset}+${length} is not 4096-aligned`);
    if (data && length > this.#blockSize.maximum) throw new BlockError('EINVAL', `${op} of ${length} is above the maximum`);
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
  of(op: string): StrictCall[] {
    return this.calls.filter((c) => c.op === op);
  }
  override async read(buf: Buffer, offset: number, flags: number): Promise<void> {
    await this.#check('read', offset, buf.length, flags, true);
    return this.next.read(buf, offset, flags);
  }
  override async write(data: Buffer, offset: number, flags: number): Promise<void> {
    const copy = Buffer.from(data); // the caller may reuse its buffer once we have yielded
    await this.#check('write', offset, data.length, flags, true);
    return this.next.write(copy, offset, flags);
  }
  override async zero(offset: number, length: number, flags: number): Promise<void> {
    await this.#check('zero', offset, length, flags, false);
    return this.next.zero(offset, length, flags);
  }
  override async trim(offset: number, length: number, flags: number): Promise<void> {
    await this.#check('trim', offset, length, flags, false);
    return this.next.trim(offset, length, flags);
  }
  override async cache(offset: number, length: number, flags: number): Promise<void> {
    await this.#check('cache', offset, length, flags, false);
    return this.next.cache(offset, length, flags);
  }
  override async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    await this.#check('extents', offset, length - (length % B), flags, false);
    return this.next.extents(offset, length, flags);
  }
}

function make(options: ConstructorParameters<typeof BlocksizeFilter>[1] = {}, maximum?: number) {
  const mem = new MemoryDevice({ size: SIZE });
  const strict = new Strict4k(mem, maximum);
  return { dev: new BlocksizeFilter(strict, options), strict, mem };
}

async function readAt(dev: { read(b: Buffer, o: number, f: number): Promise<void> }, offset: number, length: number) {
  const buf = Buffer.alloc(length, 0xa5);
  await dev.read(buf, offset, 0);
  return buf;
}

runContract('blocksize filter over a 4096-byte-minimum device', async () => ({ dev: make().dev, cleanup: async () => undefined }), {
  initial: (_o, n) => Buffer.alloc(n),
});

describe('blocksize filter', () => {
  test('presents minimum block size 1; the size is rounded down to minblock; the rest passes through', () => {
    const { dev, strict } = make();
    assert.deepEqual(dev.blockSize, { minimum: 1, preferred: B, maximum: 32 * 2 ** 20 });
    assert.equal(dev.minblock, B, 'minblock defaults to the minimum block size below');
    assert.equal(dev.maxdata, 32 * 2 ** 20, 'maxdata: 64M capped at the maximum below');
    assert.equal(dev.maxlen, 2 ** 32 - B);
    assert.equal(dev.size, SIZE - 77);
    assert.deepEqual(dev.capabilities, strict.capabilities, 'multi-conn stays: the lock covers every connection');
    assert.equal(dev.description, 'memory 1056845B (blocksize 4KiB)');
  });

  test('512-byte writes and reads at any offset become aligned read-modify-writes below; the data is right', async () => {
    const { dev, strict, mem } = make();
    await mem.write(Buffer.alloc(3 * B, 0x33), 0, 0);
    const a = randomBytes(512);
    const b = randomBytes(512);
    await dev.write(a, 512, 0);
    await dev.write(b, B - 100, REQ.FUA); // straddles blocks 0 and 1
    const expected = Buffer.alloc(3 * B, 0x33);
    a.copy(expected, 512);
    b.copy(expected, B - 100);
    assert.deepEqual(await readAt(dev, 0, 3 * B), expected);
    assert.deepEqual(await readAt(dev, 513, 1000), expected.subarray(513, 1513), 'an unaligned read');
    assert.deepEqual(await readAt(mem, 0, 3 * B), expected);
    assert.deepEqual(
      strict.of('write').map((c) => [c.offset, c.length, c.flags]),
      [
        [0, B, 0],
        [0, B, REQ.FUA],
        [B, B, REQ.FUA],
      ],
    );
  });

  test('unaligned zeroes zero only their bytes; the aligned middle is one zero below', async () => {
    const { dev, strict, mem } = make();
    await mem.write(Buffer.alloc(4 * B, 0x44), 0, 0);
    await dev.zero(100, 3 * B, REQ.NO_HOLE);
    const expected = Buffer.alloc(4 * B, 0x44);
    expected.fill(0, 100, 100 + 3 * B);
    assert.deepEqual(await readAt(dev, 0, 4 * B), expected);
    assert.deepEqual(strict.of('zero').map((c) => [c.offset, c.length, c.flags]), [[B, 2 * B, REQ.NO_HOLE]]);
    assert.deepEqual(strict.of('write').map((c) => [c.offset, c.length, c.flags]), [
      [0, B, 0],
      [3 * B, B, 0],
    ]);
  });

  test('FAST_ZERO: unaligned or longer than maxlen fails EOPNOTSUPP at once; aligned passes through', async () => {
    const { dev, strict } = make({ maxlen: 4 * B });
    await assert.rejects(dev.zero(1, B, REQ.FAST_ZERO), { code: 'EOPNOTSUPP' });
    await assert.rejects(dev.zero(0, B + 1, REQ.FAST_ZERO), { code: 'EOPNOTSUPP' });
    await assert.rejects(dev.zero(0, 8 * B, REQ.FAST_ZERO), { code: 'EOPNOTSUPP' });
    assert.equal(strict.calls.length, 0);
    await dev.zero(B, 2 * B, REQ.FAST_ZERO);
    assert.deepEqual(strict.calls.map((c) => [c.op, c.offset, c.length, c.flags]), [['zero', B, 2 * B, REQ.FAST_ZERO]]);
  });

  test('trims drop their unaligned head and tail; a trim inside one block does nothing', async () => {
    const { dev, strict } = make();
    await dev.trim(100, 10 * B, 0);
    await dev.trim(B + 5, 100, 0);
    await dev.trim(0, 0, 0);
    assert.deepEqual(strict.of('trim').map((c) => [c.offset, c.length]), [[B, 9 * B]]);
  });

  test('requests above maxdata (reads, writes) and maxlen (zero, trim, cache) are split', async () => {
    const { dev, strict } = make({ maxdata: 2 * B, maxlen: 3 * B });
    const data = randomBytes(10 * B);
    await dev.write(data, 1000, 0);
    assert.deepEqual(await readAt(dev, 1000, 10 * B), data);
    for (const c of strict.calls) {
      if (c.op === 'read' || c.op === 'write') assert.ok(c.length <= 2 * B, `${c.op} of ${c.length}`);
    }
    strict.calls.length = 0;
    await dev.zero(0, 10 * B, 0);
    await dev.trim(0, 10 * B, 0);
    await dev.cache(10, 5 * B, 0);
    assert.deepEqual(strict.calls.map((c) => `${c.op}@${c.offset / B}+${c.length / B}`), [
      'zero@0+3', 'zero@3+3', 'zero@6+3', 'zero@9+1',
      'trim@0+3', 'trim@3+3', 'trim@6+3', 'trim@9+1',
      'cache@0+2', 'cache@2+2', 'cache@4+2',
    ]);
    assert.deepEqual(await readAt(dev, 0, 10 * B), Buffer.alloc(10 * B));
  });

  test('extents are asked from the block holding the offset and start at the offset', async () => {
    const mem = new MemoryDevice({ size: 16 * PAGE_SIZE });
    await mem.write(Buffer.alloc(1, 1), PAGE_SIZE, 0);
    const strict = new Strict4k(mem);
    const dev = new BlocksizeFilter(strict);
    const Z = EXTENT.HOLE | EXTENT.ZERO;
    assert.deepEqual(await dev.extents(5000, 2 * PAGE_SIZE, 0), [
      { offset: 5000, length: PAGE_SIZE - 5000, flags: Z },
      { offset: PAGE_SIZE, length: PAGE_SIZE, flags: 0 },
      { offset: 2 * PAGE_SIZE, length: 2 * B, flags: Z }, // rounded out to the block (may end past the request)
    ]);
    assert.deepEqual(strict.of('extents').map((c) => c.offset), [4096]);
    assert.deepEqual(await dev.extents(dev.size - 1, 0, REQ.REQ_ONE), [{ offset: dev.size - 1, length: 1, flags: Z }]);
  });

  test('concurrent unaligned writes, zeroes and trims into shared blocks all land (property, against a model)', async () => {
    const SPAN = 6 * B;
    const op = fc.record({ kind: fc.constantFrom('write', 'write', 'zero', 'trim'), byte: fc.integer({ min: 1, max: 255 }) });
    await fc.assert(
      fc.asyncProperty(fc.uniqueArray(fc.integer({ min: 1, max: SPAN - 1 }), { minLength: 1, maxLength: 24 }), fc.array(op, { minLength: 25, maxLength: 25 }), async (cuts, ops) => {
        const { dev, mem } = make();
        const model = Buffer.alloc(SPAN, 0x77);
        await mem.write(model, 0, 0);
        // Disjoint byte ranges covering the span, many of them sharing blocks, all at once.
        const bounds = [0, ...cuts.sort((x, y) => x - y), SPAN];
        const work: Promise<void>[] = [];
        for (let i = 0; i + 1 < bounds.length; i++) {
          const [from, to] = [bounds[i]!, bounds[i + 1]!];
          const o = ops[i]!;
          if (o.kind === 'write') {
            model.fill(o.byte, from, to);
            work.push(dev.write(Buffer.alloc(to - from, o.byte), from, 0));
          } else if (o.kind === 'zero') {
            model.fill(0, from, to);
            work.push(dev.zero(from, to - from, 0));
          } else {
            work.push(dev.trim(from, to - from, 0)); // memory keeps trimmed bytes unless a whole page goes
          }
        }
        await Promise.all(work);
        const got = await readAt(dev, 0, SPAN);
        for (let i = 0; i + 1 < bounds.length; i++) {
          if (ops[i]!.kind === 'trim') got.copy(model, bounds[i]!, bounds[i]!, bounds[i + 1]!); // a hint: either is fine
        }
        assert.deepEqual(got, model);
      }),
      { numRuns: 60 },
    );
  });

  test('an aligned write cannot land between the read and the write of a read-modify-write of its block', async () => {
    for (let round = 0; round < 20; round++) {
      const { dev } = make();
      const small = dev.write(Buffer.alloc(100, 0x22), 100, 0);
      const whole = dev.write(Buffer.alloc(B, 0x11), 0, 0);
      await Promise.all([small, whole]);
      const got = await readAt(dev, 0, B);
      const wholeLast = Buffer.alloc(B, 0x11);
      const smallLast = Buffer.from(wholeLast).fill(0x22, 100, 200);
      assert.ok(got.equals(wholeLast) || got.equals(smallLast), 'the result of one order or the other, never a lost write');
    }
  });

  test('over a truncate filter with roundUp (nearer the device), the last unaligned bytes stay reachable', async () => {
    const mem = new MemoryDevice({ size: SIZE });
    const dev = new BlocksizeFilter(new TruncateFilter(mem, { roundUp: B }), { minblock: B });
    assert.equal(dev.size, SIZE - 77 + B);
    const tail = randomBytes(77);
    await dev.write(tail, SIZE - 77, 0);
    assert.deepEqual(await readAt(mem, SIZE - 77, 77), tail);
    assert.deepEqual(await readAt(dev, SIZE - 77, B), Buffer.concat([tail, Buffer.alloc(B - 77)]));
    await assert.rejects(dev.write(Buffer.alloc(1, 1), SIZE, 0), { code: 'ENOSPC' }, 'the padding takes only zeroes');
  });

  test('RangeLock: shared ranges share, exclusive ones wait, and waiters are served in order', async () => {
    const lock = new RangeLock();
    const order: string[] = [];
    const r1 = await lock.acquire(0, 10, false);
    const r2 = await lock.acquire(5, 15, false);
    assert.equal(lock.heldCount, 2);
    const x = lock.acquire(8, 9, true).then((r) => (order.push('x'), r));
    const s = lock.acquire(0, 10, false).then((r) => (order.push('s'), r)); // behind the waiting exclusive
    const other = await lock.acquire(20, 30, true); // no conflict with anyone
    order.push('other');
    assert.equal(lock.waitingCount, 2);
    r1();
    await new Promise<void>((resolve) => setImmediate(resolve));
    assert.deepEqual(order, ['other'], 'x still waits for r2, s waits behind x');
    r2();
    const rx = await x;
    assert.deepEqual(order, ['other', 'x']);
    rx();
    (await s)();
    other();
    assert.deepEqual(order, ['other', 'x', 's']);
    assert.equal(lock.heldCount, 0);
    assert.equal(lock.waitingCount, 0);
  });

  test('the factory: sizes with suffixes, every limit checked against minblock and the device below', () => {
    const strict = new Strict4k(new MemoryDevice({ size: SIZE }), 2 ** 20);
    const dev = blocksizeFilter(strict, { type: 'blocksize', minblock: '8k', maxdata: '512k', maxlen: '1M' });
    assert.deepEqual([dev.minblock, dev.maxdata, dev.maxlen], [8192, 512 * 1024, 2 ** 20]);
    assert.equal(blocksizeFilter(strict, { type: 'blocksize' }).maxdata, 2 ** 20, 'maxdata defaults to the maximum below');
    const plain = blocksizeFilter(new MemoryDevice({ size: SIZE }), { type: 'blocksize', minblock: 512 });
    assert.equal(plain.size, SIZE - (SIZE % 512));
    const bad = (desc: Record<string, unknown>, re: RegExp) => assert.throws(() => blocksizeFilter(strict, { type: 'blocksize', ...desc }), { code: 'EINVAL', message: re });
    bad({ minblock: 3 * B }, /^blocksize: minblock: 12288 must be a power of two from 1 to 64K$/);
    bad({ minblock: '128k' }, /^blocksize: minblock: 131072 must be a power of two/);
    bad({ minblock: 512 }, /^blocksize: minblock: 512 is smaller than the minimum block size 4096 of memory/);
    bad({ maxdata: 5000 }, /^blocksize: maxdata: 5000 must be a non-zero multiple of minblock 4096$/);
    bad({ maxdata: '2M' }, /^blocksize: maxdata: 2097152 is larger than the maximum request 1048576 of memory/);
    bad({ maxlen: 100 }, /^blocksize: maxlen: 100 must be a non-zero multiple of minblock 4096$/);
    bad({ maxdata: 'x' }, /^blocksize: maxdata: invalid size/);
    bad({ minBlock: 512 }, /^blocksize: minBlock: unknown setting \(known: type, minblock, maxdata, maxlen\)$/);
  });
});
