import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { BlockError } from '../../src/errors/index.js';
import { EXTENT, REQ } from '../../src/device/types.js';
import { MAX_EXTENTS_PER_CALL, MemoryDevice, PAGE_SIZE, memoryBackend } from '../../src/backends/memory.js';
import { checkExtents, runContract } from './contract.js';

const HOLE = EXTENT.HOLE | EXTENT.ZERO;
/** Not a multiple of the page size, so the last page is partial. */
const SIZE = 5 * PAGE_SIZE + 12345;
const noCleanup = async () => undefined;

runContract('memory', async () => ({ dev: new MemoryDevice({ size: SIZE }), cleanup: noCleanup }), {
  initial: (_o, n) => Buffer.alloc(n),
});
runContract('memory (readonly setting)', async () => ({ dev: memoryBackend({ type: 'memory', size: SIZE, readonly: true }), cleanup: noCleanup }), {
  initial: (_o, n) => Buffer.alloc(n),
});

async function readAt(dev: MemoryDevice, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length, 0xa5);
  await dev.read(buf, offset, 0);
  return buf;
}

describe('memory backend', () => {
  test('a 2^50-byte device: written at its last block, everything before is one hole', async () => {
    const size = 2 ** 50;
    const dev = new MemoryDevice({ size });
    const data = Buffer.alloc(4096, 0x5a);
    await dev.write(data, size - 4096, 0);
    assert.deepEqual(await readAt(dev, size - 4096, 4096), data);
    assert.deepEqual(await readAt(dev, size - 8192, 4096), Buffer.alloc(4096));
    assert.equal(dev.allocatedBytes, PAGE_SIZE);
    assert.deepEqual(await dev.extents(0, size, 0), [
      { offset: 0, length: size - PAGE_SIZE, flags: HOLE },
      { offset: size - PAGE_SIZE, length: PAGE_SIZE, flags: 0 },
    ]);
    assert.deepEqual(await dev.extents(12345, size - 12345, REQ.REQ_ONE), [
      { offset: 12345, length: size - PAGE_SIZE - 12345, flags: HOLE },
    ]);
    assert.deepEqual(await dev.extents(size - 100, 100, 0), [{ offset: size - 100, length: 100, flags: 0 }]);
    // Zeroing the whole device visits only the allocated page.
    await dev.zero(0, size, 0);
    assert.equal(dev.allocatedBytes, 0);
    assert.deepEqual(await dev.extents(0, size, 0), [{ offset: 0, length: size, flags: HOLE }]);
    await dev.close();
  });

  test('the largest size (2^53 - 1) works at its last byte', async () => {
    const size = Number.MAX_SAFE_INTEGER;
    const dev = new MemoryDevice({ size });
    await dev.write(Buffer.from([7]), size - 1, 0);
    assert.deepEqual(await readAt(dev, size - 1, 1), Buffer.from([7]));
    const ext = checkExtents(dev, await dev.extents(size - 2, 2, 0), size - 2);
    assert.equal(ext.reduce((n, e) => n + e.length, 0), 2);
    assert.equal(ext.at(-1)!.flags, 0);
  });

  test('writes straddling page boundaries allocate both pages and read back', async () => {
    const dev = new MemoryDevice({ size: SIZE });
    const data = Buffer.from(Array.from({ length: 3 * PAGE_SIZE + 200 }, (_v, i) => (i * 7) & 0xff));
    await dev.write(data, PAGE_SIZE - 100, 0);
    assert.deepEqual(await readAt(dev, PAGE_SIZE - 100, data.length), data);
    assert.equal(dev.allocatedBytes, 5 * PAGE_SIZE);
    // Allocated neighbours merge into one data extent; the partial tail page is a hole.
    assert.deepEqual(await dev.extents(0, SIZE, 0), [
      { offset: 0, length: 5 * PAGE_SIZE, flags: 0 },
      { offset: 5 * PAGE_SIZE, length: 12345, flags: HOLE },
    ]);
    // A read crossing from allocated into unallocated pages.
    const tail = await readAt(dev, 5 * PAGE_SIZE - 10, 20);
    assert.deepEqual(tail.subarray(10), Buffer.alloc(10));
  });

  test('zero() frees whole pages, zero-fills partial ones, frees pages that become all zero', async () => {
    const dev = new MemoryDevice({ size: SIZE });
    await dev.write(Buffer.alloc(4 * PAGE_SIZE, 0xee), 0, 0);
    assert.equal(dev.allocatedBytes, 4 * PAGE_SIZE);
    // [100, 2 * PAGE_SIZE + 100): page 1 whole; pages 0 and 2 partially.
    await dev.zero(100, 2 * PAGE_SIZE, 0);
    assert.equal(dev.allocatedBytes, 3 * PAGE_SIZE);
    assert.deepEqual(await dev.extents(0, 4 * PAGE_SIZE, 0), [
      { offset: 0, length: PAGE_SIZE, flags: 0 },
      { offset: PAGE_SIZE, length: PAGE_SIZE, flags: HOLE },
      { offset: 2 * PAGE_SIZE, length: 2 * PAGE_SIZE, flags: 0 },
    ]);
    assert.deepEqual(await readAt(dev, 0, 100), Buffer.alloc(100, 0xee));
    assert.deepEqual(await readAt(dev, 100, 2 * PAGE_SIZE), Buffer.alloc(2 * PAGE_SIZE));
    assert.deepEqual(await readAt(dev, 2 * PAGE_SIZE + 100, 10), Buffer.alloc(10, 0xee));
    // Zeroing the rest of page 0 in a partial zero makes it all zero: freed.
    await dev.zero(0, 100, 0);
    assert.equal(dev.allocatedBytes, 2 * PAGE_SIZE);
    assert.equal((await dev.extents(0, 1, 0))[0]!.flags, HOLE);
  });

  test('zero(NO_HOLE) reads back zeroes without allocating: a huge request claims no memory', async () => {
    const dev = new MemoryDevice({ size: SIZE });
    await dev.write(Buffer.alloc(PAGE_SIZE, 1), 0, 0);
    await dev.zero(0, 3 * PAGE_SIZE, REQ.NO_HOLE);
    assert.equal(dev.allocatedBytes, 0);
    assert.deepEqual(await readAt(dev, 0, 3 * PAGE_SIZE), Buffer.alloc(3 * PAGE_SIZE));
    const huge = new MemoryDevice({ size: 2 ** 50 });
    await huge.write(Buffer.alloc(10, 7), 2 ** 49, 0);
    await huge.zero(0, 2 ** 50, REQ.NO_HOLE);
    assert.equal(huge.allocatedBytes, 0);
  });

  test('trim() frees whole pages only and keeps partial pages', async () => {
    const dev = new MemoryDevice({ size: SIZE });
    await dev.write(Buffer.alloc(3 * PAGE_SIZE, 0x11), 0, 0);
    await dev.trim(100, 2 * PAGE_SIZE, 0);
    assert.equal(dev.allocatedBytes, 2 * PAGE_SIZE);
    assert.deepEqual(await readAt(dev, 0, 100), Buffer.alloc(100, 0x11));
    assert.deepEqual(await readAt(dev, PAGE_SIZE, PAGE_SIZE), Buffer.alloc(PAGE_SIZE));
    assert.deepEqual(await readAt(dev, 2 * PAGE_SIZE + 100, 100), Buffer.alloc(100, 0x11));
    await dev.trim(0, SIZE, 0);
    assert.equal(dev.allocatedBytes, 0);
  });

  test('extents stop after MAX_EXTENTS_PER_CALL and continue where they stopped', async () => {
    const dev = new MemoryDevice({ size: 2 ** 40 });
    // Every other page allocated: alternating data and hole extents.
    const pages = MAX_EXTENTS_PER_CALL / 2 + 1;
    for (let k = 0; k < pages; k++) await dev.write(Buffer.from([1]), 2 * k * PAGE_SIZE, 0);
    const first = checkExtents(dev, await dev.extents(0, dev.size, 0), 0);
    assert.equal(first.length, MAX_EXTENTS_PER_CALL);
    first.forEach((e, i) => assert.equal(e.flags, i % 2 === 0 ? 0 : HOLE));
    const next = first.at(-1)!.offset + first.at(-1)!.length;
    const rest = checkExtents(dev, await dev.extents(next, dev.size - next, 0), next);
    assert.deepEqual(rest, [
      { offset: next, length: PAGE_SIZE, flags: 0 },
      { offset: next + PAGE_SIZE, length: dev.size - next - PAGE_SIZE, flags: HOLE },
    ]);
  });

  test('extents of length 0 describe the page holding the offset', async () => {
    const dev = new MemoryDevice({ size: SIZE });
    assert.deepEqual(await dev.extents(10, 0, 0), [{ offset: 10, length: PAGE_SIZE - 10, flags: HOLE }]);
    assert.deepEqual(await dev.extents(SIZE - 5, 0, 0), [{ offset: SIZE - 5, length: 5, flags: HOLE }]);
    assert.deepEqual(await dev.extents(SIZE, 0, 0), []);
  });

  test('extents agree with the data and with allocation (property)', async () => {
    const size = 16 * PAGE_SIZE + 999;
    const op = fc.record({
      kind: fc.constantFrom('write', 'zero', 'zeroNoHole', 'trim'),
      start: fc.integer({ min: 0, max: size - 1 }),
      len: fc.integer({ min: 0, max: 5 * PAGE_SIZE }),
    });
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 20 }), async (ops) => {
        const dev = new MemoryDevice({ size });
        for (const o of ops) {
          const len = Math.min(o.len, size - o.start);
          if (o.kind === 'write') await dev.write(Buffer.alloc(len, 9), o.start, 0);
          else if (o.kind === 'trim') await dev.trim(o.start, len, 0);
          else await dev.zero(o.start, len, o.kind === 'zeroNoHole' ? REQ.NO_HOLE : 0);
        }
        const ext = checkExtents(dev, await dev.extents(0, size, 0), 0);
        assert.equal(ext.reduce((n, e) => n + e.length, 0), size, 'covers the device');
        let dataBytes = 0;
        for (let i = 0; i < ext.length; i++) {
          const e = ext[i]!;
          if (i > 0) assert.notEqual(e.flags, ext[i - 1]!.flags, 'adjacent extents are merged');
          if (e.flags & EXTENT.ZERO) assert.deepEqual(await readAt(dev, e.offset, e.length), Buffer.alloc(e.length));
          else dataBytes += e.length;
        }
        assert.ok(dataBytes <= dev.allocatedBytes && dev.allocatedBytes - dataBytes < PAGE_SIZE);
      }),
      { numRuns: 60 },
    );
  });

  test('settings are validated and name the bad key', () => {
    const bad = (desc: Record<string, unknown>, re: RegExp) =>
      assert.throws(
        () => memoryBackend({ type: 'memory', ...desc }),
        (e) => e instanceof BlockError && e.code === 'EINVAL' && re.test(e.message),
      );
    bad({ size: 'x' }, /^memory: size: .*'x'/);
    bad({}, /^memory: size: required/);
    bad({ size: -1 }, /^memory: size:/);
    bad({ size: '2^60' }, /^memory: size: .*too large/);
    bad({ size: '1G', readonly: 'yes' }, /^memory: readonly:/);
    bad({ size: '1G', sise: 1 }, /^memory: sise: unknown setting/);
    const dev = memoryBackend({ type: 'memory', size: '1G' });
    assert.equal(dev.size, 2 ** 30);
    assert.equal(dev.description, 'memory 1GiB');
    assert.equal(memoryBackend({ type: 'memory', size: 4096 }).size, 4096);
  });

  test('readonly setting: capabilities say so and data is untouched', async () => {
    const dev = memoryBackend({ type: 'memory', size: '1M', readonly: true });
    assert.equal(dev.capabilities.write, false);
    assert.equal(dev.capabilities.fua, false);
    assert.equal(dev.capabilities.extents, true);
    await assert.rejects(dev.write(Buffer.alloc(1), 0, 0), { code: 'EPERM' });
    assert.equal(dev.allocatedBytes, 0);
  });

  test('after close every call fails EBADF and memory is released', async () => {
    const dev = new MemoryDevice({ size: SIZE });
    await dev.write(Buffer.alloc(10, 1), 0, 0);
    await dev.close();
    assert.equal(dev.allocatedBytes, 0);
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
    await assert.rejects(dev.write(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
    await assert.rejects(dev.extents(0, 1, 0), { code: 'EBADF' });
  });
});

