/**
 * Server-wide bounds, over real sockets: the connection limit (a client over it is closed
 * before the greeting, the others go on) and the in-flight byte budget the sessions
 * share (clients that keep sending WRITEs while the device holds them stop being read
 * once the server's total reaches it, and all finish once the device lets them go).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { MemoryDevice } from '../../src/backends/memory.js';
import { Export } from '../../src/export/index.js';
import { NBD_CMD } from '../../src/nbd/constants.js';
import { RawClient } from '../helpers/raw-client.js';
import { GatedDevice, capturingLogger, connect, expectOk, pattern, readData, serveExports, until, type DirectServer } from './helpers.js';

const DISK = 1 << 20;

/** A server with maxConnections 2 on a private unix socket, logging at info into `log`. */
async function limitedServer(log: ReturnType<typeof capturingLogger>): Promise<DirectServer> {
  const device = new MemoryDevice({ size: DISK });
  await device.write(pattern(DISK), 0, 0);
  return serveExports([new Export({ name: '', device })], { maxConnections: 2 }, log.logger);
}

async function expectRead(c: RawClient, cookie: bigint, offset: number, length: number): Promise<void> {
  c.request(0, NBD_CMD.NBD_CMD_READ, cookie, offset, length);
  assert.deepEqual(await readData(c, cookie, offset, length, 'simple'), pattern(DISK).subarray(offset, offset + length));
}

test('a client over maxConnections is closed before the greeting; the others keep serving', async () => {
  const log = capturingLogger('info');
  const srv = await limitedServer(log);
  const clients: RawClient[] = [];
  try {
    const a = await connect(srv.socket, 'simple');
    const b = await connect(srv.socket, 'simple');
    clients.push(a, b);
    const refused = await RawClient.connect(srv.socket);
    clients.push(refused);
    assert.equal(await refused.closedByServer(), true, 'the third client is closed');
    await assert.rejects(refused.read(1), /connection closed with 0 of 1 bytes/, 'and gets no greeting');
    const refusals = log.lines().filter((l) => l.msg === 'connection refused: too many connections');
    assert.equal(refusals.length, 1, 'one log line per refusal');
    assert.equal(refusals[0]!.level, 30, 'at info');
    assert.equal(refusals[0]!.peer, 'unix');

    await expectRead(a, 1n, 0, 4096);
    await expectRead(b, 2n, 8192, 4096);
    assert.equal(srv.server.sessionCount, 2);

    a.close();
    await until(() => srv.server.sessionCount === 1, 'the first session to close');
    const c = await connect(srv.socket, 'simple');
    clients.push(c);
    await expectRead(c, 3n, 4096, 512);
    await expectRead(b, 4n, 0, 512);
  } finally {
    for (const c of clients) c.close();
    await srv.close();
  }
});

