/**
 * The pattern backend (the same data as nbdkit's pattern plugin): a read-only device
 * whose every 8-byte-aligned word holds its own offset as a big-endian u64. Any byte of
 * a copy can be checked against its offset alone, which makes it the data source of the
 * interop and copy tests. {@link patternByte} and {@link fillPattern} are the pure
 * definition, exported for those checks.
 */
import { formatSize } from '../device/size.js';
import type { BlockDevice, Capabilities, Extent } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import {
  DEFAULT_BLOCK_SIZE,
  closedError,
  parseSettings,
  readOnlyError,
  settingsSchema,
  singleExtent,
  sizeSetting,
} from '../device/index.js';

const TWO_32 = 2 ** 32;

/**
 * The byte at `offset` of the pattern: byte `offset % 8` (big-endian) of the u64 whose
 * value is `offset` rounded down to a multiple of 8. Offsets are below 2^53, so the
 * high half of the word is below 2^21 and both halves are exact.
 */
export function patternByte(offset: number): number {
  const word = offset - (offset % 8);
  const i = offset % 8;
  return i < 4 ? (Math.floor(word / TWO_32) >>> (8 * (3 - i))) & 0xff : ((word % TWO_32) >>> (8 * (7 - i))) & 0xff;
}

/** Fills `buf` with the pattern bytes of [offset, offset + buf.length). */
export function fillPattern(buf: Buffer, offset: number): void {
  let i = 0;
  while (i < buf.length && (offset + i) % 8 !== 0) {
    buf[i] = patternByte(offset + i);
    i++;
  }
  while (i + 8 <= buf.length) {
    const word = offset + i;
    buf.writeUInt32BE(Math.floor(word / TWO_32), i);
    buf.writeUInt32BE(word % TWO_32, i + 4);
    i += 8;
  }
  while (i < buf.length) {
    buf[i] = patternByte(offset + i);
    i++;
  }
}

/** Read-only: nothing to write, flush or deallocate; cache is a harmless no-op. */
const CAPABILITIES: Capabilities = Object.freeze({
  write: false,
  flush: false,
  fua: false,
  trim: false,
  zero: false,
  fastZero: false,
  extents: false,
  cache: true,
  multiConn: true,
});

/** Settings of a pattern device. */
export interface PatternOptions {
  /** Size in bytes. */
  readonly size: number;
}

/** The read-only offset-pattern device. */
export class PatternDevice implements BlockDevice {
  readonly size: number;
  readonly capabilities = CAPABILITIES;
  readonly blockSize = DEFAULT_BLOCK_SIZE;
  readonly nonBlocking = true;
  readonly description: string;

  #closed = false;

  constructor(options: PatternOptions) {
    this.size = options.size;
    this.description = `pattern ${formatSize(this.size)}`;
  }

  async read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    this.#check('read');
    fillPattern(buf, offset);
  }

  async write(_data: Buffer, _offset: number, _flags: number): Promise<void> {
    throw this.#readOnly('write');
  }

  /** Nothing was ever written, so there is nothing to make durable. */
  async flush(_flags: number): Promise<void> {
    this.#check('flush');
  }

  async trim(_offset: number, _length: number, _flags: number): Promise<void> {
    throw this.#readOnly('trim');
  }

  async zero(_offset: number, _length: number, _flags: number): Promise<void> {
    throw this.#readOnly('zero');
  }

  /** All data, one extent. */
  async extents(offset: number, length: number, _flags: number): Promise<Extent[]> {
    this.#check('extents');
    return singleExtent(offset, length, this.size, 0);
  }

  async cache(_offset: number, _length: number, _flags: number): Promise<void> {
    this.#check('cache');
  }

  async close(): Promise<void> {
    this.#closed = true;
  }

  #check(op: string): void {
    if (this.#closed) throw closedError(op, this.description);
  }

  #readOnly(op: string): Error {
    this.#check(op);
    return readOnlyError(op, this.description);
  }
}

/** The settings schema (listed by `blockgate plugins`). */
export const patternSettings = settingsSchema({ size: sizeSetting });

/** Backend factory: `{ type: 'pattern', size }`. */
export function patternBackend(desc: LayerDescription): PatternDevice {
  const s = parseSettings('pattern', patternSettings, desc);
  return new PatternDevice({ size: s.size });
}
