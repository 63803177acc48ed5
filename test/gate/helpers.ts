import assert from 'node:assert/strict';
import { BlockError, type ErrnoCode } from '../../src/errors/index.js';
import { GATE, GateRegistry, ManualClock, type GateCreateArgs, type GateDevice } from '../../src/gate/index.js';

export const V = GATE.VERSION;

export interface Setup {
  readonly clock: ManualClock;
  readonly reg: GateRegistry;
  readonly unit: number;
  readonly dev: GateDevice;
}

/** A registry on a manual clock with one gate (1 MiB, 512-byte sectors) opened once. */
export async function setup(args: Partial<GateCreateArgs> = {}): Promise<Setup> {
  const clock = new ManualClock();
  const reg = new GateRegistry({ clock });
  const unit = await reg.create({ version: V, mediasize: 1 << 20, sectorsize: 512, ...args });
  return { clock, reg, unit, dev: reg.open(unit) };
}

/** Observes a promise without awaiting it, so a test can ask whether it has settled. */
export interface Tracked<T> {
  readonly promise: Promise<T>;
  readonly settled: boolean;
  readonly value: T | undefined;
  readonly error: unknown;
}

export function track<T>(promise: Promise<T>): Tracked<T> {
  const t = { promise, settled: false, value: undefined as T | undefined, error: undefined as unknown };
  promise.then(
    (v) => {
      t.settled = true;
      t.value = v;
    },
    (e: unknown) => {
      t.settled = true;
      t.error = e;
    },
  );
  return t;
}

/** Lets the event loop run a few full turns (promise jobs and I/O callbacks), no timers. */
export async function turns(n = 5): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise<void>((resolve) => setImmediate(resolve));
}

/** Runs the event loop until `cond` holds; fails after `maxTurns` turns (never by time). */
export async function until(cond: () => boolean, maxTurns = 10_000): Promise<void> {
  for (let i = 0; i < maxTurns; i++) {
    if (cond()) return;
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
  assert.fail('condition not reached');
}

/** Asserts that `p` rejects with a BlockError of `code`. */
export async function rejectsWith(p: Promise<unknown>, code: ErrnoCode): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof BlockError, `expected a BlockError, got ${String(e)}`);
    assert.equal(e.code, code);
    return true;
  });
}

/** Asserts that a tracked promise has rejected with a BlockError of `code`. */
export function failedWith(t: Tracked<unknown>, code: ErrnoCode): void {
  assert.ok(t.settled, 'expected the request to have settled');
  assert.ok(t.error instanceof BlockError, `expected a BlockError, got ${String(t.error)} / ${String(t.value)}`);
  assert.equal(t.error.code, code);
}
