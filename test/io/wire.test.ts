import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { readU64, readU64Exact, writeU64, writeU64Exact, writeU64Halves } from '../../src/io/wire.js';

test('a safe integer round-trips through writeU64 and both readers', () => {
  fc.assert(
    fc.property(fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }), (n) => {
      const b = Buffer.alloc(8);
      writeU64(b, n, 0);
      assert.equal(readU64(b, 0), n);
      assert.equal(readU64Exact(b, 0), n);
      assert.equal(b.readBigUInt64BE(0), BigInt(n));
    }),
  );
});

test('a u64 above 2^53 - 1 is read exactly as a bigint and echoed bit for bit from its halves', () => {
  for (const v of [2n ** 53n, 2n ** 53n + 1n, 2n ** 63n, 2n ** 64n - 1n]) {
    const b = Buffer.alloc(8);
    writeU64Exact(b, v, 0);
    assert.equal(readU64Exact(b, 0), v);
    const echo = Buffer.alloc(8);
    writeU64Halves(echo, b.readUInt32BE(0), b.readUInt32BE(4), 0);
    assert.deepEqual(echo, b);
  }
});

test('writeU64Exact refuses what is not a u64', () => {
  const b = Buffer.alloc(8);
  assert.throws(() => writeU64Exact(b, -1, 0), RangeError);
  assert.throws(() => writeU64Exact(b, 2 ** 53, 0), RangeError);
  assert.throws(() => writeU64Exact(b, 2n ** 64n, 0), RangeError);
});
