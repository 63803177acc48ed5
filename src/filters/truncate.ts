/**
 * The truncate filter: changes the size of the device below (nbdkit's truncate filter).
 *
 * The size is the device's own, then set to `size` if given, then rounded up to a
 * multiple of `roundUp`, then down to a multiple of `roundDown` (in that order, as
 * nbdkit applies truncate=, round-up= and round-down=). It follows the device below
 * when that one is resized and only `roundUp`/`roundDown` are set.
 *
 * Smaller: the bytes past the new end are out of reach. Larger: the bytes past the old
 * end (the tail) read as zeroes and are reported as a hole of zeroes; writing zeroes
 * there succeeds and does nothing, writing anything else fails ENOSPC, and trims and
 * zeroes of the tail do nothing. Unlike nbdkit, which writes the part below the old end
 * first and then fails, a write with non-zero bytes in the tail fails before anything
 * is written.
 */
import * as v from 'valibot';
import { FilterDevice } from '../device/filter.js';
import { EXTENT, MAX_DEVICE_SIZE, REQ, type BlockDevice, type Capabilities, type Extent } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import { formatSize, parseSettings, settingsSchema, sizeSetting } from '../device/index.js';
import { BlockError } from '../errors/index.js';

/** Settings of a truncate filter. */
export interface TruncateOptions {
  /** The new size in bytes. @default the size of the device below */
  readonly size?: number;
  /** Round the size up to a multiple of this power of two. @default no rounding */
  readonly roundUp?: number;
  /** Round the size down to a multiple of this power of two. @default no rounding */
  readonly roundDown?: number;
}

function isZero(b: Buffer): boolean {
  // Compare in page-sized slices against one zero page (no allocation per call).
  for (let at = 0; at < b.length; at += ZERO_PAGE.length) {
    const piece = b.subarray(at, at + ZERO_PAGE.length);
    if (!piece.equals(ZERO_PAGE.subarray(0, piece.length))) return false;
  }
  return true;
}
const ZERO_PAGE = Buffer.alloc(65536);

/** `next` made smaller or larger (see the module comment). */
export class TruncateFilter extends FilterDevice {
  readonly #options: TruncateOptions;
  readonly #capabilities: Capabilities;

  constructor(next: BlockDevice, options: TruncateOptions = {}) {
    super(next);
    this.#options = options;
    for (const key of ['roundUp', 'roundDown'] as const) {
      const n = options[key];
      if (n !== undefined && !(Number.isSafeInteger(n) && n > 0 && n <= 2 ** 32 && Number.isInteger(Math.log2(n)))) {
        throw new BlockError('EINVAL', `${key}: ${n} must be a power of two from 1 to 4G`);
      }
    }
    const size = this.size;
    if (size > MAX_DEVICE_SIZE) throw new BlockError('EINVAL', `cannot round the size up past 2^53 - 1`);
    // The tail is cheap to describe and to zero (nothing to do), as nbdkit says.
    const c = next.capabilities;
    this.#capabilities = Object.freeze({ ...c, extents: true, fastZero: c.zero });
  }

  /** The size of the device below, which is where the zero tail starts. */
  get realSize(): number {
    return this.next.size;
  }
  override get size(): number {
    const o = this.#options;
    let size = o.size ?? this.next.size;
    if (o.roundUp !== undefined) size = Math.ceil(size / o.roundUp) * o.roundUp;
    if (o.roundDown !== undefined) size = Math.floor(size / o.roundDown) * o.roundDown;
    return size;
  }
  override get capabilities(): Capabilities {
    return this.#capabilities;
  }
  override get description(): string {
    return `${this.next.description} (truncated to ${formatSize(this.size)})`;
  }

  /** The part of [offset, offset + length) below the real end: its length. */
  #below(offset: number, length: number): number {
    return Math.max(0, Math.min(length, this.realSize - offset));
  }

  override async read(buf: Buffer, offset: number, flags: number): Promise<void> {
    const n = this.#below(offset, buf.length);
    buf.fill(0, n);
    if (n > 0) await this.next.read(n === buf.length ? buf : buf.subarray(0, n), offset, flags);
  }
  override async write(data: Buffer, offset: number, flags: number): Promise<void> {
    const n = this.#below(offset, data.length);
    if (n < data.length && !isZero(data.subarray(n))) {
      throw new BlockError(
        'ENOSPC',
        `write: non-zero data past the end of ${this.next.description} (size ${this.realSize}); only zeroes can be written there`,
      );
    }
    if (n > 0) await this.next.write(n === data.length ? data : data.subarray(0, n), offset, flags);
  }
  override async trim(offset: number, length: number, flags: number): Promise<void> {
    const n = this.#below(offset, length);
    if (n > 0) await this.next.trim(offset, n, flags);
  }
  override async zero(offset: number, length: number, flags: number): Promise<void> {
    const n = this.#below(offset, length);
    if (n === 0) return;
    if (flags & REQ.FAST_ZERO && !this.next.capabilities.fastZero) {
      throw new BlockError('EOPNOTSUPP', `zero: ${this.next.description} cannot zero fast`);
    }
    await this.next.zero(offset, n, flags);
  }
  override async cache(offset: number, length: number, flags: number): Promise<void> {
    const n = this.#below(offset, length);
    if (n > 0) await this.next.cache(offset, n, flags);
  }
  override async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    const size = this.size;
    const real = Math.min(this.realSize, size);
    const end = length === 0 ? size : Math.min(size, offset + length);
    if (offset >= end) return [];
    if (offset >= real) return [{ offset, length: end - offset, flags: EXTENT.HOLE | EXTENT.ZERO }];
    const out: Extent[] = [];
    for (const e of await this.next.extents(offset, Math.min(end, real) - offset, flags)) {
      const stop = Math.min(e.offset + e.length, real);
      if (stop > e.offset) out.push(stop === e.offset + e.length ? e : { ...e, length: stop - e.offset });
    }
    // Below reached the real end: the tail follows, unless one extent was asked for.
    const last = out.at(-1);
    if (last && last.offset + last.length === real && end > real && !(flags & REQ.REQ_ONE)) {
      out.push({ offset: real, length: end - real, flags: EXTENT.HOLE | EXTENT.ZERO });
    }
    return out;
  }
}

const roundSetting = v.optional(sizeSetting);

/** The settings schema (listed by `blockgate plugins`). */
export const truncateSettings = settingsSchema({
  size: v.optional(sizeSetting),
  roundUp: roundSetting,
  roundDown: roundSetting,
});

/** Filter factory: `{ type: 'truncate', size?, roundUp?, roundDown? }` (see {@link TruncateOptions}). */
export function truncateFilter(next: BlockDevice, desc: LayerDescription): TruncateFilter {
  const s = parseSettings('truncate', truncateSettings, desc);
  const options: TruncateOptions = Object.fromEntries(Object.entries(s).filter(([k, val]) => k !== 'type' && val !== undefined));
  try {
    return new TruncateFilter(next, options);
  } catch (e) {
    if (e instanceof BlockError) throw new BlockError(e.code, `truncate: ${e.message}`);
    throw e;
  }
}
