/**
 * The cow filter: copy-on-write over a base device that is never written (nbdkit's cow
 * filter, overlayfs' upper directory).
 *
 * Writes go to an *upper store*, a device of the base's size with its own ErrSeq (it
 * plays overlayfs' upper filesystem and its `s_wb_err`). Each COW_BLOCK_SIZE block is in
 * one of three states, kept as a sorted list of block ranges (so memory follows how
 * fragmented the overlay is, never the device size): *base* (read from the base),
 * *upper* (read from the upper store) or *zero* (reads as zeroes, nothing stored). A
 * write that covers a block only in part first copies the rest of that block up (from
 * the base, or zeroes for a zero block). A zero marks whole blocks *zero* without any
 * I/O, so zeroing a whole device is cheap even over a file upper store; only its
 * partial end blocks are written. Trims are hints and do nothing (a block keeps what it
 * holds).
 *
 * The upper store is `upper: 'memory'` (default) or `'file'` (a temporary file in
 * `dir`, removed at close), optionally under its own filters (`upperFilters`, top
 * first, e.g. a writeback cache and an error filter that model an upper filesystem
 * with a page cache that can fail). Library callers can pass any device and ErrSeq.
 *
 * Two modes, as overlayfs:
 * - normal: flush() flushes the upper store, then reports any write-back error the
 *   upper store recorded since the last flush (a cursor sampled at attach and advanced
 *   like an open file's), so a failure inside the upper store reaches the export's
 *   sessions through the FLUSH that follows it.
 * - `volatile: true` (FL6, overlayfs "volatile"): the upper store is never flushed, so
 *   nothing written is promised to survive a crash, but no error may go unnoticed. At
 *   attach the filter refuses with EIO if the upper store holds an error nobody has
 *   seen (a snapshot could then miss a repeat of it, see src/errseq), then snapshots
 *   the upper ErrSeq. Every request checks the snapshot with the non-consuming masked
 *   `check`, so looking never takes an error away from another reader of the upper
 *   store. Once an error has happened after attach the overlay has *failed*: every
 *   later flush, read and write fails EIO, for good ("the filesystem will not
 *   recover"). Reads check again after the data arrives, since a failed write-back in
 *   the upper store may have left stale data there.
 *
 * Over 500 lines on purpose: the block map, the copy-up rules and the two error modes
 * are one invariant (a block's state and where its bytes are); split, each half would
 * have to re-derive the other's state.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as v from 'valibot';
import { FilterDevice } from '../device/filter.js';
import { EXTENT, REQ, type BlockDevice, type BlockSize, type Capabilities, type Extent } from '../device/types.js';
import { buildStack, type LayerDescription, type StackContext } from '../device/stack.js';
import { BlockError, codeFromLinux, toBlockError } from '../errors/index.js';
import { ErrSeq } from '../errseq/index.js';
import { booleanSetting, closedError, parseSettings, settingsSchema } from '../device/index.js';

/** Allocation granule of the upper store: 64 KiB, as nbdkit's cow filter. */
export const COW_BLOCK_SIZE = 64 * 1024;

/** At most this many extents are returned by one extents() call (the caller asks again). */
export const MAX_COW_EXTENTS = 1024;

/** Kinds of upper store the factory can make. */
export const COW_UPPER_KINDS = ['memory', 'file'] as const;

const CAPABILITIES: Capabilities = Object.freeze({
  write: true,
  flush: true,
  fua: true,
  trim: true,
  zero: true,
  // Partial blocks are copied up first, which is not fast.
  fastZero: false,
  extents: true,
  cache: true,
  multiConn: true,
});

/** What a CowFilter is built from. */
export interface CowOptions {
  /** Where writes go: a writable device at least as large as the base. */
  readonly upper: BlockDevice;
  /** The upper store's write-back error sequence. */
  readonly upperErrseq: ErrSeq;
  /** @default false */
  readonly volatile?: boolean;
  /** Called after the upper store is closed (removes its temporary files). */
  readonly cleanup?: () => void | Promise<void>;
}

/** Where a block's contents are. */
export type CowBlockState = 'base' | 'upper' | 'zero';

/** A range of blocks [start, end) in one state other than 'base'. */
interface BlockRange {
  readonly start: number;
  readonly end: number;
  readonly state: Exclude<CowBlockState, 'base'>;
}

/** A byte range [start, end) in one state. */
interface Run {
  readonly start: number;
  readonly end: number;
  readonly state: CowBlockState;
}

/**
 * The state of every block: sorted, disjoint, maximal ranges of 'upper' and 'zero'
 * blocks; blocks in no range are 'base'. Setting a range is one binary search and one
 * splice, so its cost follows the number of ranges, not the number of blocks.
 */
