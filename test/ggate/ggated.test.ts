/**
 * GgatedServer against a ggatec-like client written here with the codec: two TCP
 * connections per client paired by token, version/cinit/sinit handshakes, requests on
 * the client's send connection and replies on its receive connection, all over real
 * loopback sockets to a captive server on 127.0.0.1, port 0.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import {
  GGATE_CMD,
  GGATE_FLAG,
  GGATE_MAGIC,
  GGATE_SIZE,
  MAX_REQUEST_LENGTH,
  decodeHdr,
  decodeSinit,
  decodeVersion,
  encodeCinit,
  encodeHdr,
  encodeVersion,
  parseExports,
  resolveExports,
  type GgateAccess,
  type GgateHdr,
  type GgateSinit,
  type U64,
} from '../../src/ggate/index.js';
import { BlockError, freebsdErrno, linuxErrno, type ErrnoCode } from '../../src/errors/index.js';
import { FilterDevice, type BlockDevice } from '../../src/device/index.js';
import { createStack } from '../../src/export/registry.js';
import {
  FrameReader,
  GgatedServer,
  loadExportsFile,
  type GgatedLimits,
  type GgateStackSource,
} from '../../src/ggate/ggated.js';
import { ByteSocket } from '../helpers/byte-socket.js';

const TIMEOUT_MS = 10_000;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-ggated-'));
const servers = new Set<GgatedServer>();
const sockets = new Set<net.Socket>();
after(async () => {
  for (const s of sockets) s.destroy();
  await Promise.all([...servers].map((s) => s.close(1000)));
  fs.rmSync(tmp, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------
// The byte-exact socket reader (test/helpers/byte-socket.ts), tracked for cleanup.

class Conn extends ByteSocket {
  constructor(socket: net.Socket) {
    super(socket);
    sockets.add(socket);
  }

  static open(port: number, localAddress?: string): Promise<Conn> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ port, host: '127.0.0.1', ...(localAddress ? { localAddress } : {}) }, () => resolve(new Conn(s)));
      s.setNoDelay(true);
      s.once('error', reject);
    });
  }
}

// ---------------------------------------------------------------------------------
// The ggatec side of the protocol.

const ACCESS_BITS: Record<GgateAccess, number> = {
  ro: GGATE_FLAG.GGATE_FLAG_RDONLY,
  wo: GGATE_FLAG.GGATE_FLAG_WRONLY,
  rw: 0,
};

interface Side {
  readonly conn: Conn;
  readonly sinit: GgateSinit;
}

/** One connection's handshake: version, then cinit; returns the sinit (refusals included). */
async function handshake(
  port: number,
  p: string,
  flags: U64,
  token: number,
  opts: { localAddress?: string; nconn?: number } = {},
): Promise<Side> {
  const conn = await Conn.open(port, opts.localAddress);
  conn.write(encodeVersion({ version: 0, error: null }));
  const v = decodeVersion(await conn.read(GGATE_SIZE.VERSION_SIZE));
  assert.ok(v.ok && v.value.magicOk && v.value.version === 0 && v.value.errno === 0, 'version echoed');
  conn.write(encodeCinit({ path: p, flags, nconn: opts.nconn ?? 2, token }));
  const s = decodeSinit(await conn.read(GGATE_SIZE.SINIT_SIZE));
  assert.ok(s.ok);
  return { conn, sinit: s.value };
}

let nextToken = 1000;

interface Reply {
  readonly hdr: GgateHdr;
  readonly data: Buffer | null;
}

class Client {
  /** The client's receive connection (GGATE_FLAG_SEND: the server sends on it). */
  readonly rx: Conn;
  /** The client's send connection (GGATE_FLAG_RECV: the server receives on it). */
  readonly tx: Conn;
  readonly sinit: GgateSinit;
  #seq = 1;

  private constructor(rx: Conn, tx: Conn, sinit: GgateSinit) {
    this.rx = rx;
    this.tx = tx;
    this.sinit = sinit;
  }

  /** Connects like ggatec: receive connection first, then send connection, same token. */
  static async open(port: number, p: string, access: GgateAccess = 'rw', opts: { token?: number; localAddress?: string } = {}): Promise<Client> {
    const token = opts.token ?? nextToken++;
    const a = ACCESS_BITS[access];
    const rx = await handshake(port, p, a | GGATE_FLAG.GGATE_FLAG_SEND, token, opts);
    if (rx.sinit.error !== null) throw new BlockError(rx.sinit.error, `receive connection refused: ${rx.sinit.error}`);
    const tx = await handshake(port, p, a | GGATE_FLAG.GGATE_FLAG_RECV, token, opts);
    if (tx.sinit.error !== null) throw new BlockError(tx.sinit.error, `send connection refused: ${tx.sinit.error}`);
    return new Client(rx.conn, tx.conn, tx.sinit);
  }

  send(cmd: number, offset: U64, length: number, payload?: Buffer, seq: U64 = this.#seq++): U64 {
    this.tx.write(encodeHdr({ cmd, offset, length, seq, error: null }));
    if (payload) this.tx.write(payload);
    return seq;
  }

