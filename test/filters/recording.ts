/**
 * A device for filter tests: a memory device that records every call made to it (in
 * the order they start) and can hold write-type calls (write, zero, trim, flush) until
 * the test releases them, so that tests can see what a filter does while its layer
 * below is busy, without any timing.
 */
import { FilterDevice } from '../../src/device/filter.js';
import type { BlockDevice } from '../../src/device/types.js';
import { MemoryDevice } from '../../src/backends/memory.js';

export interface Call {
  readonly op: 'read' | 'write' | 'zero' | 'trim' | 'flush' | 'extents' | 'cache';
  readonly offset: number;
  readonly length: number;
  readonly flags: number;
  /** For writes: a copy of the data. */
  readonly data?: Buffer;
}

export class RecordingDevice extends FilterDevice {
  readonly calls: Call[] = [];
  #held = false;
  #waiting: (() => void)[] = [];

  constructor(next: BlockDevice = new MemoryDevice({ size: 4 * 2 ** 20 })) {
    super(next);
  }

  /** Calls of one kind, in order. */
  of(op: Call['op']): Call[] {
    return this.calls.filter((c) => c.op === op);
  }

  /** From now on, write, zero, trim and flush wait until {@link release}. */
  hold(): void {
    this.#held = true;
  }

  /** Lets every held call (and later ones) proceed. */
  release(): void {
    this.#held = false;
    for (const w of this.#waiting.splice(0)) w();
  }

  /** Number of calls waiting in hold(). */
  get heldCount(): number {
    return this.#waiting.length;
  }

  async #gate(): Promise<void> {
    if (this.#held) await new Promise<void>((resolve) => this.#waiting.push(resolve));
  }

  override async read(buf: Buffer, offset: number, flags: number): Promise<void> {
    this.calls.push({ op: 'read', offset, length: buf.length, flags });
    return this.next.read(buf, offset, flags);
  }
  override async write(data: Buffer, offset: number, flags: number): Promise<void> {
    this.calls.push({ op: 'write', offset, length: data.length, flags, data: Buffer.from(data) });
    await this.#gate();
    return this.next.write(data, offset, flags);
  }
  override async zero(offset: number, length: number, flags: number): Promise<void> {
    this.calls.push({ op: 'zero', offset, length, flags });
    await this.#gate();
    return this.next.zero(offset, length, flags);
  }
  override async trim(offset: number, length: number, flags: number): Promise<void> {
    this.calls.push({ op: 'trim', offset, length, flags });
    await this.#gate();
    return this.next.trim(offset, length, flags);
  }
  override async flush(flags: number): Promise<void> {
    this.calls.push({ op: 'flush', offset: 0, length: 0, flags });
    await this.#gate();
    return this.next.flush(flags);
  }
}

/** Lets queued microtasks and I/O callbacks run (a few event-loop turns, no clock). */
export async function settle(turns = 5): Promise<void> {
  for (let i = 0; i < turns; i++) await new Promise<void>((resolve) => setImmediate(resolve));
}

/** Tracks whether a promise has settled, without timing. */
export function track<T>(p: Promise<T>): { readonly promise: Promise<T>; readonly settled: () => boolean } {
  let done = false;
  const promise = p.finally(() => {
    done = true;
  });
  promise.catch(() => undefined);
  return { promise, settled: () => done };
}
