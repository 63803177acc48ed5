/**
 * NbdClient (src/nbd/client.ts) against real NBD servers, each started here on a unix
 * socket in a temporary directory or on a free 127.0.0.1 port, and killed by PID:
 *
 * - nbdkit 1.32: memory, file, sparse-random (data and map compared with what nbdcopy
 *   and nbdinfo read), the error filter (errno of every command), the delay and log
 *   filters (many requests in flight, replies out of order, requests split to the byte
 *   budget), --no-sr (simple replies), TLS (PSK, X.509 with the server's certificate
 *   checked by default: a certificate from another CA, or for another name, is
 *   refused), CAN_MULTI_CONN with `connections: 4`, the limit filter (a multi-conn
 *   connect that fails part way), and a server killed with requests in flight;
 * - qemu-nbd 7.2 serving a qcow2 image: block status (base:allocation and
 *   qemu:allocation-depth) over the whole export equals `nbdinfo --map`, data equals
 *   `qemu-img convert -O raw`, OFFSET_HOLE chunks, DF;
 * - Debian's nbd-server 3.24 (the reference server), from a config file with `-d`;
 * - blockgate itself (`serve -U SOCK memory:64M`), with extended headers.
 *
 * What each server negotiated is printed as a test diagnostic (`# <server>: {...}`).
 * Every wait is bounded by a count or a timer that fails the test; nothing asserts on
 * how long something took.
 */
import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ChildSet, type Child } from '../helpers/children.js';
import { runOk } from '../helpers/run.js';
import { pki, type Pki } from '../helpers/pki.js';
import { seededBytes } from '../helpers/data.js';
import { assertSameBytes, rejectsWith } from '../helpers/assertions.js';
import { NbdClient, type Extent, type NbdClientOptions } from '../../src/nbd/client.js';
import { NBD_FLAG, NBD_STATE } from '../../src/nbd/constants.js';
import { BlockError } from '../../src/errors/index.js';
import { freePort } from '../helpers/ports.js';

const MiB = 1024 * 1024;
const TEST = { timeout: 60_000 };
/** Polls for a file or a log line: POLLS times, POLL_MS apart (a count, not a deadline). */
const POLLS = 400;
const POLL_MS = 25;
/** Bound on a client call that must settle (a hang fails the test instead of the run). */
const SETTLE_MS = 20_000;
const HOLE_ZERO = NBD_STATE.NBD_STATE_HOLE | NBD_STATE.NBD_STATE_ZERO;

const children = new ChildSet();
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-nbd-client-'));
let creds: Pki;
/** A server certificate for localhost/127.0.0.1 signed by a CA the clients do not trust. */
let foreignServerDir: string;
let seq = 0;

before(async () => {
  creds = await pki();
  foreignServerDir = await makeForeignServerDir();
});
after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------
// Helpers

const unique = (name: string): string => path.join(tmp, `${++seq}-${name}`);

async function until(cond: () => boolean, what: string, child?: Child, polls = POLLS): Promise<void> {
  for (let i = 0; i < polls; i++) {
    if (cond()) return;
    if (child && child.proc.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
  throw new Error(`never happened: ${what}${child ? `; stderr: ${child.stderr()}` : ''}`);
}

/** Rejects if `p` has not settled within SETTLE_MS (a hang is a failure, not a stuck test). */
async function bounded<T>(p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: did not settle within ${SETTLE_MS} ms`)), SETTLE_MS)));
  try {
    return await Promise.race([p, limit]);
  } finally {
    clearTimeout(timer);
  }
}


const gone = (child: Child): boolean => child.proc.exitCode !== null || child.proc.signalCode !== null;

/** SIGTERM by PID; SIGKILL if it is still there after a bounded wait (nbdkit waits for clients that stay connected). */
async function stop(child: Child): Promise<void> {
  if (gone(child)) return;
  child.proc.kill('SIGTERM');
  try {
    await until(() => gone(child), 'exit after SIGTERM', undefined, 200);
  } catch {
    child.proc.kill('SIGKILL');
  }
  await child.exited();
}

interface Kit {
  readonly child: Child;
  /** nbd+unix:// (or nbd:// with tcp) URI of the default export. */
  readonly uri: string;
  readonly port: number;
  /** The log filter's file, when asked for. */
  readonly log: string;
}

/**
 * Runs `nbdkit -f ARGS` on a fresh unix socket (or a free 127.0.0.1 port), ready once its
 * pidfile exists; `log` puts the log filter outermost. Killed by PID when `fn` ends.
 */
async function withKit<T>(args: readonly string[], o: { tcp?: boolean; log?: boolean }, fn: (k: Kit) => Promise<T>): Promise<T> {
  const pid = unique('nbdkit.pid');
  const log = unique('nbdkit.log');
  const sock = unique('nbdkit.sock');
  const port = o.tcp ? await freePort() : 0;
  const where = o.tcp ? ['-i', '127.0.0.1', '-p', String(port)] : ['-U', sock];
  const full = ['-f', '--exit-with-parent', '-P', pid, ...where, ...(o.log ? ['--filter=log'] : []), ...args, ...(o.log ? [`logfile=${log}`] : [])];
  const child = children.start('nbdkit', full);
  try {
    await until(() => fs.existsSync(pid), `nbdkit ${full.join(' ')} ready`, child);
    const uri = o.tcp ? `nbd://127.0.0.1:${port}/` : `nbd+unix:///?socket=${sock}`;
    return await fn({ child, uri, port, log });
  } finally {
    await stop(child);
  }
}

const readLog = (k: Kit): string => (fs.existsSync(k.log) ? fs.readFileSync(k.log, 'utf8') : '');

async function withClient<T>(uri: string, opts: NbdClientOptions, fn: (c: NbdClient) => Promise<T>): Promise<T> {
  const c = await bounded(NbdClient.connect(uri, opts), `connect ${uri}`);
  try {
    return await fn(c);
  } finally {
    await bounded(c.close(), 'close');
  }
}

function flagNames(flags: number): string[] {
  return Object.entries(NBD_FLAG)
    .filter(([, v]) => (flags & v) !== 0)
    .map(([k]) => k.replace(/^NBD_FLAG_/, ''));
}

/** What the client negotiated, for the report. */
function negotiated(c: NbdClient): Record<string, unknown> {
  return {
    mode: c.mode,
    contexts: c.contexts,
    blockSize: c.blockSize,
    flags: `0x${c.flags.toString(16)} ${flagNames(c.flags).join('|')}`,
    size: c.size,
    name: c.exportName,
    description: c.description,
    connections: c.connections,
    tls: c.tls,
  };
}

function report(t: TestContext, server: string, c: NbdClient): void {
  t.diagnostic(`${server}: ${JSON.stringify(negotiated(c))}`);
}

/** Adjacent extents with equal flags merged. */
function merge(list: readonly Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of list) {
    const last = out[out.length - 1];
    if (last && last.flags === e.flags && last.offset + last.length === e.offset) out[out.length - 1] = { ...last, length: last.length + e.length };
    else out.push({ offset: e.offset, length: e.length, flags: e.flags });
  }
  return out;
}

