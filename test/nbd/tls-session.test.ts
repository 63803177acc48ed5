/**
 * STARTTLS and listener address rules on a real NbdServer over TCP, with a hand-written
 * client: the clear-text handshake byte by byte, STARTTLS, then Node's TLS client (PSK)
 * on the same socket and the rest of the handshake and transmission inside TLS. Covers
 * what the server must forget after TLS, what it must close on (bytes before the
 * ClientHello, garbage, a stalled or abandoned TLS handshake, a wrong key), and who the
 * listener admits by address (IPv4 and IPv6).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { MemoryDevice } from '../../src/backends/memory.js';
import { Export, type ExportSession } from '../../src/export/export.js';
import { NbdServer, type ListenerOptions, type NbdServerOptions } from '../../src/nbd/server.js';
import type { NbdSession } from '../../src/nbd/session.js';
import type { ServerLimits } from '../../src/nbd/limits.js';
import { loadTls, type TlsMode } from '../../src/nbd/tls.js';
import { NBD_CLIENT_FLAG, NBD_CMD, NBD_CMD_FLAG, NBD_FLAG, NBD_MAGIC, NBD_OPT, NBD_REP, NBD_SIZE } from '../../src/nbd/constants.js';
import { decodeOptionReplyHeader, decodeReplyHeader, encodeInfoRequest, encodeOption, encodeRequest, readU64 } from '../../src/nbd/codec.js';
import type { AddressRuleSpec } from '../../src/io/address-rules.js';
import { ByteSocket } from '../helpers/byte-socket.js';
import { capturingLogger, pattern, until } from './helpers.js';

const O = NBD_OPT;
const R = NBD_REP;
const SIZE = 1 << 20;
/** How long a test waits for bytes, a close or a TLS handshake before failing. */
const WAIT_MS = 5000;

let dir: string;
let pskFile: string;
const aliceKey = crypto.randomBytes(32);
const bobKey = crypto.randomBytes(32);

before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-tls-session-'));
  pskFile = path.join(dir, 'keys.psk');
  fs.writeFileSync(pskFile, `# test keys\nalice:${aliceKey.toString('hex')}\nbob:${bobKey.toString('hex')}\n`);
});
after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** An export that remembers the sessions attached to it, so a test can look at one. */
class WatchedExport extends Export {
  readonly attached: ExportSession[] = [];
  override attach(session: ExportSession): void {
    this.attached.push(session);
    super.attach(session);
  }
}

interface TestServer {
  readonly server: NbdServer;
  readonly host: string;
  readonly port: number;
  readonly disk: WatchedExport;
  readonly log: ReturnType<typeof capturingLogger>;
  /** Messages of the log lines so far. */
  messages(): string[];
  close(): Promise<void>;
}

interface ServerSetup {
  readonly mode?: TlsMode;
  /** X.509 credentials instead of the PSK file. */
  readonly certificates?: string;
  readonly verifyPeer?: boolean;
  readonly host?: string;
  readonly rules?: AddressRuleSpec;
  readonly limits?: Partial<ServerLimits>;
  readonly access?: NbdServerOptions['access'];
}

async function serve(setup: ServerSetup = {}): Promise<TestServer> {
  const mode = setup.mode ?? 'require';
  const disk = new WatchedExport({ name: 'disk', description: 'a disk', device: new MemoryDevice({ size: SIZE }) });
  const secret = new Export({ name: 'secret', device: new MemoryDevice({ size: SIZE }) });
  const bobs = new Export({ name: 'bobs', device: new MemoryDevice({ size: SIZE }) });
  const log = capturingLogger('debug');
  const server = new NbdServer({
    exports: [disk, secret, bobs],
    logger: log.logger,
    ...(setup.limits ? { limits: setup.limits } : {}),
    ...(setup.access ? { access: setup.access } : {}),
  });
  const opts: ListenerOptions = {
    tls:
      mode === 'off' ? loadTls({ mode })
      : setup.certificates !== undefined ? loadTls({ mode, certificates: setup.certificates, verifyPeer: setup.verifyPeer })
      : loadTls({ mode, psk: pskFile }),
    ...(setup.rules ? { rules: setup.rules } : {}),
  };
  const addr = await server.listen({ host: setup.host ?? '127.0.0.1', port: 0 }, opts);
  assert.ok('port' in addr);
  return {
    server,
    host: addr.host,
    port: addr.port,
    disk,
    log,
    messages: () => log.lines().map((l) => String(l.msg)),
    async close() {
      await server.close(1000);
      for (const e of [disk, secret, bobs]) await e.device.close().catch(() => undefined);
    },
  };
}

