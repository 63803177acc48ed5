/**
 * Long-running child processes of the interop tests: `blockgate` started from the sources
 * (serve, ggated, gate handlers) and client programs kept running while a test acts on
 * them. Their output is collected; every wait is bounded by CHILD_WAIT_MS; a ChildSet
 * remembers the children still alive so the test's `after` can kill them by PID.
 *
 * Also the `blockgate status --json` reading the gate tests poll.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { DEBIAN_PATH, run, runOk, type RunResult } from './run.js';

/** Bound on any single wait for a child's output or exit, and on a `blockgate` run. */
export const CHILD_WAIT_MS = 60_000;

/** How many times untilGates reads the status before giving up (bounded by a count, not by time). */
const GATE_POLLS = 100;
/** Pause between two status reads of untilGates. */
const GATE_POLL_INTERVAL_MS = 100;

const MAIN = path.resolve(import.meta.dirname, '../../src/cli/main.ts');
/** Node.js arguments that run the blockgate CLI from the sources. */
export const BLOCKGATE_CLI: readonly string[] = ['--import', 'tsx', MAIN];

export interface Child {
  readonly proc: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Resolves when the stream matches `re` (rejects after CHILD_WAIT_MS or if the child exits first). */
  waitFor(re: RegExp, stream?: 'stdout' | 'stderr'): Promise<RegExpMatchArray>;
  /** Resolves with the exit code (or the signal name), bounded by CHILD_WAIT_MS. */
  exited(): Promise<number | string>;
}

/** The children a test file started; killAll() in `after` ends those still alive. */
export class ChildSet {
  readonly #alive = new Set<ChildProcess>();

  /** Starts `cmd` with Debian's tools first in PATH (and `env` added), its stdin, stdout and stderr piped. */
  start(cmd: string, args: readonly string[], env: Record<string, string> = {}): Child {
    const proc = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, PATH: DEBIAN_PATH, ...env } });
    this.#alive.add(proc);
    const text = { stdout: '', stderr: '' };
    const listeners = new Set<() => void>();
    const notify = (): void => {
      for (const l of [...listeners]) l();
    };
    proc.stdout!.on('data', (b: Buffer) => {
      text.stdout += b.toString();
      notify();
    });
    proc.stderr!.on('data', (b: Buffer) => {
      text.stderr += b.toString();
      notify();
    });
    // A child that exits while a test writes to it must not fail the test with EPIPE.
    proc.stdin!.on('error', () => undefined);
    let done = false;
    const exit = new Promise<number | string>((resolve) =>
      proc.on('exit', (code, signal) => {
        this.#alive.delete(proc);
        done = true;
        notify();
        resolve(code ?? signal ?? 'unknown');
      }),
    );
    return {
      proc,
      stdout: () => text.stdout,
      stderr: () => text.stderr,
      waitFor(re, stream = 'stdout') {
        return new Promise((resolve, reject) => {
          const check = (): void => {
            const m = re.exec(text[stream]);
            if (m) {
              cleanup();
              resolve(m);
            } else if (done || proc.exitCode !== null || proc.signalCode !== null) {
              cleanup();
              reject(new Error(`${path.basename(cmd)} exited before printing ${re}; stdout: ${text.stdout}; stderr: ${text.stderr}`));
            }
          };
          const timer = setTimeout(() => {
            cleanup();
            reject(new Error(`timed out waiting for ${re}; stdout: ${text.stdout}; stderr: ${text.stderr}`));
          }, CHILD_WAIT_MS);
          const cleanup = (): void => {
            clearTimeout(timer);
            listeners.delete(check);
          };
          listeners.add(check);
          check();
        });
      },
      exited() {
        return Promise.race([
          exit,
          new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`still running; stderr: ${text.stderr}`)), CHILD_WAIT_MS).unref()),
        ]);
      },
    };
  }

  /** Starts `blockgate <args>` from the sources. */
  blockgate(args: readonly string[]): Child {
    return this.start(process.execPath, [...BLOCKGATE_CLI, ...args]);
  }

  /** SIGKILLs, by PID, every child that has not exited. */
  killAll(): void {
    for (const c of this.#alive) c.kill('SIGKILL');
  }
}

/** Runs `blockgate <args>` from the sources to completion. */
export function blockgateRun(args: readonly string[]): Promise<RunResult> {
  return run(process.execPath, [...BLOCKGATE_CLI, ...args], { timeoutMs: CHILD_WAIT_MS });
}

/** Runs `blockgate <args>` and throws with its output if it does not exit 0. */
export function blockgateOk(args: readonly string[]): Promise<RunResult> {
  return runOk(process.execPath, [...BLOCKGATE_CLI, ...args], { timeoutMs: CHILD_WAIT_MS });
}

/** A gate in `blockgate status --json` (the fields the tests read). */
export interface GateJson {
  unit: number;
  name: string;
  info: string;
  queued: number;
  inFlight: number;
  sleeping: number;
  openCount: number;
}

/** An export in `blockgate status --json` (the fields the tests read). */
export interface ExportJson {
  name: string;
  gate?: number;
  errseq: { error: number; seen: boolean; counter: number; value: number };
  sessions: { errorPending: boolean }[];
}

export interface StatusJson {
  exports: ExportJson[];
  gates: GateJson[];
}

/** `blockgate status --json` of the server on the control socket `control`; asserts it exits 0. */
export async function statusJson(control: string): Promise<StatusJson> {
  const r = await blockgateRun(['status', '--json', '--control', control]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as StatusJson;
}

/** Polls `blockgate status` until `cond` holds for the gate list (bounded by a count, not by time). */
export async function untilGates(control: string, cond: (g: GateJson[]) => boolean, what: string): Promise<GateJson[]> {
  for (let i = 0; i < GATE_POLLS; i++) {
    const g = (await statusJson(control)).gates;
    if (cond(g)) return g;
    await new Promise((r) => setTimeout(r, GATE_POLL_INTERVAL_MS));
  }
  throw new Error(`gates never reached: ${what}`);
}
