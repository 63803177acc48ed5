/**
 * Robustness review of the GEOM Gate client side: regressions for bugs found by reading
 * the ggatec forwarder and its link against the project's rules (no resource that grows
 * per request over a forwarder's life; no buffering sized by the server).
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { GateRegistry, type GateStartArgs } from '../../src/gate/index.js';
import { GGATE_FLAG, GGATE_SIZE, decodeCinit, encodeSinit, encodeVersion, parseExports, resolveExports } from '../../src/ggate/index.js';
import { GgatedServer } from '../../src/ggate/ggated.js';
import { connectGgatec, serveGgatec, type GgatecGateCalls } from '../../src/ggate/ggatec.js';
import { ByteSocket } from '../helpers/byte-socket.js';

const cleanups: (() => Promise<void> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

async function ggatedMemory(p: string): Promise<number> {
  const server = new GgatedServer({
    exports: await resolveExports(parseExports(`127.0.0.1 RW ${p}\n`), async () => '127.0.0.1'),
    stacks: { [p]: { backend: { type: 'memory', size: '1M' } } },
  });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  cleanups.push(() => server.close(0));
  return port;
}

describe('ggatec forwarder', () => {
  test('every START on one connection gets the same abort signal (no AbortSignal.any per request)', async () => {
    const port = await ggatedMemory('/dev/m');
    const registry = new GateRegistry();
    const unit = await registry.create({ version: 3, mediasize: 1024 * 1024, sectorsize: 512 });
    const signals: AbortSignal[] = [];
    const calls: GgatecGateCalls = {
      start: (a: GateStartArgs) => {
        if (a.signal) signals.push(a.signal);
        return registry.start(a);
      },
      done: (a) => registry.done(a),
      cancel: (a) => registry.cancel(a),
      list: () => registry.list(),
    };
    const stop = new AbortController();
    const done = serveGgatec(calls, unit, {
      target: { host: '127.0.0.1', port, path: '/dev/m', access: 'rw' },
      reconnectIntervalMs: 20,
      signal: stop.signal,
    });
    const dev = registry.open(unit);
    for (let i = 0; i < 20; i++) await dev.write(Buffer.alloc(512, i), i * 512, 0);
    const back = Buffer.alloc(512);
    await dev.read(back, 19 * 512, 0);
    assert.deepEqual(back, Buffer.alloc(512, 19));
    await dev.close();
    await registry.destroy({ version: 3, unit, force: true });
    await done;
    assert.ok(signals.length > 20, `a START per request (${signals.length})`);
    // On Node 20 every AbortSignal.any() stays registered in its sources until they abort:
    // one per START would grow the forwarder's long-lived stop signal without bound.
    assert.equal(new Set(signals).size, 1, 'one signal for the whole connection');
  });
});

/**
 * A ggated that completes both handshakes, then sends `flood` bytes nobody asked for on
 * the client's receive connection. Resolves `flushed` once all of them left its socket.
 */
async function floodingGgated(flood: number): Promise<{ port: number; flushed: Promise<void> }> {
  let flushed!: () => void;
  const done = new Promise<void>((r) => (flushed = r));
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on('error', () => undefined);
    const c = new ByteSocket(s);
    void (async () => {
      await c.read(GGATE_SIZE.VERSION_SIZE);
      c.write(encodeVersion({ version: 0, error: null }));
      const d = decodeCinit(await c.read(GGATE_SIZE.CINIT_SIZE));
      assert.ok(d.ok);
      c.write(encodeSinit({ mediasize: 1024 * 1024, sectorsize: 512, error: null }));
      // GGATE_FLAG_SEND (the server sends on it): the client's receive connection.
      if ((Number(d.value.flags) & GGATE_FLAG.GGATE_FLAG_SEND) !== 0) s.write(Buffer.alloc(flood, 0xee), () => flushed());
    })().catch(() => s.destroy());
  });
  await new Promise<void>((r) => server.listen({ host: '127.0.0.1', port: 0 }, r));
  cleanups.push(
    () =>
      new Promise<void>((r) => {
        server.close(() => r());
        for (const s of sockets) s.destroy();
      }),
  );
  return { port: (server.address() as net.AddressInfo).port, flushed: done };
}

describe('ggatec link', () => {
  test('bytes a server sends before anyone reads replies are not buffered by the client', async () => {
    const FLOOD = 64 * 1024 * 1024;
    const { port, flushed } = await floodingGgated(FLOOD);
    const link = await connectGgatec({ host: '127.0.0.1', port, path: '/dev/x', access: 'rw' });
    cleanups.push(() => link.close());
    // Unfixed, the client reads the whole flood into the reader's queue at once; fixed,
    // the flood stalls in the kernel and `flushed` never comes. The wait only gives the
    // unfixed client the time to show it.
    await Promise.race([flushed, new Promise((r) => setTimeout(r, 500))]);
    assert.ok(link.reader.buffered < FLOOD / 8, `the client holds ${link.reader.buffered} bytes it was not asked to read`);
    assert.equal(link.lost, false);
  });
});
