/**
 * The writeback filter: a write-back cache (the Linux page cache in front of a disk).
 *
 * write(), zero() and trim() are acknowledged once the request is in memory; a
 * background writer sends them to the layer below in the order they were acknowledged,
 * joining adjacent writes into one. Dirty memory is bounded by `maxDirty`: a writer
 * that does not fit waits until write-back frees room. Reads see the newest data: the
 * dirty ranges are laid over what the layer below returns.
 *
 * Errors follow Linux's "Handling errors during writeback" (vfs.rst) and the reference's
 * FL1-FL4:
 * - A background write-back failure is nobody's direct reply, so it is recorded with
 *   `ctx.errseq.set(errno)` (FL1) and every session hears of it once, at its next FLUSH.
 * - flush() writes back everything acknowledged before it, then calls the layer below's
 *   flush (FL4). It throws only the error of that lower flush. Write-back failures,
 *   even those that happen during this flush's own write-out, go only through the
 *   ErrSeq: the server's FLUSH replies `flushError || checkAndAdvance(cursor)`, so the
 *   flushing session still gets them, exactly once. If flush() also threw them, the
 *   server would `set` the same failure a second time and, when another session had
 *   consumed it in between, bump the counter and make that session hear it twice.
 * - What happens to the data of a failed write-back is the `onError` policy:
 *   'drop' (default, Linux's behaviour): the range leaves the cache, reads go to the
 *   layer below again, and the error is the only trace; a later flush succeeds, so a
 *   reported error means data loss (FL3, PostgreSQL's fsyncgate lesson).
 *   'keep': the failed write stays dirty at the head of the queue, write-back stops
 *   there (later writes may overlap it, so they must not overtake it), and the next
 *   flush or FUA request retries it. Each failed retry is recorded again, so every
 *   flush fails while the layer below keeps failing. A writer that would have to wait
 *   for room while write-back is stopped gets the error instead of waiting forever.
 * - A FUA write or zero is written back in order with everything before it, with FUA
 *   passed down; its own failure is its direct reply (not recorded: it was never
 *   acknowledged), failures of earlier writes are background failures as above.
 * - Trims are hints: a failed trim write-back loses no data and is not recorded.
 *
 * Write-back requests carry {@link REQ_WRITEBACK} so that a layer below (the error
 * filter) can tell them from client requests.
 *
 * One cache instance serves every connection of an export (one stack per export), and
 * its flush writes back the writes of all connections, so multi-conn is safe.
 *
 * Over 500 lines: the dirty map, the background write-out, the space waiters and the
 * flush barrier are one invariant (which bytes are dirty, written, or failed) that every
 * operation reads and changes.
 */
import * as v from 'valibot';
import { FilterDevice } from '../device/filter.js';
import { EXTENT, REQ, type BlockDevice, type Capabilities, type Extent } from '../device/types.js';
import type { LayerDescription, StackContext } from '../device/stack.js';
import { BlockError, toBlockError } from '../errors/index.js';
import { closedError, parseSettings, readOnlyError, settingsSchema, sizeSetting } from '../device/index.js';
import { Deque } from '../io/deque.js';

/**
 * Request flag on the write(), zero() and trim() calls that a writeback filter makes
 * for its background write-back. A high bit, far from the NBD command-flag bits that
 * `REQ` mirrors, so it cannot collide with a protocol flag; layers that do not know it
 * ignore it.
 */
export const REQ_WRITEBACK = 0x1000;

/** Default bound of dirty memory: 64 MiB. */
export const DEFAULT_MAX_DIRTY = 64 * 2 ** 20;

/**
 * Bookkeeping cost charged per queued request on top of its data (queue entry, overlay
 * interval), so that a flood of data-less zero or trim requests is bounded by maxDirty
 * as well.
 */
export const ENTRY_OVERHEAD = 64;

/**
 * Adjacent writes are joined into one write below up to this many bytes: 1 MiB, enough
 * to turn a stream of 4 KiB writes into few large ones, small enough that the joining
 * copy stays cheap. A single write larger than this is written as it is.
 */
export const MAX_COALESCE_SIZE = 2 ** 20;

/** At most this many extents are returned by one extents() call (the caller asks again). */
export const MAX_WRITEBACK_EXTENTS = 1024;

