/**
 * The s3 rows of `npm run bench -- --ceph` (or `--s3-only`): a blockgate s3 export,
 * driven over NBD by nbdcopy and fio, against the raw S3 throughput of the same radosgw
 * from this Node process with the same client (src/backends/s3/client.ts: the same
 * agent with TCP_NODELAY, the same S3_MAX_INFLIGHT bound) - the ceiling of that path,
 * since every byte the export moves is an S3 request of that client.
 *
 * One throw-away Ceph cluster (test/cluster/ceph-up.sh through test/helpers/ceph.ts) is
 * started for the rows and stopped at the end, after an untimed warm-up. In each run every
 * workload is measured raw and then through blockgate, one right after the other, so the
 * two figures of a row see the cluster and the (shared, noisy) machine in the same state:
 * - seq-write: nbdcopy a random file into the export (whole chunks), `--flush` (so the time covers
 *   every PUT); raw: PUT chunk-size objects, S3_MAX_INFLIGHT at a time.
 * - seq-read: nbdcopy the export to null: from another server (nothing in its memory;
 *   reads keep nothing anyway); raw: GET the same objects.
 * Each sequential figure is the second of two passes, for both, the first untimed.
 * - rand-read-qd32: fio 4 KiB random reads at queue depth 32 (ranged GETs);
 *   raw: ranged 4 KiB GETs at random offsets, 32 at a time.
 * - rand-write-qd32: fio 4 KiB random writes at queue depth 32, ended by a FLUSH
 *   (end_fsync); each one is a read-modify-write of its chunk (a GET and a PUT of
 *   the chunk) unless it lands in a chunk already in memory; raw: 4 KiB PUTs of small
 *   objects, 32 at a time (what the same number of tiny writes would cost if the
 *   layout could avoid the read-modify-write).
 * - the durability choice (docs/S3.md), on an S3Device opened in this process: the same
 *   sequential 256 KiB writes, one at a time, acknowledged once in memory and ended by a
 *   FLUSH (what blockgate does) against every write with FUA (acknowledged only after
 *   its chunk's PUT: the alternative design).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { V8_FLAGS } from '../src/cli/v8-flags.js';
import { S3Device, S3Store, S3_MAX_INFLIGHT, S3_DEFAULT_CHUNK_SIZE, resolveS3Settings } from '../src/backends/index.js';
import { REQ } from '../src/device/index.js';
import { ErrSeq } from '../src/errseq/index.js';
import { startCephCluster, type CephCluster } from '../test/helpers/ceph.js';
import { fmt, median, must } from './util.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const PATH = `/usr/bin:/bin:/usr/sbin:/sbin:${process.env.PATH ?? ''}`;
const MiB = 2 ** 20;

export interface S3BenchOptions {
  /** Export size (and bytes of each sequential run). */
  readonly size: number;
  /** Seconds of each random run. */
  readonly seconds: number;
  /** Runs per figure (the median is reported). */
  readonly runs: number;
}

export type S3Workload = 'seq-write' | 'seq-read' | 'rand-read-qd32' | 'rand-write-qd32' | 'seq-write-acked' | 'seq-write-fua';
export const S3_WORKLOADS: readonly S3Workload[] = ['seq-write', 'seq-read', 'rand-read-qd32', 'rand-write-qd32', 'seq-write-acked', 'seq-write-fua'];

/*
 * The durability choice is measured on the device itself in this process; its result row
 * is 'seq-write-acked', whose "blockgate" figures are the acknowledged-in-memory writes and
 * whose "raw" figures are the FUA ones ('seq-write-fua' has no row of its own).
 */
/** The write size of the durability rows: nbdcopy's default request size. */
const DURABILITY_WRITE = 256 * 1024;
/**
 * Writes in flight in the durability rows: 1, one sequential writer (dd, a guest's
 * journal), where acknowledging after the PUT costs the most; with 32 writers covering a
 * chunk at once, the four writes of a chunk share one PUT either way.
 */
const DURABILITY_DEPTH = 1;

export interface S3BenchResult {
  readonly workload: S3Workload;
  readonly unit: 'MiB/s' | 'IOPS';
  readonly blockgate: number[];
  readonly raw: number[];
}

/**
 * The raw small-PUT workload cycles through this many keys. The OSD keeps everything in
 * RAM (memstore), so every run reuses the same keys and prefixes: overwriting a small
 * object replaces it, where new keys per run would add up.
 */
const SMALL_OBJECTS = 4096;

/** Runs `n` jobs, at most `width` at once. */
async function pool(n: number, width: number, job: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(width, n) }, async () => {
      while (next < n) await job(next++);
    }),
  );
}