interface OptionReply {
  readonly type: number;
  readonly data: Buffer;
}

/** A hand-written NBD client over TCP that can move its byte stream into TLS. */
class Client {
  raw: net.Socket;
  /** The socket the client talks over: the TCP socket, then the TLS one. */
  socket: net.Socket;
  bytes: ByteSocket;

  private constructor(raw: net.Socket) {
    this.raw = raw;
    this.socket = raw;
    this.bytes = new ByteSocket(raw);
  }

  static connect(host: string, port: number, localAddress?: string): Promise<Client> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host, port, ...(localAddress ? { localAddress } : {}) });
      const t = setTimeout(() => {
        s.destroy();
        reject(new Error('connect timed out'));
      }, WAIT_MS);
      s.once('connect', () => {
        clearTimeout(t);
        resolve(new Client(s));
      });
      s.once('error', (e) => {
        clearTimeout(t);
        reject(e);
      });
    });
  }

  /** Reads the greeting, checks it, and sends FIXED_NEWSTYLE | NO_ZEROES. */
  async greet(): Promise<void> {
    const g = await this.bytes.read(NBD_SIZE.GREETING, WAIT_MS);
    assert.equal(g.subarray(0, 8).toString('latin1'), 'NBDMAGIC');
    assert.equal(g.readBigUInt64BE(8), NBD_MAGIC.IHAVEOPT);
    const f = Buffer.alloc(4);
    f.writeUInt32BE(NBD_CLIENT_FLAG.NBD_FLAG_C_FIXED_NEWSTYLE | NBD_CLIENT_FLAG.NBD_FLAG_C_NO_ZEROES, 0);
    this.bytes.write(f);
  }

  /** Sends an option and reads its replies up to the final one (ACK or an error). */
  async option(opt: number, data?: Buffer): Promise<OptionReply[]> {
    this.bytes.write(encodeOption(opt, data));
    return this.replies(opt);
  }

  async replies(opt: number): Promise<OptionReply[]> {
    const out: OptionReply[] = [];
    for (;;) {
      const h = decodeOptionReplyHeader(await this.bytes.read(NBD_SIZE.OPTION_REPLY_HEADER, WAIT_MS));
      assert.ok(h.magicOk, 'option reply magic');
      assert.equal(h.option, opt, 'the reply is for the option sent');
      const data = await this.bytes.read(h.length, WAIT_MS);
      out.push({ type: h.type, data });
      if (h.type === R.NBD_REP_ACK || h.type >= 0x80000000) return out;
    }
  }

  async types(opt: number, data?: Buffer): Promise<number[]> {
    return (await this.option(opt, data)).map((r) => r.type);
  }

  /** The export names a LIST returns. */
  async list(): Promise<string[]> {
    const r = await this.option(O.NBD_OPT_LIST);
    assert.equal(r.at(-1)!.type, R.NBD_REP_ACK);
    return r.filter((x) => x.type === R.NBD_REP_SERVER).map((x) => x.data.subarray(4, 4 + x.data.readUInt32BE(0)).toString());
  }

  /** Sends STARTTLS and expects its ACK (without data). */
  async startTls(): Promise<void> {
    const r = await this.option(O.NBD_OPT_STARTTLS);
    assert.deepEqual(r.map((x) => [x.type, x.data.length]), [[R.NBD_REP_ACK, 0]]);
  }

  /** Runs the client side of the TLS handshake on the connection (PSK), then talks through it. */
  tls(identity = 'alice', key = aliceKey): Promise<tls.TLSSocket> {
    return this.tlsWith({
      pskCallback: () => ({ identity, psk: key }),
      ciphers: 'TLS_AES_128_GCM_SHA256:PSK-AES128-GCM-SHA256',
    });
  }

  /** The client side of the TLS handshake with these options (server identity not checked). */
  async tlsWith(options: tls.ConnectionOptions): Promise<tls.TLSSocket> {
    assert.equal(this.bytes.available, 0, 'nothing after the ACK before the TLS handshake');
    this.raw.removeAllListeners('data');
    const secure = tls.connect({ ...options, socket: this.raw, checkServerIdentity: () => undefined });
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('TLS handshake timed out')), WAIT_MS);
      secure.once('secureConnect', () => {
        clearTimeout(t);
        resolve();
      });
      secure.once('error', (e) => {
        clearTimeout(t);
        reject(e);
      });
      secure.once('close', () => {
        clearTimeout(t);
        reject(new Error('closed during the TLS handshake'));
      });
    });
    this.socket = secure;
    this.bytes = new ByteSocket(secure);
    return secure;
  }

  /** Sends GO for `name` and returns its export flags (INFO_EXPORT). */
  async go(name = 'disk'): Promise<number> {
    const r = await this.option(O.NBD_OPT_GO, encodeInfoRequest(name, []));
    assert.equal(r.at(-1)!.type, R.NBD_REP_ACK, `GO ${name}: 0x${r.at(-1)!.type.toString(16)} ${r.at(-1)!.data.toString()}`);
    const info = r.find((x) => x.type === R.NBD_REP_INFO && x.data.readUInt16BE(0) === 0)!;
    return info.data.readUInt16BE(10);
  }

  request(type: number, cookie: bigint, offset: number, length: number, extended = false, payload?: Buffer): void {
    // With extended headers a payload is announced by PAYLOAD_LEN.
    const flags = extended && payload ? NBD_CMD_FLAG.NBD_CMD_FLAG_PAYLOAD_LEN : 0;
    const h = encodeRequest(flags, type, cookie, offset, length, extended);
    this.bytes.write(payload ? Buffer.concat([h, payload]) : h);
  }

  /** Reads one reply header by its magic. */
  async replyHeader(): Promise<ReturnType<typeof decodeReplyHeader>> {
    const first = await this.bytes.read(4, WAIT_MS);
    const magic = first.readUInt32BE(0);
    const size =
      magic === NBD_MAGIC.NBD_SIMPLE_REPLY_MAGIC ? 16
      : magic === NBD_MAGIC.NBD_STRUCTURED_REPLY_MAGIC ? 20
      : magic === NBD_MAGIC.NBD_EXTENDED_REPLY_MAGIC ? 32
      : 0;
    assert.notEqual(size, 0, `bad reply magic 0x${magic.toString(16)}`);
    return decodeReplyHeader(Buffer.concat([first, await this.bytes.read(size - 4, WAIT_MS)]));
  }

  /** Resolves true once the server has closed the connection. */
  closedByServer(timeoutMs = WAIT_MS): Promise<boolean> {
    return this.bytes.closed(timeoutMs);
  }

  destroy(): void {
    this.socket.destroy();
    this.raw.destroy();
  }
}