  async reply(): Promise<Reply> {
    const d = decodeHdr(await this.rx.read(GGATE_SIZE.HDR_SIZE));
    assert.ok(d.ok);
    const hdr = d.value;
    const data = hdr.cmd === GGATE_CMD.GGATE_CMD_READ && hdr.errno === 0 ? await this.rx.read(hdr.length) : null;
    return { hdr, data };
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const seq = this.send(GGATE_CMD.GGATE_CMD_READ, offset, length);
    const r = await this.reply();
    assert.equal(r.hdr.seq, seq);
    assert.equal(r.hdr.error, null, `read failed: ${r.hdr.error}`);
    return r.data!;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    const seq = this.send(GGATE_CMD.GGATE_CMD_WRITE, offset, data.length, data);
    const r = await this.reply();
    assert.equal(r.hdr.seq, seq);
    assert.equal(r.hdr.error, null, `write failed: ${r.hdr.error}`);
  }

  /** FLUSH as GEOM sends it (offset = mediasize, length 0); resolves to its error. */
  async flush(): Promise<ErrnoCode | null> {
    const seq = this.send(GGATE_CMD.GGATE_CMD_FLUSH, this.sinit.mediasize, 0);
    const r = await this.reply();
    assert.equal(r.hdr.seq, seq);
    assert.equal(r.hdr.cmd, GGATE_CMD.GGATE_CMD_FLUSH);
    return r.hdr.error;
  }

  /** Sends a request and returns the error of its reply (payload read and checked for READ). */
  async expectError(cmd: number, offset: U64, length: number, payload?: Buffer): Promise<ErrnoCode | null> {
    const seq = this.send(cmd, offset, length, payload);
    const r = await this.reply();
    assert.equal(r.hdr.seq, seq);
    assert.equal(r.hdr.cmd, cmd);
    assert.equal(BigInt(r.hdr.offset), BigInt(offset));
    assert.equal(r.hdr.length, length);
    return r.hdr.error;
  }

  close(): void {
    this.tx.destroy();
    this.rx.destroy();
  }
}

// ---------------------------------------------------------------------------------
// A captive server.

async function start(
  exportsText: string,
  opts: { stacks?: Record<string, GgateStackSource>; limits?: Partial<GgatedLimits>; exportsFile?: string } = {},
): Promise<{ server: GgatedServer; port: number }> {
  const entries = await resolveExports(parseExports(exportsText), async () => '127.0.0.1');
  const server = new GgatedServer({
    exports: entries,
    ...(opts.stacks ? { stacks: opts.stacks } : {}),
    ...(opts.limits ? { limits: opts.limits } : {}),
    ...(opts.exportsFile ? { exportsFile: opts.exportsFile } : {}),
  });
  servers.add(server);
  const addr = await server.listen({ host: '127.0.0.1', port: 0 });
  return { server, port: addr.port };
}

async function stop(server: GgatedServer): Promise<void> {
  await server.close(1000);
  servers.delete(server);
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return b;
}

function tempFile(name: string, size: number): string {
  const f = path.join(tmp, name);
  fs.writeFileSync(f, Buffer.alloc(size));
  return f;
}

const MIB = 1024 * 1024;

/** Waits until `cond` holds (a state change driven by socket events), failing after the timeout. */
async function until(cond: () => boolean, what: string, timeoutMs = TIMEOUT_MS): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** A memory stack whose flush can be made to fail. */
class FlakyFlush extends FilterDevice {
  failures = 0;
  flushes = 0;
  override async flush(flags: number): Promise<void> {
    this.flushes++;
    if (this.failures > 0) {
      this.failures--;
      throw new BlockError('EIO', 'injected flush failure');
    }
    return super.flush(flags);
  }
}

async function flakyMemory(size = MIB): Promise<FlakyFlush> {
  return new FlakyFlush(await createStack({ backend: { type: 'memory', size } }));
}

// ---------------------------------------------------------------------------------

