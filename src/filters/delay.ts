/**
 * The delay filter: adds latency to chosen operations (nbdkit's delay filter), to
 * simulate a slow or remote disk or to widen race windows in tests.
 *
 * Each operation has its own delay (`delay-read`, `delay-write`, `delay-zero`,
 * `delay-trim`, `delay-flush`, `delay-extents`, `delay-cache`); `rdelay` is short for
 * `delay-read` and `wdelay` sets write, zero and trim at once (as in nbdkit), a
 * `delay-zero` or `delay-trim` given beside it winning for its operation. `jitter` adds
 * a random part, uniform in [0, jitter), to every operation that has a delay, drawn from
 * a PRNG seeded with `seed` so a run can be repeated. A request waits first, then goes
 * to the layer below; nothing is cancelled: close() waits for the requests in hand.
 *
 * This module also holds the time source the timing filters (delay, rate, stats, log)
 * share: {@link FilterClock}, real by default, injectable in tests (a gate ManualClock
 * adapted by {@link filterClockOf}), so that no test waits for real time.
 */
import * as v from 'valibot';
import { randomInt } from 'node:crypto';
import { FilterDevice } from '../device/filter.js';
import { REQ, type BlockDevice, type Extent } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import { BlockError } from '../errors/index.js';
import { parseSettings, settingsSchema, booleanSetting, wholeNumberSetting } from '../device/index.js';
import { Xorshift32 } from './error.js';

/** The time source of the timing filters. */
export interface FilterClock {
  /** Milliseconds (fractional) since an arbitrary origin; monotonic. */
  now(): number;
  /** Resolves after about `ms` milliseconds (possibly a little early: callers re-check now()). */
  sleep(ms: number): Promise<void>;
}

/**
 * The real clock: performance.now() and setTimeout. Its timers are *not* unref'ed: a
 * request that waits must complete, even if nothing else keeps the process alive.
 */
export const systemFilterClock: FilterClock = {
  now: () => performance.now(),
  sleep: (ms) => new Promise<void>((resolve) => setTimeout(resolve, Math.max(1, Math.ceil(ms)))),
};

/**
 * A periodic-timer clock, the shape of src/gate/clock.ts's GateClock (filters may not
 * import gate, so the shape is repeated here; a gate ManualClock fits it).
 */
export interface PeriodicClock {
  now(): number;
  every(periodMs: number, fn: () => void): { cancel(): void };
}

/** A FilterClock driven by a PeriodicClock (in tests, a gate ManualClock that moves on advance()). */
export function filterClockOf(clock: PeriodicClock): FilterClock {
  return {
    now: () => clock.now(),
    sleep: (ms) =>
      new Promise<void>((resolve) => {
        if (!(ms > 0)) return resolve();
        const t = clock.every(ms, () => {
          t.cancel();
          resolve();
        });
      }),
  };
}

/** Waits until at least `ms` milliseconds of `clock` have passed (timers may fire early). */
export async function waitFor(clock: FilterClock, ms: number): Promise<void> {
  const end = clock.now() + ms;
  for (let left = ms; left > 0; left = end - clock.now()) await clock.sleep(left);
}

/**
 * Counts requests in hand so that close() can wait for them (a filter that makes
 * requests wait cancels none of them).
 */
export class InFlight {
  #count = 0;
  #idle: (() => void)[] = [];

  get count(): number {
    return this.#count;
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    this.#count++;
    try {
      return await fn();
    } finally {
      if (--this.#count === 0) for (const w of this.#idle.splice(0)) w();
    }
  }

  /** Resolves when no request is in hand. */
  idle(): Promise<void> {
    return this.#count === 0 ? Promise.resolve() : new Promise<void>((resolve) => this.#idle.push(resolve));
  }
}

/** The operations a delay can be set for. */
export const DELAY_OPS = ['read', 'write', 'zero', 'trim', 'flush', 'extents', 'cache'] as const;
export type DelayOp = (typeof DELAY_OPS)[number];

/** Settings of a delay filter (all durations in milliseconds). */
export interface DelayOptions {
  /** Delay per operation; an operation not listed is not delayed. @default none */
  readonly delays?: Partial<Record<DelayOp, number>>;
  /** Random extra delay, uniform in [0, jitter), for every delayed operation. @default 0 */
  readonly jitter?: number;
  /** PRNG seed for the jitter. @default a random seed */
  readonly seed?: number;
  /**
   * False: a zero request with FAST_ZERO fails EOPNOTSUPP at once instead of waiting
   * (when zero has a delay), nbdkit's delay-fast-zero=false. @default true
   */
  readonly fastZero?: boolean;
  /** @default systemFilterClock */
  readonly clock?: FilterClock;
}

/** Formats a duration in ms for descriptions: 200 -> "200ms", 1500 -> "1.5s". */
function formatMs(ms: number): string {
  return ms >= 1000 ? `${ms / 1000}s` : `${ms}ms`;
}

/** Delays the operations of `next` (see the module comment). */
export class DelayFilter extends FilterDevice {
  readonly #delays: Readonly<Record<DelayOp, number | undefined>>;
  readonly #jitter: number;
  readonly #rng: Xorshift32;
  readonly #fastZero: boolean;
  readonly #clock: FilterClock;
  readonly #inFlight = new InFlight();

