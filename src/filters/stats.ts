/**
 * The stats filter: counts operations, bytes, errors and latencies (nbdkit's stats
 * filter, with a latency histogram and a JSON summary).
 *
 * Per operation it keeps, in place (a Float64Array each, nothing allocated per
 * request): the number of requests, the bytes of those that succeeded, the number that
 * failed, their total and largest latency, and a histogram of latencies in log2 buckets
 * of microseconds: bucket 0 counts latencies under 1 µs, bucket i (1..24) those in
 * [2^(i-1), 2^i) µs, and bucket 25 those of 2^24 µs (about 16.8 s) and more.
 *
 * {@link StatsFilter.snapshot} gives the figures as a plain JSON-able object at any time
 * ({@link statsOf} finds the filter in a stack, for a status command); with `statsfile`
 * the summary is written to that file when the device closes (nbdkit prints its figures
 * when it exits), as one line of JSON.
 */
import * as fsp from 'node:fs/promises';
import * as v from 'valibot';
import { FilterDevice } from '../device/filter.js';
import type { BlockDevice, Extent } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import { BlockError, toBlockError } from '../errors/index.js';
import { booleanSetting, parseSettings, settingsSchema, type LiveStats, type OpFigures, pathSetting } from '../device/index.js';
import { systemFilterClock, type FilterClock } from './delay.js';

/** The operations counted, in the order a snapshot lists them. */
export const STATS_OPS = ['read', 'write', 'zero', 'trim', 'flush', 'extents', 'cache'] as const;
export type StatsOp = (typeof STATS_OPS)[number];

/** Number of histogram buckets: under 1 µs, 24 powers of two up to 2^24 µs, and the rest. */
export const HISTOGRAM_BUCKETS = 26;

/** Upper bounds (exclusive, µs) of the histogram buckets; the last has none (null). */
export const BUCKET_UPPER_US: readonly (number | null)[] = Array.from({ length: HISTOGRAM_BUCKETS }, (_, i) =>
  i === HISTOGRAM_BUCKETS - 1 ? null : 2 ** i,
);

/** The histogram bucket of a latency of `us` microseconds (exact at powers of two). */
export function latencyBucket(us: number): number {
  if (!(us >= 1)) return 0;
  if (us >= 2 ** 24) return HISTOGRAM_BUCKETS - 1;
  return 32 - Math.clz32(Math.floor(us));
}

// Layout of one operation's counters.
const COUNT = 0;
const BYTES = 1;
const ERRORS = 2;
const TIME_US = 3;
const MAX_US = 4;
const HIST = 5;
const SLOTS = HIST + HISTOGRAM_BUCKETS;

/** The figures of one operation in a snapshot. */
export interface OpStats {
  /** Requests, failed ones included. */
  readonly count: number;
  /** Bytes of the requests that succeeded (read or written; the range of zero, trim, extents, cache). */
  readonly bytes: number;
  /** Requests that failed. */
  readonly errors: number;
  /** Sum of latencies, µs. */
  readonly timeUs: number;
  /** Largest latency, µs. */
  readonly maxUs: number;
  /**
   * Latency percentiles estimated from the histogram: the upper bound of the bucket that
   * holds the percentile (at most maxUs), rounded to a whole µs; null without requests.
   */
  readonly p50Us: number | null;
  readonly p99Us: number | null;
  /** Counts per bucket (see {@link BUCKET_UPPER_US}). */
  readonly histogram: number[];
}

/** What {@link StatsFilter.snapshot} returns. */
export interface StatsSnapshot {
  /** When counting started (ISO 8601). */
  readonly since: string;
  /** Seconds since then. */
  readonly elapsed: number;
  /** Upper bounds (µs) of the histogram buckets, null for the last. */
  readonly bucketsUs: readonly (number | null)[];
  readonly ops: Record<StatsOp, OpStats>;
}

/** Settings of a stats filter. */
export interface StatsOptions {
  /** Write the summary here at close. @default none */
  readonly statsfile?: string;
  /** Append to statsfile instead of replacing it. @default false */
  readonly statsappend?: boolean;
  /** @default systemFilterClock */
  readonly clock?: FilterClock;
}

function percentile(c: Float64Array, q: number): number | null {
  const n = c[COUNT]!;
  if (n === 0) return null;
  const rank = Math.max(1, Math.ceil(q * n));
  let seen = 0;
  for (let i = 0; i < HISTOGRAM_BUCKETS; i++) {
    seen += c[HIST + i]!;
    if (seen >= rank) return Math.round(Math.min(BUCKET_UPPER_US[i] ?? Infinity, c[MAX_US]!));
  }
  return Math.round(c[MAX_US]!);
}

/** Counts what passes through to `next` (see the module comment). */
export class StatsFilter extends FilterDevice {
  readonly #clock: FilterClock;
  readonly #counters: Record<StatsOp, Float64Array>;
  readonly #since = new Date();
  readonly #start: number;
  readonly #statsfile: string | undefined;
  readonly #append: boolean;