/** Runs `job` from `width` workers until `seconds` pass; returns the jobs done per second. */
async function timed(seconds: number, width: number, job: () => Promise<void>): Promise<number> {
  const end = performance.now() + seconds * 1000;
  let done = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: width }, async () => {
      while (performance.now() < end) {
        await job();
        done++;
      }
    }),
  );
  return done / ((performance.now() - t0) / 1000);
}

interface Serving {
  readonly child: ChildProcess;
  readonly uri: string;
}

/** `blockgate serve` of `url` on a unix socket in `dir` (from the sources, with the command's V8 flags). */
async function serve(url: string, dir: string, env: NodeJS.ProcessEnv): Promise<Serving> {
  const sock = path.join(dir, `s3-${crypto.randomUUID()}.sock`);
  const child = spawn(process.execPath, [...V8_FLAGS, '--import', 'tsx', path.join(ROOT, 'src/cli/main.ts'), 'serve', '--no-control', '-l', 'warn', '-U', sock, '--print-uri', url], {
    env: { ...process.env, PATH, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err = (err + b.toString()).slice(-4000)));
  const uri = await new Promise<string>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`serve did not start: ${err}`)), 60_000);
    child.stdout!.on('data', (b: Buffer) => {
      out += b.toString();
      const m = /^(nbd\S+)$/m.exec(out);
      if (m) {
        clearTimeout(t);
        resolve(m[1]!);
      }
    });
    child.on('exit', (code) => {
      clearTimeout(t);
      reject(new Error(`serve exited ${code}: ${err}`));
    });
  });
  return { child, uri };
}

async function stop(s: Serving): Promise<void> {
  if (s.child.exitCode !== null) return;
  const done = new Promise<void>((resolve) => s.child.on('exit', () => resolve()));
  s.child.kill('SIGTERM');
  const t = setTimeout(() => s.child.kill('SIGKILL'), 60_000);
  await done;
  clearTimeout(t);
}

async function fio(uri: string, rw: 'randread' | 'randwrite', size: number, seconds: number, dir: string): Promise<number> {
  const out = path.join(dir, 'fio-s3.json');
  await must('fio', [
    '--name=s3',
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${rw}`,
    '--bs=4k',
    '--iodepth=32',
    `--size=${size}`,
    '--time_based',
    `--runtime=${seconds}`,
    '--randrepeat=1',
    ...(rw === 'randwrite' ? ['--end_fsync=1'] : []),
    '--output-format=json',
    `--output=${out}`,
  ]);
  const j = JSON.parse(fs.readFileSync(out, 'utf8')) as { jobs: { read: { iops: number }; write: { iops: number } }[] };
  return rw === 'randread' ? j.jobs[0]!.read.iops : j.jobs[0]!.write.iops;
}

/**
 * The raw S3 workloads, through a store configured as the backend's: PUT and GET of
 * chunk-size objects, ranged 4 KiB GETs, 4 KiB PUTs; each returns its figure.
 */
class RawS3 {
  readonly #store: S3Store;
  readonly #o: S3BenchOptions;
  readonly #name: string;
  readonly #n: number;
  #w = 0;

  constructor(cluster: CephCluster, o: S3BenchOptions, name: string) {
    this.#store = new S3Store(
      resolveS3Settings({ type: 's3', bucket: 'bench-raw', endpoint: cluster.s3.endpoint, accessKeyId: cluster.s3.accessKeyId, secretAccessKey: cluster.s3.secretAccessKey }),
    );
    this.#o = o;
    this.#name = name;
    this.#n = o.size / S3_DEFAULT_CHUNK_SIZE;
  }

  #key(i: number): string {
    return `${this.#name}/chunk/${i.toString(16).padStart(16, '0')}`;
  }

  async seqWrite(data: Buffer): Promise<number> {
    await this.#store.createBucket();
    const chunk = S3_DEFAULT_CHUNK_SIZE;
    const t0 = performance.now();
    await pool(this.#n, S3_MAX_INFLIGHT, async (i) => {
      await this.#store.put(this.#key(i), data.subarray(i * chunk, (i + 1) * chunk));
    });
    return this.#o.size / MiB / ((performance.now() - t0) / 1000);
  }

  async seqRead(): Promise<number> {
    const bufs = Array.from({ length: S3_MAX_INFLIGHT }, () => Buffer.allocUnsafe(S3_DEFAULT_CHUNK_SIZE));
    let slot = 0;
    const t0 = performance.now();
    await pool(this.#n, S3_MAX_INFLIGHT, async (i) => {
      await this.#store.getInto(this.#key(i), 0, bufs[slot++ % bufs.length]!, true);
    });
    return this.#o.size / MiB / ((performance.now() - t0) / 1000);
  }

  async randRead(): Promise<number> {
    return await timed(this.#o.seconds, S3_MAX_INFLIGHT, async () => {
      const i = Math.floor(Math.random() * this.#n);
      await this.#store.getInto(this.#key(i), Math.floor((Math.random() * S3_DEFAULT_CHUNK_SIZE) / 4096) * 4096, Buffer.allocUnsafe(4096));
    });
  }

  async randWrite(): Promise<number> {
    const small = Buffer.allocUnsafe(4096);
    return await timed(this.#o.seconds, S3_MAX_INFLIGHT, async () => {
      await this.#store.put(`${this.#name}/small/${this.#w++ % SMALL_OBJECTS}`, small);
    });
  }

  close(): void {
    this.#store.close();
  }
}

