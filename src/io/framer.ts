/**
 * A frame accumulator for the ggate wire: turns the arbitrary chunks TCP delivers into
 * the frames a ggated connection expects next (a fixed-size struct, a payload of known
 * length, bytes to skip), without growing buffers with Buffer.concat.
 *
 * The consumer always says what it wants next; the reader calls back synchronously when
 * that much has arrived and then waits for the next expectation. Between expectations
 * (the consumer is busy, e.g. opening a device) bytes are only queued, never parsed, so
 * a fast client cannot push the state machine ahead of the server. The queue holds the
 * chunks that had already arrived; the consumer pauses the socket meanwhile, so it stays
 * bounded by what the kernel handed over before the pause.
 *
 * Memory per frame is bounded by the consumer: fixed frames go through one scratch
 * buffer sized at construction; a payload buffer is allocated (only when the payload is
 * split across chunks) for the length the consumer passed, which it has checked against
 * its cap first; skipped bytes are never stored.
 */

import { Deque } from './deque.js';

/** What the reader is waiting for. */
const MODE = {
  /** Nothing: bytes are queued until the consumer sets an expectation. */
  NONE: 0,
  /** A fixed-size struct, delivered from the scratch buffer or in place. */
  FIXED: 1,
  /** A payload of a given length. */
  BODY: 2,
  /** A number of bytes to drop. */
  SKIP: 3,
  /** Everything, forever (a socket nothing more is read from). */
  DISCARD: 4,
  /** Finished: bytes are dropped and no callback runs again. */
  STOPPED: 5,
} as const;

type Mode = (typeof MODE)[keyof typeof MODE];

const EMPTY = Buffer.alloc(0);

export class FrameReader {
  readonly #scratch: Buffer;
  #mode: Mode = MODE.NONE;
  #paused = false;
  #running = false;

  /** Queued chunks; the first is consumed from #headPos. A ring: a chunk is taken off the front per chunk consumed. */
  readonly #queue = new Deque<Buffer>();
  #headPos = 0;
  /** Bytes in #queue not yet consumed, kept as a running sum so {@link buffered} is O(1). */
  #bufferedBytes = 0;

  #need = 0;
  #fill = 0;
  #body: Buffer | null = null;
  #skip = 0;
  #onFixed: ((buf: Buffer, off: number) => void) | null = null;
  #onBody: ((payload: Buffer) => void) | null = null;
  #onSkipped: (() => void) | null = null;

  /** @param maxFixed the largest fixed frame this reader will be asked for (sizes the scratch buffer). */
  constructor(maxFixed: number) {
    this.#scratch = Buffer.alloc(maxFixed);
  }

  /** Bytes received and not yet consumed. */
  get buffered(): number {
    return this.#bufferedBytes;
  }

  /** True once {@link stop} was called. */
  get stopped(): boolean {
    return this.#mode === MODE.STOPPED;
  }