  constructor(next: BlockDevice, options: StatsOptions = {}) {
    super(next);
    this.#clock = options.clock ?? systemFilterClock;
    this.#start = this.#clock.now();
    this.#statsfile = options.statsfile;
    this.#append = options.statsappend ?? false;
    this.#counters = {
      read: new Float64Array(SLOTS),
      write: new Float64Array(SLOTS),
      zero: new Float64Array(SLOTS),
      trim: new Float64Array(SLOTS),
      flush: new Float64Array(SLOTS),
      extents: new Float64Array(SLOTS),
      cache: new Float64Array(SLOTS),
    };
  }

  override get description(): string {
    return `${this.next.description} (stats)`;
  }

  #record(c: Float64Array, start: number, bytes: number, ok: boolean): void {
    const us = (this.#clock.now() - start) * 1000;
    c[COUNT]!++;
    if (ok) c[BYTES] = c[BYTES]! + bytes;
    else c[ERRORS]!++;
    c[TIME_US] = c[TIME_US]! + us;
    if (us > c[MAX_US]!) c[MAX_US] = us;
    c[HIST + latencyBucket(us)]!++;
  }

  async #count<T>(c: Float64Array, bytes: number, p: () => Promise<T>): Promise<T> {
    const start = this.#clock.now();
    let r: T;
    try {
      r = await p();
    } catch (e) {
      this.#record(c, start, bytes, false);
      throw e;
    }
    this.#record(c, start, bytes, true);
    return r;
  }

  override read(buf: Buffer, offset: number, flags: number): Promise<void> {
    return this.#count(this.#counters.read, buf.length, () => this.next.read(buf, offset, flags));
  }
  override write(data: Buffer, offset: number, flags: number): Promise<void> {
    return this.#count(this.#counters.write, data.length, () => this.next.write(data, offset, flags));
  }
  override zero(offset: number, length: number, flags: number): Promise<void> {
    return this.#count(this.#counters.zero, length, () => this.next.zero(offset, length, flags));
  }
  override trim(offset: number, length: number, flags: number): Promise<void> {
    return this.#count(this.#counters.trim, length, () => this.next.trim(offset, length, flags));
  }
  override flush(flags: number): Promise<void> {
    return this.#count(this.#counters.flush, 0, () => this.next.flush(flags));
  }
  override extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    return this.#count(this.#counters.extents, length, () => this.next.extents(offset, length, flags));
  }
  override cache(offset: number, length: number, flags: number): Promise<void> {
    return this.#count(this.#counters.cache, length, () => this.next.cache(offset, length, flags));
  }

  /** The figures so far, as a plain JSON-able object. */
  /** The live figures `blockgate status` shows (src/device/live-stats.ts). */
  liveStats(): LiveStats {
    const s = this.snapshot();
    const ops: Record<string, OpFigures> = {};
    for (const op of STATS_OPS) {
      const o = s.ops[op];
      ops[op] = { count: o.count, bytes: o.bytes, errors: o.errors, p50Us: o.p50Us, p99Us: o.p99Us };
    }
    return { elapsed: s.elapsed, ops };
  }

  snapshot(): StatsSnapshot {
    const ops = {} as Record<StatsOp, OpStats>;
    for (const op of STATS_OPS) {
      const c = this.#counters[op];
      ops[op] = {
        count: c[COUNT]!,
        bytes: c[BYTES]!,
        errors: c[ERRORS]!,
        timeUs: Math.round(c[TIME_US]!),
        maxUs: Math.round(c[MAX_US]!),
        p50Us: percentile(c, 0.5),
        p99Us: percentile(c, 0.99),
        histogram: Array.from(c.subarray(HIST)),
      };
    }
    return {
      since: this.#since.toISOString(),
      elapsed: (this.#clock.now() - this.#start) / 1000,
      bucketsUs: BUCKET_UPPER_US,
      ops,
    };
  }

  /** Writes the summary to statsfile (if set), then closes the layer below; both are attempted. */
  override async close(): Promise<void> {
    let failure: unknown;
    if (this.#statsfile !== undefined) {
      const line = `${JSON.stringify(this.snapshot())}\n`;
      try {
        await (this.#append ? fsp.appendFile(this.#statsfile, line) : fsp.writeFile(this.#statsfile, line));
      } catch (e) {
        failure = e;
      }
    }
    await this.next.close();
    if (failure !== undefined) {
      const e = toBlockError(failure);
      throw new BlockError(e.code, `stats: statsfile ${this.#statsfile}: ${e.message}`, { cause: failure });
    }
  }
}

/**
 * The topmost StatsFilter of a stack (walking down the `next` of FilterDevices), or
 * undefined: lets a status command show live figures of an export.
 */
export function statsOf(device: BlockDevice): StatsFilter | undefined {
  let d: BlockDevice | undefined = device;
  while (d !== undefined) {
    if (d instanceof StatsFilter) return d;
    d = d instanceof FilterDevice ? d.next : undefined;
  }
  return undefined;
}

/** The settings schema (listed by `blockgate plugins`). */
export const statsSettings = settingsSchema({
  statsfile: v.optional(
    pathSetting,
  ),
  statsappend: booleanSetting,
});

/** Filter factory: `{ type: 'stats', statsfile?, statsappend? }`. */
export function statsFilter(next: BlockDevice, desc: LayerDescription): StatsFilter {
  const s = parseSettings('stats', statsSettings, desc);
  return new StatsFilter(next, {
    ...(s.statsfile !== undefined ? { statsfile: s.statsfile } : {}),
    ...(s.statsappend !== undefined ? { statsappend: s.statsappend } : {}),
  });
}
