import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ERRNO, type ErrnoCode } from '../../src/errors/index.js';
import {
  decodeCinit,
  decodeHdr,
  decodeSinit,
  decodeVersion,
  encodeCinit,
  encodeHdr,
  encodeSinit,
  encodeSinitFailure,
  encodeVersion,
  ERRNO_DIALECT,
  GGATE,
  GGATE_CMD,
  GGATE_FLAG,
  GGATE_MAGIC,
  GGATE_SIZE,
  hasFlag,
  readGgateU64,
  replyPayloadLength,
  replyTo,
  requestPayloadLength,
  wireErrorCode,
  writeHdr,
  writeGgateU64,
  writeVersion,
  type Decoded,
  type ErrnoDialect,
  type GgateCinitInit,
  type GgateHdrInit,
  type GgateSinitInit,
  type GgateVersionInit,
  type U64,
} from '../../src/ggate/protocol.js';

/** Bytes from a hex string with optional spaces (expected vectors are written by hand). */
function hex(s: string): Buffer {
  return Buffer.from(s.replace(/\s+/g, ''), 'hex');
}

function value<T>(d: Decoded<T>): T {
  assert.ok(d.ok, 'expected a complete struct');
  return d.value;
}

// "GEOM_GATE" + 7 spaces, as ASCII.
const MAGIC_HEX = '47 45 4f 4d 5f 47 41 54 45 20 20 20 20 20 20 20';

test('W1 constants match ggate.h', () => {
  assert.equal(GGATE.G_GATE_PORT, 3080);
  assert.equal(GGATE.G_GATE_RCVBUF, 131072);
  assert.equal(GGATE.G_GATE_SNDBUF, 131072);
  assert.equal(GGATE.G_GATE_QUEUE_SIZE, 1024);
  assert.equal(GGATE.G_GATE_TIMEOUT, 0);
  assert.equal(GGATE.GGATE_VERSION, 0);
  assert.equal(GGATE_MAGIC.length, 16);
  assert.deepEqual(Buffer.from(GGATE_MAGIC, 'latin1'), hex(MAGIC_HEX));
  assert.deepEqual(GGATE_FLAG, { GGATE_FLAG_RDONLY: 1, GGATE_FLAG_WRONLY: 2, GGATE_FLAG_SEND: 4, GGATE_FLAG_RECV: 8 });
  assert.equal(GGATE_SIZE.GC_PATH_SIZE, GGATE_SIZE.PATH_MAX + 1);
  assert.equal(GGATE_SIZE.GC_PATH_SIZE, 1025);
  assert.equal(GGATE_SIZE.VERSION_SIZE, 20);
  assert.equal(GGATE_SIZE.CINIT_SIZE, 1039);
  assert.equal(GGATE_SIZE.SINIT_SIZE, 15);
  assert.equal(GGATE_SIZE.HDR_SIZE, 23);
});

test('W2 commands are READ 0, WRITE 1, FLUSH 3 and there is no DELETE', () => {
  assert.deepEqual(GGATE_CMD, { GGATE_CMD_READ: 0, GGATE_CMD_WRITE: 1, GGATE_CMD_FLUSH: 3 });
});

test('W1 g_gate_version: byte vector', () => {
  const bytes = encodeVersion({ version: 0, error: null });
  assert.deepEqual(bytes, hex(`${MAGIC_HEX} 0000 0000`));
  const v = value(decodeVersion(bytes));
  assert.deepEqual(v, { magicOk: true, version: 0, error: null, errno: 0 });

  // A foreign version number and a wrong magic byte are decoded, not thrown.
  const odd = hex(`${MAGIC_HEX} 0102 0000`);
  odd[3] = 0x6e; // 'GEOn_GATE'
  const o = value(decodeVersion(odd));
  assert.equal(o.magicOk, false);
  assert.equal(o.version, 0x0102);
});

