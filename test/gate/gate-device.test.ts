import { test } from 'node:test';
import assert from 'node:assert/strict';
import { AssertionError } from 'node:assert';
import { REQ } from '../../src/device/index.js';
import { GATE_MAX_IO_SIZE, GATE_ZERO_CHUNK, GateRegistry, type GateCommand } from '../../src/gate/index.js';
import { V, rejectsWith, setup, turns } from './helpers.js';

interface Logged {
  readonly cmd: GateCommand;
  readonly offset: number;
  readonly length: number;
  readonly zeroes?: boolean;
}

/**
 * A minimal handler: answers every request at once from `store` and logs what it saw.
 * Resolves when the gate is destroyed.
 */
async function serve(reg: GateRegistry, unit: number, store: Buffer, log: Logged[]): Promise<void> {
  for (;;) {
    const r = await reg.start({ version: V, unit, length: 1 << 24 });
    if (r.error === 'ECANCELED') return;
    if (r.error === 'ENOMEM') throw new Error('unexpected ENOMEM');
    const entry: Logged = { cmd: r.cmd, offset: r.offset, length: r.length };
    if (r.cmd === 'write') {
      r.data!.copy(store, r.offset);
      log.push({ ...entry, zeroes: r.data!.every((b) => b === 0) });
      await reg.done({ version: V, unit, seq: r.seq });
    } else if (r.cmd === 'read') {
      log.push(entry);
      await reg.done({ version: V, unit, seq: r.seq, data: store.subarray(r.offset, r.offset + r.length) });
    } else {
      log.push(entry);
      await reg.done({ version: V, unit, seq: r.seq });
    }
  }
}

test('GateDevice advertises the gate: size, block sizes, capabilities, description', async () => {
  const { reg, dev } = await setup({ mediasize: 8 << 20, sectorsize: 4096 });
  assert.equal(dev.size, 8 << 20);
  assert.deepEqual(dev.blockSize, { minimum: 4096, preferred: 4096, maximum: GATE_MAX_IO_SIZE });
  assert.deepEqual(dev.capabilities, {
    write: true,
    flush: true,
    fua: true,
    trim: true,
    zero: true,
    fastZero: false,
    extents: false,
    cache: false,
    multiConn: true,
  });
  assert.equal(dev.nonBlocking, false);
  assert.equal(dev.description, 'gate ggate0 8MiB');
  const small = await setup({ sectorsize: 512 });
  assert.equal(small.dev.blockSize.preferred, 4096);
  await reg.close();
  await small.reg.close();
});

test('GateDevice maps read, write, trim and flush onto gate commands; data round-trips', async () => {
  const { reg, unit, dev } = await setup();
  const store = Buffer.alloc(1 << 20);
  const log: Logged[] = [];
  const handler = serve(reg, unit, store, log);
  const data = Buffer.alloc(4096);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
  await dev.write(data, 8192, 0);
  const back = Buffer.alloc(4096);
  await dev.read(back, 8192, 0);
  assert.deepEqual(back, data);
  await dev.trim(0, 4096, 0);
  await dev.flush(0);
  assert.deepEqual(
    log.map((l) => [l.cmd, l.offset, l.length]),
    [
      ['write', 8192, 4096],
      ['read', 8192, 4096],
      ['delete', 0, 4096],
      ['flush', 0, 0],
    ],
  );
  await reg.close();
  await handler;
});

test('GateDevice emulates FUA with a flush after the write (and after trim and zero)', async () => {
  const { reg, unit, dev } = await setup();
  const log: Logged[] = [];
  const handler = serve(reg, unit, Buffer.alloc(1 << 20), log);
  await dev.write(Buffer.alloc(512, 1), 0, REQ.FUA);
  await dev.trim(512, 512, REQ.FUA);
  await dev.zero(1024, 512, REQ.FUA);
  assert.deepEqual(
    log.map((l) => l.cmd),
    ['write', 'flush', 'delete', 'flush', 'write', 'flush'],
  );
  await reg.close();
  await handler;
});

