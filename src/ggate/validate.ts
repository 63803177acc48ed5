/**
 * Checks on decoded ggate packets, before any I/O (W4). FreeBSD's ggated checks requests
 * with assert() only (a bad request aborts the child or, built with NDEBUG, runs
 * unchecked) and trusts gc_path to hold a NUL; here every check is a pure function that
 * returns the errno code to reply with, or null when the packet is acceptable.
 *
 * The server replies to a bad request with an error header (same cmd/offset/length/seq)
 * and keeps the connection: the stream stays in sync because only WRITE carries a
 * payload, and it does so whatever the verdict (the session must consume or discard
 * `requestPayloadLength(hdr)` bytes after a rejected WRITE).
 */
import { BlockError, type ErrnoCode } from '../errors/index.js';
import { MAX_DEVICE_SIZE, type BlockDevice } from '../device/types.js';
import { checkAlignment, validateRequest } from '../device/validate.js';
import {
  GGATE,
  GGATE_CMD,
  GGATE_FLAG,
  GGATE_TIMING,
  hasFlag,
  type GgateCinit,
  type GgateHdr,
  type GgateHdrInit,
  type GgateSinit,
  type GgateVersion,
  type U64,
} from './protocol.js';

/**
 * The default largest gh_length the server accepts: 1 MiB, FreeBSD's default
 * `kern.maxphys` on 64-bit platforms since 13.0 (the largest bio the kernel issues, and
 * ggatec's initial buffer size). It caps what one request makes the server allocate:
 * FreeBSD's ggated mallocs gh_length bytes for every request, READ included, without a
 * limit (a memory DoS). A peer whose kern.maxphys was raised needs a larger limit.
 */
export const MAX_REQUEST_LENGTH = 1024 * 1024;

/** Access mode of a connection, from gc_flags (and of an export line). */
export type GgateAccess = 'ro' | 'wo' | 'rw';

/** What the server knows about the export a connection serves. */
export interface GgateGeometry {
  /** Size of the export in bytes (a safe integer). */
  readonly mediasize: number;
  /** Sector size in bytes (a positive integer). */
  readonly sectorsize: number;
  /** The connection's access mode; requests it does not allow fail EPERM. */
  readonly access: GgateAccess;
  /** Largest gh_length accepted; {@link MAX_REQUEST_LENGTH} if omitted. */
  readonly maxLength?: number;
}

/** A u64 under the safe-integer discipline, or undefined if it is above 2^53 - 1. */
function safe(value: U64): number | undefined {
  return typeof value === 'number' && value <= MAX_DEVICE_SIZE ? value : undefined;
}

/**
 * Checks a request header against the export, in this order:
 *
 * 1. gh_cmd not READ/WRITE/FLUSH: EOPNOTSUPP (what current ggated's disk thread answers;
 *    older ones asserted);
 * 2. FLUSH: gh_length must be 0 (EINVAL; current ggated reports a nonzero length as a
 *    failed fsync); gh_offset is not looked at, since GEOM's g_io_flush sends mediasize
 *    and other clients may send 0;
 * 3. WRITE on a read-only connection, READ on a write-only one: EPERM;
 * 4. gh_length above the limit: EINVAL;
 * 5. gh_offset above 2^53 - 1: EINVAL (it cannot be a valid offset of any device here);
 * 6. gh_offset or gh_length not a multiple of the sector size: EINVAL;
 * 7. gh_offset + gh_length past mediasize: ENOSPC for WRITE, EINVAL for READ.
 *
 * Rules 6 and 7 are the device layer's own (checkAlignment, validateRequest), applied
 * to the ggate geometry (mediasize is the device size rounded down to the sector), so
 * both frontends refuse the same ranges with the same codes.
 *
 * A zero-length READ or WRITE inside the device is accepted (FreeBSD's checks pass it).
 */
export function validateGgateRequest(hdr: Pick<GgateHdrInit, 'cmd' | 'offset' | 'length'>, geometry: GgateGeometry): ErrnoCode | null {
  const { cmd, length } = hdr;
  if (cmd !== GGATE_CMD.GGATE_CMD_READ && cmd !== GGATE_CMD.GGATE_CMD_WRITE && cmd !== GGATE_CMD.GGATE_CMD_FLUSH) {
    return 'EOPNOTSUPP';
  }
  if (cmd === GGATE_CMD.GGATE_CMD_FLUSH) return length === 0 ? null : 'EINVAL';
  if (cmd === GGATE_CMD.GGATE_CMD_WRITE && geometry.access === 'ro') return 'EPERM';
  if (cmd === GGATE_CMD.GGATE_CMD_READ && geometry.access === 'wo') return 'EPERM';
  if (length > (geometry.maxLength ?? MAX_REQUEST_LENGTH)) return 'EINVAL';
  const offset = safe(hdr.offset);
  if (offset === undefined) return 'EINVAL';
  const op = cmd === GGATE_CMD.GGATE_CMD_WRITE ? 'write' : 'read';
  const dev = geometryAsDevice(geometry);
  try {
    checkAlignment(dev, op, offset, length);
    validateRequest(dev, op, offset, length);
  } catch (e) {
    if (e instanceof BlockError) return e.code;
    throw e;
  }
  return null;
}

