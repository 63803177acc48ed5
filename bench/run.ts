/**
 * `npm run bench`: blockgate against nbdkit and qemu-nbd, in one run, with the same
 * clients and the same data. Method and latest table: docs/PERFORMANCE.md.
 *
 *   npm run bench                 # full mode: 4 GiB exports, 3 runs per figure (< 20 min)
 *   npm run bench -- --quick      # 512 MiB, 1 run, short fio runs (< 3 min)
 *   npm run bench -- --ci         # regression guard: blockgate vs nbdkit memory only (< 1 min)
 *   npm run bench -- --json FILE  # also write the results as JSON (default bench/results/latest.json)
 *
 * Each server is started alone on 127.0.0.1 (TCP loopback), filled with the same random
 * data, measured, and stopped by PID before the next one starts.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { V8_FLAGS } from '../src/cli/v8-flags.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const PATH = `/usr/bin:/bin:/usr/sbin:/sbin:${process.env.PATH ?? ''}`;

interface Mode {
  readonly name: 'full' | 'quick' | 'ci';
  /** Export size in bytes. */
  readonly size: number;
  /** Runs per figure (the median is reported, with min and max). */
  readonly runs: number;
  /** fio run time per run, seconds. */
  readonly fioSeconds: number;
  readonly servers: readonly ServerKind[];
  readonly workloads: readonly Workload[];
}

type ServerKind = 'blockgate-memory' | 'blockgate-file' | 'nbdkit-memory' | 'nbdkit-file' | 'nbdkit-null' | 'qemu-nbd-file' | 'node-floor';
type Workload =
  | 'seq-read-c1'
  | 'seq-read-c4'
  | 'seq-write-c1'
  | 'seq-write-c4'
  | 'rand-read-qd1'
  | 'rand-read-qd32'
  | 'rand-write-qd1'
  | 'rand-write-qd32';

const ALL_WORKLOADS: readonly Workload[] = [
  'seq-read-c1',
  'seq-read-c4',
  'seq-write-c1',
  'seq-write-c4',
  'rand-read-qd1',
  'rand-read-qd32',
  'rand-write-qd1',
  'rand-write-qd32',
];
const ALL_SERVERS: readonly ServerKind[] = [
  'blockgate-memory',
  'nbdkit-memory',
  'blockgate-file',
  'nbdkit-file',
  'qemu-nbd-file',
  'nbdkit-null',
  // The least a Node.js NBD server can cost per request (bench/node-floor.ts).
  'node-floor',
];

const MODES: Record<Mode['name'], Mode> = {
  full: { name: 'full', size: 4 * 2 ** 30, runs: 3, fioSeconds: 5, servers: ALL_SERVERS, workloads: ALL_WORKLOADS },
  quick: { name: 'quick', size: 512 * 2 ** 20, runs: 1, fioSeconds: 2, servers: ALL_SERVERS, workloads: ALL_WORKLOADS },
  ci: {
    name: 'ci',
    size: 256 * 2 ** 20,
    runs: 1,
    fioSeconds: 2,
    servers: ['blockgate-memory', 'nbdkit-memory'],
    workloads: ['seq-read-c1', 'seq-write-c1', 'rand-read-qd32', 'rand-write-qd32'],
  },
};

/** One measurement. */
interface Sample {
  /** MiB/s for sequential work, IOPS for random. */
  readonly value: number;
  /** fio's p50 and p99 completion latency in microseconds (random work). */
  readonly p50?: number;
  readonly p99?: number;
  /** Server CPU seconds (user + system) during the run. */
  readonly cpu: number;
  /** Bytes moved. */
  readonly bytes: number;
}

interface Figure {
  readonly median: number;
  readonly min: number;
  readonly max: number;
  readonly p50?: number;
  readonly p99?: number;
  /** Server CPU seconds per GiB moved (median over runs). */
  readonly cpuPerGiB: number;
}

interface ServerResult {
  readonly server: ServerKind;
  readonly idleRssMiB: number;
  readonly peakRssMiB: number;
  readonly figures: Partial<Record<Workload, Figure>>;
}

function sh(cmd: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { env: { ...process.env, PATH }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    c.stdout.on('data', (b: Buffer) => (out += b.toString()));
    c.stderr.on('data', (b: Buffer) => (err += b.toString()));
    const t = setTimeout(() => c.kill('SIGKILL'), opts.timeoutMs ?? 300_000);
    c.on('error', reject);
    c.on('close', (code) => {
      clearTimeout(t);
      resolve({ code, stdout: out, stderr: err });
    });
  });
}

