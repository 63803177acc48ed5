import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { REQ } from '../../src/device/types.js';
import { validateRequest } from '../../src/device/validate.js';
import { FilterDevice } from '../../src/device/filter.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import { ReadonlyFilter, readonlyFilter } from '../../src/filters/readonly.js';
import { runContract } from '../backends/contract.js';

const SIZE = 2 ** 20 + 77;

/** A memory device holding 0x42 in its first 64 KiB, under the readonly filter. */
async function makeFiltered(): Promise<{ dev: ReadonlyFilter; below: MemoryDevice }> {
  const below = new MemoryDevice({ size: SIZE });
  await below.write(Buffer.alloc(65536, 0x42), 0, 0);
  return { dev: new ReadonlyFilter(below), below };
}

runContract(
  'readonly filter over memory',
  async () => ({ dev: (await makeFiltered()).dev, cleanup: async () => undefined }),
  { initial: (o, n) => Buffer.alloc(SIZE).fill(0x42, 0, 65536).subarray(o, o + n) },
);

describe('readonly filter', () => {
  test('masks the write capabilities and keeps the rest', async () => {
    const { dev, below } = await makeFiltered();
    assert.deepEqual(dev.capabilities, { ...below.capabilities, write: false, trim: false, zero: false, fua: false, fastZero: false });
    assert.equal(dev.size, below.size);
    assert.deepEqual(dev.blockSize, below.blockSize);
    assert.equal(dev.nonBlocking, true);
    assert.equal(dev.description, 'memory 1048653B (read-only)');
  });

  test('write, trim and zero fail EPERM without reaching the device; the edge agrees', async () => {
    const { dev, below } = await makeFiltered();
    await assert.rejects(dev.write(Buffer.alloc(10), 0, REQ.FUA), { code: 'EPERM' });
    await assert.rejects(dev.trim(0, 65536, 0), { code: 'EPERM' });
    await assert.rejects(dev.zero(0, 65536, REQ.NO_HOLE), { code: 'EPERM' });
    const buf = Buffer.alloc(65536);
    await below.read(buf, 0, 0);
    assert.deepEqual(buf, Buffer.alloc(65536, 0x42));
    assert.equal(below.allocatedBytes, 65536);
    assert.throws(() => validateRequest(dev, 'write', 0, 1), { code: 'EPERM' });
    validateRequest(dev, 'read', 0, 1);
  });

  test('reads, extents, flush and cache pass through; close closes the device below', async () => {
    const { dev, below } = await makeFiltered();
    const buf = Buffer.alloc(10);
    await dev.read(buf, 65530, 0);
    assert.deepEqual(buf, Buffer.from([0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0, 0, 0, 0]));
    assert.deepEqual(await dev.extents(0, SIZE, 0), await below.extents(0, SIZE, 0));
    await dev.flush(0);
    await dev.cache(0, 100, 0);
    await dev.close();
    await assert.rejects(below.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
  });

  test('zero-copy reads pass through when the device below has them, and only then', async () => {
    const { dev } = await makeFiltered();
    assert.ok(dev.readViews, 'memory below: readViews forwarded');
    assert.deepEqual(Buffer.concat(dev.readViews(65530, 10)), Buffer.from([0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0, 0, 0, 0]));
    const overFilter = new ReadonlyFilter(new ReadonlyFilter(new MemoryDevice({ size: SIZE })));
    assert.ok(overFilter.readViews, 'forwarded through two readonly filters');
    const noViews = new ReadonlyFilter(new FilterDevice(new MemoryDevice({ size: SIZE })));
    assert.equal(noViews.readViews, undefined, 'a filter below that does not offer them hides them');
  });

  test('the factory takes no settings', () => {
    const below = new MemoryDevice({ size: SIZE });
    assert.ok(readonlyFilter(below, { type: 'readonly' }) instanceof ReadonlyFilter);
    assert.throws(() => readonlyFilter(below, { type: 'readonly', size: 1 }), {
      code: 'EINVAL',
      message: /^readonly: size: unknown setting/,
    });
  });
});
