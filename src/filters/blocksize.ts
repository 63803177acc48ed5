/**
 * The blocksize filter: meets the block-size limits of the device below for clients
 * that do not (nbdkit's blocksize filter).
 *
 * - `minblock`: every request below is aligned to it. Reads are rounded out; the
 *   unaligned head and tail of a write or zero are done by read-modify-write of the
 *   whole block; the unaligned head and tail of a trim are ignored (a trim is a hint);
 *   cache and extents are rounded out. The size is rounded down to a multiple of it (the
 *   unaligned tail cannot be written safely; a truncate filter with `roundUp` below
 *   this one, nearer the device, pads the device so its last bytes stay reachable).
 *   The filter presents a minimum block size of 1.
 * - `maxdata`: reads and writes larger than it are split.
 * - `maxlen`: trims, zeroes, caches and extents larger than it are split (extents are
 *   only asked for that much; the caller asks again).
 *
 * Concurrency: nbdkit serialises the read-modify-write cycles with a read-write lock
 * (an RMW takes it exclusively, other writes shared). Here the lock is per byte range,
 * over the whole device (so for every connection, and multi-conn stays safe): an RMW
 * holds its one block exclusively and the aligned part of a write, zero or trim holds
 * its range shared. So two RMWs of one block run one after the other and neither loses
 * the other's bytes, an aligned write of a block cannot land between an RMW's read and
 * its write, and requests on other blocks are not held up. Waiters are served in order.
 *
 * A zero with FAST_ZERO that is unaligned or longer than `maxlen` fails EOPNOTSUPP
 * (not one fast request below), as in nbdkit.
 */
import * as v from 'valibot';
import { FilterDevice } from '../device/filter.js';
import { REQ, type BlockDevice, type BlockSize, type Extent } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import { MAX_IO_SIZE, formatSize, parseSettings, settingsSchema, sizeSetting } from '../device/index.js';
import { BlockError } from '../errors/index.js';

/** The largest `minblock`: 64 KiB, as nbdkit (and the largest minimum block size). */
export const MAX_MINBLOCK = 65536;
/** The default `maxdata` limit before the device's own maximum: 64 MiB, as nbdkit. */
export const DEFAULT_MAXDATA = 64 * 2 ** 20;
/** The NBD protocol's 32-bit length limit, from which the default `maxlen` is rounded down. */
const U32_MAX = 0xffffffff;

/** Settings of a blocksize filter. */
export interface BlocksizeOptions {
  /** Alignment of every request below, a power of two <= 64 KiB. @default the device's minimum block size */
  readonly minblock?: number;
  /** Largest read or write below, a multiple of minblock. @default 64 MiB or the device's maximum if smaller, rounded down to minblock */
  readonly maxdata?: number;
  /** Largest trim, zero, cache or extents below, a multiple of minblock. @default 2^32 - 1 rounded down to minblock */
  readonly maxlen?: number;
}

interface LockEntry {
  readonly start: number;
  readonly end: number;
  readonly exclusive: boolean;
  grant?: () => void;
}

/**
 * A byte-range lock: holders of overlapping ranges exclude each other unless both are
 * shared. Requests are granted in arrival order (a request also waits behind an earlier
 * waiting one it conflicts with), so an exclusive request is never starved.
 */
export class RangeLock {
  readonly #held: LockEntry[] = [];
  readonly #waiting: LockEntry[] = [];

  static #conflict(a: LockEntry, b: LockEntry): boolean {
    return a.start < b.end && b.start < a.end && (a.exclusive || b.exclusive);
  }

  /** Ranges held now (for tests). */
  get heldCount(): number {
    return this.#held.length;
  }
  /** Requests waiting now (for tests). */
  get waitingCount(): number {
    return this.#waiting.length;
  }

  /** Waits for [start, end) and returns the function that releases it. */
  async acquire(start: number, end: number, exclusive: boolean): Promise<() => void> {
    const entry: LockEntry = { start, end, exclusive };
    const blocked = this.#held.some((h) => RangeLock.#conflict(h, entry)) || this.#waiting.some((w) => RangeLock.#conflict(w, entry));
    if (blocked) {
      await new Promise<void>((resolve) => {
        entry.grant = resolve;
        this.#waiting.push(entry);
      });
    } else {
      this.#held.push(entry);
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#held.splice(this.#held.indexOf(entry), 1);
      this.#wake();
    };
  }

  #wake(): void {
    for (let i = 0; i < this.#waiting.length; i++) {
      const w = this.#waiting[i]!;
      const before = this.#waiting.slice(0, i);
      if (this.#held.some((h) => RangeLock.#conflict(h, w)) || before.some((b) => RangeLock.#conflict(b, w))) continue;
      this.#waiting.splice(i--, 1);
      this.#held.push(w);
      w.grant!();
    }
  }
}

