/**
 * Findings of a review of the NBD server against doc/proto.md (with the extended-headers
 * extension), each pinned by a raw-socket test: what resets the metadata context
 * selection, which option error a downgrade from extended headers gets, and the error
 * values of failing requests.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { MemoryDevice } from '../../src/backends/memory.js';
import { FilterDevice } from '../../src/device/index.js';
import { BlockError, NBD_ERROR } from '../../src/errors/index.js';
import { Export } from '../../src/export/index.js';
import { NBD_CMD, NBD_CMD_FLAG, NBD_OPT, NBD_REP, NBD_REPLY_TYPE } from '../../src/nbd/constants.js';
import { encodeInfoRequest, encodeMetaContextRequest, encodeRequest } from '../../src/nbd/codec.js';
import { RawClient } from '../helpers/raw-client.js';
import { GatedDevice, connect, expectError, expectOk, readReply, serveExports, until, type DirectServer } from './helpers.js';

const C = NBD_CMD;
const SIZE = 1024 * 1024;
/** Below SIZE, so that a READ can exceed the maximum payload without leaving the export. */
const MAX_PAYLOAD = 64 * 1024;

/** A device whose cache() always fails, as a prefetch from a failing disk would. */
class FailingCache extends FilterDevice {
  override cache(): Promise<void> {
    return Promise.reject(new BlockError('EIO', 'prefetch failed'));
  }
}

let srv: DirectServer;

before(async () => {
  srv = await serveExports([
    new Export({ name: 'disk', device: new MemoryDevice({ size: SIZE }) }),
    new Export({ name: 'badcache', device: new FailingCache(new MemoryDevice({ size: SIZE })) }),
  ], { maxPayload: MAX_PAYLOAD });
});
after(() => srv.close());

async function greeted(): Promise<RawClient> {
  const c = await RawClient.connect(srv.socket);
  await c.greet();
  return c;
}

describe('option negotiation', () => {
  test('STRUCTURED_REPLY after EXTENDED_HEADERS gets ERR_EXT_HEADER_REQD; extended headers stay on', async () => {
    const c = await greeted();
    await c.expectAck(NBD_OPT.NBD_OPT_EXTENDED_HEADERS);
    const r = await c.option(NBD_OPT.NBD_OPT_STRUCTURED_REPLY);
    assert.deepEqual(r.map((x) => x.type), [NBD_REP.NBD_REP_ERR_EXT_HEADER_REQD]);
    await c.expectAck(NBD_OPT.NBD_OPT_GO, encodeInfoRequest('disk', []));
    c.request(0, C.NBD_CMD_FLUSH, 1n, 0, 0, true);
    const [reply] = await readReply(c);
    assert.equal(reply!.h.kind, 'extended');
    c.close();
  });

  test('EXTENDED_HEADERS after SET_META_CONTEXT keeps base:allocation selected (only SET and STARTTLS replace it)', async () => {
    const c = await greeted();
    await c.expectAck(NBD_OPT.NBD_OPT_STRUCTURED_REPLY);
    await c.expectAck(NBD_OPT.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', ['base:allocation']));
    await c.expectAck(NBD_OPT.NBD_OPT_EXTENDED_HEADERS);
    await c.expectAck(NBD_OPT.NBD_OPT_GO, encodeInfoRequest('disk', []));
    c.request(0, C.NBD_CMD_BLOCK_STATUS, 1n, 0, 65536, true);
    const [reply] = await readReply(c);
    assert.equal(reply!.h.type & 0x8000, 0, 'not an error chunk');
    c.close();
  });

  test('a malformed SET_META_CONTEXT (ERR_INVALID) still replaces the earlier selection', async () => {
    const c = await greeted();
    await c.expectAck(NBD_OPT.NBD_OPT_STRUCTURED_REPLY);
    await c.expectAck(NBD_OPT.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', ['base:allocation']));
    const r = await c.option(NBD_OPT.NBD_OPT_SET_META_CONTEXT, Buffer.from([0, 0, 0, 9]));
    assert.deepEqual(r.map((x) => x.type), [NBD_REP.NBD_REP_ERR_INVALID]);
    await c.expectAck(NBD_OPT.NBD_OPT_GO, encodeInfoRequest('disk', []));
    c.request(0, C.NBD_CMD_BLOCK_STATUS, 1n, 0, 65536);
    await expectError(c, 1n, NBD_ERROR.NBD_EINVAL);
    c.close();
  });
});

describe('transmission', () => {
  test('a failing CACHE reports its error (the spec: the server MUST set the error code)', async () => {
    const c = await RawClient.connect(srv.socket);
    await c.handshake('badcache', { structured: true });
    c.request(0, C.NBD_CMD_CACHE, 1n, 0, 4096);
    await expectError(c, 1n, NBD_ERROR.NBD_EIO);
    // Reads and writes of the range are unaffected.
    c.request(0, C.NBD_CMD_WRITE, 2n, 0, 4096, false, Buffer.alloc(4096, 7));
    await expectOk(c, 2n);
    c.close();
  });

  test('a READ longer than the maximum payload gets EINVAL, with or without DF (EOVERFLOW is not for this)', async () => {
    const c = await RawClient.connect(srv.socket);
    await c.handshake('disk', { structured: true });
    c.request(0, C.NBD_CMD_READ, 1n, 0, MAX_PAYLOAD + 512);
    await expectError(c, 1n, NBD_ERROR.NBD_EINVAL);
    c.request(NBD_CMD_FLAG.NBD_CMD_FLAG_DF, C.NBD_CMD_READ, 2n, 0, MAX_PAYLOAD + 512);
    await expectError(c, 2n, NBD_ERROR.NBD_EINVAL);
    c.close();
  });
});

describe('resource bounds', () => {
  test('BLOCK_STATUS requests count against maxInFlightBytes by their largest reply: the server stops reading', async () => {
    const EXTENTS = 1024;
    const dev = new GatedDevice(new MemoryDevice({ size: SIZE }));
    // Each BLOCK_STATUS below may need EXTENTS descriptors of 16 bytes: four fill the budget.
    const s = await serveExports([new Export({ name: 'd', device: dev })], {
      maxExtents: EXTENTS,
      maxInFlightBytes: 4 * EXTENTS * 16,
    });
    try {
      const c = await connect(s.socket, 'structured', 'd', true);
      dev.hold((op) => op === 'extents');
      const N = 10;
      const reqs: Buffer[] = [];
      for (let i = 0; i < N; i++) reqs.push(encodeRequest(0, C.NBD_CMD_BLOCK_STATUS, BigInt(i), 0, SIZE));
      c.write(Buffer.concat(reqs));
      await until(() => dev.waiting === 4, '4 BLOCK_STATUS requests in the device');
      // Let the server read whatever it would read: it must not start more.
      await sleep(50);
      assert.equal(dev.waiting, 4);
      dev.release(Infinity, true);
      for (let i = 0; i < N; i++) {
        const [r] = await readReply(c);
        assert.equal(r!.h.type, NBD_REPLY_TYPE.NBD_REPLY_TYPE_BLOCK_STATUS);
      }
      assert.equal(dev.maxActive, 4);
      c.close();
    } finally {
      dev.release(Infinity, true);
      await s.close();
    }
  });
});
