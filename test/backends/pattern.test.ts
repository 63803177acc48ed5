import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { PatternDevice, fillPattern, patternBackend, patternByte } from '../../src/backends/pattern.js';
import { runContract } from './contract.js';

const SIZE = 2 ** 20 + 5;
const noCleanup = async () => undefined;

/** The pattern computed the slow, obvious way: BigInt, big-endian. */
function expectedPattern(offset: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  for (let i = 0; i < length; i++) {
    const o = offset + i;
    const word = BigInt(o - (o % 8));
    const word8 = Buffer.alloc(8);
    word8.writeBigUInt64BE(word);
    buf[i] = word8[o % 8]!;
  }
  return buf;
}

runContract('pattern', async () => ({ dev: new PatternDevice({ size: SIZE }), cleanup: noCleanup }), {
  initial: expectedPattern,
});

describe('pattern backend', () => {
  test('known bytes at known offsets', () => {
    assert.deepEqual(
      [0, 1, 7, 8, 15, 16, 23].map((o) => patternByte(o)),
      [0, 0, 0, 0, 8, 0, 16],
    );
    const words = Buffer.alloc(24);
    fillPattern(words, 0x1000);
    assert.equal(words.toString('hex'), '0000000000001000' + '0000000000001008' + '0000000000001010');
    const high = Buffer.alloc(8);
    fillPattern(high, 2 ** 40 + 0x0102030 * 8);
    assert.equal(high.toString('hex'), '0000010000810180');
    const top = Buffer.alloc(8);
    fillPattern(top, Number.MAX_SAFE_INTEGER - 7);
    assert.equal(top.toString('hex'), '001ffffffffffff8');
    // Unaligned start and end.
    const odd = Buffer.alloc(5);
    fillPattern(odd, 0x0abc_def0_1238 + 5);
    assert.equal(odd.toString('hex'), 'f012380000');
  });

  test('fillPattern and patternByte agree with the BigInt definition (property)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER - 100 }), fc.integer({ min: 0, max: 100 }), (offset, len) => {
        const buf = Buffer.alloc(len);
        fillPattern(buf, offset);
        const exp = expectedPattern(offset, len);
        assert.deepEqual(buf, exp);
        for (let i = 0; i < len; i++) assert.equal(patternByte(offset + i), exp[i]);
      }),
    );
  });

  test('reads at any offset are verifiable; writes fail EPERM; one data extent', async () => {
    const dev = patternBackend({ type: 'pattern', size: '1P' });
    assert.equal(dev.size, 2 ** 50);
    assert.equal(dev.capabilities.write, false);
    const buf = Buffer.alloc(4099);
    await dev.read(buf, 2 ** 50 - 4099, 0);
    assert.deepEqual(buf, expectedPattern(2 ** 50 - 4099, 4099));
    await assert.rejects(dev.write(Buffer.alloc(8), 0, 0), { code: 'EPERM' });
    assert.deepEqual(await dev.extents(8, 2 ** 50 - 8, 0), [{ offset: 8, length: 2 ** 50 - 8, flags: 0 }]);
  });

  test('settings are validated', () => {
    assert.throws(() => patternBackend({ type: 'pattern' }), { code: 'EINVAL', message: /^pattern: size: required/ });
    assert.throws(() => patternBackend({ type: 'pattern', size: '1G', readonly: false }), {
      code: 'EINVAL',
      message: /^pattern: readonly: unknown setting/,
    });
  });

  test('after close calls fail EBADF', async () => {
    const dev = new PatternDevice({ size: SIZE });
    await dev.close();
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
    await assert.rejects(dev.write(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
  });
});
