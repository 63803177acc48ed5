/**
 * The cow filter: copy-on-write over a base device that is never written (nbdkit's cow
 * filter, overlayfs' upper directory).
 *
 * Writes go to an *upper store*, a device of the base's size with its own ErrSeq (it
 * plays overlayfs' upper filesystem and its `s_wb_err`). Allocation is tracked in
 * COW_BLOCK_SIZE blocks: a block is read from the upper store once it has been written,
 * from the base before. A write that covers a block only in part first copies the rest
 * of that block up from the base. Trims are hints and do nothing (the block keeps what
 * it holds); zeroes are written to the upper store.
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
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as v from 'valibot';
import { FilterDevice } from '../device/filter.js';
import { REQ, type BlockDevice, type BlockSize, type Capabilities, type Extent } from '../device/types.js';
import type { LayerDescription, StackContext } from '../device/stack.js';
import { BlockError, codeFromLinux, toBlockError } from '../errors/index.js';
import { ErrSeq } from '../errseq/index.js';
import { booleanSetting, closedError, parseSettings, settingsSchema } from '../backends/common.js';

/** Allocation granule of the upper store: 64 KiB, as nbdkit's cow filter. */
export const COW_BLOCK_SIZE = 64 * 1024;

/**
 * One extents() call looks at no more than this many blocks (4 GiB); the caller asks
 * again from where the answer stopped. Bounds the work of one request on a huge device.
 */
export const MAX_COW_EXTENT_BLOCKS = 65536;

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

interface Run {
  readonly start: number;
  readonly end: number;
  readonly upper: boolean;
}

/** Copy-on-write over `next` (the base). */
export class CowFilter extends FilterDevice {
  readonly #upper: BlockDevice;
  readonly #upperErrseq: ErrSeq;
  readonly #volatile: boolean;
  readonly #cleanup: (() => void | Promise<void>) | undefined;
  readonly #blockSize: BlockSize;
  /** Indexes of the blocks that live in the upper store. */
  readonly #allocated = new Set<number>();
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
  /** Bytes held in the upper store (a multiple of COW_BLOCK_SIZE). */
  get allocatedBytes(): number {
    return this.#allocated.size * COW_BLOCK_SIZE;
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
      jobs.push(r.upper ? this.#upper.read(part, r.start, 0) : this.next.read(part, r.start, flags));
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
    if (length > 0) await this.#modify(offset, length, () => this.#upper.zero(offset, length, flags & REQ.NO_HOLE));
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

  /** Blocks in the upper store are data; the rest is as the base says. */
  override async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    this.#checkOpen('extents');
    if (this.#allocated.size === 0) return this.next.extents(offset, length, flags);
    const size = this.size;
    let end = length === 0 ? Math.min(size, offset + COW_BLOCK_SIZE) : Math.min(size, offset + length);
    end = Math.min(end, (Math.floor(offset / COW_BLOCK_SIZE) + MAX_COW_EXTENT_BLOCKS) * COW_BLOCK_SIZE);
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
      if (r.upper) {
        push(r.start, r.end, 0);
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
    return flags & REQ.REQ_ONE ? out.slice(0, 1) : out;
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

  /**
   * Runs `change` (a write to the upper store over [offset, offset + length)) after
   * copying up the parts of its first and last blocks that it does not cover, then
   * marks the blocks allocated. Changes that copy up run one at a time, so two partial
   * writes into one new block cannot both copy it and lose one another's bytes.
   */
  async #modify(offset: number, length: number, change: () => Promise<void>): Promise<void> {
    const first = Math.floor(offset / COW_BLOCK_SIZE);
    const last = Math.floor((offset + length - 1) / COW_BLOCK_SIZE);
    if (this.#allAllocated(first, last)) return change();
    const run = this.#copyUpTail.then(async () => {
      const end = offset + length;
      const parts: [number, number][] = [];
      const headStart = first * COW_BLOCK_SIZE;
      if (!this.#allocated.has(first) && headStart < offset) parts.push([headStart, offset]);
      const tailEnd = Math.min((last + 1) * COW_BLOCK_SIZE, this.size);
      if (!this.#allocated.has(last) && end < tailEnd) parts.push([end, tailEnd]);
      for (const [s, e] of parts) {
        const b = Buffer.alloc(e - s);
        await this.next.read(b, s, 0);
        await this.#upper.write(b, s, 0);
      }
      await change();
      for (let i = first; i <= last; i++) this.#allocated.add(i);
    });
    this.#copyUpTail = run.catch(() => undefined);
    return run.catch((e: unknown) => {
      throw toBlockError(e);
    });
  }

  #allAllocated(first: number, last: number): boolean {
    for (let i = first; i <= last; i++) if (!this.#allocated.has(i)) return false;
    return true;
  }

  /** [start, end) cut into maximal runs of blocks in the upper store or in the base. */
  #runs(start: number, end: number): Run[] {
    const out: Run[] = [];
    let pos = start;
    while (pos < end) {
      const index = Math.floor(pos / COW_BLOCK_SIZE);
      const upper = this.#allocated.has(index);
      let stop = Math.min(end, (index + 1) * COW_BLOCK_SIZE);
      while (stop < end && this.#allocated.has(Math.floor(stop / COW_BLOCK_SIZE)) === upper) {
        stop = Math.min(end, stop + COW_BLOCK_SIZE);
      }
      out.push({ start: pos, end: stop, upper });
      pos = stop;
    }
    return out;
  }
}

const layerSchema = v.looseObject(
  { type: v.string((issue) => `expected a filter type name, got ${issue.received}`) },
  (issue) => `expected a filter description object, got ${issue.received}`,
);

const cowSettings = settingsSchema({
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
export async function cowFilter(next: BlockDevice, desc: LayerDescription, _ctx: StackContext): Promise<CowFilter> {
  const s = parseSettings('cow', cowSettings, desc);
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
    // Imported here: the registry imports this module to list it.
    const { createStack } = await import('./registry.js');
    upper = await createStack({ backend, filters: (s.upperFilters ?? []) as LayerDescription[] }, { errseq: upperErrseq });
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
