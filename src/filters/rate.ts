/**
 * The rate filter: limits the bandwidth of reads and writes with token buckets (nbdkit's
 * rate filter, in bytes per second rather than nbdkit's bits).
 *
 * Reads and writes have a bucket each (as in nbdkit), filled at `read-rate` and
 * `write-rate` bytes per second, both defaulting to `rate`. A bucket holds at most
 * `burstiness` seconds of its rate (default 1 s) and starts full, so after a quiet spell
 * a client may burst that much at full speed. Zero, trim, flush, extents and cache move
 * no data and are not limited (nor are they in nbdkit).
 *
 * A request of n bytes takes n tokens when it arrives, and the bucket may go below zero:
 * the request then waits until the bucket is back at zero, i.e. (debt / rate) seconds.
 * So a request larger than the bucket waits in proportion to its size instead of waiting
 * for a bucket that never holds enough (no starvation), and since each request's debt
 * counts those before it, requests leave in arrival order (FIFO). A waiting request
 * costs one queue entry: its buffer stays the caller's and is not copied, and how many
 * requests can wait is bounded by what the frontends let clients have in flight.
 *
 * The limits are per export (per filter instance): nbdkit's `connection-rate` needs a
 * notion of connection, and the device stack has none (sessions live in the NBD layer
 * above it), so that setting is refused with a message saying so.
 */
import * as v from 'valibot';
import { FilterDevice } from '../device/filter.js';
import type { BlockDevice } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import { BlockError } from '../errors/index.js';
import { formatSize, parseSettings, settingsSchema, sizeSetting } from '../device/index.js';
import { InFlight, systemFilterClock, type FilterClock } from './delay.js';

interface Waiter {
  /** When (clock ms) the request may go. */
  readonly at: number;
  readonly resolve: () => void;
}

/** A token bucket of bytes with a FIFO of waiting requests (see the module comment). */
export class TokenBucket {
  /** Bytes per second. */
  readonly rate: number;
  /** Bytes the bucket holds when full. */
  readonly capacity: number;
  readonly #clock: FilterClock;
  #level: number;
  #last: number;
  readonly #queue: Waiter[] = [];
  #pumping = false;

  constructor(rate: number, capacity: number, clock: FilterClock = systemFilterClock) {
    if (!(rate > 0)) throw new RangeError(`rate must be positive, got ${rate}`);
    this.rate = rate;
    this.capacity = capacity;
    this.#clock = clock;
    this.#level = capacity;
    this.#last = clock.now();
  }

  /** Tokens now (negative: the debt of waiting requests). */
  get level(): number {
    this.#refill();
    return this.#level;
  }

  /** Requests waiting. */
  get waiting(): number {
    return this.#queue.length;
  }

  #refill(): void {
    const now = this.#clock.now();
    if (now > this.#last) {
      this.#level = Math.min(this.capacity, this.#level + ((now - this.#last) * this.rate) / 1000);
      this.#last = now;
    }
  }

  /**
   * Takes `n` tokens. Returns undefined if the request may go now (no allocation on that
   * path), else a promise that resolves when it may.
   */
  take(n: number): Promise<void> | undefined {
    if (n <= 0) return undefined;
    this.#refill();
    this.#level -= n;
    if (this.#level >= 0 && this.#queue.length === 0) return undefined;
    const at = this.#last + (Math.max(0, -this.#level) * 1000) / this.rate;
    return new Promise<void>((resolve) => {
      this.#queue.push({ at, resolve });
      if (!this.#pumping) void this.#pump();
    });
  }

  /** Releases waiters in order as their time comes; one loop (one timer) per bucket. */
  async #pump(): Promise<void> {
    this.#pumping = true;
    try {
      while (this.#queue.length > 0) {
        const wait = this.#queue[0]!.at - this.#clock.now();
        if (wait > 0) {
          await this.#clock.sleep(wait);
          continue;
        }
        this.#queue.shift()!.resolve();
      }
    } finally {
      this.#pumping = false;
    }
  }
}