export class BlockMap {
  #ranges: BlockRange[] = [];

  /** Index of the first range ending after block `i`. */
  #firstEndingAfter(i: number): number {
    const r = this.#ranges;
    let lo = 0;
    let hi = r.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (r[mid]!.end <= i) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  get(i: number): CowBlockState {
    const r = this.#ranges[this.#firstEndingAfter(i)];
    return r && r.start <= i ? r.state : 'base';
  }

  /** True if every block of [start, end) is in `state` (one range covers it, ranges being maximal). */
  covers(start: number, end: number, state: Exclude<CowBlockState, 'base'>): boolean {
    const r = this.#ranges[this.#firstEndingAfter(start)];
    return r !== undefined && r.state === state && r.start <= start && r.end >= end;
  }

  /** Puts blocks [start, end) in `state`, merging with neighbours in the same state. */
  set(start: number, end: number, state: Exclude<CowBlockState, 'base'>): void {
    if (end <= start) return;
    const r = this.#ranges;
    let i = this.#firstEndingAfter(start);
    if (i > 0 && r[i - 1]!.end === start && r[i - 1]!.state === state) i--;
    let j = i;
    let newStart = start;
    let newEnd = end;
    const left: BlockRange[] = [];
    const right: BlockRange[] = [];
    for (; j < r.length; j++) {
      const x = r[j]!;
      // Past the range, or only touching it in another state: untouched.
      if (x.start > end || (x.start === end && x.state !== state)) break;
      if (x.state === state) {
        newStart = Math.min(newStart, x.start);
        newEnd = Math.max(newEnd, x.end);
      } else {
        if (x.start < start) left.push({ start: x.start, end: start, state: x.state });
        if (x.end > end) right.push({ start: end, end: x.end, state: x.state });
      }
    }
    r.splice(i, j - i, ...left, { start: newStart, end: newEnd, state }, ...right);
  }

  /** Blocks held in `state`. */
  count(state: Exclude<CowBlockState, 'base'>): number {
    let n = 0;
    for (const x of this.#ranges) if (x.state === state) n += x.end - x.start;
    return n;
  }

  /** True if no block is out of the base. */
  get empty(): boolean {
    return this.#ranges.length === 0;
  }

  /** [start, end) of block indexes cut into maximal runs of one state. */
  runs(start: number, end: number): { start: number; end: number; state: CowBlockState }[] {
    const out: { start: number; end: number; state: CowBlockState }[] = [];
    let pos = start;
    for (let i = this.#firstEndingAfter(start); i < this.#ranges.length && pos < end; i++) {
      const x = this.#ranges[i]!;
      if (x.start >= end) break;
      if (x.start > pos) out.push({ start: pos, end: x.start, state: 'base' });
      const s = Math.max(x.start, pos);
      const e = Math.min(x.end, end);
      out.push({ start: s, end: e, state: x.state });
      pos = e;
    }
    if (pos < end) out.push({ start: pos, end, state: 'base' });
    return out;
  }
}

/** Copy-on-write over `next` (the base). */
export class CowFilter extends FilterDevice {
  readonly #upper: BlockDevice;
  readonly #upperErrseq: ErrSeq;
  readonly #volatile: boolean;
  readonly #cleanup: (() => void | Promise<void>) | undefined;
  readonly #blockSize: BlockSize;
  /** Where each block's contents are. */
  readonly #blocks = new BlockMap();
  /** Volatile: the upper ErrSeq at attach; normal: this overlay's flush cursor. */
  #since: number;
  #failed = false;
  #closed = false;
  /** Tail of the copy-up queue: writes that copy blocks up run one at a time. */
  #copyUpTail: Promise<void> = Promise.resolve();

  /** Throws EINVAL for an unusable upper store, EIO for a volatile attach over an unseen error. */
  constructor(next: BlockDevice, options: CowOptions) {
    super(next);
    const { upper, upperErrseq } = options;
    if (upper.size < next.size) {
      throw new BlockError('EINVAL', `cow: upper: the upper store (${upper.size} bytes) is smaller than the base (${next.size})`);
    }
    if (!upper.capabilities.write) throw new BlockError('EINVAL', `cow: upper: the upper store is read-only`);
    this.#volatile = options.volatile ?? false;
    if (this.#volatile && upperErrseq.peekError() !== 0 && !upperErrseq.seen) {
      const code = codeFromLinux(upperErrseq.peekError()) ?? 'EIO';
      throw new BlockError(
        'EIO',
        `cow: cannot attach volatile when the upper store has an unseen error (${code}); flush the upper store to clear it`,
      );
    }
    this.#upper = upper;
    this.#upperErrseq = upperErrseq;
    this.#cleanup = options.cleanup;
    // With no unseen error present, sample() is the exact word: every later set() changes it.
    this.#since = upperErrseq.sample();
    const a = next.blockSize;
    const b = upper.blockSize;
    const minimum = Math.max(a.minimum, b.minimum);
    const preferred = Math.max(a.preferred, b.preferred, minimum);
    this.#blockSize = Object.freeze({ minimum, preferred, maximum: Math.max(Math.min(a.maximum, b.maximum), preferred) });
  }