/** The policies for dirty data whose write-back failed. */
export const WRITEBACK_ON_ERROR = ['drop', 'keep'] as const;
export type WritebackOnError = (typeof WRITEBACK_ON_ERROR)[number];

/** Settings of a writeback filter. */
export interface WritebackOptions {
  /**
   * Bound of dirty memory in bytes. A request larger than the bound is accepted when
   * the cache is empty, so a small bound never blocks a large write forever.
   * @default DEFAULT_MAX_DIRTY
   */
  readonly maxDirty?: number;
  /** @default 'drop' */
  readonly onError?: WritebackOnError;
}

type Kind = 'write' | 'zero' | 'trim';

/** The settle callbacks of a FUA request waiting for its own write-back. */
interface Waiter {
  resolve(): void;
  reject(e: BlockError): void;
}

/** One acknowledged request waiting for write-back. */
interface Entry {
  readonly seq: number;
  readonly kind: Kind;
  readonly offset: number;
  readonly length: number;
  /** The data of a write (a private copy, never changed). */
  readonly data: Buffer | null;
  /** Flags to pass down (NO_HOLE for zero; FUA for a FUA request). */
  flags: number;
  readonly cost: number;
  /** Set while a FUA request waits for this entry; such entries are never joined. */
  waiter: Waiter | null;
}

/** A part of the device whose newest contents are (part of) a queued entry. */
interface Piece {
  readonly start: number;
  readonly end: number;
  readonly entry: Entry;
}

/** A flush() waiting for every entry up to `target` to be written back (or failed). */
interface FlushWaiter {
  readonly target: number;
  readonly resolve: () => void;
}

/** A writer waiting for room in the cache. */
interface SpaceWaiter {
  readonly cost: number;
  readonly resolve: () => void;
  readonly reject: (e: BlockError) => void;
}