  constructor(next: BlockDevice, options: DelayOptions = {}) {
    super(next);
    const d = options.delays ?? {};
    this.#delays = {
      read: d.read,
      write: d.write,
      zero: d.zero,
      trim: d.trim,
      flush: d.flush,
      extents: d.extents,
      cache: d.cache,
    };
    this.#jitter = options.jitter ?? 0;
    this.#rng = new Xorshift32(options.seed ?? randomInt(2 ** 32));
    this.#fastZero = options.fastZero ?? true;
    this.#clock = options.clock ?? systemFilterClock;
  }

  override get description(): string {
    const parts = DELAY_OPS.filter((op) => this.#delays[op] !== undefined).map((op) => `${op} ${formatMs(this.#delays[op]!)}`);
    const jitter = this.#jitter > 0 ? ` + jitter ${formatMs(this.#jitter)}` : '';
    return `${this.next.description} (delay: ${parts.join(', ') || 'none'}${jitter})`;
  }

  /** The configured delay of each operation, ms (undefined: not delayed). */
  get delays(): Readonly<Record<DelayOp, number | undefined>> {
    return this.#delays;
  }

  /** Requests in hand (waiting or below). */
  get inFlight(): number {
    return this.#inFlight.count;
  }

  /** The delay the next request of `op` gets, in ms (draws the jitter), or 0. */
  #delayOf(op: DelayOp): number {
    const base = this.#delays[op];
    if (base === undefined) return 0;
    return this.#jitter > 0 ? base + this.#rng.next() * this.#jitter : base;
  }

  #delayed<T>(op: DelayOp, fn: () => Promise<T>): Promise<T> {
    const ms = this.#delayOf(op);
    if (ms <= 0) return this.#inFlight.run(fn);
    return this.#inFlight.run(async () => {
      await waitFor(this.#clock, ms);
      return fn();
    });
  }

  override read(buf: Buffer, offset: number, flags: number): Promise<void> {
    return this.#delayed('read', () => this.next.read(buf, offset, flags));
  }
  override write(data: Buffer, offset: number, flags: number): Promise<void> {
    return this.#delayed('write', () => this.next.write(data, offset, flags));
  }
  override async zero(offset: number, length: number, flags: number): Promise<void> {
    if (!this.#fastZero && (flags & REQ.FAST_ZERO) !== 0 && this.#delays.zero !== undefined) {
      throw new BlockError('EOPNOTSUPP', 'fast zero refused by the delay filter (delay-fast-zero: false)');
    }
    return this.#delayed('zero', () => this.next.zero(offset, length, flags));
  }
  override trim(offset: number, length: number, flags: number): Promise<void> {
    return this.#delayed('trim', () => this.next.trim(offset, length, flags));
  }
  override flush(flags: number): Promise<void> {
    return this.#delayed('flush', () => this.next.flush(flags));
  }
  override extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    return this.#delayed('extents', () => this.next.extents(offset, length, flags));
  }
  override cache(offset: number, length: number, flags: number): Promise<void> {
    return this.#delayed('cache', () => this.next.cache(offset, length, flags));
  }
  /** Waits for the requests in hand (none is cancelled), then closes the layer below. */
  override async close(): Promise<void> {
    await this.#inFlight.idle();
    return this.next.close();
  }
}

