/** Helpers the benches share (bench/run.ts, bench/ceph.ts, bench/s3.ts): tools run to completion, ports, server processes, CPU, medians. */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';

/** A TCP port on 127.0.0.1 that was free a moment ago (the OS's choice). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
    s.on('error', reject);
  });
}

/** Resolves once 127.0.0.1:`port` accepts a connection; rejects if `child` exits first or after `timeoutMs`. */
export async function waitForPort(port: number, child: ChildProcess, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`server exited with ${child.exitCode ?? child.signalCode}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`port ${port} did not open`);
}

/** SIGTERM, then SIGKILL after 10 s; resolves when the child has exited. */
export async function stopServer(r: { readonly child: ChildProcess }): Promise<void> {
  if (r.child.exitCode !== null || r.child.signalCode !== null) return;
  const done = new Promise<void>((resolve) => r.child.on('exit', () => resolve()));
  r.child.kill('SIGTERM');
  const t = setTimeout(() => r.child.kill('SIGKILL'), 10_000);
  await done;
  clearTimeout(t);
}

/** CPU seconds (user + system: utime and stime of /proc/PID/stat) of a process and all its threads. */
export function processCpuSeconds(pid: number, clkTck: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after "pid (comm) ": state is [0], utime [11], stime [12] (proc(5) fields 14 and 15).
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / clkTck;
}

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** PATH for Debian's tools: /usr/bin and /bin before anything else. */
export const DEBIAN_PATH = `/usr/bin:/bin:/usr/sbin:/sbin:${process.env.PATH ?? ''}`;

/** Bound on one tool run of a bench (a cluster start, a copy, a fio phase). */
export const TOOL_TIMEOUT_MS = 900_000;

/**
 * Runs a tool to completion with Debian's tools first in PATH (and `env` added); resolves
 * with its standard output, rejects with the end of its standard error unless it exits 0.
 * Killed after `timeoutMs`.
 */
export function must(cmd: string, args: readonly string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { env: { ...process.env, PATH: DEBIAN_PATH, ...opts.env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    c.stdout.on('data', (b: Buffer) => (out += b.toString()));
    c.stderr.on('data', (b: Buffer) => (err = (err + b.toString()).slice(-4000)));
    const t = setTimeout(() => c.kill('SIGKILL'), opts.timeoutMs ?? TOOL_TIMEOUT_MS);
    c.on('error', reject);
    c.on('close', (code, signal) => {
      clearTimeout(t);
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} ${args.join(' ')} exited ${code ?? signal}: ${err}`));
    });
  });
}

export function fmt(n: number, digits = 0): string {
  return n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}
