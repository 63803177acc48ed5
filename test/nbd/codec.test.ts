import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  decodeCompactRequest,
  decodeExtendedRequest,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeReplyHeader,
  encodeBlockStatus,
  encodeBlockStatusExt,
  encodeErrorPayload,
  encodeExportNameReply,
  encodeGreeting,
  encodeHolePayload,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
  encodeRequest,
  isDecodeError,
  MAX_ERROR_MESSAGE,
  readU64,
  writeExtendedHeader,
  writeSimpleReply,
  writeStructuredHeader,
  writeU64,
} from '../../src/nbd/codec.js';
import { NBD_CMD, NBD_OPT, NBD_REP, NBD_REPLY_TYPE, NBD_SIZE } from '../../src/nbd/constants.js';

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');

test('greeting: NBDMAGIC, IHAVEOPT, handshake flags', () => {
  assert.deepEqual(encodeGreeting(3), hex('4e42444d41474943 49484156454f5054 0003'));
});

test('option header decodes IHAVEOPT, option and length', () => {
  const h = decodeOptionHeader(hex('49484156454f5054 00000007 0000000a'));
  assert.deepEqual(h, { magicOk: true, option: NBD_OPT.NBD_OPT_GO, length: 10 });
  assert.equal(decodeOptionHeader(hex('49484156454f5055 00000007 0000000a')).magicOk, false);
});

test('option reply: magic, option, type, length, data', () => {
  assert.deepEqual(
    encodeOptionReply(NBD_OPT.NBD_OPT_LIST, NBD_REP.NBD_REP_ERR_UNSUP, 'no'),
    hex('0003e889045565a9 00000003 80000001 00000002 6e6f'),
  );
  assert.deepEqual(encodeOptionReply(8, NBD_REP.NBD_REP_ACK), hex('0003e889045565a9 00000008 00000001 00000000'));
});

test('NBD_REP_SERVER, INFO_EXPORT, INFO_BLOCK_SIZE, META_CONTEXT payloads', () => {
  assert.deepEqual(encodeRepServer('ab', 'c'), hex('00000002 6162 63'));
  assert.deepEqual(encodeInfoExport(2 ** 40 + 5, 0x0d6d), hex('0000 0000010000000005 0d6d'));
  assert.deepEqual(encodeInfoBlockSize(1, 4096, 33554432), hex('0003 00000001 00001000 02000000'));
  assert.deepEqual(encodeRepMetaContext(1, 'base:allocation'), Buffer.concat([hex('00000001'), Buffer.from('base:allocation')]));
});

test('EXPORT_NAME reply with and without the 124 zero bytes', () => {
  assert.deepEqual(encodeExportNameReply(1024, 0x0001, true), hex('0000000000000400 0001'));
  const full = encodeExportNameReply(1024, 0x0001, false);
  assert.equal(full.length, 134);
  assert.ok(full.subarray(10).every((b) => b === 0));
});

test('INFO/GO request: decode, and invalid lengths are reported', () => {
  const data = hex('00000003 646973 0002 0001 0003');
  assert.deepEqual(decodeInfoRequest(data), { name: 'dis', infos: [1, 3] });
  assert.deepEqual(encodeInfoRequest('dis', [1, 3]), data);
  assert.ok(isDecodeError(decodeInfoRequest(hex('00000009 646973 0000'))));
  assert.ok(isDecodeError(decodeInfoRequest(hex('00000003 646973 0002 0001'))));
  assert.ok(isDecodeError(decodeInfoRequest(hex('00000001 00 0000'))), 'NUL in a name is invalid');
  assert.ok(isDecodeError(decodeInfoRequest(hex('00000001 ff 0000'))), 'invalid UTF-8 is invalid');
});

test('META_CONTEXT request: decode and bounds', () => {
  const data = encodeMetaContextRequest('e', ['base:allocation', 'x']);
  assert.deepEqual(
    data,
    Buffer.concat([hex('00000001 65 00000002 0000000f'), Buffer.from('base:allocation'), hex('00000001 78')]),
  );
  assert.deepEqual(decodeMetaContextRequest(data), { name: 'e', queries: ['base:allocation', 'x'] });
  // A huge query count cannot make the decoder loop or allocate.
  assert.ok(isDecodeError(decodeMetaContextRequest(hex('00000000 ffffffff'))));
  assert.ok(isDecodeError(decodeMetaContextRequest(hex('00000000 00000001 00000005 6162'))));
  assert.ok(isDecodeError(decodeMetaContextRequest(Buffer.concat([data, hex('00')]))));
});

test('compact request: 28 bytes, 64-bit offset', () => {
  const b = hex('25609513 0001 0001 0102030405060708 0000010000000000 00001000');
  const r = decodeCompactRequest(b);
  assert.deepEqual(r, { magicOk: true, flags: 1, type: NBD_CMD.NBD_CMD_WRITE, cookie: 0x0102030405060708n, offset: 2 ** 40, offsetHigh: 0x100, offsetLow: 0, length: 4096 });
  assert.deepEqual(encodeRequest(1, 1, 0x0102030405060708n, 2 ** 40, 4096), b);
});