async function must(cmd: string, args: string[], timeoutMs?: number): Promise<string> {
  const r = await sh(cmd, args, timeoutMs ? { timeoutMs } : {});
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
    s.on('error', reject);
  });
}

async function waitForPort(port: number, child: ChildProcess, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`server exited with ${child.exitCode}`);
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

/** CPU seconds (user + system) of a process and its threads, from /proc. */
function cpuSeconds(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ticks = Number(fields[11]) + Number(fields[12]);
  return ticks / 100; // USER_HZ is 100 on Linux
}

/** Resident and peak resident memory of a process, MiB. */
function memory(pid: number): { rss: number; hwm: number } {
  const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+)`).exec(s)?.[1] ?? 0);
  return { rss: kb('VmRSS') / 1024, hwm: kb('VmHWM') / 1024 };
}

interface Running {
  readonly kind: ServerKind;
  readonly child: ChildProcess;
  readonly uri: string;
  readonly canWrite: boolean;
}

async function startServer(kind: ServerKind, size: number, file: string): Promise<Running> {
  const port = await freePort();
  const uri = `nbd://127.0.0.1:${port}/`;
  let cmd: string;
  let args: string[];
  const env: NodeJS.ProcessEnv = { ...process.env, PATH };
  switch (kind) {
    case 'blockgate-memory':
    case 'blockgate-file':
      cmd = process.execPath;
      // As the `blockgate` command starts (its shebang carries V8_FLAGS).
      args = [
        ...V8_FLAGS,
        path.join(ROOT, 'dist/src/cli/main.js'),
        'serve',
        '-p',
        String(port),
        '-l',
        'warn',
        kind === 'blockgate-memory' ? `memory:${size}` : `file:${file}`,
      ];
      env.UV_THREADPOOL_SIZE = env.UV_THREADPOOL_SIZE ?? '4';
      break;
    case 'nbdkit-memory':
      cmd = 'nbdkit';
      args = ['-f', '-i', '127.0.0.1', '-p', String(port), 'memory', `size=${size}`];
      break;
    case 'nbdkit-file':
      cmd = 'nbdkit';
      args = ['-f', '-i', '127.0.0.1', '-p', String(port), 'file', file];
      break;
    case 'nbdkit-null':
      cmd = 'nbdkit';
      args = ['-f', '-i', '127.0.0.1', '-p', String(port), 'null', `size=${size}`];
      break;
    case 'qemu-nbd-file':
      cmd = 'qemu-nbd';
      args = ['-f', 'raw', '-b', '127.0.0.1', '-p', String(port), '-e', '8', '--cache=writeback', '-t', file];
      break;
    case 'node-floor':
      cmd = process.execPath;
      // With blockgate's V8 flags, so that the two differ only in what the server does.
      args = [...V8_FLAGS, '--import', 'tsx', path.join(ROOT, 'bench/node-floor.ts'), String(port), String(size)];
      break;
  }
  const child = spawn(cmd, args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err = (err + b.toString()).slice(-4000)));
  try {
    await waitForPort(port, child);
  } catch (e) {
    child.kill('SIGKILL');
    throw new Error(`${kind}: ${(e as Error).message}: ${err}`);
  }
  return { kind, child, uri, canWrite: true };
}

