import { afterEach, beforeEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockError } from '../../src/errors/index.js';
import { REQ } from '../../src/device/index.js';
import { GateRegistry, type GateDoneArgs, type GateStartArgs, type GateStartResult } from '../../src/gate/index.js';
import { serveGate, type GateCalls, type GateHandler, type ServeGateEvent } from '../../src/gate/handler.js';
import type { ControlClient } from '../../src/gate/control/client.js';
import { startControl, until, type ControlFixture } from './control/fixture.js';
import { rejectsWith } from '../helpers/assertions.js';

/** A handler over a Buffer, counting what it is asked. */
function memoryHandler(store: Buffer): GateHandler & { calls: Record<string, number> } {
  const calls: Record<string, number> = { read: 0, write: 0, delete: 0, flush: 0 };
  return {
    calls,
    read(offset, length) {
      calls.read!++;
      return Buffer.from(store.subarray(offset, offset + length));
    },
    async write(offset, data) {
      calls.write!++;
      await new Promise<void>((resolve) => setImmediate(resolve));
      data.copy(store, offset);
    },
    delete(offset, length) {
      calls.delete!++;
      store.fill(0, offset, offset + length);
    },
    flush() {
      calls.flush!++;
    },
  };
}

const MEDIA = 1 << 20;

let fx: ControlFixture;
let client: ControlClient;
beforeEach(async () => {
  fx = await startControl();
  client = await fx.connect();
});
afterEach(async () => {
  await fx.close();
});

