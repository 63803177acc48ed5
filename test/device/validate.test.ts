import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { BlockError } from '../../src/errors/index.js';
import { FilterDevice } from '../../src/device/filter.js';
import { MAX_DEVICE_SIZE, type BlockSize } from '../../src/device/types.js';
import { checkAlignment, validateRequest, type Operation } from '../../src/device/validate.js';
import { MemoryDevice } from '../../src/backends/memory.js';

const SIZE = 1 << 20;
const dev = new MemoryDevice({ size: SIZE });
const ro = new MemoryDevice({ size: SIZE, readonly: true });
const OPS: Operation[] = ['read', 'write', 'trim', 'zero', 'extents', 'cache'];

const code = (c: string) => (e: unknown) => e instanceof BlockError && e.code === c;

describe('validateRequest', () => {
  test('accepts every operation inside the device, up to the last byte and empty at the end', () => {
    for (const op of OPS) {
      validateRequest(dev, op, 0, SIZE);
      validateRequest(dev, op, SIZE - 1, 1);
      validateRequest(dev, op, SIZE, 0);
      validateRequest(dev, op, 0, 0);
    }
  });

  test('past the end: ENOSPC for write and zero, EINVAL for the others', () => {
    for (const op of OPS) {
      const expected = op === 'write' || op === 'zero' ? 'ENOSPC' : 'EINVAL';
      assert.throws(() => validateRequest(dev, op, SIZE - 1, 2), code(expected), op);
      assert.throws(() => validateRequest(dev, op, SIZE + 1, 0), code(expected), op);
      assert.throws(() => validateRequest(dev, op, 0, SIZE + 1), code(expected), op);
    }
  });

  test('read-only devices: write, trim and zero are EPERM; reads are fine', () => {
    for (const op of ['write', 'trim', 'zero'] as const) {
      assert.throws(() => validateRequest(ro, op, 0, 1), code('EPERM'), op);
      // The read-only answer wins over the range answer.
      assert.throws(() => validateRequest(ro, op, SIZE, 10), code('EPERM'), op);
    }
    for (const op of ['read', 'extents', 'cache'] as const) validateRequest(ro, op, 0, SIZE);
  });

  test('negative, fractional, NaN and unsafe offsets or lengths are EINVAL', () => {
    const bad = [-1, 0.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 53, -0.1];
    for (const op of OPS) {
      for (const b of bad) {
        assert.throws(() => validateRequest(dev, op, b, 1), code('EINVAL'), `${op} offset ${b}`);
        assert.throws(() => validateRequest(dev, op, 0, b), code('EINVAL'), `${op} length ${b}`);
      }
    }
  });

  test('ranges beyond 2^53 - 1 are rejected even on the largest device', () => {
    const huge = new MemoryDevice({ size: MAX_DEVICE_SIZE });
    validateRequest(huge, 'read', MAX_DEVICE_SIZE - 1, 1);
    assert.throws(() => validateRequest(huge, 'read', MAX_DEVICE_SIZE, 1), code('EINVAL'));
    assert.throws(() => validateRequest(huge, 'write', MAX_DEVICE_SIZE - 5, 10), code('ENOSPC'));
  });

  test('accepts exactly the ranges inside the device (property)', () => {
    fc.assert(
      fc.property(fc.constantFrom(...OPS), fc.nat({ max: 2 * SIZE }), fc.nat({ max: 2 * SIZE }), (op, offset, length) => {
        const inside = offset + length <= SIZE;
        if (inside) validateRequest(dev, op, offset, length);
        else assert.throws(() => validateRequest(dev, op, offset, length), code(op === 'write' || op === 'zero' ? 'ENOSPC' : 'EINVAL'));
      }),
    );
  });
});

/** A device that demands 512-byte alignment. */
class Aligned512 extends FilterDevice {
  override get blockSize(): BlockSize {
    return { minimum: 512, preferred: 4096, maximum: 2 ** 20 };
  }
}

describe('checkAlignment', () => {
  test('a minimum block size of 1 accepts anything', () => {
    checkAlignment(dev, 'read', 1, 3);
    checkAlignment(dev, 'write', 12345, 0);
  });

  test('offset and length must be multiples of the minimum', () => {
    const aligned = new Aligned512(dev);
    checkAlignment(aligned, 'read', 0, 512);
    checkAlignment(aligned, 'write', 1024, 4096);
    checkAlignment(aligned, 'zero', 512, 0);
    assert.throws(() => checkAlignment(aligned, 'read', 1, 512), code('EINVAL'));
    assert.throws(() => checkAlignment(aligned, 'write', 512, 100), code('EINVAL'));
    assert.throws(() => checkAlignment(aligned, 'trim', 256, 256), { message: /multiples of 512/ });
  });
});
