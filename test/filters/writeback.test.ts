import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { EXTENT, REQ } from '../../src/device/types.js';
import { newStackContext, type StackContext } from '../../src/device/stack.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import { NullDevice } from '../../src/backends/null.js';
import { ERRSEQ } from '../../src/errseq/index.js';
import { ErrorFilter } from '../../src/filters/error.js';
import {
  DEFAULT_MAX_DIRTY,
  ENTRY_OVERHEAD,
  MAX_COALESCE_SIZE,
  REQ_WRITEBACK,
  WritebackFilter,
  writebackFilter,
  type WritebackOptions,
} from '../../src/filters/writeback.js';
import { createStack } from '../../src/export/registry.js';
import { runContract } from '../backends/contract.js';
import { RecordingDevice, settle, track } from './recording.js';

const SIZE = 4 * 2 ** 20;

function make(options: WritebackOptions = {}, below = new RecordingDevice(new MemoryDevice({ size: SIZE }))) {
  const ctx = newStackContext();
  const dev = new WritebackFilter(below, ctx, options);
  return { dev, below, ctx };
}

async function readAt(dev: { read(b: Buffer, o: number, f: number): Promise<void> }, offset: number, length: number) {
  const buf = Buffer.alloc(length, 0xa5);
  await dev.read(buf, offset, 0);
  return buf;
}

/** A failing layer under the cache: an error filter on write-back requests only, toggled by `on`. */
function failingBelow(count?: number) {
  const mem = new MemoryDevice({ size: SIZE });
  const errors = new ErrorFilter(mem, { ops: ['writeback'], ...(count !== undefined ? { count } : {}) });
  const rec = new RecordingDevice(errors);
  return { mem, errors, rec };
}

runContract('writeback over memory', async () => ({ dev: make().dev, cleanup: async () => undefined }), {
  initial: (_o, n) => Buffer.alloc(n),
});

runContract(
  'writeback (tiny maxDirty, keep) over memory',
  async () => ({ dev: make({ maxDirty: 4096, onError: 'keep' }).dev, cleanup: async () => undefined }),
  { initial: (_o, n) => Buffer.alloc(n) },
);

