/**
 * Interop of the `nbd` backend: `blockgate serve` re-exporting other servers' exports.
 * - nbdkit's memory plugin, given on the command line as `nbd:URI`, written and read
 *   by nbdcopy through blockgate, the bytes compared with what nbdkit holds (read from
 *   nbdkit directly);
 * - the same through a `--config` stack of writeback and error filters: data reaches
 *   nbdkit at FLUSH, and an injected write-back failure fails nbdcopy's flush;
 * - qemu-nbd serving a qcow2 with holes: `nbdinfo --map` through blockgate equals
 *   `nbdinfo --map` of qemu-nbd itself.
 * Every wait is bounded; children are killed by PID in `after`.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { ChildSet, type Child } from '../helpers/children.js';
import { run, runOk } from '../helpers/run.js';
import { seededBytes } from '../helpers/data.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
/** How many times a socket file is looked for (every 50 ms) before giving up. */
const SOCKET_POLLS = 200;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-interop-nbd-backend-'));
const children = new ChildSet();
after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

let n = 0;
const local = (name: string) => path.join(tmp, `${n++}-${name}`);
const unixUri = (socket: string, name = '') => `nbd+unix:///${name}?socket=${socket}`;

async function untilSocket(p: string, child: Child): Promise<void> {
  for (let i = 0; i < SOCKET_POLLS; i++) {
    if (fs.existsSync(p)) return;
    if (child.proc.exitCode !== null) throw new Error(`exited before creating ${p}: ${child.stderr()}`);
    await delay(50);
  }
  throw new Error(`${p} never appeared; stderr: ${child.stderr()}`);
}

/** nbdkit's memory plugin on a fresh unix socket. */
async function nbdkitMemory(): Promise<{ child: Child; socket: string; uri: string }> {
  const socket = local('nbdkit.sock');
  const child = children.start('nbdkit', ['-f', '-U', socket, 'memory', String(SIZE)]);
  await untilSocket(socket, child);
  return { child, socket, uri: unixUri(socket) };
}

/** `blockgate serve` with these arguments, listening on a fresh unix socket (unless the config says where). */
async function serve(args: string[]): Promise<{ child: Child; uri: string }> {
  const child = children.blockgate(['serve', '--no-control', '--print-uri', '-l', 'warn', ...args]);
  const m = await child.waitFor(/^(nbd\S+)$/m);
  return { child, uri: m[1]! };
}

async function stopChild(c: Child): Promise<void> {
  c.proc.kill('SIGTERM');
  await c.exited();
}

function assertSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  if (actual.equals(expected)) return;
  let i = 0;
  while (actual[i] === expected[i]) i++;
  assert.fail(`${what}: first difference at byte ${i} (got ${actual[i]}, expected ${expected[i]})`);
}

/** What an NBD server holds, copied out with nbdcopy. */
async function contents(uri: string): Promise<Buffer> {
  const out = local('contents.img');
  await runOk('nbdcopy', [uri, out]);
  return fs.readFileSync(out);
}

test('serve nbd:URI re-exports nbdkit memory: nbdcopy writes through blockgate land in nbdkit and read back equal', async () => {
  const kit = await nbdkitMemory();
  const bg = await serve(['-U', local('bg.sock'), `nbd:${kit.uri}`]);
  try {
    const info = JSON.parse((await runOk('nbdinfo', ['--json', bg.uri])).stdout) as { exports: { 'export-size': number; 'can_flush': boolean; 'is_read_only': boolean }[] };
    assert.equal(info.exports[0]!['export-size'], SIZE);
    assert.equal(info.exports[0]!.is_read_only, false);
    const src = local('seeded.img');
    const data = seededBytes(0xb10c, SIZE);
    fs.writeFileSync(src, data);
    await runOk('nbdcopy', ['--flush', '--connections=2', src, bg.uri]);
    assertSameBytes(await contents(kit.uri), data, 'nbdkit read directly');
    assertSameBytes(await contents(bg.uri), data, 'read back through blockgate');
  } finally {
    await stopChild(bg.child);
    await stopChild(kit.child);
  }
});