async function stopServer(r: Running): Promise<void> {
  if (r.child.exitCode !== null) return;
  const done = new Promise<void>((resolve) => r.child.on('exit', () => resolve()));
  r.child.kill('SIGTERM');
  const t = setTimeout(() => r.child.kill('SIGKILL'), 10_000);
  await done;
  clearTimeout(t);
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

async function nbdcopy(src: string, dst: string, conns: number): Promise<void> {
  await must('nbdcopy', ['--no-extents', '-C', String(conns), '-R', '16', '--request-size=262144', src, dst], 600_000);
}

async function measure(srv: Running, w: Workload, mode: Mode, file: string, tmp: string): Promise<Sample> {
  const pid = srv.child.pid!;
  const cpu0 = cpuSeconds(pid);
  const t0 = process.hrtime.bigint();
  let bytes = mode.size;
  let p50: number | undefined;
  let p99: number | undefined;
  let value: number;
  if (w.startsWith('seq-')) {
    const conns = w.endsWith('c4') ? 4 : 1;
    if (w.startsWith('seq-read')) await nbdcopy(srv.uri, 'null:', conns);
    else await nbdcopy(file, srv.uri, conns);
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    value = mode.size / 2 ** 20 / secs;
  } else {
    const depth = w.endsWith('qd32') ? 32 : 1;
    const out = path.join(tmp, 'fio.json');
    await must('fio', [
      '--name=bench',
      '--ioengine=nbd',
      `--uri=${srv.uri}`,
      `--rw=${w.startsWith('rand-read') ? 'randread' : 'randwrite'}`,
      '--bs=4k',
      `--iodepth=${depth}`,
      `--size=${mode.size}`,
      '--time_based',
      `--runtime=${mode.fioSeconds}`,
      '--randrepeat=1',
      '--output-format=json',
      `--output=${out}`,
    ]);
    const j = JSON.parse(fs.readFileSync(out, 'utf8')) as {
      jobs: { read: FioDir; write: FioDir }[];
    };
    const d = w.startsWith('rand-read') ? j.jobs[0]!.read : j.jobs[0]!.write;
    value = d.iops;
    bytes = d.io_bytes;
    p50 = (d.clat_ns.percentile?.['50.000000'] ?? 0) / 1000;
    p99 = (d.clat_ns.percentile?.['99.000000'] ?? 0) / 1000;
  }
  const cpu = cpuSeconds(pid) - cpu0;
  return { value, cpu, bytes, ...(p50 !== undefined ? { p50, p99: p99! } : {}) };
}

interface FioDir {
  iops: number;
  io_bytes: number;
  clat_ns: { percentile?: Record<string, number> };
}

function fmt(n: number, digits = 0): string {
  return n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const mode = MODES[argv.includes('--ci') ? 'ci' : argv.includes('--quick') ? 'quick' : 'full'];
  const ji = argv.indexOf('--json');
  const jsonOut = ji >= 0 && argv[ji + 1] ? argv[ji + 1]! : path.join(ROOT, 'bench/results/latest.json');
  for (const tool of ['nbdkit', 'qemu-nbd', 'nbdcopy', 'fio']) {
    if ((await sh('which', [tool])).code !== 0) throw new Error(`${tool} is not installed (apt-get install nbdkit qemu-utils libnbd-bin fio)`);
  }
  if (!fs.existsSync(path.join(ROOT, 'dist/src/cli/main.js'))) await must('npm', ['run', 'build']);

  const shm = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const tmp = fs.mkdtempSync(path.join(shm, 'blockgate-bench-'));
  const data = path.join(tmp, 'data.img');
  const fileExport = path.join(tmp, 'export.img');
  const started = Date.now();
  const results: ServerResult[] = [];
  let current: Running | null = null;
  const cleanup = () => {
    current?.child.kill('SIGKILL');
    fs.rmSync(tmp, { recursive: true, force: true });
  };
  process.on('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  try {
    process.stderr.write(`bench: ${mode.name} mode, ${mode.size / 2 ** 20} MiB exports, ${mode.runs} run(s) per figure\n`);
    await must('sh', ['-c', `head -c ${mode.size} /dev/urandom > '${data}'`], 600_000);
    for (const kind of mode.servers) {
      fs.copyFileSync(data, fileExport);
      const srv = await startServer(kind, mode.size, fileExport);
      current = srv;
      try {
        // Fill memory exports with the same data (the first write into fresh memory is slow
        // on these VMs for every server, so it is not timed).
        if (kind.endsWith('memory')) await nbdcopy(data, srv.uri, 4);
        // One untimed pass each way, so every server is measured warm (JIT compiled,
        // buffers pooled, page cache filled) rather than on its first requests.
        if (!kind.endsWith('memory')) await nbdcopy(data, srv.uri, 1);
        await nbdcopy(srv.uri, 'null:', 1);
        const idle = memory(srv.child.pid!).rss;
        const figures: Partial<Record<Workload, Figure>> = {};
        for (const w of mode.workloads) {
          const samples: Sample[] = [];
          for (let i = 0; i < mode.runs; i++) samples.push(await measure(srv, w, mode, data, tmp));
          const vals = samples.map((s) => s.value);
          const f: Figure = {
            median: median(vals),
            min: Math.min(...vals),
            max: Math.max(...vals),
            cpuPerGiB: median(samples.map((s) => (s.cpu / s.bytes) * 2 ** 30)),
            ...(samples[0]!.p50 !== undefined
              ? { p50: median(samples.map((s) => s.p50!)), p99: median(samples.map((s) => s.p99!)) }
              : {}),
          };
          figures[w] = f;
          process.stderr.write(`  ${kind.padEnd(17)} ${w.padEnd(15)} ${fmt(f.median)} (${fmt(f.min)}-${fmt(f.max)})\n`);
        }
        const m = memory(srv.child.pid!);
        results.push({ server: kind, idleRssMiB: idle, peakRssMiB: m.hwm, figures });
      } finally {
        await stopServer(srv);
        current = null;
      }
    }
  } finally {
    cleanup();
  }
  const table = renderTable(results, mode);
  process.stdout.write(table);
  fs.mkdirSync(path.dirname(jsonOut), { recursive: true });
  fs.writeFileSync(
    jsonOut,
    JSON.stringify(
      {
        mode: mode.name,
        date: new Date().toISOString(),
        seconds: (Date.now() - started) / 1000,
        machine: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, memGiB: Math.round(os.totalmem() / 2 ** 30), node: process.version, kernel: os.release() },
        sizeBytes: mode.size,
        runs: mode.runs,
        results,
      },
      null,
      2,
    ),
  );
  process.stderr.write(`bench: done in ${fmt((Date.now() - started) / 1000)} s; JSON in ${jsonOut}\n`);
}