describe('writeback filter', () => {
  test('capabilities: flush and FUA always, multi-conn (one cache serves every connection)', () => {
    const { dev, below } = make();
    assert.deepEqual(dev.capabilities, { ...below.capabilities, flush: true, fua: true, multiConn: true });
    assert.equal(dev.nonBlocking, false);
    assert.match(dev.description, /\(write-back\)$/);
    assert.equal(REQ_WRITEBACK & (REQ.FUA | REQ.NO_HOLE | REQ.REQ_ONE | REQ.FAST_ZERO), 0);
  });

  test('a write is acknowledged from memory and read back before it reaches the layer below', async () => {
    const { dev, below } = make();
    below.hold();
    const data = randomBytes(10000);
    await dev.write(data, 5000, 0);
    assert.deepEqual(await readAt(dev, 5000, 10000), data);
    assert.deepEqual(await readAt(below.next, 5000, 10000), Buffer.alloc(10000), 'not yet below');
    assert.equal(dev.dirtyRequests, 1);
    below.release();
    await dev.flush(0);
    assert.deepEqual(await readAt(below.next, 5000, 10000), data);
    assert.equal(dev.dirtyBytes, 0);
    const [w] = below.of('write');
    assert.equal(w!.flags & REQ_WRITEBACK, REQ_WRITEBACK, 'write-back requests carry REQ_WRITEBACK');
  });

  test('write-back happens in acknowledgement order; the newest data wins below', async () => {
    const { dev, below } = make();
    below.hold();
    await dev.write(Buffer.alloc(8192, 1), 0, 0);
    await dev.write(Buffer.alloc(4096, 2), 2048, 0);
    await dev.zero(3000, 100, 0);
    await dev.write(Buffer.alloc(10, 3), 100000, 0);
    await dev.write(Buffer.alloc(100, 4), 3050, 0);
    const expected = Buffer.alloc(8192, 1);
    expected.fill(2, 2048, 6144);
    expected.fill(0, 3000, 3100);
    expected.fill(4, 3050, 3150);
    assert.deepEqual(await readAt(dev, 0, 8192), expected, 'reads overlay the dirty ranges in order');
    below.release();
    await dev.flush(0);
    const ops = below.calls.filter((c) => c.op !== 'read').map((c) => `${c.op}@${c.offset}+${c.length}`);
    assert.deepEqual(ops, ['write@0+8192', 'write@2048+4096', 'zero@3000+100', 'write@100000+10', 'write@3050+100', 'flush@0+0']);
    assert.deepEqual(await readAt(below.next, 0, 8192), expected);
  });

  test('adjacent writes queued together are joined into one write below', async () => {
    const { dev, below } = make();
    below.hold();
    await dev.write(Buffer.alloc(4096, 9), 1 << 20, 0); // starts write-back, held
    await settle();
    assert.equal(below.heldCount, 1);
    const parts = [0, 1, 2, 3].map((i) => Buffer.alloc(4096, i + 1));
    for (const [i, p] of parts.entries()) await dev.write(p, i * 4096, 0);
    await dev.write(Buffer.alloc(10, 7), 20000, 0); // not adjacent: its own write
    await dev.zero(30000, 100, 0);
    await dev.zero(30100, 100, 0); // adjacent zeroes join too
    below.release();
    await dev.flush(0);
    const calls = below.calls.filter((c) => c.op === 'write' || c.op === 'zero');
    assert.deepEqual(
      calls.map((c) => `${c.op}@${c.offset}+${c.length}`),
      ['write@1048576+4096', 'write@0+16384', 'write@20000+10', 'zero@30000+200'],
    );
    assert.deepEqual(calls[1]!.data, Buffer.concat(parts));
    assert.equal(dev.writebackCount, 4);
  });

  test('joining stops at MAX_COALESCE_SIZE', async () => {
    const { dev, below } = make();
    below.hold();
    await dev.write(Buffer.alloc(1), SIZE - 1, 0);
    await settle();
    const chunk = 256 * 1024;
    const n = MAX_COALESCE_SIZE / chunk + 1;
    for (let i = 0; i < n; i++) await dev.write(Buffer.alloc(chunk, i), i * chunk, 0);
    below.release();
    await dev.flush(0);
    assert.deepEqual(
      below.of('write').map((c) => c.length),
      [1, MAX_COALESCE_SIZE, chunk],
    );
  });

  test('dirty memory is bounded: a writer that does not fit waits until write-back frees room', async () => {
    const cost = 4096 + ENTRY_OVERHEAD;
    const { dev, below } = make({ maxDirty: 2 * cost });
    below.hold();
    await dev.write(Buffer.alloc(4096, 1), 0, 0);
    await dev.write(Buffer.alloc(4096, 2), 4096, 0);
    assert.equal(dev.dirtyBytes, 2 * cost);
    const third = track(dev.write(Buffer.alloc(4096, 3), 8192, 0));
    const fourth = track(dev.write(Buffer.alloc(4096, 4), 12288, 0));
    await settle();
    assert.equal(third.settled(), false, 'the third writer waits');
    assert.equal(fourth.settled(), false);
    assert.equal(dev.waitingWriters, 2);
    assert.ok(dev.dirtyBytes <= 2 * cost);
    below.release();
    await third.promise;
    await fourth.promise;
    await dev.flush(0);
    const expected = Buffer.concat([1, 2, 3, 4].map((b) => Buffer.alloc(4096, b)));
    assert.deepEqual(await readAt(below.next, 0, 16384), expected);
    assert.equal(dev.dirtyBytes, 0);
  });

  test('a write larger than maxDirty is accepted when the cache is empty', async () => {
    const { dev, below } = make({ maxDirty: 1000 });
    below.hold();
    await dev.write(Buffer.alloc(100000, 5), 0, 0);
    const second = track(dev.write(Buffer.alloc(10, 6), 200000, 0));
    await settle();
    assert.equal(second.settled(), false);
    below.release();
    await second.promise;
    await dev.flush(0);
    assert.deepEqual(await readAt(below.next, 0, 100000), Buffer.alloc(100000, 5));
  });

  test('flush completes only after every earlier write is written back, then flushes below (FL4)', async () => {
    const { dev, below } = make();
    below.hold();
    await dev.write(Buffer.alloc(4096, 1), 0, 0);
    await dev.write(Buffer.alloc(4096, 2), 65536, 0);
    const f = track(dev.flush(0));
    await settle();
    assert.equal(f.settled(), false);
    assert.equal(below.of('flush').length, 0, 'the layer below is not flushed before the data is there');
    below.release();
    await f.promise;
    const ops = below.calls.map((c) => c.op);
    assert.deepEqual(ops, ['write', 'write', 'flush']);
  });

  test('a FUA write waits for its own write-back, passes FUA down and leaves later writes alone', async () => {
    const { dev, below } = make();
    below.hold();
    await dev.write(Buffer.alloc(100, 1), 0, 0);
    const fua = track(dev.write(Buffer.alloc(100, 2), 1000, REQ.FUA));
    await settle();
    assert.equal(fua.settled(), false);
    below.release();
    await fua.promise;
    assert.deepEqual(
      below.of('write').map((c) => [c.offset, c.flags]),
      [
        [0, REQ_WRITEBACK],
        [1000, REQ_WRITEBACK | REQ.FUA],
      ],
    );
    assert.equal(dev.dirtyRequests, 0);
  });

  test('FUA over a layer without native FUA: written back, then the layer below is flushed', async () => {
    const mem = new MemoryDevice({ size: SIZE });
    const noFua = new RecordingDevice(mem);
    Object.defineProperty(noFua, 'capabilities', { value: { ...mem.capabilities, fua: false } });
    const { dev } = make({}, noFua);
    await dev.write(Buffer.alloc(10, 1), 0, REQ.FUA);
    assert.deepEqual(
      noFua.calls.map((c) => [c.op, c.flags]),
      [
        ['write', REQ_WRITEBACK],
        ['flush', 0],
      ],
    );
  });

  test("'drop': a failed write-back is recorded in the ErrSeq, dropped from the cache, and flush still succeeds (FL1, FL3)", async () => {
    const { mem, errors, rec } = failingBelow(1);
    const { dev, ctx } = make({}, rec);
    await mem.write(Buffer.alloc(4096, 0xee), 0, 0);
    const session = ctx.errseq.sample();
    await dev.write(Buffer.alloc(4096, 1), 0, 0);
    await dev.flush(0); // write-back fails inside: recorded, not thrown
    assert.equal(errors.injected, 1);
    assert.equal(ctx.errseq.peekError(), 5);
    assert.equal(ctx.errseq.seen, false);
    assert.deepEqual(await readAt(dev, 0, 4096), Buffer.alloc(4096, 0xee), 'the range reads from below again: the data is lost');
    assert.equal(dev.dirtyRequests, 0);
    // The session reports it once (the server's checkAndAdvance), and a retry does not bring the data back.
    const first = ctx.errseq.checkAndAdvance(session);
    assert.equal(first.error, 5);
    await dev.flush(0);
    assert.equal(ctx.errseq.checkAndAdvance(first.cursor).error, 0);
    assert.deepEqual(await readAt(mem, 0, 4096), Buffer.alloc(4096, 0xee));
  });

  test("'drop': a background failure is recorded before the room it held is given to a waiting writer", async () => {
    const { rec } = failingBelow();
    const { dev, ctx } = make({ maxDirty: 4096 }, rec);
    await dev.write(Buffer.alloc(4096, 1), 0, 0);
    await dev.write(Buffer.alloc(4096, 2), 4096, 0); // waits for the first write-back
    assert.equal(ctx.errseq.peekError(), 5, 'the acknowledgement of the second write implies the first failure is recorded');
  });

  test("'keep': failed data stays dirty and readable, write-back stops, and the next flush retries it", async () => {
    const { mem, errors, rec } = failingBelow(1);
    const { dev, ctx } = make({ onError: 'keep' }, rec);
    const session = ctx.errseq.sample();
    await dev.write(Buffer.alloc(4096, 1), 0, 0);
    await dev.write(Buffer.alloc(4096, 2), 8192, 0);
    await settle();
    assert.equal(errors.injected, 1);
    assert.equal(dev.stoppedBy?.code, 'EIO');
    assert.equal(dev.dirtyRequests, 2, 'the later write does not overtake the failed one');
    assert.equal(ctx.errseq.peekError(), 5);
    assert.deepEqual(await readAt(dev, 0, 4096), Buffer.alloc(4096, 1));
    assert.deepEqual(await readAt(mem, 0, 4096), Buffer.alloc(4096));
    await dev.flush(0); // the retry succeeds (count: 1)
    assert.equal(dev.stoppedBy, null);
    assert.deepEqual(await readAt(mem, 0, 4096), Buffer.alloc(4096, 1));
    assert.deepEqual(await readAt(mem, 8192, 4096), Buffer.alloc(4096, 2));
    assert.equal(ctx.errseq.checkAndAdvance(session).error, 5, 'the failure is still reported once');
  });

  test("'keep': while the layer below keeps failing, every flush's retry is recorded again, so every flush reports it", async () => {
    const mem = new MemoryDevice({ size: SIZE });
    let failing = true;
    const errors = new ErrorFilter(mem, { ops: ['writeback'] });
    // Fails while `failing` is set: the write-back goes through the error filter or around it.
    const rec = new (class extends RecordingDevice {
      override async write(data: Buffer, offset: number, flags: number): Promise<void> {
        return failing ? errors.write(data, offset, flags) : mem.write(data, offset, flags);
      }
    })(mem);
    const { dev, ctx } = make({ onError: 'keep' }, rec);
    let cursor = ctx.errseq.sample();
    await dev.write(Buffer.alloc(512, 1), 0, 0);
    for (let i = 0; i < 3; i++) {
      await dev.flush(0);
      const r = ctx.errseq.checkAndAdvance(cursor);
      assert.equal(r.error, 5, `flush ${i} reports the failure`);
      cursor = r.cursor;
    }
    assert.equal(dev.dirtyRequests, 1);
    failing = false;
    await dev.flush(0);
    assert.equal(ctx.errseq.checkAndAdvance(cursor).error, 0, 'no new failure once the retry succeeds');
    assert.deepEqual(await readAt(mem, 0, 512), Buffer.alloc(512, 1));
  });

  test("'keep': a writer that would wait for room while write-back is stopped gets the error instead", async () => {
    const { rec } = failingBelow();
    const { dev } = make({ maxDirty: 4096, onError: 'keep' }, rec);
    await dev.write(Buffer.alloc(4096, 1), 0, 0);
    await assert.rejects(dev.write(Buffer.alloc(4096, 2), 4096, 0), { code: 'EIO' });
    assert.deepEqual(await readAt(dev, 0, 4096), Buffer.alloc(4096, 1));
  });

  test('flush() throws only the error of the lower flush; write-back failures go only through the ErrSeq', async () => {
    const mem = new MemoryDevice({ size: SIZE });
    const { dev, ctx } = make({}, new RecordingDevice(new ErrorFilter(mem, { ops: ['flush'], count: 1 })));
    await assert.rejects(dev.flush(0), { code: 'EIO' });
    assert.equal(ctx.errseq.peekError(), 0, 'a direct flush failure is the caller’s to record (the server sets it)');
    const { rec } = failingBelow();
    const w = make({}, rec);
    await w.dev.write(Buffer.alloc(10), 0, 0);
    await w.dev.flush(0);
    assert.equal(w.ctx.errseq.peekError(), 5);
  });

  test("a FUA write's own failure is its reply and is not recorded; an earlier write's failure is", async () => {
    const { rec } = failingBelow();
    const { dev, ctx } = make({}, rec);
    rec.hold();
    await dev.write(Buffer.alloc(10, 1), 0, 0);
    const fua = dev.write(Buffer.alloc(10, 2), 100, REQ.FUA);
    rec.release();
    await assert.rejects(fua, { code: 'EIO' });
    assert.equal(ctx.errseq.peekError(), 5, 'the earlier, acknowledged write failed in the background');
    const ctx2 = newStackContext();
    const alone = new WritebackFilter(failingBelow().rec, ctx2);
    await assert.rejects(alone.write(Buffer.alloc(10), 0, REQ.FUA), { code: 'EIO' });
    assert.equal(ctx2.errseq.peekError(), 0, 'nothing acknowledged was lost');
  });

  test('a failed trim write-back is not recorded (a trim is a hint)', async () => {
    const { dev, ctx } = make({}, new RecordingDevice(new ErrorFilter(new MemoryDevice({ size: SIZE }), { ops: ['writeback'] })));
    await dev.trim(0, 65536, 0);
    await dev.flush(0);
    assert.equal(ctx.errseq.peekError(), 0);
  });

  test('a read in flight keeps the dirty data it started with even if write-back lands meanwhile', async () => {
    const mem = new MemoryDevice({ size: SIZE });
    let releaseRead: () => void = () => undefined;
    let readStarted: () => void = () => undefined;
    const started = new Promise<void>((r) => (readStarted = r));
    const slowReads = new (class extends RecordingDevice {
      override async read(buf: Buffer, offset: number, flags: number): Promise<void> {
        // Reads return what was below when they started, late.
        const snapshot = Buffer.alloc(buf.length);
        await mem.read(snapshot, offset, flags);
        readStarted();
        await new Promise<void>((r) => (releaseRead = r));
        snapshot.copy(buf);
      }
    })(mem);
    const { dev } = make({}, slowReads);
    await dev.write(Buffer.alloc(100, 7), 50, 0);
    const r = readAt(dev, 0, 200);
    await started;
    await dev.flush(0); // the write lands below and leaves the cache
    assert.equal(dev.dirtyRequests, 0);
    releaseRead();
    const expected = Buffer.alloc(200);
    expected.fill(7, 50, 150);
    assert.deepEqual(await r, expected);
  });

  test('extents: dirty writes are data, dirty zeroes read as zero, the rest is as below', async () => {
    const { dev, below } = make();
    below.hold();
    await dev.write(Buffer.alloc(10, 1), 70000, 0);
    await dev.zero(200000, 1000, 0);
    const ext = await dev.extents(0, 300000, 0);
    assert.deepEqual(ext, [
      { offset: 0, length: 70000, flags: EXTENT.HOLE | EXTENT.ZERO },
      { offset: 70000, length: 10, flags: 0 },
      { offset: 70010, length: 200000 - 70010, flags: EXTENT.HOLE | EXTENT.ZERO },
      { offset: 200000, length: 1000, flags: EXTENT.ZERO },
      { offset: 201000, length: 99000, flags: EXTENT.HOLE | EXTENT.ZERO },
    ]);
    assert.deepEqual(await dev.extents(70000, 300000, REQ.REQ_ONE), [{ offset: 70000, length: 10, flags: 0 }]);
    below.release();
    await dev.flush(0);
  });

  test('FAST_ZERO is refused at once when the layer below cannot zero fast', async () => {
    const slow = new RecordingDevice(new MemoryDevice({ size: SIZE }));
    Object.defineProperty(slow, 'capabilities', { value: { ...slow.next.capabilities, fastZero: false } });
    const { dev } = make({}, slow);
    await assert.rejects(dev.zero(0, 4096, REQ.FAST_ZERO), { code: 'EOPNOTSUPP' });
    assert.equal(dev.dirtyRequests, 0);
  });

  test('close writes back what is dirty, then closes the layer below; waiting writers fail EBADF', async () => {
    const { dev, below } = make({ maxDirty: 100 });
    below.hold();
    await dev.write(Buffer.alloc(4096, 1), 0, 0);
    const waiting = dev.write(Buffer.alloc(4096, 2), 4096, 0);
    const closing = dev.close();
    await assert.rejects(waiting, { code: 'EBADF' });
    below.release();
    await closing;
    assert.deepEqual(below.of('write').map((c) => c.offset), [0]);
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
    await assert.rejects(below.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
  });

  test('writes on a read-only layer fail EPERM at once', async () => {
    const { dev } = make({}, new RecordingDevice(new MemoryDevice({ size: SIZE, readonly: true })));
    await assert.rejects(dev.write(Buffer.alloc(1), 0, 0), { code: 'EPERM' });
    assert.equal(dev.capabilities.write, false);
    assert.equal(dev.capabilities.fua, false);
  });

  test('random writes and zeroes with write-back held and released at random match a model (property)', async () => {
    const span = 300000;
    const op = fc.record({
      kind: fc.constantFrom('write', 'zero', 'release', 'hold', 'flush'),
      start: fc.integer({ min: 0, max: span - 1 }),
      len: fc.integer({ min: 1, max: 70000 }),
      byte: fc.integer({ min: 1, max: 255 }),
    });
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 20 }), fc.integer({ min: 0, max: 3 }), async (ops, dirtyPages) => {
        const { dev, below } = make({ maxDirty: dirtyPages * 65536 });
        const model = Buffer.alloc(span);
        const pending: Promise<void>[] = [];
        for (const o of ops) {
          const len = Math.min(o.len, span - o.start);
          if (o.kind === 'write' || o.kind === 'zero') {
            const p = o.kind === 'write' ? dev.write(Buffer.alloc(len, o.byte), o.start, 0) : dev.zero(o.start, len, 0);
            model.fill(o.kind === 'write' ? o.byte : 0, o.start, o.start + len);
            // A request may have to wait for room: release write-back so it can proceed.
            if (dev.waitingWriters > 0) below.release();
            await p;
          } else if (o.kind === 'hold') {
            below.hold();
          } else if (o.kind === 'release') {
            below.release();
          } else {
            pending.push(dev.flush(0));
          }
          assert.deepEqual(await readAt(dev, 0, span), model);
        }
        below.release();
        await Promise.all(pending);
        await dev.flush(0);
        assert.deepEqual(await readAt(below.next, 0, span), model, 'after flush the layer below holds the model');
        assert.equal(dev.dirtyBytes, 0);
      }),
      { numRuns: 100 },
    );
  });

  describe('factory', () => {
    test('defaults, and settings are validated naming the key', async () => {
      const ctx: StackContext = newStackContext();
      const below = new MemoryDevice({ size: SIZE });
      const dev = writebackFilter(below, { type: 'writeback' }, ctx);
      assert.equal(dev.onError, 'drop');
      assert.equal(DEFAULT_MAX_DIRTY, 64 * 2 ** 20);
      assert.equal(writebackFilter(below, { type: 'writeback', maxDirty: '1M', onError: 'keep' }, ctx).onError, 'keep');
      assert.throws(() => writebackFilter(below, { type: 'writeback', maxDirty: 'lots' }, ctx), {
        code: 'EINVAL',
        message: /^writeback: maxDirty: /,
      });
      assert.throws(() => writebackFilter(below, { type: 'writeback', onError: 'retry' }, ctx), {
        code: 'EINVAL',
        message: /^writeback: onError: expected one of drop, keep/,
      });
      assert.throws(() => writebackFilter(below, { type: 'writeback', maxdirty: 1 }, ctx), {
        code: 'EINVAL',
        message: /^writeback: maxdirty: unknown setting/,
      });
    });

    test('the registry builds it, and it records into the stack’s ErrSeq', async () => {
      const ctx = newStackContext();
      const dev = await createStack(
        { backend: { type: 'memory', size: '1M' }, filters: [{ type: 'writeback' }, { type: 'error', ops: ['writeback'] }] },
        ctx,
      );
      assert.ok(dev instanceof WritebackFilter);
      await dev.write(Buffer.alloc(10), 0, 0);
      await dev.flush(0);
      assert.equal(ctx.errseq.peek() & ERRSEQ.MAX_ERRNO, 5);
      await dev.close();
    });

    test('over a null device, writes are acknowledged and dropped below as the null device does', async () => {
      const { dev } = make({}, new RecordingDevice(new NullDevice({ size: SIZE })));
      await dev.write(Buffer.alloc(10, 1), 0, 0);
      await dev.flush(0);
      assert.deepEqual(await readAt(dev, 0, 10), Buffer.alloc(10));
    });
  });
});
