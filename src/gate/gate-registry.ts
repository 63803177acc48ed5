import { BlockError, isErrnoCode, type ErrnoCode } from '../errors/index.js';
import { MAX_DEVICE_SIZE } from '../device/index.js';
import { systemClock, type GateClock } from './clock.js';
import { GATE, GATE_FLAG } from './constants.js';
import { GateDevice } from './gate-device.js';
import { GateUnit, type GateStartResult } from './gate-unit.js';

/** CREATE (G_GATE_CMD_CREATE). */
export interface GateCreateArgs {
  readonly version: number;
  /** A unit number, {@link GATE.UNIT_AUTO} (-1, the default) or {@link GATE.NAME_GIVEN} (-2). */
  readonly unit?: number;
  /** The provider name; only with unit NAME_GIVEN. */
  readonly name?: string;
  /** Bytes; > 0, a multiple of sectorsize. */
  readonly mediasize: number;
  /** Bytes; a power of two. */
  readonly sectorsize: number;
  /** GATE_FLAG bits (READONLY, WRITEONLY); other bits are ignored. */
  readonly flags?: number;
  /** Queue limit (queued + in flight); 0 = unlimited; capped at GATE.MAX_QUEUE_SIZE. */
  readonly maxcount?: number;
  /** Seconds after which a request fails EIO; 0 = never. */
  readonly timeout?: number;
  /** Free text (ggatec: "host:port path"). */
  readonly info?: string;
}

/** MODIFY (G_GATE_CMD_MODIFY): the fields given are replaced. */
export interface GateModifyArgs {
  readonly version: number;
  readonly unit: number;
  readonly mediasize?: number;
  readonly info?: string;
}

/** Addresses a gate by unit, or by name with unit NAME_GIVEN (as DESTROY and CANCEL allow). */
export interface GateTarget {
  readonly version: number;
  readonly unit: number;
  readonly name?: string;
}

/** DESTROY (G_GATE_CMD_DESTROY). */
export interface GateDestroyArgs extends GateTarget {
  /** Destroy even if the device side is open; outstanding requests fail ENXIO. */
  readonly force: boolean;
}

/** CANCEL (G_GATE_CMD_CANCEL). */
export interface GateCancelArgs extends GateTarget {
  /** The in-flight request to put back, or 0 for all of them. */
  readonly seq: number;
}

/** START (G_GATE_CMD_START). */
export interface GateStartArgs {
  readonly version: number;
  readonly unit: number;
  /** Size of the handler's data buffer: a WRITE larger than this yields ENOMEM. */
  readonly length: number;
  /** Aborting it rejects the call EINTR; no request is lost. */
  readonly signal?: AbortSignal;
}

/** DONE (G_GATE_CMD_DONE). */
export interface GateDoneArgs {
  readonly version: number;
  readonly unit: number;
  readonly seq: number;
  /** 0 (or undefined) = success; EAGAIN = retry (requeue at head); any other code fails the request. */
  readonly error?: ErrnoCode | 0;
  /** READ: the data read, at least `length` bytes. */
  readonly data?: Buffer;
}

/** One line of `list()`. */
export interface GateInfo {
  readonly unit: number;
  readonly name: string;
  readonly mediasize: number;
  readonly sectorsize: number;
  readonly flags: number;
  readonly maxcount: number;
  readonly timeout: number;
  readonly info: string;
  /** Open device-side handles (a non-forced destroy needs 0). */
  readonly openCount: number;
  readonly queued: number;
  readonly inFlight: number;
  /** Handlers blocked in START waiting for a request. */
  readonly sleeping: number;
}

export interface GateRegistryOptions {
  /** Size of the unit table (kern.geom.gate.maxunits); default {@link GATE.DEFAULT_MAX_UNITS}. */
  readonly maxUnits?: number;
  /** Time source for the timeout guards; default the real clock. */
  readonly clock?: GateClock;
}

/** The largest unit table accepted: units are C ints on the FreeBSD side. */
const MAX_UNITS_LIMIT = 0x7fff_ffff;

/**
 * The gate control device (/dev/ggctl) in process: creates, modifies and destroys gates
 * and carries the handler calls START, DONE and CANCEL. Pure logic, no I/O; the control
 * socket and the ggate tools are built on top of it.
 *
 * Two error channels, never mixed (D33996): a failure of the *call* rejects its promise
 * with a BlockError (bad version EINVAL, unknown unit ENXIO, or ENOENT for DONE as in
 * FreeBSD, the caller's AbortSignal EINTR); a condition of the *gate* resolves START
 * with `error` set (ECANCELED destroyed, ENOMEM buffer too small). Internal wake-ups are
 * retried inside START and never reach the caller.
 */
export class GateRegistry {
  readonly maxUnits: number;
  readonly #clock: GateClock;
  readonly #units = new Map<number, GateUnit>();

