import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { EXTENT, REQ } from '../../src/device/types.js';
import { NullDevice, nullBackend } from '../../src/backends/null.js';
import { runContract } from './contract.js';

const SIZE = 2 ** 20 + 3;
const noCleanup = async () => undefined;

runContract('null', async () => ({ dev: new NullDevice({ size: SIZE }), cleanup: noCleanup }), {
  initial: (_o, n) => Buffer.alloc(n),
  stores: false,
});
runContract('null (readonly setting)', async () => ({ dev: nullBackend({ type: 'null', size: SIZE, readonly: true }), cleanup: noCleanup }), {
  initial: (_o, n) => Buffer.alloc(n),
  stores: false,
});

describe('null backend', () => {
  test('writes are discarded: reads return zeroes', async () => {
    const dev = new NullDevice({ size: SIZE });
    await dev.write(Buffer.alloc(4096, 0xff), 0, REQ.FUA);
    const buf = Buffer.alloc(4096, 0xff);
    await dev.read(buf, 0, 0);
    assert.deepEqual(buf, Buffer.alloc(4096));
  });

  test('the whole device is one hole that reads as zeroes', async () => {
    const dev = new NullDevice({ size: 2 ** 50 });
    assert.deepEqual(await dev.extents(0, 2 ** 50, 0), [{ offset: 0, length: 2 ** 50, flags: EXTENT.HOLE | EXTENT.ZERO }]);
    assert.deepEqual(await dev.extents(2 ** 49, 10, REQ.REQ_ONE), [
      { offset: 2 ** 49, length: 10, flags: EXTENT.HOLE | EXTENT.ZERO },
    ]);
    assert.equal(dev.nonBlocking, true);
  });

  test('size defaults to 0 (as nbdkit) and is validated', async () => {
    const empty = nullBackend({ type: 'null' });
    assert.equal(empty.size, 0);
    assert.deepEqual(await empty.extents(0, 0, 0), []);
    await empty.read(Buffer.alloc(0), 0, 0);
    assert.equal(nullBackend({ type: 'null', size: '1T' }).size, 2 ** 40);
    assert.throws(() => nullBackend({ type: 'null', size: '1Q' }), { code: 'EINVAL', message: /^null: size:/ });
    assert.throws(() => nullBackend({ type: 'null', path: '/x' }), { code: 'EINVAL', message: /^null: path: unknown setting/ });
  });

  test('after close calls fail EBADF', async () => {
    const dev = new NullDevice({ size: SIZE });
    await dev.close();
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
    await assert.rejects(dev.write(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
  });
});
