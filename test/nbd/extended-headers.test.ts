/**
 * NBD_OPT_EXTENDED_HEADERS at the byte level: negotiation, 32-byte requests, and
 * 32-byte extended reply chunks for every command, with 64-bit effect lengths. Debian's
 * libnbd 1.14 and qemu 7.2 predate the extension, so only a raw client can check this.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/backends/memory.js';
import { NBD_ERROR } from '../../src/errors/index.js';
import { Export } from '../../src/export/index.js';
import {
  BASE_ALLOCATION,
  NBD_CMD,
  NBD_CMD_FLAG,
  NBD_FLAG,
  NBD_OPT,
  NBD_REP,
  NBD_REPLY_FLAG,
  NBD_REPLY_TYPE,
  NBD_SIZE,
  NBD_STATE,
  commandName,
} from '../../src/nbd/constants.js';
import { encodeInfoRequest, encodeMetaContextRequest, encodeRequest, readU64 } from '../../src/nbd/codec.js';
import { RawClient } from '../helpers/raw-client.js';
import { connect, decodeErrorPayload, expectError, expectOk, pattern, readReply, serveExports, type Chunk, type DirectServer } from './helpers.js';

const C = NBD_CMD;
const F = NBD_CMD_FLAG;
const T = NBD_REPLY_TYPE;
const DONE = NBD_REPLY_FLAG.NBD_REPLY_FLAG_DONE;

/** 2^40 bytes: extents of an empty region are longer than a u32 can say. */
const BIG = 2 ** 40;
const MAX_PAYLOAD = 256 * 1024;
const MAX_DISCARD = 1024 * 1024;

let srv: DirectServer;
let big: MemoryDevice;

before(async () => {
  big = new MemoryDevice({ size: BIG });
  srv = await serveExports([new Export({ name: 'big', device: big })], { maxPayload: MAX_PAYLOAD, maxDiscard: MAX_DISCARD });
});
after(() => srv.close());

/** Connects with extended headers and base:allocation selected. */
function ext(): Promise<RawClient> {
  return connect(srv.socket, 'extended', 'big', true);
}

describe('negotiation', () => {
  test('EXTENDED_HEADERS is acknowledged with a bare ACK', async () => {
    const c = await RawClient.connect(srv.socket);
    await c.greet();
    const r = await c.option(NBD_OPT.NBD_OPT_EXTENDED_HEADERS);
    assert.deepEqual(r.map((x) => [x.type, x.data.length]), [[NBD_REP.NBD_REP_ACK, 0]]);
    c.close();
  });

  test('a repeated EXTENDED_HEADERS gets ERR_INVALID and negotiation continues', async () => {
    const c = await RawClient.connect(srv.socket);
    await c.greet();
    await c.expectAck(NBD_OPT.NBD_OPT_EXTENDED_HEADERS);
    const r = await c.option(NBD_OPT.NBD_OPT_EXTENDED_HEADERS);
    assert.equal(r.length, 1);
    assert.equal(r[0]!.type, NBD_REP.NBD_REP_ERR_INVALID);
    await c.expectAck(NBD_OPT.NBD_OPT_GO, encodeInfoRequest('big', []));
    c.request(0, C.NBD_CMD_FLUSH, 1n, 0, 0, true);
    await expectOk(c, 1n);
    c.close();
  });

  test('EXTENDED_HEADERS with data gets ERR_INVALID', async () => {
    const c = await RawClient.connect(srv.socket);
    await c.greet();
    const r = await c.option(NBD_OPT.NBD_OPT_EXTENDED_HEADERS, Buffer.from('x'));
    assert.equal(r[0]!.type, NBD_REP.NBD_REP_ERR_INVALID);
    c.close();
  });

  test('EXTENDED_HEADERS after STRUCTURED_REPLY is acknowledged', async () => {
    const c = await RawClient.connect(srv.socket);
    await c.greet();
    await c.expectAck(NBD_OPT.NBD_OPT_STRUCTURED_REPLY);
    await c.expectAck(NBD_OPT.NBD_OPT_EXTENDED_HEADERS);
    await c.expectAck(NBD_OPT.NBD_OPT_GO, encodeInfoRequest('big', []));
    c.request(0, C.NBD_CMD_FLUSH, 2n, 0, 0, true);
    const [r] = await expectOk(c, 2n);
    assert.equal(r!.h.kind, 'extended');
    c.close();
  });

  test('EXPORT_NAME after EXTENDED_HEADERS closes the connection', async () => {
    const c = await RawClient.connect(srv.socket);
    await c.greet();
    await c.expectAck(NBD_OPT.NBD_OPT_EXTENDED_HEADERS);
    c.write(Buffer.concat([optionHeader(NBD_OPT.NBD_OPT_EXPORT_NAME, 3), Buffer.from('big')]));
    assert.equal(await c.closedByServer(), true);
  });

  test('GO after EXTENDED_HEADERS advertises DF and the export size', async () => {
    const c = await RawClient.connect(srv.socket);
    await c.greet();
    await c.expectAck(NBD_OPT.NBD_OPT_EXTENDED_HEADERS);
    const r = await c.expectAck(NBD_OPT.NBD_OPT_GO, encodeInfoRequest('big', []));
    const info = r.find((x) => x.type === NBD_REP.NBD_REP_INFO && x.data.readUInt16BE(0) === 0)!;
    assert.equal(readU64(info.data, 2), BIG);
    assert.ok(info.data.readUInt16BE(10) & NBD_FLAG.NBD_FLAG_SEND_DF);
    c.close();
  });
});