/** Index of the first piece whose end is after `pos`. */
function firstEndingAfter(pieces: readonly Piece[], pos: number): number {
  let lo = 0;
  let hi = pieces.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (pieces[mid]!.end <= pos) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** A write-back cache over `next`. */
export class WritebackFilter extends FilterDevice {
  readonly #ctx: StackContext;
  readonly #maxDirty: number;
  readonly #onError: WritebackOnError;
  readonly #capabilities: Capabilities;

  /** Entries not yet written back, oldest first, from #head. */
  #queue: Entry[] = [];
  #head = 0;
  /** Sorted, non-overlapping: for each dirty byte, the newest entry that holds it. */
  #overlay: Piece[] = [];
  #dirty = 0;
  #nextSeq = 1;
  /** Every entry with seq <= #completed has been written back, dropped or answered. */
  #completed = 0;
  #running = false;
  /** 'keep' policy: the failure that stopped write-back at the head of the queue. */
  #stopped: BlockError | null = null;
  #flushWaiters: FlushWaiter[] = [];
  /** Writers waiting for room, FIFO; a ring so waking the oldest is O(1) however many wait. */
  readonly #spaceWaiters = new Deque<SpaceWaiter>();
  #closed = false;
  #writebacks = 0;
  #failures = 0;

  constructor(next: BlockDevice, ctx: StackContext, options: WritebackOptions = {}) {
    super(next);
    this.#ctx = ctx;
    this.#maxDirty = options.maxDirty ?? DEFAULT_MAX_DIRTY;
    this.#onError = options.onError ?? 'drop';
    const c = next.capabilities;
    this.#capabilities = Object.freeze({ ...c, flush: true, fua: c.write, multiConn: true });
  }

  override get capabilities(): Capabilities {
    return this.#capabilities;
  }
  /** Writes may wait for room in the cache. */
  override get nonBlocking(): boolean {
    return false;
  }
  override get description(): string {
    return `${this.next.description} (write-back)`;
  }

  /** Bytes of dirty memory charged now (data plus ENTRY_OVERHEAD per queued request). */
  get dirtyBytes(): number {
    return this.#dirty;
  }
  /** Requests acknowledged and not yet written back. */
  get dirtyRequests(): number {
    return this.#queue.length - this.#head;
  }
  /** Writers waiting for room. */
  get waitingWriters(): number {
    return this.#spaceWaiters.size;
  }
  /** Calls made to the layer below for write-back (after joining). */
  get writebackCount(): number {
    return this.#writebacks;
  }
  /** Write-back calls that failed. */
  get failureCount(): number {
    return this.#failures;
  }
  /** The 'keep' failure that stopped write-back, until a flush retries successfully. */
  get stoppedBy(): BlockError | null {
    return this.#stopped;
  }
  /** The policy for failed dirty data. */
  get onError(): WritebackOnError {
    return this.#onError;
  }

  override async read(buf: Buffer, offset: number, flags: number): Promise<void> {
    this.#check('read');
    const end = offset + buf.length;
    // Take the dirty pieces before reading below: an entry written back while the read
    // is in flight leaves the overlay, but the snapshot still holds its data, so the
    // read never returns what was below before that entry landed.
    const pieces = this.#piecesIn(offset, end);
    let covered = 0;
    for (const p of pieces) if (p.entry.kind !== 'trim') covered += p.end - p.start;
    if (covered < buf.length) await this.next.read(buf, offset, flags);
    for (const p of pieces) {
      const e = p.entry;
      if (e.kind === 'write') e.data!.copy(buf, p.start - offset, p.start - e.offset, p.end - e.offset);
      else if (e.kind === 'zero') buf.fill(0, p.start - offset, p.end - offset);
      // A dirty trim leaves the contents unspecified: whatever is below will do.
    }
  }

  override async write(data: Buffer, offset: number, flags: number): Promise<void> {
    this.#checkWritable('write');
    if (data.length === 0) return;
    const cost = data.length + ENTRY_OVERHEAD;
    const wait = this.#admit(cost);
    if (wait) await wait;
    // A private copy: the caller may reuse its buffer once this promise settles.
    const copy = Buffer.allocUnsafe(data.length);
    data.copy(copy);
    await this.#enqueue('write', offset, data.length, copy, flags & REQ.FUA, cost);
  }

  override async zero(offset: number, length: number, flags: number): Promise<void> {
    this.#checkWritable('zero');
    const c = this.next.capabilities;
    if (!c.zero) throw new BlockError('EOPNOTSUPP', `zero: ${this.next.description} cannot zero`);
    // Accepting a fast zero that the layer below would refuse would turn a quick
    // EOPNOTSUPP into a background failure; refuse it now, as the layer below would.
    if (flags & REQ.FAST_ZERO && !c.fastZero) {
      throw new BlockError('EOPNOTSUPP', `zero: ${this.next.description} cannot zero fast`);
    }
    if (length === 0) return;
    const wait = this.#admit(ENTRY_OVERHEAD);
    if (wait) await wait;
    await this.#enqueue('zero', offset, length, null, flags & (REQ.NO_HOLE | REQ.FUA), ENTRY_OVERHEAD);
  }

  override async trim(offset: number, length: number, flags: number): Promise<void> {
    this.#checkWritable('trim');
    if (length === 0) return;
    const wait = this.#admit(ENTRY_OVERHEAD);
    if (wait) await wait;
    await this.#enqueue('trim', offset, length, null, flags & REQ.FUA, ENTRY_OVERHEAD);
  }

  /**
   * Writes back everything acknowledged before this call, then flushes the layer below.
   * Throws only the lower flush's error; write-back failures are in the ErrSeq (see the
   * module comment for why).
   */
  override async flush(flags: number): Promise<void> {
    this.#check('flush');
    await this.#writeOut(this.#nextSeq - 1);
    await this.next.flush(flags);
  }

  /**
   * The allocation below with the dirty ranges laid over it: dirty writes are data,
   * dirty zeroes read as zeroes (not claimed as holes), dirty trims keep what is below.
   */
  override async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    this.#check('extents');
    const below = await this.next.extents(offset, length, flags);
    if (below.length === 0) return below;
    const last = below[below.length - 1]!;
    const pieces = this.#piecesIn(offset, last.offset + last.length);
    const out: Extent[] = [];
    const push = (start: number, end: number, f: number): void => {
      if (end <= start) return;
      const prev = out[out.length - 1];
      if (prev && prev.flags === f && prev.offset + prev.length === start) {
        out[out.length - 1] = { offset: prev.offset, length: end - prev.offset, flags: f };
      } else {
        out.push({ offset: start, length: end - start, flags: f });
      }
    };
    let k = 0;
    for (const ext of below) {
      let pos = ext.offset;
      const end = ext.offset + ext.length;
      while (k < pieces.length && pieces[k]!.end <= pos) k++;
      for (let j = k; j < pieces.length && pieces[j]!.start < end; j++) {
        const p = pieces[j]!;
        const s = Math.max(p.start, pos);
        const e = Math.min(p.end, end);
        push(pos, s, ext.flags);
        const f = p.entry.kind === 'write' ? 0 : p.entry.kind === 'zero' ? EXTENT.ZERO : ext.flags;
        push(s, e, f);
        pos = e;
      }
      push(pos, end, ext.flags);
      if (out.length >= MAX_WRITEBACK_EXTENTS) break;
    }
    if (flags & REQ.REQ_ONE) return out.slice(0, 1);
    return out.length > MAX_WRITEBACK_EXTENTS ? out.slice(0, MAX_WRITEBACK_EXTENTS) : out;
  }

  override async cache(offset: number, length: number, flags: number): Promise<void> {
    this.#check('cache');
    await this.next.cache(offset, length, flags);
  }

  /**
   * Writes back what is dirty (one more attempt under 'keep'), then closes the layer
   * below. Writers still waiting for room fail EBADF: they were never acknowledged.
   * Anything that cannot be written back is recorded in the ErrSeq and dropped.
   */
  override async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const w of this.#spaceWaiters.drain()) w.reject(closedError('write', this.description));
    await this.#writeOut(this.#nextSeq - 1);
    this.#queue = [];
    this.#head = 0;
    this.#overlay = [];
    this.#dirty = 0;
    await this.next.close();
  }

  #check(op: string): void {
    if (this.#closed) throw closedError(op, this.description);
  }

  #checkWritable(op: string): void {
    this.#check(op);
    if (!this.next.capabilities.write) throw readOnlyError(op, this.description);
  }

  /**
   * Reserves `cost` bytes of dirty memory: synchronously when it fits (undefined), else
   * a promise that resolves in FIFO order as write-back frees room.
   */
  #admit(cost: number): Promise<void> | undefined {
    if (this.#spaceWaiters.size === 0 && this.#fits(cost)) {
      this.#dirty += cost;
      return undefined;
    }
    if (this.#stopped) return Promise.reject(this.#stoppedError());
    return new Promise<void>((resolve, reject) => this.#spaceWaiters.pushBack({ cost, resolve, reject }));
  }

  #fits(cost: number): boolean {
    return this.#dirty === 0 || this.#dirty + cost <= this.#maxDirty;
  }

  #stoppedError(): BlockError {
    const s = this.#stopped!;
    return new BlockError(s.code, `write-back is stopped by an earlier failure (${s.message}); flush to retry`, {
      cause: s,
    });
  }

  #wakeSpaceWaiters(): void {
    while (this.#spaceWaiters.size > 0 && this.#fits(this.#spaceWaiters.peekFront()!.cost)) {
      const w = this.#spaceWaiters.popFront()!;
      this.#dirty += w.cost;
      w.resolve();
    }
  }

  /**
   * Queues an acknowledged request (its cost already reserved) and lays it over the
   * dirty map. A FUA request resolves when it has been written back itself.
   */
  #enqueue(kind: Kind, offset: number, length: number, data: Buffer | null, flags: number, cost: number): Promise<void> {
    const entry: Entry = { seq: this.#nextSeq++, kind, offset, length, data, flags, cost, waiter: null };
    this.#queue.push(entry);
    this.#layOver(entry);
    if (!(flags & REQ.FUA)) {
      this.#kick();
      return Promise.resolve();
    }
    const done = new Promise<void>((resolve, reject) => (entry.waiter = { resolve, reject }));
    // A FUA request needs write-back to move: under 'keep', it is also a retry.
    this.#stopped = null;
    this.#kick();
    return done;
  }

  /** Starts the background writer if it is idle and has work. */
  #kick(): void {
    if (this.#running || this.#stopped || this.#head >= this.#queue.length) return;
    this.#running = true;
    // Start after the current turn, so that requests arriving together (one socket
    // read carries many) are queued before the first batch is taken and can be joined.
    queueMicrotask(() => void this.#drain());
  }

  /** The background writer: one batch at a time, strictly in order. */
  async #drain(): Promise<void> {
    try {
      while (!this.#stopped && this.#head < this.#queue.length) {
        const batch = this.#takeBatch();
        let error: BlockError | null = null;
        try {
          await this.#writeBack(batch);
        } catch (e) {
          error = toBlockError(e);
        }
        if (error) this.#failed(batch, error);
        else this.#finish(batch, null);
      }
    } finally {
      this.#running = false;
      // Stopped (or idle): nobody waiting for write-out can make progress now.
      if (this.#stopped) this.#releaseFlushWaiters(Infinity);
    }
  }

  /** The head entry and, for plain writes and zeroes, the adjacent ones after it. */
  #takeBatch(): Entry[] {
    const first = this.#queue[this.#head]!;
    const batch = [first];
    if (first.waiter || first.kind === 'trim') return batch;
    const limit = Math.min(MAX_COALESCE_SIZE, this.next.blockSize.maximum);
    let end = first.offset + first.length;
    let bytes = first.length;
    for (let i = this.#head + 1; i < this.#queue.length; i++) {
      const e = this.#queue[i]!;
      if (e.kind !== first.kind || e.waiter || e.offset !== end || e.flags !== first.flags) break;
      if (first.kind === 'write' && bytes + e.length > limit) break;
      batch.push(e);
      end += e.length;
      bytes += e.length;
    }
    return batch;
  }

  async #writeBack(batch: Entry[]): Promise<void> {
    const first = batch[0]!;
    const last = batch[batch.length - 1]!;
    const length = last.offset + last.length - first.offset;
    const nextFua = this.next.capabilities.fua;
    const fua = first.flags & REQ.FUA ? (nextFua ? REQ.FUA : 0) : 0;
    const flags = REQ_WRITEBACK | fua;
    this.#writebacks++;
    if (first.kind === 'write') {
      const data = batch.length === 1 ? first.data! : Buffer.concat(batch.map((e) => e.data!), length);
      await this.next.write(data, first.offset, flags);
    } else if (first.kind === 'zero') {
      await this.next.zero(first.offset, length, flags | (first.flags & REQ.NO_HOLE));
    } else {
      await this.next.trim(first.offset, length, flags);
    }
    // A FUA request over a layer without native FUA: a flush makes it durable.
    if (first.flags & REQ.FUA && !nextFua) await this.next.flush(0);
  }

  #failed(batch: Entry[], error: BlockError): void {
    this.#failures++;
    const first = batch[0]!;
    // A trim is a hint: its failure loses nothing. A FUA request's own failure is its
    // direct reply, and it was never acknowledged: neither is recorded.
    if (first.kind === 'trim' || first.waiter) {
      this.#finish(batch, first.waiter ? error : null);
      return;
    }
    // Nobody is waiting for this write-back: the ErrSeq is the only way the failure
    // reaches the clients (FL1). Recorded before any room is freed, so a writer that
    // waited for this room knows the failure is recorded when it is acknowledged.
    this.#ctx.errseq.set(error.errno);
    if (this.#onError === 'drop') {
      this.#finish(batch, null);
      return;
    }
    this.#stopped = error;
    // FUA requests queued behind the failure cannot be made durable now: tell them.
    // Their data stays queued as ordinary dirty data.
    for (let i = this.#head; i < this.#queue.length; i++) {
      const e = this.#queue[i]!;
      if (e.waiter) {
        e.waiter.reject(this.#stoppedError());
        e.waiter = null;
        e.flags &= ~REQ.FUA;
      }
    }
    for (const w of this.#spaceWaiters.drain()) w.reject(this.#stoppedError());
  }

  /**
   * Removes a processed batch from the head of the queue and from the dirty map, frees
   * its room and answers whoever waits for it.
   */
  #finish(batch: Entry[], ownError: BlockError | null): void {
    for (const e of batch) {
      this.#removeFromOverlay(e);
      this.#dirty -= e.cost;
      this.#completed = e.seq;
      const w = e.waiter;
      e.waiter = null;
      if (w) {
        if (ownError) w.reject(ownError);
        else w.resolve();
      }
    }
    this.#head += batch.length;
    if (this.#head === this.#queue.length) {
      this.#queue = [];
      this.#head = 0;
    } else if (this.#head > 1024 && this.#head * 2 > this.#queue.length) {
      this.#queue = this.#queue.slice(this.#head);
      this.#head = 0;
    }
    this.#wakeSpaceWaiters();
    this.#releaseFlushWaiters(this.#completed);
  }

  #releaseFlushWaiters(through: number): void {
    if (this.#flushWaiters.length === 0) return;
    const keep: FlushWaiter[] = [];
    for (const w of this.#flushWaiters) {
      if (w.target <= through) w.resolve();
      else keep.push(w);
    }
    this.#flushWaiters = keep;
  }

  /**
   * Resolves when every entry up to `target` has been written back or has failed. Under
   * 'keep', a stopped queue is retried once (the "retry at the next flush"); if that
   * fails again, this resolves with the data still dirty and the failure recorded.
   */
  #writeOut(target: number): Promise<void> {
    if (target <= this.#completed) return Promise.resolve();
    const done = new Promise<void>((resolve) => this.#flushWaiters.push({ target, resolve }));
    this.#stopped = null;
    this.#kick();
    return done;
  }

  /** Lays `entry` over the dirty map: it is now the newest contents of its range. */
  #layOver(entry: Entry): void {
    const start = entry.offset;
    const end = start + entry.length;
    const pieces = this.#overlay;
    const i = firstEndingAfter(pieces, start);
    let j = i;
    const replacement: Piece[] = [];
    while (j < pieces.length && pieces[j]!.start < end) {
      const p = pieces[j]!;
      if (p.start < start) replacement.push({ start: p.start, end: start, entry: p.entry });
      if (p.end > end) replacement.push({ start: end, end: p.end, entry: p.entry });
      j++;
    }
    // Order: a left remainder, the new piece, a right remainder.
    const left = replacement.filter((p) => p.end <= start);
    const right = replacement.filter((p) => p.start >= end);
    pieces.splice(i, j - i, ...left, { start, end, entry }, ...right);
  }

  /** Removes what is left of `entry` in the dirty map (the parts no newer entry covers). */
  #removeFromOverlay(entry: Entry): void {
    const pieces = this.#overlay;
    const start = entry.offset;
    const end = start + entry.length;
    const i = firstEndingAfter(pieces, start);
    let j = i;
    while (j < pieces.length && pieces[j]!.start < end) j++;
    if (j === i) return;
    const kept = pieces.slice(i, j).filter((p) => p.entry !== entry);
    if (kept.length !== j - i) pieces.splice(i, j - i, ...kept);
  }

  /** The dirty pieces inside [start, end), clipped to it. */
  #piecesIn(start: number, end: number): Piece[] {
    const pieces = this.#overlay;
    const out: Piece[] = [];
    for (let i = firstEndingAfter(pieces, start); i < pieces.length && pieces[i]!.start < end; i++) {
      const p = pieces[i]!;
      out.push({ start: Math.max(p.start, start), end: Math.min(p.end, end), entry: p.entry });
    }
    return out;
  }
}

/** The settings schema (listed by `blockgate plugins`). */
export const writebackSettings = settingsSchema({
  maxDirty: v.optional(sizeSetting),
  onError: v.optional(
    v.picklist(WRITEBACK_ON_ERROR, (issue) => `expected one of ${WRITEBACK_ON_ERROR.join(', ')}, got ${issue.received}`),
  ),
});

/** Filter factory: `{ type: 'writeback', maxDirty?: size, onError?: 'drop' | 'keep' }`. */
export function writebackFilter(next: BlockDevice, desc: LayerDescription, ctx: StackContext): WritebackFilter {
  const s = parseSettings('writeback', writebackSettings, desc);
  return new WritebackFilter(next, ctx, {
    ...(s.maxDirty !== undefined ? { maxDirty: s.maxDirty } : {}),
    ...(s.onError !== undefined ? { onError: s.onError } : {}),
  });
}
