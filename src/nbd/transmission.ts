/**
 * The transmission phase's rules, as pure functions of a request and what the handshake
 * agreed: which requests are valid (`validateRequest`, the one place a request is checked
 * before it reaches the device) and which NBD error value a failure goes out as
 * (`nbdErrno`). No socket and no session state, so both are unit-tested as tables.
 */
import { BlockError, NBD_ERROR, toBlockError, toNbdError, type NbdErrorValue } from '../errors/index.js';
import { checkAlignment, validateRequest as validateRange, type BlockDevice } from '../device/index.js';
import { MODE, NBD_CMD, NBD_CMD_FLAG, NBD_FLAG, commandName, type Mode } from './constants.js';
import type { RequestHeader } from './codec.js';

/** Command flags each command accepts (FUA is accepted on every command when advertised, per spec). */
export const ALLOWED_FLAGS: Readonly<Record<number, number>> = {
  [NBD_CMD.NBD_CMD_READ]: NBD_CMD_FLAG.NBD_CMD_FLAG_DF,
  [NBD_CMD.NBD_CMD_WRITE]: 0,
  [NBD_CMD.NBD_CMD_DISC]: 0,
  [NBD_CMD.NBD_CMD_FLUSH]: 0,
  [NBD_CMD.NBD_CMD_TRIM]: 0,
  [NBD_CMD.NBD_CMD_CACHE]: 0,
  [NBD_CMD.NBD_CMD_WRITE_ZEROES]: NBD_CMD_FLAG.NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG.NBD_CMD_FLAG_FAST_ZERO,
  [NBD_CMD.NBD_CMD_BLOCK_STATUS]: NBD_CMD_FLAG.NBD_CMD_FLAG_REQ_ONE,
};

/**
 * What a request is validated against. A session keeps one and updates the fields that
 * change per request (`shuttingDown`, `hasPayload`), so validating allocates nothing.
 */
export interface ValidationContext {
  /** Reply framing agreed in the handshake. */
  mode: Mode;
  /** The transmission flags sent to the client. */
  tflags: number;
  readOnly: boolean;
  /** True if base:allocation was selected for this export (SET_META_CONTEXT). */
  metaSelected: boolean;
  /** The device requests run on: its size, block sizes and capabilities bound the ranges. */
  device: BlockDevice;
  /** The largest READ/WRITE payload advertised (ServerLimits.maxPayload). */
  maxPayload: number;
  /** True once the server is shutting down: new requests get ESHUTDOWN. */
  shuttingDown: boolean;
  /** True if the request carried a payload (compact WRITE; extended, PAYLOAD_LEN). */
  hasPayload: boolean;
}

/** The device operation a command's range is checked as. */
function operationOf(type: number): 'read' | 'write' | 'trim' | 'zero' | 'cache' | 'extents' {
  switch (type) {
    case NBD_CMD.NBD_CMD_READ:
      return 'read';
    case NBD_CMD.NBD_CMD_WRITE:
      return 'write';
    case NBD_CMD.NBD_CMD_TRIM:
      return 'trim';
    case NBD_CMD.NBD_CMD_WRITE_ZEROES:
      return 'zero';
    case NBD_CMD.NBD_CMD_CACHE:
      return 'cache';
    default:
      return 'extents';
  }
}

