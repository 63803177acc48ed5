/**
 * Fuzzing GgatedServer over real loopback sockets with a seeded PRNG (set
 * GGATED_FUZZ_SEED to replay another run): random bytes, mutated and truncated
 * version/cinit packets, and request streams with random commands, offsets, lengths and
 * error fields, cut short or abandoned. More than 10,000 messages in all.
 *
 * What must hold: the process does not crash (the server runs in this process), every
 * case ends within a bound (the server closes, answers, or the case proves it was
 * legitimately admitted), every complete request gets exactly one reply that echoes its
 * cmd/offset/length/seq and carries the verdict of validateGgateRequest, no transport
 * failure is recorded as a device error, memory stays bounded, and a valid client is
 * served correctly afterwards.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import {
  GGATE_CMD,
  GGATE_FLAG,
  GGATE_SIZE,
  MAX_REQUEST_LENGTH,
  decodeHdr,
  decodeSinit,
  encodeCinit,
  encodeHdr,
  encodeVersion,
  parseExports,
  resolveExports,
  validateGgateRequest,
  type GgateAccess,
} from '../../src/ggate/index.js';
import { codeFromFreebsd, freebsdErrno } from '../../src/errors/index.js';
import { GgatedServer } from '../../src/ggate/ggated.js';
import { prng } from '../helpers/data.js';

const SEED = Number(process.env.GGATED_FUZZ_SEED ?? 0x6a7e);
/** A case that has not ended by then is a hang. */
const CASE_DEADLINE_MS = 5_000;
const HANDSHAKE_TIMEOUT_MS = 300;
/** Attempts to open a valid client pair (see openPair). */
const PAIR_ATTEMPTS = 5;
const HALF_OPEN_TIMEOUT_MS = 300;
const MEDIASIZE = 1024 * 1024;
const SECTOR = 512;
const HANDSHAKE_CASES = 3_000;
const STREAM_SESSIONS = 24;
const MESSAGES_PER_STREAM = 400;
const CONCURRENCY = 48;
/** Generous bound on RSS growth over the whole run. */
const RSS_GROWTH_LIMIT = 200 * 1024 * 1024;

const sockets = new Set<net.Socket>();
let server: GgatedServer | null = null;
after(async () => {
  for (const s of sockets) s.destroy();
  await server?.close(1000);
});

const rnd = prng(SEED);
const int = (n: number): number => Math.floor(rnd() * n);
const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;
function bytes(n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = int(256);
  return b;
}
function mutate(b: Buffer, flips: number): Buffer {
  const out = Buffer.from(b);
  for (let i = 0; i < flips; i++) out[int(out.length)] = int(256);
  return out;
}

/** A socket that records what the server sends and when it closes. */
class Peer {
  readonly socket: net.Socket;
  received: Buffer[] = [];
  receivedBytes = 0;
  ended = false;
  #waiters: (() => void)[] = [];

  constructor(socket: net.Socket) {
    this.socket = socket;
    sockets.add(socket);
    socket.on('data', (b: Buffer) => {
      this.received.push(b);
      this.receivedBytes += b.length;
      this.#wake();
    });
    const end = () => {
      this.ended = true;
      sockets.delete(socket);
      this.#wake();
    };
    socket.on('close', end);
    socket.on('error', () => undefined);
  }

  static open(port: number): Promise<Peer> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ port, host: '127.0.0.1' }, () => resolve(new Peer(s)));
      s.setNoDelay(true);
      s.once('error', reject);
    });
  }

  #wake(): void {
    const w = this.#waiters;
    this.#waiters = [];
    for (const f of w) f();
  }

  /** Waits until `cond` holds or the deadline passes; returns whether it holds. */
  async until(cond: () => boolean, deadline: number): Promise<boolean> {
    while (!cond()) {
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.#waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    return true;
  }

  all(): Buffer {
    if (this.received.length > 1) this.received = [Buffer.concat(this.received)];
    return this.received[0] ?? Buffer.alloc(0);
  }
}

async function pool<T>(items: readonly T[], n: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: n }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