  constructor(options: GateRegistryOptions = {}) {
    const maxUnits = options.maxUnits ?? GATE.DEFAULT_MAX_UNITS;
    if (!Number.isSafeInteger(maxUnits) || maxUnits < 1 || maxUnits > MAX_UNITS_LIMIT) {
      throw new BlockError('EINVAL', `maxUnits must be an integer in [1, ${MAX_UNITS_LIMIT}], got ${maxUnits}`);
    }
    this.maxUnits = maxUnits;
    this.#clock = options.clock ?? systemClock;
  }

  /** Creates a gate and resolves with its unit number. */
  async create(args: GateCreateArgs): Promise<number> {
    checkVersion(args.version);
    const unit = args.unit ?? GATE.UNIT_AUTO;
    const flags = (args.flags ?? 0) & GATE_FLAG.USERFLAGS;
    const maxcount = args.maxcount ?? 0;
    const timeout = args.timeout ?? 0;
    const info = args.info ?? '';
    const { mediasize, sectorsize } = args;

    if (!Number.isSafeInteger(sectorsize) || sectorsize <= 0 || (sectorsize & (sectorsize - 1)) !== 0) {
      throw new BlockError('EINVAL', `sectorsize must be a power of two, got ${sectorsize}`);
    }
    if (sectorsize > GATE.MAX_SECTOR_SIZE) {
      throw new BlockError('EINVAL', `sectorsize ${sectorsize} is larger than ${GATE.MAX_SECTOR_SIZE}`);
    }
    checkMediasize(mediasize, sectorsize);
    if ((flags & GATE_FLAG.READONLY) !== 0 && (flags & GATE_FLAG.WRITEONLY) !== 0) {
      throw new BlockError('EINVAL', 'a gate cannot be both read-only and write-only');
    }
    if (!Number.isSafeInteger(maxcount) || maxcount < 0) {
      throw new BlockError('EINVAL', `maxcount must be a non-negative integer, got ${maxcount}`);
    }
    if (!Number.isSafeInteger(timeout) || timeout < 0 || timeout > GATE.MAX_TIMEOUT) {
      throw new BlockError('EINVAL', `timeout must be an integer number of seconds in [0, ${GATE.MAX_TIMEOUT}]`);
    }
    checkInfo(info);
    if (!Number.isSafeInteger(unit) || unit < GATE.NAME_GIVEN) {
      throw new BlockError('EINVAL', `unit must be >= 0, -1 (auto) or -2 (name given), got ${unit}`);
    }
    if (unit === GATE.NAME_GIVEN) {
      if (args.name === undefined || args.name === '') {
        throw new BlockError('EINVAL', 'unit -2 (name given) needs a non-empty name');
      }
      if (Buffer.byteLength(args.name) > GATE.NAME_MAX - 1) {
        throw new BlockError('EINVAL', `name is longer than ${GATE.NAME_MAX - 1} bytes`);
      }
    } else if (args.name !== undefined) {
      // FreeBSD ignores the name unless unit is NAME_GIVEN; refusing is less surprising.
      throw new BlockError('EINVAL', 'a name is only used with unit -2 (name given)');
    }

    const chosen = this.#allocateUnit(unit);
    const name = unit === GATE.NAME_GIVEN ? args.name! : `${GATE.PROVIDER_NAME}${chosen}`;
    for (const g of this.#units.values()) {
      if (g.name === name) throw new BlockError('EEXIST', `a gate named ${name} exists (unit ${g.unit})`);
    }
    const g = new GateUnit(
      {
        unit: chosen,
        name,
        mediasize,
        sectorsize,
        flags,
        maxcount: Math.min(maxcount, GATE.MAX_QUEUE_SIZE),
        timeout,
        info,
      },
      this.#clock,
    );
    this.#units.set(chosen, g);
    return chosen;
  }

  /** Resizes a gate and/or replaces its info. */
  async modify(args: GateModifyArgs): Promise<void> {
    checkVersion(args.version);
    const g = this.#find(args.unit, undefined, 'ENXIO');
    if (args.mediasize !== undefined) checkMediasize(args.mediasize, g.sectorsize);
    if (args.info !== undefined) checkInfo(args.info);
    if (args.mediasize !== undefined) g.mediasize = args.mediasize;
    if (args.info !== undefined) g.info = args.info;
  }

  /**
   * Destroys a gate. Unforced on a gate whose device side is open: EBUSY. Otherwise
   * every outstanding request fails ENXIO, every handler blocked in START gets
   * ECANCELED, and the unit is free for reuse at once.
   */
  async destroy(args: GateDestroyArgs): Promise<void> {
    checkVersion(args.version);
    const g = this.#find(args.unit, args.name, 'ENXIO');
    if (!args.force && g.openCount > 0) {
      throw new BlockError('EBUSY', `gate ${g.name} is open (${g.openCount}); use force`);
    }
    this.#units.delete(g.unit);
    g.destroy();
  }

