/**
 * NbdClient against scripted servers that break the protocol: hand-made bytes on a
 * private unix socket. Each violation must end in a clean BlockError (EPROTO for a
 * violation, ECONNRESET for a lost connection, ETIMEDOUT for a stall) with a message
 * that says what happened; every request in flight must be rejected; nothing may hang
 * (every wait is bounded) and nothing may be allocated by a length the peer sent.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { BlockError } from '../../src/errors/index.js';
import { StreamReader } from '../../src/io/stream-reader.js';
import { NbdClient, type NbdClientOptions } from '../../src/nbd/client.js';
import { MAX_CHUNK_PAYLOAD } from '../../src/nbd/client-connection.js';
import { MAX_OPTION_REPLY_LENGTH, MAX_OPTION_REPLY_TOTAL } from '../../src/nbd/client-handshake.js';
import {
  DONE,
  decodeCompactRequest,
  decodeExtendedRequest,
  decodeOptionHeader,
  encodeBlockStatus,
  encodeErrorPayload,
  encodeExportNameReply,
  encodeGreeting,
  encodeHolePayload,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
  writeExtendedHeader,
  writeSimpleReply,
  writeStructuredHeader,
  type RequestHeader,
} from '../../src/nbd/codec.js';
import { NBD_CMD, NBD_FLAG, NBD_HS_FLAG, NBD_MAGIC, NBD_OPT, NBD_REP, NBD_REPLY_TYPE, NBD_SIZE } from '../../src/nbd/constants.js';

const WAIT_MS = 5000;

function bounded<T>(p: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: not settled within ${ms} ms`)), ms)));
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

const blockError =
  (code: string, message: RegExp) =>
  (e: unknown): boolean => {
    assert.ok(e instanceof BlockError, `expected a BlockError, got ${String(e)}`);
    assert.equal(e.code, code, `code of: ${e.message}`);
    assert.match(e.message, message);
    return true;
  };

type Mode = 'simple' | 'structured' | 'extended';
const CLIENT_MODE: Record<Mode, NbdClientOptions> = {
  extended: {},
  structured: { extendedHeaders: false },
  simple: { extendedHeaders: false, structuredReplies: false },
};

/** The server's side of one scripted connection. */
class Peer {
  readonly sock: net.Socket;
  readonly #r: StreamReader;
  mode: Mode = 'simple';
  /** The id given to base:allocation. */
  readonly contextId = 7;

  constructor(sock: net.Socket) {
    this.sock = sock;
    this.#r = new StreamReader(sock);
  }
  read(n: number): Promise<Buffer> {
    return this.#r.read(n);
  }
  write(b: Buffer): void {
    this.sock.write(b);
  }

  /** Reads one option: its code and data. */
  async option(): Promise<{ option: number; data: Buffer }> {
    const h = decodeOptionHeader(await this.read(NBD_SIZE.OPTION_HEADER));
    assert.ok(h.magicOk, 'client option magic');
    return { option: h.option, data: h.length > 0 ? await this.read(h.length) : Buffer.alloc(0) };
  }

