import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockError } from '../../src/errors/index.js';
import { REQ } from '../../src/device/index.js';
import { GateRegistry, ManualClock } from '../../src/gate/index.js';
import { V, rejectsWith, until } from './helpers.js';
import { prng } from '../helpers/data.js';

/**
 * A handler as a real one is written against the two error channels:
 * - a rejected start (the call failed) is EINTR from our own signal: retry;
 * - a resolved start with ECANCELED (the gate is gone): exit cleanly;
 * - a resolved start with ENOMEM: grow the buffer to the length given and retry;
 * - otherwise serve the request from `store`, sometimes answering EAGAIN first (a
 *   transient backend condition), which the gate retries.
 */
class MemoryHandler {
  buffer = Buffer.alloc(512);
  grows = 0;
  interrupts = 0;
  served = 0;
  retried = 0;
  #controller: AbortController | undefined;
  readonly #reg: GateRegistry;
  readonly #unit: number;
  readonly #store: Buffer;
  readonly #rand: () => number;

  constructor(reg: GateRegistry, unit: number, store: Buffer, seed: number) {
    this.#reg = reg;
    this.#unit = unit;
    this.#store = store;
    this.#rand = prng(seed);
  }

  /** Delivers a "signal" to the handler: interrupts its start call if it is in one. */
  interrupt(): void {
    this.#controller?.abort(new Error('SIGUSR1'));
  }

  async run(): Promise<'exited: ECANCELED'> {
    const reg = this.#reg;
    const unit = this.#unit;
    for (;;) {
      this.#controller = new AbortController();
      let r;
      try {
        r = await reg.start({ version: V, unit, length: this.buffer.length, signal: this.#controller.signal });
      } catch (e) {
        if (e instanceof BlockError && e.code === 'EINTR') {
          this.interrupts++;
          continue;
        }
        throw e;
      } finally {
        this.#controller = undefined;
      }
      if (r.error === 'ECANCELED') return 'exited: ECANCELED';
      if (r.error === 'ENOMEM') {
        this.buffer = Buffer.alloc(r.length);
        this.grows++;
        continue;
      }
      // Let other handlers and requesters run, as real I/O would.
      await new Promise<void>((resolve) => setImmediate(resolve));
      if (this.#rand() < 0.1) {
        this.retried++;
        await reg.done({ version: V, unit, seq: r.seq, error: 'EAGAIN' });
        continue;
      }
      this.served++;
      switch (r.cmd) {
        case 'write': {
          // The payload lands in our buffer first (FreeBSD copies it out to gctl_data).
          r.data!.copy(this.buffer, 0, 0, r.length);
          this.buffer.copy(this.#store, r.offset, 0, r.length);
          await reg.done({ version: V, unit, seq: r.seq });
          break;
        }
        case 'read':
          await reg.done({
            version: V,
            unit,
            seq: r.seq,
            data: this.#store.subarray(r.offset, r.offset + r.length),
          });
          break;
        case 'delete':
        case 'flush':
          await reg.done({ version: V, unit, seq: r.seq });
          break;
      }
    }
  }
}

const MEDIA = 1 << 20;
const SLOT = 128 * 1024;
const SECTOR = 512;

test('end to end: handlers serve a memory disk through GateDevice, grow on ENOMEM, retry EINTR, exit on ECANCELED', async () => {
  const reg = new GateRegistry({ clock: new ManualClock() });
  const unit = await reg.create({ version: V, mediasize: MEDIA, sectorsize: SECTOR, maxcount: 64 });
  const store = Buffer.alloc(MEDIA);
  const handlers = [1, 2].map((seed) => new MemoryHandler(reg, unit, store, seed));
  const exits = handlers.map((h) => h.run());
  const dev = reg.open(unit);
  const model = Buffer.alloc(MEDIA);
  const rand = prng(42);
  const sectors = (max: number): number => SECTOR * (1 + Math.floor(rand() * (max / SECTOR)));

  // Signals arrive at random moments while I/O runs; they must never lose a request.
  let storm = true;
  const stormDone = (async () => {
    while (storm) {
      handlers[Math.floor(rand() * handlers.length)]!.interrupt();
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  })();

  for (let round = 0; round < 30; round++) {
    // One operation per 128 KiB slot, all concurrent: disjoint ranges keep the model exact.
    const ops: Promise<void>[] = [];
    for (let slot = 0; slot < MEDIA / SLOT; slot++) {
      const base = slot * SLOT;
      const length = sectors(SLOT / 2);
      const offset = base + SECTOR * Math.floor(rand() * ((SLOT - length) / SECTOR + 1));
      const kind = rand();
      if (kind < 0.45) {
        const data = Buffer.alloc(length);
        for (let i = 0; i < length; i += 64) data[i] = Math.floor(rand() * 256);
        data.copy(model, offset);
        ops.push(dev.write(data, offset, rand() < 0.2 ? REQ.FUA : 0));
      } else if (kind < 0.75) {
        const expected = Buffer.from(model.subarray(offset, offset + length));
        const buf = Buffer.alloc(length);
        ops.push(dev.read(buf, offset, 0).then(() => assert.deepEqual(buf, expected)));
      } else if (kind < 0.85) {
        model.fill(0, offset, offset + length);
        ops.push(dev.zero(offset, length, 0));
      } else if (kind < 0.95) {
        ops.push(dev.trim(offset, length, 0)); // this handler leaves trimmed data as it was
      } else {
        ops.push(dev.flush(0));
      }
    }
    await Promise.all(ops);
  }
  storm = false;
  await stormDone;

  // The whole disk, read back through the device, equals the model.
  const all = Buffer.alloc(MEDIA);
  await dev.read(all, 0, 0);
  assert.ok(all.equals(model), 'disk contents match the model');
  assert.ok(store.equals(model));

  // Handlers started with a 512-byte buffer and grew it on ENOMEM.
  for (const h of handlers) assert.ok(h.buffer.length <= SLOT / 2, 'never larger than the largest write');
  assert.ok(handlers.some((h) => h.grows > 0));
  assert.ok(handlers.reduce((n, h) => n + h.retried, 0) > 0, 'some requests were retried with EAGAIN');

  // At a quiet point both handlers sleep in start; a signal to each interrupts exactly
  // that call, they retry, and they still serve the next request.
  await until(() => reg.list()[0]!.sleeping === 2);
  const before = handlers.map((h) => h.interrupts);
  for (const h of handlers) h.interrupt();
  await until(() => handlers.every((h, i) => h.interrupts === before[i]! + 1) && reg.list()[0]!.sleeping === 2);
  const tail = Buffer.alloc(SECTOR, 0x77);
  await dev.write(tail, MEDIA - SECTOR, REQ.FUA);
  const check = Buffer.alloc(SECTOR);
  await dev.read(check, MEDIA - SECTOR, 0);
  assert.deepEqual(check, tail);

  // The device is open: an unforced destroy is refused, and the handlers keep running.
  await rejectsWith(reg.destroy({ version: V, unit, force: false }), 'EBUSY');
  // A forced destroy ends both handlers cleanly with ECANCELED.
  await reg.destroy({ version: V, unit, force: true });
  assert.deepEqual(await Promise.all(exits), ['exited: ECANCELED', 'exited: ECANCELED']);
  await rejectsWith(dev.read(Buffer.alloc(SECTOR), 0, 0), 'ENXIO');
  await dev.close();
  assert.deepEqual(reg.list(), []);
});
