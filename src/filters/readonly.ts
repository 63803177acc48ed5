/**
 * The readonly filter: makes any device read-only (nbdkit's readonly filter). Writes,
 * trims and zeroes fail EPERM here, before reaching the device, and the capabilities
 * say so, so frontends advertise a read-only export.
 */
import { FilterDevice } from '../device/filter.js';
import type { BlockDevice, Capabilities } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import { parseSettings, readOnlyCapabilities, readOnlyError, settingsSchema } from '../device/index.js';

/** A read-only view of `next`. */
export class ReadonlyFilter extends FilterDevice {
  readonly #capabilities: Capabilities;

  /** Reads pass through unchanged, so a backend's zero-copy reads do too (when it has them). */
  readonly readViews?: (offset: number, length: number) => Buffer[];

  constructor(next: BlockDevice) {
    super(next);
    this.#capabilities = readOnlyCapabilities(next.capabilities);
    if (next.readViews) this.readViews = (offset, length) => next.readViews!(offset, length);
  }

  override get capabilities(): Capabilities {
    return this.#capabilities;
  }
  override get description(): string {
    return `${this.next.description} (read-only)`;
  }
  override async write(_data: Buffer, _offset: number, _flags: number): Promise<void> {
    throw readOnlyError('write', this.description);
  }
  override async trim(_offset: number, _length: number, _flags: number): Promise<void> {
    throw readOnlyError('trim', this.description);
  }
  override async zero(_offset: number, _length: number, _flags: number): Promise<void> {
    throw readOnlyError('zero', this.description);
  }
}

/** The settings schema (listed by `blockgate plugins`). */
export const readonlySettings = settingsSchema({});

/** Filter factory: `{ type: 'readonly' }` (no settings). */
export function readonlyFilter(next: BlockDevice, desc: LayerDescription): ReadonlyFilter {
  parseSettings('readonly', readonlySettings, desc);
  return new ReadonlyFilter(next);
}