describe('serveGate over the control socket', () => {
  test('serves reads, writes, deletes and flushes; grows its buffer on ENOMEM; resolves on ECANCELED', async () => {
    const unit = await client.create({ mediasize: MEDIA, sectorsize: 512 });
    const store = Buffer.alloc(MEDIA);
    const handler = memoryHandler(store);
    const events: ServeGateEvent[] = [];
    const loop = serveGate(client, unit, handler, { concurrency: 3, bufferSize: 512, onEvent: (e) => events.push(e) });
    const dev = fx.registry.open(unit);
    const model = Buffer.alloc(MEDIA);
    const ops: Promise<void>[] = [];
    for (let i = 0; i < 32; i++) {
      const len = 512 * (1 + (i % 16));
      const off = i * 32768;
      const data = Buffer.alloc(len, (i % 250) + 1);
      data.copy(model, off);
      ops.push(dev.write(data, off, i % 5 === 0 ? REQ.FUA : 0));
    }
    await Promise.all(ops);
    await dev.trim(0, 1024, 0);
    model.fill(0, 0, 1024);
    const back = Buffer.alloc(MEDIA);
    await dev.read(back, 0, 0);
    assert.ok(back.equals(model), 'data read back through the gate equals the model');
    assert.ok(store.equals(model));
    await dev.close();
    await client.destroy({ unit, force: false });
    const result = await loop;
    assert.ok(result.grows > 0, 'the buffer grew from 512 bytes');
    assert.equal(result.bufferSize, 8192, 'to the largest write seen');
    assert.equal(result.failed, 0);
    assert.equal(result.served, handler.calls.read! + handler.calls.write! + handler.calls.delete! + handler.calls.flush!);
    assert.ok(handler.calls.flush! >= 7, 'FUA writes were followed by flushes');
    assert.equal(handler.calls.delete, 1);
    assert.ok(events.some((e) => e.type === 'grow'));
    assert.ok(events.filter((e) => e.type === 'request').length === result.served);
  });

  test('a destroy right after a request completes always finds the handler in START (clean exit, never ENXIO)', async () => {
    for (let i = 0; i < 20; i++) {
      const unit = await client.create({ mediasize: MEDIA, sectorsize: 512 });
      const loop = serveGate(client, unit, memoryHandler(Buffer.alloc(MEDIA)), { concurrency: 1 });
      const dev = fx.registry.open(unit);
      await dev.write(Buffer.alloc(512, i), 0, 0);
      await dev.close();
      // No waiting here: the handler sent its next START before this write's DONE.
      await client.destroy({ unit, force: false });
      assert.equal((await loop).served, 1);
    }
  });

  test('interrupted STARTs are retried and internal wake-ups never reach the loop', async () => {
    const unit = await client.create({ mediasize: MEDIA, sectorsize: 512 });
    // A client whose STARTs are interrupted (as a signal would) the first 5 times, by a
    // real ABORT over the socket, so the server answers EINTR.
    let interruptsLeft = 5;
    const flaky: GateCalls = {
      start(args: GateStartArgs): Promise<GateStartResult> {
        const ac = new AbortController();
        args.signal?.addEventListener('abort', () => ac.abort(args.signal?.reason), { once: true });
        const p = client.start({ ...args, signal: ac.signal });
        if (interruptsLeft > 0) {
          interruptsLeft--;
          void until(() => (fx.registry.list()[0]?.sleeping ?? 0) > 0, 'sleeping').then(() => ac.abort(new Error('SIGUSR1')));
        }
        return p;
      },
      done: (args: GateDoneArgs) => client.done(args),
    };
    const store = Buffer.alloc(MEDIA);
    const loop = serveGate(flaky, unit, memoryHandler(store), { concurrency: 1 });
    await until(() => interruptsLeft === 0 && fx.registry.list()[0]?.sleeping === 1, 'interrupts delivered');
    // Internal wake-ups: the registry retries them inside START.
    for (let i = 0; i < 10; i++) fx.registry.wakeup(unit);
    await client.cancel({ unit, seq: 0 });
    const dev = fx.registry.open(unit);
    await dev.write(Buffer.alloc(4096, 7), 8192, 0);
    const back = Buffer.alloc(4096);
    await dev.read(back, 8192, 0);
    assert.deepEqual(back, Buffer.alloc(4096, 7));
    await dev.close();
    await client.destroy({ unit, force: true });
    const r = await loop;
    assert.equal(r.interruptions, 5, 'exactly the interruptions, none from wake-ups');
    assert.equal(r.served, 2);
  });

  test('anything but ECANCELED rejects: unknown unit, lost connection, a write larger than maxBufferSize', async () => {
    await rejectsWith(serveGate(client, 7, memoryHandler(Buffer.alloc(0))), 'ENXIO');

    const unit = await client.create({ mediasize: MEDIA, sectorsize: 512 });
    const dev = fx.registry.open(unit);
    const big = dev.write(Buffer.alloc(65536), 0, 0);
    await rejectsWith(serveGate(client, unit, memoryHandler(Buffer.alloc(MEDIA)), { bufferSize: 512, maxBufferSize: 4096 }), 'ENOMEM', /65536/);
    // The write is still there for a capable handler.
    const other = await fx.connect();
    const loop = serveGate(other, unit, memoryHandler(Buffer.alloc(MEDIA)));
    await big;
    // The server goes away: the loop rejects (a transport failure, not the gate's end).
    const lost = rejectsWith(loop, 'ECONNRESET');
    await fx.control.close();
    await lost;
    await dev.close();
  });

  test('a call failure of a fake client (EIO) rejects the loop, after the other workers stop', async () => {
    let n = 0;
    const fake: GateCalls = {
      async start(args) {
        n++;
        if (n === 3) throw new BlockError('EIO', 'control device broke');
        // The other workers wait until they are told to stop.
        return new Promise<GateStartResult>((_, reject) => {
          args.signal?.addEventListener('abort', () => reject(new BlockError('EINTR', 'stopped')), { once: true });
        });
      },
      async done() {},
    };
    await rejectsWith(serveGate(fake, 0, memoryHandler(Buffer.alloc(0)), { concurrency: 3 }), 'EIO', /broke/);
  });

  test('handler errors are the request’s result and the loop goes on', async () => {
    const unit = await client.create({ mediasize: MEDIA, sectorsize: 512 });
    let failWrites = 1;
    const store = Buffer.alloc(MEDIA);
    const base = memoryHandler(store);
    const handler: GateHandler = {
      read: (o, l) => (o === 0 ? Buffer.alloc(l - 512) : base.read(o, l)),
      write(o, d) {
        if (failWrites-- > 0) throw new BlockError('ENOSPC', 'backend full');
        if (o === 4096) throw new Error('a bug in the handler');
        return base.write(o, d);
      },
      // No delete and no flush.
    };
    const loop = serveGate(client, unit, handler);
    const dev = fx.registry.open(unit);
    await rejectsWith(dev.write(Buffer.alloc(512, 1), 512, 0), 'ENOSPC');
    await dev.write(Buffer.alloc(512, 2), 512, 0);
    await rejectsWith(dev.write(Buffer.alloc(512, 3), 4096, 0), 'EIO');
    await rejectsWith(dev.read(Buffer.alloc(1024), 0, 0), 'EIO');
    await rejectsWith(dev.trim(0, 512, 0), 'EOPNOTSUPP');
    await dev.flush(0); // no flush callback: writes are durable on return
    const back = Buffer.alloc(512);
    await dev.read(back, 512, 0);
    assert.deepEqual(back, Buffer.alloc(512, 2));
    await dev.close();
    await client.destroy({ unit, force: false });
    const r = await loop;
    assert.equal(r.failed, 4);
  });

  test('handlers that throw EAGAIN get the request again', async () => {
    const unit = await client.create({ mediasize: MEDIA, sectorsize: 512 });
    let again = 3;
    const seen: number[] = [];
    const loop = serveGate(client, unit, {
      read: (_o, l) => Buffer.alloc(l, 9),
      write: () => undefined,
      flush() {
        seen.push(1);
        if (again-- > 0) throw new BlockError('EAGAIN', 'busy');
      },
    });
    const dev = fx.registry.open(unit);
    await dev.flush(0);
    assert.equal(seen.length, 4);
    await dev.close();
    await client.destroy({ unit, force: false });
    assert.equal((await loop).failed, 3, 'EAGAIN answers count as failed answers, the request itself succeeded');
  });

  test('concurrency: that many requests are served at once', async () => {
    const unit = await client.create({ mediasize: MEDIA, sectorsize: 512 });
    let active = 0;
    let peak = 0;
    let release: () => void = () => undefined;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const loop = serveGate(
      client,
      unit,
      {
        async read(_o, l) {
          active++;
          peak = Math.max(peak, active);
          await gate;
          active--;
          return Buffer.alloc(l);
        },
        write: () => undefined,
      },
      { concurrency: 4 },
    );
    const dev = fx.registry.open(unit);
    const reads = Array.from({ length: 6 }, (_, i) => dev.read(Buffer.alloc(512), i * 512, 0));
    await until(() => active === 4, 'four reads in the handler');
    assert.equal(fx.registry.list()[0]!.queued, 2, 'the rest wait in the gate');
    release();
    await Promise.all(reads);
    assert.equal(peak, 4);
    await dev.close();
    await client.destroy({ unit, force: false });
    await loop;
  });

  test('the caller’s signal stops the loop: taken requests are answered, then it rejects EINTR', async () => {
    const unit = await client.create({ mediasize: MEDIA, sectorsize: 512 });
    const ac = new AbortController();
    let inRead: () => void = () => undefined;
    const reading = new Promise<void>((resolve) => (inRead = resolve));
    let finishRead: () => void = () => undefined;
    const loop = serveGate(
      client,
      unit,
      {
        async read(_o, l) {
          inRead();
          await new Promise<void>((resolve) => (finishRead = resolve));
          return Buffer.alloc(l, 3);
        },
        write: () => undefined,
      },
      { concurrency: 2, signal: ac.signal },
    );
    const dev = fx.registry.open(unit);
    const buf = Buffer.alloc(512);
    const rd = dev.read(buf, 0, 0);
    await reading;
    ac.abort();
    finishRead();
    await rd;
    assert.deepEqual(buf, Buffer.alloc(512, 3), 'the taken read was answered');
    await rejectsWith(loop, 'EINTR', /stopped by the caller/);
    await until(() => fx.registry.list()[0]?.sleeping === 0, 'no START left waiting');
    assert.equal(fx.registry.list()[0]!.inFlight, 0);
    await dev.close();
  });
});

test('serveGate runs unchanged on an in-process GateRegistry', async () => {
  const reg = new GateRegistry();
  const unit = await reg.create({ version: 3, mediasize: MEDIA, sectorsize: 4096 });
  const store = Buffer.alloc(MEDIA);
  const loop = serveGate(reg, unit, memoryHandler(store), { bufferSize: 4096 });
  const dev = reg.open(unit);
  await dev.write(Buffer.alloc(65536, 0xee), 4096, REQ.FUA);
  await dev.zero(4096, 4096, 0);
  const back = Buffer.alloc(8192);
  await dev.read(back, 4096, 0);
  assert.deepEqual(back, Buffer.concat([Buffer.alloc(4096), Buffer.alloc(4096, 0xee)]));
  await dev.close();
  await reg.destroy({ version: 3, unit, force: false });
  const r = await loop;
  assert.equal(r.bufferSize, 65536);
  await rejectsWith(serveGate(reg, unit, memoryHandler(store), { concurrency: 0 }), 'EINVAL', /concurrency/);
});
