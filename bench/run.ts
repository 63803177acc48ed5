/**
 * `npm run bench`: blockgate against nbdkit and qemu-nbd, in one run, with the same
 * clients and the same data. Method and latest table: docs/PERFORMANCE.md.
 *
 *   npm run bench                 # full mode: 4 GiB exports, 3 runs per figure (< 20 min)
 *   npm run bench -- --quick      # 512 MiB, 1 run, short fio runs (< 3 min)
 *   npm run bench -- --ci         # regression guard: blockgate vs nbdkit memory only (< 1 min)
 *   npm run bench -- --servers a,b  # only these server kinds (of the mode's), e.g. blockgate-memory,blockgate-memory-tls
 *   npm run bench -- --json FILE  # also write the results as JSON (default bench/results/latest.json)
 *   npm run bench -- --copy-only  # only the copy rows (blockgate copy vs nbdcopy); --no-copy: none of them
 *   npm run bench -- --startup-only  # only the start-up row (serve --run true vs node -e 0 and nbdkit; every mode has it)
 *   npm run bench -- --overhead-only # only the metrics-overhead row (serve --http vs --no-metrics, 4 KiB QD32; every mode has it)
 *   npm run bench -- --ceph [--quick]  # only the Ceph rows, each pair on one throw-away cluster: the rbd backend vs
 *                                      # qemu-nbd (bench/ceph.ts), the s3 backend vs raw S3 (bench/s3.ts); docs/CEPH.md, docs/S3.md
 *   npm run bench -- --s3-only    # only the s3 rows (with --quick: 256 MiB, 1 run)
 *
 * Each server is started alone on 127.0.0.1 (TCP loopback), filled with the same random
 * data, measured, and stopped by PID before the next one starts.
 *
 * The `-tls` kinds serve the memory export with TLS required and a pre-shared key the
 * bench writes (psktool's `identity:hexkey` format, identity `bench`); clients connect
 * with `nbds://bench@127.0.0.1:PORT/?tls-psk-file=FILE`. libnbd refuses a URI that names
 * a local file unless the program calls nbd_set_uri_allow_local_file, which nbdcopy does
 * and fio 3.33's nbd engine does not, so fio runs with a small LD_PRELOAD shim (built
 * here with cc) that makes that call before nbd_connect_uri.
 *
 * The copy rows (after the servers) time the `blockgate copy` command (from dist/, with
 * its shebang's V8 flags) against nbdcopy on the same source and destination, nbdkit
 * memory servers at both NBD ends: NBD -> null:, file -> NBD, NBD -> NBD, and a sparse
 * source (a few MiB written) behind nbdkit's stats filter, which counts the bytes each
 * tool read. Client CPU is the child's rusage (this process's cutime + cstime across the
 * run, /proc/self/stat).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { V8_FLAGS } from '../src/cli/v8-flags.js';
import { NbdClient } from '../src/nbd/client.js';
import { freePort, median, processCpuSeconds, stopServer, waitForPort } from './util.js';
import { renderS3Table, runS3Bench, type S3BenchOptions } from './s3.js';

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
  /** The workloads of the TLS kinds (a subset of `workloads`). */
  readonly tlsWorkloads: readonly Workload[];
  /** The copy rows (blockgate copy vs nbdcopy). */
  readonly copyCases: readonly CopyCase[];
}

/**
 * A copy row: `nbd-null` NBD -> null:, `file-nbd` the data file -> NBD, `nbd-nbd` NBD ->
 * NBD, `sparse-null` a sparse NBD export -> null:; with 1 or 4 connections (-C).
 */
type CopyPath = 'nbd-null' | 'file-nbd' | 'nbd-nbd' | 'sparse-null';
interface CopyCase {
  readonly path: CopyPath;
  readonly conns: 1 | 4;
}
const COPY_PATHS: readonly CopyPath[] = ['nbd-null', 'file-nbd', 'nbd-nbd', 'sparse-null'];
const ALL_COPY_CASES: readonly CopyCase[] = COPY_PATHS.flatMap((p) => [1, 4].map((c) => ({ path: p, conns: c as 1 | 4 })));
const COPY_TITLES: Record<CopyPath, string> = {
  'nbd-null': 'NBD -> null:',
  'file-nbd': 'file -> NBD',
  'nbd-nbd': 'NBD -> NBD',
  'sparse-null': 'sparse NBD -> null:',
};
type CopyTool = 'blockgate' | 'nbdcopy';
const COPY_TOOLS: readonly CopyTool[] = ['blockgate', 'nbdcopy'];
/** The sparse source: SPARSE_CHUNKS pieces of SPARSE_CHUNK bytes of data, spread evenly. */
const SPARSE_CHUNKS = 8;
const SPARSE_CHUNK = 512 * 1024;

type ServerKind =
  | 'blockgate-memory'
  | 'blockgate-memory-tls'
  | 'blockgate-file'
  /** A paged RAM disk plugin written on blockgate/plugin's base class (bench/plugin-memory.mjs). */
  | 'blockgate-plugin'
  | 'nbdkit-memory'
  | 'nbdkit-memory-tls'
  | 'nbdkit-file'
  | 'nbdkit-null'
  | 'qemu-nbd-file'
  | 'node-floor';
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
  // TLS 1.3 with a pre-shared key (the same memory export), next to the plain ones.
  'blockgate-memory-tls',
  'nbdkit-memory-tls',
  'blockgate-plugin',
  'blockgate-file',
  'nbdkit-file',
  'qemu-nbd-file',
  'nbdkit-null',
  // The least a Node.js NBD server can cost per request (bench/node-floor.ts).
  'node-floor',
];

const TLS_WORKLOADS: readonly Workload[] = ['seq-read-c1', 'seq-write-c1', 'rand-read-qd32', 'rand-write-qd32'];

const MODES: Record<Mode['name'], Mode> = {
  full: { name: 'full', size: 4 * 2 ** 30, runs: 3, fioSeconds: 5, servers: ALL_SERVERS, workloads: ALL_WORKLOADS, tlsWorkloads: TLS_WORKLOADS, copyCases: ALL_COPY_CASES },
  quick: { name: 'quick', size: 512 * 2 ** 20, runs: 1, fioSeconds: 2, servers: ALL_SERVERS, workloads: ALL_WORKLOADS, tlsWorkloads: TLS_WORKLOADS, copyCases: ALL_COPY_CASES },
  ci: {
    name: 'ci',
    size: 256 * 2 ** 20,
    runs: 1,
    fioSeconds: 2,
    servers: ['blockgate-memory', 'nbdkit-memory', 'blockgate-memory-tls', 'nbdkit-memory-tls'],
    workloads: ['seq-read-c1', 'seq-write-c1', 'rand-read-qd32', 'rand-write-qd32'],
    // One short TLS row (a 256 MiB read each), so that the guard stays under a minute.
    tlsWorkloads: ['seq-read-c1'],
    // One copy row (a 256 MiB read each), for the same reason.
    copyCases: [{ path: 'nbd-null', conns: 1 }],
  },
};