const VERSION = encodeVersion({ version: 0, error: null });
const ACCESS: Record<GgateAccess, number> = { ro: GGATE_FLAG.GGATE_FLAG_RDONLY, wo: GGATE_FLAG.GGATE_FLAG_WRONLY, rw: 0 };

function validCinit(dir: number, token: number, access: GgateAccess = 'rw'): Buffer {
  return encodeCinit({ path: '/dev/mem0', flags: ACCESS[access] | dir, nconn: 2, token });
}

/** One malformed (or occasionally valid) handshake byte string. */
function handshakeCase(): Buffer {
  const dir = pick([GGATE_FLAG.GGATE_FLAG_SEND, GGATE_FLAG.GGATE_FLAG_RECV]);
  const token = int(2 ** 32);
  switch (int(9)) {
    case 0:
      return bytes(int(1200));
    case 1:
      return mutate(VERSION, 1 + int(3));
    case 2:
      return Buffer.concat([mutate(VERSION, 1 + int(2)), validCinit(dir, token)]);
    case 3:
      return VERSION.subarray(0, int(GGATE_SIZE.VERSION_SIZE));
    case 4:
      return Buffer.concat([VERSION, bytes(int(1100))]);
    case 5:
      return Buffer.concat([VERSION, mutate(validCinit(dir, token), 1 + int(4))]);
    case 6:
      return Buffer.concat([VERSION, validCinit(dir, token).subarray(0, int(GGATE_SIZE.CINIT_SIZE))]);
    case 7: {
      // A cinit with random flags, nconn and path bytes (a NUL somewhere or nowhere).
      const c = validCinit(dir, token);
      bytes(GGATE_SIZE.GC_PATH_SIZE).copy(c, 0);
      if (rnd() < 0.5) c[int(GGATE_SIZE.GC_PATH_SIZE)] = 0;
      bytes(10).copy(c, 1025);
      return Buffer.concat([VERSION, c]);
    }
    default:
      // A valid handshake followed by garbage the server must not parse before pairing.
      return Buffer.concat([VERSION, validCinit(dir, token, pick(['ro', 'wo', 'rw'] as const)), bytes(int(200))]);
  }
}

interface Outcome {
  closedByServer: boolean;
  /** nothing said, version echoed only, sinit refusal, or admitted. */
  kind: 'silent' | 'echo' | 'refused' | 'admitted';
}

async function runHandshakeCase(port: number, payload: Buffer): Promise<Outcome> {
  const peer = await Peer.open(port);
  // Sometimes in pieces, to cross frame boundaries.
  if (payload.length > 1 && rnd() < 0.3) {
    const cut = 1 + int(payload.length - 1);
    peer.socket.write(payload.subarray(0, cut));
    peer.socket.write(payload.subarray(cut));
  } else if (payload.length > 0) {
    peer.socket.write(payload);
  }
  const deadline = Date.now() + CASE_DEADLINE_MS;
  const closed = await peer.until(() => peer.ended, deadline);
  const got = peer.all();
  // What a server may say: nothing, the version echo, or the echo and one sinit.
  assert.ok([0, GGATE_SIZE.VERSION_SIZE, GGATE_SIZE.VERSION_SIZE + GGATE_SIZE.SINIT_SIZE].includes(got.length), `reply of ${got.length} bytes`);
  let admitted = false;
  let kind: Outcome['kind'] = got.length === 0 ? 'silent' : 'echo';
  if (got.length > GGATE_SIZE.VERSION_SIZE) {
    const s = decodeSinit(got, GGATE_SIZE.VERSION_SIZE);
    assert.ok(s.ok);
    admitted = s.value.errno === 0;
    if (!admitted) assert.ok(codeFromFreebsd(s.value.errno) !== undefined, `sinit errno ${s.value.errno} is a FreeBSD errno`);
    else assert.equal(s.value.mediasize, MEDIASIZE);
    kind = admitted ? 'admitted' : 'refused';
  }
  if (!closed) {
    // Only a connection admitted and then paired with another case may outlive the deadline.
    assert.ok(admitted, `case not closed within ${CASE_DEADLINE_MS} ms: ${payload.subarray(0, 64).toString('hex')}`);
    peer.socket.destroy();
  }
  return { closedByServer: closed, kind };
}

