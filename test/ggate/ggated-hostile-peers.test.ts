/**
 * Robustness review of the GEOM Gate server side: regressions for bugs found by reading
 * ggated, its session and the control socket against the project's rules (bad input
 * from a peer never crashes or hangs the server; nothing received is dropped on a
 * transport event that should not drop it; no error is swallowed).
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import {
  GGATE_CMD,
  GGATE_FLAG,
  GGATE_SIZE,
  decodeHdr,
  decodeSinit,
  decodeVersion,
  encodeCinit,
  encodeHdr,
  encodeVersion,
  parseExports,
  resolveExports,
} from '../../src/ggate/index.js';
import { FilterDevice } from '../../src/device/index.js';
import { createStack } from '../../src/export/registry.js';
import { GgateExportTable, GgatedServer, type GgateStackSource } from '../../src/ggate/ggated.js';
import pino from 'pino';
import { BlockError } from '../../src/errors/index.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import { ByteSocket } from '../helpers/byte-socket.js';

const sockets = new Set<net.Socket>();
const servers = new Set<GgatedServer>();
after(async () => {
  for (const s of sockets) s.destroy();
  await Promise.all([...servers].map((s) => s.close(1000)));
});

async function startGgated(stacks: Record<string, GgateStackSource>): Promise<{ server: GgatedServer; port: number }> {
  const text = Object.keys(stacks)
    .map((p) => `127.0.0.1 RW ${p}\n`)
    .join('');
  const server = new GgatedServer({ exports: await resolveExports(parseExports(text), async () => '127.0.0.1'), stacks });
  servers.add(server);
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  return { server, port };
}

function connect(port: number): Promise<ByteSocket> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ port, host: '127.0.0.1' }, () => resolve(new ByteSocket(s)));
    sockets.add(s);
    s.once('error', reject);
  });
}

/** One ggatec handshake; returns the connection after a successful sinit. */
async function handshake(port: number, p: string, flags: number, token: number): Promise<ByteSocket> {
  const c = await connect(port);
  c.write(encodeVersion({ version: 0, error: null }));
  assert.ok(decodeVersion(await c.read(GGATE_SIZE.VERSION_SIZE)).ok);
  c.write(encodeCinit({ path: p, flags, nconn: 2, token }));
  const s = decodeSinit(await c.read(GGATE_SIZE.SINIT_SIZE));
  assert.ok(s.ok && s.value.error === null, 'sinit without error');
  return c;
}

let nextToken = 7000;

/** A ggatec pair: rx (the server sends on it) and tx (the server receives on it). */
async function pair(port: number, p: string): Promise<{ rx: ByteSocket; tx: ByteSocket }> {
  const token = nextToken++;
  const rx = await handshake(port, p, GGATE_FLAG.GGATE_FLAG_SEND, token);
  const tx = await handshake(port, p, GGATE_FLAG.GGATE_FLAG_RECV, token);
  return { rx, tx };
}

/** A memory device whose writes take a while (a timer, not a microtask). */
class SlowWrites extends FilterDevice {
  override async write(data: Buffer, offset: number, flags: number): Promise<void> {
    await new Promise((r) => setTimeout(r, 30));
    return super.write(data, offset, flags);
  }
}

describe('ggated session', () => {
  test('requests received before the client half-closes its send connection are answered, even on a slow device', async () => {
    const dev = new SlowWrites(await createStack({ backend: { type: 'memory', size: 1024 * 1024 } }));
    const { server, port } = await startGgated({ '/dev/slow': { device: dev } });
    const { rx, tx } = await pair(port, '/dev/slow');
    const n = 5;
    for (let i = 0; i < n; i++) {
      tx.write(encodeHdr({ cmd: GGATE_CMD.GGATE_CMD_WRITE, offset: i * 512, length: 512, seq: i + 1, error: null }));
      tx.write(Buffer.alloc(512, i));
    }
    tx.socket.end();
    for (let i = 0; i < n; i++) {
      const d = decodeHdr(await rx.read(GGATE_SIZE.HDR_SIZE));
      assert.ok(d.ok);
      assert.equal(d.value.seq, i + 1);
      assert.equal(d.value.error, null);
    }
    assert.ok(await rx.closed(), 'the server closes the pair after the replies');
    await server.close(1000);
    servers.delete(server);
    await dev.close();
  });
});

