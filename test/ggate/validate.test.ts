import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { BlockError } from '../../src/errors/index.js';
import { checkAlignment, validateRequest, type BlockDevice } from '../../src/device/index.js';
import { decodeCinit, encodeCinit, GGATE_CMD, GGATE_FLAG, type GgateCinit } from '../../src/ggate/protocol.js';
import {
  cinitDirection,
  MAX_REQUEST_LENGTH,
  requestedAccess,
  validateCinit,
  validateReply,
  validateGgateRequest,
  validateSinit,
  validateVersion,
  type GgateGeometry,
} from '../../src/ggate/validate.js';

const { GGATE_CMD_READ: READ, GGATE_CMD_WRITE: WRITE, GGATE_CMD_FLUSH: FLUSH } = GGATE_CMD;
const { GGATE_FLAG_RDONLY: RDONLY, GGATE_FLAG_WRONLY: WRONLY, GGATE_FLAG_SEND: SEND, GGATE_FLAG_RECV: RECV } = GGATE_FLAG;

const MiB = 1024 * 1024;
const disk: GgateGeometry = { mediasize: 64 * MiB, sectorsize: 512, access: 'rw' };

test('W4 the request length limit is 1 MiB (kern.maxphys)', () => {
  assert.equal(MAX_REQUEST_LENGTH, MiB);
});

test('W4 a well-formed READ, WRITE and FLUSH pass', () => {
  assert.equal(validateGgateRequest({ cmd: READ, offset: 0, length: 4096 }, disk), null);
  assert.equal(validateGgateRequest({ cmd: WRITE, offset: 64 * MiB - 512, length: 512 }, disk), null);
  assert.equal(validateGgateRequest({ cmd: READ, offset: 64 * MiB, length: 0 }, disk), null, 'zero length at the end');
  assert.equal(validateGgateRequest({ cmd: FLUSH, offset: 64 * MiB, length: 0 }, disk), null, 'GEOM sends offset = mediasize');
  assert.equal(validateGgateRequest({ cmd: FLUSH, offset: 0, length: 0 }, disk), null);
});

test('W4 an unknown command is EOPNOTSUPP', () => {
  for (const cmd of [2, 4, 255]) assert.equal(validateGgateRequest({ cmd, offset: 0, length: 512 }, disk), 'EOPNOTSUPP');
});

test('W4 FLUSH must have length 0, its offset is not checked', () => {
  assert.equal(validateGgateRequest({ cmd: FLUSH, offset: 0, length: 512 }, disk), 'EINVAL');
  assert.equal(validateGgateRequest({ cmd: FLUSH, offset: 2n ** 63n, length: 0 }, disk), null);
  assert.equal(validateGgateRequest({ cmd: FLUSH, offset: 3, length: 0 }, disk), null);
});

test('W4 offset + length must not pass mediasize', () => {
  assert.equal(validateGgateRequest({ cmd: READ, offset: 64 * MiB - 512, length: 1024 }, disk), 'EINVAL');
  assert.equal(validateGgateRequest({ cmd: READ, offset: 64 * MiB + 512, length: 0 }, disk), 'EINVAL');
  assert.equal(validateGgateRequest({ cmd: WRITE, offset: 64 * MiB - 512, length: 1024 }, disk), 'ENOSPC');
});

test('W4 offset and length must be multiples of the sector size', () => {
  assert.equal(validateGgateRequest({ cmd: READ, offset: 1, length: 512 }, disk), 'EINVAL');
  assert.equal(validateGgateRequest({ cmd: READ, offset: 512, length: 511 }, disk), 'EINVAL');
  assert.equal(validateGgateRequest({ cmd: WRITE, offset: 4096, length: 100 }, { ...disk, sectorsize: 4096 }), 'EINVAL');
  assert.equal(validateGgateRequest({ cmd: WRITE, offset: 4096, length: 8192 }, { ...disk, sectorsize: 4096 }), null);
});

test('W4 length above the limit is EINVAL, and the limit can be configured', () => {
  assert.equal(validateGgateRequest({ cmd: READ, offset: 0, length: MiB }, disk), null);
  assert.equal(validateGgateRequest({ cmd: READ, offset: 0, length: MiB + 512 }, disk), 'EINVAL');
  assert.equal(validateGgateRequest({ cmd: WRITE, offset: 0, length: 0xffff_fe00 }, disk), 'EINVAL');
  assert.equal(validateGgateRequest({ cmd: READ, offset: 0, length: 2 * MiB }, { ...disk, maxLength: 4 * MiB }), null);
});