/** One request of a stream: its raw 23 header bytes and payload. */
function streamMessage(): { hdr: Buffer; payload: Buffer | null } {
  const hdr = bytes(GGATE_SIZE.HDR_SIZE);
  const cmd = pick([0, 0, 0, 1, 1, 1, 3, 3, int(256)]);
  hdr.writeUInt8(cmd, 0);
  const offsetKind = int(7);
  if (offsetKind === 0) hdr.writeBigUInt64BE(BigInt(int(MEDIASIZE / SECTOR)) * BigInt(SECTOR), 1);
  else if (offsetKind === 1) hdr.writeBigUInt64BE(BigInt(int(MEDIASIZE)), 1);
  else if (offsetKind === 2) hdr.writeBigUInt64BE(BigInt(MEDIASIZE - SECTOR * int(4)), 1);
  else if (offsetKind === 3) hdr.writeBigUInt64BE(pick([2n ** 53n - 512n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 512n]), 1);
  // else: the random bytes already there
  const lengthKind = int(8);
  let length: number;
  if (lengthKind < 4) length = SECTOR * int(129);
  else if (lengthKind === 4) length = int(70_000);
  else if (lengthKind === 5) length = 0;
  else if (lengthKind === 6) length = pick([MAX_REQUEST_LENGTH + SECTOR, 2 ** 32 - 512, 2 ** 32 - 1]);
  else length = hdr.readUInt32BE(9);
  // A WRITE's payload is sent in full, so keep the stream affordable: huge WRITE lengths
  // are kept for the truncated endings below, a few over-cap ones are sent whole.
  if (cmd === GGATE_CMD.GGATE_CMD_WRITE && length > MAX_REQUEST_LENGTH + SECTOR) length = SECTOR * int(16);
  if (cmd === GGATE_CMD.GGATE_CMD_WRITE && length > MAX_REQUEST_LENGTH && rnd() < 0.9) length = SECTOR * int(16);
  hdr.writeUInt32BE(length, 9);
  const payload = cmd === GGATE_CMD.GGATE_CMD_WRITE ? bytes(Math.min(length, 4096)) : null;
  // Payload bytes beyond the first 4 KiB repeat; content does not matter to the server.
  const full = payload && length > payload.length ? Buffer.alloc(length, payload[0]!) : payload;
  return { hdr, payload: full };
}

/** How a stream ends. */
type Ending = 'clean' | 'truncated-header' | 'truncated-payload' | 'huge-write' | 'vanish';

/**
 * Opens a client pair like ggatec (receive connection first, then send connection), with
 * the handshake bytes consumed. The fuzz server's deadlines are short, so on a loaded
 * machine it may close a connection before reading its cinit, or drop the first half
 * before the second arrives: such an attempt is retried with a fresh token, as ggatec
 * does; a refusal fails the test.
 */