const isTls = (k: ServerKind): boolean => k.endsWith('-tls');
const isMemory = (k: ServerKind): boolean => k.includes('-memory');
/** What the plugin row measures: the adapter's cost per request shows at 4 KiB QD32. */
const PLUGIN_WORKLOADS: readonly Workload[] = ['seq-read-c1', 'seq-write-c1', 'rand-read-qd32', 'rand-write-qd32'];
const workloadsOf = (k: ServerKind, mode: Mode): readonly Workload[] =>
  isTls(k) ? mode.tlsWorkloads : k === 'blockgate-plugin' ? mode.workloads.filter((w) => PLUGIN_WORKLOADS.includes(w)) : mode.workloads;

/** What the TLS kinds need: the PSK file, and the fio shim (null when it could not be built). */
interface TlsSetup {
  readonly pskFile: string;
  readonly fioPreload: string | null;
}

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

/** Clock ticks per second of /proc's times (`getconf CLK_TCK`; set in main). */
let clkTck = 100;

/** CPU seconds of a process and all its threads. */
function cpuSeconds(pid: number): number {
  return processCpuSeconds(pid, clkTck);
}

/** A process's command name (/proc/PID/comm). */
function comm(pid: number): string {
  return fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
}

/**
 * The PID whose CPU and memory are the server's: the child itself when it is the server
 * (blockgate, nbdkit -f, qemu-nbd and node-floor run in the process spawned), else the
 * first descendant named `name` (a wrapper such as sh or a tsx CLI would fork it).
 */
function serverPid(child: number, name: string): number {
  const queue = [child];
  while (queue.length > 0) {
    const pid = queue.shift()!;
    if (comm(pid) === name) return pid;
    for (const task of fs.readdirSync(`/proc/${pid}/task`)) {
      const kids = fs.readFileSync(`/proc/${pid}/task/${task}/children`, 'utf8').trim();
      if (kids) queue.push(...kids.split(' ').map(Number));
    }
  }
  throw new Error(`no process named ${name} under PID ${child} (${comm(child)})`);
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
  /** The server process measured (see serverPid). */
  readonly pid: number;
  readonly uri: string;
  readonly canWrite: boolean;
}