  /** True while a fixed frame, payload or skip is partly received. */
  get midFrame(): boolean {
    return (this.#mode === MODE.FIXED && this.#fill > 0) || (this.#mode === MODE.BODY && this.#fill > 0) || (this.#mode === MODE.SKIP && this.#skip > 0);
  }

  /** Feeds bytes from the socket. */
  push(chunk: Buffer): void {
    if (this.#mode === MODE.STOPPED || chunk.length === 0) return;
    if (this.#mode === MODE.DISCARD) return;
    this.#queue.pushBack(chunk);
    this.#bufferedBytes += chunk.length;
    this.#run();
  }

  /**
   * Waits for `size` bytes (at most the scratch size) and calls `cb(buf, off)` with them;
   * `buf` may be the scratch buffer, valid only during the call.
   */
  expectFixed(size: number, cb: (buf: Buffer, off: number) => void): void {
    if (size > this.#scratch.length) throw new RangeError(`frame of ${size} bytes exceeds the scratch buffer (${this.#scratch.length})`);
    if (this.#mode === MODE.STOPPED) return;
    this.#mode = MODE.FIXED;
    this.#need = size;
    this.#fill = 0;
    this.#onFixed = cb;
    this.#run();
  }

  /**
   * Waits for a payload of `length` bytes and calls `cb(payload)`. The caller has
   * checked `length` against its limit: this is what the reader may allocate. The
   * payload buffer is the caller's to keep.
   */
  expectBody(length: number, cb: (payload: Buffer) => void): void {
    if (this.#mode === MODE.STOPPED) return;
    if (length === 0) {
      this.#mode = MODE.NONE;
      cb(EMPTY);
      return;
    }
    this.#mode = MODE.BODY;
    this.#need = length;
    this.#fill = 0;
    this.#body = null;
    this.#onBody = cb;
    this.#run();
  }

  /** Drops the next `length` bytes, then calls `cb`. Nothing is stored. */
  expectSkip(length: number, cb: () => void): void {
    if (this.#mode === MODE.STOPPED) return;
    if (length === 0) {
      this.#mode = MODE.NONE;
      cb();
      return;
    }
    this.#mode = MODE.SKIP;
    this.#skip = length;
    this.#onSkipped = cb;
    this.#run();
  }

  /** Drops everything from now on (queued bytes included). */
  discard(): void {
    if (this.#mode === MODE.STOPPED) return;
    this.#mode = MODE.DISCARD;
    this.#clear();
  }

  /** Stops processing without losing the current expectation or queued bytes. */
  pause(): void {
    this.#paused = true;
  }

  /** Continues after {@link pause}, parsing what was queued meanwhile. */
  resume(): void {
    if (!this.#paused) return;
    this.#paused = false;
    this.#run();
  }

  /** Finished: drops queued bytes; no callback runs again. */
  stop(): void {
    this.#mode = MODE.STOPPED;
    this.#clear();
  }

  #clear(): void {
    this.#queue.clear();
    this.#headPos = 0;
    this.#bufferedBytes = 0;
    this.#body = null;
    this.#onFixed = null;
    this.#onBody = null;
    this.#onSkipped = null;
  }

  #run(): void {
    // Callbacks set the next expectation from inside this loop; the loop picks it up.
    if (this.#running) return;
    this.#running = true;
    try {
      while (!this.#paused && this.#queue.size > 0) {
        const mode = this.#mode;
        if (mode === MODE.NONE || mode === MODE.STOPPED) break;
        const chunk = this.#queue.peekFront()!;
        if (mode === MODE.DISCARD) {
          this.#clear();
          break;
        }
        const start = this.#headPos;
        const pos = this.#step(chunk, start);
        // A callback that stopped or discarded has emptied the queue.
        if (this.#queue.peekFront() !== chunk) break;
        this.#bufferedBytes -= Math.min(pos, chunk.length) - start;
        if (pos >= chunk.length) {
          this.#queue.popFront();
          this.#headPos = 0;
        } else {
          this.#headPos = pos;
        }
      }
    } finally {
      this.#running = false;
    }
  }

  /** Consumes from `chunk` at `pos` for the current expectation; returns the new position. */
  #step(chunk: Buffer, pos: number): number {
    const avail = chunk.length - pos;
    switch (this.#mode) {
      case MODE.FIXED: {
        const need = this.#need;
        const cb = this.#onFixed!;
        if (this.#fill === 0 && avail >= need) {
          this.#deliverDone();
          cb(chunk, pos);
          return pos + need;
        }
        const n = Math.min(need - this.#fill, avail);
        chunk.copy(this.#scratch, this.#fill, pos, pos + n);
        this.#fill += n;
        if (this.#fill === need) {
          this.#deliverDone();
          cb(this.#scratch, 0);
        }
        return pos + n;
      }
      case MODE.BODY: {
        const need = this.#need;
        const cb = this.#onBody!;
        if (this.#fill === 0 && avail >= need) {
          // All in this chunk: hand it over in place ('data' chunks are never reused by Node).
          this.#deliverDone();
          cb(chunk.subarray(pos, pos + need));
          return pos + need;
        }
        this.#body ??= Buffer.allocUnsafe(need);
        const n = Math.min(need - this.#fill, avail);
        chunk.copy(this.#body, this.#fill, pos, pos + n);
        this.#fill += n;
        if (this.#fill === need) {
          const body = this.#body;
          this.#deliverDone();
          cb(body);
        }
        return pos + n;
      }
      case MODE.SKIP: {
        const n = Math.min(this.#skip, avail);
        this.#skip -= n;
        if (this.#skip === 0) {
          const cb = this.#onSkipped!;
          this.#deliverDone();
          cb();
        }
        return pos + n;
      }
      default:
        return chunk.length;
    }
  }

  /** Back to waiting for an expectation, before the callback sets the next one. */
  #deliverDone(): void {
    this.#mode = MODE.NONE;
    this.#fill = 0;
    this.#body = null;
    this.#onFixed = null;
    this.#onBody = null;
    this.#onSkipped = null;
  }
}