/** Checks a request (not DISC, which the session handles) before it runs. Returns the error, or null. */
export function validateRequest(h: RequestHeader, ctx: ValidationContext): BlockError | null {
  const C = NBD_CMD;
  const FL = NBD_CMD_FLAG;
  if (ctx.shuttingDown) return new BlockError('ESHUTDOWN', 'server is shutting down');
  const allowed = ALLOWED_FLAGS[h.type];
  if (allowed === undefined) return new BlockError('EINVAL', `unknown command ${h.type}`);
  let ok = allowed;
  if (ctx.tflags & NBD_FLAG.NBD_FLAG_SEND_FUA) ok |= FL.NBD_CMD_FLAG_FUA;
  if (ctx.mode === MODE.EXTENDED && h.type === C.NBD_CMD_WRITE) ok |= FL.NBD_CMD_FLAG_PAYLOAD_LEN;
  if (!(ctx.tflags & NBD_FLAG.NBD_FLAG_SEND_DF)) ok &= ~FL.NBD_CMD_FLAG_DF;
  if (!(ctx.tflags & NBD_FLAG.NBD_FLAG_SEND_FAST_ZERO)) ok &= ~FL.NBD_CMD_FLAG_FAST_ZERO;
  if (h.flags & ~ok) {
    return new BlockError('EINVAL', `flags 0x${h.flags.toString(16)} are not valid for ${commandName(h.type)}`);
  }
  if (ctx.mode === MODE.EXTENDED && h.type === C.NBD_CMD_WRITE && !ctx.hasPayload) {
    return new BlockError('EINVAL', 'WRITE without NBD_CMD_FLAG_PAYLOAD_LEN');
  }
  // Above 2^53 - 1 the numbers the device path works with are not the peer's values
  // (offsets and, in extended mode, lengths are u64 on the wire), so such a request is
  // refused here whatever the command. EINVAL: the spec's answer to a range beyond the
  // export, which any such value is; EOVERFLOW is only a MAY for over-long payload-less
  // requests, and clients treat EINVAL alike.
  if (!Number.isSafeInteger(h.offset) || !Number.isSafeInteger(h.length)) {
    return new BlockError('EINVAL', `${commandName(h.type)}: offset or length is beyond 2^53 - 1`);
  }
  switch (h.type) {
    case C.NBD_CMD_FLUSH:
      if (h.offset !== 0 || h.length !== 0) return new BlockError('EINVAL', 'FLUSH offset and length must be 0');
      return null;
    case C.NBD_CMD_READ:
      // EINVAL, as for an oversized WRITE: the spec asks for it above the advertised
      // maximum and keeps EOVERFLOW for DF and for payload-less commands.
      if (h.length > ctx.maxPayload) {
        return new BlockError('EINVAL', `READ of ${h.length} bytes exceeds the maximum payload of ${ctx.maxPayload}`);
      }
      break;
    case C.NBD_CMD_TRIM:
    case C.NBD_CMD_WRITE:
    case C.NBD_CMD_WRITE_ZEROES:
      if (ctx.readOnly) return new BlockError('EPERM', 'the export is read-only');
      break;
    case C.NBD_CMD_BLOCK_STATUS:
      if (!ctx.metaSelected) return new BlockError('EINVAL', 'no metadata context was selected (SET_META_CONTEXT)');
      if (h.length === 0) return new BlockError('EINVAL', 'BLOCK_STATUS of length 0');
      break;
  }
  const op = operationOf(h.type);
  try {
    validateRange(ctx.device, op, h.offset, h.length);
    checkAlignment(ctx.device, op, h.offset, h.length);
  } catch (e) {
    const be = toBlockError(e);
    return new BlockError(be.code, `${commandName(h.type)}: ${be.message}`);
  }
  return null;
}

/**
 * The NBD error value a failed request is answered with. The code's own value
 * (toNbdError) except for NBD_ENOTSUP, which the spec reserves for a WRITE_ZEROES with
 * NBD_CMD_FLAG_FAST_ZERO ("the server SHOULD NOT return NBD_ENOTSUP except as
 * documented in response to NBD_CMD_WRITE_ZEROES when NBD_CMD_FLAG_FAST_ZERO is
 * supported"): a client sees it as "fall back to a slow zero". Any other command that
 * fails as unsupported (a TRIM or CACHE the backend cannot do) gets NBD_EINVAL, as
 * nbdkit answers it.
 */
export function nbdErrno(error: BlockError, cmd: number, flags: number): NbdErrorValue {
  const value = toNbdError(error.code);
  if (value !== NBD_ERROR.NBD_ENOTSUP) return value;
  const fastZero = cmd === NBD_CMD.NBD_CMD_WRITE_ZEROES && (flags & NBD_CMD_FLAG.NBD_CMD_FLAG_FAST_ZERO) !== 0;
  return fastZero ? NBD_ERROR.NBD_ENOTSUP : NBD_ERROR.NBD_EINVAL;
}