/** `next` with its block-size limits met on behalf of the client (see the module comment). */
export class BlocksizeFilter extends FilterDevice {
  readonly minblock: number;
  readonly maxdata: number;
  readonly maxlen: number;
  readonly #blockSize: BlockSize;
  readonly #lock = new RangeLock();

  constructor(next: BlockDevice, options: BlocksizeOptions = {}) {
    super(next);
    const below = next.blockSize;
    const mb = options.minblock ?? below.minimum;
    if (!Number.isSafeInteger(mb) || mb < 1 || mb > MAX_MINBLOCK || !Number.isInteger(Math.log2(mb))) {
      throw new BlockError('EINVAL', `minblock: ${mb} must be a power of two from 1 to 64K`);
    }
    if (mb < below.minimum) {
      throw new BlockError('EINVAL', `minblock: ${mb} is smaller than the minimum block size ${below.minimum} of ${next.description}`);
    }
    if (below.maximum < mb) {
      throw new BlockError('EINVAL', `minblock: ${mb} is larger than the maximum request ${below.maximum} of ${next.description}`);
    }
    const maxdata = options.maxdata ?? Math.floor(Math.min(DEFAULT_MAXDATA, below.maximum) / mb) * mb;
    if (maxdata < mb || maxdata % mb !== 0) throw new BlockError('EINVAL', `maxdata: ${maxdata} must be a non-zero multiple of minblock ${mb}`);
    if (maxdata > below.maximum) {
      throw new BlockError('EINVAL', `maxdata: ${maxdata} is larger than the maximum request ${below.maximum} of ${next.description}`);
    }
    const maxlen = options.maxlen ?? Math.floor(U32_MAX / mb) * mb;
    if (maxlen < mb || maxlen % mb !== 0) throw new BlockError('EINVAL', `maxlen: ${maxlen} must be a non-zero multiple of minblock ${mb}`);
    this.minblock = mb;
    this.maxdata = maxdata;
    this.maxlen = maxlen;
    const preferred = Math.max(below.preferred, mb);
    this.#blockSize = Object.freeze({ minimum: 1, preferred, maximum: Math.max(MAX_IO_SIZE, preferred) });
  }

  override get size(): number {
    return this.#down(this.next.size);
  }
  override get blockSize(): BlockSize {
    return this.#blockSize;
  }
  override get description(): string {
    return `${this.next.description} (blocksize ${formatSize(this.minblock)})`;
  }

