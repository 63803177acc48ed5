/**
 * The memory backend: a sparse RAM disk (nbdkit's memory plugin).
 *
 * Storage is a Map from page index to a PAGE_SIZE Buffer, allocated on first write, so
 * memory use follows what was written and never the virtual size: a 2^50-byte device
 * costs nothing until written. A sorted array of the allocated page indexes is kept
 * next to the Map so that extents() and range frees visit only allocated pages (binary
 * search + one splice), never every page of a huge device. Appending pages in order is
 * O(1); inserting in the middle is one memmove of the index, cheap next to the 64 KiB
 * page it accompanies.
 *
 * A page whose every byte becomes zero through zero() or trim() is freed, so zeroing
 * gives memory back and extents() reports it as a hole again. write() never frees: a
 * write is data, even when it is zeroes.
 *
 * Every operation runs synchronously to completion (nonBlocking), so requests never
 * interleave inside one operation and no locking is needed.
 */
import { formatSize } from '../device/size.js';
import { EXTENT, REQ, type BlockDevice, type Capabilities, type Extent } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import {
  DEFAULT_BLOCK_SIZE,
  FULL_CAPABILITIES,
  booleanSetting,
  closedError,
  parseSettings,
  readOnlyCapabilities,
  readOnlyError,
  settingsSchema,
  sizeSetting,
} from '../device/index.js';

/**
 * Allocation granule: 64 KiB. Large enough that the page index of a fully written
 * 64 GiB device stays at one million entries, small enough that a 4 KiB write into an
 * empty region costs one modest allocation.
 */
export const PAGE_SIZE = 64 * 1024;

/**
 * At most this many extents are returned by one extents() call; the caller asks again
 * from where the answer stopped. Bounds the work and the reply of one request on a
 * badly fragmented device.
 */
export const MAX_EXTENTS_PER_CALL = 1024;

/** A page of zeroes: compared against, and lent read-only for holes by readViews (never written). */
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

/** Settings of a memory device. */
export interface MemoryOptions {
  /** Virtual size in bytes, at most 2^53 - 1. */
  readonly size: number;
  /**
   * Reject writes, trims and zeroes with EPERM.
   * @default false
   */
  readonly readonly?: boolean;
}