test('extended request: 32 bytes, 64-bit length', () => {
  const b = hex('21e41c71 0020 0001 00000000000000ff 0000000000001000 0000000100000000');
  const r = decodeExtendedRequest(b);
  assert.deepEqual(r, { magicOk: true, flags: 0x20, type: 1, cookie: 255n, offset: 4096, offsetHigh: 0, offsetLow: 4096, length: 2 ** 32 });
  assert.deepEqual(encodeRequest(0x20, 1, 255n, 4096, 2 ** 32, true), b);
});

test('offsets above 2^53 - 1 decode to values that are not safe integers', () => {
  const r = decodeCompactRequest(hex('25609513 0000 0000 0000000000000000 ffffffffffffffff 00000000'));
  assert.equal(Number.isSafeInteger(r.offset), false);
});

test('an extended reply header echoes any u64 request offset exactly, 2^64 - 1 included', () => {
  for (const offset of [2n ** 53n + 1n, 2n ** 63n, 2n ** 64n - 1n]) {
    const h = decodeExtendedRequest(encodeRequest(0, NBD_CMD.NBD_CMD_READ, 9n, offset, 0, true));
    const e = Buffer.alloc(NBD_SIZE.EXTENDED_REPLY_HEADER);
    writeExtendedHeader(e, 0, 1, NBD_REPLY_TYPE.NBD_REPLY_TYPE_ERROR, h, 0);
    assert.equal(decodeReplyHeader(e).exactOffset, offset);
  }
});

test('simple, structured and extended reply headers', () => {
  const s = Buffer.alloc(16);
  writeSimpleReply(s, 0, 22, 7n);
  assert.deepEqual(s, hex('67446698 00000016 0000000000000007'));
  const c = Buffer.alloc(20);
  writeStructuredHeader(c, 0, 1, NBD_REPLY_TYPE.NBD_REPLY_TYPE_OFFSET_DATA, 7n, 520);
  assert.deepEqual(c, hex('668e33ef 0001 0001 0000000000000007 00000208'));
  const e = Buffer.alloc(32);
  writeExtendedHeader(e, 0, 1, NBD_REPLY_TYPE.NBD_REPLY_TYPE_NONE, { cookie: 7n, offsetHigh: 0, offsetLow: 512 }, 0);
  assert.deepEqual(e, hex('6e8a278c 0001 0000 0000000000000007 0000000000000200 0000000000000000'));
  assert.equal(decodeReplyHeader(s).kind, 'simple');
  assert.equal(decodeReplyHeader(c).length, 520);
  assert.equal(decodeReplyHeader(e).offset, 512);
  assert.equal(decodeReplyHeader(hex('00000000 0000 0000 0000000000000000 00000000')).kind, 'bad');
});

test('error payloads carry a message, optionally an offset, cut at a character boundary', () => {
  assert.deepEqual(encodeErrorPayload(5, 'io'), hex('00000005 0002 696f'));
  assert.deepEqual(encodeErrorPayload(5, 'io', 4096), hex('00000005 0002 696f 0000000000001000'));
  const long = encodeErrorPayload(5, 'é'.repeat(200));
  const len = long.readUInt16BE(4);
  assert.ok(len <= MAX_ERROR_MESSAGE);
  assert.doesNotThrow(() => new TextDecoder('utf-8', { fatal: true }).decode(long.subarray(6, 6 + len)));
});

test('hole and block status payloads', () => {
  assert.deepEqual(encodeHolePayload(4096, 512), hex('0000000000001000 00000200'));
  assert.deepEqual(encodeBlockStatus(1, [{ length: 512, flags: 3 }]), hex('00000001 00000200 00000003'));
  assert.deepEqual(
    encodeBlockStatusExt(1, [{ length: 2 ** 33, flags: 0 }]),
    hex('00000001 00000001 0000000200000000 0000000000000000'),
  );
});

test('u64 helpers round-trip every safe integer', () => {
  fc.assert(
    fc.property(fc.maxSafeNat(), (n) => {
      const b = Buffer.alloc(8);
      writeU64(b, n, 0);
      assert.equal(readU64(b, 0), n);
      assert.equal(b.readBigUInt64BE(0), BigInt(n));
    }),
  );
});

test('request encode/decode round-trip', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 0, max: 0xffff }),
      fc.integer({ min: 0, max: 0xffff }),
      fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
      fc.maxSafeNat(),
      fc.integer({ min: 0, max: 0xffffffff }),
      fc.boolean(),
      (flags, type, cookie, offset, length, ext) => {
        const b = encodeRequest(flags, type, cookie, offset, length, ext);
        const r = ext ? decodeExtendedRequest(b) : decodeCompactRequest(b);
        const halves = { offsetHigh: Math.floor(offset / 2 ** 32), offsetLow: offset % 2 ** 32 };
        assert.deepEqual(r, { magicOk: true, flags, type, cookie, offset, ...halves, length });
      },
    ),
  );
});