/**
 * The ggate geometry seen as the device the range rules check. device/validate takes a
 * BlockDevice but reads only size, capabilities.write and blockSize.minimum; access was
 * enforced above, so write capability is granted here and never decides the verdict.
 */
function geometryAsDevice(g: GgateGeometry): BlockDevice {
  const view: Pick<BlockDevice, 'size'> & { capabilities: Pick<BlockDevice['capabilities'], 'write'>; blockSize: Pick<BlockDevice['blockSize'], 'minimum'> } = {
    size: g.mediasize,
    capabilities: { write: true },
    blockSize: { minimum: g.sectorsize },
  };
  return view as BlockDevice;
}

/** Why a version packet is refused; the server then closes without a reply (as ggated does). */
export type VersionProblem = 'magic' | 'version';

/** Checks a g_gate_version: all 16 magic bytes, then gv_version == GGATE_VERSION. */
export function validateVersion(v: Pick<GgateVersion, 'magicOk' | 'version'>): VersionProblem | null {
  if (!v.magicOk) return 'magic';
  if (v.version !== GGATE.GGATE_VERSION) return 'version';
  return null;
}

/**
 * Checks a g_gate_cinit; on refusal the server sends an sinit carrying the code:
 *
 * - gc_path without a NUL in its 1025 bytes: EINVAL (ggated would run strcmp/strdup off
 *   the end of the field); bytes after the NUL are ignored, since ggatec never clears
 *   them;
 * - an empty gc_path (NUL first), or one that is not valid UTF-8: EINVAL (no export can
 *   name it, and a replaced character could make two names compare equal);
 * - gc_nconn other than 2: EINVAL (the only value ggatec sends; ggated ignores it);
 * - not exactly one of GGATE_FLAG_SEND / GGATE_FLAG_RECV: EINVAL (ggated treats "not
 *   SEND" as RECV);
 * - both GGATE_FLAG_RDONLY and GGATE_FLAG_WRONLY: EINVAL (ggated would silently pick
 *   read-only).
 *
 * Other gc_flags bits are ignored, as FreeBSD does.
 */
export function validateCinit(c: Pick<GgateCinit, 'path' | 'pathTerminated' | 'pathUtf8' | 'flags' | 'nconn'>): ErrnoCode | null {
  if (!c.pathTerminated || !c.pathUtf8 || c.path.length === 0) return 'EINVAL';
  if (c.nconn !== GGATE_TIMING.NCONN) return 'EINVAL';
  if (hasFlag(c.flags, GGATE_FLAG.GGATE_FLAG_SEND) === hasFlag(c.flags, GGATE_FLAG.GGATE_FLAG_RECV)) return 'EINVAL';
  if (hasFlag(c.flags, GGATE_FLAG.GGATE_FLAG_RDONLY) && hasFlag(c.flags, GGATE_FLAG.GGATE_FLAG_WRONLY)) return 'EINVAL';
  return null;
}

/** The access mode a cinit asks for, with ggated's precedence (RDONLY, then WRONLY, else RW). */
export function requestedAccess(flags: U64): GgateAccess {
  if (hasFlag(flags, GGATE_FLAG.GGATE_FLAG_RDONLY)) return 'ro';
  if (hasFlag(flags, GGATE_FLAG.GGATE_FLAG_WRONLY)) return 'wo';
  return 'rw';
}

/** The direction bit of a cinit, from the server's point of view; null if not exactly one is set. */
export function cinitDirection(flags: U64): 'send' | 'recv' | null {
  const send = hasFlag(flags, GGATE_FLAG.GGATE_FLAG_SEND);
  const recv = hasFlag(flags, GGATE_FLAG.GGATE_FLAG_RECV);
  if (send === recv) return null;
  return send ? 'send' : 'recv';
}

/**
 * Checks a g_gate_sinit on the client side: a refusal carries its code; otherwise the
 * geometry must be usable for a gate (the kernel's create checks): mediasize a positive
 * safe integer, sectorsize positive and dividing mediasize. EINVAL if not.
 */
export function validateSinit(s: Pick<GgateSinit, 'error' | 'mediasize' | 'sectorsize'>): ErrnoCode | null {
  if (s.error !== null) return s.error;
  const size = safe(s.mediasize);
  if (size === undefined || size === 0) return 'EINVAL';
  if (s.sectorsize === 0 || size % s.sectorsize !== 0) return 'EINVAL';
  return null;
}

/**
 * Checks, on the client side, that a reply answers the request it is matched to by seq:
 * cmd, offset and length must be echoed (the kernel does not check this). EIO if not,
 * since the data of such a reply cannot be trusted.
 */
export function validateReply(request: Pick<GgateHdrInit, 'cmd' | 'offset' | 'length'>, reply: Pick<GgateHdr, 'cmd' | 'offset' | 'length'>): ErrnoCode | null {
  if (reply.cmd !== request.cmd || reply.length !== request.length || !sameU64(reply.offset, request.offset)) return 'EIO';
  return null;
}

function sameU64(a: U64, b: U64): boolean {
  return BigInt(a) === BigInt(b);
}
