/**
 * StreamReader: exact reads over a PassThrough fed in arbitrary chunks, end and error
 * handling, fail(), and detach() handing the unread bytes on.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import fc from 'fast-check';
import { StreamReader } from '../../src/io/stream-reader.js';
import { BlockError } from '../../src/errors/index.js';

const WAIT_MS = 2000;

/** Rejects if `p` has not settled within WAIT_MS: no test here may hang. */
function bounded<T>(p: Promise<T>, what = 'read'): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} did not settle within ${WAIT_MS} ms`)), WAIT_MS)));
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

const bytes = (n: number, seed = 0) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff));

test('reads exactly n bytes across chunk boundaries, in order', async () => {
  const s = new PassThrough();
  const r = new StreamReader(s);
  const data = bytes(100);
  // Chunks of 1, 3, 10, 40, 46 bytes; reads of 2, 11, 50, 37.
  const pending = bounded(
    (async () => {
      const out = [await r.read(2), await r.read(11), await r.read(50), await r.read(37)];
      return out;
    })(),
  );
  let at = 0;
  for (const n of [1, 3, 10, 40, 46]) {
    s.write(data.subarray(at, at + n));
    at += n;
    await new Promise((res) => setImmediate(res));
  }
  const out = await pending;
  assert.deepEqual(
    out.map((b) => b.length),
    [2, 11, 50, 37],
  );
  assert.deepEqual(Buffer.concat(out), data);
});

test('a read satisfied by bytes already buffered resolves without more data', async () => {
  const s = new PassThrough();
  const r = new StreamReader(s);
  s.write(bytes(10));
  await new Promise((res) => setImmediate(res));
  assert.deepEqual(await bounded(r.read(4)), bytes(10).subarray(0, 4));
  assert.deepEqual(await bounded(r.read(6)), bytes(10).subarray(4));
});

test('any chunking and any read sizes give back the same bytes (property)', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.uint8Array({ minLength: 1, maxLength: 300 }),
      fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 20 }),
      // Zero-length reads mixed in, but never only those: the reads must get through the data.
      fc.array(fc.integer({ min: 0, max: 80 }), { minLength: 1, maxLength: 20 }).filter((a) => a.some((n) => n > 0)),
      async (raw, chunkSizes, readSizes) => {
        const data = Buffer.from(raw);
        const s = new PassThrough();
        const r = new StreamReader(s);
        let at = 0;
        let i = 0;
        while (at < data.length) {
          const n = chunkSizes[i++ % chunkSizes.length]!;
          s.write(data.subarray(at, at + n));
          at += n;
        }
        const got: Buffer[] = [];
        let left = data.length;
        for (let j = 0; left > 0; j++) {
          const n = Math.min(readSizes[j % readSizes.length]!, left);
          got.push(await bounded(r.read(n)));
          left -= n;
        }
        assert.deepEqual(Buffer.concat(got), data);
        r.detach();
      },
    ),
    { numRuns: 100 },
  );
});

test('read(0) resolves with an empty buffer at once, before and after data', async () => {
  const s = new PassThrough();
  const r = new StreamReader(s);
  assert.equal((await bounded(r.read(0))).length, 0);
  s.write(bytes(3));
  await new Promise((res) => setImmediate(res));
  assert.equal((await bounded(r.read(0))).length, 0);
  assert.deepEqual(await bounded(r.read(3)), bytes(3));
});

test('the stream ending before enough bytes rejects with ECONNRESET; buffered bytes stay readable', async () => {
  const s = new PassThrough();
  const r = new StreamReader(s);
  s.end(bytes(5));
  assert.deepEqual(await bounded(r.read(2)), bytes(5).subarray(0, 2));
  await assert.rejects(bounded(r.read(10)), (e: unknown) => e instanceof BlockError && e.code === 'ECONNRESET' && /closed the connection/.test(e.message));
  // The 3 bytes left are still readable (a server's last reply before it hangs up); then nothing is.
  assert.deepEqual(await bounded(r.read(3)), bytes(5).subarray(2));
  await assert.rejects(bounded(r.read(1)), (e: unknown) => e instanceof BlockError && e.code === 'ECONNRESET');
});

test('a pending read rejects when the stream ends under it', async () => {
  const s = new PassThrough();
  const r = new StreamReader(s);
  const p = bounded(r.read(8));
  s.write(bytes(3));
  await new Promise((res) => setImmediate(res));
  s.end();
  await assert.rejects(p, (e: unknown) => e instanceof BlockError && e.code === 'ECONNRESET');
});

test('a stream error rejects the pending read with ECONNRESET carrying the cause', async () => {
  const s = new PassThrough();
  const r = new StreamReader(s);
  const p = bounded(r.read(4));
  const cause = new Error('boom');
  s.destroy(cause);
  await assert.rejects(p, (e: unknown) => e instanceof BlockError && e.code === 'ECONNRESET' && /boom/.test(e.message) && e.cause === cause);
});

test('one read at a time: a second concurrent read is refused (EINVAL)', async () => {
  const s = new PassThrough();
  const r = new StreamReader(s);
  const first = bounded(r.read(4));
  await assert.rejects(r.read(1), (e: unknown) => e instanceof BlockError && e.code === 'EINVAL');
  s.write(bytes(4));
  assert.deepEqual(await first, bytes(4));
});

test('fail() rejects the pending read and every later one, even with bytes buffered', async () => {
  const s = new PassThrough();
  const r = new StreamReader(s);
  const p = bounded(r.read(10));
  s.write(bytes(4));
  await new Promise((res) => setImmediate(res));
  const err = new BlockError('ETIMEDOUT', 'too slow');
  r.fail(err);
  await assert.rejects(p, (e: unknown) => e === err);
  // 4 bytes are buffered: a read they would satisfy must still fail (the reader was failed).
  await assert.rejects(bounded(r.read(2)), (e: unknown) => e === err);
  await assert.rejects(bounded(r.read(0)), (e: unknown) => e === err);
});

test('detach() returns the bytes received and not read, and stops listening', async () => {
  const s = new PassThrough();
  const r = new StreamReader(s);
  s.write(bytes(6, 1));
  s.write(bytes(4, 2));
  await new Promise((res) => setImmediate(res));
  assert.deepEqual(await bounded(r.read(3)), bytes(6, 1).subarray(0, 3));
  const rest = r.detach();
  assert.deepEqual(rest, Buffer.concat([bytes(6, 1).subarray(3), bytes(4, 2)]));
  assert.equal(s.listenerCount('data'), 0);
  assert.equal(s.listenerCount('end'), 0);
  assert.equal(s.listenerCount('error'), 0);
  // Nothing further is buffered: a second detach is empty.
  assert.equal(r.detach().length, 0);
});
