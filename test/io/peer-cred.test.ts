/**
 * peerCredentials reads SO_PEERCRED through koffi: the pid, uid and gid of the process at
 * the other end of a unix socket, from this process and from a child run as nobody
 * (65534, through setpriv, so only as root); null for TCP, a destroyed socket and a socket
 * with no handle. The TCP case also pins what the kernel does there, which peerCredentials
 * relies on: getsockopt succeeds with pid 0 and uid = gid = (uid_t)-1.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { peerCredentials, peerCredentialsUnavailable } from '../../src/io/peer-cred.js';

const LINUX = process.platform === 'linux';
const WAIT_MS = 10_000;
const NOBODY = 65534;
const AS_ROOT = process.getuid?.() === 0;
const HAVE_SETPRIV = LINUX && spawnSync('setpriv', ['--version'], { stdio: 'ignore' }).status === 0;

/** `p`, or a rejection naming `what` after `ms`. */
async function within<T>(p: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A net.Server listening at `where`, whose accepted sockets come out of `next()` in order. */
async function acceptingServer(where: string | { port: number; host: string }): Promise<{
  server: net.Server;
  next: () => Promise<net.Socket>;
  close: () => Promise<void>;
}> {
  const accepted: net.Socket[] = [];
  const waiting: ((s: net.Socket) => void)[] = [];
  const server = net.createServer((s) => {
    s.on('error', () => {});
    const w = waiting.shift();
    if (w) w(s);
    else accepted.push(s);
  });
  await within(
    new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      if (typeof where === 'string') server.listen(where, resolve);
      else server.listen(where.port, where.host, resolve);
    }),
    'listen',
  );
  return {
    server,
    next: () => {
      const s = accepted.shift();
      if (s) return Promise.resolve(s);
      return within(new Promise<net.Socket>((resolve) => waiting.push(resolve)), 'a connection');
    },
    close: async () => {
      for (const s of accepted) s.destroy();
      await within(new Promise<void>((resolve) => server.close(() => resolve())), 'server close');
    },
  };
}

async function connected(s: net.Socket): Promise<net.Socket> {
  s.on('error', () => {});
  await within(new Promise<void>((resolve, reject) => {
    s.once('connect', resolve);
    s.once('error', reject);
  }), 'connect');
  return s;
}

function tempDir(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-peercred-'));
  fs.chmodSync(dir, 0o755);
  return dir;
}

test('peer credentials are available on Linux', { skip: !LINUX && 'Linux only' }, () => {
  assert.equal(peerCredentialsUnavailable(), null);
});

test('a client in this process is seen with this pid, uid and gid; it sees the listener, also this process', { skip: !LINUX && 'Linux only' }, async () => {
  const dir = tempDir();
  const sockPath = path.join(dir, 's.sock');
  const srv = await acceptingServer(sockPath);
  const client = net.connect(sockPath);
  try {
    await connected(client);
    const peer = await srv.next();
    const expected = { pid: process.pid, uid: process.getuid!(), gid: process.getgid!() };
    assert.deepEqual(peerCredentials(peer), expected);
    // Asking twice reads the same record: the kernel took it at connect(2).
    assert.deepEqual(peerCredentials(peer), expected);
    // The connecting side sees the credentials of the process that called listen(2).
    assert.deepEqual(peerCredentials(client), expected);
    peer.destroy();
  } finally {
    client.destroy();
    await srv.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test(
  'a client process run as nobody is seen with uid and gid 65534 and its own pid',
  { skip: (!HAVE_SETPRIV && 'needs Linux and setpriv') || (!AS_ROOT && 'needs root to run a child as nobody') },
  async () => {
    const dir = tempDir();
    const sockPath = path.join(dir, 's.sock');
    const srv = await acceptingServer(sockPath);
    fs.chmodSync(sockPath, 0o777);
    // The child connects, then waits for the server to hang up (or gives up after WAIT_MS).
    const script = [
      "const s = require('node:net').connect(process.argv[1]);",
      "s.on('error', (e) => { console.error(String(e)); process.exit(2); });",
      "s.on('close', () => process.exit(0));",
      `setTimeout(() => process.exit(3), ${WAIT_MS}).unref();`,
    ].join(' ');
    const child = spawn(
      'setpriv',
      [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', process.execPath, '-e', script, sockPath],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    try {
      const peer = await within(
        Promise.race([srv.next(), exited.then((code) => Promise.reject(new Error(`child exited ${code}: ${stderr}`)))]),
        'the child to connect',
      );
      // setpriv execs node, so the process at the other end has setpriv's pid.
      assert.deepEqual(peerCredentials(peer), { pid: child.pid, uid: NOBODY, gid: NOBODY });
      peer.destroy();
      assert.equal(await within(exited, 'the child to exit'), 0, stderr);
    } finally {
      if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) {
        try {
          process.kill(child.pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
      await srv.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  },
);

test('a TCP socket has no peer credentials: getsockopt succeeds with pid 0 and ids -1, and peerCredentials is null', { skip: !LINUX && 'Linux only' }, async () => {
  const srv = await acceptingServer({ port: 0, host: '127.0.0.1' });
  const { port } = srv.server.address() as net.AddressInfo;
  const client = net.connect(port, '127.0.0.1');
  try {
    await connected(client);
    const peer = await srv.next();
    assert.equal(peerCredentials(peer), null);
    assert.equal(peerCredentials(client), null);

    // What the kernel really does on TCP, read directly: not an error (ENOPROTOOPT or the
    // like) but success with an empty ucred. peerCredentials maps the -1 ids to null.
    const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    const ucred = koffi.struct({ pid: 'int32', uid: 'uint32', gid: 'uint32' });
    const getsockopt = koffi.load(null).func('getsockopt', 'int', [
      'int', 'int', 'int', koffi.out(koffi.pointer(ucred)), koffi.inout(koffi.pointer('uint32')),
    ]);
    for (const s of [peer, client]) {
      const fd = (s as unknown as { _handle: { fd: number } })._handle.fd;
      const out: Record<string, unknown> = {};
      const len = [12];
      assert.equal(getsockopt(fd, 1, 17, out, len), 0);
      assert.equal(len[0], 12);
      assert.deepEqual(out, { pid: 0, uid: 0xffff_ffff, gid: 0xffff_ffff });
    }
    peer.destroy();
  } finally {
    client.destroy();
    await srv.close();
  }
});

test('a destroyed socket and a socket without a handle have no peer credentials', { skip: !LINUX && 'Linux only' }, async () => {
  const dir = tempDir();
  const sockPath = path.join(dir, 's.sock');
  const srv = await acceptingServer(sockPath);
  const client = net.connect(sockPath);
  try {
    await connected(client);
    const peer = await srv.next();
    assert.notEqual(peerCredentials(peer), null);
    peer.destroy();
    assert.equal(peerCredentials(peer), null);
    client.destroy();
    assert.equal(peerCredentials(client), null);
    assert.equal(peerCredentials(new net.Socket()), null);
  } finally {
    client.destroy();
    await srv.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