  /** Puts in-flight requests (all for seq 0, else just `seq`) back at the head of the queue. */
  async cancel(args: GateCancelArgs): Promise<void> {
    checkVersion(args.version);
    if (!Number.isSafeInteger(args.seq) || args.seq < 0) {
      throw new BlockError('EINVAL', `cancel: bad seq ${args.seq}`);
    }
    this.#find(args.unit, args.name, 'ENXIO').cancel(args.seq);
  }

  /** Takes the next request, waiting for one; see {@link GateStartResult}. */
  async start(args: GateStartArgs): Promise<GateStartResult> {
    checkVersion(args.version);
    if (!Number.isSafeInteger(args.length) || args.length < 0) {
      throw new BlockError('EINVAL', `start: bad buffer length ${args.length}`);
    }
    return this.#find(args.unit, undefined, 'ENXIO').take(args.length, args.signal);
  }

  /** Returns a request's result. An unknown seq is ignored (it was cancelled or expired). */
  async done(args: GateDoneArgs): Promise<void> {
    checkVersion(args.version);
    const g = this.#find(args.unit, undefined, 'ENOENT');
    const error = args.error ?? 0;
    if (error !== 0 && !isErrnoCode(error)) throw new BlockError('EINVAL', `done: unknown error code ${String(error)}`);
    if (!Number.isSafeInteger(args.seq) || args.seq < 0) throw new BlockError('EINVAL', `done: bad seq ${args.seq}`);
    g.complete(args.seq, error, args.data);
  }

  /** The gates, by unit. */
  list(): GateInfo[] {
    return [...this.#units.values()]
      .sort((a, b) => a.unit - b.unit)
      .map((g) => ({
        unit: g.unit,
        name: g.name,
        mediasize: g.mediasize,
        sectorsize: g.sectorsize,
        flags: g.flags,
        maxcount: g.maxcount,
        timeout: g.timeout,
        info: g.info,
        openCount: g.openCount,
        queued: g.queued,
        inFlight: g.inFlight,
        sleeping: g.sleeping,
      }));
  }

  /**
   * Opens the device side of a gate (/dev/ggate<unit>) by unit or name. The open count
   * makes an unforced destroy fail EBUSY until the device is closed.
   */
  open(unitOrName: number | string): GateDevice {
    const g =
      typeof unitOrName === 'string'
        ? this.#find(GATE.NAME_GIVEN, unitOrName, 'ENXIO')
        : this.#find(unitOrName, undefined, 'ENXIO');
    return new GateDevice(g);
  }

  /**
   * Wakes every handler sleeping in START on a gate without giving them anything: they
   * must go back to sleep without the caller noticing. For tests of the ERESTART rule.
   */
  wakeup(unit: number): void {
    this.#find(unit, undefined, 'ENXIO').wakeup();
  }

  /** Force-destroys every gate (shutdown); releases all guard timers. */
  async close(): Promise<void> {
    for (const g of [...this.#units.values()]) {
      this.#units.delete(g.unit);
      g.destroy();
    }
  }

  #allocateUnit(unit: number): number {
    if (unit >= 0) {
      if (unit >= this.maxUnits) throw new BlockError('EINVAL', `unit ${unit} is not below maxunits ${this.maxUnits}`);
      if (this.#units.has(unit)) throw new BlockError('EEXIST', `unit ${unit} is in use`);
      return unit;
    }
    for (let u = 0; u < this.maxUnits; u++) if (!this.#units.has(u)) return u;
    throw new BlockError('ENFILE', `all ${this.maxUnits} gate units are in use`);
  }

  #find(unit: number, name: string | undefined, missing: 'ENXIO' | 'ENOENT'): GateUnit {
    if (unit === GATE.NAME_GIVEN && name !== undefined) {
      for (const g of this.#units.values()) if (g.name === name) return g;
      throw new BlockError(missing, `no gate named ${name}`);
    }
    const g = this.#units.get(unit);
    if (g === undefined) throw new BlockError(missing, `no gate unit ${unit}`);
    return g;
  }
}

function checkVersion(version: number): void {
  if (version !== GATE.VERSION) {
    throw new BlockError('EINVAL', `gate API version ${version} is not ${GATE.VERSION}`);
  }
}

function checkMediasize(mediasize: number, sectorsize: number): void {
  if (!Number.isSafeInteger(mediasize) || mediasize <= 0 || mediasize > MAX_DEVICE_SIZE) {
    throw new BlockError('EINVAL', `mediasize must be a positive integer up to 2^53 - 1, got ${mediasize}`);
  }
  if (mediasize % sectorsize !== 0) {
    throw new BlockError('EINVAL', `mediasize ${mediasize} is not a multiple of sectorsize ${sectorsize}`);
  }
}

function checkInfo(info: string): void {
  if (Buffer.byteLength(info) > GATE.INFO_SIZE - 1) {
    throw new BlockError('EINVAL', `info is longer than ${GATE.INFO_SIZE - 1} bytes`);
  }
}