async function startServer(kind: ServerKind, size: number, file: string, tlsSetup: TlsSetup, extra: readonly string[] = []): Promise<Running> {
  const port = await freePort();
  const psk = tlsSetup.pskFile;
  // The PSK path is the bench's own (mkdtemp under /dev/shm): nothing in it needs escaping.
  const uri = isTls(kind) ? `nbds://bench@127.0.0.1:${port}/?tls-psk-file=${psk}` : `nbd://127.0.0.1:${port}/`;
  let cmd: string;
  let args: string[];
  let name: string;
  const env: NodeJS.ProcessEnv = { ...process.env, PATH };
  switch (kind) {
    case 'blockgate-memory':
    case 'blockgate-memory-tls':
    case 'blockgate-file':
    case 'blockgate-plugin':
      cmd = process.execPath;
      name = 'node';
      // As the `blockgate` command starts (its shebang carries V8_FLAGS).
      args = [
        ...V8_FLAGS,
        path.join(ROOT, 'dist/bundle/cli/main.js'),
        'serve',
        '-p',
        String(port),
        '-l',
        'warn',
        ...(kind === 'blockgate-memory-tls' ? ['--tls', 'require', '--tls-psk', psk] : []),
        ...extra,
        ...(kind === 'blockgate-file' ? [`file:${file}`] : kind === 'blockgate-plugin' ? [path.join(ROOT, 'bench/plugin-memory.mjs'), `size=${size}`] : [`memory:${size}`]),
      ];
      // BENCH_SERVER_NODE_OPTIONS: extra node flags for blockgate only (e.g. --cpu-prof --cpu-prof-dir=DIR).
      if (process.env.BENCH_SERVER_NODE_OPTIONS) args.unshift(...process.env.BENCH_SERVER_NODE_OPTIONS.split(' ').filter(Boolean));
      env.UV_THREADPOOL_SIZE = env.UV_THREADPOOL_SIZE ?? '4';
      break;
    case 'nbdkit-memory':
    case 'nbdkit-memory-tls':
      cmd = 'nbdkit';
      name = 'nbdkit';
      args = ['-f', '-i', '127.0.0.1', '-p', String(port), ...(kind === 'nbdkit-memory-tls' ? ['--tls=require', `--tls-psk=${psk}`] : []), 'memory', `size=${size}`];
      break;
    case 'nbdkit-file':
      cmd = 'nbdkit';
      name = 'nbdkit';
      args = ['-f', '-i', '127.0.0.1', '-p', String(port), 'file', file];
      break;
    case 'nbdkit-null':
      cmd = 'nbdkit';
      name = 'nbdkit';
      args = ['-f', '-i', '127.0.0.1', '-p', String(port), 'null', `size=${size}`];
      break;
    case 'qemu-nbd-file':
      cmd = 'qemu-nbd';
      name = 'qemu-nbd';
      args = ['-f', 'raw', '-b', '127.0.0.1', '-p', String(port), '-e', '8', '--cache=writeback', '-t', file];
      break;
    case 'node-floor':
      cmd = process.execPath;
      name = 'node';
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
  let pid: number;
  try {
    pid = serverPid(child.pid!, name);
  } catch (e) {
    child.kill('SIGKILL');
    throw e;
  }
  return { kind, child, pid, uri, canWrite: true };
}

async function nbdcopy(src: string, dst: string, conns: number): Promise<void> {
  await must('nbdcopy', ['--no-extents', '-C', String(conns), '-R', '16', '--request-size=262144', src, dst], 600_000);
}

async function measure(srv: Running, w: Workload, mode: Mode, file: string, tmp: string, tlsSetup: TlsSetup): Promise<Sample> {
  const pid = srv.pid;
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
    const fio = isTls(srv.kind) ? ['env', `LD_PRELOAD=${tlsSetup.fioPreload!}`, 'fio'] : ['fio'];
    await must(fio[0]!, [
      ...fio.slice(1),
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

/**
 * An LD_PRELOAD library for fio: fio's nbd engine calls nbd_connect_uri without
 * nbd_set_uri_allow_local_file, so libnbd refuses `tls-psk-file=` ("local file access
 * (tls-psk-file) is not allowed"). Null (with a warning) when there is no C compiler.
 */
async function buildFioShim(tmp: string): Promise<string | null> {
  const src = path.join(tmp, 'fio-allow-local-file.c');
  const so = path.join(tmp, 'fio-allow-local-file.so');
  fs.writeFileSync(
    src,
    `#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
struct nbd_handle;
int nbd_connect_uri(struct nbd_handle *h, const char *uri) {
  int (*real)(struct nbd_handle *, const char *) = (int (*)(struct nbd_handle *, const char *))dlsym(RTLD_NEXT, "nbd_connect_uri");
  int (*allow)(struct nbd_handle *, bool) = (int (*)(struct nbd_handle *, bool))dlsym(RTLD_NEXT, "nbd_set_uri_allow_local_file");
  if (allow) allow(h, true);
  return real(h, uri);
}
`,
  );
  const r = await sh('cc', ['-shared', '-fPIC', '-O2', '-o', so, src, '-ldl']);
  if (r.code !== 0) {
    process.stderr.write(`bench: no fio shim (cc: ${r.stderr.trim() || r.code}); TLS random workloads are skipped\n`);
    return null;
  }
  return so;
}

// ---------------------------------------------------------------------------------
// Copy rows: `blockgate copy` against nbdcopy

/** CPU seconds (user + system) of this process's children that have been waited for: cutime + cstime. */
function childCpuSeconds(): number {
  const stat = fs.readFileSync('/proc/self/stat', 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[13]) + Number(fields[14])) / clkTck;
}

/** One copy by one tool. */
interface CopySample {
  /** Wall time of the command, start-up and connecting included, seconds. */
  readonly wall: number;
  /** The client's CPU seconds (user + system, its rusage). */
  readonly cpu: number;
  /** CPU seconds of the NBD servers (source and destination) during the copy. */
  readonly serverCpu: number;
  /** Bytes read from the source as blockgate's `-v` line reports them (blockgate only). */
  readonly bytesRead: number | null;
  /** The copy's own time from blockgate's `-v` line (connected to done: no start-up), seconds. */
  readonly engine: number | null;
  /** Bytes the source server answered READs with (nbdkit's stats filter; the sparse rows only). */
  readonly sourceBytesRead: number | null;
}

interface CopyFigure {
  readonly path: CopyPath;
  readonly conns: number;
  readonly tool: CopyTool;
  /** Image bytes copied per run (the export size). */
  readonly size: number;
  readonly wall: { readonly median: number; readonly min: number; readonly max: number };
  /** MiB of the image per second of wall time (median). */
  readonly mibps: number;
  /** Client CPU seconds per GiB of the image (median). */
  readonly cpuPerGiB: number;
  /** Server CPU seconds per GiB of the image (median; source + destination). */
  readonly serverCpuPerGiB: number;
  readonly bytesRead: number | null;
  readonly sourceBytesRead: number | null;
  /** MiB/s over the `-v` line's time (blockgate only): without process start-up and connecting. */
  readonly engineMibps: number | null;
  /** The connections the tool opened (nbdcopy caps -C at its thread count, the number of cores). */
  readonly openedConns: number | null;
}

/** A plain nbdkit server for the copy rows (memory plugin unless `args` say otherwise). */
interface CopyServer {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly uri: string;
}

const copyLive = new Set<ChildProcess>();

async function startNbdkit(args: string[]): Promise<CopyServer> {
  const port = await freePort();
  const child = spawn('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), ...args], { env: { ...process.env, PATH }, stdio: ['ignore', 'ignore', 'pipe'] });
  copyLive.add(child);
  child.on('exit', () => copyLive.delete(child));
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err = (err + b.toString()).slice(-4000)));
  try {
    await waitForPort(port, child);
    return { child, pid: serverPid(child.pid!, 'nbdkit'), uri: `nbd://127.0.0.1:${port}/` };
  } catch (e) {
    child.kill('SIGKILL');
    throw new Error(`nbdkit ${args.join(' ')}: ${(e as Error).message}: ${err}`);
  }
}

/** Parses nbdkit's stats filter file: the bytes of the `read:` line (0 when there were no reads). */
function statsBytesRead(file: string): number {
  const m = /^read: \d+ ops, [\d.]+ s, ([\d.]+) (bytes|KiB|MiB|GiB|TiB)/m.exec(fs.readFileSync(file, 'utf8'));
  if (!m) return 0;
  const unit = { bytes: 1, KiB: 2 ** 10, MiB: 2 ** 20, GiB: 2 ** 30, TiB: 2 ** 40 }[m[2] as 'bytes'];
  return Math.round(Number(m[1]) * unit);
}

/** The same options for both tools: the defaults of both (64 requests of 256 KiB per connection), `-C conns`. */
async function runCopyTool(tool: CopyTool, src: string, dst: string, conns: number, servers: readonly CopyServer[]): Promise<Omit<CopySample, 'sourceBytesRead'> & { opened: number | null }> {
  const common = ['-C', String(conns), '-R', '64', '--request-size=262144'];
  let cmd: string;
  let args: string[];
  if (tool === 'nbdcopy') {
    cmd = 'nbdcopy';
    args = [...common, src, dst];
  } else {
    cmd = process.execPath;
    // As the `blockgate` command starts (its shebang carries V8_FLAGS).
    args = [...V8_FLAGS, path.join(ROOT, 'dist/bundle/cli/main.js'), 'copy', '-v', ...common, src, dst];
    // BENCH_CLIENT_NODE_OPTIONS: extra node flags for `blockgate copy` (e.g. --cpu-prof --cpu-prof-dir=DIR).
    if (process.env.BENCH_CLIENT_NODE_OPTIONS) args.unshift(...process.env.BENCH_CLIENT_NODE_OPTIONS.split(' ').filter(Boolean));
  }
  const s0 = servers.reduce((a, s) => a + cpuSeconds(s.pid), 0);
  const c0 = childCpuSeconds();
  const t0 = process.hrtime.bigint();
  const r = await sh(cmd, args, { timeoutMs: 600_000 });
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = childCpuSeconds() - c0;
  const serverCpu = servers.reduce((a, s) => a + cpuSeconds(s.pid), 0) - s0;
  if (r.code !== 0) throw new Error(`${tool} ${src} ${dst} failed (${r.code}): ${r.stderr.slice(-2000)}`);
  let bytesRead: number | null = null;
  let engine: number | null = null;
  let opened: number | null = null;
  if (tool === 'blockgate') {
    const m = /in ([\d.]+) s \([^)]*\): read (\d+) bytes from the source/.exec(r.stderr);
    if (!m) throw new Error(`blockgate copy -v printed no statistics: ${r.stderr.slice(-2000)}`);
    engine = Number(m[1]);
    bytesRead = Number(m[2]);
    opened = Math.max(0, ...[...r.stderr.matchAll(/nbd, \d+ bytes, (\d+) connection/g)].map((x) => Number(x[1])));
  }
  return { wall, cpu, serverCpu, bytesRead, engine, opened };
}

const nbdcopyOpened = new Map<number, number | null>();

/**
 * The connections nbdcopy opens for `-C conns` (its -v line; it caps them at its thread
 * count, by default the number of cores), asked of a small server of its own.
 */
async function nbdcopyConnections(conns: number): Promise<number | null> {
  if (!nbdcopyOpened.has(conns)) {
    const srv = await startNbdkit(['memory', 'size=1M']);
    try {
      const r = await sh('nbdcopy', ['-v', '-C', String(conns), srv.uri, 'null:']);
      const m = /connections=(\d+)/.exec(r.stderr);
      nbdcopyOpened.set(conns, m ? Number(m[1]) : null);
    } finally {
      await stopServer(srv);
    }
  }
  return nbdcopyOpened.get(conns)!;
}

async function fillSparse(uri: string, size: number): Promise<void> {
  const c = await NbdClient.connect(uri, { connections: 1 });
  try {
    const buf = crypto.randomBytes(SPARSE_CHUNK);
    const step = Math.floor(size / SPARSE_CHUNKS / 2 ** 20) * 2 ** 20;
    for (let i = 0; i < SPARSE_CHUNKS; i++) await c.pwrite(buf, i * step);
    await c.flush();
  } finally {
    await c.close();
  }
}

/**
 * The copy rows. Servers are started once per row group (path) and stopped by PID, but
 * the sparse rows start a fresh source per copy: nbdkit's stats filter writes its counts
 * only when nbdkit exits. Memory exports are filled before timing (untimed: the first write
 * into fresh memory is slow on these VMs), destinations included; each tool makes one
 * untimed copy per group first (page cache, server warm). Within a run the tools alternate
 * who goes first.
 */
async function copyRows(mode: Mode, data: string, tmp: string): Promise<CopyFigure[]> {
  const out: CopyFigure[] = [];
  const size = mode.size;
  const record = (c: CopyCase, tool: CopyTool, samples: CopySample[], opened: number | null) => {
    const walls = samples.map((x) => x.wall);
    const f: CopyFigure = {
      path: c.path,
      conns: c.conns,
      tool,
      size,
      wall: { median: median(walls), min: Math.min(...walls), max: Math.max(...walls) },
      mibps: size / 2 ** 20 / median(walls),
      cpuPerGiB: median(samples.map((x) => (x.cpu / size) * 2 ** 30)),
      serverCpuPerGiB: median(samples.map((x) => (x.serverCpu / size) * 2 ** 30)),
      bytesRead: samples[0]!.bytesRead === null ? null : median(samples.map((x) => x.bytesRead!)),
      sourceBytesRead: samples[0]!.sourceBytesRead === null ? null : median(samples.map((x) => x.sourceBytesRead!)),
      engineMibps: samples[0]!.engine === null ? null : size / 2 ** 20 / median(samples.map((x) => x.engine!)),
      openedConns: opened,
    };
    out.push(f);
    const engine = f.engineMibps !== null ? ` (${fmt(f.engineMibps)} without start-up)` : '';
    const extra = f.sourceBytesRead !== null ? `, source read ${fmt(f.sourceBytesRead / 2 ** 20, 2)} MiB` : '';
    process.stderr.write(
      `  copy ${c.path.padEnd(12)} C${c.conns} ${tool.padEnd(9)} ${fmt(f.wall.median, 3)} s (${fmt(f.wall.min, 3)}-${fmt(f.wall.max, 3)}), ${fmt(f.mibps)} MiB/s${engine}, client ${fmt(f.cpuPerGiB, 2)} CPU s/GiB${extra}\n`,
    );
  };
  for (const p of COPY_PATHS) {
    const cases = mode.copyCases.filter((c) => c.path === p);
    if (cases.length === 0) continue;
    const servers: CopyServer[] = [];
    try {
      if (p === 'sparse-null') {
        for (const c of cases) {
          const samples: Record<CopyTool, CopySample[]> = { blockgate: [], nbdcopy: [] };
          let opened: number | null = null;
          for (let i = 0; i < mode.runs; i++) {
            for (const tool of i % 2 ? [...COPY_TOOLS].reverse() : COPY_TOOLS) {
              const statsfile = path.join(tmp, `stats-${tool}-${c.conns}-${i}.txt`);
              const srv = await startNbdkit(['--filter=stats', 'memory', `size=${size}`, `statsfile=${statsfile}`]);
              try {
                await fillSparse(srv.uri, size);
                const r = await runCopyTool(tool, srv.uri, 'null:', c.conns, [srv]);
                await stopServer(srv);
                samples[tool].push({ ...r, sourceBytesRead: statsBytesRead(statsfile) });
                if (tool === 'blockgate') opened = r.opened;
              } finally {
                await stopServer(srv);
              }
            }
          }
          for (const tool of COPY_TOOLS) record(c, tool, samples[tool], tool === 'nbdcopy' ? await nbdcopyConnections(c.conns) : opened);
        }
        continue;
      }
      // The group's servers: a source holding the data, and/or a destination (prefilled).
      let src = data;
      let dst = 'null:';
      if (p === 'nbd-null' || p === 'nbd-nbd') {
        const s = await startNbdkit(['memory', `size=${size}`]);
        servers.push(s);
        await nbdcopy(data, s.uri, 4);
        src = s.uri;
      }
      if (p === 'file-nbd' || p === 'nbd-nbd') {
        const d = await startNbdkit(['memory', `size=${size}`]);
        servers.push(d);
        await nbdcopy(data, d.uri, 4);
        dst = d.uri;
      }
      for (const tool of COPY_TOOLS) await runCopyTool(tool, src, dst, cases[0]!.conns, servers);
      for (const c of cases) {
        const samples: Record<CopyTool, CopySample[]> = { blockgate: [], nbdcopy: [] };
        let opened: number | null = null;
        for (let i = 0; i < mode.runs; i++) {
          for (const tool of i % 2 ? [...COPY_TOOLS].reverse() : COPY_TOOLS) {
            const r = await runCopyTool(tool, src, dst, c.conns, servers);
            if (tool === 'blockgate') opened = r.opened;
            samples[tool].push({ ...r, sourceBytesRead: null });
          }
        }
        record(c, 'blockgate', samples.blockgate, opened);
        record(c, 'nbdcopy', samples.nbdcopy, await nbdcopyConnections(c.conns));
      }
    } finally {
      for (const s of servers) await stopServer(s);
    }
  }
  return out;
}

/** The copy table: per row, both tools' MiB/s and wall time, the ratio, client CPU per GiB, bytes read (sparse). */
export function renderCopyTable(figs: readonly CopyFigure[], mode: Mode): string {
  const get = (c: CopyCase, t: CopyTool) => figs.find((f) => f.path === c.path && f.conns === c.conns && f.tool === t);
  const lines = [
    '| copy | -C (opened: blockgate / nbdcopy) | blockgate MiB/s (wall s, min–max) | nbdcopy MiB/s (wall s, min–max) | blockgate/nbdcopy | blockgate MiB/s without start-up (-v time) | client CPU s/GiB: blockgate / nbdcopy | CPU ratio | servers CPU s/GiB: blockgate / nbdcopy | bytes read: blockgate (-v; source stats) / nbdcopy (source stats) |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ];
  const cell = (f: CopyFigure) => `${fmt(f.mibps)} (${fmt(f.wall.median, 3)} s, ${fmt(f.wall.min, 3)}–${fmt(f.wall.max, 3)})`;
  const mib = (n: number | null) => (n === null ? '—' : `${fmt(n / 2 ** 20, 2)} MiB`);
  for (const c of mode.copyCases) {
    const b = get(c, 'blockgate');
    const n = get(c, 'nbdcopy');
    if (!b || !n) continue;
    const read = c.path === 'sparse-null' ? `${mib(b.bytesRead)} (${mib(b.sourceBytesRead)}) / ${mib(n.sourceBytesRead)}` : '—';
    lines.push(
      `| ${COPY_TITLES[c.path]} | ${c.conns} (${b.openedConns ?? '?'} / ${n.openedConns ?? '?'}) | ${cell(b)} | ${cell(n)} | ${fmt(b.mibps / n.mibps, 2)} | ${b.engineMibps === null ? '—' : fmt(b.engineMibps)} | ${fmt(b.cpuPerGiB, 2)} / ${fmt(n.cpuPerGiB, 2)} | ${n.cpuPerGiB > 0 ? fmt(b.cpuPerGiB / n.cpuPerGiB, 2) : '—'} | ${fmt(b.serverCpuPerGiB, 2)} / ${fmt(n.serverCpuPerGiB, 2)} | ${read} |`,
    );
  }
  return `${lines.join('\n')}\n`;
}

/**
 * The start-up row: how long a command takes from spawn to exit when it has nothing to do,
 * `blockgate serve --run true memory:1G` (nbdkit's captive mode: serve, run `true`, exit)
 * against `nbdkit memory 1G --run true` and the floor of any Node.js program, `node -e 0`.
 * blockgate runs from dist/ with its shebang's V8 flags, as the installed command does.
 * The commands take turns within each round (the order rotating), so the load of a
 * shared machine falls on all of them alike; the median of STARTUP_RUNS[mode] rounds is
 * reported with min and max, and every median as a ratio to `node -e 0`'s.
 */
const STARTUP_RUNS: Record<Mode['name'], number> = { full: 21, quick: 11, ci: 11 };

interface StartupFigure {
  readonly name: string;
  readonly command: string;
  readonly medianMs: number;
  readonly minMs: number;
  readonly maxMs: number;
  /** medianMs over the median of `node -e 0`. */
  readonly vsNode: number;
}

function startupCommands(): { readonly name: string; readonly argv: readonly string[] }[] {
  const main = path.join(ROOT, 'dist/bundle/cli/main.js');
  return [
    { name: 'node -e 0', argv: [process.execPath, '-e', '0'] },
    { name: 'blockgate serve --run true memory:1G', argv: [process.execPath, ...V8_FLAGS, main, 'serve', '--run', 'true', 'memory:1G'] },
    // The same command from tsc's one-file-per-module output: what the bundle saves.
    { name: 'the same, unbundled (dist/src)', argv: [process.execPath, ...V8_FLAGS, path.join(ROOT, 'dist/src/cli/main.js'), 'serve', '--run', 'true', 'memory:1G'] },
    { name: 'blockgate --help', argv: [process.execPath, ...V8_FLAGS, main, '--help'] },
    { name: 'nbdkit memory 1G --run true', argv: ['nbdkit', 'memory', '1G', '--run', 'true'] },
  ];
}

/** Wall milliseconds from spawn to exit of one command (its output discarded); throws unless it exits 0. */
function timeSpawn(argv: readonly string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const c = spawn(argv[0]!, argv.slice(1), { env: { ...process.env, PATH }, stdio: 'ignore' });
    c.on('error', reject);
    c.on('exit', (code, signal) => {
      const ms = Number(process.hrtime.bigint() - t0) / 1e6;
      if (code === 0) resolve(ms);
      else reject(new Error(`${argv.join(' ')} exited ${code ?? signal}`));
    });
  });
}