/** Connects, greets, STARTTLS, and finishes the TLS handshake with alice's key. */
async function tlsClient(s: TestServer): Promise<Client> {
  const c = await Client.connect(s.host, s.port);
  await c.greet();
  await c.startTls();
  await c.tls();
  return c;
}

/** A WRITE then a READ of the same bytes with simple replies. */
async function writeReadSimple(c: Client, offset: number, data: Buffer): Promise<void> {
  c.request(NBD_CMD.NBD_CMD_WRITE, 1n, offset, data.length, false, data);
  const w = await c.replyHeader();
  assert.deepEqual([w.kind, w.cookie, w.error], ['simple', 1n, 0]);
  c.request(NBD_CMD.NBD_CMD_READ, 2n, offset, data.length);
  const r = await c.replyHeader();
  assert.deepEqual([r.kind, r.cookie, r.error], ['simple', 2n, 0]);
  assert.deepEqual(await c.bytes.read(data.length, WAIT_MS), data);
}

describe("STARTTLS with PSK on a 'require' listener", () => {
  let s: TestServer;
  before(async () => (s = await serve({ mode: 'require' })));
  after(() => s.close());

  test('in clear LIST is ERR_TLS_REQD; after STARTTLS and a PSK handshake GO, WRITE and READ work inside TLS', async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      assert.deepEqual(await c.types(O.NBD_OPT_LIST), [R.NBD_REP_ERR_TLS_REQD]);
      await c.startTls();
      const secure = await c.tls();
      assert.ok(secure.encrypted);
      assert.deepEqual(await c.list(), ['disk', 'secret', 'bobs']);
      await c.go('disk');
      await writeReadSimple(c, 4096, pattern(8192, 3));
      const onDisk = Buffer.alloc(8192);
      await s.disk.device.read(onDisk, 4096, 0);
      assert.deepEqual(onDisk, pattern(8192, 3), 'the WRITE reached the device');
    } finally {
      c.destroy();
    }
  });

  test('the session records the PSK identity (session.tls) and logs TLS established with it', async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      await c.startTls();
      await c.tls('bob', bobKey);
      const before = s.disk.attached.length;
      await c.go('disk');
      await until(() => s.disk.attached.length > before, 'the session attaching');
      const session = s.disk.attached.at(-1) as NbdSession;
      assert.equal(session.tls?.pskIdentity, 'bob');
      assert.match(session.tls?.protocol ?? '', /^TLSv1\.[23]$/);
      assert.equal(session.client.tls?.pskIdentity, 'bob');
      const established = s.log.lines().filter((l) => l.msg === 'TLS established' && l.session === session.id);
      assert.equal(established.length, 1);
      assert.equal(established[0]!.pskIdentity, 'bob');
    } finally {
      c.destroy();
    }
  });

  test('STRUCTURED_REPLY in clear is ERR_TLS_REQD, so GO inside TLS has no DF and READ gets a simple reply', async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      assert.deepEqual(await c.types(O.NBD_OPT_STRUCTURED_REPLY), [R.NBD_REP_ERR_TLS_REQD]);
      await c.startTls();
      await c.tls();
      const flags = await c.go('disk');
      assert.equal(flags & NBD_FLAG.NBD_FLAG_SEND_DF, 0);
      c.request(NBD_CMD.NBD_CMD_READ, 9n, 0, 512);
      const h = await c.replyHeader();
      assert.equal(h.kind, 'simple');
    } finally {
      c.destroy();
    }
  });

  test('extended headers negotiated after TLS work with 32-byte requests', async () => {
    const c = await tlsClient(s);
    try {
      assert.deepEqual(await c.types(O.NBD_OPT_EXTENDED_HEADERS), [R.NBD_REP_ACK]);
      const flags = await c.go('disk');
      assert.ok(flags & NBD_FLAG.NBD_FLAG_SEND_DF);
      const data = pattern(4096, 7);
      c.request(NBD_CMD.NBD_CMD_WRITE, 21n, 65536, data.length, true, data);
      const w = await c.replyHeader();
      assert.deepEqual([w.kind, w.cookie, w.flags & 1], ['extended', 21n, 1]);
      assert.equal(await c.bytes.read(w.length, WAIT_MS).then((b) => b.length), w.length);
      c.request(NBD_CMD.NBD_CMD_READ, 22n, 65536, data.length, true);
      const parts: Buffer[] = [];
      for (;;) {
        const h = await c.replyHeader();
        assert.equal(h.kind, 'extended');
        assert.equal(h.cookie, 22n);
        const payload = await c.bytes.read(h.length, WAIT_MS);
        if (h.type === 1 /* OFFSET_DATA */) parts.push(payload.subarray(8));
        if (h.flags & 1 /* DONE */) break;
      }
      assert.deepEqual(Buffer.concat(parts), data);
    } finally {
      c.destroy();
    }
  });

  test('large and pipelined requests inside TLS: 64 WRITEs of 64 KiB then 64 READs come back intact', async () => {
    const c = await tlsClient(s);
    try {
      await c.go('disk');
      const n = 64;
      const len = 64 * 1024;
      const data = (i: number) => pattern(len, i + 11);
      for (let i = 0; i < n; i++) c.request(NBD_CMD.NBD_CMD_WRITE, BigInt(i), (i * len) % SIZE, len, false, data(i % 16));
      const written = new Set<bigint>();
      for (let i = 0; i < n; i++) {
        const h = await c.replyHeader();
        assert.deepEqual([h.kind, h.error], ['simple', 0]);
        written.add(h.cookie);
      }
      assert.equal(written.size, n);
      for (let i = 0; i < 16; i++) c.request(NBD_CMD.NBD_CMD_READ, 1000n + BigInt(i), i * len, len);
      for (let i = 0; i < 16; i++) {
        const h = await c.replyHeader();
        assert.deepEqual([h.kind, h.error], ['simple', 0]);
        const k = Number(h.cookie - 1000n);
        assert.deepEqual(await c.bytes.read(len, WAIT_MS), data(k), `READ ${k}`);
      }
    } finally {
      c.destroy();
    }
  });

  test('a second STARTTLS inside TLS is ERR_INVALID and the haggling goes on', async () => {
    const c = await tlsClient(s);
    try {
      assert.deepEqual(await c.types(O.NBD_OPT_STARTTLS), [R.NBD_REP_ERR_INVALID]);
      await c.go('disk');
      await writeReadSimple(c, 0, pattern(512, 9));
    } finally {
      c.destroy();
    }
  });

  test('EXPORT_NAME in clear closes without a reply', async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      c.bytes.write(encodeOption(O.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
      assert.equal(await c.closedByServer(), true);
      assert.equal(c.bytes.available, 0);
    } finally {
      c.destroy();
    }
  });
});

