/**
 * The `nbd` backend against an in-process NbdServer as the remote: data round trips,
 * capabilities that follow the remote, the three kinds of error (the remote's reply, a
 * remote FLUSH failure recorded as write-back, a lost connection retried), and what a
 * reconnection must not forget (acknowledged writes that were not yet durable).
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { BlockError } from '../../src/errors/index.js';
import { EXTENT, REQ, newStackContext, type BlockDevice } from '../../src/device/index.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import { ErrorFilter } from '../../src/filters/error.js';
import { Export, createStack } from '../../src/export/index.js';
import { flushExport } from '../../src/export/flush.js';
import { NbdServer } from '../../src/nbd/index.js';
import { NbdClient } from '../../src/nbd/client.js';
import { NbdDevice, nbdBackend, parseNbdSettings, type NbdDeviceEvent } from '../../src/nbd/nbd-backend.js';
import { serveRegistry } from '../../src/cli/registry.js';
import { GatedDevice, pattern, until } from './helpers.js';

const MiB = 1 << 20;
/** Bound of every wait on a promise in this file. */
const WAIT_MS = 10_000;

const dirs: string[] = [];
const servers = new Set<NbdServer>();
const devices = new Set<BlockDevice>();
after(async () => {
  for (const d of devices) await d.close().catch(() => undefined);
  for (const s of servers) await s.close(100).catch(() => undefined);
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

function socketPath(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-nbd-backend-'));
  dirs.push(dir);
  return path.join(dir, 'remote.sock');
}

/** A remote NBD server on `socket` serving `device` as export '' (readOnly if asked). */
async function remote(socket: string, device: BlockDevice, readOnly = false): Promise<NbdServer> {
  const server = new NbdServer({ exports: [new Export({ name: '', device, readOnly })] });
  await server.listen({ path: socket });
  servers.add(server);
  return server;
}

async function stop(server: NbdServer, graceMs = 50): Promise<void> {
  await server.close(graceMs);
  servers.delete(server);
}

function uriOf(socket: string): string {
  return `nbd+unix:///?socket=${encodeURIComponent(socket)}`;
}

async function open(socket: string, more: Record<string, unknown> = {}, onEvent?: (e: NbdDeviceEvent) => void) {
  const ctx = newStackContext();
  const s = parseNbdSettings({ type: 'nbd', uri: uriOf(socket), retryDelay: '20ms', retryDelayMax: '100ms', ...more });
  const dev = await NbdDevice.open({ ...s, errseq: ctx.errseq, ...(onEvent ? { onEvent } : {}) });
  devices.add(dev);
  return { dev, ctx };
}

/** Rejects if `p` takes longer than WAIT_MS. */
async function bounded<T>(p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), WAIT_MS);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function rejects(p: Promise<unknown>, code: string, message?: RegExp): Promise<BlockError> {
  const e = await bounded(
    p.then(
      () => assert.fail(`expected ${code}`),
      (err: unknown) => err,
    ),
    `a request expected to fail with ${code}`,
  );
  assert.ok(e instanceof BlockError, `not a BlockError: ${String(e)}`);
  assert.equal(e.code, code, e.message);
  if (message) assert.match(e.message, message);
  return e;
}

test('data round trips through the device; size, capabilities, block size and description follow the remote', async () => {
  const socket = socketPath();
  const mem = new MemoryDevice({ size: 4 * MiB });
  await remote(socket, mem);
  const ctx = newStackContext();
  const dev = await createStack({ backend: { type: 'nbd', uri: uriOf(socket) } }, ctx, serveRegistry);
  devices.add(dev);
  assert.ok(dev instanceof NbdDevice);
  assert.equal(dev.size, 4 * MiB);
  assert.equal(dev.nonBlocking, false, 'it waits for the network');
  assert.match(dev.description, /^nbd nbd\+unix:\/\/\/\?socket=/);
  assert.deepEqual(dev.capabilities, {
    write: true,
    flush: true,
    fua: true,
    trim: true,
    zero: true,
    fastZero: true,
    extents: true,
    cache: true,
    multiConn: true,
  });
  assert.equal(dev.blockSize.minimum, 1);
  assert.ok(dev.blockSize.maximum >= dev.blockSize.preferred);

  const data = pattern(256 * 1024, 3);
  await dev.write(data, 65536, 0);
  await dev.write(pattern(4096, 9), 1 * MiB, REQ.FUA);
  const back = Buffer.alloc(data.length);
  await dev.read(back, 65536, 0);
  assert.deepEqual(back, data);
  // What the remote holds is what was written.
  const direct = Buffer.alloc(4096);
  await mem.read(direct, 1 * MiB, 0);
  assert.deepEqual(direct, pattern(4096, 9));

  await dev.zero(65536, 65536, 0);
  await dev.read(back.subarray(0, 65536), 65536, 0);
  assert.ok(back.subarray(0, 65536).every((b) => b === 0));
  const ext = await dev.extents(0, 4 * MiB, 0);
  assert.equal(ext[0]!.offset, 0);
  assert.equal(ext[0]!.flags, EXTENT.HOLE | EXTENT.ZERO);
  assert.ok(ext.some((e) => e.flags === 0 && e.offset === 131072), JSON.stringify(ext));
  const one = await dev.extents(0, 0, REQ.REQ_ONE);
  assert.equal(one.length, 1);
  await dev.trim(2 * MiB, 65536, 0);
  await dev.cache(0, 65536, 0);
  assert.equal(dev.unflushedWrites, 2);
  await dev.flush(0);
  assert.equal(dev.unflushedWrites, 0);
  assert.equal(ctx.errseq.peek(), 0);
  await dev.close();
  await rejects(dev.read(Buffer.alloc(1), 0, 0), 'EBADF');
});

test('a read-only remote gives a read-only device: write, trim and zero fail EPERM locally; readonly: true does the same', async () => {
  const socket = socketPath();
  const mem = new MemoryDevice({ size: MiB });
  await mem.write(pattern(512, 5), 0, 0);
  await remote(socket, mem, true);
  const { dev } = await open(socket);
  assert.equal(dev.capabilities.write, false);
  assert.equal(dev.capabilities.trim, false);
  assert.equal(dev.capabilities.zero, false);
  assert.equal(dev.capabilities.fua, false);
  await rejects(dev.write(Buffer.alloc(512), 0, 0), 'EPERM', /read-only/);
  await rejects(dev.zero(0, 512, 0), 'EPERM');
  await rejects(dev.trim(0, 512, 0), 'EPERM');
  const b = Buffer.alloc(512);
  await dev.read(b, 0, 0);
  assert.deepEqual(b, pattern(512, 5));

  const socket2 = socketPath();
  await remote(socket2, new MemoryDevice({ size: MiB }));
  const { dev: ro } = await open(socket2, { readonly: true });
  assert.equal(ro.capabilities.write, false);
  assert.match(ro.description, /\(read-only\)$/);
  await rejects(ro.write(Buffer.alloc(1), 0, 0), 'EPERM');
});

test('settings are validated and the bad key is named', async () => {
  const bad = (desc: Record<string, unknown>, re: RegExp) =>
    assert.throws(() => parseNbdSettings({ type: 'nbd', ...desc }), (e: unknown) => e instanceof BlockError && e.code === 'EINVAL' && re.test(e.message));
  bad({}, /^nbd: uri: required setting is missing/);
  bad({ uri: 'http://example.com/' }, /^nbd: uri: /);
  bad({ uri: 'nbd://h/', retrys: 2 }, /^nbd: retrys: unknown setting \(known: type, uri, connections, retries, retryDelay, retryDelayMax, readonly\)/);
  bad({ uri: 'nbd://h/', retries: -1 }, /^nbd: retries: expected a whole number from 0 to 1000/);
  bad({ uri: 'nbd://h/', retryDelay: 'soon' }, /^nbd: retryDelay: invalid duration 'soon'/);
  bad({ uri: 'nbd://h/', connections: 0 }, /^nbd: connections: /);
  bad({ uri: 'nbd://h/', retryDelay: 10, retryDelayMax: 5 }, /^nbd: retryDelayMax: must not be shorter than retryDelay/);
  const d = parseNbdSettings({ type: 'nbd', uri: 'nbd://h/x' });
  assert.equal(d.retries, 5);
  assert.equal(d.retryDelayMs, 1000);
  assert.equal(d.retryDelayMaxMs, 60_000);
  assert.equal(d.connections, 1);
  assert.equal(parseNbdSettings({ type: 'nbd', uri: 'nbd://h/', retryDelay: 0.25, retryDelayMax: '2m' }).retryDelayMaxMs, 120_000);
  // A remote that is not there fails at build time, naming it.
  // (The client reports a failed connect() as ECONNRESET "connection failed: connect ENOENT ...".)
  await assert.rejects(
    createStack({ backend: { type: 'nbd', uri: uriOf(path.join(socketPath(), 'none')) } }, newStackContext(), serveRegistry),
    (e: unknown) => e instanceof BlockError && /^cannot open nbd\+unix:.*ENOENT/.test(e.message),
  );
});

test("the remote's error reply is the request's own error and is not recorded", async () => {
  const socket = socketPath();
  await remote(socket, new ErrorFilter(new MemoryDevice({ size: MiB }), { ops: ['read'], error: 'EIO', count: 1 }));
  const { dev, ctx } = await open(socket);
  const e = await rejects(dev.read(Buffer.alloc(512), 0, 0), 'EIO');
  assert.equal(e.writeback, false);
  assert.equal(ctx.errseq.peek(), 0);
  await dev.read(Buffer.alloc(512), 0, 0);
  assert.equal(dev.connected, true);
});

test("a FLUSH failing on the remote is a write-back error: recorded in the local export's errseq, every local session sees it once", async () => {
  const socket = socketPath();
  await remote(socket, new ErrorFilter(new MemoryDevice({ size: MiB }), { ops: ['flush'], error: 'EIO', count: 1 }));
  const ctx = newStackContext();
  const dev = await createStack({ backend: { type: 'nbd', uri: uriOf(socket) } }, ctx, serveRegistry);
  const local = new NbdServer({ exports: [new Export({ name: '', device: dev })] });
  servers.add(local);
  devices.add(dev);
  const localSocket = socketPath();
  await local.listen({ path: localSocket });
  const a = await NbdClient.connect(uriOf(localSocket));
  const b = await NbdClient.connect(uriOf(localSocket));
  try {
    await a.pwrite(pattern(4096), 0);
    await rejects(a.flush(), 'EIO', /FLUSH failed on nbd\+unix/);
    assert.equal(ctx.errseq.peekError(), 5, 'EIO recorded in the export errseq');
    await rejects(b.flush(), 'EIO', /write-back error/);
    await a.flush();
    await b.flush();
    // A fresh connection flushes fine once the remote stops failing.
    const direct = await NbdDevice.open({ uri: uriOf(socket) });
    devices.add(direct);
    await direct.flush(0);
  } finally {
    await a.close();
    await b.close();
  }
  const socket2 = socketPath();
  await remote(socket2, new ErrorFilter(new MemoryDevice({ size: MiB }), { ops: ['flush'], error: 'ENOSPC', count: 1 }));
  const { dev: d2 } = await open(socket2);
  const e = await rejects(d2.flush(0), 'ENOSPC');
  assert.equal(e.writeback, true);
});

test('a lost connection: an in-flight read is sent again on a new connection to a restarted server and succeeds', async () => {
  const socket = socketPath();
  const mem = new MemoryDevice({ size: MiB });
  await mem.write(pattern(8192, 7), 0, 0);
  const gated = new GatedDevice(mem);
  const first = await remote(socket, gated);
  const events: NbdDeviceEvent[] = [];
  const { dev, ctx } = await open(socket, {}, (e) => events.push(e));
  gated.hold((op) => op === 'read');
  const buf = Buffer.alloc(8192);
  const reading = dev.read(buf, 0, 0);
  await until(() => gated.waiting === 1, 'the read to reach the remote device');
  // Shutdown with a 20 ms grace: the session is cut while the read is inside the device.
  await stop(first, 20);
  gated.hold(() => false);
  await remote(socket, gated);
  await bounded(reading, 'the retried read');
  assert.deepEqual(buf, pattern(8192, 7));
  gated.release();
  assert.deepEqual(
    events.map((e) => e.kind).filter((k) => k !== 'attempt-failed'),
    ['lost', 'reconnected'],
  );
  assert.equal(ctx.errseq.peek(), 0, 'nothing was at risk: nothing recorded');
});

test('acknowledged but unflushed writes before a loss: EIO recorded, reported at the next FLUSH of every session; FUA writes are not at risk', async () => {
  const socket = socketPath();
  const mem = new MemoryDevice({ size: MiB });
  let server = await remote(socket, mem);
  const ctx = newStackContext();
  const dev = await createStack({ backend: { type: 'nbd', uri: uriOf(socket), retryDelay: '20ms' } }, ctx, serveRegistry);
  devices.add(dev);
  const exp = new Export({ name: '', device: dev });
  const s1 = ctx.errseq.sample();
  const s2 = ctx.errseq.sample();

  // FUA only: nothing at risk.
  await dev.write(pattern(4096, 1), 0, REQ.FUA);
  await stop(server);
  server = await remote(socket, mem);
  let r = await bounded(flushExport(exp, dev, s1), 'flush after a FUA write and a loss');
  assert.equal(r.error, null);
  assert.equal(ctx.errseq.peek(), 0);

  // An acknowledged write without FUA, then the loss.
  await dev.write(pattern(4096, 2), 8192, 0);
  assert.equal((dev as NbdDevice).unflushedWrites, 1);
  await stop(server);
  server = await remote(socket, mem);
  r = await bounded(flushExport(exp, dev, r.cursor), 'flush after an unflushed write and a loss');
  assert.equal(r.error?.code, 'EIO');
  assert.match((dev as NbdDevice).lastWritebackLoss ?? '', /1 write\(s\) acknowledged .* had not been flushed and may have been lost/);
  const other = await flushExport(exp, dev, s2);
  assert.equal(other.error?.code, 'EIO', 'the other session hears it too');
  assert.equal((await flushExport(exp, dev, r.cursor)).error, null, 'once');
  assert.equal((await flushExport(exp, dev, other.cursor)).error, null, 'once');
});

test('retries: 0 fails the requests at once with EIO naming the cause, and stays down', async () => {
  const socket = socketPath();
  const mem = new MemoryDevice({ size: MiB });
  const server = await remote(socket, mem);
  const { dev, ctx } = await open(socket, { retries: 0 });
  await dev.read(Buffer.alloc(512), 0, 0);
  await dev.write(Buffer.alloc(512, 1), 0, 0);
  await stop(server);
  await remote(socket, mem);
  const started = Date.now();
  await rejects(dev.read(Buffer.alloc(512), 0, 0), 'EIO', /connection to nbd\+unix.* was lost \((?:connection to the server failed|the server closed the connection).*\); not retried \(retries: 0\)/);
  assert.ok(Date.now() - started < 1000, 'at once');
  await rejects(dev.read(Buffer.alloc(512), 0, 0), 'EIO', /retries: 0/);
  assert.equal(ctx.errseq.peekError(), 5, 'the unflushed write is at risk and recorded at the loss');
});

test('retries exhausted: EIO naming the remote, the cause and the last attempt; the device recovers when the remote is back', async () => {
  const socket = socketPath();
  const mem = new MemoryDevice({ size: MiB });
  const server = await remote(socket, mem);
  const events: NbdDeviceEvent[] = [];
  const { dev } = await open(socket, { retries: 2, retryDelay: '10ms', retryDelayMax: '20ms' }, (e) => events.push(e));
  await stop(server);
  const e = await rejects(dev.read(Buffer.alloc(512), 0, 0), 'EIO', /lost \(.*\) and 2 reconnection attempts failed \(last: .*remote\.sock/);
  assert.match(e.message, /nbd\+unix/);
  assert.deepEqual(
    events.map((x) => x.kind),
    ['lost', 'attempt-failed', 'attempt-failed', 'gave-up'],
  );
  await remote(socket, mem);
  await bounded(dev.read(Buffer.alloc(512), 0, 0), 'a read once the remote is back');
});

test('a request sent while the remote shuts down (ESHUTDOWN) is retried; a write acknowledged on the replaced connection is recorded', async () => {
  const socket = socketPath();
  const mem = new MemoryDevice({ size: MiB });
  const gated = new GatedDevice(mem);
  const first = await remote(socket, gated);
  const { dev, ctx } = await open(socket);
  gated.hold((op) => op === 'write');
  const writing = dev.write(pattern(4096, 4), 0, 0);
  await until(() => gated.waiting === 1, 'the write to reach the remote device');
  const closing = first.close(WAIT_MS);
  // The old session finishes the write in hand but answers new requests with ESHUTDOWN.
  const reading = dev.read(Buffer.alloc(512), 65536, 0);
  await delay(30);
  gated.hold(() => false);
  await remote(socket, gated);
  await bounded(reading, 'the read retried after ESHUTDOWN');
  gated.release();
  await bounded(writing, 'the write finishing on the old connection');
  await bounded(closing, 'the old server closing');
  servers.delete(first);
  assert.equal(ctx.errseq.peekError(), 5, 'acknowledged on a connection no FLUSH will cover');
});

test('close() while reconnecting fails the waiting requests with EBADF at once', async () => {
  const socket = socketPath();
  const server = await remote(socket, new MemoryDevice({ size: MiB }));
  const { dev } = await open(socket, { retryDelay: 5, retryDelayMax: 5, retries: 3 });
  await stop(server);
  const reading = dev.read(Buffer.alloc(512), 0, 0);
  await delay(20);
  const started = Date.now();
  await dev.close();
  await rejects(reading, 'EBADF');
  assert.ok(Date.now() - started < 1000);
});

test('nbdBackend uses the stack context errseq', async () => {
  const socket = socketPath();
  await remote(socket, new MemoryDevice({ size: MiB }));
  const ctx = newStackContext();
  const dev = await nbdBackend({ type: 'nbd', uri: uriOf(socket) }, ctx);
  devices.add(dev);
  assert.equal(dev.size, MiB);
});

test('a remote that comes back different (another size, or read-only) is not reconnected to', async () => {
  const socket = socketPath();
  let server = await remote(socket, new MemoryDevice({ size: MiB }));
  const events: NbdDeviceEvent[] = [];
  const { dev } = await open(socket, { retries: 2, retryDelay: '10ms', retryDelayMax: '10ms' }, (e) => events.push(e));
  await stop(server);
  server = await remote(socket, new MemoryDevice({ size: 2 * MiB }));
  await rejects(dev.read(Buffer.alloc(512), 0, 0), 'EIO', /changed size from 1048576 to 2097152 bytes/);
  await stop(server);
  server = await remote(socket, new MemoryDevice({ size: MiB }), true);
  await rejects(dev.read(Buffer.alloc(512), 0, 0), 'EIO', /no longer offers what it did .*now read-only/);
  await stop(server);
  await remote(socket, new MemoryDevice({ size: MiB }));
  await bounded(dev.read(Buffer.alloc(512), 0, 0), 'a read from a remote like the first');
  assert.ok(events.some((e) => e.kind === 'reconnected'));
});