/** The blockgate export of the bench (the first run creates it, later ones overwrite it whole). */
function exportUrl(cluster: CephCluster, o: S3BenchOptions): string {
  return `s3://bench-export/export?endpoint=${cluster.s3.endpoint}&size=${o.size}`;
}

function serverEnv(cluster: CephCluster): NodeJS.ProcessEnv {
  return { AWS_ACCESS_KEY_ID: cluster.s3.accessKeyId, AWS_SECRET_ACCESS_KEY: cluster.s3.secretAccessKey, AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true' };
}

/**
 * One run: each workload raw, then through blockgate, one right after the other, so
 * that the two figures of a row see the same state of the cluster and of the machine.
 */
async function oneRun(cluster: CephCluster, o: S3BenchOptions, file: string, data: Buffer, dir: string): Promise<{ raw: Record<S3Workload, number>; bg: Record<S3Workload, number> }> {
  const raw = new RawS3(cluster, o, 'raw');
  const url = exportUrl(cluster, o);
  const env = serverEnv(cluster);
  // Each sequential figure is the second of two passes, the first untimed, for the raw
  // client and the gateway alike: a server that has just started is still compiling
  // (the SDK's first requests, the JIT), which is no part of its throughput.
  const copyIn = async (uri: string): Promise<number> => {
    const t0 = performance.now();
    await must('nbdcopy', ['--flush', '--request-size=1048576', '-R', '32', file, uri]);
    return o.size / MiB / ((performance.now() - t0) / 1000);
  };
  const copyOut = async (uri: string): Promise<number> => {
    const t0 = performance.now();
    await must('nbdcopy', ['--request-size=1048576', '-R', '32', uri, 'null:']);
    return o.size / MiB / ((performance.now() - t0) / 1000);
  };
  try {
    await raw.seqWrite(data);
    const rawSeqWrite = await raw.seqWrite(data);
    let s = await serve(url, dir, env);
    let bgSeqWrite: number;
    try {
      await copyIn(s.uri);
      bgSeqWrite = await copyIn(s.uri);
    } finally {
      await stop(s);
    }
    await raw.seqRead();
    const rawSeqRead = await raw.seqRead();
    // Another server: nothing of the export in its memory (reads never keep any).
    s = await serve(url, dir, env);
    try {
      await copyOut(s.uri);
      const bgSeqRead = await copyOut(s.uri);
      const rawRandRead = await raw.randRead();
      const bgRandRead = await fio(s.uri, 'randread', o.size, o.seconds, dir);
      const rawRandWrite = await raw.randWrite();
      const bgRandWrite = await fio(s.uri, 'randwrite', o.size, o.seconds, dir);
      const acked = await deviceSeqWrite(cluster, o, 'acked', 0, data);
      const fua = await deviceSeqWrite(cluster, o, 'fua', REQ.FUA, data);
      return {
        raw: { 'seq-write': rawSeqWrite, 'seq-read': rawSeqRead, 'rand-read-qd32': rawRandRead, 'rand-write-qd32': rawRandWrite, 'seq-write-acked': fua, 'seq-write-fua': fua },
        bg: { 'seq-write': bgSeqWrite, 'seq-read': bgSeqRead, 'rand-read-qd32': bgRandRead, 'rand-write-qd32': bgRandWrite, 'seq-write-acked': acked, 'seq-write-fua': fua },
      };
    } finally {
      await stop(s);
    }
  } finally {
    raw.close();
  }
}

/** An untimed pass: a fresh cluster is slower on its first requests, and that must not count against whichever is first. */
async function warmUp(cluster: CephCluster, o: S3BenchOptions, data: Buffer): Promise<void> {
  const warm = new RawS3(cluster, { ...o, size: Math.min(o.size, 128 * MiB), seconds: 3 }, 'warm');
  try {
    await warm.seqWrite(data);
    await warm.seqRead();
    await warm.randRead();
  } finally {
    warm.close();
  }
}

/** MiB/s of sequential DURABILITY_WRITE writes into a fresh export, with `flags` on each, ended by a FLUSH. */
async function deviceSeqWrite(cluster: CephCluster, o: S3BenchOptions, prefix: string, flags: number, data: Buffer): Promise<number> {
  const dev = await S3Device.open({
    ...resolveS3Settings({ type: 's3', bucket: 'bench-device', prefix, endpoint: cluster.s3.endpoint, accessKeyId: cluster.s3.accessKeyId, secretAccessKey: cluster.s3.secretAccessKey, size: o.size }),
    errseq: new ErrSeq(),
  });
  try {
    // Untimed: an export of no objects, as the first run has (and the RAM of the last run's freed).
    await dev.trim(0, o.size, 0);
    await dev.flush(0);
    const t0 = performance.now();
    await pool(o.size / DURABILITY_WRITE, DURABILITY_DEPTH, async (i) => {
      await dev.write(data.subarray(i * DURABILITY_WRITE, (i + 1) * DURABILITY_WRITE), i * DURABILITY_WRITE, flags);
    });
    await dev.flush(0);
    return o.size / MiB / ((performance.now() - t0) / 1000);
  } finally {
    await dev.close();
  }
}

/** Starts a cluster, measures, stops it. */
export async function runS3Bench(o: S3BenchOptions, log: (line: string) => void = (l) => process.stderr.write(`${l}\n`)): Promise<S3BenchResult[]> {
  const dir = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'blockgate-bench-s3-'));
  const cluster = await startCephCluster();
  // The SDK warns once per process that its releases after January 2027 need Node 22.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  try {
    const file = path.join(dir, 'data.img');
    const data = crypto.randomBytes(o.size);
    fs.writeFileSync(file, data);
    const results = S3_WORKLOADS.filter((w) => w !== 'seq-write-fua').map((w) => ({ workload: w, unit: w.startsWith('seq') ? ('MiB/s' as const) : ('IOPS' as const), blockgate: [] as number[], raw: [] as number[] }));
    await warmUp(cluster, o, data);
    for (let run = 0; run < o.runs; run++) {
      const { raw, bg } = await oneRun(cluster, o, file, data, dir);
      for (const r of results) {
        r.raw.push(raw[r.workload]);
        r.blockgate.push(bg[r.workload]);
        log(`  s3 ${r.workload.padEnd(16)} blockgate ${fmt(bg[r.workload])}  raw ${fmt(raw[r.workload])} ${r.unit}`);
      }
    }
    return results;
  } finally {
    await cluster.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** The Markdown table of the s3 rows. */
export function renderS3Table(results: readonly S3BenchResult[], o: S3BenchOptions): string {
  const lines = [
    `s3 export (${o.size / MiB} MiB, chunks of ${S3_DEFAULT_CHUNK_SIZE / MiB} MiB, ${o.runs} run(s), median (min–max)) vs raw S3 from one Node process, same client:`,
    '',
    '| workload | blockgate s3 over NBD | raw S3 (same client) | blockgate/raw |',
    '|---|---|---|---|',
  ];
  const cell = (xs: readonly number[]) => `${fmt(median(xs))} (${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))})`;
  for (const r of results) {
    if (r.workload === 'seq-write-acked') continue;
    lines.push(`| ${r.workload} (${r.unit}) | ${cell(r.blockgate)} | ${cell(r.raw)} | ${fmt(median(r.blockgate) / median(r.raw), 2)} |`);
  }
  const d = results.find((r) => r.workload === 'seq-write-acked');
  if (d) {
    lines.push(
      '',
      `The durability choice (in this process, on the device: ${DURABILITY_WRITE / 1024} KiB sequential writes, ${DURABILITY_DEPTH} in flight, ended by a FLUSH):`,
      '',
      '| writes acknowledged | MiB/s | ratio |',
      '|---|---|---|',
      `| in memory, FLUSH waits for the PUTs (blockgate) | ${cell(d.blockgate)} | ${fmt(median(d.blockgate) / median(d.raw), 2)} |`,
      `| after their chunk's PUT (FUA on every write) | ${cell(d.raw)} | 1.00 |`,
    );
  }
  return `${lines.join('\n')}\n`;
}
