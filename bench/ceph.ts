/**
 * `npm run bench -- --ceph`: blockgate's rbd backend against qemu-nbd serving the same RBD
 * image (qemu-block-extra's rbd driver, `--cache=none` and `--cache=writeback`), in one
 * run on one throw-away cluster (test/cluster/ceph-up.sh: one mon, one mgr, one memstore
 * OSD on loopback). Figures and method: docs/CEPH.md, "Performance".
 *
 *   npm run bench -- --ceph            # 1 GiB image, 3 runs per figure, 15 s fio runs
 *   npm run bench -- --ceph --quick    # 256 MiB, 1 run, 5 s fio runs
 *
 * Each server is started alone on 127.0.0.1 (TCP loopback), measured and stopped by PID
 * before the next one starts. The image is filled once with `rbd import` before the first
 * server, so every server reads and overwrites allocated objects. Workloads, the same
 * clients for every server: sequential write (nbdcopy from a file of random data) and read
 * (nbdcopy to null:), one connection, 16 requests of 256 KiB in flight; 4 KiB random
 * read and write at queue depth 32 (fio's nbd engine). Server CPU is the process's
 * utime + stime over the workload (/proc/PID/stat).
 *
 * blockgate runs from the sources (node --import tsx, with its V8 flags): the steady state
 * is the same as from dist/, only start-up differs, and no build is needed.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { V8_FLAGS } from '../src/cli/v8-flags.js';
import { freePort, median, must, processCpuSeconds, stopServer, waitForPort } from './util.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const PATH = `/usr/bin:/bin:/usr/sbin:/sbin:${process.env.PATH ?? ''}`;
const MiB = 2 ** 20;

/** Port range of the bench's cluster (test helpers pick from 26000-28999). */
const CEPH_BASE_PORT = 29_500;
const IMAGE = 'bench';

interface CephMode {
  readonly name: 'full' | 'quick';
  readonly size: number;
  readonly runs: number;
  readonly fioSeconds: number;
}
const MODES: Record<CephMode['name'], CephMode> = {
  full: { name: 'full', size: 1024 * MiB, runs: 3, fioSeconds: 15 },
  quick: { name: 'quick', size: 256 * MiB, runs: 1, fioSeconds: 5 },
};

type Server = 'blockgate-rbd' | 'qemu-nbd-rbd-none' | 'qemu-nbd-rbd-writeback';
const SERVERS: readonly Server[] = ['blockgate-rbd', 'qemu-nbd-rbd-none', 'qemu-nbd-rbd-writeback'];
type Workload = 'seq-write' | 'seq-read' | 'rand-read-qd32' | 'rand-write-qd32';
const WORKLOADS: readonly Workload[] = ['seq-write', 'seq-read', 'rand-read-qd32', 'rand-write-qd32'];
const UNIT: Record<Workload, string> = { 'seq-write': 'MiB/s', 'seq-read': 'MiB/s', 'rand-read-qd32': 'IOPS', 'rand-write-qd32': 'IOPS' };

interface Cluster {
  readonly dir: string;
  readonly conf: string;
  readonly pool: string;
}

let clkTck = 100;

interface Running {
  readonly child: ChildProcess;
  readonly uri: string;
}

async function startServer(kind: Server, c: Cluster): Promise<Running> {
  const port = await freePort();
  const env: NodeJS.ProcessEnv = { ...process.env, PATH, CEPH_CONF: c.conf };
  let cmd: string;
  let args: string[];
  if (kind === 'blockgate-rbd') {
    cmd = process.execPath;
    args = [...V8_FLAGS, '--import', 'tsx', path.join(ROOT, 'src/cli/main.ts'), 'serve', '-p', String(port), '-l', 'warn', '--no-control', `rbd:${c.pool}/${IMAGE}`];
  } else {
    cmd = 'qemu-nbd';
    const cache = kind === 'qemu-nbd-rbd-none' ? 'none' : 'writeback';
    args = ['-f', 'raw', '-b', '127.0.0.1', '-p', String(port), '-e', '8', '-t', `--cache=${cache}`, `rbd:${c.pool}/${IMAGE}:conf=${c.conf}`];
  }
  const child = spawn(cmd, args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err = (err + b.toString()).slice(-4000)));
  try {
    await waitForPort(port, child, 60_000);
  } catch (e) {
    child.kill('SIGKILL');
    throw new Error(`${kind}: ${(e as Error).message}: ${err}`);
  }
  return { child, uri: `nbd://127.0.0.1:${port}/` };
}

interface Sample {
  readonly value: number;
  readonly cpu: number;
}

async function measure(r: Running, w: Workload, mode: CephMode, data: string, tmp: string): Promise<Sample> {
  const pid = r.child.pid!;
  const cpu0 = processCpuSeconds(pid, clkTck);
  let value: number;
  if (w.startsWith('seq-')) {
    const t0 = process.hrtime.bigint();
    const [src, dst] = w === 'seq-write' ? [data, r.uri] : [r.uri, 'null:'];
    await must('nbdcopy', ['--no-extents', '-C', '1', '-R', '16', '--request-size=262144', src, dst]);
    value = mode.size / MiB / (Number(process.hrtime.bigint() - t0) / 1e9);
  } else {
    const out = path.join(tmp, 'fio.json');
    const read = w === 'rand-read-qd32';
    await must('fio', [
      '--name=bench', '--ioengine=nbd', `--uri=${r.uri}`, `--rw=${read ? 'randread' : 'randwrite'}`, '--bs=4k', '--iodepth=32',
      `--size=${mode.size}`, '--time_based', `--runtime=${mode.fioSeconds}`, '--randrepeat=1', '--output-format=json', `--output=${out}`,
    ]);
    const j = JSON.parse(fs.readFileSync(out, 'utf8')) as { jobs: { read: { iops: number }; write: { iops: number } }[] };
    value = read ? j.jobs[0]!.read.iops : j.jobs[0]!.write.iops;
  }
  return { value, cpu: processCpuSeconds(pid, clkTck) - cpu0 };
}