  override get capabilities(): Capabilities {
    return CAPABILITIES;
  }
  override get blockSize(): BlockSize {
    return this.#blockSize;
  }
  override get nonBlocking(): boolean {
    return this.next.nonBlocking && this.#upper.nonBlocking;
  }
  override get description(): string {
    return `${this.next.description} (copy-on-write${this.#volatile ? ', volatile' : ''})`;
  }

  /** The upper store (for tests and tools). */
  get upper(): BlockDevice {
    return this.#upper;
  }
  /** The upper store's ErrSeq (for tests and tools: inject or inspect its errors). */
  get upperErrseq(): ErrSeq {
    return this.#upperErrseq;
  }
  get volatile(): boolean {
    return this.#volatile;
  }
  /** Bytes of blocks held in the upper store (a multiple of COW_BLOCK_SIZE). */
  get allocatedBytes(): number {
    return this.#blocks.count('upper') * COW_BLOCK_SIZE;
  }
  /** The state of the block holding byte `offset` (for tests and tools). */
  blockState(offset: number): CowBlockState {
    return this.#blocks.get(Math.floor(offset / COW_BLOCK_SIZE));
  }
  /**
   * Volatile mode: true once the upper store has had an error since attach. Looking
   * does not consume anything.
   */
  get failed(): boolean {
    if (this.#volatile && !this.#failed && this.#upperErrseq.check(this.#since) !== 0) this.#failed = true;
    return this.#failed;
  }

  override async read(buf: Buffer, offset: number, flags: number): Promise<void> {
    this.#checkOpen('read');
    const jobs: Promise<void>[] = [];
    for (const r of this.#runs(offset, offset + buf.length)) {
      const part = buf.subarray(r.start - offset, r.end - offset);
      if (r.state === 'upper') jobs.push(this.#upper.read(part, r.start, 0));
      else if (r.state === 'base') jobs.push(this.next.read(part, r.start, flags));
      else part.fill(0);
    }
    await Promise.all(jobs);
    this.#checkOpen('read');
  }

  override async write(data: Buffer, offset: number, flags: number): Promise<void> {
    this.#checkOpen('write');
    if (data.length > 0) await this.#modify(offset, data.length, () => this.#upper.write(data, offset, 0));
    if (flags & REQ.FUA) await this.#durable('write');
  }

  override async zero(offset: number, length: number, flags: number): Promise<void> {
    this.#checkOpen('zero');
    if (flags & REQ.FAST_ZERO) throw new BlockError('EOPNOTSUPP', 'zero: the cow filter cannot zero fast');
    if (length > 0) await this.#zero(offset, length, flags & REQ.NO_HOLE);
    if (flags & REQ.FUA) await this.#durable('zero');
  }

  /** A hint: blocks keep what they hold. */
  override async trim(_offset: number, _length: number, _flags: number): Promise<void> {
    this.#checkOpen('trim');
  }

  /**
   * Normal: flushes the upper store, then reports a write-back error it recorded since
   * the last flush. Volatile: never flushes; fails EIO once the upper store has failed.
   */
  override async flush(flags: number): Promise<void> {
    this.#checkOpen('flush');
    if (this.#volatile) return;
    await this.#upper.flush(flags);
    const { error, cursor } = this.#upperErrseq.checkAndAdvance(this.#since);
    this.#since = cursor;
    if (error !== 0) {
      const code = codeFromLinux(error) ?? 'EIO';
      throw new BlockError(code, `flush: the upper store had a write-back error (${code}) since the last flush`);
    }
  }

  /** Blocks in the upper store are data, zero blocks read as zeroes, the rest is as the base says. */
  override async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    this.#checkOpen('extents');
    if (this.#blocks.empty) return this.next.extents(offset, length, flags);
    const end = length === 0 ? Math.min(this.size, offset + COW_BLOCK_SIZE) : Math.min(this.size, offset + length);
    const out: Extent[] = [];
    const push = (start: number, stop: number, f: number): void => {
      const prev = out[out.length - 1];
      if (prev && prev.flags === f && prev.offset + prev.length === start) {
        out[out.length - 1] = { offset: prev.offset, length: stop - prev.offset, flags: f };
      } else {
        out.push({ offset: start, length: stop - start, flags: f });
      }
    };
    for (const r of this.#runs(offset, end)) {
      if (out.length >= MAX_COW_EXTENTS || (flags & REQ.REQ_ONE && out.length > 0)) break;
      if (r.state !== 'base') {
        // Zero blocks hold nothing, but NO_HOLE may have asked for allocation: ZERO only.
        push(r.start, r.end, r.state === 'upper' ? 0 : EXTENT.ZERO);
        continue;
      }
      const base = await this.next.extents(r.start, r.end - r.start, flags);
      let reached = r.start;
      for (const e of base) {
        const stop = Math.min(e.offset + e.length, r.end);
        if (stop <= reached) break;
        push(reached, stop, e.flags);
        reached = stop;
      }
      // The base answered for less than the run: stop here, the caller asks again.
      if (reached < r.end) break;
    }
    if (out.length === 0) return [];
    return flags & REQ.REQ_ONE ? out.slice(0, 1) : out.slice(0, MAX_COW_EXTENTS);
  }

  override async cache(offset: number, length: number, flags: number): Promise<void> {
    this.#checkOpen('cache');
    await this.next.cache(offset, length, flags);
  }

  /** Closes the upper store (removing its temporary file), then the base. */
  override async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      await this.#upper.close();
      await this.#cleanup?.();
    } finally {
      await this.next.close();
    }
  }

  /** Rejects calls on a closed device, and in volatile mode every call once failed. */
  #checkOpen(op: string): void {
    if (this.#closed) throw closedError(op, this.description);
    if (this.failed) {
      throw new BlockError(
        'EIO',
        `${op}: the volatile overlay has failed: its upper store had a write-back error since attach (it will not recover)`,
      );
    }
  }

  /** A FUA request: normal mode flushes the upper store; volatile promises nothing more. */
  async #durable(op: string): Promise<void> {
    if (this.#volatile) {
      this.#checkOpen(op);
      return;
    }
    // Only the flush: an upper write-back error is left for the next flush() to report,
    // since that reply is the one the server records for every session.
    await this.#upper.flush(0);
  }

