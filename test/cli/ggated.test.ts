/**
 * `blockgate ggated` as an operator runs it: a child process started from the sources,
 * a ggate client against it, SIGHUP to reload the exports, SIGTERM to stop.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import {
  GGATE_CMD,
  GGATE_FLAG,
  GGATE_SIZE,
  decodeHdr,
  decodeSinit,
  encodeCinit,
  encodeHdr,
  encodeVersion,
  type GgateSinit,
} from '../../src/ggate/index.js';
import { run } from '../helpers/run.js';
import { loadGgatedConfig } from '../../src/cli/ggated.js';

const MAIN = path.resolve(import.meta.dirname, '../../src/cli/main.ts');
const CLI = [process.execPath, '--import', 'tsx', MAIN];
const TIMEOUT_MS = 30_000;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-ggated-cli-'));
const children = new Set<ChildProcess>();
const sockets = new Set<net.Socket>();
after(() => {
  for (const s of sockets) s.destroy();
  for (const c of children) c.kill('SIGKILL');
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** Starts `blockgate ggated` on 127.0.0.1, port 0; resolves with the port from its 'ready' log line (pid file written by then). */
function startGgated(args: string[]): Promise<{ child: ChildProcess; port: number; stderr: () => string }> {
  const child = spawn(CLI[0]!, [...CLI.slice(1), 'ggated', '-a', '127.0.0.1', '-p', '0', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  child.on('exit', () => children.delete(child));
  let err = '';
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`ggated did not start; stderr: ${err}`)), TIMEOUT_MS);
    child.stderr!.on('data', (b: Buffer) => {
      err += b.toString();
      for (const line of err.split('\n')) {
        if (!line.startsWith('{')) continue;
        const rec = JSON.parse(line) as { port?: number; msg?: string };
        if (typeof rec.port === 'number' && rec.msg === 'ready') {
          clearTimeout(t);
          resolve({ child, port: rec.port, stderr: () => err });
          return;
        }
      }
    });
    child.on('exit', (code) => reject(new Error(`ggated exited ${code}: ${err}`)));
  });
}

function exited(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) resolve(child.exitCode);
    else child.on('exit', (code) => resolve(code));
  });
}

/** Reads exactly n bytes from a socket (or rejects when it closes first). */
function reader(socket: net.Socket): (n: number) => Promise<Buffer> {
  let buf = Buffer.alloc(0);
  let wake: (() => void) | null = null;
  let ended = false;
  socket.on('data', (b: Buffer) => {
    buf = Buffer.concat([buf, b]);
    wake?.();
  });
  socket.on('close', () => {
    ended = true;
    wake?.();
  });
  socket.on('error', () => undefined);
  return async (n) => {
    const deadline = Date.now() + TIMEOUT_MS;
    while (buf.length < n) {
      if (ended) throw new Error('connection closed');
      if (Date.now() > deadline) throw new Error('timed out');
      await new Promise<void>((r) => {
        wake = r;
        setTimeout(r, 100);
      });
    }
    const out = buf.subarray(0, n);
    buf = buf.subarray(n);
    return out;
  };
}

async function connect(port: number, p: string, flags: number, token: number): Promise<{ socket: net.Socket; read: (n: number) => Promise<Buffer>; sinit: GgateSinit }> {
  const socket = await new Promise<net.Socket>((resolve, reject) => {
    const s = net.connect({ port, host: '127.0.0.1' }, () => resolve(s));
    s.once('error', reject);
  });
  sockets.add(socket);
  const read = reader(socket);
  socket.write(encodeVersion({ version: 0, error: null }));
  await read(GGATE_SIZE.VERSION_SIZE);
  socket.write(encodeCinit({ path: p, flags, nconn: 2, token }));
  const s = decodeSinit(await read(GGATE_SIZE.SINIT_SIZE));
  assert.ok(s.ok);
  return { socket, read, sinit: s.value };
}