  /**
   * Fixed newstyle up to GO: ACKs extended headers or structured replies as `mode`
   * allows, selects base:allocation, answers GO with a 1 MiB export. `onOption` may
   * answer an option itself (return true).
   */
  async handshake(
    mode: Mode,
    o: { onOption?: (opt: number, data: Buffer) => boolean | Promise<boolean>; flags?: number; size?: number; blockSize?: [number, number, number] } = {},
  ): Promise<void> {
    this.write(encodeGreeting(NBD_HS_FLAG.NBD_FLAG_FIXED_NEWSTYLE | NBD_HS_FLAG.NBD_FLAG_NO_ZEROES));
    await this.read(4);
    for (;;) {
      const { option, data } = await this.option();
      if (o.onOption && (await o.onOption(option, data))) continue;
      switch (option) {
        case NBD_OPT.NBD_OPT_EXTENDED_HEADERS:
          if (mode === 'extended') {
            this.mode = 'extended';
            this.write(encodeOptionReply(option, NBD_REP.NBD_REP_ACK));
          } else this.write(encodeOptionReply(option, NBD_REP.NBD_REP_ERR_UNSUP));
          break;
        case NBD_OPT.NBD_OPT_STRUCTURED_REPLY:
          if (mode === 'structured') {
            this.mode = 'structured';
            this.write(encodeOptionReply(option, NBD_REP.NBD_REP_ACK));
          } else this.write(encodeOptionReply(option, NBD_REP.NBD_REP_ERR_UNSUP));
          break;
        case NBD_OPT.NBD_OPT_SET_META_CONTEXT:
          this.write(encodeOptionReply(option, NBD_REP.NBD_REP_META_CONTEXT, encodeRepMetaContext(this.contextId, 'base:allocation')));
          this.write(encodeOptionReply(option, NBD_REP.NBD_REP_ACK));
          break;
        case NBD_OPT.NBD_OPT_GO: {
          const flags = o.flags ?? NBD_FLAG.NBD_FLAG_HAS_FLAGS | NBD_FLAG.NBD_FLAG_SEND_FLUSH;
          this.write(encodeOptionReply(option, NBD_REP.NBD_REP_INFO, encodeInfoExport(o.size ?? 1 << 20, flags)));
          if (o.blockSize) this.write(encodeOptionReply(option, NBD_REP.NBD_REP_INFO, encodeInfoBlockSize(...o.blockSize)));
          this.write(encodeOptionReply(option, NBD_REP.NBD_REP_ACK));
          return;
        }
        default:
          this.write(encodeOptionReply(option, NBD_REP.NBD_REP_ERR_UNSUP));
      }
    }
  }

  /** Reads one request header (and a WRITE's payload). */
  async request(): Promise<RequestHeader> {
    const ext = this.mode === 'extended';
    const b = await this.read(ext ? NBD_SIZE.EXTENDED_REQUEST : NBD_SIZE.COMPACT_REQUEST);
    const h = ext ? decodeExtendedRequest(b) : decodeCompactRequest(b);
    assert.ok(h.magicOk, 'request magic');
    if (h.type === NBD_CMD.NBD_CMD_WRITE) await this.read(h.length);
    return h;
  }

  /** A structured (or, in extended mode, extended) chunk header for `h` followed by `payload`; `length` overrides the header's length. */
  chunk(h: RequestHeader, flags: number, type: number, payload: Buffer, length = payload.length, cookie = h.cookie): void {
    if (this.mode === 'extended') {
      const b = Buffer.alloc(NBD_SIZE.EXTENDED_REPLY_HEADER);
      writeExtendedHeader(b, 0, flags, type, { cookie, offsetHigh: h.offsetHigh, offsetLow: h.offsetLow }, length);
      this.write(Buffer.concat([b, payload]));
    } else {
      const b = Buffer.alloc(NBD_SIZE.STRUCTURED_REPLY_HEADER);
      writeStructuredHeader(b, 0, flags, type, cookie, length);
      this.write(Buffer.concat([b, payload]));
    }
  }

  simple(cookie: bigint, error = 0, data?: Buffer): void {
    const b = Buffer.alloc(NBD_SIZE.SIMPLE_REPLY);
    writeSimpleReply(b, 0, error, cookie);
    this.write(data ? Buffer.concat([b, data]) : b);
  }
}

interface Scripted {
  readonly uri: string;
  /** Settles when the script does (its errors are reported, not thrown at the test). */
  readonly done: Promise<unknown>;
  close(): Promise<void>;
}