function optionHeader(option: number, length: number): Buffer {
  const b = Buffer.alloc(NBD_SIZE.OPTION_HEADER);
  b.write('IHAVEOPT', 0, 'latin1');
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(length, 12);
  return b;
}

describe('transmission with extended headers', () => {
  test('WRITE with PAYLOAD_LEN gets a NONE chunk with DONE, the cookie and the request offset', async () => {
    const c = await ext();
    const off = 3 * 2 ** 32 + 4096; // above 4 GiB: the offset field is 64-bit
    c.request(F.NBD_CMD_FLAG_PAYLOAD_LEN, C.NBD_CMD_WRITE, 0x1122334455667788n, off, 4096, true, pattern(4096, 7));
    const r = await readReply(c);
    assert.equal(r.length, 1);
    const { h, payload } = r[0]!;
    assert.equal(h.kind, 'extended');
    assert.equal(h.size, NBD_SIZE.EXTENDED_REPLY_HEADER);
    assert.equal(h.type, T.NBD_REPLY_TYPE_NONE);
    assert.equal(h.flags, DONE);
    assert.equal(h.cookie, 0x1122334455667788n);
    assert.equal(h.offset, off);
    assert.equal(h.length, 0);
    assert.equal(payload.length, 0);
    c.close();
  });

  test('READ returns one OFFSET_DATA chunk with DONE: header offset = request offset, payload = offset + data', async () => {
    const c = await ext();
    const off = 5 * 2 ** 32 + 512;
    c.request(F.NBD_CMD_FLAG_PAYLOAD_LEN, C.NBD_CMD_WRITE, 1n, off, 8192, true, pattern(8192, 3));
    await expectOk(c, 1n);
    c.request(0, C.NBD_CMD_READ, 2n, off + 100, 4000, true);
    const r = await readReply(c);
    assert.equal(r.length, 1);
    const { h, payload } = r[0]!;
    assert.equal(h.kind, 'extended');
    assert.equal(h.type, T.NBD_REPLY_TYPE_OFFSET_DATA);
    assert.equal(h.flags, DONE);
    assert.equal(h.cookie, 2n);
    assert.equal(h.offset, off + 100);
    assert.equal(h.length, 8 + 4000);
    assert.equal(readU64(payload, 0), off + 100);
    assert.deepEqual(payload.subarray(8), pattern(8192, 3).subarray(100, 4100));
    c.close();
  });

  test('READ of an unwritten region of at least sparseReadMinimum is one OFFSET_HOLE chunk with DONE', async () => {
    const c = await ext();
    const off = BIG - 128 * 1024;
    c.request(0, C.NBD_CMD_READ, 3n, off, 128 * 1024, true);
    const r = await readReply(c);
    assert.equal(r.length, 1);
    const { h, payload } = r[0]!;
    assert.equal(h.type, T.NBD_REPLY_TYPE_OFFSET_HOLE);
    assert.equal(h.flags, DONE);
    assert.equal(h.offset, off);
    assert.equal(h.length, 12);
    assert.equal(readU64(payload, 0), off);
    assert.equal(payload.readUInt32BE(8), 128 * 1024);
    c.close();
  });

  test('READ with DF of a hole is one OFFSET_DATA chunk of zeroes', async () => {
    const c = await ext();
    const off = BIG - 128 * 1024;
    c.request(F.NBD_CMD_FLAG_DF, C.NBD_CMD_READ, 4n, off, 128 * 1024, true);
    const r = await readReply(c);
    assert.equal(r.length, 1);
    assert.equal(r[0]!.h.type, T.NBD_REPLY_TYPE_OFFSET_DATA);
    assert.equal(r[0]!.h.flags, DONE);
    assert.ok(r[0]!.payload.subarray(8).equals(Buffer.alloc(128 * 1024)));
    c.close();
  });

  test('WRITE without PAYLOAD_LEN gets an EINVAL error chunk and the connection stays usable', async () => {
    const c = await ext();
    c.request(0, C.NBD_CMD_WRITE, 5n, 4096, 512, true);
    const { message, h } = await expectError(c, 5n, NBD_ERROR.NBD_EINVAL);
    assert.equal(h.kind, 'extended');
    assert.equal(h.flags, DONE);
    assert.equal(h.offset, 4096);
    assert.match(message, /PAYLOAD_LEN/);
    c.request(0, C.NBD_CMD_FLUSH, 6n, 0, 0, true);
    await expectOk(c, 6n);
    c.close();
  });

  test('FLUSH, TRIM, WRITE_ZEROES and CACHE each get one NONE chunk with DONE', async () => {
    const c = await ext();
    const cmds: [number, number, number, number][] = [
      [C.NBD_CMD_FLUSH, 0, 0, 0],
      [C.NBD_CMD_TRIM, 0, 2 ** 20, 2 ** 20],
      [C.NBD_CMD_WRITE_ZEROES, 0, 2 ** 21, 4096],
      [C.NBD_CMD_WRITE_ZEROES, F.NBD_CMD_FLAG_NO_HOLE | F.NBD_CMD_FLAG_FUA, 2 ** 22, 4096],
      [C.NBD_CMD_WRITE_ZEROES, F.NBD_CMD_FLAG_FAST_ZERO, 2 ** 23, 4096],
      [C.NBD_CMD_CACHE, 0, 0, 2 ** 20],
    ];
    let cookie = 100n;
    for (const [type, flags, offset, length] of cmds) {
      cookie++;
      c.request(flags, type, cookie, offset, length, true);
      const [r] = await expectOk(c, cookie);
      assert.equal(r!.h.kind, 'extended');
      assert.equal(r!.h.type, T.NBD_REPLY_TYPE_NONE);
      assert.equal(r!.h.flags, DONE);
      assert.equal(r!.h.offset, offset);
      assert.equal(r!.h.length, 0);
    }
    c.close();
  });

  test('TRIM, WRITE_ZEROES and CACHE accept 64-bit effect lengths beyond 2^32', async () => {
    const c = await ext();
    const off = 2 ** 36;
    c.request(F.NBD_CMD_FLAG_PAYLOAD_LEN, C.NBD_CMD_WRITE, 1n, off + 2 ** 33, 4096, true, pattern(4096));
    await expectOk(c, 1n);
    c.request(0, C.NBD_CMD_WRITE_ZEROES, 2n, off, 2 ** 34, true);
    await expectOk(c, 2n);
    c.request(0, C.NBD_CMD_READ, 3n, off + 2 ** 33, 4096, true);
    const [rd] = await readReply(c);
    assert.ok(rd!.payload.subarray(8).equals(Buffer.alloc(4096)), 'zeroed by a 2^34-byte WRITE_ZEROES');
    c.request(0, C.NBD_CMD_TRIM, 4n, off, 2 ** 35, true);
    await expectOk(c, 4n);
    c.request(0, C.NBD_CMD_CACHE, 5n, 0, 2 ** 33 + 1, true);
    await expectOk(c, 5n);
    c.close();
  });

  test('BLOCK_STATUS returns BLOCK_STATUS_EXT with 64-bit lengths; one extent exceeds 2^32', async () => {
    const c = await ext();
    // Fresh region at 2^39: 64 KiB of data, then a hole to the end of the device.
    const base = 2 ** 39;
    c.request(F.NBD_CMD_FLAG_PAYLOAD_LEN, C.NBD_CMD_WRITE, 1n, base, 4096, true, pattern(4096));
    await expectOk(c, 1n);
    c.request(0, C.NBD_CMD_BLOCK_STATUS, 2n, base, BIG - base, true);
    const r = await readReply(c);
    assert.equal(r.length, 1);
    const { h, payload } = r[0]!;
    assert.equal(h.kind, 'extended');
    assert.equal(h.type, T.NBD_REPLY_TYPE_BLOCK_STATUS_EXT);
    assert.equal(h.flags, DONE);
    assert.equal(h.offset, base);
    assert.notEqual(payload.readUInt32BE(0), 0, 'the context id chosen by SET_META_CONTEXT');
    const count = payload.readUInt32BE(4);
    assert.equal(h.length, 8 + 16 * count);
    const descs = [];
    for (let i = 0; i < count; i++) descs.push([readU64(payload, 8 + 16 * i), readU64(payload, 16 + 16 * i)]);
    const hz = NBD_STATE.NBD_STATE_HOLE | NBD_STATE.NBD_STATE_ZERO;
    assert.deepEqual(descs, [
      [64 * 1024, 0],
      [BIG - base - 64 * 1024, hz],
    ]);
    assert.ok(descs[1]![0]! > 2 ** 32);
    c.close();
  });

  test('BLOCK_STATUS with REQ_ONE returns exactly one 64-bit descriptor', async () => {
    const c = await ext();
    const base = 2 ** 38;
    c.request(F.NBD_CMD_FLAG_REQ_ONE, C.NBD_CMD_BLOCK_STATUS, 3n, base, 2 ** 37, true);
    const [r] = await readReply(c);
    assert.equal(r!.h.type, T.NBD_REPLY_TYPE_BLOCK_STATUS_EXT);
    assert.equal(r!.payload.readUInt32BE(4), 1);
    assert.equal(r!.h.length, 8 + 16);
    assert.equal(readU64(r!.payload, 8), 2 ** 37);
    c.close();
  });

  test('BLOCK_STATUS without SET_META_CONTEXT gets EINVAL', async () => {
    const c = await connect(srv.socket, 'extended', 'big', false);
    c.request(0, C.NBD_CMD_BLOCK_STATUS, 9n, 0, 4096, true);
    await expectError(c, 9n, NBD_ERROR.NBD_EINVAL);
    c.close();
  });

  test('a WRITE longer than maxPayload is discarded and answered with an error; the stream stays in sync', async () => {
    const c = await ext();
    const len = MAX_PAYLOAD + 4096;
    // The payload looks like request headers: if the server parsed it, replies would show.
    const bogus = Buffer.alloc(len);
    c.request(F.NBD_CMD_FLAG_PAYLOAD_LEN, C.NBD_CMD_WRITE, 10n, 0, len, true, bogus);
    const { h } = await expectError(c, 10n, NBD_ERROR.NBD_EINVAL);
    assert.equal(h.kind, 'extended');
    c.request(0, C.NBD_CMD_READ, 11n, 0, 512, true);
    const [rd] = await readReply(c);
    assert.equal(rd!.h.cookie, 11n);
    assert.equal(rd!.h.type, T.NBD_REPLY_TYPE_OFFSET_DATA);
    c.close();
  });

  test('a payload on a command that takes none is discarded and answered with EINVAL', async () => {
    const c = await ext();
    c.request(F.NBD_CMD_FLAG_PAYLOAD_LEN, C.NBD_CMD_READ, 12n, 0, 100, true, Buffer.alloc(100, 0x25));
    await expectError(c, 12n, NBD_ERROR.NBD_EINVAL);
    c.request(0, C.NBD_CMD_FLUSH, 13n, 0, 0, true);
    await expectOk(c, 13n);
    c.close();
  });

  test('a payload length beyond maxDiscard closes the connection', async () => {
    const c = await ext();
    c.request(F.NBD_CMD_FLAG_PAYLOAD_LEN, C.NBD_CMD_WRITE, 14n, 0, MAX_DISCARD + 1, true);
    assert.equal(await c.closedByServer(), true);
  });

  test('a 64-bit payload length above 2^53 closes the connection', async () => {
    const c = await ext();
    const h = Buffer.alloc(NBD_SIZE.EXTENDED_REQUEST);
    h.writeUInt32BE(0x21e41c71, 0);
    h.writeUInt16BE(F.NBD_CMD_FLAG_PAYLOAD_LEN, 4);
    h.writeUInt16BE(C.NBD_CMD_WRITE, 6);
    h.writeBigUInt64BE(15n, 8);
    h.writeBigUInt64BE(0xffff_ffff_ffff_ffffn, 24);
    c.write(h);
    assert.equal(await c.closedByServer(), true);
  });

  test('a READ longer than maxPayload gets EINVAL; a 64-bit READ length too', async () => {
    const c = await ext();
    c.request(0, C.NBD_CMD_READ, 16n, 0, MAX_PAYLOAD + 1, true);
    await expectError(c, 16n, NBD_ERROR.NBD_EINVAL);
    c.request(0, C.NBD_CMD_READ, 17n, 0, 2 ** 33, true);
    await expectError(c, 17n, NBD_ERROR.NBD_EINVAL);
    c.close();
  });

  test('a compact request header after EXTENDED_HEADERS is out of sync and closes the connection', async () => {
    const c = await ext();
    c.request(0, C.NBD_CMD_FLUSH, 18n, 0, 0, false);
    c.write(Buffer.alloc(4)); // complete 32 bytes so the server sees a whole (bad) header
    assert.equal(await c.closedByServer(), true);
  });

  test('LIST_META_CONTEXT after EXTENDED_HEADERS (without SR) lists base:allocation', async () => {
    const c = await RawClient.connect(srv.socket);
    await c.greet();
    await c.expectAck(NBD_OPT.NBD_OPT_EXTENDED_HEADERS);
    const r = await c.expectAck(NBD_OPT.NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest('big', []));
    assert.deepEqual(
      r.filter((x) => x.type === NBD_REP.NBD_REP_META_CONTEXT).map((x) => x.data.subarray(4).toString()),
      [BASE_ALLOCATION],
    );
    c.close();
  });
});

