/**
 * Reads into lent receive buffers (src/server/lent-buffers.ts and the session's use of
 * them): the socket switch itself, and that a receive buffer is never reused while a
 * request still holds slices of it, with writes held in the device, input paused and
 * resumed, and large (zero-copy) and small (copied) payloads mixed in one stream.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { MemoryDevice } from '../../src/backends/memory.js';
import { type ServerLimits } from '../../src/nbd/index.js';
import { Export } from '../../src/export/index.js';
import { lendReadBuffers } from '../../src/io/lent-buffers.js';
import { RECEIVE_BUFFER_SIZE, ZERO_COPY_MINIMUM } from '../../src/nbd/session.js';
import { NBD_CMD } from '../../src/nbd/constants.js';
import { encodeRequest } from '../../src/nbd/codec.js';
import { connect, pattern, readData, serveExports } from './helpers.js';
import { RawClient } from '../helpers/raw-client.js';

/** True if every piece is a view of a session receive buffer (zero copy), not of a pooled copy. */
function inReceiveBuffers(pieces: readonly Buffer[]): boolean {
  return pieces.every((p) => p.buffer.byteLength === RECEIVE_BUFFER_SIZE);
}

/**
 * A memory device that counts writes whose payload came as slices of receive buffers,
 * and, when `hold` is set, keeps every write waiting until the test lets it go (so it is
 * not nonBlocking).
 */
class CountingDevice extends MemoryDevice {
  override readonly nonBlocking: boolean;
  readonly held: (() => void)[] = [];
  zeroCopy = 0;

  constructor(size: number, readonly hold: boolean) {
    super({ size });
    this.nonBlocking = !hold;
  }

  async #wait(pieces: readonly Buffer[]): Promise<void> {
    if (inReceiveBuffers(pieces)) this.zeroCopy++;
    if (this.hold) await new Promise<void>((go) => this.held.push(go));
  }

  override async write(data: Buffer, offset: number, flags: number): Promise<void> {
    await this.#wait([data]);
    return super.write(data, offset, flags);
  }

  override async writev(data: readonly Buffer[], offset: number, flags: number): Promise<void> {
    await this.#wait(data);
    return super.writev(data, offset, flags);
  }
}

describe('lendReadBuffers', () => {
  const servers: net.Server[] = [];
  after(() => servers.forEach((s) => s.close()));

  async function listen(opts: net.ServerOpts, onSocket: (s: net.Socket) => void): Promise<net.AddressInfo> {
    const server = net.createServer(opts, onSocket);
    servers.push(server);
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    return server.address() as net.AddressInfo;
  }

  test('a paused accepted socket reads into each lent buffer in turn, writes still work, and the listener lets go of it', async () => {
    const lentBuffers: Buffer[] = [];
    const reads: { n: number; intoLatest: boolean }[] = [];
    let text = '';
    let server!: net.Server;
    const done = new Promise<net.Socket>((resolve) => {
      void listen({ pauseOnConnect: true }, (sock) => {
        const lent = lendReadBuffers(
          sock,
          () => {
            const b = Buffer.alloc(16);
            lentBuffers.push(b);
            return b;
          },
          (n, buf) => {
            reads.push({ n, intoLatest: buf === lentBuffers[lentBuffers.length - 1] });
            text += Buffer.from(buf.subarray(0, n)).toString();
            if (text.endsWith('.')) lent!.end('echo:' + text);
          },
        );
        assert.ok(lent, 'the socket could be switched');
        resolve(lent);
      }).then((a) => {
        server = servers[servers.length - 1]!;
        const c = net.connect(a.port, a.address);
        let echo = '';
        c.on('data', (d: Buffer) => (echo += d.toString()));
        c.write('more than sixteen bytes, sent at once.');
        c.on('end', () => {
          assert.equal(echo, 'echo:more than sixteen bytes, sent at once.');
        });
      });
    });
    const lent = await done;
    await once(lent, 'close');
    assert.equal(text, 'more than sixteen bytes, sent at once.');
    assert.ok(reads.length >= 3, `${reads.length} reads of at most 16 bytes`);
    assert.ok(reads.every((r) => r.n <= 16 && r.intoLatest), 'every read went into the buffer lent last');
    const count = await new Promise<number>((resolve, reject) => server.getConnections((e, n) => (e ? reject(e) : resolve(n))));
    assert.equal(count, 0, 'the listener no longer counts the original socket');
  });

  test('a socket already flowing is left as it is (null)', async () => {
    const result = new Promise<net.Socket | null>((resolve) => {
      void listen({}, (sock) => {
        sock.on('data', () => undefined);
        resolve(lendReadBuffers(sock, () => Buffer.alloc(16), () => undefined));
        sock.destroy();
      }).then((a) => net.connect(a.port, a.address).on('error', () => undefined));
    });
    assert.equal(await result, null);
  });
});