async function startupRow(runs: number): Promise<StartupFigure[]> {
  const cmds = startupCommands();
  const times = cmds.map(() => [] as number[]);
  for (const c of cmds) await timeSpawn(c.argv); // untimed: the page cache warm for every one
  for (let round = 0; round < runs; round++) {
    for (let k = 0; k < cmds.length; k++) {
      const i = (k + round) % cmds.length;
      times[i]!.push(await timeSpawn(cmds[i]!.argv));
    }
  }
  const floor = median(times[0]!);
  return cmds.map((c, i) => ({
    name: c.name,
    command: c.argv.map((a) => (a === process.execPath ? 'node' : path.isAbsolute(a) ? path.relative(ROOT, a) : a)).join(' '),
    medianMs: median(times[i]!),
    minMs: Math.min(...times[i]!),
    maxMs: Math.max(...times[i]!),
    vsNode: median(times[i]!) / floor,
  }));
}

/**
 * Instructions each start-up command executes (callgrind's `I refs`, the process itself,
 * not the children it runs): unlike wall time, the same count whatever else the shared
 * machine is doing, so a change in start-up cost shows even under load. Null when
 * valgrind is missing. Each run takes 5-20 s under valgrind, so only the full and
 * --startup-only modes count them.
 */
async function startupInstructions(): Promise<number[] | null> {
  if ((await sh('which', ['valgrind'])).code !== 0) return null;
  const counts: number[] = [];
  for (const c of startupCommands()) {
    const r = await sh('valgrind', ['--tool=callgrind', '--callgrind-out-file=/dev/null', ...c.argv], { timeoutMs: 120_000 });
    const m = /I\s+refs:\s+([\d,]+)/.exec(r.stderr);
    if (r.code !== 0 || !m) throw new Error(`valgrind ${c.argv.join(' ')}: ${r.stderr.slice(-400)}`);
    counts.push(Number(m[1]!.replaceAll(',', '')));
  }
  return counts;
}