export interface CephFigure {
  readonly server: Server;
  readonly workload: Workload;
  readonly median: number;
  readonly min: number;
  readonly max: number;
  /** Server CPU seconds per run (median). */
  readonly cpu: number;
}

export function renderCephTable(figs: readonly CephFigure[], mode: CephMode): string {
  const get = (s: Server, w: Workload) => figs.find((f) => f.server === s && f.workload === w);
  const fmt = (n: number) => (n >= 100 ? n.toFixed(0) : n.toFixed(1));
  const lines = [
    `RBD (${mode.name}: ${mode.size / MiB} MiB image, ${mode.runs} run(s) per figure, fio ${mode.fioSeconds} s; median, server CPU s in brackets)`,
    '',
    `| workload | unit | ${SERVERS.join(' | ')} | blockgate / qemu-nbd none | blockgate / qemu-nbd writeback |`,
    `|---|---|${SERVERS.map(() => '---:').join('|')}|---:|---:|`,
  ];
  for (const w of WORKLOADS) {
    const cells = SERVERS.map((s) => {
      const f = get(s, w);
      return f ? `${fmt(f.median)} (${f.cpu.toFixed(1)})` : '-';
    });
    const bg = get('blockgate-rbd', w)?.median;
    const ratio = (s: Server) => {
      const q = get(s, w)?.median;
      return bg !== undefined && q ? (bg / q).toFixed(2) : '-';
    };
    lines.push(`| ${w} | ${UNIT[w]} | ${cells.join(' | ')} | ${ratio('qemu-nbd-rbd-none')} | ${ratio('qemu-nbd-rbd-writeback')} |`);
  }
  return `${lines.join('\n')}\n`;
}

async function startCluster(tmp: string): Promise<Cluster> {
  const dir = path.join(tmp, 'cluster');
  const out = await must('bash', [path.join(ROOT, 'test/cluster/ceph-up.sh'), dir], {
    timeoutMs: 300_000,
    env: { CEPH_BASE_PORT: String(CEPH_BASE_PORT), CEPH_RGW: '0' },
  });
  const vars = new Map([...out.matchAll(/^([A-Z0-9_]+)=(.*)$/gm)].map((m) => [m[1]!, m[2]!]));
  return { dir, conf: vars.get('CEPH_CONF')!, pool: vars.get('CEPH_POOL')! };
}

/** The `--ceph` bench: prints the table on stdout and writes JSON to `jsonOut`. */
export async function cephBench(argv: readonly string[], jsonOut: string): Promise<void> {
  const mode = MODES[argv.includes('--quick') ? 'quick' : 'full'];
  for (const tool of ['qemu-nbd', 'nbdcopy', 'fio', 'rbd', 'ceph-osd']) {
    await must('which', [tool]).catch(() => {
      throw new Error(`${tool} is not installed (apt-get install qemu-utils qemu-block-extra libnbd-bin fio ceph-common ceph-mon ceph-osd ceph-mgr)`);
    });
  }
  clkTck = Number((await must('getconf', ['CLK_TCK'])).trim()) || 100;
  const shm = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const tmp = fs.mkdtempSync(path.join(shm, 'blockgate-bench-ceph-'));
  let current: Running | null = null;
  let cluster: Cluster | null = null;
  const cleanup = async (): Promise<void> => {
    current?.child.kill('SIGKILL');
    if (cluster) await must('bash', [path.join(ROOT, 'test/cluster/ceph-down.sh'), cluster.dir], { timeoutMs: 60_000 }).catch(() => undefined);
    fs.rmSync(tmp, { recursive: true, force: true });
  };
  process.on('SIGINT', () => {
    void cleanup().then(() => process.exit(130));
  });
  const figs: CephFigure[] = [];
  try {
    process.stderr.write('bench --ceph: starting the cluster\n');
    cluster = await startCluster(tmp);
    const data = path.join(tmp, 'data.img');
    fs.writeFileSync(data, crypto.randomBytes(mode.size));
    await must('rbd', ['-c', cluster.conf, 'import', data, `${cluster.pool}/${IMAGE}`]);
    for (const s of SERVERS) {
      current = await startServer(s, cluster);
      for (const w of WORKLOADS) {
        const samples: Sample[] = [];
        for (let i = 0; i < mode.runs; i++) samples.push(await measure(current, w, mode, data, tmp));
        const values = samples.map((x) => x.value);
        const f: CephFigure = { server: s, workload: w, median: median(values), min: Math.min(...values), max: Math.max(...values), cpu: median(samples.map((x) => x.cpu)) };
        figs.push(f);
        process.stderr.write(`bench --ceph: ${s} ${w}: ${f.median.toFixed(1)} ${UNIT[w]} (cpu ${f.cpu.toFixed(2)} s)\n`);
      }
      await stopServer(current);
      current = null;
    }
  } finally {
    await cleanup();
  }
  process.stdout.write(renderCephTable(figs, mode));
  fs.mkdirSync(path.dirname(jsonOut), { recursive: true });
  fs.writeFileSync(jsonOut, `${JSON.stringify({ mode, date: new Date().toISOString(), host: { cpus: os.cpus().length, node: process.version }, figures: figs }, null, 2)}\n`);
}
