/**
 * Robustness review of the GEOM Gate client side: regressions for bugs found by reading
 * the ggatec forwarder and its link against the project's rules (no resource that grows
 * per request over a forwarder's life; no buffering sized by the server).
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { GateRegistry, type GateStartArgs } from '../../src/gate/index.js';
import { parseExports, resolveExports } from '../../src/ggate/index.js';
import { GgatedServer } from '../../src/server/ggated.js';
import { serveGgatec, type GgatecGateCalls } from '../../src/client/ggatec.js';

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