/** The client's extents of `context` over the whole export (asking again where each answer ends), merged. */
async function clientMap(c: NbdClient, context?: string): Promise<Extent[]> {
  const all: Extent[] = [];
  let off = 0;
  for (let asks = 0; off < c.size; asks++) {
    assert.ok(asks < 100_000, 'block status makes progress');
    const list = await c.blockStatus(off, c.size - off, context ? { context } : {});
    assert.ok(list.length > 0);
    for (const e of list) {
      assert.equal(e.offset, off, 'extents are contiguous');
      assert.ok(e.length > 0);
      all.push(e);
      off += e.length;
    }
  }
  assert.equal(off, c.size);
  return merge(all);
}

/** `nbdinfo --map[=context] --json URI`, merged. */
async function nbdinfoMap(uri: string, context?: string): Promise<Extent[]> {
  const r = await runOk('nbdinfo', [context ? `--map=${context}` : '--map', '--json', uri]);
  const list = JSON.parse(r.stdout) as { offset: number; length: number; type: number }[];
  return merge(list.map((e) => ({ offset: e.offset, length: e.length, flags: e.type })));
}

/** A whole export read by the client (split by the client where the server needs it). */
async function readAll(c: NbdClient): Promise<Buffer> {
  const b = Buffer.alloc(c.size);
  await c.pread(b, 0);
  return b;
}

async function makeForeignServerDir(): Promise<string> {
  const work = unique('foreign-ca');
  const dir = unique('foreign-server');
  fs.mkdirSync(work);
  fs.mkdirSync(dir, { mode: 0o700 });
  const f = (n: string) => path.join(work, n);
  const certtool = (args: string[]) => runOk('certtool', args, { timeoutMs: 30_000 });
  fs.writeFileSync(f('ca.info'), 'cn = "foreign test CA"\nca\ncert_signing_key\nexpiration_days = 30\n');
  fs.writeFileSync(
    f('server.info'),
    'cn = "localhost"\ndns_name = "localhost"\nip_address = "127.0.0.1"\ntls_www_server\nsigning_key\nencryption_key\nexpiration_days = 30\n',
  );
  await Promise.all([
    certtool(['--generate-privkey', '--key-type=rsa', '--bits=2048', '--outfile', f('ca-key.pem')]),
    certtool(['--generate-privkey', '--key-type=rsa', '--bits=2048', '--outfile', path.join(dir, 'server-key.pem')]),
  ]);
  await certtool(['--generate-self-signed', '--load-privkey', f('ca-key.pem'), '--template', f('ca.info'), '--outfile', path.join(dir, 'ca-cert.pem')]);
  await certtool([
    '--generate-certificate',
    '--load-privkey', path.join(dir, 'server-key.pem'),
    '--load-ca-certificate', path.join(dir, 'ca-cert.pem'),
    '--load-ca-privkey', f('ca-key.pem'),
    '--template', f('server.info'),
    '--outfile', path.join(dir, 'server-cert.pem'),
  ]);
  return dir;
}