describe('blockgate ggated', () => {
  test('--help lists FreeBSD ggated options', async () => {
    const r = await run(CLI[0]!, [...CLI.slice(1), 'ggated', '--help'], { timeoutMs: TIMEOUT_MS });
    assert.equal(r.code, 0);
    for (const opt of ['-a, --address', '-p, --port', '-R, --rcvbuf', '-S, --sndbuf', '-n, --nagle', '-v, --verbose', '-c, --config', '-F, --pidfile', '[exports-file]']) {
      assert.ok(r.stdout.includes(opt), opt);
    }
    assert.match(r.stdout, /\/etc\/gg\.exports/);
  });

  test('a bad exports file or bad option is fatal at start, with a message', async () => {
    const bad = path.join(tmp, 'bad.exports');
    fs.writeFileSync(bad, '127.0.0.1 RX /dev/x\n');
    const r1 = await run(CLI[0]!, [...CLI.slice(1), 'ggated', '-a', '127.0.0.1', '-p', '0', bad], { timeoutMs: TIMEOUT_MS });
    assert.equal(r1.code, 1);
    assert.match(r1.stderr, /bad\.exports:1: invalid access 'RX'/);
    const r2 = await run(CLI[0]!, [...CLI.slice(1), 'ggated', '-p', '70000', bad], { timeoutMs: TIMEOUT_MS });
    assert.equal(r2.code, 1);
    assert.match(r2.stderr, /invalid port '70000'/);
    const r3 = await run(CLI[0]!, [...CLI.slice(1), 'ggated', '-a', '::1', bad], { timeoutMs: TIMEOUT_MS });
    assert.equal(r3.code, 1);
    assert.match(r3.stderr, /IPv4 only/);
  });

  test('serves a file and a --config stack, reloads on SIGHUP, stops on SIGTERM', async () => {
    const img = path.join(tmp, 'disk.img');
    fs.writeFileSync(img, Buffer.alloc(1024 * 1024, 0x5a));
    const exportsFile = path.join(tmp, 'gg.exports');
    fs.writeFileSync(exportsFile, `# test exports\n127.0.0.1 RO ${img}\n127.0.0.1 RW /dev/nbd-export\n`);
    const config = path.join(tmp, 'stacks.json');
    fs.writeFileSync(config, JSON.stringify({ '/dev/nbd-export': { backend: { type: 'memory', size: '2M' } } }));
    const pidfile = path.join(tmp, 'ggated.pid');
    const { child, port } = await startGgated(['-v', '-n', '-R', '262144', '-F', pidfile, '-c', config, exportsFile]);
    assert.equal(fs.readFileSync(pidfile, 'utf8'), `${child.pid}\n`);

    // The memory stack from --config.
    const rx = await connect(port, '/dev/nbd-export', GGATE_FLAG.GGATE_FLAG_SEND, 1);
    const tx = await connect(port, '/dev/nbd-export', GGATE_FLAG.GGATE_FLAG_RECV, 1);
    assert.equal(rx.sinit.error, null);
    assert.equal(tx.sinit.mediasize, 2 * 1024 * 1024);
    tx.socket.write(encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_WRITE, offset: 0, length: 512, seq: 1, error: null }));
    tx.socket.write(Buffer.alloc(512, 7));
    tx.socket.write(encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_READ, offset: 0, length: 512, seq: 2, error: null }));
    const w = decodeHdr(await rx.read(GGATE_SIZE.HDR_SIZE));
    assert.ok(w.ok && w.value.errno === 0 && w.value.seq === 1);
    const r = decodeHdr(await rx.read(GGATE_SIZE.HDR_SIZE));
    assert.ok(r.ok && r.value.errno === 0 && r.value.seq === 2);
    assert.deepEqual(await rx.read(512), Buffer.alloc(512, 7));

    // The file, read-only; read-write is refused until the exports say otherwise.
    const refused = await connect(port, img, GGATE_FLAG.GGATE_FLAG_SEND, 2);
    assert.equal(refused.sinit.error, 'EPERM');
    fs.writeFileSync(exportsFile, `127.0.0.1 RW ${img}\n127.0.0.1 RW /dev/nbd-export\n`);
    child.kill('SIGHUP');
    const deadline = Date.now() + TIMEOUT_MS;
    let admitted: GgateSinit | null = null;
    for (let token = 100; Date.now() < deadline; token++) {
      const c = await connect(port, img, GGATE_FLAG.GGATE_FLAG_SEND, token);
      c.socket.destroy();
      if (c.sinit.error === null) {
        admitted = c.sinit;
        break;
      }
      await new Promise((res) => setTimeout(res, 50));
    }
    assert.ok(admitted, 'read-write access after SIGHUP');
    assert.equal(admitted.mediasize, 1024 * 1024);

    child.kill('SIGTERM');
    assert.equal(await exited(child), 0);
    assert.equal(fs.existsSync(pidfile), false, 'pid file removed');
  });

  test('--config files are validated with the bad key named', () => {
    const f = path.join(tmp, 'bad-config.json');
    fs.writeFileSync(f, JSON.stringify({ '/dev/x': { backend: { type: 'memory', size: '1M' }, filter: [] } }));
    assert.throws(() => loadGgatedConfig(f), /\/dev\/x/);
    fs.writeFileSync(f, JSON.stringify({ '/dev/x': { filters: [] } }));
    assert.throws(() => loadGgatedConfig(f), /backend/);
    fs.writeFileSync(f, '{ not json');
    assert.throws(() => loadGgatedConfig(f), /bad-config\.json/);
    fs.writeFileSync(f, JSON.stringify({ '/dev/x': { backend: { type: 'memory', size: '1M' } } }));
    assert.deepEqual(loadGgatedConfig(f), { '/dev/x': { backend: { type: 'memory', size: '1M' } } });
  });
});
