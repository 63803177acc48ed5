/**
 * A throw-away single-node Ceph cluster for a test file: test/cluster/ceph-up.sh in a
 * fresh temporary directory, with a port range no other running cluster of this machine
 * holds, stopped (SIGKILL by PID file) and deleted by stop(). A test file starts one in
 * `before` and stops it in `after`; the cluster is ready for RBD and S3 when this resolves.
 *
 * The OSD is a memstore one: everything lives in RAM (about 3 GB RSS with 1 GB stored),
 * which is why each test file that needs a cluster starts its own and stops it at once.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { run, runOk } from './run.js';

const SCRIPTS = path.resolve(import.meta.dirname, '../cluster');

/** Bound on the cluster's start-up (measured here: 8-12 s; the packages' first start is slower). */
export const CEPH_START_TIMEOUT_MS = 180_000;

/** Port ranges the helper picks from: BASE, BASE+100, ... (each cluster uses BASE..BASE+80). */
const FIRST_BASE_PORT = 26_000;
const BASE_PORT_STEP = 100;
const BASE_PORT_CHOICES = 30;

export interface CephCluster {
  /** The cluster's directory (conf, keyrings, logs, pid files). */
  readonly dir: string;
  readonly conf: string;
  readonly keyring: string;
  /** An RBD pool that exists (size 1). */
  readonly pool: string;
  /** The S3 endpoint of radosgw, and the user created for the tests. */
  readonly s3: { readonly endpoint: string; readonly accessKeyId: string; readonly secretAccessKey: string };
  /** `rbd` or `ceph` with this cluster's conf: runs to completion, throws on failure. */
  cli(cmd: 'rbd' | 'ceph' | 'rados', args: readonly string[]): Promise<string>;
  /** Stops every daemon of the cluster by PID and deletes its directory. */
  stop(): Promise<void>;
}

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

/** A base port whose whole range is free now, starting from a place that depends on the pid. */
async function pickBasePort(): Promise<number> {
  for (let i = 0; i < BASE_PORT_CHOICES; i++) {
    const base = FIRST_BASE_PORT + ((process.pid + i) % BASE_PORT_CHOICES) * BASE_PORT_STEP;
    if ((await portFree(base)) && (await portFree(base + 80))) return base;
  }
  throw new Error('no free port range for a Ceph cluster');
}

export async function startCephCluster(opts: { rgw?: boolean } = {}): Promise<CephCluster> {
  const parent = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-ceph-'));
  const dir = path.join(parent, 'cluster');
  const base = await pickBasePort();
  const env = { CEPH_BASE_PORT: String(base), CEPH_RGW: opts.rgw === false ? '0' : '1' };
  const up = await run('bash', [path.join(SCRIPTS, 'ceph-up.sh'), dir], { env, timeoutMs: CEPH_START_TIMEOUT_MS });
  const stop = async (): Promise<void> => {
    await run('bash', [path.join(SCRIPTS, 'ceph-down.sh'), dir], { timeoutMs: 30_000 });
    fs.rmSync(parent, { recursive: true, force: true });
  };
  if (up.code !== 0) {
    const log = fs.existsSync(path.join(dir, 'log')) ? fs.readdirSync(path.join(dir, 'log')).join(', ') : 'none';
    await stop();
    throw new Error(`ceph-up.sh failed (${up.code ?? up.signal}): ${up.stderr}\nlogs: ${log}`);
  }
  const vars = new Map<string, string>();
  for (const line of up.stdout.split('\n')) {
    const m = /^([A-Z0-9_]+)=(.*)$/.exec(line);
    if (m) vars.set(m[1]!, m[2]!);
  }
  const need = (k: string): string => {
    const v = vars.get(k);
    if (v === undefined) throw new Error(`ceph-up.sh did not print ${k}`);
    return v;
  };
  const conf = need('CEPH_CONF');
  return {
    dir,
    conf,
    keyring: need('CEPH_KEYRING'),
    pool: need('CEPH_POOL'),
    s3: {
      endpoint: vars.get('S3_ENDPOINT') ?? '',
      accessKeyId: vars.get('S3_ACCESS_KEY') ?? '',
      secretAccessKey: vars.get('S3_SECRET_KEY') ?? '',
    },
    async cli(cmd, args) {
      return (await runOk(cmd, ['-c', conf, ...args], { timeoutMs: 120_000 })).stdout;
    },
    stop,
  };
}