test('W1 g_gate_cinit: byte vector with the path NUL-terminated inside 1025 bytes', () => {
  const init: GgateCinitInit = {
    path: '/dev/ada0',
    flags: GGATE_FLAG.GGATE_FLAG_RDONLY | GGATE_FLAG.GGATE_FLAG_SEND,
    nconn: 2,
    token: 0xdeadbeef,
  };
  const bytes = encodeCinit(init);
  const expected = Buffer.concat([
    hex('2f 64 65 76 2f 61 64 61 30'), // "/dev/ada0"
    Buffer.alloc(1025 - 9), // NUL terminator and zero padding up to gc_path[1025]
    hex('00 00 00 00 00 00 00 05'), // gc_flags
    hex('00 02'), // gc_nconn
    hex('de ad be ef'), // gc_token
  ]);
  assert.equal(expected.length, 1039);
  assert.deepEqual(bytes, expected);
  assert.deepEqual(value(decodeCinit(bytes)), { ...init, pathTerminated: true, pathUtf8: true });
});

test('W1 g_gate_cinit: bytes after the NUL are ignored, a missing NUL and bad UTF-8 are reported', () => {
  const bytes = encodeCinit({ path: '/d', flags: 8, nconn: 2, token: 1 });
  bytes.fill(0x41, 3, 1025); // garbage after the terminator, as ggatec's stack leaves it
  const c = value(decodeCinit(bytes));
  assert.equal(c.path, '/d');
  assert.equal(c.pathTerminated, true);

  bytes.fill(0x41, 0, 1025); // no NUL at all
  const n = value(decodeCinit(bytes));
  assert.equal(n.pathTerminated, false);
  assert.equal(n.path.length, 1025, 'the path is bounded by the field');

  const bad = encodeCinit({ path: 'x', flags: 8, nconn: 2, token: 1 });
  bad[0] = 0xff; // not UTF-8
  assert.equal(value(decodeCinit(bad)).pathUtf8, false);
});

test('W1 g_gate_cinit: the encoder refuses paths ggatec would refuse', () => {
  assert.throws(() => encodeCinit({ path: 'a\0b', flags: 8, nconn: 2, token: 1 }), RangeError);
  assert.throws(() => encodeCinit({ path: 'x'.repeat(1025), flags: 8, nconn: 2, token: 1 }), RangeError);
  const longest = encodeCinit({ path: 'x'.repeat(1024), flags: 8, nconn: 2, token: 1 });
  assert.equal(longest[1024], 0, 'a 1024-byte path still has its NUL');
  assert.equal(value(decodeCinit(longest)).path.length, 1024);
});

test('W1 g_gate_sinit: byte vector', () => {
  const init: GgateSinitInit = { mediasize: 0x1_0000_0200, sectorsize: 512, error: null };
  const bytes = encodeSinit(init);
  assert.deepEqual(bytes, hex('00 00 00 00 01 00 00 02 00 00 00 02 00 00 00'));
  assert.deepEqual(value(decodeSinit(bytes)), { flags: 0, mediasize: 0x1_0000_0200, sectorsize: 512, error: null, errno: 0 });

  // A refusal carries only gs_error (ggated's sendfail).
  assert.deepEqual(encodeSinitFailure('EPERM'), hex('00 0000000000000000 00000000 0001'));
});

test('W1 g_gate_hdr: byte vectors, u64 offset as number or bigint', () => {
  const write: GgateHdrInit = { cmd: GGATE_CMD.GGATE_CMD_WRITE, offset: 0x1_0000_0200, length: 0x1_0000, seq: 7, error: null };
  assert.deepEqual(encodeHdr(write), hex('01 0000000100000200 00010000 0000000000000007 0000'));
  assert.deepEqual(value(decodeHdr(encodeHdr(write))), { ...write, errno: 0 });

  const huge: GgateHdrInit = { cmd: GGATE_CMD.GGATE_CMD_READ, offset: 0xffff_ffff_ffff_fe00n, length: 512, seq: 0xfedc_ba98_7654_3210n, error: 'EIO' };
  const bytes = encodeHdr(huge);
  assert.deepEqual(bytes, hex('00 fffffffffffffe00 00000200 fedcba9876543210 0005'));
  const h = value(decodeHdr(bytes));
  assert.equal(h.offset, 0xffff_ffff_ffff_fe00n, 'an offset above 2^53 - 1 stays exact, as a bigint');
  assert.equal(h.seq, 0xfedc_ba98_7654_3210n);
  assert.equal(h.error, 'EIO');
});

