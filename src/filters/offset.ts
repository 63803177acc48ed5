/**
 * The offset filter: serves the byte range [offset, offset + range) of the device below
 * (nbdkit's offset filter). Every request is shifted by `offset`, extents are shifted
 * back and clipped to the range, and the size is `range` (by default: from `offset` to
 * the end of the device below, followed as that device's size changes).
 *
 * A range that does not fit in the device below is an error when the filter is made,
 * as in nbdkit (use the truncate filter to grow a device). So is an `offset` that is
 * not a multiple of the minimum block size below: every aligned request from a client
 * would arrive unaligned (put a blocksize filter below this one for such a device).
 */
import { FilterDevice } from '../device/filter.js';
import type { BlockDevice, Extent } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import { formatSize, parseSettings, settingsSchema, sizeSetting } from '../device/index.js';
import * as v from 'valibot';
import { BlockError } from '../errors/index.js';

/** Settings of an offset filter. */
export interface OffsetOptions {
  /** Start of the served range in the device below. @default 0 */
  readonly offset?: number;
  /** Length of the served range. @default from `offset` to the end of the device below */
  readonly range?: number;
}

/** Serves [offset, offset + range) of `next` as a device of its own. */
export class OffsetFilter extends FilterDevice {
  readonly offset: number;
  readonly #range: number | undefined;

  /** Reads are only shifted, so a backend's zero-copy reads pass through (when it has them). */
  readonly readViews?: (offset: number, length: number) => Buffer[];

  constructor(next: BlockDevice, options: OffsetOptions = {}) {
    super(next);
    const offset = options.offset ?? 0;
    const range = options.range;
    const end = offset + (range ?? 0);
    if (offset > next.size || end > next.size) {
      const what = range === undefined ? `offset ${offset}` : `offset ${offset} + range ${range}`;
      throw new BlockError('EINVAL', `${what} is past the end of ${next.description} (size ${next.size})`);
    }
    const min = next.blockSize.minimum;
    if (offset % min !== 0) {
      throw new BlockError(
        'EINVAL',
        `offset ${offset} is not a multiple of the minimum block size ${min} of ${next.description} (a blocksize filter below this one can fix that)`,
      );
    }
    this.offset = offset;
    this.#range = range;
    if (next.readViews) this.readViews = (o, n) => next.readViews!(o + offset, n);
  }

  override get size(): number {
    return this.#range ?? Math.max(0, this.next.size - this.offset);
  }
  override get description(): string {
    return `${this.next.description} (offset ${formatSize(this.offset)}, range ${formatSize(this.size)})`;
  }
  override read(buf: Buffer, offset: number, flags: number): Promise<void> {
    return this.next.read(buf, offset + this.offset, flags);
  }
  override write(data: Buffer, offset: number, flags: number): Promise<void> {
    return this.next.write(data, offset + this.offset, flags);
  }
  override trim(offset: number, length: number, flags: number): Promise<void> {
    return this.next.trim(offset + this.offset, length, flags);
  }
  override zero(offset: number, length: number, flags: number): Promise<void> {
    return this.next.zero(offset + this.offset, length, flags);
  }
  override cache(offset: number, length: number, flags: number): Promise<void> {
    return this.next.cache(offset + this.offset, length, flags);
  }
  override async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    // A length of 0 asks "to the end"; below, that would mean past our range.
    const size = this.size;
    const ask = length === 0 ? size - offset : length;
    if (ask === 0) return [];
    return shiftExtents(await this.next.extents(offset + this.offset, ask, flags), this.offset, size);
  }
}

/**
 * Extents of the device below, `by` bytes into it, as extents of a device of `size`
 * bytes starting there: shifted back by `by`, clipped to [0, size), dropping any that
 * fall outside.
 */
export function shiftExtents(below: readonly Extent[], by: number, size: number): Extent[] {
  const out: Extent[] = [];
  for (const e of below) {
    const start = Math.max(e.offset - by, 0);
    const end = Math.min(e.offset + e.length - by, size);
    if (end > start) out.push({ offset: start, length: end - start, flags: e.flags });
  }
  return out;
}

/** The settings schema (listed by `blockgate plugins`). */
export const offsetSettings = settingsSchema({
  offset: v.optional(sizeSetting),
  range: v.optional(sizeSetting),
});

/** Filter factory: `{ type: 'offset', offset?, range? }` (see {@link OffsetOptions}). */
export function offsetFilter(next: BlockDevice, desc: LayerDescription): OffsetFilter {
  const s = parseSettings('offset', offsetSettings, desc);
  try {
    return new OffsetFilter(next, {
      ...(s.offset !== undefined ? { offset: s.offset } : {}),
      ...(s.range !== undefined ? { range: s.range } : {}),
    });
  } catch (e) {
    if (e instanceof BlockError) throw new BlockError(e.code, `offset: ${e.message}`);
    throw e;
  }
}
