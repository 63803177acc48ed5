/**
 * The null backend (nbdkit's null plugin): reads return zeroes, writes are discarded,
 * and every range is reported as a hole. Useful to measure protocol overhead alone and
 * to test clients without storage.
 */
import * as v from 'valibot';
import { formatSize } from '../device/size.js';
import { EXTENT, type BlockDevice, type Capabilities, type Extent } from '../device/types.js';
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
  singleExtent,
  sizeSetting,
} from '../device/index.js';

/** Settings of a null device. */
export interface NullOptions {
  /**
   * Size in bytes.
   * @default 0 (as nbdkit's null plugin)
   */
  readonly size?: number;
  /**
   * Reject writes, trims and zeroes with EPERM.
   * @default false
   */
  readonly readonly?: boolean;
}

/** A device that stores nothing. */
export class NullDevice implements BlockDevice {
  readonly size: number;
  readonly capabilities: Capabilities;
  readonly blockSize = DEFAULT_BLOCK_SIZE;
  readonly nonBlocking = true;
  readonly description: string;

  #readonly: boolean;
  #closed = false;

  constructor(options: NullOptions = {}) {
    this.size = options.size ?? 0;
    this.#readonly = options.readonly ?? false;
    this.capabilities = this.#readonly ? readOnlyCapabilities(FULL_CAPABILITIES) : FULL_CAPABILITIES;
    this.description = `null ${formatSize(this.size)}${this.#readonly ? ' (read-only)' : ''}`;
  }

  async read(buf: Buffer, _offset: number, _flags: number): Promise<void> {
    this.#check('read');
    buf.fill(0);
  }

  async write(_data: Buffer, _offset: number, _flags: number): Promise<void> {
    this.#checkWritable('write');
  }

  async flush(_flags: number): Promise<void> {
    this.#check('flush');
  }

  async trim(_offset: number, _length: number, _flags: number): Promise<void> {
    this.#checkWritable('trim');
  }

  async zero(_offset: number, _length: number, _flags: number): Promise<void> {
    this.#checkWritable('zero');
  }

  /** One hole covering the request (REQ_ONE needs nothing special: it is one extent). */
  async extents(offset: number, length: number, _flags: number): Promise<Extent[]> {
    this.#check('extents');
    return singleExtent(offset, length, this.size, EXTENT.HOLE | EXTENT.ZERO);
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

  #checkWritable(op: string): void {
    this.#check(op);
    if (this.#readonly) throw readOnlyError(op, this.description);
  }
}

/** The settings schema (listed by `blockgate plugins`). */
export const nullSettings = settingsSchema({ size: v.optional(sizeSetting, 0), readonly: booleanSetting });

/** Backend factory: `{ type: 'null', size?, readonly? }` (size defaults to 0). */
export function nullBackend(desc: LayerDescription): NullDevice {
  const s = parseSettings('null', nullSettings, desc);
  return new NullDevice({ size: s.size, readonly: s.readonly ?? false });
}