  /** Runs `fn` after every earlier copy-up or zero has finished (see #modify). */
  #serialised<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#copyUpTail.then(fn);
    this.#copyUpTail = run.then(
      () => undefined,
      () => undefined,
    );
    return run.catch((e: unknown) => {
      throw toBlockError(e);
    });
  }

  /**
   * Runs `change` (a write to the upper store over [offset, offset + length)) and
   * marks its blocks 'upper'. Blocks already in the upper store need nothing else; for
   * the others, the parts of the first and last block that `change` does not cover
   * are copied up first (from the base, or zeroes for a zero block). Such changes run
   * one at a time, so two partial writes into one new block cannot both copy it up and
   * lose one another's bytes.
   */
  async #modify(offset: number, length: number, change: () => Promise<void>): Promise<void> {
    const first = Math.floor(offset / COW_BLOCK_SIZE);
    const last = Math.floor((offset + length - 1) / COW_BLOCK_SIZE);
    if (this.#blocks.covers(first, last + 1, 'upper')) return change();
    return this.#serialised(() => this.#copyUpAndChange(offset, length, change));
  }

  /** The body of #modify; the caller holds the copy-up turn. */
  async #copyUpAndChange(offset: number, length: number, change: () => Promise<void>): Promise<void> {
    const end = offset + length;
    const first = Math.floor(offset / COW_BLOCK_SIZE);
    const last = Math.floor((end - 1) / COW_BLOCK_SIZE);
    const parts: [number, number, CowBlockState][] = [];
    const headStart = first * COW_BLOCK_SIZE;
    const headState = this.#blocks.get(first);
    if (headState !== 'upper' && headStart < offset) parts.push([headStart, offset, headState]);
    const tailEnd = Math.min((last + 1) * COW_BLOCK_SIZE, this.size);
    const tailState = this.#blocks.get(last);
    if (tailState !== 'upper' && end < tailEnd) parts.push([end, tailEnd, tailState]);
    for (const [s, e, state] of parts) {
      const b = Buffer.alloc(e - s);
      if (state === 'base') await this.next.read(b, s, 0);
      await this.#upper.write(b, s, 0);
    }
    await change();
    this.#blocks.set(first, last + 1, 'upper');
  }

  /**
   * zero(): whole blocks become 'zero' blocks without any I/O (their old upper copies
   * are trimmed, a hint); the partial blocks at either end are zeroed in the upper store.
   */
  #zero(offset: number, length: number, noHole: number): Promise<void> {
    const end = offset + length;
    const B = COW_BLOCK_SIZE;
    const firstFull = Math.ceil(offset / B);
    // The device's last block may be short: a range reaching the end covers it whole.
    const endFull = end === this.size ? Math.ceil(end / B) : Math.floor(end / B);
    const zeroIn = (s: number, e: number): Promise<void> =>
      this.#copyUpAndChange(s, e - s, () => this.#upper.zero(s, e - s, noHole));
    return this.#serialised(async () => {
      if (firstFull >= endFull) {
        await zeroIn(offset, end);
        return;
      }
      if (offset < firstFull * B) await zeroIn(offset, firstFull * B);
      if (endFull * B < end) await zeroIn(endFull * B, end);
      const wasUpper = this.#blocks.runs(firstFull, endFull).filter((r) => r.state === 'upper');
      this.#blocks.set(firstFull, endFull, 'zero');
      for (const r of wasUpper) {
        const s = r.start * B;
        const e = Math.min(r.end * B, this.size);
        // Only frees space in the upper store; the block reads as zeroes either way.
        await this.#upper.trim(s, e - s, 0).catch(() => undefined);
      }
    });
  }

  /** [start, end) in bytes, cut into maximal runs of blocks in one state. */
  #runs(start: number, end: number): Run[] {
    if (end <= start) return [];
    const B = COW_BLOCK_SIZE;
    return this.#blocks.runs(Math.floor(start / B), Math.floor((end - 1) / B) + 1).map((r) => ({
      start: Math.max(start, r.start * B),
      end: Math.min(end, r.end * B),
      state: r.state,
    }));
  }
}

