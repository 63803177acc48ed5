/**
 * Pins how often a gate request's data is copied in userland on the control hop (the
 * unix socket between `blockgate serve` and a handler), both ends in this process.
 *
 * Every userland way to copy bytes between buffers is spied on while one 256 KiB WRITE
 * and one 256 KiB READ cross: Buffer#copy, TypedArray#set, Buffer.concat and
 * Buffer.from(view). The socket's own chunks come from Node's native side and are not
 * counted; encoding sends header and payload as separate chunks, so it copies nothing.
 * The budget is one payload plus a few bytes of headers gathered across chunk
 * boundaries: a second copy of any part of the payload breaks it.
 */
import { afterEach, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { startControl, type ControlFixture } from './fixture.js';

const PAYLOAD = 256 * 1024;
/** Header bytes that may be gathered into a scratch buffer when a chunk splits one. */
const HEADER_SLACK = 1024;

interface CopyLog {
  /** Bytes copied into buffers other than `excluded`. */
  bytes: number;
  /** Bytes copied into `excluded`. */
  excludedBytes: number;
}

/** Runs `fn` with every userland buffer copy counted (copies into `excluded` apart). */
async function countCopies(fn: () => Promise<void>, excluded?: Uint8Array): Promise<CopyLog> {
  const log: CopyLog = { bytes: 0, excludedBytes: 0 };
  const record = (target: unknown, n: number): void => {
    if (excluded !== undefined && target instanceof Uint8Array && target.buffer === excluded.buffer) log.excludedBytes += n;
    else log.bytes += n;
  };
  const proto = Buffer.prototype as unknown as { copy: (...a: unknown[]) => number };
  const origCopy = proto.copy;
  const origSet = Uint8Array.prototype.set;
  const origConcat = Buffer.concat;
  const origFrom = Buffer.from;
  proto.copy = function (this: Buffer, ...a: unknown[]): number {
    const n = origCopy.apply(this, a);
    record(a[0], n);
    return n;
  };
  Uint8Array.prototype.set = function (this: Uint8Array, src: ArrayLike<number>, off?: number): void {
    record(this, src.length);
    origSet.call(this, src, off);
  } as typeof Uint8Array.prototype.set;
  Buffer.concat = function (list: readonly Uint8Array[], total?: number): Buffer {
    const out = origConcat(list, total);
    log.bytes += out.length;
    return out;
  } as typeof Buffer.concat;
  Buffer.from = function (this: unknown, ...a: unknown[]): Buffer {
    if (ArrayBuffer.isView(a[0])) log.bytes += a[0].byteLength;
    return (origFrom as (...x: unknown[]) => Buffer).apply(Buffer, a);
  } as typeof Buffer.from;
  try {
    await fn();
  } finally {
    proto.copy = origCopy;
    Uint8Array.prototype.set = origSet;
    Buffer.concat = origConcat;
    Buffer.from = origFrom;
  }
  return log;
}

let fx: ControlFixture;
beforeEach(async () => {
  fx = await startControl();
});
afterEach(async () => {
  await fx.close();
});

test('a 256 KiB WRITE reaches the handler and a 256 KiB READ answer reaches the gate with at most one copy each way', async () => {
  const c = await fx.connect();
  const unit = await c.create({ mediasize: 1 << 20, sectorsize: 512 });
  const dev = fx.registry.open(unit);
  const data = Buffer.alloc(PAYLOAD);
  for (let i = 0; i < PAYLOAD; i++) data[i] = (i * 7) & 0xff;

  let received: Buffer | undefined;
  const write = await countCopies(async () => {
    const w = dev.write(data, 0, 0);
    const r = await c.start({ unit, length: PAYLOAD });
    assert.ok(r.error === 0 && r.cmd === 'write');
    received = r.data;
    await c.done({ unit, seq: r.seq });
    await w;
  });
  assert.ok(received?.equals(data), 'the handler got the WRITE payload intact');
  assert.ok(write.bytes <= PAYLOAD + HEADER_SLACK, `WRITE: ${write.bytes} bytes copied for a ${PAYLOAD}-byte payload`);

  const into = Buffer.alloc(PAYLOAD);
  const read = await countCopies(async () => {
    const rd = dev.read(into, 0, 0);
    const r = await c.start({ unit, length: 0 });
    assert.ok(r.error === 0 && r.cmd === 'read');
    await c.done({ unit, seq: r.seq, data });
    await rd;
  }, into);
  assert.ok(into.equals(data), 'the reader got the READ answer intact');
  assert.ok(read.bytes <= PAYLOAD + HEADER_SLACK, `READ: ${read.bytes} bytes copied on the control hop for a ${PAYLOAD}-byte answer`);
  // Past the hop, the gate copies the answer into the requester's buffer, once.
  assert.equal(read.excludedBytes, PAYLOAD);
  console.log(`copies: WRITE ${write.bytes} bytes, READ ${read.bytes} bytes on the hop + ${read.excludedBytes} into the requester's buffer`);
  await dev.close();
});