/**
 * u64 values at and beyond the float edge: 2^53 - 1 is the last safe integer, 2^53 + 1
 * the first one a number rounds, and 2^64 - 1 rounds up to 2^64, which no u64 holds.
 */
const U64_EDGES = [2n ** 53n - 1n, 2n ** 53n, 2n ** 53n + 1n, 2n ** 63n, 2n ** 64n - 1n] as const;
/** The commands whose offset and 64-bit length reach validation with no payload to frame. */
const PAYLOAD_LESS = [C.NBD_CMD_READ, C.NBD_CMD_TRIM, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_BLOCK_STATUS, C.NBD_CMD_CACHE] as const;
/** A length every command above accepts at an in-range offset. */
const EDGE_LENGTH = 512;

describe('offsets and lengths at the 64-bit edges', () => {
  /** One edge request: where it points, and the error it must get. */
  interface EdgeCase {
    readonly type: number;
    readonly offset: bigint;
    readonly length: bigint;
  }
  const cases: EdgeCase[] = PAYLOAD_LESS.flatMap((type) => [
    ...U64_EDGES.map((offset) => ({ type, offset, length: BigInt(EDGE_LENGTH) })),
    ...U64_EDGES.map((length) => ({ type, offset: 0n, length })),
  ]);

  /**
   * Every case is out of range, so EINVAL, except a WRITE_ZEROES whose offset and length
   * are both safe integers: that one is a zero past the end, ENOSPC as for any other.
   */
  function expectedErrno(e: EdgeCase): number {
    const safe = BigInt(Number.MAX_SAFE_INTEGER);
    const pastTheEnd = e.offset <= safe && e.length <= safe;
    return e.type === C.NBD_CMD_WRITE_ZEROES && pastTheEnd ? NBD_ERROR.NBD_ENOSPC : NBD_ERROR.NBD_EINVAL;
  }

  test('each gets its error chunk echoing the exact offset, and a FLUSH queued after them is answered on the same connection', async () => {
    const c = await ext();
    cases.forEach((e, i) => c.write(encodeRequest(0, e.type, BigInt(i + 1), e.offset, e.length, true)));
    const flushCookie = BigInt(cases.length + 1);
    c.request(0, C.NBD_CMD_FLUSH, flushCookie, 0, 0, true);
    const replies = new Map<bigint, Chunk[]>();
    for (let i = 0; i <= cases.length; i++) {
      const r = await readReply(c);
      replies.set(r[0]!.h.cookie, r);
    }
    cases.forEach((e, i) => {
      const what = `${commandName(e.type)} at ${e.offset} of ${e.length}`;
      const r = replies.get(BigInt(i + 1));
      assert.ok(r, `${what}: no reply`);
      assert.equal(r.length, 1, `${what}: ${r.length} chunks`);
      const { h, payload } = r[0]!;
      assert.equal(h.type, T.NBD_REPLY_TYPE_ERROR, `${what}: chunk type ${h.type}`);
      assert.equal(h.flags, DONE);
      assert.equal(h.exactOffset, e.offset, `${what}: offset echoed as ${h.exactOffset}`);
      assert.equal(decodeErrorPayload(h.type, payload).errno, expectedErrno(e), what);
    });
    const flush = replies.get(flushCookie);
    assert.ok(flush, 'the FLUSH after the edge requests got no reply');
    assert.equal(flush[0]!.h.type, T.NBD_REPLY_TYPE_NONE);
    c.close();
  });
});
