import { BlockError, type ErrnoCode } from '../errors/index.js';
import type { GateClock, GateTimer } from './clock.js';
import { GATE_FLAG, GUARD_CHECKS_PER_TIMEOUT, GUARD_MAX_PERIOD_MS, type GateCommand } from './constants.js';
import { Deque } from '../io/deque.js';

/** `start` handed the handler a request: do it, then call `done` with its `seq`. */
export interface GateStartRequest {
  readonly error: 0;
  /** Sequence number (from 1; 0 is reserved for "all" in cancel). */
  readonly seq: number;
  readonly cmd: GateCommand;
  readonly offset: number;
  readonly length: number;
  /**
   * WRITE only: the payload, exactly `length` bytes. It is the requester's own buffer
   * (no copy is made): read it, never modify it, and do not keep it after `done`.
   */
  readonly data?: Buffer;
}

/** The gate was destroyed: the handler's work is over (the only clean-exit reason). */
export interface GateStartCanceled {
  readonly error: 'ECANCELED';
}

/**
 * The request at the head of the queue is a WRITE whose payload is larger than the
 * buffer the handler declared; it stays at the head. Grow the buffer to `length` and
 * call `start` again.
 */
export interface GateStartNoMem {
  readonly error: 'ENOMEM';
  readonly length: number;
}

/**
 * What `start` resolves with: an instance condition or a request, told apart by
 * `error`. Call-level failures are never in here; they reject the promise.
 */
export type GateStartResult = GateStartRequest | GateStartCanceled | GateStartNoMem;

/** One request on its way through the gate. */
interface GateRequest {
  readonly seq: number;
  readonly cmd: GateCommand;
  readonly offset: number;
  readonly length: number;
  /** WRITE payload. */
  readonly data: Buffer | undefined;
  /** READ: where the handler's data is copied on success. */
  readonly readInto: Buffer | undefined;
  /** Admission time (clock ms), for the timeout guard; kept across requeues. */
  readonly t0: number;
  readonly resolve: () => void;
  readonly reject: (e: BlockError) => void;
}

/** The settings of a gate fixed at creation (validated by the registry). */
export interface GateUnitSettings {
  readonly unit: number;
  readonly name: string;
  readonly mediasize: number;
  readonly sectorsize: number;
  readonly flags: number;
  /** Queue limit after capping; 0 = unlimited. */
  readonly maxcount: number;
  /** Seconds; 0 = no timeout guard. */
  readonly timeout: number;
  readonly info: string;
}

/**
 * One gate instance (FreeBSD's `g_gate_softc`): the pending queue (FreeBSD's in-queue),
 * the in-flight table (out-queue), the sleeping handlers, the open count of its device
 * side and the timeout guard. The registry validates arguments and owns the unit
 * table; this class keeps the queue invariants.
 *
 * Invariants: a request is in exactly one of pending / in-flight until it is settled,
 * and is settled exactly once (by `complete`, the guard, or `destroy`).
 */
export class GateUnit {
  readonly unit: number;
  readonly name: string;
  readonly sectorsize: number;
  readonly flags: number;
  readonly maxcount: number;
  readonly timeout: number;

  #mediasize: number;
  #info: string;
  readonly #clock: GateClock;
  readonly #pending = new Deque<GateRequest>();
  /** In-flight requests by seq; Map order is the order handlers took them (the out-queue). */
  readonly #inflight = new Map<number, GateRequest>();
  readonly #sleepers = new Set<() => void>();
  #nextSeq = 1;
  #openCount = 0;
  #destroyed = false;
  #guard: GateTimer | undefined;

  constructor(settings: GateUnitSettings, clock: GateClock) {
    this.unit = settings.unit;
    this.name = settings.name;
    this.sectorsize = settings.sectorsize;
    this.flags = settings.flags;
    this.maxcount = settings.maxcount;
    this.timeout = settings.timeout;
    this.#mediasize = settings.mediasize;
    this.#info = settings.info;
    this.#clock = clock;
    if (this.timeout > 0) {
      const period = Math.min((this.timeout * 1000) / GUARD_CHECKS_PER_TIMEOUT, GUARD_MAX_PERIOD_MS);
      this.#guard = clock.every(period, () => this.#expire());
    }
  }