/** setTimeout's limit, about 24.8 days: a longer wait is certainly a mistake. */
const MAX_DELAY_MS = 2 ** 31 - 1;

const UNIT_MS: Record<string, number> = { ns: 1e-6, us: 1e-3, µs: 1e-3, μs: 1e-3, ms: 1, s: 1000 };

/**
 * Parses a duration: a number of milliseconds, or a string with a unit, `10ms`, `1.5s`,
 * `250us`, `1000ns` (nbdkit's spellings). A bare number in a string is refused: nbdkit
 * reads it as seconds, a JSON number here is milliseconds, so a unit removes the doubt.
 */
export function parseDuration(value: number | string): number {
  let ms: number;
  if (typeof value === 'number') {
    ms = value;
  } else {
    const m = /^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|μs|ms|s)\s*$/.exec(value);
    if (!m) {
      throw new BlockError(
        'EINVAL',
        `invalid duration '${value}' (expected a number of milliseconds, or a string with a unit: ms, s, us, ns, e.g. "10ms")`,
      );
    }
    ms = Number(m[1]) * UNIT_MS[m[2]!]!;
  }
  if (!Number.isFinite(ms) || ms < 0) throw new BlockError('EINVAL', `invalid duration: ${value} (must not be negative)`);
  if (ms > MAX_DELAY_MS) throw new BlockError('EINVAL', `duration too long: ${value} (at most ${MAX_DELAY_MS} ms)`);
  return ms;
}

/** A duration setting (see {@link parseDuration}), the parse error reported with the key. */
export const durationSetting = v.pipe(
  v.union([v.number(), v.string()], (issue) => `expected a duration (milliseconds, or a string like "10ms" or "1s"), got ${issue.received}`),
  v.rawTransform<number | string, number>(({ dataset, addIssue, NEVER }) => {
    try {
      return parseDuration(dataset.value);
    } catch (e) {
      addIssue({ message: (e as Error).message });
      return NEVER;
    }
  }),
);

/** The settings schema (listed by `blockgate plugins`). */
export const delaySettings = settingsSchema({
  rdelay: v.optional(durationSetting),
  wdelay: v.optional(durationSetting),
  'delay-read': v.optional(durationSetting),
  'delay-write': v.optional(durationSetting),
  'delay-zero': v.optional(durationSetting),
  'delay-trim': v.optional(durationSetting),
  'delay-flush': v.optional(durationSetting),
  'delay-extents': v.optional(durationSetting),
  'delay-cache': v.optional(durationSetting),
  'delay-fast-zero': booleanSetting,
  jitter: v.optional(durationSetting),
  seed: v.optional(
    wholeNumberSetting,
  ),
});

/**
 * Filter factory: `{ type: 'delay', rdelay?, wdelay?, 'delay-read'?, 'delay-write'?,
 * 'delay-zero'?, 'delay-trim'?, 'delay-flush'?, 'delay-extents'?, 'delay-cache'?,
 * 'delay-fast-zero'?, jitter?, seed? }`.
 */
export function delayFilter(next: BlockDevice, desc: LayerDescription): DelayFilter {
  const s = parseSettings('delay', delaySettings, desc);
  for (const [short, long] of [
    ['rdelay', 'delay-read'],
    ['wdelay', 'delay-write'],
  ] as const) {
    if (s[short] !== undefined && s[long] !== undefined) {
      throw new BlockError('EINVAL', `delay: ${long}: the same setting as ${short}; give only one`);
    }
  }
  const delays: Partial<Record<DelayOp, number>> = {};
  const set = (op: DelayOp, ms: number | undefined): void => {
    if (ms !== undefined) delays[op] = ms;
  };
  set('write', s.wdelay);
  set('zero', s.wdelay);
  set('trim', s.wdelay);
  set('read', s.rdelay ?? s['delay-read']);
  set('write', s['delay-write']);
  set('zero', s['delay-zero']);
  set('trim', s['delay-trim']);
  set('flush', s['delay-flush']);
  set('extents', s['delay-extents']);
  set('cache', s['delay-cache']);
  return new DelayFilter(next, {
    delays,
    ...(s.jitter !== undefined ? { jitter: s.jitter } : {}),
    ...(s.seed !== undefined ? { seed: s.seed } : {}),
    ...(s['delay-fast-zero'] !== undefined ? { fastZero: s['delay-fast-zero'] } : {}),
  });
}