describe('ggated: handshake and data', () => {
  test('version is echoed, sinit carries media and sector size (memory stack)', async () => {
    const { server, port } = await start('127.0.0.1 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
    });
    const conn = await Conn.open(port);
    conn.write(encodeVersion({ version: 0, error: null }));
    const echoed = await conn.read(GGATE_SIZE.VERSION_SIZE);
    assert.equal(echoed.subarray(0, 16).toString('latin1'), GGATE_MAGIC);
    assert.equal(echoed.readUInt16BE(16), 0);
    assert.equal(echoed.readUInt16BE(18), 0);
    conn.destroy();

    const c = await Client.open(port, '/dev/mem0');
    assert.equal(c.sinit.mediasize, MIB);
    assert.equal(c.sinit.sectorsize, 512);
    assert.equal(c.sinit.errno, 0);
    await until(() => server.sessionCount === 1, 'the session');
    assert.equal(server.halfOpenCount, 0);
    c.close();
    await until(() => server.sessionCount === 0, 'the session to end');
    await stop(server);
  });

  test('read, write and flush round trips on a memory stack', async () => {
    const { server, port } = await start('127.0.0.1 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '4M' } } },
    });
    const c = await Client.open(port, '/dev/mem0');
    const data = pattern(128 * 1024, 1);
    await c.write(4096, data);
    assert.deepEqual(await c.read(4096, data.length), data);
    assert.deepEqual(await c.read(0, 4096), Buffer.alloc(4096));
    assert.equal(await c.flush(), null);
    // A full-size request (the length cap itself) is accepted.
    const big = pattern(MAX_REQUEST_LENGTH, 2);
    await c.write(MIB, big);
    assert.deepEqual(await c.read(MIB, MAX_REQUEST_LENGTH), big);
    // Zero-length READ and WRITE inside the device are accepted.
    assert.equal(await c.expectError(GGATE_CMD.GGATE_CMD_READ, 512, 0), null);
    assert.equal(await c.expectError(GGATE_CMD.GGATE_CMD_WRITE, 512, 0, Buffer.alloc(0)), null);
    // A second client of the same path shares the stack (and its data).
    const d = await Client.open(port, '/dev/mem0', 'ro');
    assert.deepEqual(await d.read(4096, data.length), data);
    c.close();
    d.close();
    await stop(server);
  });

  test('read, write and flush round trips on a file, data verified on disk', async () => {
    const file = tempFile('disk.img', 2 * MIB);
    const { server, port } = await start(`127.0.0.1 RW ${file}\n`);
    const c = await Client.open(port, file);
    assert.equal(c.sinit.mediasize, 2 * MIB);
    assert.equal(c.sinit.sectorsize, 512);
    const data = pattern(64 * 1024, 3);
    await c.write(512 * 3, data);
    assert.deepEqual(await c.read(512 * 3, data.length), data);
    assert.equal(await c.flush(), null);
    const disk = fs.readFileSync(file);
    assert.deepEqual(disk.subarray(512 * 3, 512 * 3 + data.length), data);
    assert.equal(server.table.openFiles, 1);
    c.close();
    // The file is closed when its last client leaves.
    await until(() => server.table.openFiles === 0, 'the file to be closed');
    await stop(server);
  });

  test('a file whose size is not a whole number of sectors is announced rounded down', async () => {
    const file = tempFile('odd.img', 10_000);
    const { server, port } = await start(`127.0.0.1 RO ${file}\n`);
    const c = await Client.open(port, file, 'ro');
    assert.equal(c.sinit.mediasize, 9728);
    assert.equal(await c.expectError(GGATE_CMD.GGATE_CMD_READ, 9728, 512), 'EINVAL');
    c.close();
    await stop(server);
  });

  test('short backend I/O is EIO: the file shrank under the export', async () => {
    const file = tempFile('shrink.img', MIB);
    const { server, port } = await start(`127.0.0.1 RW ${file}\n`);
    const c = await Client.open(port, file);
    fs.truncateSync(file, MIB / 2);
    const seq = c.send(GGATE_CMD.GGATE_CMD_READ, (3 * MIB) / 4, 4096);
    const r = await c.reply();
    assert.equal(r.hdr.seq, seq);
    assert.equal(r.hdr.error, 'EIO');
    assert.equal(r.hdr.errno, freebsdErrno('EIO'));
    assert.equal(r.data, null, 'no payload after a failed READ');
    // Still usable.
    assert.equal((await c.read(0, 512)).length, 512);
    c.close();
    await stop(server);
  });

  test('an exported path that cannot be opened is refused with the open errno', async () => {
    const missing = path.join(tmp, 'no-such-file');
    const { server, port } = await start(`127.0.0.1 RW ${missing}\n`);
    const s = await handshake(port, missing, GGATE_FLAG.GGATE_FLAG_SEND, 77);
    assert.equal(s.sinit.error, 'ENOENT');
    assert.equal(s.sinit.errno, freebsdErrno('ENOENT'));
    assert.ok(await s.conn.closed());
    assert.equal(server.halfOpenCount, 0);
    await stop(server);
  });

  test('requests pipelined without waiting are answered in order, with a small queue (backpressure)', async () => {
    const { server, port } = await start('127.0.0.1 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '8M' } } },
      limits: { maxQueuedRequests: 3, maxQueuedBytes: 64 * 1024 },
    });
    const c = await Client.open(port, '/dev/mem0');
    const n = 200;
    const seqs: U64[] = [];
    for (let i = 0; i < n; i++) {
      const data = pattern(32 * 1024, i);
      seqs.push(c.send(GGATE_CMD.GGATE_CMD_WRITE, i * 32 * 1024, data.length, data));
      seqs.push(c.send(GGATE_CMD.GGATE_CMD_READ, i * 32 * 1024, 32 * 1024));
    }
    for (let i = 0; i < n; i++) {
      const w = await c.reply();
      assert.equal(w.hdr.seq, seqs[2 * i]);
      assert.equal(w.hdr.error, null);
      const r = await c.reply();
      assert.equal(r.hdr.seq, seqs[2 * i + 1]);
      assert.deepEqual(r.data, pattern(32 * 1024, i));
    }
    c.close();
    await stop(server);
  });

  test('requests split into single bytes (partial TCP reads) are parsed correctly', async () => {
    const { server, port } = await start('127.0.0.1 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
    });
    const c = await Client.open(port, '/dev/mem0');
    const data = pattern(1024, 9);
    const bytes = Buffer.concat([
      encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_WRITE, offset: 2048, length: 1024, seq: 5, error: null }),
      data,
      encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_READ, offset: 2048, length: 1024, seq: 6, error: null }),
    ]);
    for (const b of bytes) {
      c.tx.write(Buffer.from([b]));
      await new Promise((r) => setImmediate(r));
    }
    const w = await c.reply();
    assert.equal(w.hdr.seq, 5);
    assert.equal(w.hdr.error, null);
    const r = await c.reply();
    assert.equal(r.hdr.seq, 6);
    assert.deepEqual(r.data, data);
    c.close();
    await stop(server);
  });

  test('several clients at once, each on its own region', async () => {
    const { server, port } = await start('127.0.0.0/8 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '16M' } } },
    });
    const clients = await Promise.all(Array.from({ length: 6 }, () => Client.open(port, '/dev/mem0')));
    await Promise.all(
      clients.map(async (c, k) => {
        for (let i = 0; i < 20; i++) {
          const off = k * 2 * MIB + i * 64 * 1024;
          const data = pattern(64 * 1024, k * 100 + i);
          await c.write(off, data);
          assert.deepEqual(await c.read(off, data.length), data);
        }
        assert.equal(await c.flush(), null);
      }),
    );
    assert.equal(server.sessionCount, 6);
    for (const c of clients) c.close();
    await stop(server);
  });
});