  get mediasize(): number {
    return this.#mediasize;
  }
  set mediasize(v: number) {
    this.#mediasize = v;
  }
  get info(): string {
    return this.#info;
  }
  set info(v: string) {
    this.#info = v;
  }
  get readonly(): boolean {
    return (this.flags & GATE_FLAG.READONLY) !== 0;
  }
  get writeonly(): boolean {
    return (this.flags & GATE_FLAG.WRITEONLY) !== 0;
  }
  get destroyed(): boolean {
    return this.#destroyed;
  }
  get openCount(): number {
    return this.#openCount;
  }
  /** Requests waiting for a handler. */
  get queued(): number {
    return this.#pending.size;
  }
  /** Requests a handler has taken and not yet completed. */
  get inFlight(): number {
    return this.#inflight.size;
  }
  /** Handlers blocked in `start`. */
  get sleeping(): number {
    return this.#sleepers.size;
  }

  /** Device side opened (FreeBSD: access count). A destroyed gate cannot be opened. */
  open(): void {
    if (this.#destroyed) throw new BlockError('ENXIO', `gate ${this.name} is being destroyed`);
    this.#openCount++;
  }

  close(): void {
    if (this.#openCount > 0) this.#openCount--;
  }

  /**
   * Admits a request from the device side (g_gate_start + g_gate_queue_io). Settles when
   * a handler completes it, the guard expires it, or the gate is destroyed.
   */
  submit(cmd: GateCommand, offset: number, length: number, data?: Buffer, readInto?: Buffer): Promise<void> {
    if (this.#destroyed) return Promise.reject(new BlockError('ENXIO', `gate ${this.name} is being destroyed`));
    if (this.readonly && cmd !== 'read') {
      return Promise.reject(new BlockError('EPERM', `${cmd} on read-only gate ${this.name}`));
    }
    if (this.writeonly && cmd === 'read') {
      return Promise.reject(new BlockError('EPERM', `read on write-only gate ${this.name}`));
    }
    if (cmd !== 'read' && cmd !== 'write' && cmd !== 'delete' && cmd !== 'flush') {
      return Promise.reject(new BlockError('EOPNOTSUPP', `gate ${this.name} does not support '${String(cmd)}'`));
    }
    // Queue limit: we admit exactly `maxcount` requests (queued + in flight) and refuse
    // the next one. FreeBSD tests `count > size` after counting and so admits
    // maxcount + 1 (A.4 #13); a limit that means what it says is easier to reason about.
    // The refused request fails ENOMEM, as FreeBSD fails the bio ("Queue full"); this is
    // the requester's error and never appears on the handler's channel, where ENOMEM
    // means "your buffer is too small".
    if (this.maxcount > 0 && this.#pending.size + this.#inflight.size >= this.maxcount) {
      return Promise.reject(
        new BlockError('ENOMEM', `gate ${this.name}: queue full (${this.maxcount} requests outstanding)`),
      );
    }
    return new Promise<void>((resolve, reject) => {
      this.#pending.pushBack({
        seq: this.#nextSeq++,
        cmd,
        offset,
        length,
        data,
        readInto,
        t0: this.#clock.now(),
        resolve,
        reject,
      });
      this.#wakeAll();
    });
  }

  /**
   * The body of START. Loops until it can return an instance result: a wake-up that
   * finds nothing to take (another handler was faster, a cancel that moved nothing) is
   * internal and goes back to sleep, like a restarted syscall (ERESTART, D33996). Only
   * the caller's own signal ends the call with a failure (EINTR).
   */
  async take(bufferLength: number, signal?: AbortSignal): Promise<GateStartResult> {
    for (;;) {
      // Checked before taking anything, so an aborted start never holds a request.
      if (signal?.aborted) throw interrupted(signal);
      const head = this.#pending.peekFront();
      if (head !== undefined) {
        if (head.cmd === 'write' && head.length > bufferLength) {
          return { error: 'ENOMEM', length: head.length };
        }
        this.#pending.popFront();
        this.#inflight.set(head.seq, head);
        const out: GateStartRequest = {
          error: 0,
          seq: head.seq,
          cmd: head.cmd,
          offset: head.offset,
          length: head.length,
        };
        return head.cmd === 'write' ? { ...out, data: head.data } : out;
      }
      if (this.#destroyed) return { error: 'ECANCELED' };
      await this.#sleep(signal);
    }
  }

  /**
   * The body of DONE. Unknown seq: nothing (the request was cancelled, expired or
   * already completed). EAGAIN: back to the head of the pending queue. Anything else
   * completes the request. A READ completed with less data than requested fails EIO
   * for the requester and EFAULT for the caller (FreeBSD: a failed copyin).
   */
  complete(seq: number, error: ErrnoCode | 0, data: Buffer | undefined): void {
    const req = this.#inflight.get(seq);
    if (req === undefined) return;
    this.#inflight.delete(seq);
    if (error === 'EAGAIN') {
      this.#pending.pushFront(req);
      this.#wakeAll();
      return;
    }
    if (error !== 0) {
      req.reject(new BlockError(error, `gate ${this.name}: ${req.cmd} failed in the handler`, { offset: req.offset }));
      return;
    }
    if (req.cmd === 'read' && req.readInto !== undefined) {
      if (data === undefined || data.length < req.length) {
        req.reject(
          new BlockError('EIO', `gate ${this.name}: handler returned ${data?.length ?? 0} of ${req.length} bytes`),
        );
        throw new BlockError('EFAULT', `done: read ${seq} needs ${req.length} bytes of data, got ${data?.length ?? 0}`);
      }
      data.copy(req.readInto, 0, 0, req.length);
    }
    req.resolve();
  }

  /**
   * CANCEL: moves in-flight requests back to the head of the pending queue, all of them
   * (seq 0) in the order they were taken, or just `seq`. Nothing fails; a handler that
   * later answers a moved request is ignored (unknown seq).
   */
  cancel(seq: number): void {
    const moved = seq === 0 ? [...this.#inflight.values()] : [this.#inflight.get(seq)].filter((r) => r !== undefined);
    for (let i = moved.length - 1; i >= 0; i--) {
      const req = moved[i]!;
      this.#inflight.delete(req.seq);
      this.#pending.pushFront(req);
    }
    // FreeBSD wakes the sleepers even when nothing moved; they find nothing and sleep on.
    this.#wakeAll();
  }

  /**
   * Forced or unopened destroy: stop the guard, fail every queued and in-flight request
   * ENXIO, and wake the handlers, whose `start` resolves ECANCELED. Later requests fail
   * ENXIO (the registry also forgets the unit).
   */
  destroy(): void {
    if (this.#destroyed) return;
    this.#destroyed = true;
    this.#guard?.cancel();
    this.#guard = undefined;
    const failed = [...this.#pending.drain(), ...this.#inflight.values()];
    this.#inflight.clear();
    for (const req of failed) req.reject(new BlockError('ENXIO', `gate ${this.name} destroyed`, { offset: req.offset }));
    this.#wakeAll();
  }

  /** Test hook and control-socket helper: wake every sleeping handler with nothing new. */
  wakeup(): void {
    this.#wakeAll();
  }

  /** The timeout guard: fail EIO every request, queued or in flight, aged `timeout` or more. */
  #expire(): void {
    const limit = this.timeout * 1000;
    const now = this.#clock.now();
    const old = (r: GateRequest): boolean => now - r.t0 >= limit;
    const expired = this.#pending.filter((r) => !old(r));
    for (const [seq, req] of this.#inflight) {
      if (old(req)) {
        this.#inflight.delete(seq);
        expired.push(req);
      }
    }
    for (const req of expired) {
      req.reject(
        new BlockError('EIO', `gate ${this.name}: ${req.cmd} timed out after ${this.timeout} s`, { offset: req.offset }),
      );
    }
  }

  #sleep(signal: AbortSignal | undefined): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const onAbort = (): void => {
        this.#sleepers.delete(wake);
        reject(interrupted(signal!));
      };
      const wake = (): void => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      };
      this.#sleepers.add(wake);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** FreeBSD's wakeup(sc): every sleeper re-checks the queue; those that find nothing sleep again. */
  #wakeAll(): void {
    if (this.#sleepers.size === 0) return;
    const sleepers = [...this.#sleepers];
    this.#sleepers.clear();
    for (const wake of sleepers) wake();
  }
}

function interrupted(signal: AbortSignal): BlockError {
  return new BlockError('EINTR', 'start interrupted by the caller', { cause: signal.reason });
}
