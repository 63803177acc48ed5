/**
 * Graceful shutdown (NbdServer.close): requests already running finish and are answered,
 * new ones get ESHUTDOWN, then the connection closes; sessions still in the handshake
 * are closed at once; connections that never drain are cut after the grace period.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/backends/memory.js';
import { NBD_ERROR } from '../../src/errors/index.js';
import { Export } from '../../src/export/index.js';
import { NBD_CMD, NBD_OPT } from '../../src/nbd/constants.js';
import { RawClient } from '../helpers/raw-client.js';
import { GatedDevice, connect, expectError, pattern, readData, serveExports, until, type DirectServer } from './helpers.js';

async function gatedServer(): Promise<{ srv: DirectServer; dev: GatedDevice }> {
  const dev = new GatedDevice(new MemoryDevice({ size: 2 ** 20 }));
  await dev.write(pattern(2 ** 20, 4), 0, 0);
  const srv = await serveExports([new Export({ name: 'd', device: dev })]);
  return { srv, dev };
}

for (const mode of ['simple', 'structured', 'extended'] as const) {
  test(`close() in transmission (${mode}): the running request is answered, a new one gets ESHUTDOWN, then the connection closes`, async () => {
    const { srv, dev } = await gatedServer();
    const ext = mode === 'extended';
    try {
      const c = await connect(srv.socket, mode, 'd');
      dev.hold((op) => op === 'read');
      c.request(0, NBD_CMD.NBD_CMD_READ, 1n, 4096, 4096, ext);
      await until(() => dev.waiting === 1, 'the READ to reach the device');
      const closing = srv.server.close(10_000);
      c.request(0, NBD_CMD.NBD_CMD_FLUSH, 2n, 0, 0, ext);
      const { message } = await expectError(c, 2n, NBD_ERROR.NBD_ESHUTDOWN);
      if (mode !== 'simple') assert.match(message, /shutting down/);
      assert.equal(dev.calls.get('flush') ?? 0, 0, 'the refused FLUSH never reached the device');
      dev.release(Infinity, true);
      assert.deepEqual(await readData(c, 1n, 4096, 4096, mode), pattern(2 ** 20, 4).subarray(4096, 8192));
      assert.equal(await c.closedByServer(), true);
      await closing;
      assert.equal(srv.server.sessionCount, 0);
    } finally {
      dev.release(Infinity, true);
      await srv.close();
    }
  });
}

test('close() with nothing in flight closes a transmission session at once', async () => {
  const { srv } = await gatedServer();
  try {
    const c = await connect(srv.socket, 'structured', 'd');
    await srv.server.close(10_000);
    assert.equal(await c.closedByServer(), true);
  } finally {
    await srv.close();
  }
});

test('close() closes sessions still in the handshake, and later connections are refused', async () => {
  const { srv } = await gatedServer();
  try {
    const justConnected = await RawClient.connect(srv.socket);
    const greeted = await RawClient.connect(srv.socket);
    await greeted.greet();
    await greeted.expectAck(NBD_OPT.NBD_OPT_STRUCTURED_REPLY);
    await srv.server.close(10_000);
    assert.equal(await justConnected.closedByServer(), true);
    assert.equal(await greeted.closedByServer(), true);
    await assert.rejects(RawClient.connect(srv.socket));
  } finally {
    await srv.close();
  }
});

test('a connection whose request never finishes is cut after the grace period', async () => {
  const { srv, dev } = await gatedServer();
  try {
    const c = await connect(srv.socket, 'simple', 'd');
    dev.hold((op) => op === 'read');
    c.request(0, NBD_CMD.NBD_CMD_READ, 1n, 0, 512);
    await until(() => dev.waiting === 1, 'the READ to reach the device');
    await srv.server.close(50);
    assert.equal(await c.closedByServer(), true);
    assert.equal(srv.server.sessionCount, 0);
  } finally {
    dev.release(Infinity, true);
    await srv.close();
  }
});

test('close() called twice while a session is open: both calls resolve (one shutdown)', async () => {
  const srv = await serveExports([new Export({ name: '', device: new MemoryDevice({ size: 1 << 20 }) })]);
  const c = await connect(srv.socket, 'structured');
  try {
    const first = srv.server.close(2000);
    const second = srv.server.close(2000);
    const bounded = (p: Promise<void>) =>
      Promise.race([p.then(() => 'closed'), new Promise<string>((r) => setTimeout(() => r('hung'), 5000).unref())]);
    assert.deepEqual(await Promise.all([bounded(first), bounded(second)]), ['closed', 'closed']);
  } finally {
    c.close();
    await srv.close();
  }
});