describe('ggated: exports file rules', () => {
  test('read-only export: RW and WO are refused with EPERM, RO is served and cannot write', async () => {
    const { server, port } = await start('127.0.0.1 RO /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
    });
    for (const access of ['rw', 'wo'] as const) {
      for (const dir of [GGATE_FLAG.GGATE_FLAG_SEND, GGATE_FLAG.GGATE_FLAG_RECV]) {
        const s = await handshake(port, '/dev/mem0', ACCESS_BITS[access] | dir, nextToken++);
        assert.equal(s.sinit.error, 'EPERM', `${access} refused`);
        assert.equal(s.sinit.errno, freebsdErrno('EPERM'));
        assert.ok(await s.conn.closed(), 'closed after the refusal');
      }
    }
    const c = await Client.open(port, '/dev/mem0', 'ro');
    assert.equal(await c.expectError(GGATE_CMD.GGATE_CMD_WRITE, 0, 512, Buffer.alloc(512)), 'EPERM');
    assert.equal((await c.read(0, 512)).length, 512);
    c.close();
    assert.equal(server.halfOpenCount, 0);
    await stop(server);
  });

  test('write-only export: RO is refused; a WO client writes and cannot read', async () => {
    const { server, port } = await start('127.0.0.1 WO /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
    });
    const s = await handshake(port, '/dev/mem0', GGATE_FLAG.GGATE_FLAG_RDONLY | GGATE_FLAG.GGATE_FLAG_SEND, nextToken++);
    assert.equal(s.sinit.error, 'EPERM');
    const c = await Client.open(port, '/dev/mem0', 'wo');
    await c.write(0, pattern(512, 1));
    assert.equal(await c.expectError(GGATE_CMD.GGATE_CMD_READ, 0, 512), 'EPERM');
    assert.equal(await c.flush(), null);
    c.close();
    await stop(server);
  });

  test('an unknown path and an address outside the exports are refused with EPERM', async () => {
    const { server, port } = await start('127.0.0.2 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
    });
    const unknown = await handshake(port, '/dev/other', GGATE_FLAG.GGATE_FLAG_SEND, nextToken++, { localAddress: '127.0.0.2' });
    assert.equal(unknown.sinit.error, 'EPERM');
    const stranger = await handshake(port, '/dev/mem0', GGATE_FLAG.GGATE_FLAG_SEND, nextToken++, { localAddress: '127.0.0.1' });
    assert.equal(stranger.sinit.error, 'EPERM');
    // The exported address is served.
    const c = await Client.open(port, '/dev/mem0', 'rw', { localAddress: '127.0.0.2' });
    await c.write(0, pattern(512, 4));
    c.close();
    await stop(server);
  });

  test('on a dual-stack listener, IPv4-mapped peers match IPv4 exports and IPv6 peers are refused', async () => {
    const entries = await resolveExports(parseExports('127.0.0.1 RW /dev/mem0\n'), async () => '127.0.0.1');
    const server = new GgatedServer({ exports: entries, stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } } });
    servers.add(server);
    const { port } = await server.listen({ host: '::', port: 0 });
    // Conn.open connects to 127.0.0.1: the server sees ::ffff:127.0.0.1.
    const c = await Client.open(port, '/dev/mem0');
    await c.write(0, pattern(512, 6));
    c.close();
    const v6 = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect({ port, host: '::1' }, () => resolve(s));
      s.once('error', reject);
    });
    const conn = new Conn(v6);
    conn.write(encodeVersion({ version: 0, error: null }));
    await conn.read(GGATE_SIZE.VERSION_SIZE);
    conn.write(encodeCinit({ path: '/dev/mem0', flags: GGATE_FLAG.GGATE_FLAG_SEND, nconn: 2, token: nextToken++ }));
    const s = decodeSinit(await conn.read(GGATE_SIZE.SINIT_SIZE));
    assert.ok(s.ok);
    assert.equal(s.value.error, 'EPERM');
    await stop(server);
  });

  test('a stack that cannot write refuses write access with EROFS', async () => {
    const { server, port } = await start('127.0.0.1 RW /dev/ro\n', {
      stacks: { '/dev/ro': { backend: { type: 'memory', size: '1M' }, filters: [{ type: 'readonly' }] } },
    });
    const s = await handshake(port, '/dev/ro', GGATE_FLAG.GGATE_FLAG_SEND, nextToken++);
    assert.equal(s.sinit.error, 'EROFS');
    const c = await Client.open(port, '/dev/ro', 'ro');
    assert.equal((await c.read(0, 512)).length, 512);
    c.close();
    await stop(server);
  });

  test('reload() re-reads the exports file: access changes for new clients; a bad file keeps the old exports', async () => {
    const file = path.join(tmp, 'gg.exports');
    fs.writeFileSync(file, '# first version\n127.0.0.1 RO /dev/mem0\n');
    const { server, port } = await start(fs.readFileSync(file, 'utf8'), {
      exportsFile: file,
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
    });
    await assert.rejects(Client.open(port, '/dev/mem0', 'rw'), (e: BlockError) => e.code === 'EPERM');
    const ro = await Client.open(port, '/dev/mem0', 'ro');

    fs.writeFileSync(file, '127.0.0.1 RO /dev/mem0\n127.0.0.1 RW /dev/mem0\n');
    await server.reload();
    const rw = await Client.open(port, '/dev/mem0', 'rw');
    await rw.write(0, pattern(512, 5));
    // A client admitted earlier keeps its access.
    assert.equal(await ro.expectError(GGATE_CMD.GGATE_CMD_WRITE, 0, 512, Buffer.alloc(512)), 'EPERM');

    fs.writeFileSync(file, '127.0.0.1 XX /dev/mem0\n');
    await assert.rejects(server.reload(), /invalid access 'XX'/);
    const rw2 = await Client.open(port, '/dev/mem0', 'rw');
    rw2.close();

    fs.writeFileSync(file, '127.0.0.1 RO /dev/mem0\n');
    await server.reload();
    await assert.rejects(Client.open(port, '/dev/mem0', 'rw'), (e: BlockError) => e.code === 'EPERM');
    ro.close();
    rw.close();
    await stop(server);
  });

  test('loadExportsFile reports a missing file with its errno', async () => {
    await assert.rejects(loadExportsFile(path.join(tmp, 'missing.exports')), (e: BlockError) => e.code === 'ENOENT');
  });
});

