/**
 * `blockgate serve s3://BUCKET/PREFIX` against a real radosgw (one throw-away Ceph
 * cluster for this file), with real clients:
 * - qemu-img convert into the export and back out: the same bytes; nbdcopy both ways;
 * - nbdinfo --map shows the holes of a sparse image as holes (chunks without objects);
 * - the lease: a second `blockgate serve` writer of the same export exits with an error
 *   naming the holder, `serve -r` readers run beside the writer;
 * - radosgw stopped (SIGSTOP): a read that needs S3 fails with a clear error after the
 *   request timeout (never a crash), and after SIGCONT the same server serves it again.
 * - `blockgate s3 create` makes an export that serve opens without a size, and refuses
 *   to create it again;
 * - a writer killed with SIGKILL mid-write: what it acknowledged after a FLUSH reads back
 *   through another gateway (a read-only one: the dead writer's lease holds until it
 *   expires).
 * - radosgw stopped under a writer: the FLUSH of the session that wrote and of another
 *   session each report the failed upload once; after SIGCONT the kept chunk is uploaded
 *   and FLUSH succeeds.
 * Every wait is bounded; children are killed by PID in `after`, the cluster stopped.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startCephCluster, type CephCluster } from '../helpers/ceph.js';
import { ChildSet, blockgateRun, type Child } from '../helpers/children.js';
import { run, runOk } from '../helpers/run.js';
import { seededBytes } from '../helpers/data.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const BUCKET = 'interop';

let cluster: CephCluster;
const children = new ChildSet();
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-interop-s3-'));
let n = 0;
const local = (name: string): string => path.join(tmp, `${n++}-${name}`);

/** The command-line form of an export under `prefix` of the test bucket. */
function s3Url(prefix: string, query = ''): string {
  return `s3://${BUCKET}/${prefix}?endpoint=${cluster.s3.endpoint}&size=${SIZE}${query}`;
}

/** `blockgate serve` of these exports on a fresh unix socket; resolves with the URI once listening. */
async function serve(args: string[]): Promise<{ child: Child; uri: string }> {
  const child = children.blockgate(['serve', '--no-control', '--print-uri', '-l', 'warn', '-U', local('nbd.sock'), ...args]);
  const m = await child.waitFor(/^(nbd\S+)$/m);
  return { child, uri: m[1]! };
}

async function stop(child: Child): Promise<void> {
  child.proc.kill('SIGTERM');
  assert.equal(await child.exited(), 0, `serve exits 0 on SIGTERM; stderr: ${child.stderr()}`);
}

function rgwPid(): number {
  const runDir = path.join(cluster.dir, 'run');
  const f = fs.readdirSync(runDir).find((x) => x.includes('rgw') && x.endsWith('.pid'));
  assert.ok(f, `no radosgw pid file in ${runDir}`);
  return Number(fs.readFileSync(path.join(runDir, f), 'utf8').trim());
}

/** A raw image with data in some MiB and holes between (seeded, so the test is repeatable). */
function sparseImage(file: string): Buffer {
  const img = Buffer.alloc(SIZE);
  for (const mib of [0, 1, 5, 17, 31]) seededBytes(mib + 1, MiB).copy(img, mib * MiB);
  seededBytes(99, 1000).copy(img, 9 * MiB + 12345); // a partial chunk
  fs.writeFileSync(file, img);
  return img;
}

before(async () => {
  cluster = await startCephCluster();
  // Children inherit the credentials: never on the command line.
  process.env.AWS_ACCESS_KEY_ID = cluster.s3.accessKeyId;
  process.env.AWS_SECRET_ACCESS_KEY = cluster.s3.secretAccessKey;
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true';
});

after(async () => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
  await cluster?.stop();
});

