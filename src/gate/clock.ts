/**
 * The time source of a gate registry: the current time and a periodic timer. Injected
 * so that the timeout guard can be driven deterministically (see {@link ManualClock});
 * tests never wait for real time.
 */
export interface GateClock {
  /** Milliseconds since an arbitrary origin (Date.now in production). */
  now(): number;
  /** Calls `fn` every `periodMs` until the returned timer is cancelled. */
  every(periodMs: number, fn: () => void): GateTimer;
}

/** A periodic timer started by {@link GateClock.every}. */
export interface GateTimer {
  cancel(): void;
}

/**
 * The real clock. Its timers are unref'ed: a guard must not keep a process alive that
 * has nothing else to do.
 */
export const systemClock: GateClock = {
  now: () => Date.now(),
  every(periodMs, fn) {
    const handle = setInterval(fn, periodMs);
    handle.unref();
    return { cancel: () => clearInterval(handle) };
  },
};

interface ManualTimer {
  readonly periodMs: number;
  readonly fn: () => void;
  next: number;
  active: boolean;
}

/**
 * A clock that moves only when told to: `advance(ms)` runs every timer that falls due,
 * in time order, with `now()` equal to each timer's due time while it runs.
 */
export class ManualClock implements GateClock {
  #now: number;
  #timers: ManualTimer[] = [];

  constructor(start = 0) {
    this.#now = start;
  }

  now(): number {
    return this.#now;
  }

  every(periodMs: number, fn: () => void): GateTimer {
    if (!(periodMs > 0)) throw new RangeError(`timer period must be positive, got ${periodMs}`);
    const t: ManualTimer = { periodMs, fn, next: this.#now + periodMs, active: true };
    this.#timers.push(t);
    return {
      cancel: () => {
        t.active = false;
        this.#timers = this.#timers.filter((x) => x !== t);
      },
    };
  }

  /** Number of timers not cancelled (tests check that guards are released). */
  get activeTimers(): number {
    return this.#timers.length;
  }

  /** Moves time forward by `ms`, firing due timers on the way. */
  advance(ms: number): void {
    const target = this.#now + ms;
    for (;;) {
      let due: ManualTimer | undefined;
      for (const t of this.#timers) {
        if (t.active && t.next <= target && (due === undefined || t.next < due.next)) due = t;
      }
      if (due === undefined) break;
      this.#now = due.next;
      due.next += due.periodMs;
      due.fn();
    }
    this.#now = target;
  }
}