describe('ggated: request validation (W4)', () => {
  test('each invalid request gets an error reply and the connection stays usable', async () => {
    const { server, port } = await start('127.0.0.1 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
    });
    const c = await Client.open(port, '/dev/mem0');
    const R = GGATE_CMD.GGATE_CMD_READ;
    const W = GGATE_CMD.GGATE_CMD_WRITE;
    const cases: [string, number, U64, number, Buffer | undefined, ErrnoCode][] = [
      ['misaligned offset', R, 100, 512, undefined, 'EINVAL'],
      ['misaligned length', R, 0, 100, undefined, 'EINVAL'],
      ['read past the end', R, MIB - 512, 1024, undefined, 'EINVAL'],
      ['read starting past the end', R, 2 * MIB, 512, undefined, 'EINVAL'],
      ['write past the end', W, MIB - 512, 1024, pattern(1024, 1), 'ENOSPC'],
      ['misaligned write', W, 1, 512, pattern(512, 1), 'EINVAL'],
      ['read over the length cap', R, 0, MAX_REQUEST_LENGTH + 512, undefined, 'EINVAL'],
      ['write over the length cap (payload consumed)', W, 0, MAX_REQUEST_LENGTH + 512, pattern(MAX_REQUEST_LENGTH + 512, 2), 'EINVAL'],
      ['offset above 2^53', R, 2n ** 60n, 512, undefined, 'EINVAL'],
      ['offset 2^64 - 512', R, 2n ** 64n - 512n, 512, undefined, 'EINVAL'],
      ['unknown command 2', 2, 0, 512, undefined, 'EOPNOTSUPP'],
      ['unknown command 255', 255, 0, 0, undefined, 'EOPNOTSUPP'],
      ['FLUSH with a length', GGATE_CMD.GGATE_CMD_FLUSH, 0, 512, undefined, 'EINVAL'],
    ];
    for (const [what, cmd, offset, length, payload, code] of cases) {
      assert.equal(await c.expectError(cmd, offset, length, payload), code, what);
      // The stream is still in sync: a valid request works.
      assert.equal((await c.read(0, 512)).length, 512, `usable after: ${what}`);
    }
    // Errno numbers on the wire are FreeBSD's (EOPNOTSUPP is 45 there, 95 on Linux).
    c.send(2, 0, 0);
    const r = await c.reply();
    assert.equal(r.hdr.errno, freebsdErrno('EOPNOTSUPP'));
    assert.notEqual(r.hdr.errno, linuxErrno('EOPNOTSUPP'));
    // Nothing invalid reached the device, and no error was recorded.
    assert.deepEqual(await c.read(MIB - 1024, 1024), Buffer.alloc(1024));
    assert.equal(server.errseq('/dev/mem0').peek(), 0);
    c.close();
    await stop(server);
  });
});

