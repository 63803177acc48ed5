/**
 * `blockgate copy` as a user runs it, against real servers started here (blockgate
 * serve and nbdkit, killed by PID in `after`): file <-> NBD, NBD <-> NBD, NBD -> `-`,
 * `-` -> NBD, with the bytes compared and --checksum compared with sha256 of the data;
 * a sparse 1 GiB export whose holes are never read (the --verbose statistics); failures
 * of either side (nbdkit's error filter, a server killed mid-copy, a destination too
 * small) exit 1 with the side named; --progress on a pipe prints N/100 lines.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BLOCKGATE_CLI, CHILD_WAIT_MS, ChildSet, blockgateRun, type Child } from '../helpers/children.js';
import { DEBIAN_PATH, nbdsh, runOk } from '../helpers/run.js';
import { seededBytes } from '../helpers/data.js';

const MiB = 1024 * 1024;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-copy-'));
const children = new ChildSet();
let n = 0;
const local = (name: string) => path.join(tmp, `${n++}-${name}`);

after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

const unixUri = (sock: string) => `nbd+unix:///?socket=${sock}`;

/** Waits (bounded by a count) for a unix socket to appear. */
async function socketReady(sock: string, child: Child): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (fs.existsSync(sock)) return;
    if (child.proc.exitCode !== null) throw new Error(`server exited: ${child.stderr()}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`no socket ${sock}; stderr: ${child.stderr()}`);
}

/** Starts nbdkit in the foreground on a fresh unix socket; resolves with its URI and child. */
async function nbdkit(args: string[]): Promise<{ uri: string; child: Child }> {
  const sock = local('nbdkit.sock');
  const filters = args.filter((a) => a.startsWith('--filter='));
  const rest = args.filter((a) => !a.startsWith('--filter='));
  const child = children.start('nbdkit', ['-f', '--exit-with-parent', '-U', sock, ...filters, ...rest]);
  await socketReady(sock, child);
  return { uri: unixUri(sock), child };
}

/** Starts `blockgate serve` on a fresh unix socket. */
async function serve(exports: string[]): Promise<string> {
  const sock = local('serve.sock');
  const child = children.blockgate(['serve', '-U', sock, '--no-control', '--print-uri', '-l', 'warn', ...exports]);
  await child.waitFor(/nbd\+unix:\S+/);
  return unixUri(sock);
}

interface BinResult {
  code: number | null;
  stdout: Buffer;
  stderr: string;
}

/** Runs `blockgate ARGS` with binary stdin and stdout. */
function blockgateBin(args: string[], input?: Buffer): Promise<BinResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...BLOCKGATE_CLI, ...args], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, PATH: DEBIAN_PATH } });
    const out: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => (err += b.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), CHILD_WAIT_MS);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout: Buffer.concat(out), stderr: err });
    });
    child.stdin.on('error', () => undefined);
    child.stdin.end(input ?? Buffer.alloc(0));
  });
}

async function copyOk(args: string[]): Promise<{ stdout: string; stderr: string }> {
  const r = await blockgateRun(['copy', ...args]);
  assert.equal(r.code, 0, `blockgate copy ${args.join(' ')}: ${r.stderr}`);
  return r;
}

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 4 * MiB })) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** The --verbose statistics. */
function stats(stderr: string): { size: number; read: number; written: number; zeroed: number; skipped: number } {
  const m = /copied (\d+) bytes .*: read (\d+) bytes from the source, wrote (\d+), zeroed (\d+), skipped (\d+)/.exec(stderr);
  assert.ok(m, `no statistics line in: ${stderr}`);
  return { size: Number(m[1]), read: Number(m[2]), written: Number(m[3]), zeroed: Number(m[4]), skipped: Number(m[5]) };
}

function assertSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  if (actual.equals(expected)) return;
  let i = 0;
  while (actual[i] === expected[i]) i++;
  assert.fail(`${what}: first difference at byte ${i}`);
}

/** 16 MiB of seeded data with zero runs (aligned and not), so zero detection has work. */
const IMAGE = (() => {
  const b = seededBytes(7, 16 * MiB);
  b.fill(0, MiB, 3 * MiB);
  b.fill(0, 5 * MiB + 123, 6 * MiB + 4567);
  b.fill(0, 15 * MiB);
  return b;
})();
const imageFile = path.join(tmp, 'image.raw');

describe('blockgate copy', () => {
  let bg: string;
  before(async () => {
    fs.writeFileSync(imageFile, IMAGE);
    bg = await serve(['memory:16M', 'big=memory:1G', 'small=memory:8M', 'pattern=pattern:128M']);
  });

  test('file -> NBD -> file: the same bytes, and --checksum is sha256 of the image', async () => {
    const up = await copyOk(['--checksum', '-v', imageFile, bg]);
    assert.equal(up.stdout, `${sha256(IMAGE)}  ${imageFile}\n`);
    const s = stats(up.stderr);
    assert.equal(s.read, IMAGE.length);
    const out = local('down.img');
    const down = await copyOk(['--checksum', bg, out]);
    assert.equal(down.stdout.split(' ')[0], sha256(IMAGE));
    assertSameBytes(fs.readFileSync(out), IMAGE, 'round trip');
    // An existing, longer file is replaced and truncated to the source size.
    const longer = local('longer.img');
    fs.writeFileSync(longer, Buffer.alloc(20 * MiB, 0xff));
    await copyOk([bg, longer]);
    assertSameBytes(fs.readFileSync(longer), IMAGE, 'over a longer file');
  });

  test('NBD -> NBD (nbdkit sparse-random -> nbdkit memory) equals nbdcopy, checksum included', async () => {
    const src = await nbdkit(['sparse-random', '256M', 'seed=42']);
    const dst = await nbdkit(['memory', '256M']);
    const r = await copyOk(['--checksum', '--flush', '-v', src.uri, dst.uri]);
    const sum = r.stdout.split(' ')[0]!;
    const s = stats(r.stderr);
    assert.ok(s.read < 256 * MiB, `read ${s.read}: the holes of sparse-random were read`);
    assert.ok(s.zeroed > 0, 'zero ranges became WRITE_ZEROES');
    const viaNbdcopy = local('nbdcopy.img');
    await runOk('nbdcopy', [src.uri, viaNbdcopy]);
    const ours = local('ours.img');
    await copyOk([dst.uri, ours]);
    assert.equal(await sha256File(viaNbdcopy), sum);
    assert.ok(fs.readFileSync(ours).equals(fs.readFileSync(viaNbdcopy)), 'the destination differs from what nbdcopy reads from the source');
  });

  test('NBD -> - (stdout) and - (stdin) -> NBD', async () => {
    const src = await nbdkit(['sparse-random', '32M', 'seed=3']);
    const r = await blockgateBin(['copy', '--checksum', src.uri, '-']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.length, 32 * MiB);
    // With the image on stdout, the checksum goes to stderr.
    assert.equal(r.stderr, `${sha256(r.stdout)}  ${src.uri}\n`);
    const viaNbdcopy = local('sr.img');
    await runOk('nbdcopy', [src.uri, viaNbdcopy]);
    assertSameBytes(r.stdout, fs.readFileSync(viaNbdcopy), 'stdout');

    const dst = await nbdkit(['memory', '16M']);
    const w = await blockgateBin(['copy', '--checksum', '-v', '-', dst.uri], IMAGE);
    assert.equal(w.code, 0, w.stderr);
    assert.equal(w.stdout.toString(), `${sha256(IMAGE)}  -\n`);
    assert.equal(stats(w.stderr).read, IMAGE.length);
    const back = await blockgateBin(['copy', dst.uri, '-']);
    assertSameBytes(back.stdout, IMAGE, 'stdin -> NBD -> stdout');

    // stdin -> file: the file takes the stream's length; --no-extents reads holes too.
    const file = local('from-stdin.img');
    const f = await blockgateBin(['copy', '-', file], IMAGE.subarray(0, 5 * MiB + 77));
    assert.equal(f.code, 0, f.stderr);
    assertSameBytes(fs.readFileSync(file), IMAGE.subarray(0, 5 * MiB + 77), 'stdin -> file');
    const all = stats((await copyOk(['-v', '--no-extents', src.uri, 'null:'])).stderr);
    assert.equal(all.read, 32 * MiB);
  });

  test('a sparse 1 GiB export with 1 MiB of data: only ~1 MiB is read from the source', async () => {
    const src = await nbdkit(['memory', '1G']);
    const data = seededBytes(11, MiB);
    const dataFile = local('data.bin');
    fs.writeFileSync(dataFile, data);
    await nbdsh(`import os\nh.connect_uri(os.environ['uri'])\nh.pwrite(open(${JSON.stringify(dataFile)}, 'rb').read(), ${300 * MiB})\n`, src.uri);
    const out = local('sparse.img');
    const r = await copyOk(['--checksum', '-v', src.uri, out]);
    const s = stats(r.stderr);
    assert.equal(s.size, 1024 * MiB);
    assert.ok(s.read >= MiB && s.read <= 2 * MiB, `read ${s.read} bytes from the source`);
    assert.equal(s.skipped, 1024 * MiB - s.read, 'zero ranges of a fresh file are skipped');
    assert.equal(fs.statSync(out).size, 1024 * MiB);
    // The checksum covers the zero ranges too: it is sha256 of the whole raw image.
    assert.equal(r.stdout.split(' ')[0], await sha256File(out));
    const fd = fs.openSync(out, 'r');
    const got = Buffer.alloc(MiB);
    fs.readSync(fd, got, 0, MiB, 300 * MiB);
    fs.closeSync(fd);
    assertSameBytes(got, data, 'the data');

    // To an NBD destination: WRITE_ZEROES for the holes, or nothing with --destination-is-zero.
    const z = stats((await copyOk(['-v', src.uri, `${bg.replace('/?', '/big?')}`])).stderr);
    assert.ok(z.read <= 2 * MiB && z.zeroed >= 1022 * MiB, JSON.stringify(z));
    const skip = stats((await copyOk(['-v', '--destination-is-zero', src.uri, bg.replace('/?', '/big?')])).stderr);
    assert.ok(skip.read <= 2 * MiB && skip.zeroed === 0 && skip.skipped >= 1022 * MiB, JSON.stringify(skip));
  });

  test('--progress on a pipe prints N/100 lines', async () => {
    const r = await copyOk(['--progress', imageFile, 'null:']);
    const lines = r.stderr.trim().split('\n');
    assert.ok(lines.every((l) => /^\d+\/100$/.test(l)), r.stderr);
    assert.equal(lines[0], '0/100');
    assert.equal(lines[lines.length - 1], '100/100');
    const pcts = lines.map((l) => Number(l.split('/')[0]));
    assert.deepEqual([...pcts].sort((a, b) => a - b), pcts, 'increasing');
  });

  test('a source whose reads fail: exit 1, the source and its error named', async () => {
    const src = await nbdkit(['--filter=error', 'pattern', '16M', 'error-pread=EIO', 'error-pread-rate=100%']);
    const out = local('never.img');
    const r = await blockgateRun(['copy', src.uri, out]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^blockgate copy: source: .*\(EIO\)\n$/);
  });

  test('a destination whose writes fail: exit 1, the destination named', async () => {
    const dst = await nbdkit(['--filter=error', 'memory', '16M', 'error-pwrite=ENOSPC', 'error-pwrite-rate=100%', 'error-zero=ENOSPC', 'error-zero-rate=100%']);
    const r = await blockgateRun(['copy', imageFile, dst.uri]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^blockgate copy: destination: .*\(ENOSPC\)\n$/);
  });

  test('a destination smaller than the source is refused before anything is written', async () => {
    const r = await blockgateRun(['copy', imageFile, bg.replace('/?', '/small?')]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^blockgate copy: destination: 8388608 bytes, smaller than the source \(16777216 bytes\) \(ENOSPC\)\n$/);
  });

  test('a source killed mid-copy: exit 1, never a silent short copy', async () => {
    const src = await nbdkit(['--filter=delay', 'pattern', '128M', 'delay-read=500ms']);
    const out = local('killed.img');
    const copy = children.blockgate(['copy', '--progress', src.uri, out]);
    await copy.waitFor(/^[1-9]\d*\/100$/m, 'stderr');
    src.child.proc.kill('SIGKILL');
    assert.equal(await copy.exited(), 1);
    assert.match(copy.stderr(), /blockgate copy: source: .*\(ECONNRESET\)\n$/);
    assert.doesNotMatch(copy.stderr(), /100\/100/);
  });

  test('a destination killed mid-copy: exit 1, the destination named', async () => {
    const dst = await nbdkit(['--filter=delay', 'memory', '128M', 'delay-write=500ms']);
    const copy = children.blockgate(['copy', '--progress', bg.replace('/?', '/pattern?'), dst.uri]);
    await copy.waitFor(/^[1-9]\d*\/100$/m, 'stderr');
    dst.child.proc.kill('SIGKILL');
    assert.equal(await copy.exited(), 1);
    assert.match(copy.stderr(), /blockgate copy: destination: .*\(ECONNRESET\)\n$/);
  });

  test('usage errors: one line, exit 1', async () => {
    const r = await blockgateRun(['copy', '--checksum=nosuch', imageFile, 'null:']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^blockgate copy: unknown checksum algorithm 'nosuch'/);
    const missing = await blockgateRun(['copy', path.join(tmp, 'missing.img'), 'null:']);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /^blockgate copy: source: .*\(ENOENT\)\n$/);
    const link = path.join(tmp, 'link.raw');
    fs.linkSync(imageFile, link);
    const self = await blockgateRun(['copy', imageFile, link]);
    assert.equal(self.code, 1);
    assert.match(self.stderr, /is the source/);
    assert.equal(fs.statSync(imageFile).size, IMAGE.length, 'the source was not truncated');
  });
});