test('a bare NBD URI is an export too, and -r makes it read-only', async () => {
  const kit = await nbdkitMemory();
  const bg = await serve(['-r', '-U', local('bg.sock'), kit.uri]);
  try {
    const info = JSON.parse((await runOk('nbdinfo', ['--json', bg.uri])).stdout) as { exports: { 'is_read_only': boolean; description?: string }[] };
    assert.equal(info.exports[0]!.is_read_only, true);
    const src = local('one-mib.img');
    fs.writeFileSync(src, seededBytes(3, MiB));
    const r = await run('nbdcopy', ['--flush', src, bg.uri]);
    assert.notEqual(r.code, 0, 'a copy to a read-only export fails');
    assert.ok((await contents(kit.uri)).subarray(0, MiB).every((b) => b === 0), 'nbdkit was not written');
  } finally {
    await stopChild(bg.child);
    await stopChild(kit.child);
  }
});

test('--config: nbd backend under writeback and error filters; data reaches nbdkit at FLUSH, an injected write-back failure fails the flush', async () => {
  const kit = await nbdkitMemory();
  const trigger = local('fail-writeback');
  const socket = local('bg.sock');
  const config = local('config.json');
  fs.writeFileSync(
    config,
    JSON.stringify({
      listen: [{ path: socket }],
      exports: [
        {
          name: 'disk',
          backend: { type: 'nbd', uri: kit.uri, retries: 2, retryDelay: '100ms' },
          filters: [{ type: 'writeback', maxDirty: '8M' }, { type: 'error', ops: ['writeback'], file: trigger }],
        },
      ],
    }),
  );
  const bg = await serve(['--config', config]);
  try {
    assert.match(bg.uri, /\/disk\?socket=/);
    const first = seededBytes(1, 16 * MiB);
    const src = local('first.img');
    fs.writeFileSync(src, first);
    await runOk('nbdcopy', ['--flush', src, bg.uri]);
    assertSameBytes((await contents(kit.uri)).subarray(0, 16 * MiB), first, 'nbdkit after the first copy');

    // Write-back to nbdkit now fails: the copy's FLUSH reports it, and nbdkit keeps the old bytes.
    fs.writeFileSync(trigger, '');
    const second = seededBytes(2, 4 * MiB);
    const src2 = local('second.img');
    fs.writeFileSync(src2, second);
    const r = await run('nbdcopy', ['--flush', src2, bg.uri]);
    assert.notEqual(r.code, 0, `nbdcopy should fail: ${r.stderr}`);
    assert.match(r.stderr, /flush|Input\/output error/i);
    fs.rmSync(trigger);
    assertSameBytes((await contents(kit.uri)).subarray(0, 4 * MiB), first.subarray(0, 4 * MiB), 'nbdkit kept the old bytes (drop policy)');
    // The error was reported; a later flush succeeds.
    await runOk('nbdcopy', ['--flush', src2, bg.uri]);
    assertSameBytes((await contents(kit.uri)).subarray(0, 4 * MiB), second, 'nbdkit after the retry');
  } finally {
    await stopChild(bg.child);
    await stopChild(kit.child);
  }
});

test("re-exporting qemu-nbd's qcow2 keeps its holes: nbdinfo --map through blockgate equals qemu-nbd's", async () => {
  const raw = local('holes.raw');
  const fd = fs.openSync(raw, 'w');
  fs.ftruncateSync(fd, SIZE);
  for (const at of [0, 5 * MiB, 5 * MiB + 65536, 33 * MiB, SIZE - MiB]) fs.writeSync(fd, seededBytes(at, 65536), 0, 65536, at);
  fs.closeSync(fd);
  const qcow2 = local('holes.qcow2');
  await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
  const qsock = local('qemu.sock');
  const qemu = children.start('qemu-nbd', ['-f', 'qcow2', '-r', '-t', '-e', '4', '-k', qsock, qcow2]);
  await untilSocket(qsock, qemu);
  const bg = await serve(['-U', local('bg.sock'), `nbd:${unixUri(qsock)}`]);
  try {
    const map = async (uri: string) => (await runOk('nbdinfo', ['--map', '--json', uri])).stdout;
    const direct = JSON.parse(await map(unixUri(qsock))) as { offset: number; length: number; type: number }[];
    const through = JSON.parse(await map(bg.uri)) as typeof direct;
    assert.ok(direct.some((e) => (e.type & 1) === 1), 'qemu-nbd reports holes');
    assert.deepEqual(through, direct);
    assertSameBytes(await contents(bg.uri), fs.readFileSync(raw), 'data through blockgate');
  } finally {
    await stopChild(bg.child);
    await stopChild(qemu);
  }
});
