/**
 * The receive buffers a session lends its socket (see io/lent-buffers.ts), and who still
 * holds them: WRITE payloads passed to a device as slices of them, and bytes kept while
 * input is paused. A buffer goes back to the pool when its last holder lets go, unless
 * the socket is still reading into it.
 */
import type { BufferPool } from '../io/buffer-pool.js';

/**
 * Size of the receive buffers a session lends its socket: one read takes up to this
 * much. 1 MiB: a stream of 256 KiB writes then costs a read(2) and a callback per ~four
 * requests; against 256 KiB buffers that was 10-20 % less server CPU for sequential
 * writes (1 and 4 connections), for 1 MiB of memory per connection.
 */
export const RECEIVE_BUFFER_SIZE = 1024 * 1024;

/**
 * WRITE payloads at least this long are passed to a device with `writev` as slices of the
 * receive buffers, which stay out of reuse until the request ends. Shorter ones are
 * copied into a pooled buffer, because holding a 1 MiB receive buffer for a 4 KiB
 * payload would let a queue of small writes pin far more memory than their bytes, unless
 * the device is `nonBlocking` (memory): it is done with them before the next read.
 */
export const ZERO_COPY_MINIMUM = 64 * 1024;

/** Receive buffers one held payload may span: a payload can straddle two. */
const BUFFERS_PER_PAYLOAD = 2;

/** A receive buffer lent to the socket, and how many holders still use it. */
export interface RxBuffer {
  readonly buf: Buffer;
  refs: number;
  /** Bytes of `buf` the socket has filled; while it is held, reads go into the rest. */
  used: number;
}

export class ReceiveBuffers {
  readonly #pool: BufferPool;
  readonly #maxInFlightBytes: number;
  /** The buffer the socket reads into next; null once closed. */
  #current: RxBuffer | null = null;
  /** Buffers with holders (refs > 0), the current one included. */
  #held = 0;

  constructor(pool: BufferPool, maxInFlightBytes: number) {
    this.#pool = pool;
    this.#maxInFlightBytes = maxInFlightBytes;
  }

  /**
   * Where the socket reads next: the whole current buffer when nothing holds it, else
   * its unused tail while at least ZERO_COPY_MINIMUM is left, else a fresh buffer (a held
   * one goes back to the pool when its last holder releases it). Filling the tail first
   * keeps memory near the bytes held: a peer that sends a payload a few bytes per read
   * must not make every read pin a new receive buffer.
   */
  next(): Buffer {
    const cur = this.#current;
    if (cur) {
      if (cur.refs === 0) {
        cur.used = 0;
        return cur.buf;
      }
      if (cur.buf.length - cur.used >= ZERO_COPY_MINIMUM) return cur.buf.subarray(cur.used);
    }
    const rx: RxBuffer = { buf: this.#pool.get(RECEIVE_BUFFER_SIZE), refs: 0, used: 0 };
    this.#current = rx;
    return rx.buf;
  }

  /** The socket read `n` bytes into the buffer `next` gave (at its `used` offset): that buffer. */
  filled(n: number): RxBuffer {
    const rx = this.#current!;
    rx.used += n;
    return rx;
  }

  hold(rx: RxBuffer): void {
    if (rx.refs++ === 0) this.#held++;
  }

  release(rx: RxBuffer): void {
    if (--rx.refs > 0) return;
    this.#held--;
    if (rx !== this.#current) this.#pool.put(rx.buf);
  }

  /**
   * Whether a WRITE payload of `length` bytes may stay in the receive buffers.
   * Held buffers are bounded by the in-flight byte budget: a slow device completing out
   * of order could otherwise keep one receive buffer per 64 KiB payload in flight (and
   * two for a payload straddling buffers), up to 32x the budget. Past the bound, payloads
   * are copied into the pool like small ones, which the budget itself bounds.
   */
  mayHold(length: number, nonBlocking: boolean): boolean {
    if (length < ZERO_COPY_MINIMUM && !nonBlocking) return false;
    return (this.#held + BUFFERS_PER_PAYLOAD) * RECEIVE_BUFFER_SIZE <= this.#maxInFlightBytes;
  }

  /** The socket reads no more: its buffer goes back unless a request still holds it. */
  close(): void {
    const rx = this.#current;
    this.#current = null;
    if (rx && rx.refs === 0) this.#pool.put(rx.buf);
  }
}