describe('ggated: pairing and handshake refusals (W5)', () => {
  test('a second connection of the same direction for a token is refused with EEXIST; the pair still completes', async () => {
    const { server, port } = await start('127.0.0.1 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
    });
    const token = nextToken++;
    const first = await handshake(port, '/dev/mem0', GGATE_FLAG.GGATE_FLAG_SEND, token);
    assert.equal(first.sinit.error, null);
    assert.equal(server.halfOpenCount, 1);
    const dup = await handshake(port, '/dev/mem0', GGATE_FLAG.GGATE_FLAG_SEND, token);
    assert.equal(dup.sinit.error, 'EEXIST');
    assert.equal(dup.sinit.errno, freebsdErrno('EEXIST'));
    assert.ok(await dup.conn.closed());
    const second = await handshake(port, '/dev/mem0', GGATE_FLAG.GGATE_FLAG_RECV, token);
    assert.equal(second.sinit.error, null);
    await until(() => server.sessionCount === 1, 'the pair');
    assert.equal(server.halfOpenCount, 0);
    second.conn.write(encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_READ, offset: 0, length: 512, seq: 1, error: null }));
    const h = decodeHdr(await first.conn.read(GGATE_SIZE.HDR_SIZE));
    assert.ok(h.ok && h.value.errno === 0 && h.value.seq === 1);
    assert.equal((await first.conn.read(512)).length, 512);
    first.conn.destroy();
    second.conn.destroy();
    await stop(server);
  });

  test('a partner from another address gets EPERM; one naming another path or access gets EINVAL', async () => {
    const { server, port } = await start('127.0.0.0/8 RW /dev/mem0\n127.0.0.0/8 RW /dev/mem1\n', {
      stacks: {
        '/dev/mem0': { backend: { type: 'memory', size: '1M' } },
        '/dev/mem1': { backend: { type: 'memory', size: '1M' } },
      },
    });
    const token = nextToken++;
    const first = await handshake(port, '/dev/mem0', GGATE_FLAG.GGATE_FLAG_SEND, token);
    assert.equal(first.sinit.error, null);
    const other = await handshake(port, '/dev/mem0', GGATE_FLAG.GGATE_FLAG_RECV, token, { localAddress: '127.0.0.3' });
    assert.equal(other.sinit.error, 'EPERM');
    const otherPath = await handshake(port, '/dev/mem1', GGATE_FLAG.GGATE_FLAG_RECV, token);
    assert.equal(otherPath.sinit.error, 'EINVAL');
    const otherAccess = await handshake(port, '/dev/mem0', GGATE_FLAG.GGATE_FLAG_RDONLY | GGATE_FLAG.GGATE_FLAG_RECV, token);
    assert.equal(otherAccess.sinit.error, 'EINVAL');
    assert.equal(server.sessionCount, 0);
    assert.equal(server.halfOpenCount, 1);
    first.conn.destroy();
    await until(() => server.halfOpenCount === 0, 'the half-open pair to go with its connection');
    await stop(server);
  });

  test('a half-open pair is dropped after the (injected) timeout', async () => {
    const { server, port } = await start('127.0.0.1 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
      limits: { halfOpenTimeoutMs: 150 },
    });
    for (const dir of [GGATE_FLAG.GGATE_FLAG_SEND, GGATE_FLAG.GGATE_FLAG_RECV]) {
      const half = await handshake(port, '/dev/mem0', dir, nextToken++);
      assert.equal(half.sinit.error, null);
      assert.equal(server.halfOpenCount, 1);
      assert.ok(await half.conn.closed(), 'the server closes the lonely connection');
      assert.equal(server.halfOpenCount, 0);
      assert.equal(server.pendingCount, 0);
    }
    await stop(server);
  });

  test('bad magic, bad version, a stalled or truncated version packet: closed without a reply', async () => {
    const { server, port } = await start('127.0.0.1 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
      limits: { handshakeTimeoutMs: 400 },
    });
    const badMagic = encodeVersion({ version: 0, error: null });
    badMagic[15] = 0x21;
    const badVersion = encodeVersion({ version: 1, error: null });
    const truncated = encodeVersion({ version: 0, error: null }).subarray(0, 11);
    for (const [what, bytes] of [
      ['bad magic', badMagic],
      ['bad version', badVersion],
      ['truncated version', truncated],
      ['nothing at all', Buffer.alloc(0)],
    ] as const) {
      const conn = await Conn.open(port);
      conn.write(bytes);
      assert.ok(await conn.closed(), `${what}: closed`);
      assert.equal(conn.available, 0, `${what}: no reply`);
    }
    // A cinit that never completes is closed at the same deadline, after the version echo.
    const conn = await Conn.open(port);
    conn.write(encodeVersion({ version: 0, error: null }));
    await conn.read(GGATE_SIZE.VERSION_SIZE);
    conn.write(encodeCinit({ path: '/dev/mem0', flags: GGATE_FLAG.GGATE_FLAG_SEND, nconn: 2, token: 5 }).subarray(0, 500));
    assert.ok(await conn.closed());
    assert.equal(conn.available, 0);
    await until(() => server.pendingCount === 0, 'no pending connection');
    await stop(server);
  });

  test('malformed cinits are refused with EINVAL', async () => {
    const { server, port } = await start('127.0.0.1 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
    });
    const noNul = encodeCinit({ path: '/dev/mem0', flags: GGATE_FLAG.GGATE_FLAG_SEND, nconn: 2, token: 9 });
    noNul.fill(0x41, 0, GGATE_SIZE.GC_PATH_SIZE);
    const cases: [string, Buffer][] = [
      ['gc_path without a NUL', noNul],
      ['empty path', encodeCinit({ path: '', flags: GGATE_FLAG.GGATE_FLAG_SEND, nconn: 2, token: 9 })],
      ['nconn 1', encodeCinit({ path: '/dev/mem0', flags: GGATE_FLAG.GGATE_FLAG_SEND, nconn: 1, token: 9 })],
      ['both directions', encodeCinit({ path: '/dev/mem0', flags: GGATE_FLAG.GGATE_FLAG_SEND | GGATE_FLAG.GGATE_FLAG_RECV, nconn: 2, token: 9 })],
      ['no direction', encodeCinit({ path: '/dev/mem0', flags: 0, nconn: 2, token: 9 })],
      ['RDONLY and WRONLY', encodeCinit({ path: '/dev/mem0', flags: GGATE_FLAG.GGATE_FLAG_RDONLY | GGATE_FLAG.GGATE_FLAG_WRONLY | GGATE_FLAG.GGATE_FLAG_SEND, nconn: 2, token: 9 })],
    ];
    for (const [what, cinit] of cases) {
      const conn = await Conn.open(port);
      conn.write(encodeVersion({ version: 0, error: null }));
      await conn.read(GGATE_SIZE.VERSION_SIZE);
      conn.write(cinit);
      const s = decodeSinit(await conn.read(GGATE_SIZE.SINIT_SIZE));
      assert.ok(s.ok);
      assert.equal(s.value.error, 'EINVAL', what);
      assert.ok(await conn.closed(), `${what}: closed`);
    }
    assert.equal(server.halfOpenCount, 0);
    await stop(server);
  });
});