describe('STARTTLS with extended headers on an \'on\' listener', () => {
  let s: TestServer;
  before(async () => (s = await serve({ mode: 'on' })));
  after(() => s.close());

  test('structured replies negotiated in clear, then STARTTLS: GO in TLS has no DF and READ replies are simple', async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      assert.deepEqual(await c.types(O.NBD_OPT_STRUCTURED_REPLY), [R.NBD_REP_ACK]);
      await c.startTls();
      await c.tls();
      const flags = await c.go('disk');
      assert.equal(flags & NBD_FLAG.NBD_FLAG_SEND_DF, 0, 'DF is offered only with structured replies');
      await writeReadSimple(c, 8192, pattern(1024, 5));
      await until(() => s.messages().includes('transmission'), 'the transmission log line');
      const line = s.log.lines().find((l) => l.msg === 'transmission')!;
      assert.equal(line.replies, 'simple');
    } finally {
      c.destroy();
    }
  });

  test('extended headers negotiated in clear are forgotten: after TLS EXPORT_NAME is allowed again', async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      assert.deepEqual(await c.types(O.NBD_OPT_EXTENDED_HEADERS), [R.NBD_REP_ACK]);
      await c.startTls();
      await c.tls();
      c.bytes.write(encodeOption(O.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
      const reply = await c.bytes.read(10, WAIT_MS);
      assert.equal(readU64(reply, 0), SIZE);
      // Compact (28-byte) requests, simple replies.
      await writeReadSimple(c, 0, pattern(512, 2));
    } finally {
      c.destroy();
    }
  });

  test('a client may stay in clear: GO without STARTTLS works', async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      await c.go('disk');
      await writeReadSimple(c, 0, pattern(512, 4));
    } finally {
      c.destroy();
    }
  });
});