test('W1 u64 boundary: 2^53 - 1 is a number, 2^53 is a bigint', () => {
  const b = Buffer.alloc(8);
  writeGgateU64(b, 0, Number.MAX_SAFE_INTEGER);
  assert.deepEqual(b, hex('001fffffffffffff'));
  assert.equal(readGgateU64(b, 0), Number.MAX_SAFE_INTEGER);
  writeGgateU64(b, 0, 2n ** 53n);
  assert.deepEqual(b, hex('0020000000000000'));
  assert.equal(readGgateU64(b, 0), 2n ** 53n);
  assert.throws(() => writeGgateU64(b, 0, -1), RangeError);
  assert.throws(() => writeGgateU64(b, 0, 2 ** 53), RangeError);
  assert.throws(() => writeGgateU64(b, 0, 2n ** 64n), RangeError);
});

test('W1 encoders write into a caller-owned buffer at an offset', () => {
  const buf = Buffer.alloc(3 + 20 + 23, 0xaa);
  let off = writeVersion(buf, 3, { version: 0, error: null });
  assert.equal(off, 23);
  off = writeHdr(buf, off, { cmd: 3, offset: 0, length: 0, seq: 1, error: null });
  assert.equal(off, buf.length);
  assert.deepEqual(buf.subarray(0, 3), hex('aaaaaa'), 'bytes before the offset are untouched');
  assert.deepEqual(value(decodeHdr(buf, 23)), { cmd: 3, offset: 0, length: 0, seq: 1, error: null, errno: 0 });
  assert.throws(() => writeHdr(buf, 24, { cmd: 0, offset: 0, length: 0, seq: 0, error: null }), RangeError);
  assert.deepEqual(buf.subarray(0, 3), hex('aaaaaa'));
});

test('W1 truncated buffers report how many more bytes are needed', () => {
  const cases: [number, (b: Buffer, off: number) => Decoded<unknown>, Buffer][] = [
    [20, decodeVersion, encodeVersion({ version: 0, error: null })],
    [1039, decodeCinit, encodeCinit({ path: '/x', flags: 4, nconn: 2, token: 9 })],
    [15, decodeSinit, encodeSinit({ mediasize: 4096, sectorsize: 512, error: null })],
    [23, decodeHdr, encodeHdr({ cmd: 0, offset: 0, length: 512, seq: 1, error: null })],
  ];
  for (const [size, decode, whole] of cases) {
    // A stream parser feeding one byte at a time is told exactly what is missing.
    for (let have = 0; have < size; have++) {
      assert.deepEqual(decode(whole.subarray(0, have), 0), { ok: false, need: size - have });
    }
    const done = decode(whole, 0);
    assert.ok(done.ok);
    assert.equal(done.size, size);
    // The same at an offset inside a larger buffer.
    const padded = Buffer.concat([Buffer.alloc(5), whole.subarray(0, size - 2)]);
    assert.deepEqual(decode(padded, 5), { ok: false, need: 2 });
  }
});