async function openPair(port: number, token: number): Promise<{ rx: Peer; tx: Peer }> {
  const hs = GGATE_SIZE.VERSION_SIZE + GGATE_SIZE.SINIT_SIZE;
  for (let attempt = 0; attempt < PAIR_ATTEMPTS; attempt++) {
    const t = (token + attempt * 0x0100_0000) >>> 0;
    const rx = await Peer.open(port);
    rx.socket.write(Buffer.concat([VERSION, validCinit(GGATE_FLAG.GGATE_FLAG_SEND, t)]));
    const tx = await Peer.open(port);
    tx.socket.write(Buffer.concat([VERSION, validCinit(GGATE_FLAG.GGATE_FLAG_RECV, t)]));
    const deadline = Date.now() + CASE_DEADLINE_MS;
    const complete = (p: Peer) => p.receivedBytes >= hs;
    assert.ok(await rx.until(() => complete(rx) || rx.ended, deadline), 'rx handshake bounded');
    assert.ok(await tx.until(() => complete(tx) || tx.ended, deadline), 'tx handshake bounded');
    if (!complete(rx) || !complete(tx)) {
      rx.socket.destroy();
      tx.socket.destroy();
      continue;
    }
    for (const p of [rx, tx]) {
      const sinit = decodeSinit(p.all(), GGATE_SIZE.VERSION_SIZE);
      assert.ok(sinit.ok && sinit.value.errno === 0, 'pair admitted');
      p.received = [p.all().subarray(hs)];
      p.receivedBytes -= hs;
    }
    // Both halves admitted, but the first may have waited past the (short) half-open
    // timeout and been dropped: a zero-length READ proves the pair is serving.
    tx.socket.write(encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_READ, offset: 0, length: 0, seq: 0, error: null }));
    assert.ok(await rx.until(() => rx.receivedBytes >= GGATE_SIZE.HDR_SIZE || rx.ended, deadline), 'probe bounded');
    if (rx.receivedBytes < GGATE_SIZE.HDR_SIZE) {
      rx.socket.destroy();
      tx.socket.destroy();
      continue;
    }
    const probe = decodeHdr(rx.all());
    assert.ok(probe.ok && probe.value.errno === 0 && probe.value.seq === 0, 'probe answered');
    rx.received = [rx.all().subarray(GGATE_SIZE.HDR_SIZE)];
    rx.receivedBytes -= GGATE_SIZE.HDR_SIZE;
    return { rx, tx };
  }
  assert.fail(`no pair after ${PAIR_ATTEMPTS} attempts`);
}

async function runStream(port: number, token: number, ending: Ending): Promise<number> {
  const { rx, tx } = await openPair(port, token);
  const deadline = Date.now() + CASE_DEADLINE_MS * 4;

  const sent: Buffer[] = [];
  let expectedBytes = 0;
  const geometry = { mediasize: MEDIASIZE, sectorsize: SECTOR, access: 'rw' as const };
  for (let i = 0; i < MESSAGES_PER_STREAM; i++) {
    const { hdr, payload } = streamMessage();
    tx.socket.write(hdr);
    if (payload) tx.socket.write(payload);
    sent.push(hdr);
    const d = decodeHdr(hdr);
    assert.ok(d.ok);
    const verdict = validateGgateRequest(d.value, geometry);
    expectedBytes += GGATE_SIZE.HDR_SIZE + (verdict === null && d.value.cmd === GGATE_CMD.GGATE_CMD_READ ? d.value.length : 0);
  }
  switch (ending) {
    case 'truncated-header':
      tx.socket.write(bytes(1 + int(GGATE_SIZE.HDR_SIZE - 1)));
      break;
    case 'truncated-payload':
      tx.socket.write(encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_WRITE, offset: 0, length: 8192, seq: 1, error: null }));
      tx.socket.write(bytes(int(8192)));
      break;
    case 'huge-write':
      tx.socket.write(encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_WRITE, offset: 0, length: 2 ** 32 - 1, seq: 1, error: null }));
      tx.socket.write(bytes(int(100_000)));
      break;
    default:
      break;
  }
  if (ending === 'vanish') {
    // Gone without reading a single reply.
    tx.socket.destroy();
    rx.socket.destroy();
    return sent.length;
  }
  tx.socket.end();
  assert.ok(await rx.until(() => rx.ended, deadline), `stream (${ending}) closed by the server after its replies`);
  const replies = rx.all();
  assert.equal(replies.length, expectedBytes, 'exactly one reply per complete request');
  let pos = 0;
  for (const hdr of sent) {
    // cmd, offset, length and seq echoed byte for byte.
    assert.ok(replies.subarray(pos, pos + 21).equals(hdr.subarray(0, 21)), 'reply echoes the request');
    const r = decodeHdr(replies, pos);
    assert.ok(r.ok);
    const q = decodeHdr(hdr);
    assert.ok(q.ok);
    const verdict = validateGgateRequest(q.value, geometry);
    assert.equal(r.value.errno, verdict === null ? 0 : freebsdErrno(verdict), 'the reply carries the validation verdict');
    pos += GGATE_SIZE.HDR_SIZE + (r.value.errno === 0 && r.value.cmd === GGATE_CMD.GGATE_CMD_READ ? r.value.length : 0);
  }
  return sent.length;
}