export function renderStartupTable(figs: readonly StartupFigure[], runs: number, instructions: readonly number[] | null = null): string {
  const lines = instructions
    ? [`| start-up (${runs} rounds) | median ms (min–max) | x node -e 0 | instructions (callgrind) | x node -e 0 |`, '|---|---|---|---|---|']
    : [`| start-up (${runs} rounds) | median ms (min–max) | x node -e 0 |`, '|---|---|---|'];
  figs.forEach((f, i) => {
    const ins = instructions ? ` ${fmt(instructions[i]! / 1e6)} M | ${fmt(instructions[i]! / instructions[0]!, 2)} |` : '';
    lines.push(`| \`${f.name}\` | ${fmt(f.medianMs)} (${fmt(f.minMs)}–${fmt(f.maxMs)}) | ${fmt(f.vsNode, 2)} |${ins}`);
  });
  return `${lines.join('\n')}\n`;
}

/** True when dist/ is missing or older than a source file (the bench runs blockgate from dist/). */
function distStale(): boolean {
  const main = path.join(ROOT, 'dist/bundle/cli/main.js');
  if (!fs.existsSync(main)) return true;
  const built = fs.statSync(main).mtimeMs;
  const newer = (dir: string): boolean =>
    fs.readdirSync(dir, { withFileTypes: true }).some((e) => {
      const p = path.join(dir, e.name);
      return e.isDirectory() ? newer(p) : e.name.endsWith('.ts') && fs.statSync(p).mtimeMs > built;
    });
  return newer(path.join(ROOT, 'src'));
}