test('W3 payload lengths: WRITE requests and successful READ replies only', () => {
  const h = { length: 4096, errno: 0 };
  assert.equal(requestPayloadLength({ ...h, cmd: GGATE_CMD.GGATE_CMD_WRITE }), 4096);
  assert.equal(requestPayloadLength({ ...h, cmd: GGATE_CMD.GGATE_CMD_READ }), 0);
  assert.equal(requestPayloadLength({ ...h, cmd: GGATE_CMD.GGATE_CMD_FLUSH }), 0);
  assert.equal(requestPayloadLength({ ...h, cmd: 2 }), 0);
  assert.equal(replyPayloadLength({ ...h, cmd: GGATE_CMD.GGATE_CMD_READ }), 4096);
  assert.equal(replyPayloadLength({ ...h, cmd: GGATE_CMD.GGATE_CMD_READ, errno: 5 }), 0);
  assert.equal(replyPayloadLength({ ...h, cmd: GGATE_CMD.GGATE_CMD_WRITE }), 0);
});

test('W3 a reply echoes cmd, offset, length and seq exactly', () => {
  const req = value(decodeHdr(hex('07 fffffffffffffe00 00000200 0000000000000042 0000')));
  const reply = encodeHdr(replyTo(req, 'EOPNOTSUPP'));
  assert.deepEqual(reply, hex('07 fffffffffffffe00 00000200 0000000000000042 002d'));
});

test('W7 errno on the wire: FreeBSD values by default, Linux values on request', () => {
  const at = (code: ErrnoCode, dialect: ErrnoDialect = ERRNO_DIALECT.freebsd) =>
    encodeHdr({ cmd: 0, offset: 0, length: 0, seq: 1, error: code }, dialect).subarray(21).toString('hex');
  assert.equal(at('EAGAIN'), '0023'); // 35
  assert.equal(at('EOPNOTSUPP'), '002d'); // 45
  assert.equal(at('ECANCELED'), '0055'); // 85
  assert.equal(at('EAGAIN', ERRNO_DIALECT.linux), '000b'); // 11
  assert.equal(at('EOPNOTSUPP', ERRNO_DIALECT.linux), '005f'); // 95
  assert.equal(at('ECANCELED', ERRNO_DIALECT.linux), '007d'); // 125

  const fromWire = (e: string, dialect: ErrnoDialect = ERRNO_DIALECT.freebsd) =>
    value(decodeHdr(hex(`00 0000000000000000 00000000 0000000000000001 ${e}`), 0, dialect));
  assert.equal(fromWire('0023').error, 'EAGAIN');
  assert.equal(fromWire('002d').error, 'EOPNOTSUPP');
  assert.equal(fromWire('0055').error, 'ECANCELED');
  assert.equal(fromWire('005f', ERRNO_DIALECT.linux).error, 'EOPNOTSUPP');
  // 11 is EDEADLK on FreeBSD, not EAGAIN: a FreeBSD peer's 11 is not read as EAGAIN.
  assert.notEqual(fromWire('000b').error, 'EAGAIN');
  // A number the table does not know is an I/O error; the raw value is kept.
  const unknown = fromWire('0fff');
  assert.equal(unknown.error, 'EIO');
  assert.equal(unknown.errno, 0x0fff);
  assert.equal(wireErrorCode(0), null);

  // The same mapping in the sinit and version error fields.
  assert.deepEqual(encodeSinitFailure('ECANCELED').subarray(13), hex('0055'));
  assert.equal(value(decodeSinit(encodeSinitFailure('EAGAIN'))).error, 'EAGAIN');
  assert.deepEqual(encodeVersion({ version: 0, error: 'EOPNOTSUPP' }).subarray(18), hex('002d'));
});

test('W1 flag bits are tested the same on numbers and bigints', () => {
  assert.equal(hasFlag(5, GGATE_FLAG.GGATE_FLAG_SEND), true);
  assert.equal(hasFlag(5, GGATE_FLAG.GGATE_FLAG_RECV), false);
  assert.equal(hasFlag((1n << 63n) | 8n, GGATE_FLAG.GGATE_FLAG_RECV), true);
  assert.equal(hasFlag(2 ** 52 + 1, GGATE_FLAG.GGATE_FLAG_RDONLY), true);
  assert.equal(hasFlag(2 ** 52, GGATE_FLAG.GGATE_FLAG_RDONLY), false);
});