const UNITS: Record<string, string> = { seq: 'MiB/s', rand: 'IOPS' };

/** The Markdown table: each figure with min-max, and blockgate / nbdkit ratios of the same backend. */
export function renderTable(results: ServerResult[], mode: Mode): string {
  const by = new Map(results.map((r) => [r.server, r]));
  const lines: string[] = [];
  lines.push(`| workload | ${results.map((r) => r.server).join(' | ')} | blockgate/nbdkit memory | blockgate/nbdkit file |`);
  lines.push(`|---|${results.map(() => '---').join('|')}|---|---|`);
  const ratio = (a?: Figure, b?: Figure, lowerIsBetter = false, key: 'median' | 'p50' = 'median') => {
    const x = a?.[key];
    const y = b?.[key];
    if (!x || !y) return '—';
    return fmt(lowerIsBetter ? x / y : x / y, 2);
  };
  for (const w of mode.workloads) {
    const unit = UNITS[w.split('-')[0]!]!;
    const cells = results.map((r) => {
      const f = r.figures[w];
      return f ? `${fmt(f.median)} (${fmt(f.min)}–${fmt(f.max)})` : '—';
    });
    lines.push(
      `| ${w} (${unit}) | ${cells.join(' | ')} | ${ratio(by.get('blockgate-memory')?.figures[w], by.get('nbdkit-memory')?.figures[w])} | ${ratio(by.get('blockgate-file')?.figures[w], by.get('nbdkit-file')?.figures[w])} |`,
    );
    if (w.endsWith('qd1')) {
      const lat = results.map((r) => {
        const f = r.figures[w];
        return f?.p50 !== undefined ? `${fmt(f.p50)} / ${fmt(f.p99!)}` : '—';
      });
      lines.push(
        `| ${w} p50 / p99 latency (µs) | ${lat.join(' | ')} | ${ratio(by.get('blockgate-memory')?.figures[w], by.get('nbdkit-memory')?.figures[w], true, 'p50')} | ${ratio(by.get('blockgate-file')?.figures[w], by.get('nbdkit-file')?.figures[w], true, 'p50')} |`,
      );
    }
  }
  const cpu = results.map((r) => {
    const fs2 = Object.values(r.figures);
    return fmt(median(fs2.map((f) => f.cpuPerGiB)), 2);
  });
  lines.push(`| server CPU s per GiB (median of workloads) | ${cpu.join(' | ')} | | |`);
  lines.push(`| server memory: idle / peak RSS (MiB) | ${results.map((r) => `${fmt(r.idleRssMiB)} / ${fmt(r.peakRssMiB)}`).join(' | ')} | | |`);
  return `${lines.join('\n')}\n`;
}

await main();
