/**
 * A pool of large buffers for request payloads and read replies.
 *
 * Why: a 256 KiB `Buffer.allocUnsafe` is above malloc's mmap threshold, so every request
 * paid for an mmap, page faults on first touch, an munmap, and the garbage collector
 * running more often for the external memory. Profiles of sequential copies showed those
 * costs (FastBuffer construction and GC) at over 20 % of server CPU. Reusing buffers
 * makes them disappear.
 *
 * Buffers come in power-of-two size classes from {@link MIN_POOLED} up; a request for n
 * bytes gets a buffer of the class at or above n, and must give back exactly that
 * buffer. Each class keeps at most enough free buffers to hold {@link MAX_FREE_BYTES_PER_CLASS}
 * (and at least one), so the pool never holds more than a bounded amount of idle memory.
 */

/**
 * Smaller requests are served by Node's own small-buffer pool. 4 KiB: a 4 KiB read reply
 * (4 KiB + header) is above what Node's pool hands out, so without this every one was a
 * fresh ArrayBuffer (GC was 14 % of server CPU at 4 KiB QD32 in --cpu-prof).
 */
export const MIN_POOLED = 4 * 1024;
/** Idle bytes kept per size class. */
export const MAX_FREE_BYTES_PER_CLASS = 16 * 1024 * 1024;

export class BufferPool {
  readonly #free: Buffer[][] = [];
  /** Buffers this pool made: only they may come back. */
  readonly #owned = new WeakSet<Buffer>();
  /** Buffers now in a free list: a second put of one is a bug that would share it. */
  readonly #idle = new WeakSet<Buffer>();

  /** A buffer of at least `n` bytes (exactly its class size for pooled sizes). */
  get(n: number): Buffer {
    if (n < MIN_POOLED) return Buffer.allocUnsafe(n);
    const c = classOf(n);
    const list = this.#free[c];
    const b = list?.pop();
    if (b) {
      this.#idle.delete(b);
      return b;
    }
    const fresh = Buffer.allocUnsafeSlow(2 ** c);
    this.#owned.add(fresh);
    return fresh;
  }

  /** Returns a buffer obtained from `get`; anything else (small buffers, foreign ones) is ignored. */
  put(b: Buffer): void {
    if (!this.#owned.has(b)) return;
    if (this.#idle.has(b)) throw new Error('BufferPool: buffer returned twice');
    const len = b.length;
    const list = (this.#free[Math.log2(len)] ??= []);
    if (list.length * len < MAX_FREE_BYTES_PER_CLASS || list.length === 0) {
      list.push(b);
      this.#idle.add(b);
    }
  }

  /** Bytes held idle by the pool. */
  get idleBytes(): number {
    let t = 0;
    this.#free.forEach((l, c) => (t += (l?.length ?? 0) * 2 ** c));
    return t;
  }
}

function classOf(n: number): number {
  return Math.max(Math.ceil(Math.log2(n)), Math.log2(MIN_POOLED));
}