test('W4 offsets above 2^53 - 1 are rejected, not wrapped', () => {
  const big = { ...disk, mediasize: Number.MAX_SAFE_INTEGER };
  assert.equal(validateGgateRequest({ cmd: READ, offset: 2n ** 53n, length: 0 }, big), 'EINVAL');
  assert.equal(validateGgateRequest({ cmd: READ, offset: 0xffff_ffff_ffff_fe00n, length: 512 }, big), 'EINVAL');
});

test('W4 the connection access mode is enforced', () => {
  assert.equal(validateGgateRequest({ cmd: WRITE, offset: 0, length: 512 }, { ...disk, access: 'ro' }), 'EPERM');
  assert.equal(validateGgateRequest({ cmd: READ, offset: 0, length: 512 }, { ...disk, access: 'wo' }), 'EPERM');
  assert.equal(validateGgateRequest({ cmd: READ, offset: 0, length: 512 }, { ...disk, access: 'ro' }), null);
  assert.equal(validateGgateRequest({ cmd: WRITE, offset: 0, length: 512 }, { ...disk, access: 'wo' }), null);
  assert.equal(validateGgateRequest({ cmd: FLUSH, offset: 0, length: 0 }, { ...disk, access: 'ro' }), null);
});

test('W4 property: an accepted READ or WRITE lies inside the device, aligned and within the limit', () => {
  const geometry = fc.record({
    mediasize: fc.integer({ min: 0, max: 2 ** 40 }),
    sectorsize: fc.constantFrom(1, 512, 4096),
    access: fc.constant<'rw'>('rw'),
  });
  const u64 = fc.oneof(fc.maxSafeNat(), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }));
  fc.assert(
    fc.property(geometry, fc.constantFrom(READ, WRITE), u64, fc.integer({ min: 0, max: 0xffff_ffff }), (g, cmd, offset, length) => {
      if (validateGgateRequest({ cmd, offset, length }, g) !== null) return;
      assert.equal(typeof offset, 'number');
      const o = offset as number;
      assert.ok(o + length <= g.mediasize);
      assert.equal(o % g.sectorsize, 0);
      assert.equal(length % g.sectorsize, 0);
      assert.ok(length <= MAX_REQUEST_LENGTH);
    }),
  );
});

test('W4 property: ggated refuses a READ or WRITE range with the code the device layer gives an NBD client for it', () => {
  // The NBD edge runs validateRequest then checkAlignment; ggate checks alignment first, so
  // the property compares aligned requests (where the order cannot matter) and misaligned
  // ones separately (both EINVAL).
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 4096 }).map((n) => n * 512),
      fc.constantFrom(READ, WRITE),
      fc.integer({ min: 0, max: 5000 }),
      fc.integer({ min: 0, max: 2048 }),
      (mediasize, cmd, offsetSectors, lengthSectors) => {
        const g: GgateGeometry = { mediasize, sectorsize: 512, access: 'rw', maxLength: Number.MAX_SAFE_INTEGER };
        const dev = { size: mediasize, capabilities: { write: true }, blockSize: { minimum: 512 } } as BlockDevice;
        const op = cmd === WRITE ? 'write' : 'read';
        const offset = offsetSectors * 512;
        const length = lengthSectors * 512;
        let want: string | null = null;
        try {
          validateRequest(dev, op, offset, length);
          checkAlignment(dev, op, offset, length);
        } catch (e) {
          want = (e as BlockError).code;
        }
        assert.equal(validateGgateRequest({ cmd, offset, length }, g), want);
        assert.equal(validateGgateRequest({ cmd, offset: offset + 1, length }, g), 'EINVAL');
      },
    ),
  );
});

test('W4 version: bad magic and bad version are refused (the server closes)', () => {
  assert.equal(validateVersion({ magicOk: true, version: 0 }), null);
  assert.equal(validateVersion({ magicOk: false, version: 0 }), 'magic');
  assert.equal(validateVersion({ magicOk: true, version: 1 }), 'version');
});

function cinit(over: Partial<GgateCinit> = {}): GgateCinit {
  return { path: '/dev/ada0', pathTerminated: true, pathUtf8: true, flags: SEND, nconn: 2, token: 1, ...over };
}