/** Index of the first element of the sorted `keys` that is >= `x` (keys.length if none). */
function lowerBound(keys: readonly number[], x: number): number {
  let lo = 0;
  let hi = keys.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (keys[mid]! < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** A sparse in-memory block device. */
export class MemoryDevice implements BlockDevice {
  readonly size: number;
  readonly capabilities: Capabilities;
  readonly blockSize = DEFAULT_BLOCK_SIZE;
  readonly nonBlocking: boolean = true;
  readonly description: string;

  /** Allocated pages by page index. */
  #pages = new Map<number, Buffer>();
  /** The keys of #pages, ascending. */
  #order: number[] = [];
  #readonly: boolean;
  #closed = false;

  constructor(options: MemoryOptions) {
    this.size = options.size;
    this.#readonly = options.readonly ?? false;
    this.capabilities = this.#readonly ? readOnlyCapabilities(FULL_CAPABILITIES) : FULL_CAPABILITIES;
    this.description = `memory ${formatSize(this.size)}${this.#readonly ? ' (read-only)' : ''}`;
  }

  /** Bytes of RAM held by data pages (a multiple of PAGE_SIZE). */
  get allocatedBytes(): number {
    return this.#pages.size * PAGE_SIZE;
  }

  /** A copy of what readViews lends (one page walk for both). */
  async read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    let at = 0;
    for (const v of this.readViews(offset, buf.length)) at += v.copy(buf, at);
  }

  /**
   * Zero-copy read: slices of the pages, and of one shared page of zeroes for holes.
   * Safe to hand out: a page is written in place only by later writes (concurrent with
   * the read, see BlockDevice.readViews), and a freed page is dropped, never reused.
   */
  readViews(offset: number, length: number): Buffer[] {
    this.#check('read');
    const views: Buffer[] = [];
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, length - done);
      views.push((this.#pages.get(index) ?? ZERO_PAGE).subarray(inPage, inPage + n));
      done += n;
    }
    return views;
  }

  async write(data: Buffer, offset: number, _flags: number): Promise<void> {
    this.#checkWritable('write');
    this.#store(data, offset);
  }

  /** Gather write: each piece is copied straight into the pages (no concatenation). */
  async writev(data: readonly Buffer[], offset: number, _flags: number): Promise<void> {
    this.#checkWritable('write');
    let at = offset;
    for (const piece of data) {
      this.#store(piece, at);
      at += piece.length;
    }
  }

  #store(data: Buffer, offset: number): void {
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, data.length - done);
      data.copy(this.#allocate(index), inPage, done, done + n);
      done += n;
    }
  }

  /** Nothing to make durable: RAM is as durable as this device gets. */
  async flush(_flags: number): Promise<void> {
    this.#check('flush');
  }

  /** Frees the whole pages inside the range; partial pages keep their bytes (trim is a hint). */
  async trim(offset: number, length: number, _flags: number): Promise<void> {
    this.#checkWritable('trim');
    this.#freeRange(Math.ceil(offset / PAGE_SIZE), Math.floor((offset + length) / PAGE_SIZE));
  }

  /**
   * Frees whole pages and zero-fills partial ones (freeing those that end up all zero).
   * NO_HOLE is accepted and deliberately not acted on: it asks that later writes to the
   * range cannot fail for lack of space, and a memory page costs the same RAM whether it
   * is allocated now or at that write, so pre-allocating would only let one request
   * (up to 2^53 bytes with extended headers) claim memory the client never writes.
   * Time is bounded by the pages actually allocated, not by the length. Always fast, so
   * FAST_ZERO needs no special case.
   */
  async zero(offset: number, length: number, _flags: number): Promise<void> {
    this.#checkWritable('zero');
    const end = offset + length;
    const firstFull = Math.ceil(offset / PAGE_SIZE);
    const endFull = Math.floor(end / PAGE_SIZE);
    if (offset % PAGE_SIZE !== 0) {
      const head = Math.floor(offset / PAGE_SIZE);
      const headEnd = Math.min(end, (head + 1) * PAGE_SIZE);
      this.#clearPartial(head, offset - head * PAGE_SIZE, headEnd - head * PAGE_SIZE);
    }
    if (firstFull < endFull) this.#freeRange(firstFull, endFull);
    // The tail page, unless the head already covered it (range inside one page).
    if (end % PAGE_SIZE !== 0 && endFull * PAGE_SIZE >= offset) {
      this.#clearPartial(endFull, 0, end - endFull * PAGE_SIZE);
    }
  }

  /**
   * Maximal runs: HOLE|ZERO for unallocated pages, 0 (data) for allocated ones, ending
   * at the end of the request (or of the page holding `offset` when length is 0).
   */
  async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    this.#check('extents');
    const end =
      length === 0 ? Math.min(this.size, (Math.floor(offset / PAGE_SIZE) + 1) * PAGE_SIZE) : Math.min(this.size, offset + length);
    const order = this.#order;
    const out: Extent[] = [];
    let pos = offset;
    let i = lowerBound(order, Math.floor(offset / PAGE_SIZE));
    while (pos < end && out.length < MAX_EXTENTS_PER_CALL) {
      const index = Math.floor(pos / PAGE_SIZE);
      let runEnd: number;
      let kind: number;
      if (i < order.length && order[i] === index) {
        // Extend over consecutive allocated pages (while they start before `end`).
        let j = i;
        while (j + 1 < order.length && order[j + 1] === order[j]! + 1 && order[j + 1]! * PAGE_SIZE < end) j++;
        runEnd = Math.min(end, (order[j]! + 1) * PAGE_SIZE);
        kind = 0;
        i = j + 1;
      } else {
        runEnd = i < order.length ? Math.min(end, order[i]! * PAGE_SIZE) : end;
        kind = EXTENT.HOLE | EXTENT.ZERO;
      }
      out.push({ offset: pos, length: runEnd - pos, flags: kind });
      pos = runEnd;
      if (flags & REQ.REQ_ONE) break;
    }
    return out;
  }

  /** Everything is already in RAM. */
  async cache(_offset: number, _length: number, _flags: number): Promise<void> {
    this.#check('cache');
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#pages.clear();
    this.#order = [];
  }

  #check(op: string): void {
    if (this.#closed) throw closedError(op, this.description);
  }

  #checkWritable(op: string): void {
    this.#check(op);
    if (this.#readonly) throw readOnlyError(op, this.description);
  }

  /** The page at `index`, allocated (zero-filled) if it was a hole. */
  #allocate(index: number): Buffer {
    let page = this.#pages.get(index);
    if (page) return page;
    page = Buffer.alloc(PAGE_SIZE);
    this.#pages.set(index, page);
    const order = this.#order;
    if (order.length === 0 || order[order.length - 1]! < index) order.push(index);
    else order.splice(lowerBound(order, index), 0, index);
    return page;
  }

  /** Frees every allocated page with index in [first, end). */
  #freeRange(first: number, end: number): void {
    if (first >= end) return;
    const order = this.#order;
    const lo = lowerBound(order, first);
    const hi = lowerBound(order, end);
    if (lo === hi) return;
    for (let k = lo; k < hi; k++) this.#pages.delete(order[k]!);
    order.splice(lo, hi - lo);
  }

  /** Zero-fills [from, to) of a page, if allocated, and frees it when it is all zero. */
  #clearPartial(index: number, from: number, to: number): void {
    const page = this.#pages.get(index);
    if (!page) return;
    page.fill(0, from, to);
    if (page.equals(ZERO_PAGE)) this.#freeRange(index, index + 1);
  }
}

/** The settings schema (listed by `blockgate plugins`). */
export const memorySettings = settingsSchema({ size: sizeSetting, readonly: booleanSetting });

/** Backend factory: `{ type: 'memory', size, readonly? }`. */
export function memoryBackend(desc: LayerDescription): MemoryDevice {
  const s = parseSettings('memory', memorySettings, desc);
  return new MemoryDevice({ size: s.size, readonly: s.readonly ?? false });
}