describe('export access rules over the wire', () => {
  let s: TestServer;
  before(async () => (s = await serve({ mode: 'on', access: { secret: { tls: 'require' }, bobs: { pskIdentities: ['bob'] } } })));
  after(() => s.close());

  test('in clear the TLS-only exports are hidden from LIST and GO of one is ERR_TLS_REQD', async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      assert.deepEqual(await c.list(), ['disk']);
      assert.deepEqual(await c.types(O.NBD_OPT_GO, encodeInfoRequest('secret', [])), [R.NBD_REP_ERR_TLS_REQD]);
      assert.deepEqual(await c.types(O.NBD_OPT_INFO, encodeInfoRequest('bobs', [])), [R.NBD_REP_ERR_TLS_REQD]);
    } finally {
      c.destroy();
    }
  });

  test("after TLS as alice the TLS-only export opens and bob's export is ERR_POLICY and hidden", async () => {
    const c = await tlsClient(s);
    try {
      assert.deepEqual(await c.list(), ['disk', 'secret']);
      assert.deepEqual(await c.types(O.NBD_OPT_GO, encodeInfoRequest('bobs', [])), [R.NBD_REP_ERR_POLICY]);
      await c.go('secret');
      await writeReadSimple(c, 0, pattern(512, 6));
    } finally {
      c.destroy();
    }
  });

  test("as bob, bob's export opens", async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      await c.startTls();
      await c.tls('bob', bobKey);
      assert.deepEqual(await c.list(), ['disk', 'secret', 'bobs']);
      await c.go('bobs');
    } finally {
      c.destroy();
    }
  });
});