/** Read, write (plain and FUA), flush, zero and trim on a writable export, data checked through the client. */
async function readWriteCycle(c: NbdClient, seed: number): Promise<void> {
  const data = seededBytes(seed, 3 * MiB + 123);
  await c.pwrite(data, MiB + 7);
  const back = Buffer.alloc(data.length);
  await c.pread(back, MiB + 7);
  assertSameBytes(back, data, 'read back after pwrite');
  if (c.canFua) await c.pwrite(data.subarray(0, 4096), 0, { fua: true });
  if (c.canFlush) await c.flush();
  if (c.canZero) {
    await c.zero(2 * MiB, 64 * 1024);
    const z = Buffer.alloc(64 * 1024, 0xff);
    await c.pread(z, 2 * MiB);
    assert.ok(z.equals(Buffer.alloc(64 * 1024)), 'zeroed range reads as zeroes');
  }
  if (c.canTrim) await c.trim(3 * MiB, MiB);
}

// ---------------------------------------------------------------------------------------
// nbdkit

describe('nbdkit', () => {
  test('memory: negotiation, read/write/flush/zero/trim/cache, a 40 MiB transfer split at 32 MiB, block status after trim', TEST, async (t) => {
    await withKit(['memory', '64M'], { log: true }, (k) =>
      withClient(k.uri, {}, async (c) => {
        report(t, 'nbdkit memory', c);
        assert.equal(c.mode, 'structured', 'nbdkit 1.32 has no extended headers');
        assert.deepEqual(c.contexts, ['base:allocation']);
        assert.equal(c.size, 64 * MiB);
        assert.ok(c.canFlush && c.canTrim && c.canZero && c.canFua && c.canCache && c.canMultiConn && c.canFastZero);
        await readWriteCycle(c, 1);
        await c.cache(0, 8 * MiB);
        await c.zero(8 * MiB, MiB, { fastZero: true });

        const big = seededBytes(2, 40 * MiB);
        await c.pwrite(big, 16 * MiB);
        const back = Buffer.alloc(big.length);
        await c.pread(back, 16 * MiB);
        assertSameBytes(back, big, '40 MiB through the client');
        const counts = [...readLog(k).matchAll(/ Write id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)/g)].map((m) => [parseInt(m[1]!, 16), parseInt(m[2]!, 16)]);
        assert.ok(counts.some(([o, n]) => o === 16 * MiB && n === 32 * MiB), `the 40 MiB write went as 32 MiB + 8 MiB: ${JSON.stringify(counts)}`);

        // Trimmed memory is a hole again; data is data.
        await c.trim(16 * MiB, 32 * MiB);
        const map = await clientMap(c);
        assert.deepEqual(map, await nbdinfoMap(k.uri), 'client map equals nbdinfo --map');
        const at = (off: number) => map.find((e) => e.offset <= off && off < e.offset + e.length)!.flags;
        assert.equal(at(16 * MiB), HOLE_ZERO, 'trimmed memory is a hole that reads as zeroes');
        assert.equal(at(50 * MiB), 0, 'written data beyond the trim is data');
        const one = await c.blockStatus(0, c.size, { reqOne: true });
        assert.equal(one.length, 1, 'REQ_ONE: one extent');
      }),
    );
  });

  test('memory read-only (-r): the client sees READ_ONLY and refuses writes itself', TEST, async (t) => {
    await withKit(['-r', 'memory', '1M'], {}, (k) =>
      withClient(k.uri, {}, async (c) => {
        report(t, 'nbdkit -r memory', c);
        assert.equal(c.readOnly, true);
        await rejectsWith(c.pwrite(Buffer.alloc(512), 0), 'EPERM', /read-only/);
        await rejectsWith(c.trim(0, 512), 'EPERM');
        await c.pread(Buffer.alloc(512), 0);
      }),
    );
  });

  test('file: data equals the file; writes reach the file after flush; trim punches a hole nbdinfo also sees', TEST, async (t) => {
    const file = unique('file.img');
    const data = seededBytes(3, 8 * MiB);
    fs.writeFileSync(file, data);
    await withKit(['file', file], {}, (k) =>
      withClient(k.uri, {}, async (c) => {
        report(t, 'nbdkit file', c);
        assertSameBytes(await readAll(c), data, 'export = file');
        const w = seededBytes(4, MiB);
        await c.pwrite(w, 2 * MiB);
        await c.flush();
        w.copy(data, 2 * MiB);
        assertSameBytes(fs.readFileSync(file), data, 'file after pwrite + flush');
        await c.trim(4 * MiB, MiB);
        await c.zero(6 * MiB, MiB);
        data.fill(0, 4 * MiB, 5 * MiB).fill(0, 6 * MiB, 7 * MiB);
        assertSameBytes(await readAll(c), data, 'after trim and zero');
        const map = await clientMap(c);
        t.diagnostic(`nbdkit file map after trim/zero: ${JSON.stringify(map)}`);
        assert.deepEqual(map, await nbdinfoMap(k.uri), 'client map equals nbdinfo --map');
        assert.ok(map.some((e) => e.offset <= 4 * MiB && 5 * MiB <= e.offset + e.length && (e.flags & NBD_STATE.NBD_STATE_HOLE) !== 0), 'the trimmed MiB is a hole');
      }),
    );
  });

  test('sparse-random: every byte equals what nbdcopy reads; the map equals nbdinfo --map', TEST, async (t) => {
    const out = unique('sparse-random.img');
    await withKit(['sparse-random', '48M', 'seed=4711', 'percent=30', 'runlength=262144', 'random-content=true'], {}, async (k) => {
      await runOk('nbdcopy', [k.uri, out]);
      await withClient(k.uri, {}, async (c) => {
        report(t, 'nbdkit sparse-random', c);
        assertSameBytes(await readAll(c), fs.readFileSync(out), 'client read vs nbdcopy');
        const map = await clientMap(c);
        assert.ok(map.length > 10, `sparse-random has many extents (${map.length})`);
        assert.deepEqual(map, await nbdinfoMap(k.uri), 'client map equals nbdinfo --map');
      });
    });
  });

  test('error filter: each command fails with the errno injected, the connection stays usable; simple replies too', TEST, async (t) => {
    const args = [
      '--filter=error', 'memory', '64M',
      'error-pread=EIO', 'error-pread-rate=1',
      'error-pwrite=ENOSPC', 'error-pwrite-rate=1',
      'error-trim=EPERM', 'error-trim-rate=1',
      'error-zero=EINVAL', 'error-zero-rate=1',
      'error-cache=ENOMEM', 'error-cache-rate=1',
      'error-extents=ESHUTDOWN', 'error-extents-rate=1',
    ];
    await withKit(args, {}, async (k) => {
      for (const opts of [{}, { structuredReplies: false, extendedHeaders: false }] as NbdClientOptions[]) {
        await withClient(k.uri, opts, async (c) => {
          const messages: Record<string, string> = {};
          const expect = async (what: string, p: Promise<unknown>, code: BlockError['code']) => {
            await assert.rejects(p, (e: unknown) => {
              assert.ok(e instanceof BlockError, String(e));
              assert.equal(e.code, code, `${what}: ${e.message}`);
              messages[what] = e.message;
              return true;
            });
          };
          await expect('pread', c.pread(Buffer.alloc(4096), 0), 'EIO');
          await expect('pread 20 MiB (two requests)', c.pread(Buffer.alloc(20 * MiB), 0), 'EIO');
          await expect('pwrite', c.pwrite(Buffer.alloc(4096), 0), 'ENOSPC');
          await expect('trim', c.trim(0, 4096), 'EPERM');
          await expect('zero', c.zero(0, 4096), 'EINVAL');
          await expect('cache', c.cache(0, 4096), 'ENOMEM');
          if (c.mode === 'simple') await rejectsWith(c.blockStatus(0, 4096), 'EOPNOTSUPP', /not negotiated/);
          else await expect('blockStatus', c.blockStatus(0, 4096), 'ESHUTDOWN');
          // Still connected: FLUSH (not injected) succeeds.
          await c.flush();
          t.diagnostic(`nbdkit error filter, ${c.mode} replies: messages ${JSON.stringify(messages)}`);
        });
      }
      assert.match(k.child.stderr(), /injecting EIO error into pread/);
    });
  });

  test('--no-sr: the client falls back to simple replies and no metadata context', TEST, async (t) => {
    await withKit(['--no-sr', 'memory', '16M'], {}, (k) =>
      withClient(k.uri, {}, async (c) => {
        report(t, 'nbdkit --no-sr memory', c);
        assert.equal(c.mode, 'simple');
        assert.deepEqual(c.contexts, []);
        assert.equal(c.canBlockStatus(), false);
        await readWriteCycle(c, 5);
      }),
    );
  });

  test('delay filter: 72 requests, 64 in flight, replies out of order (reads overtake delayed writes), data intact', TEST, async (t) => {
    await withKit(['--filter=delay', 'memory', '64M', 'delay-write=500ms'], { log: true }, (k) =>
      withClient(k.uri, { maxInFlight: 64 }, async (c) => {
        const done: string[] = [];
        const blocks = 32;
        const block = 256 * 1024;
        const data = seededBytes(6, blocks * block);
        // Preload the read area (each write delayed, all in flight together).
        await Promise.all(Array.from({ length: blocks }, (_, i) => c.pwrite(data.subarray(i * block, (i + 1) * block), 32 * MiB + i * block)));
        const reads: Buffer[] = [];
        const ops: Promise<void>[] = [];
        // Fewer delayed writes than nbdkit's 16 threads, so threads are left for the reads.
        for (let i = 0; i < 8; i++) {
          ops.push(c.pwrite(data.subarray(i * block, (i + 1) * block), i * block).then(() => void done.push(`w${i}`)));
        }
        for (let i = 0; i < 2 * blocks; i++) {
          const b = Buffer.alloc(block / 2);
          reads.push(b);
          ops.push(c.pread(b, 32 * MiB + (i * block) / 2).then(() => void done.push(`r${i}`)));
        }
        await bounded(Promise.all(ops), '72 requests');
        assertSameBytes(Buffer.concat(reads), data, 'reads of the preloaded area');
        const back = Buffer.alloc(8 * block);
        await c.pread(back, 0);
        assertSameBytes(back, data.subarray(0, 8 * block), 'writes');
        const firstWrite = done.findIndex((d) => d.startsWith('w'));
        t.diagnostic(`completion order: ${done.slice(0, 12).join(' ')} ...; first write completed at position ${firstWrite}`);
        assert.ok(firstWrite > 0, 'a read sent after the writes completed before the first write');
        // The server saw many requests at once: count those started and not yet returned.
        let open = 0;
        let most = 0;
        for (const line of readLog(k).split('\n')) {
          if (/ (Read|Write) id=\d+ offset=/.test(line)) most = Math.max(most, ++open);
          else if (/ \.\.\.(Read|Write) id=\d+ return/.test(line)) open--;
        }
        t.diagnostic(`nbdkit delay filter: at most ${most} requests in the server at once`);
        assert.ok(most >= 8, `requests overlapped in the server (${most})`);
      }),
    );
  });

  test('maxInFlightBytes 64 KiB: a 1 MiB read goes as 64 KiB requests; data intact', TEST, async () => {
    await withKit(['sparse-random', '4M', 'seed=99', 'percent=50'], { log: true }, (k) =>
      withClient(k.uri, { maxInFlightBytes: 64 * 1024 }, async (c) => {
        const a = Buffer.alloc(MiB);
        await c.pread(a, MiB);
        const counts = [...readLog(k).matchAll(/ Read id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+)/g)].map((m) => parseInt(m[1]!, 16));
        assert.equal(counts.length, 16, JSON.stringify(counts));
        assert.ok(counts.every((n) => n === 64 * 1024));
        await withClient(k.uri, {}, async (d) => {
          const b = Buffer.alloc(MiB);
          await d.pread(b, MiB);
          assertSameBytes(a, b, 'split read vs one read');
        });
      }),
    );
  });

  test('multi-conn: connections: 4 opens 4 (nbdkit logs 4 connections); writes on all, FLUSH, read back', TEST, async (t) => {
    await withKit(['memory', '64M'], { log: true }, async (k) => {
      await withClient(k.uri, { connections: 4 }, async (c) => {
        report(t, 'nbdkit memory, connections: 4', c);
        assert.equal(c.connections, 4);
        const data = seededBytes(7, 16 * MiB);
        await Promise.all(Array.from({ length: 64 }, (_, i) => c.pwrite(data.subarray(i * 256 * 1024, (i + 1) * 256 * 1024), i * 256 * 1024)));
        await c.flush();
        await withClient(k.uri, {}, async (one) => {
          const back = Buffer.alloc(data.length);
          await one.pread(back, 0);
          assertSameBytes(back, data, 'read on a fresh connection');
        });
        const log = readLog(k);
        const conns = new Set([...log.matchAll(/connection=(\d+) Connect /g)].map((m) => m[1]));
        assert.equal(conns.size, 5, 'four connections of the client and the one that read back');
        const writers = new Set([...log.matchAll(/connection=(\d+) Write /g)].map((m) => m[1]));
        t.diagnostic(`writes went over connections ${[...writers].sort().join(',')}`);
        assert.ok(writers.size > 1, 'writes were spread over the connections');
      });
    });
  });

  test('multi-conn refused part way (limit=2 of 4): connect rejects and closes every connection it opened', TEST, async () => {
    await withKit(['--filter=limit', 'memory', '16M', 'limit=2'], { log: true }, async (k) => {
      await assert.rejects(bounded(NbdClient.connect(k.uri, { connections: 4 }), 'connect'), (e: unknown) => e instanceof BlockError);
      const count = (re: RegExp) => [...readLog(k).matchAll(re)].length;
      // Every connection that did open is closed again, not only the first.
      await until(() => count(/ Connect /g) > 0 && count(/ Connect /g) === count(/ Disconnect /g), `every connection closed; log:\n${readLog(k)}`, undefined, 120);
    });
  });

  test('killed with requests in flight: every pending call rejects with ECONNRESET, later calls too, close() settles', TEST, async (t) => {
    await withKit(['--filter=delay', 'memory', '64M', 'delay-read=30', 'delay-write=30'], { log: true }, async (k) => {
      const c = await bounded(NbdClient.connect(k.uri), 'connect');
      const big = c.pread(Buffer.alloc(32 * MiB), 0);
      const writes = Array.from({ length: 8 }, (_, i) => c.pwrite(seededBytes(i, 4096), i * 4096));
      await until(() => /Read id=\d+ offset=0x0 count=0x2000000/.test(readLog(k)) && (readLog(k).match(/ Write id=/g) ?? []).length === 8, 'the requests reached nbdkit');
      k.child.proc.kill('SIGKILL');
      const errors: BlockError[] = [];
      for (const p of [big, ...writes]) {
        await bounded(
          assert.rejects(p, (e: unknown) => {
            assert.ok(e instanceof BlockError, String(e));
            assert.equal(e.code, 'ECONNRESET', e.message);
            errors.push(e);
            return true;
          }),
          'a pending call',
        );
      }
      t.diagnostic(`pending calls rejected with: ${errors[0]!.message}`);
      assert.match(errors[0]!.message, /server closed the connection|connection to the server failed/);
      await rejectsWith(c.pread(Buffer.alloc(512), 0), 'ECONNRESET');
      await bounded(c.close(), 'close after the loss');
    });
  });

  test('a refused connection is ECONNREFUSED naming where', TEST, async () => {
    const port = await freePort();
    await rejectsWith(bounded(NbdClient.connect(`nbd://127.0.0.1:${port}/`), 'connect'), 'ECONNREFUSED', /cannot connect to 127\.0\.0\.1:\d+/);
  });
});

