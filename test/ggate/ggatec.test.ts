/**
 * The ggatec forwarder against an in-process GgatedServer (127.0.0.1, port 0) and an
 * in-process control server with its GateService (the control fixture): requests
 * submitted on the gate's device side (or through its NBD export) travel START ->
 * ggate wire -> ggated -> device, and back.
 *
 * Covered: READ/WRITE/FLUSH forwarded with the data checked on the ggated side; DELETE
 * answered EOPNOTSUPP locally; handshake refusals (EPERM for an RO export asked rw,
 * ECONNREFUSED); remote errors arriving as DONE errors in FreeBSD numbering; the
 * reconnection (W8) after the connections are cut with requests in flight and after
 * ggated is restarted on its port: fresh tokens, CANCEL (seq 0), resent in order, FLUSH
 * completing after the writes before it, nothing failed and nothing recorded in any
 * ErrSeq (W9); a reply that does not echo its request handled as a lost connection and
 * a stray reply skipped; stopping with requests in flight and rescuing them; the gate
 * destroyed while disconnected.
 */
import { after, afterEach, beforeEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { BlockError } from '../../src/errors/index.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import type { GateDevice } from '../../src/gate/index.js';
import {
  GGATE_CMD,
  GGATE_FLAG,
  GGATE_SIZE,
  decodeCinit,
  decodeHdr,
  encodeHdr,
  encodeSinit,
  encodeVersion,
  parseExports,
  replyTo,
  resolveExports,
  type GgateHdr,
} from '../../src/ggate/index.js';
import { GgatedServer, type GgateStackSource } from '../../src/ggate/ggated.js';
import type { ControlClient } from '../../src/gate/control/client.js';
import {
  GGATEC,
  cinitFlags,
  connectGgatec,
  serveGgatec,
  type GgatecEvent,
  type GgatecLink,
  type GgatecOptions,
  type GgatecResult,
  type GgatecTarget,
} from '../../src/ggate/ggatec.js';
import { gateGeometry } from '../../src/cli/ggatec.js';
import { NBD_CMD } from '../../src/nbd/constants.js';
import { RecordingDevice } from '../filters/recording.js';
import { ByteSocket } from '../helpers/byte-socket.js';
import { seededBytes } from '../helpers/data.js';
import { rejectsWith } from '../helpers/assertions.js';
import { startControl, type ControlFixture } from '../gate/control/fixture.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** Bound of every wait on socket-driven state. */
const WAIT_MS = 10_000;
/** Bound of a whole test: a request that never completes fails the test instead of hanging it. */
const TEST = { timeout: 60_000 };
/** Reconnection interval in these tests (the real one is 2 s). */
const FAST_RETRY_MS = 20;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-ggatec-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** Waits until `cond` holds (state driven by socket events), failing after WAIT_MS. */
async function waitFor(cond: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

let fx: ControlFixture;
let client: ControlClient;
/** Closed after each test, in reverse order. */
let cleanups: (() => Promise<void> | void)[] = [];

beforeEach(async () => {
  fx = await startControl();
  client = await fx.connect();
  cleanups = [];
});

afterEach(async () => {
  for (const c of cleanups.reverse()) await Promise.resolve(c()).catch(() => undefined);
  await fx.close();
});

/** A GgatedServer on 127.0.0.1 (port 0 unless given) exporting `paths` RW to 127.0.0.1. */
async function ggated(stacks: Record<string, GgateStackSource>, opts: { port?: number; exportsText?: string } = {}): Promise<{ server: GgatedServer; port: number }> {
  const text = opts.exportsText ?? Object.keys(stacks).map((p) => `127.0.0.1 RW ${p}\n`).join('');
  const server = new GgatedServer({ exports: await resolveExports(parseExports(text), async () => '127.0.0.1'), stacks });
  const addr = await server.listen({ host: '127.0.0.1', port: opts.port ?? 0 });
  cleanups.push(() => server.close(0));
  return { server, port: addr.port };
}

/** A TCP relay whose connections the test can cut (a network failure without touching the server). */
class Relay {
  readonly #server: net.Server;
  readonly #sockets = new Set<net.Socket>();
  port = 0;

  private constructor(target: number) {
    this.#server = net.createServer((inbound) => {
      const outbound = net.connect({ host: '127.0.0.1', port: target });
      for (const s of [inbound, outbound]) {
        this.#sockets.add(s);
        s.on('error', () => undefined);
        s.on('close', () => {
          this.#sockets.delete(s);
          inbound.destroy();
          outbound.destroy();
        });
      }
      inbound.pipe(outbound);
      outbound.pipe(inbound);
    });
  }

  static async start(target: number): Promise<Relay> {
    const r = new Relay(target);
    await new Promise<void>((resolve) => r.#server.listen({ host: '127.0.0.1', port: 0 }, resolve));
    r.port = (r.#server.address() as net.AddressInfo).port;
    cleanups.push(() => r.close());
    return r;
  }

  /** Destroys every relayed connection (both directions, both ends). */
  cut(): void {
    for (const s of this.#sockets) s.destroy();
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}

interface Forwarder {
  readonly unit: number;
  readonly link: GgatecLink;
  readonly dev: GateDevice;
  readonly events: GgatecEvent[];
  readonly done: Promise<GgatecResult>;
  readonly stop: AbortController;
  /** Tokens of every connection that was made, in order. */
  tokens(): number[];
}

/** Connects, creates a gate with the server's geometry, serves it; the gate's device side is opened. */
async function forwarder(target: GgatecTarget, opts: Partial<GgatecOptions> & { flags?: number } = {}): Promise<Forwarder> {
  const link = await connectGgatec(target);
  const unit = await client.create({ mediasize: link.mediasize, sectorsize: link.sectorsize, flags: opts.flags ?? 0, info: `${target.host}:${target.port} ${target.path}` });
  const events: GgatecEvent[] = [];
  const stop = new AbortController();
  const done = serveGgatec(client, unit, {
    target,
    link,
    geometry: { mediasize: link.mediasize, sectorsize: link.sectorsize },
    gateName: `ggate${unit}`,
    reconnectIntervalMs: FAST_RETRY_MS,
    signal: stop.signal,
    onEvent: (e) => events.push(e),
    ...opts,
  });
  done.catch(() => undefined);
  const dev = fx.registry.open(unit);
  cleanups.push(async () => {
    await dev.close();
    await fx.registry.destroy({ version: 3, unit, force: true }).catch(() => undefined);
    await done.catch(() => undefined);
  });
  return {
    unit,
    link,
    dev,
    events,
    done,
    stop,
    tokens: () => [link.token, ...events.flatMap((e) => (e.type === 'connected' ? [e.token] : []))],
  };
}

const target = (port: number, p: string, access: GgatecTarget['access'] = 'rw'): GgatecTarget => ({ host: '127.0.0.1', port, path: p, access });

async function readGate(dev: GateDevice, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await dev.read(b, offset, 0);
  return b;
}

async function readDevice(d: RecordingDevice | MemoryDevice, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await d.read(b, offset, 0);
  return b;
}

/** Offsets of the calls of the recording device from index `from` on, as 'w<offset>' / 'flush'. */
function callLog(rec: RecordingDevice, from: number): string[] {
  return rec.calls.slice(from).map((c) => (c.op === 'flush' ? 'flush' : `${c.op[0]}${c.offset}`));
}

describe('ggatec: forwarding', () => {
  test('READ, WRITE and FLUSH reach the ggated device with the data intact; DELETE is answered EOPNOTSUPP here', TEST, async () => {
    const rec = new RecordingDevice(new MemoryDevice({ size: 4 * MiB }));
    const { server, port } = await ggated({ '/dev/rec': { device: rec } });
    const f = await forwarder(target(port, '/dev/rec'));
    assert.equal(f.link.mediasize, 4 * MiB);
    assert.equal(f.link.sectorsize, 512);
    const [c] = server.clients();
    assert.equal(c?.token, f.link.token, 'the server paired our two connections by our token');
    assert.equal(c?.access, 'rw');

    const a = seededBytes(1, 64 * KiB);
    const b = seededBytes(2, MiB);
    await Promise.all([f.dev.write(a, 0, 0), f.dev.write(b, 2 * MiB, 0)]);
    assert.deepEqual(await readDevice(rec, 0, a.length), a, 'the write landed on the ggated device');
    assert.deepEqual(await readDevice(rec, 2 * MiB, b.length), b);
    assert.deepEqual(await readGate(f.dev, 2 * MiB, b.length), b, 'and reads back through the gate');
    assert.deepEqual(await readGate(f.dev, 64 * KiB, 4096), Buffer.alloc(4096));

    const flushes = rec.of('flush').length;
    await f.dev.flush(0);
    assert.equal(rec.of('flush').length, flushes + 1, 'FLUSH went over the wire');

    await rejectsWith(f.dev.trim(0, 4096, 0), 'EOPNOTSUPP');
    assert.equal(rec.of('trim').length, 0, 'DELETE never reached the server');
    assert.deepEqual(await readDevice(rec, 0, 4096), a.subarray(0, 4096));
    const local = f.events.find((e) => e.type === 'request' && e.cmd === 'delete');
    assert.ok(local && local.type === 'request' && !local.remote && local.error === 'EOPNOTSUPP');

    await f.dev.close();
    await fx.registry.destroy({ version: 3, unit: f.unit, force: false });
    const r = await f.done;
    assert.equal(r.failed, 1);
    assert.equal(r.disconnects, 0);
    assert.equal(r.served, 6, 'two writes, two reads, a flush, a delete');
    await waitFor(() => server.sessionCount === 0, 'the server to see the client leave');
  });

  test('a read-only gate over an RO export reads; asking rw of that export is refused EPERM at the handshake', TEST, async () => {
    const mem = new MemoryDevice({ size: MiB });
    await mem.write(Buffer.alloc(4096, 0x5a), 8192, 0);
    const { port } = await ggated({ '/dev/ro': { device: mem } }, { exportsText: '127.0.0.1 RO /dev/ro\n' });
    await rejectsWith(connectGgatec(target(port, '/dev/ro', 'rw')), 'EPERM', /refused/);
    await rejectsWith(connectGgatec(target(port, '/dev/other', 'ro')), 'EPERM');
    const f = await forwarder(target(port, '/dev/ro', 'ro'), { flags: 1 });
    assert.deepEqual(await readGate(f.dev, 8192, 4096), Buffer.alloc(4096, 0x5a));
    await rejectsWith(f.dev.write(Buffer.alloc(512), 0, 0), 'EPERM');
  });

  test('no server: the connection fails with the socket error (ECONNREFUSED)', TEST, async () => {
    const s = net.createServer();
    await new Promise<void>((r) => s.listen({ host: '127.0.0.1', port: 0 }, r));
    const port = (s.address() as net.AddressInfo).port;
    await new Promise<void>((r) => s.close(() => r()));
    await rejectsWith(connectGgatec(target(port, '/x')), 'ECONNREFUSED');
  });

  test('errors of the remote device come back as the requests’ errors, numbered the FreeBSD way on the wire', TEST, async () => {
    const trigger = path.join(tmp, 'fail-flush');
    const { server, port } = await ggated({
      '/dev/err': {
        backend: { type: 'memory', size: '1M' },
        filters: [
          { type: 'error', ops: ['write'], error: 'EDQUOT', offset: 0, length: 4096 },
          { type: 'error', ops: ['read'], error: 'EOPNOTSUPP', offset: 65536, length: 4096 },
          { type: 'error', ops: ['flush'], error: 'EIO', file: trigger },
        ],
      },
    });
    const f = await forwarder(target(port, '/dev/err'));
    // EDQUOT is 69 in FreeBSD and 122 in Linux; EOPNOTSUPP 45 and 95: the codes survive
    // only if both ends number them FreeBSD's way.
    await rejectsWith(f.dev.write(Buffer.alloc(4096, 1), 0, 0), 'EDQUOT');
    await rejectsWith(readGate(f.dev, 65536, 4096), 'EOPNOTSUPP');
    await f.dev.write(Buffer.alloc(4096, 2), 4096, 0);
    assert.deepEqual(await readGate(f.dev, 4096, 4096), Buffer.alloc(4096, 2));
    await f.dev.flush(0);
    fs.writeFileSync(trigger, '');
    await rejectsWith(f.dev.flush(0), 'EIO');
    fs.rmSync(trigger);
    await f.dev.flush(0);
    assert.equal(f.events.filter((e) => e.type === 'disconnected').length, 0, 'errors are not transport events');
    // The ggated export recorded its own flush failure: a device error, not a transport one.
    assert.equal(server.errseq('/dev/err').describe().errorName, 'EIO');
  });
});

describe('ggatec: reconnecting (W8, W9)', () => {
  test('connections cut with writes and a flush in flight: fresh token, CANCEL, resent in order, flush after the writes before it, nothing failed', TEST, async () => {
    const rec = new RecordingDevice(new MemoryDevice({ size: 4 * MiB }));
    const { server, port } = await ggated({ '/dev/rec': { device: rec } });
    const relay = await Relay.start(port);
    const f = await forwarder(target(relay.port, '/dev/rec'));
    const firstToken = f.link.token;

    const BS = 64 * KiB;
    const data = (i: number): Buffer => seededBytes(100 + i, BS);
    rec.hold();
    const start = rec.calls.length;
    // Gate order: w0 w1 w2 FLUSH w3 w4, and w5 rewriting block 0 after the flush.
    const plan = ['w0', 'w1', 'w2', 'flush', 'w3', 'w4', 'w5'] as const;
    const completed: string[] = [];
    const requests = plan.map((p) => {
      const op = p === 'flush' ? f.dev.flush(0) : f.dev.write(data(Number(p[1])), (Number(p[1]) % 5) * BS, 0);
      return op.then(() => void completed.push(p));
    });
    // w0 is on the device (held), the rest wait in the server's queue.
    await waitFor(() => rec.heldCount === 1 && server.clients()[0]?.queued === plan.length, 'every request at the server');
    assert.deepEqual(callLog(rec, start), ['w0']);

    relay.cut();
    await waitFor(() => f.events.some((e) => e.type === 'requeued'), 'the reconnection');
    const lost = f.events.find((e) => e.type === 'disconnected');
    assert.ok(lost && lost.type === 'disconnected');
    assert.equal(lost.inFlight, plan.length, 'all seven were in flight; none failed');
    // The new session has the same requests, resent from the start; the old session's
    // w0 is still on the device.
    await waitFor(() => rec.heldCount === 2, 'the resent w0 at the device');
    const resentFrom = rec.calls.length - 1;
    rec.release();
    await Promise.all(requests);

    assert.deepEqual(completed, [...plan], 'completions in gate order: the flush after w0-w2');
    assert.deepEqual(callLog(rec, resentFrom), ['w0', 'w65536', 'w131072', 'flush', 'w196608', 'w262144', 'w0'], 'resent in order on one stream');
    for (let i = 1; i <= 4; i++) assert.deepEqual(await readDevice(rec, i * BS, BS), data(i), `block ${i}`);
    assert.deepEqual(await readDevice(rec, 0, BS), data(5), 'block 0 holds the later write');
    assert.deepEqual(await readGate(f.dev, BS, BS), data(1));

    const tokens = f.tokens();
    assert.equal(tokens[0], firstToken);
    assert.equal(tokens.length, 2);
    assert.notEqual(tokens[1], tokens[0], 'a fresh token for the new connection');
    assert.equal(server.clients()[0]?.token, tokens[1]);
    // W9: nothing was recorded on either side.
    assert.equal(server.errseq('/dev/rec').describe().value, 0);
    assert.equal(f.events.filter((e) => e.type === 'request' && e.error !== 0).length, 0);
  });

  test('ggated restarted on its port while NBD writes are in flight: the NBD client sees no error, the data verifies, no ErrSeq records anything', TEST, async () => {
    const rec = new RecordingDevice(new MemoryDevice({ size: 4 * MiB }));
    const first = await ggated({ '/dev/disk': { device: rec } });
    const f = await forwarder(target(first.port, '/dev/disk'));
    const nbd = await fx.nbdClient(`ggate${f.unit}`);

    const BS = 32 * KiB;
    const N = 16;
    const data = (i: number): Buffer => seededBytes(500 + i, BS);
    rec.hold();
    for (let i = 0; i < N; i++) nbd.request(0, NBD_CMD.NBD_CMD_WRITE, BigInt(i + 1), i * BS, BS, false, data(i));
    nbd.request(0, NBD_CMD.NBD_CMD_FLUSH, 1000n, 0, 0);
    await waitFor(() => rec.heldCount === 1 && (first.server.clients()[0]?.queued ?? 0) >= 2, 'writes at the server');

    // A crash: connections cut without answers, then a new server on the same port.
    const closing = first.server.close(0);
    await waitFor(() => f.events.some((e) => e.type === 'disconnected'), 'the loss');
    const lost = f.events.find((e) => e.type === 'disconnected');
    assert.ok(lost?.type === 'disconnected' && lost.inFlight >= 2, 'requests were in flight when the server went away');
    rec.release();
    await closing;
    await waitFor(() => f.events.some((e) => e.type === 'connect-failed'), 'a refused attempt while no server listens');
    const second = await ggated({ '/dev/disk': { device: rec } }, { port: first.port });

    const replies = new Map<bigint, number>();
    for (let i = 0; i <= N; i++) {
      const { h } = await nbd.reply();
      replies.set(h.cookie, h.error);
    }
    assert.equal(replies.size, N + 1);
    for (const [cookie, error] of replies) assert.equal(error, 0, `NBD request ${cookie} succeeded`);
    for (let i = 0; i < N; i++) assert.deepEqual(await readDevice(rec, i * BS, BS), data(i), `block ${i}`);

    const tokens = f.tokens();
    assert.equal(new Set(tokens).size, tokens.length, 'every connection had its own token');
    const attempts = f.events.flatMap((e) => (e.type === 'connecting' ? [e.token] : []));
    assert.equal(new Set(attempts).size, attempts.length, 'every attempt had its own token');
    assert.equal(second.server.clients()[0]?.token, tokens.at(-1));
    // W9: the gate's NBD export and both ggated exports recorded nothing.
    const exp = fx.gates.status().exports.find((e) => e.name === `ggate${f.unit}`);
    assert.equal(exp?.errseq.value, 0, 'the gate export’s ErrSeq was never set');
    assert.deepEqual(exp?.sessions.map((s) => s.errorPending), [false]);
    assert.equal(second.server.errseq('/dev/disk').describe().value, 0);
  });

  test('a reply that does not echo its request is a lost connection; a stray reply is skipped; the request completes after reconnecting', TEST, async () => {
    const fake = await FakeGgated.start(MiB);
    const f = await forwarder(target(fake.port, '/dev/fake'));
    const payload = Buffer.alloc(4096, 7);

    // First pair: answer the WRITE with a reply of the wrong length. Second pair: a
    // stray reply first, then the right one.
    fake.onRequest = (hdr, pair) => {
      if (pair === 0) return [encodeHdr({ ...replyTo(hdr, null), length: hdr.length + 512 })];
      return [encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_WRITE, offset: 0, length: 512, seq: 999_999, error: null }), encodeHdr(replyTo(hdr, null))];
    };
    await f.dev.write(payload, 8192, 0);
    assert.equal(fake.pairs, 2);
    assert.deepEqual(fake.writes.map((w) => [w.pair, w.offset, w.data.equals(payload)]), [
      [0, 8192, true],
      [1, 8192, true],
    ]);
    assert.ok(f.events.some((e) => e.type === 'disconnected' && /does not echo/.test(e.reason)));
    assert.ok(f.events.some((e) => e.type === 'stray-reply' && e.seq === 999_999));
    assert.notEqual(fake.tokens[0], fake.tokens[1]);
    assert.deepEqual(fake.flags, [
      cinitFlags('rw', 'send'),
      cinitFlags('rw', 'recv'),
      cinitFlags('rw', 'send'),
      cinitFlags('rw', 'recv'),
    ]);
    assert.equal(fake.flags[0], GGATE_FLAG.GGATE_FLAG_SEND, 'the receive connection comes first');
  });
});

describe('ggatec: stopping, rescuing, destroying', () => {
  test('stop with a write unanswered: EINTR after the grace, the write stays in flight, a second forwarder rescues it', TEST, async () => {
    const rec = new RecordingDevice(new MemoryDevice({ size: MiB }));
    const { port } = await ggated({ '/dev/rec': { device: rec } });
    const f = await forwarder(target(port, '/dev/rec'), { stopGraceMs: 50 });
    rec.hold();
    let settled = false;
    const w = f.dev.write(Buffer.alloc(4096, 9), 0, 0).finally(() => (settled = true));
    await waitFor(() => rec.heldCount === 1, 'the write at the device');
    f.stop.abort('SIGTERM');
    await rejectsWith(f.done, 'EINTR');
    assert.equal(settled, false, 'the write was not failed');
    const info = fx.registry.list().find((g) => g.unit === f.unit);
    assert.equal(info?.inFlight, 1, 'it stays in flight on the gate');

    // Rescue: connect, CANCEL (seq 0), serve.
    const link = await connectGgatec(target(port, '/dev/rec'));
    await client.cancel({ unit: f.unit, seq: 0 });
    const rescued = serveGgatec(client, f.unit, { target: target(port, '/dev/rec'), link, reconnectIntervalMs: FAST_RETRY_MS });
    rescued.catch(() => undefined);
    await waitFor(() => rec.heldCount === 2, 'the write resent by the rescuer');
    rec.release();
    await w;
    assert.deepEqual(await readDevice(rec, 0, 4096), Buffer.alloc(4096, 9));
    await f.dev.close();
    await fx.registry.destroy({ version: 3, unit: f.unit, force: false });
    assert.equal((await rescued).served, 1);
  });

  test('stop with replies coming: they are answered first, then EINTR', TEST, async () => {
    const rec = new RecordingDevice(new MemoryDevice({ size: MiB }));
    const { port } = await ggated({ '/dev/rec': { device: rec } });
    const f = await forwarder(target(port, '/dev/rec'), { stopGraceMs: WAIT_MS });
    rec.hold();
    const w = f.dev.write(Buffer.alloc(4096, 3), 4096, 0);
    await waitFor(() => rec.heldCount === 1, 'the write at the device');
    f.stop.abort('SIGINT');
    setTimeout(() => rec.release(), 20);
    await w;
    await rejectsWith(f.done, 'EINTR');
    assert.equal(fx.registry.list().find((g) => g.unit === f.unit)?.inFlight, 0);
  });

  test('the gate destroyed while the server is away: the forwarder ends cleanly', TEST, async () => {
    const { server, port } = await ggated({ '/dev/m': { backend: { type: 'memory', size: '1M' } } });
    const f = await forwarder(target(port, '/dev/m'));
    await server.close(0);
    await waitFor(() => f.events.some((e) => e.type === 'connect-failed'), 'a failed attempt');
    await f.dev.close();
    await fx.registry.destroy({ version: 3, unit: f.unit, force: false });
    const r = await f.done;
    assert.equal(r.disconnects, 1);
    assert.equal(r.connects, 1);
  });

  test('options are checked; the CLI rounds the media size down to whole sectors of -s', TEST, () => {
    assert.deepEqual(gateGeometry({ mediasize: 8 * MiB + 1536, sectorsize: 512 }), { mediasize: 8 * MiB + 1536, sectorsize: 512 });
    assert.deepEqual(gateGeometry({ mediasize: 8 * MiB + 1536, sectorsize: 512 }, 4096), { mediasize: 8 * MiB, sectorsize: 4096 });
    assert.throws(() => gateGeometry({ mediasize: MiB, sectorsize: 4096 }, 512), /not a multiple/);
    assert.throws(() => gateGeometry({ mediasize: 2048, sectorsize: 512 }, 4096), /no whole/);
    assert.throws(
      () => serveGgatec(client, 0, { target: target(1, '/x'), reconnectIntervalMs: -1 }),
      (e: unknown) => e instanceof BlockError && e.code === 'EINVAL',
    );
    assert.equal(GGATEC.RECONNECT_INTERVAL_MS, 2000);
  });
});

// ---------------------------------------------------------------------------------
// A scripted ggated for protocol faults: handshakes by the book, replies from a script.

interface FakeWrite {
  readonly pair: number;
  readonly offset: number;
  readonly data: Buffer;
}

class FakeGgated {
  readonly #server: net.Server;
  readonly #sockets = new Set<net.Socket>();
  readonly #mediasize: number;
  port = 0;
  pairs = 0;
  readonly tokens: number[] = [];
  readonly flags: number[] = [];
  readonly writes: FakeWrite[] = [];
  /** Replies (encoded) to a request on pair number `pair` (0-based). */
  onRequest: (hdr: GgateHdr, pair: number) => Buffer[] = (hdr) => [encodeHdr(replyTo(hdr, null))];
  readonly #waiting = new Map<number, ByteSocket>();

  private constructor(mediasize: number) {
    this.#mediasize = mediasize;
    this.#server = net.createServer((s) => {
      this.#sockets.add(s);
      s.on('close', () => this.#sockets.delete(s));
      void this.#handshake(new ByteSocket(s)).catch(() => s.destroy());
    });
  }

  static async start(mediasize: number): Promise<FakeGgated> {
    const f = new FakeGgated(mediasize);
    await new Promise<void>((resolve) => f.#server.listen({ host: '127.0.0.1', port: 0 }, resolve));
    f.port = (f.#server.address() as net.AddressInfo).port;
    cleanups.push(() => f.close());
    return f;
  }

  async #handshake(c: ByteSocket): Promise<void> {
    await c.read(GGATE_SIZE.VERSION_SIZE);
    c.write(encodeVersion({ version: 0, error: null }));
    const d = decodeCinit(await c.read(GGATE_SIZE.CINIT_SIZE));
    assert.ok(d.ok);
    const flags = Number(d.value.flags);
    this.flags.push(flags);
    c.write(encodeSinit({ mediasize: this.#mediasize, sectorsize: 512, error: null }));
    const token = d.value.token;
    if ((flags & GGATE_FLAG.GGATE_FLAG_SEND) !== 0) {
      this.tokens.push(token);
      this.#waiting.set(token, c);
      return;
    }
    const rx = this.#waiting.get(token);
    assert.ok(rx, 'the receive connection came first');
    this.#waiting.delete(token);
    const pair = this.pairs++;
    for (;;) {
      const h = decodeHdr(await c.read(GGATE_SIZE.HDR_SIZE, 60_000));
      assert.ok(h.ok);
      const hdr = h.value;
      if (hdr.cmd === GGATE_CMD.GGATE_CMD_WRITE) this.writes.push({ pair, offset: Number(hdr.offset), data: Buffer.from(await c.read(hdr.length)) });
      for (const b of this.onRequest(hdr, pair)) rx.write(b);
    }
  }

  async close(): Promise<void> {
    for (const s of this.#sockets) s.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}