describe('ggated: write-back errors (errseq) and transport failures', () => {
  test('W9: a client vanishing mid-request records nothing and changes nothing', async () => {
    const { server, port } = await start('127.0.0.1 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
    });
    const errseq = server.errseq('/dev/mem0');
    const a = await Client.open(port, '/dev/mem0');
    await a.write(0, pattern(4096, 1));
    // A WRITE header and half its payload, then both connections vanish.
    a.tx.write(encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_WRITE, offset: 0, length: 4096, seq: 99, error: null }));
    a.tx.write(pattern(2048, 2));
    await new Promise((r) => setTimeout(r, 20));
    a.close();
    await until(() => server.sessionCount === 0, 'the session to end');

    // A client that only closes its send connection mid-header.
    const b = await Client.open(port, '/dev/mem0');
    b.tx.write(encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_READ, offset: 0, length: 512, seq: 1, error: null }).subarray(0, 10));
    b.tx.socket.end();
    assert.ok(await b.rx.closed(), 'the server closes the pair');
    await until(() => server.sessionCount === 0, 'the session to end');

    assert.equal(errseq.peek(), 0, 'no error recorded');
    const c = await Client.open(port, '/dev/mem0');
    assert.deepEqual(await c.read(0, 4096), pattern(4096, 1), 'the partial write did not happen');
    assert.equal(await c.flush(), null, 'no phantom flush error');
    c.close();
    await stop(server);
  });

  test('requests received before the client closes its send connection are still answered', async () => {
    const { server, port } = await start('127.0.0.1 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
      limits: { maxQueuedRequests: 2 },
    });
    const c = await Client.open(port, '/dev/mem0');
    for (let i = 0; i < 10; i++) c.send(GGATE_CMD.GGATE_CMD_WRITE, i * 512, 512, pattern(512, i));
    c.send(GGATE_CMD.GGATE_CMD_FLUSH, 0, 0);
    c.tx.socket.end();
    for (let i = 0; i < 11; i++) assert.equal((await c.reply()).hdr.error, null);
    assert.ok(await c.rx.closed());
    await until(() => server.sessionCount === 0, 'the session to end');
    await stop(server);
  });

  test('a backend flush failure reaches every client pair exactly once', async () => {
    const dev = await flakyMemory();
    const { server, port } = await start('127.0.0.1 RW /dev/flaky\n', { stacks: { '/dev/flaky': { device: dev } } });
    const a = await Client.open(port, '/dev/flaky');
    const b = await Client.open(port, '/dev/flaky');
    await a.write(0, pattern(4096, 1));
    await b.write(4096, pattern(4096, 2));

    dev.failures = 1;
    assert.equal(await a.flush(), 'EIO', 'A: the backend error itself');
    assert.equal(await b.flush(), 'EIO', 'B: hears of it once, at its next flush');
    assert.equal(await a.flush(), null, 'A: once only');
    assert.equal(await b.flush(), null, 'B: once only');
    assert.equal(dev.flushes, 4);
    const errseq = server.errseq('/dev/flaky');
    assert.equal(errseq.peekError(), linuxErrno('EIO'));
    // A client that connects after everyone saw it is not told.
    const c = await Client.open(port, '/dev/flaky');
    assert.equal(await c.flush(), null);
    assert.deepEqual(server.clients().map((s) => s.errorPending), [false, false, false]);
    for (const x of [a, b, c]) x.close();
    await stop(server);
    await dev.close();
  });

  test('a write-back error nobody has seen is reported to a client that connects later, at its first flush', async () => {
    const dev = await flakyMemory();
    const { server, port } = await start('127.0.0.1 RW /dev/flaky\n', { stacks: { '/dev/flaky': { device: dev } } });
    // Recorded by some layer of the stack with no client waiting (a background write-back).
    server.errseq('/dev/flaky').set(linuxErrno('ENOSPC'));
    const a = await Client.open(port, '/dev/flaky');
    assert.deepEqual(server.clients().map((s) => s.errorPending), [true]);
    assert.equal(await a.flush(), 'ENOSPC');
    assert.equal(await a.flush(), null);
    a.close();
    await stop(server);
    await dev.close();
  });

  test('a file export: both access modes share the path ErrSeq', async () => {
    const file = tempFile('shared.img', MIB);
    const opened: FlakyFlush[] = [];
    const entries = await resolveExports(parseExports(`127.0.0.1 RW ${file}\n`), async () => '127.0.0.1');
    const server = new GgatedServer({
      exports: entries,
      // Files opened through a flaky layer, to fail a flush on the read-write device only.
      openFile: async (p, writable) => {
        const d = new FlakyFlush(await createStack({ backend: { type: 'file', path: p, readonly: !writable } }));
        opened.push(d);
        return d;
      },
    });
    servers.add(server);
    const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
    const rw = await Client.open(port, file, 'rw');
    const ro = await Client.open(port, file, 'ro');
    assert.equal(opened.length, 2, 'one device per access mode');
    opened[0]!.failures = 1;
    assert.equal(await rw.flush(), 'EIO');
    assert.equal(await ro.flush(), 'EIO', 'the read-only client hears of it too');
    assert.equal(await ro.flush(), null);
    rw.close();
    ro.close();
    await stop(server);
  });
});