test('sessions share the server in-flight budget: input pauses at it and resumes when bytes come back', async () => {
  const SIZE = 16 * 1024;
  const BUDGET = 4 * SIZE;
  const PER_CLIENT = 16;
  const dev = new GatedDevice(new MemoryDevice({ size: DISK }));
  // Per-session limits far above what is sent: only the server budget can stop the clients.
  const srv = await serveExports([new Export({ name: '', device: dev })], { maxServerInFlightBytes: BUDGET });
  let peak = 0;
  let holding = true;
  // Sampled on every write entering the device, just after the server counted it.
  dev.hold((op) => {
    peak = Math.max(peak, srv.server.inFlightBytes);
    return op === 'write' && holding;
  });
  const clients: RawClient[] = [];
  try {
    for (let i = 0; i < 2; i++) clients.push(await connect(srv.socket, 'simple'));
    // Both clients send all their WRITEs and read no reply yet.
    clients.forEach((c, i) => {
      for (let k = 0; k < PER_CLIENT; k++) {
        const off = (i * PER_CLIENT + k) * SIZE;
        c.request(0, NBD_CMD.NBD_CMD_WRITE, BigInt(i * 100 + k), off, SIZE, false, pattern(SIZE, i * 100 + k));
      }
    });
    await until(() => srv.server.inFlightBytes >= BUDGET, 'the budget to be spent');
    // Let any bytes already read be parsed; the count of turns bounds the wait.
    for (let t = 0; t < 50; t++) await nextTurn();
    // A session notices the budget is spent when its next request goes in flight, so
    // each may be one request over: budget + one request per connection.
    assert.ok(peak <= BUDGET + 2 * SIZE, `peak ${peak} within budget ${BUDGET} + one request per client`);
    assert.equal(srv.server.inFlightBytes, dev.waiting * SIZE, 'the counted bytes are the held writes');
    assert.ok(dev.waiting < 2 * PER_CLIENT, `input paused: ${dev.waiting} of ${2 * PER_CLIENT} writes held`);

    // One held write finishes at a time: each release below the budget wakes the paused sessions.
    for (let n = 0; n < 2 * PER_CLIENT && dev.waiting > 0; n++) {
      const held = dev.waiting;
      const entered = dev.calls.get('write') ?? 0;
      dev.release(1);
      // Either the total fell, or a woken session already sent the next write in.
      await until(
        () => srv.server.inFlightBytes < held * SIZE || (dev.calls.get('write') ?? 0) > entered,
        'the released write to finish',
      );
      assert.ok(peak <= BUDGET + 2 * SIZE, `peak ${peak} within budget + one request per client`);
    }
    holding = false;
    dev.release();
    for (const [i, c] of clients.entries()) for (let k = 0; k < PER_CLIENT; k++) await expectOk(c, BigInt(i * 100 + k));
    assert.equal(srv.server.inFlightBytes, 0);
    for (let i = 0; i < 2; i++) {
      const off = i * PER_CLIENT * SIZE;
      const buf = Buffer.alloc(SIZE);
      await dev.read(buf, off, 0);
      assert.deepEqual(buf, pattern(SIZE, i * 100));
    }
  } finally {
    for (const c of clients) c.close();
    await srv.close();
  }
});

test('a session paused on the server budget with nothing of its own in flight is woken when another releases', async () => {
  const SIZE = 16 * 1024;
  const BUDGET = 4 * SIZE;
  const A_END = 8 * SIZE;
  const dev = new GatedDevice(new MemoryDevice({ size: DISK }));
  const srv = await serveExports([new Export({ name: '', device: dev })], { maxServerInFlightBytes: BUDGET });
  // Only client A's writes (below A_END) wait: B's own requests finish at once, so B
  // can only be resumed by the budget waking it.
  let holding = true;
  dev.hold((op, offset) => op === 'write' && offset < A_END && holding);
  const clients: RawClient[] = [];
  try {
    const a = await connect(srv.socket, 'simple');
    const b = await connect(srv.socket, 'simple');
    clients.push(a, b);
    for (let k = 0; k < 4; k++) a.request(0, NBD_CMD.NBD_CMD_WRITE, BigInt(k), k * SIZE, SIZE, false, pattern(SIZE, k));
    await until(() => dev.waiting === 4, "A's writes to be held");
    assert.equal(srv.server.inFlightBytes, BUDGET, 'A spent the budget');
    for (let k = 0; k < 8; k++) b.request(0, NBD_CMD.NBD_CMD_WRITE, BigInt(100 + k), A_END + k * SIZE, SIZE, false, pattern(SIZE, 100 + k));
    // B gets one write in (it only sees the spent budget once that write is in flight), then stops.
    await expectOk(b, 100n);
    for (let t = 0; t < 50; t++) await nextTurn();
    assert.equal(dev.calls.get('write'), 5, 'B was paused after one write');
    assert.equal(srv.server.inFlightBytes, BUDGET);

    // One of A's writes finishing is the only event that can resume B.
    dev.release(1);
    for (let k = 1; k < 8; k++) await expectOk(b, BigInt(100 + k));
    holding = false;
    dev.release();
    for (let k = 0; k < 4; k++) await expectOk(a, BigInt(k));
    assert.equal(srv.server.inFlightBytes, 0);
  } finally {
    for (const c of clients) c.close();
    await srv.close();
  }
});
