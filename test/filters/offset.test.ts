/**
 * The offset filter over memory: the backend contract over a window of a device, every
 * request shifted, extents shifted back and clipped, the size, and the errors.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { EXTENT, REQ, type BlockSize } from '../../src/device/types.js';
import { FilterDevice } from '../../src/device/filter.js';
import { MemoryDevice, PAGE_SIZE } from '../../src/backends/memory.js';
import { OffsetFilter, offsetFilter, shiftExtents } from '../../src/filters/offset.js';
import { runContract } from '../backends/contract.js';
import { RecordingDevice } from './recording.js';

const OFFSET = 100_003;
const RANGE = 2 ** 20 + 77;
const BELOW = OFFSET + RANGE + 5000;

/** The device below: each byte is its own offset mod 251 (so a shift shows). */
function belowContents(): Buffer {
  const b = Buffer.alloc(BELOW);
  for (let i = 0; i < BELOW; i++) b[i] = i % 251;
  return b;
}

async function makeBelow(): Promise<MemoryDevice> {
  const m = new MemoryDevice({ size: BELOW });
  await m.write(belowContents(), 0, 0);
  return m;
}

async function readAt(dev: { read(b: Buffer, o: number, f: number): Promise<void> }, offset: number, length: number) {
  const buf = Buffer.alloc(length, 0xa5);
  await dev.read(buf, offset, 0);
  return buf;
}

runContract(
  'offset filter over memory',
  async () => ({ dev: new OffsetFilter(await makeBelow(), { offset: OFFSET, range: RANGE }), cleanup: async () => undefined }),
  { initial: (o, n) => belowContents().subarray(OFFSET + o, OFFSET + o + n) },
);

runContract(
  'offset filter over memory, range to the end',
  async () => ({ dev: new OffsetFilter(await makeBelow(), { offset: OFFSET }), cleanup: async () => undefined }),
  { initial: (o, n) => belowContents().subarray(OFFSET + o, OFFSET + o + n) },
);