// ---------------------------------------------------------------------------------------
// TLS against nbdkit

describe('TLS against nbdkit', () => {
  test('PSK: nbds://alice@ with tls-psk-file; a wrong key, an unknown user and clear text are refused', TEST, async (t) => {
    await withKit(['--tls=require', `--tls-psk=${creds.psk.server}`, 'memory', '16M'], { tcp: true }, async (k) => {
      const base = `nbds://alice@127.0.0.1:${k.port}/`;
      await withClient(`${base}?tls-psk-file=${encodeURIComponent(creds.psk.alice)}`, {}, async (c) => {
        report(t, 'nbdkit PSK', c);
        assert.ok(c.tls, 'TLS is on');
        await readWriteCycle(c, 8);
      });
      const failures: Record<string, string> = {};
      const refused = async (what: string, uri: string, code: BlockError['code']) => {
        await assert.rejects(bounded(NbdClient.connect(uri), what), (e: unknown) => {
          assert.ok(e instanceof BlockError, String(e));
          assert.equal(e.code, code, `${what}: ${e.message}`);
          failures[what] = e.message;
          return true;
        });
      };
      await refused('wrong key', `${base}?tls-psk-file=${encodeURIComponent(creds.psk.wrongAlice)}`, 'ECONNRESET');
      await refused('unknown user', `nbds://bob@127.0.0.1:${k.port}/?tls-psk-file=${encodeURIComponent(creds.psk.bob)}`, 'ECONNRESET');
      await refused('clear text', `nbd://127.0.0.1:${k.port}/`, 'EPERM');
      assert.match(failures['clear text']!, /NBD_REP_ERR_TLS_REQD.*nbds:\/\//);
      t.diagnostic(`PSK refusals: ${JSON.stringify(failures)}`);
    });
  });

  test('X.509: the server certificate is verified by default (CA, IP and host name); another CA or another name is refused', TEST, async (t) => {
    const ca = encodeURIComponent(creds.clients.caOnly);
    await withKit(['--tls=require', `--tls-certificates=${creds.serverDir}`, 'memory', '16M'], { tcp: true }, async (k) => {
      await withClient(`nbds://127.0.0.1:${k.port}/?tls-certificates=${ca}`, {}, async (c) => {
        report(t, 'nbdkit X.509', c);
        await readWriteCycle(c, 9);
      });
      await withClient(`nbds://localhost:${k.port}/?tls-certificates=${ca}`, {}, async (c) => assert.ok(c.tls));
      await rejectsWith(bounded(NbdClient.connect(`nbds://127.0.0.1:${k.port}/`), 'system CAs'), 'ECONNRESET', /TLS handshake failed/);
      await rejectsWith(
        bounded(NbdClient.connect(`nbds://127.0.0.1:${k.port}/?tls-certificates=${ca}&tls-hostname=other.example`), 'other name'),
        'ECONNRESET',
        /TLS handshake failed.*other\.example/,
      );
    });
    await withKit(['--tls=require', `--tls-certificates=${foreignServerDir}`, 'memory', '16M'], { tcp: true }, async (k) => {
      const e = await bounded(NbdClient.connect(`nbds://127.0.0.1:${k.port}/?tls-certificates=${ca}`).then(
        () => null,
        (err: unknown) => err,
      ), 'foreign CA');
      assert.ok(e instanceof BlockError, `a server certificate from another CA must be refused, got ${String(e)}`);
      assert.equal(e.code, 'ECONNRESET');
      assert.match(e.message, /TLS handshake failed: .*(certificate|signature)/i);
      t.diagnostic(`foreign CA refused: ${e.message}`);
      // With verification off explicitly, the same server is accepted.
      await withClient(`nbds://127.0.0.1:${k.port}/?tls-certificates=${ca}&tls-verify-peer=false`, {}, async (c) => assert.ok(c.tls));
    });
    // On a unix socket too (no host to check: the client checks for localhost).
    for (const [dir, ok] of [[creds.serverDir, true], [foreignServerDir, false]] as const) {
      await withKit(['--tls=require', `--tls-certificates=${dir}`, 'memory', '1M'], {}, async (k) => {
        const uri = `${k.uri.replace('nbd+unix:', 'nbds+unix:')}&tls-certificates=${ca}`;
        if (ok) await withClient(uri, {}, async (c) => assert.ok(c.tls));
        else await rejectsWith(bounded(NbdClient.connect(uri), 'foreign CA on a unix socket'), 'ECONNRESET', /TLS handshake failed/);
      });
    }
  });

  test('X.509 with --tls-verify-peer: alice\'s client certificate is accepted, none is refused', TEST, async (t) => {
    await withKit(['--tls=require', `--tls-certificates=${creds.serverDir}`, '--tls-verify-peer', 'memory', '16M'], { tcp: true }, async (k) => {
      await withClient(`nbds://127.0.0.1:${k.port}/?tls-certificates=${encodeURIComponent(creds.clients.alice)}`, {}, async (c) => {
        await c.pread(Buffer.alloc(4096), 0);
      });
      let e: unknown = null;
      let phase = 'connect';
      try {
        const c = await bounded(NbdClient.connect(`nbds://127.0.0.1:${k.port}/?tls-certificates=${encodeURIComponent(creds.clients.caOnly)}`), 'connect');
        // TLS 1.3: the server may refuse the missing certificate only after the client's side of the handshake is done.
        phase = 'first request';
        try {
          await bounded(c.pread(Buffer.alloc(512), 0), 'pread');
        } finally {
          await c.close().catch(() => undefined);
        }
      } catch (err) {
        e = err;
      }
      t.diagnostic(`no client certificate: refused at ${phase}`);
      assert.ok(e instanceof BlockError, `no client certificate must be refused, got ${String(e)}`);
      t.diagnostic(`no client certificate: ${e.code} ${e.message}`);
    });
  });
});

// ---------------------------------------------------------------------------------------
// qemu-nbd

describe('qemu-nbd (qcow2)', () => {
  test('block status over the whole export equals nbdinfo --map (base:allocation and qemu:allocation-depth); data equals qemu-img convert', TEST, async (t) => {
    const img = unique('disk.qcow2');
    const raw = unique('disk.raw');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 1M 1M', '-c', 'write -P 0xcd 40M 64k', '-c', 'write -z 8M 1M', '-c', 'write -P 0x11 63M 1M', img]);
    await runOk('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]);
    const sock = unique('qemu.sock');
    const child = children.start('qemu-nbd', ['-t', '-e', '8', '-A', '-f', 'qcow2', '-k', sock, img]);
    try {
      await until(() => fs.existsSync(sock), 'qemu-nbd socket', child);
      const uri = `nbd+unix:///?socket=${sock}`;
      await withClient(uri, { metaContexts: ['base:allocation', 'qemu:allocation-depth'], connections: 4 }, async (c) => {
        report(t, 'qemu-nbd qcow2', c);
        assert.equal(c.mode, 'structured', 'qemu 7.2 has no extended headers');
        assert.deepEqual([...c.contexts].sort(), ['base:allocation', 'qemu:allocation-depth']);
        t.diagnostic(`qemu-nbd CAN_MULTI_CONN: ${c.canMultiConn}; connections opened: ${c.connections}`);
        if (!c.canMultiConn) assert.equal(c.connections, 1, 'no CAN_MULTI_CONN: one connection');
        const map = await clientMap(c);
        t.diagnostic(`qemu-nbd base:allocation: ${JSON.stringify(map)}`);
        assert.deepEqual(map, await nbdinfoMap(uri), 'base:allocation equals nbdinfo --map');
        assert.deepEqual(
          map.filter((e) => e.flags === 0).map((e) => [e.offset, e.length]),
          [[MiB, MiB], [40 * MiB, 64 * 1024], [63 * MiB, MiB]],
          'the data written is data, the rest holes',
        );
        const depth = await clientMap(c, 'qemu:allocation-depth');
        t.diagnostic(`qemu-nbd qemu:allocation-depth: ${JSON.stringify(depth)}`);
        assert.deepEqual(depth, await nbdinfoMap(uri, 'qemu:allocation-depth'), 'qemu:allocation-depth equals nbdinfo --map');
        const all = await readAll(c);
        assertSameBytes(all, fs.readFileSync(raw), 'client read vs qemu-img convert -O raw');
        // DF on a range across data and hole: one chunk, same bytes.
        const df = Buffer.alloc(2 * MiB, 0xee);
        await c.pread(df, MiB + 512 * 1024, { df: true });
        assertSameBytes(df, all.subarray(MiB + 512 * 1024, 3 * MiB + 512 * 1024), 'DF read');
        // Writes through the client land in the image.
        const w = seededBytes(10, 256 * 1024 + 512);
        await c.pwrite(w, 5 * MiB - 512);
        await c.zero(MiB, 4096);
        await c.trim(63 * MiB, MiB);
        await c.flush();
        w.copy(all, 5 * MiB - 512);
        all.fill(0, MiB, MiB + 4096);
        const mapAfter = await clientMap(c);
        assert.ok(mapAfter.some((e) => e.flags === 0 && e.offset <= 5 * MiB && 5 * MiB < e.offset + e.length), 'written range is data');
      });
      await stop(child);
      await runOk('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]);
      const image = fs.readFileSync(raw);
      const w = seededBytes(10, 256 * 1024 + 512);
      assertSameBytes(image.subarray(5 * MiB - 512, 5 * MiB + 256 * 1024), w, 'the client write in the image');
      assert.ok(image.subarray(MiB, MiB + 4096).equals(Buffer.alloc(4096)), 'the zeroed range');
      assert.ok(image.subarray(MiB + 4096, 2 * MiB).equals(Buffer.alloc(MiB - 4096, 0xab)), 'the rest of the 0xab MiB');
    } finally {
      await stop(child);
    }
  });
});

// ---------------------------------------------------------------------------------------
// nbd-server (Debian's nbd 3.24, the reference implementation)

/** nbd-server -d serves one connection and exits: one server per connection. */
async function withNbdServer<T>(file: string, extra: string, fn: (uri: string, child: Child) => Promise<T>): Promise<T> {
  const sock = unique('nbd-server.sock');
  const cfg = unique('nbd-server.conf');
  fs.writeFileSync(cfg, `[generic]\nunixsock = ${sock}\nallowlist = true\n[disk]\nexportname = ${file}\n${extra}`);
  const child = children.start('nbd-server', ['-d', '-C', cfg]);
  try {
    await until(() => fs.existsSync(sock), 'nbd-server socket', child);
    return await fn(`nbd+unix:///disk?socket=${sock}`, child);
  } finally {
    await stop(child);
  }
}

describe('nbd-server', () => {
  test('simple replies, no block status; read/write/FUA/flush/zero/trim reach the file', TEST, async (t) => {
    const file = unique('nbd-server.img');
    const data = seededBytes(11, 16 * MiB);
    fs.writeFileSync(file, data);
    await withNbdServer(file, 'flush = true\nfua = true\ntrim = true\n', (uri) =>
      withClient(uri, {}, async (c) => {
        report(t, 'nbd-server', c);
        assert.equal(c.mode, 'simple', 'nbd-server 3.24: no structured replies');
        assert.deepEqual(c.contexts, []);
        assert.equal(c.canBlockStatus(), false);
        await rejectsWith(c.blockStatus(0, 4096), 'EOPNOTSUPP');
        assert.equal(c.size, 16 * MiB);
        assert.ok(c.canFlush && c.canFua && c.canTrim);
        assertSameBytes(await readAll(c), data, 'export = file');
        await readWriteCycle(c, 12);
        const w = seededBytes(13, 10 * MiB);
        await c.pwrite(w, 4 * MiB, { fua: true });
        await c.flush();
        const disk = fs.readFileSync(file);
        assertSameBytes(disk.subarray(4 * MiB, 4 * MiB + w.length), w, 'FUA write in the file');
        const back = Buffer.alloc(w.length);
        await c.pread(back, 4 * MiB);
        assertSameBytes(back, w, 'read back');
      }),
    );
  });

  test('list: the export is listed (sizes from NBD_OPT_INFO)', TEST, async (t) => {
    const file = unique('nbd-server-list.img');
    fs.writeFileSync(file, seededBytes(14, MiB));
    await withNbdServer(file, '', async (uri) => {
      const list = await bounded(NbdClient.list(uri), 'list');
      t.diagnostic(`nbd-server list: ${JSON.stringify(list)}`);
      assert.deepEqual(list.map((e) => e.name), ['disk']);
    });
  });

  test('an export name it does not have is refused with the server\'s reply', TEST, async (t) => {
    const file = unique('nbd-server-name.img');
    fs.writeFileSync(file, seededBytes(17, MiB));
    await withNbdServer(file, '', async (uri) => {
      const e = await bounded(NbdClient.connect(uri.replace('/disk?', '/nosuch?')).then(() => null, (err: unknown) => err), 'connect');
      assert.ok(e instanceof BlockError, String(e));
      t.diagnostic(`nbd-server, unknown export: ${e.code} ${e.message}`);
      assert.match(e.message, /NBD_OPT_GO/);
    });
  });
});

// ---------------------------------------------------------------------------------------
// blockgate

describe('blockgate serve', () => {
  test('extended headers; structured and simple when asked; data, map and 48 MiB transfers', TEST, async (t) => {
    const sock = unique('blockgate.sock');
    const child = children.blockgate(['serve', '--no-control', '--print-uri', '-U', sock, 'memory:64M']);
    try {
      const [uri] = await child.waitFor(/^nbd\+unix:\/\/\S+$/m);
      await withClient(uri, { connections: 2 }, async (c) => {
        report(t, 'blockgate', c);
        assert.equal(c.mode, 'extended');
        assert.deepEqual(c.contexts, ['base:allocation']);
        assert.equal(c.connections, 2);
        await readWriteCycle(c, 15);
        const big = seededBytes(16, 48 * MiB);
        await c.pwrite(big, 8 * MiB);
        const back = Buffer.alloc(big.length);
        await c.pread(back, 8 * MiB);
        assertSameBytes(back, big, '48 MiB');
        await c.trim(20 * MiB, 4 * MiB);
        const map = await clientMap(c);
        assert.deepEqual(map, await nbdinfoMap(uri), 'client map (extended) equals nbdinfo --map (structured)');
      });
      for (const [opts, mode] of [
        [{ extendedHeaders: false }, 'structured'],
        [{ extendedHeaders: false, structuredReplies: false }, 'simple'],
      ] as const) {
        await withClient(uri, opts, async (c) => {
          assert.equal(c.mode, mode);
          const b = Buffer.alloc(MiB);
          await c.pread(b, 8 * MiB);
          assertSameBytes(b, seededBytes(16, MiB), `${mode} read`);
          if (mode === 'structured') assert.deepEqual(await clientMap(c), await nbdinfoMap(uri));
        });
      }
    } finally {
      await stop(child);
    }
  });
});