test('ggated survives more than 10,000 malformed or truncated messages over loopback', async () => {
  const entries = await resolveExports(parseExports('127.0.0.1 RW /dev/mem0\n'), async () => '127.0.0.1');
  server = new GgatedServer({
    exports: entries,
    stacks: { '/dev/mem0': { backend: { type: 'memory', size: MEDIASIZE } } },
    limits: { handshakeTimeoutMs: HANDSHAKE_TIMEOUT_MS, halfOpenTimeoutMs: HALF_OPEN_TIMEOUT_MS },
  });
  const srv = server;
  const { port } = await srv.listen({ host: '127.0.0.1', port: 0 });
  const rss0 = process.memoryUsage().rss;
  let messages = 0;

  // 1. Handshakes: one connection per case.
  const cases = Array.from({ length: HANDSHAKE_CASES }, handshakeCase);
  let closed = 0;
  const kinds = { silent: 0, echo: 0, refused: 0, admitted: 0 };
  await pool(cases, CONCURRENCY, async (payload) => {
    const o = await runHandshakeCase(port, payload);
    messages++;
    if (o.closedByServer) closed++;
    kinds[o.kind]++;
  });
  assert.equal(messages, HANDSHAKE_CASES);
  assert.ok(closed >= HANDSHAKE_CASES - kinds.admitted, 'every case not admitted was closed by the server');
  // The generator reaches every outcome of the handshake.
  for (const [k, n] of Object.entries(kinds)) assert.ok(n > 0, `some cases end '${k}' (${JSON.stringify(kinds)})`);

  // 2. Request streams: many malformed requests per session, with various endings.
  const endings: Ending[] = ['clean', 'truncated-header', 'truncated-payload', 'huge-write', 'vanish'];
  const streams = Array.from({ length: STREAM_SESSIONS }, (_, i) => ({ token: 0x7000_0000 + i, ending: endings[i % endings.length]! }));
  await pool(streams, 6, async (s) => {
    const n = await runStream(port, s.token, s.ending);
    messages += n;
  });
  assert.ok(messages >= 10_000, `${messages} messages`);

  // Nothing left behind once the abandoned connections are noticed.
  const settle = Date.now() + CASE_DEADLINE_MS * 2;
  while ((srv.sessionCount > 0 || srv.pendingCount > 0 || srv.halfOpenCount > 0) && Date.now() < settle) {
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.equal(srv.sessionCount, 0, 'no session left');
  assert.equal(srv.pendingCount, 0, 'no handshake left');
  assert.equal(srv.halfOpenCount, 0, 'no half-open pair left');
  // Transport failures are not device errors (W9).
  assert.equal(srv.errseq('/dev/mem0').peek(), 0, 'nothing recorded in the ErrSeq');

  // 3. A valid client is still served, correctly.
  const { rx, tx } = await openPair(port, 0x5eed);
  const deadline = Date.now() + CASE_DEADLINE_MS;
  const data = bytes(4096);
  tx.socket.write(encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_WRITE, offset: 8192, length: 4096, seq: 1, error: null }));
  tx.socket.write(data);
  tx.socket.write(encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_FLUSH, offset: MEDIASIZE, length: 0, seq: 2, error: null }));
  tx.socket.write(encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_READ, offset: 8192, length: 4096, seq: 3, error: null }));
  const want = 3 * GGATE_SIZE.HDR_SIZE + 4096;
  assert.ok(await rx.until(() => rx.receivedBytes >= want, deadline), 'valid client answered');
  const got = rx.all();
  for (let k = 0; k < 3; k++) {
    const h = decodeHdr(got, k * GGATE_SIZE.HDR_SIZE);
    assert.ok(h.ok && h.value.errno === 0 && h.value.seq === k + 1);
  }
  assert.ok(got.subarray(3 * GGATE_SIZE.HDR_SIZE).equals(data), 'data read back');
  rx.socket.destroy();
  tx.socket.destroy();

  const growth = process.memoryUsage().rss - rss0;
  assert.ok(growth < RSS_GROWTH_LIMIT, `RSS grew by ${Math.round(growth / 2 ** 20)} MiB`);
});