/** Settings of a rate filter. */
export interface RateOptions {
  /** Read bandwidth in bytes per second. @default unlimited */
  readonly readRate?: number;
  /** Write bandwidth in bytes per second. @default unlimited */
  readonly writeRate?: number;
  /** Bucket capacity in seconds of its rate. @default 1 */
  readonly burstiness?: number;
  /** @default systemFilterClock */
  readonly clock?: FilterClock;
}

/** Limits the read and write bandwidth of `next` (see the module comment). */
export class RateFilter extends FilterDevice {
  readonly readBucket: TokenBucket | undefined;
  readonly writeBucket: TokenBucket | undefined;
  readonly #inFlight = new InFlight();

  constructor(next: BlockDevice, options: RateOptions = {}) {
    super(next);
    const burst = options.burstiness ?? 1;
    const clock = options.clock ?? systemFilterClock;
    const bucket = (rate: number | undefined) => (rate === undefined ? undefined : new TokenBucket(rate, rate * burst, clock));
    this.readBucket = bucket(options.readRate);
    this.writeBucket = bucket(options.writeRate);
  }

  override get description(): string {
    const r = (name: string, b: TokenBucket | undefined) => (b ? [`${name} ${formatSize(b.rate)}/s`] : []);
    return `${this.next.description} (rate: ${[...r('read', this.readBucket), ...r('write', this.writeBucket)].join(', ')})`;
  }

  override read(buf: Buffer, offset: number, flags: number): Promise<void> {
    return this.#inFlight.run(async () => {
      const wait = this.readBucket?.take(buf.length);
      if (wait) await wait;
      return this.next.read(buf, offset, flags);
    });
  }
  override write(data: Buffer, offset: number, flags: number): Promise<void> {
    return this.#inFlight.run(async () => {
      const wait = this.writeBucket?.take(data.length);
      if (wait) await wait;
      return this.next.write(data, offset, flags);
    });
  }
  /** Waits for the requests in hand, those waiting for tokens included, then closes below. */
  override async close(): Promise<void> {
    await this.#inFlight.idle();
    return this.next.close();
  }
}

const rateSetting = v.optional(v.pipe(sizeSetting, v.minValue(1, 'must be at least 1 (byte per second)')));
const PER_CONNECTION =
  'per-connection limits are not supported: the device stack has no notion of connections ' +
  '(sessions live in the NBD layer above it); use rate, read-rate or write-rate (per export)';
const DYNAMIC = 'changing the rate while serving is not supported; restart with a new rate';
const refused = (message: string) => v.optional(v.custom<never>(() => false, message));

/** The settings schema (listed by `blockgate plugins`). */
export const rateSettings = settingsSchema({
  rate: rateSetting,
  'read-rate': rateSetting,
  'write-rate': rateSetting,
  burstiness: v.optional(
    v.pipe(
      v.number((issue) => `expected a number of seconds, got ${issue.received}`),
      v.gtValue(0, 'must be more than 0 seconds'),
      v.maxValue(3600, 'must be at most 3600 seconds'),
    ),
  ),
  'connection-rate': refused(PER_CONNECTION),
  'connection-rate-file': refused(PER_CONNECTION),
  'rate-file': refused(DYNAMIC),
});

/**
 * Filter factory: `{ type: 'rate', rate?, 'read-rate'?, 'write-rate'?, burstiness? }`,
 * rates in bytes per second as sizes (`"4M"` = 4 MiB/s); at least one rate is required.
 */
export function rateFilter(next: BlockDevice, desc: LayerDescription): RateFilter {
  const s = parseSettings('rate', rateSettings, desc);
  const readRate = s['read-rate'] ?? s.rate;
  const writeRate = s['write-rate'] ?? s.rate;
  if (readRate === undefined && writeRate === undefined) {
    throw new BlockError('EINVAL', 'rate: rate: required setting is missing (give rate, read-rate or write-rate)');
  }
  return new RateFilter(next, {
    ...(readRate !== undefined ? { readRate } : {}),
    ...(writeRate !== undefined ? { writeRate } : {}),
    ...(s.burstiness !== undefined ? { burstiness: s.burstiness } : {}),
  });
}