describe('offset filter', () => {
  test('size is the range, or the rest of the device; description says where', async () => {
    const below = await makeBelow();
    assert.equal(new OffsetFilter(below, { offset: OFFSET, range: RANGE }).size, RANGE);
    assert.equal(new OffsetFilter(below, { offset: OFFSET }).size, BELOW - OFFSET);
    assert.equal(new OffsetFilter(below, {}).size, BELOW);
    assert.equal(new OffsetFilter(below, { offset: BELOW }).size, 0);
    assert.equal(new OffsetFilter(below, { offset: 1024, range: 2048 }).description, `memory ${BELOW}B (offset 1KiB, range 2KiB)`);
  });

  test('every request is shifted by the offset, lengths and flags unchanged', async () => {
    const rec = new RecordingDevice(await makeBelow());
    const dev = new OffsetFilter(rec, { offset: OFFSET, range: RANGE });
    await dev.read(Buffer.alloc(10), 5, 0);
    await dev.write(Buffer.alloc(20, 1), 6, REQ.FUA);
    await dev.zero(7, 30, REQ.NO_HOLE);
    await dev.trim(8, 40, 0);
    await dev.flush(0);
    assert.deepEqual(
      rec.calls.map((c) => [c.op, c.offset, c.length, c.flags]),
      [
        ['read', OFFSET + 5, 10, 0],
        ['write', OFFSET + 6, 20, REQ.FUA],
        ['zero', OFFSET + 7, 30, REQ.NO_HOLE],
        ['trim', OFFSET + 8, 40, 0],
        ['flush', 0, 0, 0],
      ],
    );
  });

  test('reads see the slice; writes land at offset + position in the device below', async () => {
    const below = await makeBelow();
    const dev = new OffsetFilter(below, { offset: OFFSET, range: RANGE });
    assert.deepEqual(await readAt(dev, 0, 1000), belowContents().subarray(OFFSET, OFFSET + 1000));
    assert.deepEqual(await readAt(dev, RANGE - 1, 1), belowContents().subarray(OFFSET + RANGE - 1, OFFSET + RANGE));
    const data = randomBytes(3000);
    await dev.write(data, RANGE - 3000, 0);
    const expected = belowContents();
    data.copy(expected, OFFSET + RANGE - 3000);
    assert.deepEqual(await readAt(below, 0, BELOW), expected, 'only the window changed');
  });

  test('extents are shifted back and clipped to the window', async () => {
    const below = new MemoryDevice({ size: 64 * PAGE_SIZE });
    await below.write(Buffer.alloc(10, 1), 3 * PAGE_SIZE + 5, 0); // page 3 is data, the rest holes
    const dev = new OffsetFilter(below, { offset: 2 * PAGE_SIZE + 100, range: 2 * PAGE_SIZE });
    const Z = EXTENT.HOLE | EXTENT.ZERO;
    assert.deepEqual(await dev.extents(0, dev.size, 0), [
      { offset: 0, length: PAGE_SIZE - 100, flags: Z },
      { offset: PAGE_SIZE - 100, length: PAGE_SIZE, flags: 0 },
      { offset: 2 * PAGE_SIZE - 100, length: 100, flags: Z },
    ]);
    assert.deepEqual(await dev.extents(PAGE_SIZE, PAGE_SIZE, REQ.REQ_ONE), [{ offset: PAGE_SIZE, length: PAGE_SIZE - 100, flags: 0 }]);
    // Length 0 means "to the end" of this device, never past it.
    assert.deepEqual((await dev.extents(2 * PAGE_SIZE - 10, 0, 0)).at(-1), { offset: 2 * PAGE_SIZE - 10, length: 10, flags: Z });
    assert.deepEqual(await dev.extents(dev.size, 0, 0), []);
    assert.deepEqual(shiftExtents([{ offset: 10, length: 100, flags: 0 }], 50, 30), [{ offset: 0, length: 30, flags: 0 }]);
  });

  test('zero-copy reads pass through shifted when the device below has them', async () => {
    const dev = new OffsetFilter(await makeBelow(), { offset: OFFSET, range: RANGE });
    assert.ok(dev.readViews);
    assert.deepEqual(Buffer.concat(dev.readViews(10, 500)), belowContents().subarray(OFFSET + 10, OFFSET + 510));
    assert.equal(new OffsetFilter(new FilterDevice(await makeBelow()), { offset: 1 }).readViews, undefined);
  });

  test('a window past the end of the device, or an offset off its block alignment, is refused', async () => {
    const below = await makeBelow();
    assert.throws(() => new OffsetFilter(below, { offset: BELOW + 1 }), { code: 'EINVAL', message: new RegExp(`offset ${BELOW + 1} is past the end of memory`) });
    assert.throws(() => new OffsetFilter(below, { offset: OFFSET, range: BELOW }), { code: 'EINVAL', message: new RegExp(`offset 100003 \\+ range ${BELOW} is past the end`) });
    class Aligned extends FilterDevice {
      override get blockSize(): BlockSize {
        return { minimum: 4096, preferred: 4096, maximum: 2 ** 25 };
      }
    }
    assert.throws(() => new OffsetFilter(new Aligned(below), { offset: 512 }), { code: 'EINVAL', message: /not a multiple of the minimum block size 4096/ });
    assert.equal(new OffsetFilter(new Aligned(below), { offset: 8192 }).blockSize.minimum, 4096);
  });

  test('the factory: sizes with suffixes, bad keys and values named', async () => {
    const below = new MemoryDevice({ size: 2 ** 30 });
    const dev = offsetFilter(below, { type: 'offset', offset: '1M', range: '100M' });
    assert.equal(dev.offset, 2 ** 20);
    assert.equal(dev.size, 100 * 2 ** 20);
    assert.equal(offsetFilter(below, { type: 'offset' }).size, 2 ** 30);
    assert.throws(() => offsetFilter(below, { type: 'offset', offset: 'x' }), { code: 'EINVAL', message: /^offset: offset: invalid size: 'x'/ });
    assert.throws(() => offsetFilter(below, { type: 'offset', length: 5 }), { code: 'EINVAL', message: /^offset: length: unknown setting/ });
    assert.throws(() => offsetFilter(below, { type: 'offset', offset: '1G', range: 1 }), { code: 'EINVAL', message: /^offset: offset 1073741824 \+ range 1 is past the end/ });
  });
});
