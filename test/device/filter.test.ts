import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockError } from '../../src/errors/index.js';
import { FilterDevice } from '../../src/device/filter.js';
import { REQ, type BlockDevice, type BlockSize, type Capabilities, type Extent } from '../../src/device/types.js';

/** A fake device that records every call with its arguments and returns marked values. */
class RecordingDevice implements BlockDevice {
  calls: [string, ...unknown[]][] = [];
  size = 12345;
  capabilities: Capabilities = {
    write: true,
    flush: false,
    fua: true,
    trim: false,
    zero: true,
    fastZero: false,
    extents: true,
    cache: false,
    multiConn: true,
  };
  blockSize: BlockSize = { minimum: 512, preferred: 4096, maximum: 65536 };
  nonBlocking = false;
  description = 'recorder';
  async read(buf: Buffer, offset: number, flags: number): Promise<void> {
    this.calls.push(['read', buf, offset, flags]);
    buf.fill(7);
  }
  async write(data: Buffer, offset: number, flags: number): Promise<void> {
    this.calls.push(['write', data, offset, flags]);
  }
  async flush(flags: number): Promise<void> {
    this.calls.push(['flush', flags]);
  }
  async trim(offset: number, length: number, flags: number): Promise<void> {
    this.calls.push(['trim', offset, length, flags]);
  }
  async zero(offset: number, length: number, flags: number): Promise<void> {
    this.calls.push(['zero', offset, length, flags]);
    throw new BlockError('ENOSPC', 'full');
  }
  async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    this.calls.push(['extents', offset, length, flags]);
    return [{ offset, length, flags: 3 }];
  }
  async cache(offset: number, length: number, flags: number): Promise<void> {
    this.calls.push(['cache', offset, length, flags]);
  }
  async close(): Promise<void> {
    this.calls.push(['close']);
  }
}

describe('FilterDevice', () => {
  test('passes every property through, live', () => {
    const next = new RecordingDevice();
    const f = new FilterDevice(next);
    assert.equal(f.next, next);
    assert.equal(f.size, 12345);
    assert.equal(f.capabilities, next.capabilities);
    assert.equal(f.blockSize, next.blockSize);
    assert.equal(f.nonBlocking, false);
    assert.equal(f.description, 'recorder');
    next.size = 99; // a resized device below is seen at once
    assert.equal(f.size, 99);
  });

  test('passes every call through with the same arguments, results and errors', async () => {
    const next = new RecordingDevice();
    const f = new FilterDevice(next);
    const buf = Buffer.alloc(4);
    await f.read(buf, 512, 0);
    assert.deepEqual(buf, Buffer.alloc(4, 7));
    const data = Buffer.from('abcd');
    await f.write(data, 1024, REQ.FUA);
    await f.flush(0);
    await f.trim(1, 2, 0);
    await assert.rejects(f.zero(3, 4, REQ.NO_HOLE | REQ.FAST_ZERO), { code: 'ENOSPC' });
    assert.deepEqual(await f.extents(5, 6, REQ.REQ_ONE), [{ offset: 5, length: 6, flags: 3 }]);
    await f.cache(7, 8, 0);
    await f.close();
    assert.deepEqual(next.calls, [
      ['read', buf, 512, 0],
      ['write', data, 1024, REQ.FUA],
      ['flush', 0],
      ['trim', 1, 2, 0],
      ['zero', 3, 4, REQ.NO_HOLE | REQ.FAST_ZERO],
      ['extents', 5, 6, REQ.REQ_ONE],
      ['cache', 7, 8, 0],
      ['close'],
    ]);
    assert.equal(next.calls[0]![1], buf, 'the caller buffer itself, not a copy');
    assert.equal(next.calls[1]![1], data);
  });

  test('filters stack: a subclass changes only what it overrides', async () => {
    class Shift extends FilterDevice {
      override read(buf: Buffer, offset: number, flags: number): Promise<void> {
        return this.next.read(buf, offset + 100, flags);
      }
    }
    const next = new RecordingDevice();
    const top = new FilterDevice(new Shift(new FilterDevice(next)));
    await top.read(Buffer.alloc(1), 1, 0);
    await top.write(Buffer.alloc(1), 1, 0);
    assert.deepEqual(
      next.calls.map((c) => [c[0], c[2]]),
      [
        ['read', 101],
        ['write', 1],
      ],
    );
  });
});