describe("an 'off' listener", () => {
  let s: TestServer;
  before(async () => (s = await serve({ mode: 'off' })));
  after(() => s.close());

  test('STARTTLS is ERR_POLICY and the clear-text haggling goes on', async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      assert.deepEqual(await c.types(O.NBD_OPT_STARTTLS), [R.NBD_REP_ERR_POLICY]);
      await c.go('disk');
      await writeReadSimple(c, 0, pattern(512, 8));
    } finally {
      c.destroy();
    }
  });
});

describe('what the server closes on around STARTTLS', () => {
  let s: TestServer;
  before(async () => (s = await serve({ mode: 'require' })));
  after(() => s.close());

  async function greeted(): Promise<Client> {
    const c = await Client.connect(s.host, s.port);
    await c.greet();
    return c;
  }

  test('bytes sent in the same write as STARTTLS (before its ACK) make the server close', async () => {
    const c = await greeted();
    try {
      c.bytes.write(Buffer.concat([encodeOption(O.NBD_OPT_STARTTLS), Buffer.from([0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])]));
      assert.equal(await c.closedByServer(), true);
      await until(() => s.messages().includes('data after STARTTLS before the TLS handshake, closing'), 'the log line');
      await until(() => s.server.sessionCount === 0, 'the session to close');
    } finally {
      c.destroy();
    }
  });

  test('garbage instead of a ClientHello makes the server close and log TLS handshake failed', async () => {
    const c = await greeted();
    try {
      await c.startTls();
      c.bytes.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
      assert.equal(await c.closedByServer(), true);
      await until(() => s.messages().some((m) => m.startsWith('TLS handshake failed')), 'the TLS handshake failed log line');
      await until(() => s.server.sessionCount === 0, 'the session to close');
    } finally {
      c.destroy();
    }
  });

  test('a client that closes in the middle of the TLS handshake leaves no session behind', async () => {
    const c = await greeted();
    await c.startTls();
    await until(() => s.server.sessionCount === 1, 'the session');
    // A TLS record header announcing a 512-byte handshake message, and only part of it.
    c.bytes.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]));
    c.destroy();
    await until(() => s.server.sessionCount === 0, 'the session to close');
  });

  test('a client that closes right after the ACK leaves no session behind', async () => {
    const c = await greeted();
    await c.startTls();
    await until(() => s.server.sessionCount === 1, 'the session');
    c.destroy();
    await until(() => s.server.sessionCount === 0, 'the session to close');
  });

  test('a wrong key for a known identity fails the TLS handshake and the server closes', async () => {
    const c = await greeted();
    try {
      await c.startTls();
      await assert.rejects(c.tls('alice', bobKey));
      await until(() => s.server.sessionCount === 0, 'the session to close');
      assert.ok(s.messages().some((m) => m.startsWith('TLS handshake failed')));
    } finally {
      c.destroy();
    }
  });

  test('an unknown PSK identity fails the TLS handshake', async () => {
    const c = await greeted();
    try {
      await c.startTls();
      await assert.rejects(c.tls('mallory', crypto.randomBytes(32)));
      await until(() => s.server.sessionCount === 0, 'the session to close');
    } finally {
      c.destroy();
    }
  });
});

