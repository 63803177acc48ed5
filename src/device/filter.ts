import type { BlockDevice, BlockSize, Capabilities, Extent } from './types.js';

/**
 * Base class of filters: a BlockDevice wrapping `next`, passing through every method
 * and property it does not override (nbdkit's filter model). A filter is only the lines
 * it changes.
 */
export class FilterDevice implements BlockDevice {
  /** The device below this one (nearer the backend). */
  readonly next: BlockDevice;

  constructor(next: BlockDevice) {
    this.next = next;
  }

  get size(): number {
    return this.next.size;
  }
  get capabilities(): Capabilities {
    return this.next.capabilities;
  }
  get blockSize(): BlockSize {
    return this.next.blockSize;
  }
  get nonBlocking(): boolean {
    return this.next.nonBlocking;
  }
  get description(): string {
    return this.next.description;
  }
  read(buf: Buffer, offset: number, flags: number): Promise<void> {
    return this.next.read(buf, offset, flags);
  }
  write(data: Buffer, offset: number, flags: number): Promise<void> {
    return this.next.write(data, offset, flags);
  }
  flush(flags: number): Promise<void> {
    return this.next.flush(flags);
  }
  trim(offset: number, length: number, flags: number): Promise<void> {
    return this.next.trim(offset, length, flags);
  }
  zero(offset: number, length: number, flags: number): Promise<void> {
    return this.next.zero(offset, length, flags);
  }
  extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    return this.next.extents(offset, length, flags);
  }
  cache(offset: number, length: number, flags: number): Promise<void> {
    return this.next.cache(offset, length, flags);
  }
  close(): Promise<void> {
    return this.next.close();
  }
}
