/**
 * The transmission rules as tables, without a socket: which requests validateRequest
 * lets through for what the handshake agreed, and which NBD error value nbdErrno sends.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { BlockError, NBD_ERROR } from '../../src/errors/index.js';
import type { BlockDevice } from '../../src/device/index.js';
import { MODE, NBD_CMD, NBD_CMD_FLAG, NBD_FLAG, type Mode } from '../../src/nbd/constants.js';
import type { RequestHeader } from '../../src/nbd/codec.js';
import { nbdErrno, validateRequest, type ValidationContext } from '../../src/nbd/transmission.js';

const C = NBD_CMD;
const FL = NBD_CMD_FLAG;
const E = NBD_ERROR;
const SIZE = 1 << 20;
const BLOCK = 512;
const MAX_PAYLOAD = 1 << 16;

/** Only what the validator reads of a device: its size, minimum block and write capability. */
function device(write = true): BlockDevice {
  return { size: SIZE, blockSize: { minimum: BLOCK, preferred: 4096, maximum: MAX_PAYLOAD }, capabilities: { write } } as unknown as BlockDevice;
}

const ALL_TFLAGS =
  NBD_FLAG.NBD_FLAG_HAS_FLAGS | NBD_FLAG.NBD_FLAG_SEND_FUA | NBD_FLAG.NBD_FLAG_SEND_DF | NBD_FLAG.NBD_FLAG_SEND_FAST_ZERO;

function ctx(over: Partial<ValidationContext> = {}): ValidationContext {
  return {
    mode: MODE.STRUCTURED as Mode,
    tflags: ALL_TFLAGS,
    readOnly: false,
    metaSelected: true,
    device: device(),
    maxPayload: MAX_PAYLOAD,
    shuttingDown: false,
    hasPayload: false,
    ...over,
  };
}

function req(type: number, flags = 0, offset = 0, length = BLOCK): RequestHeader {
  // The validator reads only the numbers; the raw halves matter to reply headers alone.
  return { magicOk: true, type, flags, cookie: 1n, offset, offsetHigh: 0, offsetLow: 0, length };
}

function code(h: RequestHeader, c: ValidationContext): string | null {
  return validateRequest(h, c)?.code ?? null;
}

describe('validateRequest: command flags', () => {
  test('each command accepts its own flags and FUA when SEND_FUA was advertised', () => {
    assert.equal(code(req(C.NBD_CMD_READ, FL.NBD_CMD_FLAG_DF | FL.NBD_CMD_FLAG_FUA), ctx()), null);
    assert.equal(code(req(C.NBD_CMD_WRITE, FL.NBD_CMD_FLAG_FUA), ctx({ hasPayload: true })), null);
    assert.equal(code(req(C.NBD_CMD_TRIM, FL.NBD_CMD_FLAG_FUA), ctx()), null);
    assert.equal(code(req(C.NBD_CMD_CACHE), ctx()), null);
    assert.equal(code(req(C.NBD_CMD_WRITE_ZEROES, FL.NBD_CMD_FLAG_NO_HOLE | FL.NBD_CMD_FLAG_FAST_ZERO), ctx()), null);
    assert.equal(code(req(C.NBD_CMD_BLOCK_STATUS, FL.NBD_CMD_FLAG_REQ_ONE), ctx()), null);
  });

  test("another command's flag is EINVAL (REQ_ONE on READ, DF on WRITE_ZEROES, NO_HOLE on TRIM)", () => {
    assert.equal(code(req(C.NBD_CMD_READ, FL.NBD_CMD_FLAG_REQ_ONE), ctx()), 'EINVAL');
    assert.equal(code(req(C.NBD_CMD_WRITE_ZEROES, FL.NBD_CMD_FLAG_DF), ctx()), 'EINVAL');
    assert.equal(code(req(C.NBD_CMD_TRIM, FL.NBD_CMD_FLAG_NO_HOLE), ctx()), 'EINVAL');
    assert.match(validateRequest(req(C.NBD_CMD_READ, 0x8000), ctx())!.message, /flags 0x8000/);
  });

  test('FUA, DF and FAST_ZERO are EINVAL unless their transmission flag was sent', () => {
    const none = ctx({ tflags: NBD_FLAG.NBD_FLAG_HAS_FLAGS });
    assert.equal(code(req(C.NBD_CMD_TRIM, FL.NBD_CMD_FLAG_FUA), none), 'EINVAL');
    assert.equal(code(req(C.NBD_CMD_READ, FL.NBD_CMD_FLAG_DF), none), 'EINVAL');
    assert.equal(code(req(C.NBD_CMD_WRITE_ZEROES, FL.NBD_CMD_FLAG_FAST_ZERO), none), 'EINVAL');
  });

  test('PAYLOAD_LEN is a WRITE flag of extended headers only, and an extended WRITE needs it', () => {
    const ext = ctx({ mode: MODE.EXTENDED, hasPayload: true });
    assert.equal(code(req(C.NBD_CMD_WRITE, FL.NBD_CMD_FLAG_PAYLOAD_LEN), ext), null);
    assert.equal(code(req(C.NBD_CMD_WRITE, FL.NBD_CMD_FLAG_PAYLOAD_LEN), ctx({ hasPayload: true })), 'EINVAL');
    assert.equal(code(req(C.NBD_CMD_TRIM, FL.NBD_CMD_FLAG_PAYLOAD_LEN), ext), 'EINVAL');
    assert.match(validateRequest(req(C.NBD_CMD_WRITE), ctx({ mode: MODE.EXTENDED }))!.message, /without NBD_CMD_FLAG_PAYLOAD_LEN/);
  });

  test('an unknown command is EINVAL', () => {
    assert.match(validateRequest(req(42), ctx())!.message, /unknown command 42/);
    assert.equal(code(req(C.NBD_CMD_RESIZE), ctx()), 'EINVAL');
  });

  test('while shutting down every request is ESHUTDOWN, before any other check', () => {
    assert.equal(code(req(42, 0x8000), ctx({ shuttingDown: true })), 'ESHUTDOWN');
  });
});