describe('STARTTLS with X.509 client certificates (verifyPeer) and subject rules', () => {
  let certs: string;
  let s: TestServer;
  const pem = (name: string) => fs.readFileSync(path.join(certs, name));

  function openssl(...args: string[]): void {
    execFileSync('openssl', args, { stdio: 'ignore', timeout: 20_000, cwd: certs });
  }

  /** A key and a certificate for `subject`, signed by the test CA. */
  function issue(name: string, subject: string): void {
    openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', subject);
    openssl('x509', '-req', '-in', `${name}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${name}-cert.pem`, '-days', '2');
  }

  before(async () => {
    certs = path.join(dir, 'x509');
    fs.mkdirSync(certs);
    openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-subj', '/CN=blockgate test CA', '-days', '2');
    issue('server', '/CN=localhost');
    issue('alice', '/C=US/O=test/CN=alice');
    issue('bob', '/C=US/O=test/CN=bob');
    // A common name with a comma in it: one attribute, CN = 'mallory,CN=alice'.
    issue('mallory', '/C=US/O=test/CN=mallory,CN=alice');
    s = await serve({ mode: 'require', certificates: certs, verifyPeer: true, access: { secret: { subjects: ['CN=alice'] } } });
  });
  after(() => s?.close());

  async function certClient(name: 'alice' | 'bob' | 'mallory'): Promise<Client> {
    const c = await Client.connect(s.host, s.port);
    await c.greet();
    await c.startTls();
    await c.tlsWith({ ca: pem('ca-cert.pem'), cert: pem(`${name}-cert.pem`), key: pem(`${name}-key.pem`) });
    return c;
  }

  test("alice's certificate opens the export whose rule is CN=alice; session.tls has her subject", async () => {
    const c = await certClient('alice');
    try {
      assert.deepEqual(await c.list(), ['disk', 'secret', 'bobs']);
      await c.go('secret');
      await writeReadSimple(c, 0, pattern(512, 12));
    } finally {
      c.destroy();
    }
    const c2 = await certClient('alice');
    try {
      const before = s.disk.attached.length;
      await c2.go('disk');
      await until(() => s.disk.attached.length > before, 'the session attaching');
      const session = s.disk.attached.at(-1) as NbdSession;
      assert.equal(session.tls?.subject, 'C=US,O=test,CN=alice');
      assert.equal(session.tls?.pskIdentity, undefined);
    } finally {
      c2.destroy();
    }
  });

  test("bob's certificate is verified but the CN=alice export is ERR_POLICY and hidden from LIST", async () => {
    const c = await certClient('bob');
    try {
      assert.deepEqual(await c.list(), ['disk', 'bobs']);
      assert.deepEqual(await c.types(O.NBD_OPT_GO, encodeInfoRequest('secret', [])), [R.NBD_REP_ERR_POLICY]);
      await c.go('disk');
    } finally {
      c.destroy();
    }
  });

  test("a certificate whose CN is 'mallory,CN=alice' does not pass the CN=alice rule", async () => {
    // The CN value 'mallory,CN=alice' written into a subject string would read as two
    // fields; the rules compare the certificate's parsed fields, so it stays one value.
    const c = await certClient('mallory');
    try {
      assert.deepEqual(await c.list(), ['disk', 'bobs'], 'the CN=alice export is hidden from mallory');
      assert.deepEqual(await c.types(O.NBD_OPT_GO, encodeInfoRequest('secret', [])), [R.NBD_REP_ERR_POLICY]);
    } finally {
      c.destroy();
    }
  });

  test('a client without a certificate fails the TLS handshake (verifyPeer) and the server logs it', async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      await c.startTls();
      // TLS 1.3: the client may finish its side before the server refuses; either way the connection ends.
      const secure = await c.tlsWith({ ca: pem('ca-cert.pem') }).catch(() => null);
      if (secure) assert.equal(await c.closedByServer(), true);
      await until(() => s.server.sessionCount === 0, 'the session to close');
      await until(() => s.messages().some((m) => m.startsWith('TLS handshake failed')), 'the TLS handshake failed log line');
    } finally {
      c.destroy();
    }
  });
});

