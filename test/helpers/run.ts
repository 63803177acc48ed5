/**
 * Running real client programs from tests: Debian's tools with /usr/bin first in PATH
 * (nbdsh and Python's nbd module need Debian's python3), a bounded lifetime, and the
 * process killed by PID if it overstays.
 */
import { spawn } from 'node:child_process';

export interface RunResult {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** PATH for Debian's tools: /usr/bin and /bin before anything else. */
export const DEBIAN_PATH = `/usr/bin:/bin:/usr/sbin:/sbin:${process.env.PATH ?? ''}`;

/** Default lifetime of a client process in tests. */
export const CLIENT_TIMEOUT_MS = 60_000;

/** Runs a program to completion (asynchronously, so an in-process server keeps serving). */
export function run(
  cmd: string,
  args: readonly string[],
  opts: { input?: string | Buffer; env?: Record<string, string>; timeoutMs?: number; cwd?: string } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: { ...process.env, PATH: DEBIAN_PATH, ...opts.env },
      stdio: ['pipe', 'pipe', 'pipe'],
      ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? CLIENT_TIMEOUT_MS);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() });
    });
    child.stdin.on('error', () => undefined);
    child.stdin.end(opts.input ?? '');
  });
}

/** Runs a program and throws with its output if it does not exit 0. */
export async function runOk(
  cmd: string,
  args: readonly string[],
  opts: { input?: string | Buffer; env?: Record<string, string>; timeoutMs?: number; cwd?: string } = {},
): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${r.code ?? r.signal}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  }
  return r;
}

/** Runs an nbdsh script (Python) against a URI given as $uri. */
export function nbdsh(script: string, uri: string, timeoutMs?: number): Promise<RunResult> {
  return runOk('nbdsh', ['-c', script], { env: { uri }, ...(timeoutMs ? { timeoutMs } : {}) });
}