describe('blockgate serve s3://', () => {
  test('qemu-img convert in and out gives the same bytes, nbdinfo --map shows the holes', async () => {
    const src = local('src.raw');
    const img = sparseImage(src);
    const { child, uri } = await serve([s3Url('qemu')]);
    try {
      await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri], { timeoutMs: 120_000 });
      const out = local('out.raw');
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out], { timeoutMs: 120_000 });
      assert.ok(fs.readFileSync(out).equals(img), 'qemu-img read back what it wrote');
      const map = JSON.parse((await runOk('nbdinfo', ['--map', '--json', uri])).stdout) as { offset: number; length: number; type: number }[];
      const data = map.filter((e) => (e.type & 1) === 0).map((e) => [e.offset / MiB, (e.offset + e.length) / MiB]);
      assert.deepEqual(data, [[0, 2], [5, 6], [9, 10], [17, 18], [31, 32]], JSON.stringify(map));
    } finally {
      await stop(child);
    }
  });

  test('nbdcopy into the export and out of it (after a restart of the server): the same bytes', async () => {
    const src = local('src.raw');
    const img = seededBytes(7, SIZE);
    fs.writeFileSync(src, img);
    const first = await serve([s3Url('nbdcopy')]);
    await runOk('nbdcopy', [src, first.uri], { timeoutMs: 120_000 });
    await stop(first.child);
    const second = await serve(['-r', s3Url('nbdcopy')]);
    try {
      const out = local('out.raw');
      await runOk('nbdcopy', [second.uri, out], { timeoutMs: 120_000 });
      assert.ok(fs.readFileSync(out).equals(img));
    } finally {
      await stop(second.child);
    }
  });

  test('a second serve writer of the export is refused naming the holder; read-only servers run beside it', async () => {
    const writer = await serve([s3Url('lease')]);
    try {
      await runOk('nbdsh', ['-u', writer.uri, '-c', 'h.pwrite(b"lease" * 100, 4096); h.flush()']);
      const second = children.blockgate(['serve', '--no-control', '-l', 'warn', '-U', local('second.sock'), s3Url('lease')]);
      const code = await second.exited();
      assert.notEqual(code, 0);
      assert.match(second.stderr(), new RegExp(`s3://${BUCKET}/lease is being written by [^ ]+:${writer.child.proc.pid} \\(lease lease/lease valid until `));
      const reader = await serve(['-r', s3Url('lease')]);
      try {
        const r = await runOk('nbdsh', ['-u', reader.uri, '-c', 'print(h.is_read_only(), h.pread(500, 4096) == b"lease" * 100)']);
        assert.equal(r.stdout.trim(), 'True True');
      } finally {
        await stop(reader.child);
      }
    } finally {
      await stop(writer.child);
    }
    // Released at the writer's exit: a new writer gets the export at once.
    const next = await serve([s3Url('lease')]);
    await stop(next.child);
  });

  test('blockgate s3 create makes an export serve opens without a size; creating it again is refused', async () => {
    const url = `s3://made/disk?endpoint=${cluster.s3.endpoint}`;
    const made = await blockgateRun(['s3', 'create', '--chunk-size', '256K', url, '8M']);
    assert.equal(made.code, 0, made.stderr);
    assert.match(made.stdout, /^created s3:\/\/made\/disk: 8MiB in chunks of 256KiB/);
    const again = await blockgateRun(['s3', 'create', url, '16M']);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /s3:\/\/made\/disk already exists \(8MiB in chunks of 256KiB\); nothing changed \(EEXIST\)/);
    const { child, uri } = await serve([url]);
    try {
      assert.equal((await runOk('nbdinfo', ['--size', uri])).stdout.trim(), String(8 * MiB));
    } finally {
      await stop(child);
    }
  });

  test('a writer killed mid-write: the data it acknowledged after a FLUSH reads back through another gateway', async () => {
    const { child, uri } = await serve([s3Url('crash')]);
    const durable = seededBytes(5, 3 * MiB + 4096);
    const file = local('durable.bin');
    fs.writeFileSync(file, durable);
    // Write and FLUSH, then keep writing elsewhere and kill the server mid-way.
    await runOk('nbdsh', ['-u', uri, '-c', `h.pwrite(open(${JSON.stringify(file)}, "rb").read(), 4096); h.flush()`]);
    const writer = children.start('nbdsh', ['-u', uri, '-c', 'import os\nfor i in range(2000): h.pwrite(os.urandom(65536), 16 * 1048576 + (i % 200) * 65536)']);
    await new Promise((r) => setTimeout(r, 500));
    child.proc.kill('SIGKILL');
    await child.exited();
    writer.proc.kill('SIGKILL');
    const reader = await serve(['-r', s3Url('crash')]);
    try {
      const out = local('back.bin');
      await runOk('nbdsh', ['-u', reader.uri, '-c', `open(${JSON.stringify(out)}, "wb").write(h.pread(${durable.length}, 4096))`]);
      assert.ok(fs.readFileSync(out).equals(durable), 'every byte acknowledged before the FLUSH is in S3');
      // The dead writer's lease still holds: a new writer is refused until it expires.
      const second = children.blockgate(['serve', '--no-control', '-l', 'warn', '-U', local('w2.sock'), s3Url('crash')]);
      assert.notEqual(await second.exited(), 0);
      assert.match(second.stderr(), new RegExp(`being written by [^ ]+:${child.proc.pid} `));
    } finally {
      await stop(reader.child);
    }
  });

  test('radosgw stopped: a read that needs S3 fails with a clear error, the server lives on and recovers', async () => {
    // A reader, so every read goes to S3; 1 s per attempt keeps the wait short.
    const writer = await serve([s3Url('fault')]);
    await runOk('nbdsh', ['-u', writer.uri, '-c', 'h.pwrite(b"x" * 65536, 0); h.flush()']);
    await stop(writer.child);
    const { child, uri } = await serve(['-r', s3Url('fault', '&requestTimeout=1000')]);
    const pid = rgwPid();
    process.kill(pid, 'SIGSTOP');
    let resumed = false;
    try {
      const script = [
        'try:',
        '    h.pread(4096, 0)',
        '    print("no error")',
        'except nbd.Error as e:',
        '    print("error", e.errno)',
      ].join('\n');
      const failed = await run('nbdsh', ['-u', uri, '-c', script], { timeoutMs: 120_000 });
      assert.match(failed.stdout, /^error (ETIMEDOUT|EIO)$/m, failed.stdout + failed.stderr);
      assert.equal(child.proc.exitCode, null, 'the server is still running');
      process.kill(pid, 'SIGCONT');
      resumed = true;
      const ok = await runOk('nbdsh', ['-u', uri, '-c', 'print(h.pread(4096, 0) == b"x" * 4096)'], { timeoutMs: 120_000 });
      assert.equal(ok.stdout.trim(), 'True');
    } finally {
      if (!resumed) process.kill(pid, 'SIGCONT');
      await stop(child);
    }
  });

  test('radosgw stopped under a writer: each session\'s FLUSH reports the failed upload once, and FLUSH succeeds after SIGCONT', async () => {
    const { child, uri } = await serve([s3Url('wfault', '&requestTimeout=1000')]);
    const pid = rgwPid();
    let resumed = false;
    try {
      // Two connections; the first writes part of a chunk (acknowledged, kept in memory).
      const script = [
        'import os, signal, time',
        'h2 = nbd.NBD()',
        'h2.connect_uri(os.environ["uri"])',
        'h.pwrite(b"w" * 1000, 100)',
        'def flush(x):',
        '    try:',
        '        x.flush()',
        '        return "ok"',
        '    except nbd.Error as e:',
        '        return "error " + str(e.errno)',
        `os.kill(${pid}, signal.SIGSTOP)`,
        'try:',
        '    a1 = flush(h)',
        'finally:',
        `    os.kill(${pid}, signal.SIGCONT)`,
        'b1 = flush(h2)',
        'b2 = flush(h2)',
        'a2 = flush(h)',
        'print(a1, "|", b1, "|", b2, "|", a2, "|", h2.pread(1000, 100) == b"w" * 1000)',
      ].join('\n');
      const r = await runOk('nbdsh', ['-u', uri, '-c', script], { env: { uri }, timeoutMs: 120_000 });
      resumed = true;
      assert.match(r.stdout.trim(), /^error (ETIMEDOUT|EIO) \| error (ETIMEDOUT|EIO) \| ok \| ok \| True$/, r.stdout + r.stderr);
      assert.equal(child.proc.exitCode, null, 'the server is still running');
      assert.match(child.stderr(), /s3 backend: upload failed/);
    } finally {
      if (!resumed) process.kill(pid, 'SIGCONT');
      await stop(child);
    }
  });
});