describe('server shutdown during STARTTLS', () => {
  test('a session waiting for its ClientHello is closed by server.close()', async () => {
    const s = await serve({ mode: 'require' });
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      await c.startTls();
      await until(() => s.server.sessionCount === 1, 'the session');
      const closing = s.close();
      assert.equal(await c.closedByServer(), true);
      await closing;
      assert.equal(s.server.sessionCount, 0);
    } finally {
      c.destroy();
      await s.close();
    }
  });
});

describe('the handshake timeout covers the TLS handshake', () => {
  let s: TestServer;
  before(async () => (s = await serve({ mode: 'require', limits: { handshakeTimeoutMs: 300 } })));
  after(() => s.close());

  test('STARTTLS and then no ClientHello: the server closes and logs the timeout', async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      await c.startTls();
      assert.equal(await c.closedByServer(), true);
      assert.ok(s.messages().includes('handshake timed out'));
      await until(() => s.server.sessionCount === 0, 'the session to close');
    } finally {
      c.destroy();
    }
  });

  test('a TLS handshake stalled after part of the ClientHello is closed too', async () => {
    const c = await Client.connect(s.host, s.port);
    try {
      await c.greet();
      await c.startTls();
      c.bytes.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]));
      assert.equal(await c.closedByServer(), true);
      await until(() => s.server.sessionCount === 0, 'the session to close');
    } finally {
      c.destroy();
    }
  });
});

describe('listener address rules', () => {
  test("allow ['127.0.0.2'] refuses a client from 127.0.0.1 before the greeting and admits one from 127.0.0.2", async () => {
    const s = await serve({ mode: 'require', rules: { allow: ['127.0.0.2'] } });
    try {
      const refused = await Client.connect(s.host, s.port);
      try {
        const localPort = refused.raw.localPort;
        assert.equal(await refused.closedByServer(), true);
        assert.equal(refused.bytes.available, 0, 'not a byte of greeting');
        await until(() => s.log.lines().some((l) => String(l.msg).startsWith('connection refused')), 'the refusal log line');
        const line = s.log.lines().find((l) => String(l.msg).startsWith('connection refused'))!;
        assert.equal(line.peer, `127.0.0.1:${localPort}`);
      } finally {
        refused.destroy();
      }
      const admitted = await Client.connect(s.host, s.port, '127.0.0.2');
      try {
        await admitted.greet();
        await admitted.startTls();
        await admitted.tls();
        await admitted.go('disk');
      } finally {
        admitted.destroy();
      }
    } finally {
      await s.close();
    }
  });

  test("deny ['127.0.0.0/8'] refuses a loopback client; sessionCount stays 0", async () => {
    const s = await serve({ mode: 'off', rules: { deny: ['127.0.0.0/8'] } });
    try {
      const c = await Client.connect(s.host, s.port, '127.0.0.3');
      try {
        assert.equal(await c.closedByServer(), true);
        assert.equal(c.bytes.available, 0);
        assert.equal(s.server.sessionCount, 0);
      } finally {
        c.destroy();
      }
    } finally {
      await s.close();
    }
  });

  test('IPv6 ::1: deny refuses, allow admits, an IPv4-only allow list refuses', async () => {
    for (const [rules, admitted] of [
      [{ deny: ['::1'] }, false],
      [{ allow: ['::1/128'] }, true],
      [{ allow: ['127.0.0.0/8'] }, false],
      [{ allow: ['::/0'], deny: ['fd00::/8'] }, true],
    ] as const) {
      const s = await serve({ mode: 'off', host: '::1', rules });
      try {
        assert.equal(s.host, '::1');
        const c = await Client.connect('::1', s.port);
        try {
          if (admitted) {
            await c.greet();
            await c.go('disk');
          } else {
            assert.equal(await c.closedByServer(), true, JSON.stringify(rules));
            assert.equal(c.bytes.available, 0);
            await until(() => s.log.lines().some((l) => String(l.msg).startsWith('connection refused')), 'the refusal log line');
            const line = s.log.lines().find((l) => String(l.msg).startsWith('connection refused'))!;
            assert.match(String(line.peer), /^::1:\d+$/);
          }
        } finally {
          c.destroy();
        }
      } finally {
        await s.close();
      }
    }
  });
});