// ---------------------------------------------------------------------------------
// Round trips (fast-check)

const u64: fc.Arbitrary<U64> = fc.oneof(fc.maxSafeNat(), fc.bigInt({ min: 2n ** 53n, max: 2n ** 64n - 1n }));
const errorCode: fc.Arbitrary<ErrnoCode | null> = fc.oneof(
  fc.constant(null),
  fc.constantFrom(...(Object.keys(ERRNO) as ErrnoCode[])),
);
const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffff_ffff });
const dialect = fc.constantFrom(ERRNO_DIALECT.freebsd, ERRNO_DIALECT.linux);

function errnoOf(code: ErrnoCode | null, d: ErrnoDialect): number {
  return code === null ? 0 : d.toWire(code);
}

test('W1 round trip: g_gate_version', () => {
  fc.assert(
    fc.property(fc.record<GgateVersionInit>({ version: u16, error: errorCode }), dialect, (v, d) => {
      const decoded = value(decodeVersion(encodeVersion(v, d), 0, d));
      assert.deepEqual(decoded, { ...v, magicOk: true, errno: errnoOf(v.error, d) });
    }),
  );
});

test('W1 round trip: g_gate_cinit', () => {
  const path = fc
    .string({ unit: 'binary', minLength: 1, maxLength: 256, size: 'max' })
    .filter((s) => !s.includes('\0'));
  fc.assert(
    fc.property(fc.record<GgateCinitInit>({ path, flags: u64, nconn: u16, token: u32 }), (c) => {
      const decoded = value(decodeCinit(encodeCinit(c)));
      assert.deepEqual(decoded, { ...c, pathTerminated: true, pathUtf8: true });
    }),
  );
});

test('W1 round trip: g_gate_sinit', () => {
  const sinit = fc.record({
    flags: fc.integer({ min: 0, max: 0xff }),
    mediasize: u64,
    sectorsize: u32,
    error: errorCode,
  });
  fc.assert(
    fc.property(sinit, dialect, (s, d) => {
      assert.deepEqual(value(decodeSinit(encodeSinit(s, d), 0, d)), { ...s, errno: errnoOf(s.error, d) });
    }),
  );
});

test('W1 round trip: g_gate_hdr, both ways (struct and bytes)', () => {
  const hdr = fc.record<GgateHdrInit>({ cmd: fc.integer({ min: 0, max: 0xff }), offset: u64, length: u32, seq: u64, error: errorCode });
  fc.assert(
    fc.property(hdr, dialect, (h, d) => {
      assert.deepEqual(value(decodeHdr(encodeHdr(h, d), 0, d)), { ...h, errno: errnoOf(h.error, d) });
    }),
  );
  // Any 23 bytes whose error field is 0 or a known errno re-encode to themselves.
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 23, maxLength: 23 }), errorCode, (raw, e) => {
      const bytes = Buffer.from(raw);
      bytes.writeUInt16BE(errnoOf(e, ERRNO_DIALECT.freebsd), 21);
      assert.deepEqual(encodeHdr(value(decodeHdr(bytes))), bytes);
    }),
  );
});

test('W1 decoders never throw on arbitrary bytes at any offset', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 1100, size: 'max' }), fc.nat({ max: 1100 }), (raw, off) => {
      const b = Buffer.from(raw);
      const decoders: [number, (b: Buffer, off: number) => Decoded<unknown>][] = [
        [20, decodeVersion],
        [1039, decodeCinit],
        [15, decodeSinit],
        [23, decodeHdr],
      ];
      for (const [size, decode] of decoders) {
        const r = decode(b, off);
        if (r.ok) assert.ok(off + r.size <= b.length);
        else assert.equal(r.need, off + size - b.length);
      }
    }),
  );
});
