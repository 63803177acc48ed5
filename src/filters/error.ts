/**
 * The error filter: injects failures into chosen operations (nbdkit's error filter,
 * extended for write-back testing).
 *
 * A request fails, before it reaches the layer below, when all of these hold, checked
 * in this order:
 * 1. its operation is one of `ops`. 'write', 'zero' and 'trim' match every such request;
 *    'writeback' matches only the write-back requests of a writeback filter above
 *    (flag {@link REQ_WRITEBACK}), so a test can fail the background write-back alone
 *    and leave client requests alone;
 * 2. its range meets [offset, offset + length) (flush has no range and always meets it);
 * 3. the trigger `file`, if set, exists now (checked per request, so a test or an
 *    operator turns failures on and off by creating and removing it);
 * 4. fewer than `count` failures have been injected so far;
 * 5. a draw from a seeded PRNG is below `rate` (no draw when rate is 1 or 0).
 * The PRNG is drawn only for requests that passed 1-4, so with a fixed `seed` the same
 * sequence of requests fails the same way on every run.
 */
import * as fs from 'node:fs';
import { randomInt } from 'node:crypto';
import * as v from 'valibot';
import { FilterDevice } from '../device/filter.js';
import type { BlockDevice, Extent } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import { BlockError, ERRNO, type ErrnoCode } from '../errors/index.js';
import { parseSettings, settingsSchema, sizeSetting, pathSetting, wholeNumberSetting } from '../device/index.js';
import { REQ_WRITEBACK } from './writeback.js';

/** The operations a failure can be injected into. */
export const ERROR_OPS = ['read', 'write', 'flush', 'trim', 'zero', 'extents', 'cache', 'writeback'] as const;
export type ErrorOp = (typeof ERROR_OPS)[number];

const ERRNO_CODES = Object.keys(ERRNO) as ErrnoCode[];

/** Settings of an error filter. */
export interface ErrorOptions {
  /** @default 'EIO' */
  readonly error?: ErrnoCode;
  /** @default every operation */
  readonly ops?: readonly ErrorOp[];
  /** Probability of failing a request that qualifies, 0..1. @default 1 */
  readonly rate?: number;
  /** At most this many failures in all. @default unlimited */
  readonly count?: number;
  /** Start of the range whose requests fail. @default 0 */
  readonly offset?: number;
  /** Length of that range. @default to the end of the device */
  readonly length?: number;
  /** Fail only while this file exists. @default always */
  readonly file?: string;
  /** PRNG seed for `rate` < 1. @default a random seed */
  readonly seed?: number;
}

/**
 * A 32-bit xorshift generator (Marsaglia 2003, shifts 13/17/5): tiny, fast and fully
 * determined by its seed, which is all a failure schedule needs (not for cryptography).
 */
export class Xorshift32 {
  #state: number;

  constructor(seed: number) {
    // The all-zero state is a fixed point of xorshift; map it to a fixed non-zero one.
    this.#state = seed >>> 0 || 0x9e3779b9;
  }

  /** A float in [0, 1). */
  next(): number {
    let x = this.#state;
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    this.#state = x;
    return x / 2 ** 32;
  }
}

/** Injects failures into `next` (see the module comment for the rules). */
export class ErrorFilter extends FilterDevice {
  readonly #code: ErrnoCode;
  readonly #ops: ReadonlySet<ErrorOp>;
  readonly #rate: number;
  readonly #count: number;
  readonly #offset: number;
  readonly #length: number;
  readonly #file: string | undefined;
  readonly #rng: Xorshift32;
  #injected = 0;

  constructor(next: BlockDevice, options: ErrorOptions = {}) {
    super(next);
    this.#code = options.error ?? 'EIO';
    this.#ops = new Set(options.ops ?? ERROR_OPS);
    this.#rate = options.rate ?? 1;
    this.#count = options.count ?? Infinity;
    this.#offset = options.offset ?? 0;
    this.#length = options.length ?? Infinity;
    this.#file = options.file;
    this.#rng = new Xorshift32(options.seed ?? randomInt(2 ** 32));
  }

  override get description(): string {
    return `${this.next.description} (error: ${this.#code} on ${[...this.#ops].join(',')})`;
  }