  #down(n: number): number {
    return n - (n % this.minblock);
  }

  override async read(buf: Buffer, offset: number, flags: number): Promise<void> {
    const mb = this.minblock;
    let at = 0;
    let pos = offset;
    if (pos % mb !== 0 && at < buf.length) {
      const drop = pos % mb;
      const keep = Math.min(mb - drop, buf.length);
      const bounce = Buffer.alloc(mb);
      await this.next.read(bounce, pos - drop, flags);
      bounce.copy(buf, 0, drop, drop + keep);
      at += keep;
      pos += keep;
    }
    while (buf.length - at >= mb) {
      const n = Math.min(this.maxdata, this.#down(buf.length - at));
      await this.next.read(buf.subarray(at, at + n), pos, flags);
      at += n;
      pos += n;
    }
    if (at < buf.length) {
      const bounce = Buffer.alloc(mb);
      await this.next.read(bounce, pos, flags);
      bounce.copy(buf, at, 0, buf.length - at);
    }
  }

  override async write(data: Buffer, offset: number, flags: number): Promise<void> {
    await this.#split(offset, data.length, this.maxdata, {
      partial: (block, from, to) => this.#patch(block, from, to, flags, data.subarray(block + from - offset, block + to - offset)),
      aligned: (at, n) => this.next.write(data.subarray(at - offset, at - offset + n), at, flags),
    });
  }

  override async zero(offset: number, length: number, flags: number): Promise<void> {
    const mb = this.minblock;
    if (flags & REQ.FAST_ZERO && (offset % mb !== 0 || length % mb !== 0 || length > this.maxlen)) {
      throw new BlockError('EOPNOTSUPP', `zero: ${offset}+${length} is not one aligned request of at most ${this.maxlen} bytes below`);
    }
    await this.#split(offset, length, this.maxlen, {
      partial: (block, from, to) => this.#patch(block, from, to, flags, null),
      aligned: (at, n) => this.next.zero(at, n, flags),
    });
  }

  override async trim(offset: number, length: number, flags: number): Promise<void> {
    // Only the whole blocks: a trim is a hint, and its unaligned ends are dropped.
    await this.#split(offset, length, this.maxlen, {
      partial: async () => undefined,
      aligned: (at, n) => this.next.trim(at, n, flags),
    });
  }

  override async cache(offset: number, length: number, flags: number): Promise<void> {
    let pos = this.#down(offset);
    const end = Math.min(Math.ceil((offset + length) / this.minblock) * this.minblock, this.#down(this.next.size));
    while (pos < end) {
      const n = Math.min(this.maxdata, end - pos);
      await this.next.cache(pos, n, flags);
      pos += n;
    }
  }

  override async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    const size = this.size;
    const end = length === 0 ? size : Math.min(size, offset + length);
    if (offset >= end) return [];
    // Asked from the block holding `offset`; the answer may stop short of it (a device
    // caps extents per call), so ask on from where it stopped until it reaches it.
    let start = this.#down(offset);
    for (;;) {
      const ask = Math.min(this.maxlen, Math.ceil((end - start) / this.minblock) * this.minblock, this.#down(this.next.size) - start);
      const below = await this.next.extents(start, ask, flags);
      const out: Extent[] = [];
      for (const e of below) {
        const from = Math.max(e.offset, offset);
        const to = Math.min(e.offset + e.length, size);
        if (to > from) out.push(from === e.offset && to === e.offset + e.length ? e : { offset: from, length: to - from, flags: e.flags });
      }
      const last = below.at(-1);
      if (out.length > 0 || !last || last.offset + last.length <= start || last.offset + last.length >= end) return out;
      start = last.offset + last.length;
    }
  }

  /**
   * Walks [offset, offset + length): `partial` for an unaligned head or tail (a block and
   * the byte range inside it), `aligned` for the whole blocks in between, in pieces of at
   * most `max` bytes, each under a shared lock of its range.
   */
  async #split(
    offset: number,
    length: number,
    max: number,
    ops: { partial: (block: number, from: number, to: number) => Promise<void>; aligned: (at: number, n: number) => Promise<void> },
  ): Promise<void> {
    const mb = this.minblock;
    let pos = offset;
    const end = offset + length;
    if (pos % mb !== 0 && pos < end) {
      const block = this.#down(pos);
      const to = Math.min(block + mb, end);
      await ops.partial(block, pos - block, to - block);
      pos = to;
    }
    while (end - pos >= mb) {
      const n = Math.min(max, this.#down(end - pos));
      const release = await this.#lock.acquire(pos, pos + n, false);
      try {
        await ops.aligned(pos, n);
      } finally {
        release();
      }
      pos += n;
    }
    if (pos < end) await ops.partial(pos, 0, end - pos);
  }

  /** Read-modify-write of one block: bytes [from, to) become `data` (or zeroes if null). */
  async #patch(block: number, from: number, to: number, flags: number, data: Buffer | null): Promise<void> {
    const release = await this.#lock.acquire(block, block + this.minblock, true);
    try {
      const bounce = Buffer.alloc(this.minblock);
      await this.next.read(bounce, block, 0);
      if (data) data.copy(bounce, from);
      else bounce.fill(0, from, to);
      await this.next.write(bounce, block, flags & REQ.FUA);
    } finally {
      release();
    }
  }
}

/** The settings schema (listed by `blockgate plugins`). */
export const blocksizeSettings = settingsSchema({
  minblock: v.optional(sizeSetting),
  maxdata: v.optional(sizeSetting),
  maxlen: v.optional(sizeSetting),
});

/** Filter factory: `{ type: 'blocksize', minblock?, maxdata?, maxlen? }` (see {@link BlocksizeOptions}). */
export function blocksizeFilter(next: BlockDevice, desc: LayerDescription): BlocksizeFilter {
  const s = parseSettings('blocksize', blocksizeSettings, desc);
  const options: BlocksizeOptions = Object.fromEntries(Object.entries(s).filter(([k, val]) => k !== 'type' && val !== undefined));
  try {
    return new BlocksizeFilter(next, options);
  } catch (e) {
    if (e instanceof BlockError) throw new BlockError(e.code, `blocksize: ${e.message}`);
    throw e;
  }
}