describe('memory: gather writes (writev)', () => {
  test('writev of pieces stores the same bytes as write of their concatenation', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.uint8Array({ minLength: 1, maxLength: 3 * PAGE_SIZE }), { minLength: 1, maxLength: 6 }),
        fc.integer({ min: 0, max: 4 * PAGE_SIZE }),
        async (pieces, offset) => {
          const a = new MemoryDevice({ size: 32 * PAGE_SIZE });
          const b = new MemoryDevice({ size: 32 * PAGE_SIZE });
          const bufs = pieces.map((p) => Buffer.from(p));
          await a.writev(bufs, offset, 0);
          await b.write(Buffer.concat(bufs), offset, 0);
          const ra = Buffer.alloc(32 * PAGE_SIZE);
          const rb = Buffer.alloc(32 * PAGE_SIZE);
          await a.read(ra, 0, 0);
          await b.read(rb, 0, 0);
          assert.ok(ra.equals(rb));
          assert.deepEqual(await a.extents(0, 32 * PAGE_SIZE, 0), await b.extents(0, 32 * PAGE_SIZE, 0));
        },
      ),
      { numRuns: 50 },
    );
  });

  test('writev on a read-only device is EPERM', async () => {
    const dev = new MemoryDevice({ size: PAGE_SIZE, readonly: true });
    await assert.rejects(dev.writev([Buffer.alloc(1)], 0, 0), { code: 'EPERM' });
  });
});