  /** How many failures this filter has injected. */
  get injected(): number {
    return this.#injected;
  }

  override async read(buf: Buffer, offset: number, flags: number): Promise<void> {
    this.#maybeFail('read', flags, offset, buf.length);
    return this.next.read(buf, offset, flags);
  }
  override async write(data: Buffer, offset: number, flags: number): Promise<void> {
    this.#maybeFail('write', flags, offset, data.length);
    return this.next.write(data, offset, flags);
  }
  override async flush(flags: number): Promise<void> {
    this.#maybeFail('flush', flags, null, 0);
    return this.next.flush(flags);
  }
  override async trim(offset: number, length: number, flags: number): Promise<void> {
    this.#maybeFail('trim', flags, offset, length);
    return this.next.trim(offset, length, flags);
  }
  override async zero(offset: number, length: number, flags: number): Promise<void> {
    this.#maybeFail('zero', flags, offset, length);
    return this.next.zero(offset, length, flags);
  }
  override async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    this.#maybeFail('extents', flags, offset, length);
    return this.next.extents(offset, length, flags);
  }
  override async cache(offset: number, length: number, flags: number): Promise<void> {
    this.#maybeFail('cache', flags, offset, length);
    return this.next.cache(offset, length, flags);
  }

  /** Throws the configured error if this request qualifies (rules 1-5 of the module comment). */
  #maybeFail(op: Exclude<ErrorOp, 'writeback'>, flags: number, offset: number | null, length: number): void {
    const isWriteback = (op === 'write' || op === 'zero' || op === 'trim') && (flags & REQ_WRITEBACK) !== 0;
    if (!this.#ops.has(op) && !(isWriteback && this.#ops.has('writeback'))) return;
    if (offset !== null) {
      // A zero-length request is a point; it meets the range if the point is inside.
      const end = offset + Math.max(length, 1);
      if (end <= this.#offset || offset >= this.#offset + this.#length) return;
    }
    if (this.#file !== undefined && !fs.existsSync(this.#file)) return;
    if (this.#injected >= this.#count) return;
    if (this.#rate < 1 && !(this.#rate > 0 && this.#rng.next() < this.#rate)) return;
    this.#injected++;
    const what = isWriteback ? `write-back ${op}` : op;
    throw new BlockError(this.#code, `${what}: injected ${this.#code} (error filter)`, {
      injected: true,
      ...(offset !== null ? { offset } : {}),
    });
  }
}

/** The settings schema (listed by `blockgate plugins`). */
export const errorSettings = settingsSchema({
  error: v.optional(
    v.picklist(ERRNO_CODES, (issue) => `expected an errno name such as EIO or ENOSPC, got ${issue.received}`),
  ),
  ops: v.optional(
    v.pipe(
      v.array(
        v.picklist(ERROR_OPS, (issue) => `expected one of ${ERROR_OPS.join(', ')}, got ${issue.received}`),
        (issue) => `expected a list of operations, got ${issue.received}`,
      ),
      v.minLength(1, 'must name at least one operation'),
    ),
  ),
  rate: v.optional(
    v.pipe(
      v.number((issue) => `expected a number from 0 to 1, got ${issue.received}`),
      v.minValue(0, 'must be from 0 to 1'),
      v.maxValue(1, 'must be from 0 to 1'),
    ),
  ),
  count: v.optional(
    v.pipe(
      v.number((issue) => `expected a whole number, got ${issue.received}`),
      v.safeInteger('expected a whole number'),
      v.minValue(0, 'must not be negative'),
    ),
  ),
  offset: v.optional(sizeSetting),
  length: v.optional(sizeSetting),
  file: v.optional(
    pathSetting,
  ),
  seed: v.optional(
    wholeNumberSetting,
  ),
});

/**
 * Filter factory: `{ type: 'error', error?, ops?, rate?, count?, offset?, length?, file?, seed? }`
 * (see {@link ErrorOptions}).
 */
export function errorFilter(next: BlockDevice, desc: LayerDescription): ErrorFilter {
  const s = parseSettings('error', errorSettings, desc);
  const options: ErrorOptions = Object.fromEntries(Object.entries(s).filter(([k, val]) => k !== 'type' && val !== undefined));
  return new ErrorFilter(next, options);
}
