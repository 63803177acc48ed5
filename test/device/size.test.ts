import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { formatSize, parseSize } from '../../src/device/size.js';
import { MAX_DEVICE_SIZE } from '../../src/device/types.js';

describe('parseSize', () => {
  test('plain numbers and suffixes (binary units, optional iB/B, any case)', () => {
    const cases: [string | number, number][] = [
      [0, 0],
      [4096, 4096],
      ['512', 512],
      ['512b', 512],
      ['4k', 4096],
      ['4K', 4096],
      ['4KiB', 4096],
      ['4kb', 4096],
      ['1M', 2 ** 20],
      ['1MiB', 2 ** 20],
      ['4G', 4 * 2 ** 30],
      ['2T', 2 * 2 ** 40],
      ['1P', 2 ** 50],
      ['7P', 7 * 2 ** 50],
      [' 16 M ', 16 * 2 ** 20],
      ['2^50', 2 ** 50],
      ['2^0', 1],
    ];
    for (const [text, n] of cases) assert.equal(parseSize(text), n, String(text));
  });

  test('rejects nonsense, negatives, fractions and sizes above 2^53 - 1 with EINVAL', () => {
    for (const bad of ['', 'x', '1Q', '-1', '1.5G', 'G', '1 G B', '2^53', '2^60', '8P', '1E', '9007199254740992']) {
      assert.throws(() => parseSize(bad), { code: 'EINVAL' }, bad);
    }
    for (const bad of [-1, 1.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 53]) {
      assert.throws(() => parseSize(bad), { code: 'EINVAL' }, String(bad));
    }
    assert.equal(parseSize(MAX_DEVICE_SIZE), MAX_DEVICE_SIZE);
    assert.equal(parseSize(String(MAX_DEVICE_SIZE)), MAX_DEVICE_SIZE);
  });
});

describe('formatSize', () => {
  test('uses the largest exact binary unit', () => {
    assert.equal(formatSize(0), '0B');
    assert.equal(formatSize(1000), '1000B');
    assert.equal(formatSize(1024), '1KiB');
    assert.equal(formatSize(1536), '1536B');
    assert.equal(formatSize(3 * 2 ** 20), '3MiB');
    assert.equal(formatSize(2 ** 30), '1GiB');
    assert.equal(formatSize(1025 * 2 ** 30), '1025GiB');
    assert.equal(formatSize(2 ** 50), '1PiB');
    assert.equal(formatSize(MAX_DEVICE_SIZE), `${MAX_DEVICE_SIZE}B`);
  });

  test('parseSize reads back what formatSize writes (property)', () => {
    fc.assert(
      fc.property(
        fc.oneof(fc.nat({ max: MAX_DEVICE_SIZE }), fc.nat({ max: 2 ** 23 - 1 }).map((k) => k * 2 ** 30)),
        (n) => assert.equal(parseSize(formatSize(n)), n),
      ),
    );
  });
});