describe('a session reading into lent buffers', () => {
  /**
   * Writes a stream of large and small WRITEs in one go, with few requests allowed in
   * flight (so input pauses with bytes left in a receive buffer), then reads all back.
   */
  async function mixedStream(
    dev: CountingDevice,
    expectZeroCopy: (lengths: number[]) => number | ((zeroCopy: number) => void),
    limits: Partial<ServerLimits> = { maxInFlightRequests: 5 },
  ): Promise<void> {
    const s = await serveExports([new Export({ name: 'd', device: dev })], limits);
    const releaser = setInterval(() => dev.held.splice(0).forEach((go) => go()), 2);
    try {
      const c = await connect(s.socket, 'simple', 'd');
      const LARGE = 256 * 1024; // several per receive buffer, some straddling two
      const SMALL = 4096;
      assert.ok(LARGE >= ZERO_COPY_MINIMUM && SMALL < ZERO_COPY_MINIMUM);
      const writes: { offset: number; data: Buffer }[] = [];
      let at = 0;
      for (let i = 0; i < 24; i++) {
        const len = i % 3 === 2 ? SMALL : LARGE + (i % 5) * 512;
        writes.push({ offset: at, data: pattern(len, i + 1) });
        at += len + 512;
      }
      const stream = Buffer.concat(
        writes.flatMap((w, i) => [encodeRequest(0, NBD_CMD.NBD_CMD_WRITE, BigInt(i + 1), w.offset, w.data.length), w.data]),
      );
      c.write(stream);
      // Small writes may not be held, so replies can come out of order: collect them all.
      const answered = new Set<bigint>();
      for (let i = 0; i < writes.length; i++) {
        const r = await c.reply();
        assert.equal(r.h.error, 0, `write ${r.h.cookie} failed`);
        answered.add(r.h.cookie);
      }
      assert.deepEqual([...answered].sort((a, b) => Number(a - b)), writes.map((_, i) => BigInt(i + 1)));
      const expected = expectZeroCopy(writes.map((w) => w.data.length));
      if (typeof expected === 'number') assert.equal(dev.zeroCopy, expected, 'payloads passed as receive-buffer slices');
      else expected(dev.zeroCopy);
      for (let i = 0; i < writes.length; i++) {
        const w = writes[i]!;
        c.request(0, NBD_CMD.NBD_CMD_READ, BigInt(100 + i), w.offset, w.data.length);
        const got = await readData(c, BigInt(100 + i), w.offset, w.data.length, 'simple');
        assert.ok(got.equals(w.data), `write ${i} (${w.data.length} bytes at ${w.offset}) reads back intact`);
      }
      c.close();
    } finally {
      clearInterval(releaser);
      dev.held.splice(0).forEach((go) => go());
      await s.close();
    }
  }

  test('held zero-copy writes keep their receive buffers: every byte of a mixed, paused and resumed stream lands intact', async () => {
    // A device that may take its time: only large payloads are held as slices, small ones are copied.
    // Few requests in flight, so that input pauses with bytes left in a receive buffer.
    await mixedStream(new CountingDevice(16 * 2 ** 20, true), (ls) => ls.filter((l) => l >= ZERO_COPY_MINIMUM).length);
  });

  test('held receive buffers stay within the in-flight byte budget: past it, large payloads are copied', async () => {
    // A budget of 3 receive buffers: at most one may be held, so with 16 large writes waiting in the device some must be copies.
    const budget = 3 * RECEIVE_BUFFER_SIZE;
    await mixedStream(
      new CountingDevice(16 * 2 ** 20, true),
      (ls) => (zeroCopy) => {
        const large = ls.filter((l) => l >= ZERO_COPY_MINIMUM).length;
        assert.ok(zeroCopy >= 1, 'the first payloads are held');
        assert.ok(zeroCopy < large, `${zeroCopy} of ${large} large payloads held with a ${budget}-byte budget`);
      },
      { maxInFlightBytes: budget, maxInFlightRequests: 64 },
    );
  });

  test('a nonBlocking device gets every payload as slices, small ones too, and every byte lands intact', async () => {
    await mixedStream(new CountingDevice(16 * 2 ** 20, false), (ls) => ls.length);
  });

  test('a payload dribbled a few bytes per read fills the held buffer before taking another (memory follows the bytes)', async () => {
    const s = await serveExports([new Export({ name: 'd', device: new MemoryDevice({ size: 2 ** 20 }) })]);
    const pool = s.server.pool;
    const get = pool.get.bind(pool);
    let receiveBuffers = 0;
    pool.get = (n: number) => {
      if (n === RECEIVE_BUFFER_SIZE) receiveBuffers++;
      return get(n);
    };
    try {
      const c = await connect(s.socket, 'simple', 'd');
      const LEN = 64 * 1024;
      const PIECE = 256;
      const data = pattern(LEN, 9);
      const before = receiveBuffers;
      c.write(encodeRequest(0, NBD_CMD.NBD_CMD_WRITE, 1n, 4096, LEN));
      // Each piece in its own read: the previous one has been read before the next is sent.
      for (let at = 0; at < LEN; at += PIECE) {
        c.write(data.subarray(at, at + PIECE));
        await sleep(1);
      }
      const r = await c.reply();
      assert.equal(r.h.error, 0);
      // 257 reads into held buffers: one 256 KiB buffer (plus one when its tail runs short), not one per read.
      assert.ok(receiveBuffers - before <= 2, `${receiveBuffers - before} receive buffers for ${LEN / PIECE} pieces`);
      c.request(0, NBD_CMD.NBD_CMD_READ, 2n, 4096, LEN);
      assert.ok((await readData(c, 2n, 4096, LEN, 'simple')).equals(data));
      c.close();
    } finally {
      pool.get = get;
      await s.close();
    }
  });

  test('a connection whose session cannot start is dropped, and the server goes on serving', async () => {
    const s = await serveExports([new Export({ name: 'd', device: new MemoryDevice({ size: 2 ** 20 }) })]);
    const pool = s.server.pool;
    const get = pool.get.bind(pool);
    try {
      pool.get = () => {
        throw new Error('no buffer for you');
      };
      const dropped = await RawClient.connect(s.socket);
      assert.equal(await dropped.closedByServer(), true);
      pool.get = get;
      const c = await connect(s.socket, 'simple', 'd');
      c.request(0, NBD_CMD.NBD_CMD_READ, 1n, 0, 512);
      assert.ok((await readData(c, 1n, 0, 512, 'simple')).equals(Buffer.alloc(512)));
      c.close();
    } finally {
      pool.get = get;
      await s.close();
    }
  });
});