test('W4 cinit: a well-formed one passes, for each direction and access', () => {
  for (const flags of [SEND, RECV, SEND | RDONLY, RECV | WRONLY]) assert.equal(validateCinit(cinit({ flags })), null);
  assert.equal(validateCinit(value(encodeCinit({ path: '/d', flags: RECV, nconn: 2, token: 5 }))), null);
});

function value(b: Buffer): GgateCinit {
  const d = decodeCinit(b);
  assert.ok(d.ok);
  return d.value;
}

test('W4 cinit: a gc_path without NUL, empty, or not UTF-8 is EINVAL', () => {
  const noNul = encodeCinit({ path: '/d', flags: SEND, nconn: 2, token: 5 });
  noNul.fill(0x61, 0, 1025);
  assert.equal(validateCinit(value(noNul)), 'EINVAL');
  assert.equal(validateCinit(cinit({ path: '' })), 'EINVAL');
  const notUtf8 = encodeCinit({ path: '/d', flags: SEND, nconn: 2, token: 5 });
  notUtf8[1] = 0xc0;
  assert.equal(validateCinit(value(notUtf8)), 'EINVAL');
  // An embedded NUL ends the name: the rest of the field is not part of it.
  const garbage = encodeCinit({ path: '/d', flags: SEND, nconn: 2, token: 5 });
  garbage.write('/etc/passwd', 3, 'latin1');
  const decoded = value(garbage);
  assert.equal(decoded.path, '/d');
  assert.equal(validateCinit(decoded), null);
});

test('W4 cinit: nconn must be 2', () => {
  for (const nconn of [0, 1, 3, 0xffff]) assert.equal(validateCinit(cinit({ nconn })), 'EINVAL');
});

test('W4 cinit: exactly one of SEND and RECV', () => {
  assert.equal(validateCinit(cinit({ flags: 0 })), 'EINVAL');
  assert.equal(validateCinit(cinit({ flags: RDONLY })), 'EINVAL');
  assert.equal(validateCinit(cinit({ flags: SEND | RECV })), 'EINVAL');
  assert.equal(cinitDirection(SEND), 'send');
  assert.equal(cinitDirection(RECV | RDONLY), 'recv');
  assert.equal(cinitDirection(SEND | RECV), null);
  assert.equal(cinitDirection(0n), null);
});

test('W4 cinit: RDONLY together with WRONLY is EINVAL; unknown bits are ignored', () => {
  assert.equal(validateCinit(cinit({ flags: SEND | RDONLY | WRONLY })), 'EINVAL');
  assert.equal(validateCinit(cinit({ flags: (1n << 40n) | BigInt(SEND) })), null);
  assert.equal(requestedAccess(RDONLY | SEND), 'ro');
  assert.equal(requestedAccess(WRONLY | RECV), 'wo');
  assert.equal(requestedAccess(SEND), 'rw');
  assert.equal(requestedAccess(RDONLY | WRONLY), 'ro', "ggated's precedence");
});

test('W4 sinit (client side): refusals carry their code, nonsense geometry is EINVAL', () => {
  assert.equal(validateSinit({ error: null, mediasize: 1 << 20, sectorsize: 512 }), null);
  assert.equal(validateSinit({ error: 'EPERM', mediasize: 0, sectorsize: 0 }), 'EPERM');
  assert.equal(validateSinit({ error: null, mediasize: 0, sectorsize: 512 }), 'EINVAL');
  assert.equal(validateSinit({ error: null, mediasize: 1000, sectorsize: 512 }), 'EINVAL');
  assert.equal(validateSinit({ error: null, mediasize: 1 << 20, sectorsize: 0 }), 'EINVAL');
  assert.equal(validateSinit({ error: null, mediasize: 2n ** 60n, sectorsize: 512 }), 'EINVAL');
});

test('W4 reply (client side): cmd, offset and length must echo the request', () => {
  const req = { cmd: READ, offset: 4096, length: 512 };
  assert.equal(validateReply(req, { ...req }), null);
  assert.equal(validateReply(req, { ...req, offset: 4096n }), null);
  assert.equal(validateReply(req, { ...req, cmd: WRITE }), 'EIO');
  assert.equal(validateReply(req, { ...req, offset: 0 }), 'EIO');
  assert.equal(validateReply(req, { ...req, length: 1024 }), 'EIO');
});