/** A unix-socket server running `script` on each connection. */
async function scripted(script: (p: Peer) => Promise<void>): Promise<Scripted> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-hostile-'));
  const socket = path.join(dir, 's.sock');
  const sockets = new Set<net.Socket>();
  const runs: Promise<unknown>[] = [];
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => undefined);
    runs.push(script(new Peer(s)).catch((e: unknown) => e));
  });
  await new Promise<void>((resolve) => server.listen(socket, resolve));
  return {
    uri: `nbd+unix:///disk?socket=${encodeURIComponent(socket)}`,
    get done() {
      return Promise.all(runs);
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Runs a test body against a scripted server, always closing it. */
async function against(script: (p: Peer) => Promise<void>, body: (s: Scripted) => Promise<void>): Promise<void> {
  const s = await scripted(script);
  try {
    await body(s);
  } finally {
    await s.close();
  }
}

/** Holds a script open until the test closes the server (the socket's end rejects the read). */
async function idle(p: Peer): Promise<void> {
  await p.read(1).catch(() => undefined);
}

// -----------------------------------------------------------------------------------
// Handshake

test('a bad greeting magic: EPROTO "not an NBD server"', async () => {
  await against(
    async (p) => {
      p.write(Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n'));
      await idle(p);
    },
    async (s) => {
      await assert.rejects(bounded(NbdClient.connect(s.uri), 'connect'), blockError('EPROTO', /not an NBD server/));
    },
  );
});

test('the oldstyle greeting: EPROTO naming oldstyle', async () => {
  await against(
    async (p) => {
      const b = Buffer.alloc(152);
      b.writeBigUInt64BE(NBD_MAGIC.NBDMAGIC, 0);
      b.writeBigUInt64BE(0x00420281861253n, 8);
      b.writeBigUInt64BE(1n << 20n, 16);
      p.write(b);
      await idle(p);
    },
    async (s) => {
      await assert.rejects(bounded(NbdClient.connect(s.uri), 'connect'), blockError('EPROTO', /oldstyle/));
    },
  );
});

test('an option reply longer than MAX_OPTION_REPLY_LENGTH: EPROTO before anything is read or allocated for it', async () => {
  for (const length of [MAX_OPTION_REPLY_LENGTH + 1, 0xffffffff]) {
    await against(
      async (p) => {
        p.write(encodeGreeting(NBD_HS_FLAG.NBD_FLAG_FIXED_NEWSTYLE));
        await p.read(4);
        const { option } = await p.option();
        const h = encodeOptionReply(option, NBD_REP.NBD_REP_ACK);
        h.writeUInt32BE(length, 16);
        // Only the header: a client that waited for the payload would hang here.
        p.write(h);
        await idle(p);
      },
      async (s) => {
        const before = process.memoryUsage().arrayBuffers;
        await assert.rejects(bounded(NbdClient.connect(s.uri), 'connect'), blockError('EPROTO', new RegExp(`option reply of ${length} bytes`)));
        assert.ok(process.memoryUsage().arrayBuffers - before < 32 * 1024 * 1024, 'nothing large was allocated');
      },
    );
  }
});

test('a reply for an option not asked: EPROTO naming both options', async () => {
  await against(
    async (p) => {
      p.write(encodeGreeting(NBD_HS_FLAG.NBD_FLAG_FIXED_NEWSTYLE));
      await p.read(4);
      await p.option();
      p.write(encodeOptionReply(NBD_OPT.NBD_OPT_GO, NBD_REP.NBD_REP_ACK));
      await idle(p);
    },
    async (s) => {
      await assert.rejects(bounded(NbdClient.connect(s.uri), 'connect'), blockError('EPROTO', /a reply for NBD_OPT_GO to NBD_OPT_EXTENDED_HEADERS/));
    },
  );
});

test('a bad option reply magic: EPROTO', async () => {
  await against(
    async (p) => {
      p.write(encodeGreeting(NBD_HS_FLAG.NBD_FLAG_FIXED_NEWSTYLE));
      await p.read(4);
      const { option } = await p.option();
      const r = encodeOptionReply(option, NBD_REP.NBD_REP_ACK);
      r.writeUInt32BE(0xdeadbeef, 0);
      p.write(r);
      await idle(p);
    },
    async (s) => {
      await assert.rejects(bounded(NbdClient.connect(s.uri), 'connect'), blockError('EPROTO', /bad option reply magic/));
    },
  );
});

test('a handshake that stalls: ETIMEDOUT after handshakeTimeoutMs', async () => {
  // Once with no greeting at all, once in the middle of the options.
  for (const stallAfterGreeting of [false, true]) {
    await against(
      async (p) => {
        if (stallAfterGreeting) {
          p.write(encodeGreeting(NBD_HS_FLAG.NBD_FLAG_FIXED_NEWSTYLE));
          await p.read(4);
        }
        await idle(p);
      },
      async (s) => {
        const t0 = Date.now();
        await assert.rejects(bounded(NbdClient.connect(s.uri, { handshakeTimeoutMs: 150 }), 'connect'), blockError('ETIMEDOUT', /within 150 ms/));
        assert.ok(Date.now() - t0 < 2000);
      },
    );
  }
});

test('a handshake that stalls after STARTTLS is ACKed (no TLS handshake): ETIMEDOUT, not a misleading close', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-hostile-psk-'));
  const psk = path.join(dir, 'k.psk');
  fs.writeFileSync(psk, `alice:${'ab'.repeat(32)}\n`);
  try {
    await against(
      async (p) => {
        p.write(encodeGreeting(NBD_HS_FLAG.NBD_FLAG_FIXED_NEWSTYLE));
        await p.read(4);
        const { option } = await p.option();
        assert.equal(option, NBD_OPT.NBD_OPT_STARTTLS);
        p.write(encodeOptionReply(option, NBD_REP.NBD_REP_ACK));
        // The ClientHello arrives and is never answered.
        await idle(p);
      },
      async (s) => {
        const uri = s.uri.replace('nbd+unix://', 'nbds+unix://alice@') + `&tls-psk-file=${encodeURIComponent(psk)}`;
        await assert.rejects(bounded(NbdClient.connect(uri, { handshakeTimeoutMs: 200 }), 'connect'), blockError('ETIMEDOUT', /within 200 ms/));
      },
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('connect with an AbortSignal: already aborted, or aborted while the handshake stalls: ECANCELED', async () => {
  await against(idle, async (s) => {
    await assert.rejects(bounded(NbdClient.connect(s.uri, { signal: AbortSignal.abort() }), 'connect'), blockError('ECANCELED', /aborted/));
    const ac = new AbortController();
    const p = assert.rejects(bounded(NbdClient.connect(s.uri, { signal: ac.signal }), 'connect'), blockError('ECANCELED', /aborted/));
    await sleep(50);
    ac.abort();
    await p;
  });
});

for (const [min, pref, max] of [
  [0, 4096, 65536],
  [3, 4096, 65536],
  [4096, 512, 65536],
  [4096, 4096, 0],
  [2 ** 17, 2 ** 17, 2 ** 20],
] as const) {
  test(`an impossible NBD_INFO_BLOCK_SIZE (${min}, ${pref}, ${max}): EPROTO, not requests of garbage length`, async () => {
    await against(
      async (p) => {
        await p.handshake('structured', { blockSize: [min, pref, max] });
        // Answer whatever comes (a client that went on would send a READ here).
        for (;;) {
          const h = await p.request();
          if (h.type === NBD_CMD.NBD_CMD_DISC) return;
          p.chunk(h, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_NONE, Buffer.alloc(0));
        }
      },
      async (s) => {
        await assert.rejects(bounded(NbdClient.connect(s.uri, CLIENT_MODE.structured), 'connect'), blockError('EPROTO', /NBD_INFO_BLOCK_SIZE/));
      },
    );
  });
}

test(`LIST replies adding up to more than MAX_OPTION_REPLY_TOTAL: EPROTO, the client stops collecting`, async () => {
  const entry = encodeRepServer('x'.repeat(100), 'd'.repeat(MAX_OPTION_REPLY_LENGTH - 200));
  const n = Math.ceil(MAX_OPTION_REPLY_TOTAL / entry.length) + 2;
  await against(
    async (p) => {
      p.write(encodeGreeting(NBD_HS_FLAG.NBD_FLAG_FIXED_NEWSTYLE));
      await p.read(4);
      const { option } = await p.option();
      assert.equal(option, NBD_OPT.NBD_OPT_LIST);
      const one = encodeOptionReply(option, NBD_REP.NBD_REP_SERVER, entry);
      for (let i = 0; i < n && !p.sock.destroyed; i++) {
        if (p.sock.write(one)) continue;
        await new Promise<void>((resolve) => {
          const done = () => {
            p.sock.off('drain', done).off('close', done);
            resolve();
          };
          p.sock.on('drain', done).on('close', done);
        });
      }
      await idle(p);
    },
    async (s) => {
      await assert.rejects(bounded(NbdClient.list(s.uri), 'list'), blockError('EPROTO', /option replies/));
    },
  );
});

test('the server closing during the handshake: ECONNRESET that says so', async () => {
  await against(
    async (p) => {
      p.write(encodeGreeting(NBD_HS_FLAG.NBD_FLAG_FIXED_NEWSTYLE));
      await p.read(4);
      await p.option();
      p.sock.destroy();
    },
    async (s) => {
      await assert.rejects(bounded(NbdClient.connect(s.uri), 'connect'), blockError('ECONNRESET', /closed the connection during the handshake/));
    },
  );
});

for (const noZeroes of [true, false]) {
  test(`GO answered with NBD_REP_ERR_UNSUP: simple mode falls back to EXPORT_NAME and works (${noZeroes ? 'NO_ZEROES' : 'with the 124 zeroes'})`, async () => {
    const seen: number[] = [];
    await against(
      async (p) => {
        p.write(encodeGreeting(NBD_HS_FLAG.NBD_FLAG_FIXED_NEWSTYLE | (noZeroes ? NBD_HS_FLAG.NBD_FLAG_NO_ZEROES : 0)));
        await p.read(4);
        for (;;) {
          const { option, data } = await p.option();
          seen.push(option);
          if (option === NBD_OPT.NBD_OPT_EXPORT_NAME) {
            assert.equal(data.toString(), 'disk');
            p.write(encodeExportNameReply(1 << 20, NBD_FLAG.NBD_FLAG_HAS_FLAGS | NBD_FLAG.NBD_FLAG_SEND_FLUSH, noZeroes));
            break;
          }
          p.write(encodeOptionReply(option, NBD_REP.NBD_REP_ERR_UNSUP, 'no such thing here'));
        }
        // Transmission, simple replies: one READ answered with data, one FLUSH, then DISC.
        for (;;) {
          const h = await p.request();
          if (h.type === NBD_CMD.NBD_CMD_DISC) return;
          if (h.type === NBD_CMD.NBD_CMD_READ) p.simple(h.cookie, 0, Buffer.alloc(h.length, 0x5a));
          else p.simple(h.cookie);
        }
      },
      async (s) => {
        const c = await bounded(NbdClient.connect(s.uri, CLIENT_MODE.simple), 'connect');
        try {
          assert.equal(c.mode, 'simple');
          assert.equal(c.size, 1 << 20);
          assert.equal(c.blockSize, null);
          const b = Buffer.alloc(1000);
          await bounded(c.pread(b, 4096), 'read');
          assert.ok(b.every((x) => x === 0x5a));
          await bounded(c.flush(), 'flush');
        } finally {
          await bounded(c.close(), 'close');
        }
        assert.deepEqual(seen, [NBD_OPT.NBD_OPT_GO, NBD_OPT.NBD_OPT_EXPORT_NAME]);
        await bounded(s.done, 'script');
      },
    );
  });
}

test('GO refused with NBD_REP_ERR_UNSUP after structured replies were agreed: an error, not a silent fallback', async () => {
  await against(
    async (p) => {
      await p.handshake('structured', {
        onOption: (opt) => {
          if (opt !== NBD_OPT.NBD_OPT_GO) return false;
          p.write(encodeOptionReply(opt, NBD_REP.NBD_REP_ERR_UNSUP));
          return true;
        },
      });
    },
    async (s) => {
      await assert.rejects(bounded(NbdClient.connect(s.uri, CLIENT_MODE.structured), 'connect'), blockError('EOPNOTSUPP', /NBD_OPT_GO.*NBD_REP_ERR_UNSUP/));
    },
  );
});

test('EXPORT_NAME fallback: an export size above 2^53 - 1 is refused (EOVERFLOW)', async () => {
  await against(
    async (p) => {
      p.write(encodeGreeting(NBD_HS_FLAG.NBD_FLAG_FIXED_NEWSTYLE | NBD_HS_FLAG.NBD_FLAG_NO_ZEROES));
      await p.read(4);
      for (;;) {
        const { option } = await p.option();
        if (option === NBD_OPT.NBD_OPT_EXPORT_NAME) {
          const r = Buffer.alloc(10);
          r.writeBigUInt64BE(0xffff_ffff_ffff_f000n, 0);
          r.writeUInt16BE(NBD_FLAG.NBD_FLAG_HAS_FLAGS, 8);
          p.write(r);
          break;
        }
        p.write(encodeOptionReply(option, NBD_REP.NBD_REP_ERR_UNSUP));
      }
      await idle(p);
    },
    async (s) => {
      await assert.rejects(bounded(NbdClient.connect(s.uri, CLIENT_MODE.simple), 'connect'), blockError('EOVERFLOW', /2\^53/));
    },
  );
});

// -----------------------------------------------------------------------------------
// Transmission

/**
 * Connects in `mode`, sends a READ of 4096 bytes at 4096 (into a buffer of 0xaa) and a
 * FLUSH, lets the script misbehave, and checks both calls reject with `code` and
 * `message`, the READ buffer outside what the server may have filled is untouched, and
 * later calls fail too.
 */
async function violation(mode: Mode, misbehave: (p: Peer, read: RequestHeader) => void | Promise<void>, code: string, message: RegExp): Promise<void> {
  await against(
    async (p) => {
      await p.handshake(mode);
      const reqs = [await p.request(), await p.request()];
      const read = reqs.find((r) => r.type === NBD_CMD.NBD_CMD_READ)!;
      await misbehave(p, read);
      await idle(p);
    },
    async (s) => {
      const c = await bounded(NbdClient.connect(s.uri, CLIENT_MODE[mode]), 'connect');
      try {
        assert.equal(c.mode, mode);
        const buf = Buffer.alloc(4096, 0xaa);
        const before = process.memoryUsage().arrayBuffers;
        const results = await bounded(Promise.allSettled([c.pread(buf, 4096), c.flush()]), 'requests in flight');
        for (const r of results) {
          assert.equal(r.status, 'rejected');
          blockError(code, message)((r as PromiseRejectedResult).reason);
        }
        assert.ok(process.memoryUsage().arrayBuffers - before < 64 * 1024 * 1024, 'nothing large was allocated');
        await assert.rejects(bounded(c.pread(Buffer.alloc(1), 0), 'later call'), blockError(code, message));
      } finally {
        await bounded(c.close(), 'close');
      }
    },
  );
}

for (const mode of ['simple', 'structured', 'extended'] as const) {
  test(`${mode}: a reply with an unknown cookie: EPROTO for every request in flight`, async () => {
    await violation(
      mode,
      (p, read) => {
        if (mode === 'simple') p.simple(read.cookie + 1000n);
        else p.chunk(read, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_NONE, Buffer.alloc(0), 0, read.cookie + 1000n);
      },
      'EPROTO',
      /cookie not in flight/,
    );
  });

  test(`${mode}: a bad reply magic: EPROTO`, async () => {
    await violation(
      mode,
      (p) => {
        p.write(Buffer.alloc(32, 0x11));
      },
      'EPROTO',
      /bad reply magic/,
    );
  });

  test(`${mode}: the server closing in the middle of READ data: ECONNRESET, the pread and the other request reject`, async () => {
    await violation(
      mode,
      (p, read) => {
        if (mode === 'simple') {
          p.simple(read.cookie, 0, Buffer.alloc(100, 1));
        } else {
          const off = Buffer.alloc(8);
          off.writeBigUInt64BE(BigInt(read.offset));
          // Announces 4096 bytes of data, sends 100.
          p.chunk(read, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([off, Buffer.alloc(100, 1)]), 8 + 4096);
        }
        p.sock.end();
      },
      'ECONNRESET',
      /the server closed the connection/,
    );
  });
}

for (const mode of ['structured', 'extended'] as const) {
  test(`${mode}: OFFSET_DATA outside the READ's range: EPROTO, nothing written outside the buffer`, async () => {
    await violation(
      mode,
      (p, read) => {
        const off = Buffer.alloc(8);
        off.writeBigUInt64BE(BigInt(read.offset + 2048));
        p.chunk(read, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([off, Buffer.alloc(4096, 1)]));
      },
      'EPROTO',
      /OFFSET_DATA outside its READ/,
    );
  });

  test(`${mode}: OFFSET_DATA before the READ's offset: EPROTO`, async () => {
    await violation(
      mode,
      (p, read) => {
        const off = Buffer.alloc(8);
        off.writeBigUInt64BE(BigInt(read.offset - 1));
        p.chunk(read, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([off, Buffer.alloc(16, 1)]));
      },
      'EPROTO',
      /OFFSET_DATA outside its READ/,
    );
  });

  test(`${mode}: OFFSET_HOLE outside the READ's range: EPROTO`, async () => {
    await violation(
      mode,
      (p, read) => {
        p.chunk(read, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_OFFSET_HOLE, encodeHolePayload(read.offset, 8192));
      },
      'EPROTO',
      /OFFSET_HOLE outside its READ/,
    );
  });

  test(`${mode}: an error chunk whose message length exceeds the chunk: EPROTO`, async () => {
    await violation(
      mode,
      (p, read) => {
        const e = encodeErrorPayload(5, 'short');
        e.writeUInt16BE(200, 4);
        p.chunk(read, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_ERROR, e);
      },
      'EPROTO',
      /error message longer than its chunk/,
    );
  });

  test(`${mode}: a 4 GiB chunk length: EPROTO at once, nothing allocated`, async () => {
    await violation(
      mode,
      (p, read) => {
        // An ERROR chunk claiming 4 GiB - 1 (structured: the u32's maximum) or 4 GiB (extended), with no payload sent.
        p.chunk(read, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_ERROR, Buffer.alloc(0), mode === 'extended' ? 2 ** 32 : 2 ** 32 - 1);
      },
      'EPROTO',
      new RegExp(`chunk \\(at most ${MAX_CHUNK_PAYLOAD} accepted\\)`),
    );
  });

  test(`${mode}: a 4 GiB OFFSET_DATA for a 4 KiB READ: EPROTO at once`, async () => {
    await violation(
      mode,
      (p, read) => {
        const off = Buffer.alloc(8);
        off.writeBigUInt64BE(BigInt(read.offset));
        p.chunk(read, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_OFFSET_DATA, off, mode === 'extended' ? 2 ** 32 + 8 : 2 ** 32 - 1);
      },
      'EPROTO',
      /OFFSET_DATA outside its READ/,
    );
  });

  test(`${mode}: a READ reply that ends without covering the range: EPROTO, not stale bytes`, async () => {
    await violation(
      mode,
      (p, read) => {
        const off = Buffer.alloc(8);
        off.writeBigUInt64BE(BigInt(read.offset));
        p.chunk(read, 0, NBD_REPLY_TYPE.NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([off, Buffer.alloc(1024, 1)]));
        p.chunk(read, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_NONE, Buffer.alloc(0));
      },
      'EPROTO',
      /READ.*1024 of 4096 bytes/,
    );
  });
}

test('structured: a simple reply to READ after structured replies were agreed: EPROTO', async () => {
  await violation(
    'structured',
    (p, read) => {
      p.simple(read.cookie, 0, Buffer.alloc(4096, 1));
    },
    'EPROTO',
    /simple reply to READ after structured replies were agreed/,
  );
});

test('extended: a simple reply at all: EPROTO (bad reply magic)', async () => {
  await violation(
    'extended',
    (p, read) => {
      p.simple(read.cookie);
    },
    'EPROTO',
    /bad reply magic/,
  );
});

for (const mode of ['structured', 'extended'] as const) {
  test(`${mode}: BLOCK_STATUS answered only for another context id: EPROTO, and the connection is given up`, async () => {
    await against(
      async (p) => {
        await p.handshake(mode);
        for (;;) {
          const h = await p.request();
          if (h.type === NBD_CMD.NBD_CMD_DISC) return;
          if (h.type === NBD_CMD.NBD_CMD_BLOCK_STATUS) {
            const bs = encodeBlockStatus(p.contextId + 1, [{ length: h.length, flags: 0 }]);
            if (mode === 'extended') {
              const ext = Buffer.alloc(8 + 16);
              ext.writeUInt32BE(p.contextId + 1, 0);
              ext.writeUInt32BE(1, 4);
              ext.writeBigUInt64BE(BigInt(h.length), 8);
              p.chunk(h, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_BLOCK_STATUS_EXT, ext);
            } else p.chunk(h, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_BLOCK_STATUS, bs);
          } else p.chunk(h, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_NONE, Buffer.alloc(0));
        }
      },
      async (s) => {
        const c = await bounded(NbdClient.connect(s.uri, CLIENT_MODE[mode]), 'connect');
        try {
          assert.ok(c.canBlockStatus());
          await assert.rejects(bounded(c.blockStatus(0, 65536), 'block status'), blockError('EPROTO', /without extents for the context asked/));
          // EPROTO always means the connection is gone: later calls fail the same way.
          await assert.rejects(bounded(c.flush(), 'flush after'), blockError('EPROTO', /without extents/));
        } finally {
          await bounded(c.close(), 'close');
        }
      },
    );
  });
}

test('a server that stops answering: close() is bounded by the caller, pending calls reject when the connection goes', async () => {
  await against(
    async (p) => {
      await p.handshake('structured');
      await p.request();
      await sleep(100);
      p.sock.destroy();
    },
    async (s) => {
      const c = await bounded(NbdClient.connect(s.uri, CLIENT_MODE.structured), 'connect');
      await assert.rejects(bounded(c.pread(Buffer.alloc(512), 0), 'read'), blockError('ECONNRESET', /closed the connection/));
      await bounded(c.close(), 'close');
    },
  );
});