function fmt(n: number, digits = 0): string {
  return n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

/**
 * The metrics-overhead row: the cost of counting (docs/OBSERVABILITY.md), as fio 4 KiB
 * random reads and writes at QD32 against two blockgate memory servers started side by
 * side in the same run, one with everything on (`--http 127.0.0.1:0`: the counters, the
 * one-second sampler, prom-client loaded; nobody scrapes) and one with `--no-metrics`.
 * They take turns in ABBA order (on, off, off, on, ...) so that drift in the machine's
 * speed falls on both alike; each figure is the median of the rounds.
 */
const OVERHEAD_ROUNDS: Record<Mode['name'], number> = { full: 20, quick: 10, ci: 2 };
/**
 * fio seconds per run of the row: short runs, many rounds. A 3 % difference drowns in
 * the load of a shared machine within any one run; over many adjacent on/off pairs the
 * median ratio (with its quartiles in the table) settles.
 */
const OVERHEAD_FIO_SECONDS = 1;
/** The exports of the overhead row: small, since two servers hold one each. */
const OVERHEAD_SIZE = 256 * 2 ** 20;
const OVERHEAD_WORKLOADS: readonly Workload[] = ['rand-read-qd32', 'rand-write-qd32'];
const OVERHEAD_SIDES = [
  { name: 'on', args: ['--no-control', '--http', '127.0.0.1:0'] },
  { name: 'off', args: ['--no-control', '--no-metrics'] },
] as const;

interface OverheadFigure {
  readonly workload: Workload;
  readonly rounds: number;
  /** Median IOPS with metrics on and off. */
  readonly onIops: number;
  readonly offIops: number;
  /**
   * The median over rounds of on / off within the round (the two runs of a round are
   * adjacent in time, so a load that comes and goes on a shared machine cancels out
   * better than in the ratio of the two medians).
   */
  readonly ratio: number;
  /** The quartiles of the per-round on / off: how far the machine's noise spreads it. */
  readonly ratioQ1: number;
  readonly ratioQ3: number;
  /** Server CPU seconds per GiB moved, on and off (medians). */
  readonly onCpuPerGiB: number;
  readonly offCpuPerGiB: number;
}

async function overheadRow(mode: Mode, data: string, tmp: string, tlsSetup: TlsSetup, live: Running[]): Promise<OverheadFigure[]> {
  const m: Mode = { ...mode, size: OVERHEAD_SIZE, fioSeconds: OVERHEAD_FIO_SECONDS };
  const fill = path.join(tmp, 'overhead.img');
  await must('sh', ['-c', `head -c ${OVERHEAD_SIZE} '${data}' > '${fill}'`]);
  const servers: Running[] = [];
  try {
    for (const side of OVERHEAD_SIDES) {
      const srv = await startServer('blockgate-memory', OVERHEAD_SIZE, fill, tlsSetup, side.args);
      servers.push(srv);
      live.push(srv);
      // Filled and read once, untimed, as the other rows: both measured warm.
      await nbdcopy(fill, srv.uri, 4);
      await nbdcopy(srv.uri, 'null:', 1);
    }
    const rounds = OVERHEAD_ROUNDS[mode.name];
    const out: OverheadFigure[] = [];
    for (const w of OVERHEAD_WORKLOADS) {
      const samples: Sample[][] = [[], []];
      for (let r = 0; r < rounds; r++) {
        const order = r % 2 === 0 ? [0, 1] : [1, 0];
        for (const i of order) samples[i]!.push(await measure(servers[i]!, w, m, fill, tmp, tlsSetup));
      }
      const iops = samples.map((ss) => median(ss.map((s) => s.value)));
      const cpu = samples.map((ss) => median(ss.map((s) => (s.cpu / s.bytes) * 2 ** 30)));
      const ratios = samples[0]!.map((s, r) => s.value / samples[1]![r]!.value).sort((a, b) => a - b);
      const q = (p: number): number => ratios[Math.round(p * (ratios.length - 1))]!;
      const f: OverheadFigure = {
        workload: w,
        rounds,
        onIops: iops[0]!,
        offIops: iops[1]!,
        ratio: median(ratios),
        ratioQ1: q(0.25),
        ratioQ3: q(0.75),
        onCpuPerGiB: cpu[0]!,
        offCpuPerGiB: cpu[1]!,
      };
      process.stderr.write(`  metrics overhead ${w.padEnd(15)} on ${fmt(f.onIops)} off ${fmt(f.offIops)} IOPS, on/off ${fmt(f.ratio, 3)}\n`);
      out.push(f);
    }
    return out;
  } finally {
    for (const s of servers) {
      await stopServer(s);
      live.splice(live.indexOf(s), 1);
    }
    fs.rmSync(fill, { force: true });
  }
}

export function renderOverheadTable(figs: readonly OverheadFigure[]): string {
  const lines = [
    `| metrics overhead (4 KiB, ${figs[0]?.rounds ?? 0} rounds ABBA of ${OVERHEAD_FIO_SECONDS} s) | metrics on IOPS | --no-metrics IOPS | on/off, median of rounds (quartiles) | CPU s/GiB on | CPU s/GiB off |`,
    '|---|---|---|---|---|---|',
  ];
  for (const f of figs) {
    lines.push(`| ${f.workload} | ${fmt(f.onIops)} | ${fmt(f.offIops)} | ${fmt(f.ratio, 3)} (${fmt(f.ratioQ1, 3)}–${fmt(f.ratioQ3, 3)}) | ${fmt(f.onCpuPerGiB, 2)} | ${fmt(f.offCpuPerGiB, 2)} |`);
  }
  return `${lines.join('\n')}\n`;
}

/**
 * The s3 rows: a 512 MiB export, 3 runs of 15 s random phases; 256 MiB and one run with
 * --quick or --ci. The OSD holds everything in RAM, about 4 x the size across the rows.
 */
function s3OptionsFor(quick: boolean): S3BenchOptions {
  return quick ? { size: 256 * 2 ** 20, seconds: 8, runs: 1 } : { size: 512 * 2 ** 20, seconds: 15, runs: 3 };
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  if (argv.includes('--ceph')) {
    // The Ceph rows need a cluster and qemu-block-extra: their own modules (bench/ceph.ts, bench/s3.ts).
    const ji = argv.indexOf('--json');
    const { cephBench } = await import('./ceph.js');
    await cephBench(argv, ji >= 0 && argv[ji + 1] ? argv[ji + 1]! : path.join(ROOT, 'bench/results/ceph-latest.json'));
    const s3Options = s3OptionsFor(argv.includes('--quick') || argv.includes('--ci'));
    const s3 = await runS3Bench(s3Options);
    process.stdout.write(`\n${renderS3Table(s3, s3Options)}`);
    const s3Json = path.join(ROOT, 'bench/results/s3-latest.json');
    fs.mkdirSync(path.dirname(s3Json), { recursive: true });
    fs.writeFileSync(s3Json, JSON.stringify({ date: new Date().toISOString(), s3: { options: s3Options, results: s3 } }, null, 2));
    return;
  }
  const base = MODES[argv.includes('--ci') ? 'ci' : argv.includes('--quick') ? 'quick' : 'full'];
  const si = argv.indexOf('--servers');
  let mode: Mode = base;
  if (si >= 0) {
    const wanted = (argv[si + 1] ?? '').split(',').filter(Boolean);
    const unknown = wanted.filter((k) => !ALL_SERVERS.includes(k as ServerKind));
    if (wanted.length === 0 || unknown.length > 0) throw new Error(`--servers: expected some of ${ALL_SERVERS.join(',')}${unknown.length ? `, not ${unknown.join(',')}` : ''}`);
    mode = { ...base, servers: ALL_SERVERS.filter((k) => wanted.includes(k)) };
  }
  const startupOnly = argv.includes('--startup-only');
  const overheadOnly = argv.includes('--overhead-only');
  // Only the row's own data: OVERHEAD_SIZE, not the mode's exports.
  if (overheadOnly) mode = { ...mode, servers: [], copyCases: [], size: OVERHEAD_SIZE };
  const copyOnly = argv.includes('--copy-only');
  const withCopy = !argv.includes('--no-copy');
  if (copyOnly && !withCopy) throw new Error('--copy-only and --no-copy exclude each other');
  if (copyOnly) mode = { ...mode, servers: [] };
  if (!withCopy) mode = { ...mode, copyCases: [] };
  const ji = argv.indexOf('--json');
  const jsonOut = ji >= 0 && argv[ji + 1] ? argv[ji + 1]! : path.join(ROOT, 'bench/results/latest.json');
  const s3Options = s3OptionsFor(mode.name !== 'full');
  if (argv.includes('--s3-only')) {
    process.stderr.write(`bench: s3 rows only, ${s3Options.size / 2 ** 20} MiB, ${s3Options.runs} run(s)\n`);
    const s3 = await runS3Bench(s3Options);
    process.stdout.write(renderS3Table(s3, s3Options));
    fs.mkdirSync(path.dirname(jsonOut), { recursive: true });
    fs.writeFileSync(jsonOut, JSON.stringify({ mode: mode.name, date: new Date().toISOString(), s3: { options: s3Options, results: s3 } }, null, 2));
    return;
  }
  for (const tool of ['nbdkit', 'qemu-nbd', 'nbdcopy', 'fio']) {
    if ((await sh('which', [tool])).code !== 0) throw new Error(`${tool} is not installed (apt-get install nbdkit qemu-utils libnbd-bin fio)`);
  }
  if (distStale()) {
    process.stderr.write('bench: building dist/ (missing or older than src/)\n');
    await must('npm', ['run', 'build']);
  }
  clkTck = Number((await must('getconf', ['CLK_TCK'])).trim()) || 100;
  const startupRuns = STARTUP_RUNS[mode.name];
  if (!overheadOnly) process.stderr.write(`bench: start-up row, ${startupRuns} rounds\n`);
  const startup = overheadOnly ? [] : await startupRow(startupRuns);
  const startupIns = startupOnly || (mode.name === 'full' && !overheadOnly) ? await startupInstructions() : null;
  if (startupOnly) {
    process.stdout.write(renderStartupTable(startup, startupRuns, startupIns));
    return;
  }

  const shm = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const tmp = fs.mkdtempSync(path.join(shm, 'blockgate-bench-'));
  const data = path.join(tmp, 'data.img');
  const fileExport = path.join(tmp, 'export.img');
  const started = Date.now();
  const results: ServerResult[] = [];
  let current: Running | null = null;
  let fioShim: string | null = null;
  let copyFigures: CopyFigure[] = [];
  let overhead: OverheadFigure[] = [];
  const overheadLive: Running[] = [];
  const cleanup = () => {
    current?.child.kill('SIGKILL');
    for (const s of overheadLive) s.child.kill('SIGKILL');
    for (const c of copyLive) c.kill('SIGKILL');
    fs.rmSync(tmp, { recursive: true, force: true });
  };
  process.on('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  try {
    process.stderr.write(
      `bench: ${mode.name} mode, ${mode.size / 2 ** 20} MiB exports, ${mode.runs} run(s) per figure, ${mode.servers.length} server kind(s), ${mode.copyCases.length} copy row(s)\n`,
    );
    await must('sh', ['-c', `head -c ${mode.size} /dev/urandom > '${data}'`], 600_000);
    // psktool's format (what `psktool -u bench -p FILE` writes): identity:hexkey, 32 random bytes.
    const pskFile = path.join(tmp, 'bench.psk');
    fs.writeFileSync(pskFile, `bench:${crypto.randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
    const tlsSetup: TlsSetup = { pskFile, fioPreload: mode.servers.some(isTls) ? await buildFioShim(tmp) : null };
    fioShim = tlsSetup.fioPreload;
    for (const kind of mode.servers) {
      fs.copyFileSync(data, fileExport);
      const srv = await startServer(kind, mode.size, fileExport, tlsSetup);
      current = srv;
      try {
        // Fill memory exports with the same data (the first write into fresh memory is slow
        // on these VMs for every server, so it is not timed).
        if (isMemory(kind)) await nbdcopy(data, srv.uri, 4);
        // One untimed pass each way, so every server is measured warm (JIT compiled,
        // buffers pooled, page cache filled) rather than on its first requests.
        if (!isMemory(kind)) await nbdcopy(data, srv.uri, 1);
        await nbdcopy(srv.uri, 'null:', 1);
        const idle = memory(srv.pid).rss;
        const figures: Partial<Record<Workload, Figure>> = {};
        for (const w of workloadsOf(kind, mode)) {
          if (isTls(kind) && w.startsWith('rand-') && tlsSetup.fioPreload === null) continue;
          const samples: Sample[] = [];
          for (let i = 0; i < mode.runs; i++) samples.push(await measure(srv, w, mode, data, tmp, tlsSetup));
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
          process.stderr.write(`  ${kind.padEnd(20)} ${w.padEnd(15)} ${fmt(f.median)} (${fmt(f.min)}-${fmt(f.max)}), ${fmt(f.cpuPerGiB, 2)} CPU s/GiB\n`);
        }
        const m = memory(srv.pid);
        results.push({ server: kind, idleRssMiB: idle, peakRssMiB: m.hwm, figures });
      } finally {
        await stopServer(srv);
        current = null;
      }
    }
    fs.rmSync(fileExport, { force: true });
    if (mode.copyCases.length > 0) copyFigures = await copyRows(mode, data, tmp);
    overhead = await overheadRow(mode, data, tmp, tlsSetup, overheadLive);
  } finally {
    cleanup();
  }
  if (results.length > 0) process.stdout.write(renderTable(results, mode));
  if (copyFigures.length > 0) process.stdout.write(`${results.length > 0 ? '\n' : ''}${renderCopyTable(copyFigures, mode)}`);
  process.stdout.write(`${results.length + copyFigures.length > 0 ? '\n' : ''}${renderOverheadTable(overhead)}`);
  if (startup.length > 0) process.stdout.write(`\n${renderStartupTable(startup, startupRuns, startupIns)}`);
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
        clkTck,
        tls: { psk: 'identity bench, 32-byte key', fioShim: fioShim !== null ? 'LD_PRELOAD nbd_set_uri_allow_local_file' : null },
        results,
        copy: copyFigures,
        startup: { runs: startupRuns, figures: startup, instructions: startupIns },
        overhead,
      },
      null,
      2,
    ),
  );
  process.stderr.write(`bench: done in ${fmt((Date.now() - started) / 1000)} s; JSON in ${jsonOut}\n`);
}

const UNITS: Record<string, string> = { seq: 'MiB/s', rand: 'IOPS' };

/** The ratio columns: numerator and denominator server kinds. */
const RATIOS: readonly { readonly title: string; readonly a: ServerKind; readonly b: ServerKind }[] = [
  { title: 'blockgate/nbdkit memory', a: 'blockgate-memory', b: 'nbdkit-memory' },
  { title: 'blockgate/nbdkit file', a: 'blockgate-file', b: 'nbdkit-file' },
  { title: 'blockgate-tls/nbdkit-tls', a: 'blockgate-memory-tls', b: 'nbdkit-memory-tls' },
  { title: 'blockgate TLS/plain', a: 'blockgate-memory-tls', b: 'blockgate-memory' },
  { title: 'nbdkit TLS/plain', a: 'nbdkit-memory-tls', b: 'nbdkit-memory' },
  { title: 'plugin/built-in memory', a: 'blockgate-plugin', b: 'blockgate-memory' },
];

/**
 * The Markdown tables: each figure with min-max and the ratios of the same backend
 * (blockgate / nbdkit, TLS / plain); then each server's CPU seconds per GiB moved, per
 * workload, with the same ratios.
 */
export function renderTable(results: ServerResult[], mode: Mode): string {
  const by = new Map(results.map((r) => [r.server, r]));
  const ratios = RATIOS.filter((q) => by.has(q.a) && by.has(q.b));
  const lines: string[] = [];
  const header = (first: string) => {
    lines.push(`| ${first} | ${results.map((r) => r.server).join(' | ')} | ${ratios.map((q) => q.title).join(' | ')} |`);
    lines.push(`|---|${results.map(() => '---').join('|')}|${ratios.map(() => '---').join('|')}|`);
  };
  const ratio = (a: number | undefined, b: number | undefined) => (!a || !b ? '—' : fmt(a / b, 2));
  const fig = (k: ServerKind, w: Workload) => by.get(k)?.figures[w];
  const ratioCells = (w: Workload, key: 'median' | 'p50' | 'cpuPerGiB') => ratios.map((q) => ratio(fig(q.a, w)?.[key], fig(q.b, w)?.[key])).join(' | ');
  header('workload');
  for (const w of mode.workloads) {
    const unit = UNITS[w.split('-')[0]!]!;
    const cells = results.map((r) => {
      const f = r.figures[w];
      return f ? `${fmt(f.median)} (${fmt(f.min)}–${fmt(f.max)})` : '—';
    });
    lines.push(`| ${w} (${unit}) | ${cells.join(' | ')} | ${ratioCells(w, 'median')} |`);
    if (w.endsWith('qd1')) {
      const lat = results.map((r) => {
        const f = r.figures[w];
        return f?.p50 !== undefined ? `${fmt(f.p50)} / ${fmt(f.p99!)}` : '—';
      });
      lines.push(`| ${w} p50 / p99 latency (µs) | ${lat.join(' | ')} | ${ratioCells(w, 'p50')} |`);
    }
  }
  const blank = ratios.map(() => '').join(' | ');
  const cpu = results.map((r) => {
    const fs2 = Object.values(r.figures);
    return fmt(median(fs2.map((f) => f.cpuPerGiB)), 2);
  });
  lines.push(`| server CPU s per GiB (median of its workloads) | ${cpu.join(' | ')} | ${blank} |`);
  lines.push(`| server memory: idle / peak RSS (MiB) | ${results.map((r) => `${fmt(r.idleRssMiB)} / ${fmt(r.peakRssMiB)}`).join(' | ')} | ${blank} |`);
  lines.push('');
  header('server CPU s per GiB moved');
  for (const w of mode.workloads) {
    const cells = results.map((r) => {
      const f = r.figures[w];
      return f ? fmt(f.cpuPerGiB, 2) : '—';
    });
    lines.push(`| ${w} | ${cells.join(' | ')} | ${ratioCells(w, 'cpuPerGiB')} |`);
  }
  return `${lines.join('\n')}\n`;
}

await main();