describe('ggated export table', () => {
  test('a device that fails to close at shutdown is logged, not swallowed', async () => {
    const lines: string[] = [];
    const logger = pino({ level: 'error' }, { write: (l: string) => void lines.push(l) });
    class FailingClose extends FilterDevice {
      override async close(): Promise<void> {
        await super.close();
        throw new BlockError('EIO', 'injected close failure');
      }
    }
    const table = new GgateExportTable({
      logger,
      openFile: async () => new FailingClose(new MemoryDevice({ size: 1024 * 1024 })),
    });
    // A lease still held at shutdown: the table closes its device itself.
    await table.acquire('/some/file', 'rw');
    await table.close();
    const entries = lines.map((l) => JSON.parse(l) as { msg: string; path?: string; err?: { message: string } });
    assert.equal(entries.length, 1, 'one error logged');
    assert.equal(entries[0]!.msg, 'closing the device failed');
    assert.equal(entries[0]!.path, '/some/file');
    assert.match(entries[0]!.err?.message ?? '', /injected close failure/);
  });
});

describe('half-open pairs per peer', () => {
  test('one peer flooding half-open tokens is refused ENOMEM at its own cap while another peer still pairs and serves', async () => {
    const text = '127.0.0.1 RW /flood\n127.0.0.2 RW /flood\n';
    const server = new GgatedServer({
      exports: await resolveExports(parseExports(text), async () => '127.0.0.1'),
      stacks: { '/flood': { backend: { type: 'memory', size: '1M' } } },
      limits: { maxHalfOpenPerPeer: 3 },
    });
    servers.add(server);
    const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
    // The flooding peer (127.0.0.1) opens only the first connection of each token.
    for (let i = 0; i < 3; i++) await handshake(port, '/flood', GGATE_FLAG.GGATE_FLAG_SEND, 9000 + i);
    const c = await connect(port);
    c.write(encodeVersion({ version: 0, error: null }));
    assert.ok(decodeVersion(await c.read(GGATE_SIZE.VERSION_SIZE)).ok);
    c.write(encodeCinit({ path: '/flood', flags: GGATE_FLAG.GGATE_FLAG_SEND, nconn: 2, token: 9100 }));
    const refused = decodeSinit(await c.read(GGATE_SIZE.SINIT_SIZE));
    assert.ok(refused.ok && refused.value.error === 'ENOMEM', 'the fourth half-open token of the flooding peer');
    // Another peer (127.0.0.2, also loopback) pairs as usual.
    const from2 = (flags: number) =>
      new Promise<ByteSocket>((resolve, reject) => {
        const s = net.connect({ port, host: '127.0.0.1', localAddress: '127.0.0.2' }, () => resolve(new ByteSocket(s)));
        sockets.add(s);
        s.once('error', reject);
      }).then(async (b) => {
        b.write(encodeVersion({ version: 0, error: null }));
        assert.ok(decodeVersion(await b.read(GGATE_SIZE.VERSION_SIZE)).ok);
        b.write(encodeCinit({ path: '/flood', flags, nconn: 2, token: 9200 }));
        const s = decodeSinit(await b.read(GGATE_SIZE.SINIT_SIZE));
        assert.ok(s.ok && s.value.error === null, 'the other peer is served');
        return b;
      });
    await from2(GGATE_FLAG.GGATE_FLAG_SEND);
    await from2(GGATE_FLAG.GGATE_FLAG_RECV);
    assert.equal(server.halfOpenCount, 3);
  });
});