test('GateDevice.zero writes zeroes in GATE_ZERO_CHUNK pieces; FAST_ZERO fails EOPNOTSUPP untouched', async () => {
  const { reg, unit, dev } = await setup({ mediasize: 4 << 20 });
  const store = Buffer.alloc(4 << 20, 0xff);
  const log: Logged[] = [];
  const handler = serve(reg, unit, store, log);
  const length = 2 * GATE_ZERO_CHUNK + 4096;
  await dev.zero(512, length, REQ.NO_HOLE);
  assert.deepEqual(
    log.map((l) => [l.cmd, l.offset, l.length, l.zeroes]),
    [
      ['write', 512, GATE_ZERO_CHUNK, true],
      ['write', 512 + GATE_ZERO_CHUNK, GATE_ZERO_CHUNK, true],
      ['write', 512 + 2 * GATE_ZERO_CHUNK, 4096, true],
    ],
  );
  assert.equal(store[511], 0xff);
  assert.ok(store.subarray(512, 512 + length).every((b) => b === 0));
  assert.equal(store[512 + length], 0xff);
  log.length = 0;
  await rejectsWith(dev.zero(0, 512, REQ.FAST_ZERO), 'EOPNOTSUPP');
  assert.deepEqual(log, []);
  await reg.close();
  await handler;
});

test('GateDevice asserts (does not re-validate) what the protocol edge checked: a misaligned or non-integer request is a bug and never reaches the queue; empty requests skip it', async () => {
  const { reg, dev } = await setup({ sectorsize: 4096 });
  await assert.rejects(dev.read(Buffer.alloc(512), 0, 0), AssertionError);
  await assert.rejects(dev.write(Buffer.alloc(4096), 100, 0), AssertionError);
  await assert.rejects(dev.trim(0, 100, 0), AssertionError);
  await assert.rejects(dev.zero(-4096, 4096, 0), AssertionError);
  await assert.rejects(dev.cache(0.5, 4096, 0), AssertionError);
  assert.equal(reg.list()[0]!.queued, 0);
  await dev.read(Buffer.alloc(0), 4096, 0);
  await dev.write(Buffer.alloc(0), 4096, 0);
  await dev.trim(4096, 0, 0);
  await dev.zero(4096, 0, 0);
  assert.equal(reg.list()[0]!.queued, 0);
  await reg.close();
});

test('GateDevice.extents is one data extent and cache is a no-op; neither reaches the queue', async () => {
  const { reg, dev } = await setup();
  assert.deepEqual(await dev.extents(4096, 8192, 0), [{ offset: 4096, length: 8192, flags: 0 }]);
  await dev.cache(0, 4096, 0);
  assert.equal(reg.list()[0]!.queued, 0);
  await reg.close();
});

test('GateDevice.close releases the open count and makes further calls fail EBADF', async () => {
  const { reg, unit, dev } = await setup();
  assert.equal(reg.list()[0]!.openCount, 1);
  await dev.close();
  assert.equal(reg.list()[0]!.openCount, 0);
  await rejectsWith(dev.read(Buffer.alloc(512), 0, 0), 'EBADF');
  await rejectsWith(dev.flush(0), 'EBADF');
  await dev.close();
  assert.equal(reg.list()[0]!.openCount, 0);
  await reg.destroy({ version: V, unit, force: false });
});

test('GateDevice requests in flight when the device closes still complete', async () => {
  const { reg, unit, dev } = await setup();
  const buf = Buffer.alloc(512);
  const p = dev.read(buf, 0, 0);
  await dev.close();
  const r = await reg.start({ version: V, unit, length: 0 });
  assert.equal(r.error, 0);
  if (r.error === 0) await reg.done({ version: V, unit, seq: r.seq, data: Buffer.alloc(512, 0x42) });
  await p;
  assert.equal(buf[511], 0x42);
  await turns();
  await reg.close();
});