const layerSchema = v.looseObject(
  { type: v.string((issue) => `expected a filter type name, got ${issue.received}`) },
  (issue) => `expected a filter description object, got ${issue.received}`,
);

/** The settings schema (listed by `blockgate plugins`). */
export const cowSettings = settingsSchema({
  upper: v.optional(
    v.picklist(COW_UPPER_KINDS, (issue) => `expected one of ${COW_UPPER_KINDS.join(', ')}, got ${issue.received}`),
  ),
  dir: v.optional(
    v.pipe(v.string((issue) => `expected a directory path, got ${issue.received}`), v.minLength(1, 'must not be empty')),
  ),
  volatile: booleanSetting,
  upperFilters: v.optional(v.array(layerSchema, (issue) => `expected a list of filters, got ${issue.received}`)),
});

/**
 * Filter factory: `{ type: 'cow', upper?: 'memory' | 'file', dir?, volatile?, upperFilters? }`.
 * The upper store gets its own ErrSeq, shared by its own filters.
 */
export async function cowFilter(next: BlockDevice, desc: LayerDescription, ctx: StackContext): Promise<CowFilter> {
  const s = parseSettings('cow', cowSettings, desc);
  const registry = ctx.registry;
  if (!registry) throw new BlockError('EINVAL', 'cow: the upper store needs a stack registry (build cow with buildStack)');
  if (s.dir !== undefined && s.upper !== 'file') throw new BlockError('EINVAL', `cow: dir: only used with upper: 'file'`);
  let tmp: string | undefined;
  let backend: LayerDescription = { type: 'memory', size: next.size };
  if (s.upper === 'file') {
    try {
      tmp = fs.mkdtempSync(path.join(s.dir ?? os.tmpdir(), 'blockgate-cow-'));
    } catch (e) {
      const b = toBlockError(e);
      throw new BlockError(b.code, `cow: dir: cannot create a temporary directory: ${b.message}`, { cause: e });
    }
    backend = { type: 'file', path: path.join(tmp, 'upper.img'), size: next.size, create: true };
  }
  const cleanup = tmp === undefined ? undefined : () => fs.rmSync(tmp, { recursive: true, force: true });
  const upperErrseq = new ErrSeq();
  let upper: BlockDevice;
  try {
    upper = await buildStack({ backend, filters: (s.upperFilters ?? []) as LayerDescription[] }, registry, { errseq: upperErrseq });
  } catch (e) {
    cleanup?.();
    const b = toBlockError(e);
    throw new BlockError(b.code, `cow: ${s.upperFilters ? 'upperFilters' : 'upper'}: ${b.message}`, { cause: e });
  }
  try {
    return new CowFilter(next, { upper, upperErrseq, volatile: s.volatile ?? false, ...(cleanup ? { cleanup } : {}) });
  } catch (e) {
    await upper.close().catch(() => undefined);
    cleanup?.();
    throw e;
  }
}