describe('validateRequest: per-command rules', () => {
  test('FLUSH must have offset and length 0', () => {
    assert.equal(code(req(C.NBD_CMD_FLUSH, 0, 0, 0), ctx()), null);
    assert.equal(code(req(C.NBD_CMD_FLUSH, 0, BLOCK, 0), ctx()), 'EINVAL');
    assert.equal(code(req(C.NBD_CMD_FLUSH, 0, 0, BLOCK), ctx()), 'EINVAL');
  });

  test('WRITE, TRIM and WRITE_ZEROES on a read-only export are EPERM; READ and CACHE are not', () => {
    const ro = ctx({ readOnly: true });
    assert.equal(code(req(C.NBD_CMD_WRITE), { ...ro, hasPayload: true }), 'EPERM');
    assert.equal(code(req(C.NBD_CMD_TRIM), ro), 'EPERM');
    assert.equal(code(req(C.NBD_CMD_WRITE_ZEROES), ro), 'EPERM');
    assert.equal(code(req(C.NBD_CMD_READ), ro), null);
    assert.equal(code(req(C.NBD_CMD_CACHE), ro), null);
  });

  test('BLOCK_STATUS without a selected metadata context, or of length 0, is EINVAL', () => {
    assert.match(validateRequest(req(C.NBD_CMD_BLOCK_STATUS), ctx({ metaSelected: false }))!.message, /SET_META_CONTEXT/);
    assert.match(validateRequest(req(C.NBD_CMD_BLOCK_STATUS, 0, 0, 0), ctx())!.message, /length 0/);
  });

  test('a READ above the advertised maximum payload is EINVAL, not EOVERFLOW', () => {
    assert.equal(code(req(C.NBD_CMD_READ, 0, 0, MAX_PAYLOAD), ctx()), null);
    assert.equal(code(req(C.NBD_CMD_READ, 0, 0, MAX_PAYLOAD + BLOCK), ctx()), 'EINVAL');
  });
});