describe('ggated: shutdown', () => {
  test('close() answers what was received, closes clients and the stacks it built', async () => {
    let closedDevices = 0;
    const { server, port } = await start('127.0.0.1 RW /dev/mem0\n', {
      stacks: { '/dev/mem0': { backend: { type: 'memory', size: '1M' } } },
    });
    const c = await Client.open(port, '/dev/mem0');
    const dev = (await server.table.acquire('/dev/mem0', 'rw')).export.device as BlockDevice & { close(): Promise<void> };
    const origClose = dev.close.bind(dev);
    dev.close = async () => {
      closedDevices++;
      return origClose();
    };
    c.send(GGATE_CMD.GGATE_CMD_WRITE, 0, 512, pattern(512, 1));
    await c.reply();
    const half = await handshake(port, '/dev/mem0', GGATE_FLAG.GGATE_FLAG_SEND, nextToken++);
    await stop(server);
    assert.ok(await c.rx.closed());
    assert.ok(await half.conn.closed());
    assert.equal(closedDevices, 1);
    await assert.rejects(Conn.open(port));
  });
});

describe('FrameReader', () => {
  test('delivers fixed frames, bodies and skips across arbitrary chunk boundaries', () => {
    const got: string[] = [];
    const frame = (kind: number, payload: string): Buffer => {
      const h = Buffer.alloc(4);
      h.writeUInt16BE(payload.length, 0);
      h.writeUInt16BE(kind, 2);
      return Buffer.concat([h, Buffer.from(payload)]);
    };
    const stream = Buffer.concat([frame(1, 'hello'), frame(2, 'dropped!'), frame(1, ''), frame(1, 'x'.repeat(300))]);
    for (let cut = 1; cut < 40; cut += 7) {
      got.length = 0;
      const rr = new FrameReader(8);
      const nx = (): void =>
        rr.expectFixed(4, (b, o) => {
          const len = b.readUInt16BE(o);
          const kind = b.readUInt16BE(o + 2);
          if (kind === 1) rr.expectBody(len, (p) => (got.push(`body:${p.toString()}`), nx()));
          else rr.expectSkip(len, () => (got.push(`skip:${len}`), nx()));
        });
      nx();
      for (let i = 0; i < stream.length; i += cut) rr.push(stream.subarray(i, i + cut));
      assert.deepEqual(got, ['body:hello', 'skip:8', 'body:', `body:${'x'.repeat(300)}`], `chunks of ${cut}`);
      assert.equal(rr.buffered, 0);
    }
  });

  test('pause keeps bytes queued until resume; stop drops them', () => {
    const r = new FrameReader(4);
    const got: number[] = [];
    const next = (): void => r.expectFixed(2, (b, o) => (got.push(b.readUInt16BE(o)), next()));
    next();
    r.pause();
    r.push(Buffer.from([0, 1, 0, 2, 0]));
    assert.deepEqual(got, []);
    assert.equal(r.buffered, 5);
    r.resume();
    assert.deepEqual(got, [1, 2]);
    assert.equal(r.midFrame, true);
    r.stop();
    r.push(Buffer.from([3, 0, 4]));
    assert.deepEqual(got, [1, 2]);
    assert.equal(r.buffered, 0);
  });
});