describe('memory: zero-copy reads (readViews)', () => {
  test('views hold the same bytes as read(), across pages and holes (property)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ offset: fc.nat(SIZE - 1), length: fc.integer({ min: 1, max: 3 * PAGE_SIZE }), seed: fc.nat(255) }), { maxLength: 8 }),
        fc.nat(SIZE - 1),
        fc.integer({ min: 0, max: 3 * PAGE_SIZE }),
        async (writes, offset, want) => {
          const dev = new MemoryDevice({ size: SIZE });
          for (const w of writes) {
            const len = Math.min(w.length, SIZE - w.offset);
            await dev.write(Buffer.alloc(len, w.seed), w.offset, 0);
          }
          const length = Math.min(want, SIZE - offset);
          const expected = Buffer.alloc(length);
          await dev.read(expected, offset, 0);
          const views = dev.readViews(offset, length);
          assert.ok(Buffer.concat(views).equals(expected));
          assert.equal(views.reduce((n, v) => n + v.length, 0), length);
        },
      ),
      { numRuns: 200 },
    );
  });

  test('views of a hole stay zeroes when the hole is written later (a write allocates, never writes through them)', async () => {
    const dev = new MemoryDevice({ size: SIZE });
    const views = dev.readViews(PAGE_SIZE - 100, 200);
    await dev.write(Buffer.alloc(200, 0xee), PAGE_SIZE - 100, 0);
    assert.ok(Buffer.concat(views).equals(Buffer.alloc(200)));
    assert.ok(Buffer.concat(dev.readViews(PAGE_SIZE - 100, 200)).equals(Buffer.alloc(200, 0xee)));
  });

  test('after close readViews fails EBADF like read', async () => {
    const dev = new MemoryDevice({ size: SIZE });
    await dev.close();
    assert.throws(() => dev.readViews(0, 10), (e: unknown) => e instanceof BlockError && e.code === 'EBADF');
  });
});