describe('validateRequest: ranges', () => {
  test('past the end: ENOSPC for WRITE and WRITE_ZEROES, EINVAL for READ, TRIM and CACHE', () => {
    const at = SIZE - BLOCK;
    const len = 2 * BLOCK;
    assert.equal(code(req(C.NBD_CMD_WRITE, 0, at, len), ctx({ hasPayload: true })), 'ENOSPC');
    assert.equal(code(req(C.NBD_CMD_WRITE_ZEROES, 0, at, len), ctx()), 'ENOSPC');
    assert.equal(code(req(C.NBD_CMD_READ, 0, at, len), ctx()), 'EINVAL');
    assert.equal(code(req(C.NBD_CMD_TRIM, 0, at, len), ctx()), 'EINVAL');
    assert.equal(code(req(C.NBD_CMD_CACHE, 0, at, len), ctx()), 'EINVAL');
    assert.equal(code(req(C.NBD_CMD_READ, 0, at, BLOCK), ctx()), null);
  });

  test('an offset beyond 2^53 - 1 is EINVAL', () => {
    assert.equal(code(req(C.NBD_CMD_READ, 0, 2 ** 64, BLOCK), ctx()), 'EINVAL');
  });

  test('offset and length must be multiples of the minimum block size; the message names the command', () => {
    const e = validateRequest(req(C.NBD_CMD_READ, 0, 1, BLOCK), ctx());
    assert.equal(e?.code, 'EINVAL');
    assert.match(e!.message, /^NBD_CMD_READ: .*multiples of 512/);
    assert.equal(code(req(C.NBD_CMD_TRIM, 0, 0, BLOCK + 1), ctx()), 'EINVAL');
  });

  test('a write on a device without write capability is EPERM even if the export is not marked read-only', () => {
    assert.equal(code(req(C.NBD_CMD_TRIM), ctx({ device: device(false) })), 'EPERM');
  });
});

describe('nbdErrno', () => {
  const unsupported = new BlockError('EOPNOTSUPP', 'not supported');

  test('a TRIM or CACHE failing with EOPNOTSUPP goes out as NBD_EINVAL (22): NBD_ENOTSUP is reserved for FAST_ZERO', () => {
    assert.equal(nbdErrno(unsupported, C.NBD_CMD_TRIM, 0), E.NBD_EINVAL);
    assert.equal(nbdErrno(unsupported, C.NBD_CMD_TRIM, 0), 22);
    assert.equal(nbdErrno(unsupported, C.NBD_CMD_CACHE, 0), E.NBD_EINVAL);
    assert.equal(nbdErrno(new BlockError('ENOSYS', 'x'), C.NBD_CMD_READ, 0), E.NBD_EINVAL);
  });

  test('a WRITE_ZEROES with FAST_ZERO failing with ENOTSUP goes out as NBD_ENOTSUP (95); without FAST_ZERO as NBD_EINVAL', () => {
    assert.equal(nbdErrno(unsupported, C.NBD_CMD_WRITE_ZEROES, FL.NBD_CMD_FLAG_FAST_ZERO), E.NBD_ENOTSUP);
    assert.equal(nbdErrno(unsupported, C.NBD_CMD_WRITE_ZEROES, FL.NBD_CMD_FLAG_FAST_ZERO | FL.NBD_CMD_FLAG_FUA), 95);
    assert.equal(nbdErrno(unsupported, C.NBD_CMD_WRITE_ZEROES, 0), E.NBD_EINVAL);
  });

  test('other codes keep the errno table mapping whatever the command', () => {
    assert.equal(nbdErrno(new BlockError('EIO', 'x'), C.NBD_CMD_WRITE_ZEROES, FL.NBD_CMD_FLAG_FAST_ZERO), E.NBD_EIO);
    assert.equal(nbdErrno(new BlockError('EROFS', 'x'), C.NBD_CMD_WRITE, 0), E.NBD_EPERM);
    assert.equal(nbdErrno(new BlockError('EDQUOT', 'x'), C.NBD_CMD_WRITE, 0), E.NBD_ENOSPC);
    assert.equal(nbdErrno(new BlockError('ESHUTDOWN', 'x'), C.NBD_CMD_TRIM, 0), E.NBD_ESHUTDOWN);
    assert.equal(nbdErrno(new BlockError('EOVERFLOW', 'x'), C.NBD_CMD_READ, FL.NBD_CMD_FLAG_DF), E.NBD_EOVERFLOW);
  });
});
