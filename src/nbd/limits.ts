import { BlockError } from '../errors/index.js';

/**
 * Limits of the NBD server. Every bound on what a peer can make the server hold or do
 * is here, with its value and the reason for it. Sessions take a `ServerLimits` object
 * so tests can lower them; these are the defaults.
 */
export interface ServerLimits {
  /** Longest option data kept in memory; longer options are skipped and get ERR_TOO_BIG. */
  readonly maxOptionLength: number;
  /** Options one session may send before the server treats it as a denial of service and hangs up. */
  readonly maxOptions: number;
  /** Time a client has to finish the handshake, in ms, before the server hangs up. */
  readonly handshakeTimeoutMs: number;
  /** Largest READ/WRITE payload (advertised as the maximum block size). */
  readonly maxPayload: number;
  /** Largest oversized WRITE payload the server reads and throws away to stay in sync; beyond it, it hangs up. */
  readonly maxDiscard: number;
  /** Payload bytes (read and write) in flight per connection before the server stops reading the socket. */
  readonly maxInFlightBytes: number;
  /** Requests in flight per connection before the server stops reading the socket. */
  readonly maxInFlightRequests: number;
  /** Most descriptors in one BLOCK_STATUS reply (the spec's recommended cap, 2^20). */
  readonly maxExtents: number;
  /** Reads at least this long are checked for holes and may be answered with OFFSET_HOLE chunks. */
  readonly sparseReadMinimum: number;
}

export const DEFAULT_LIMITS: ServerLimits = Object.freeze({
  // Export names and queries are at most 4096 bytes each (spec); 64 KiB holds any sane
  // SET_META_CONTEXT request.
  maxOptionLength: 64 * 1024,
  // nbdkit stops at 32 options; clients probing contexts and infos need a few dozen.
  maxOptions: 256,
  // Long enough for a human with nbdsh in option mode, short enough to shed idle peers.
  handshakeTimeoutMs: 60_000,
  // The spec's interoperable maximum: 32 MiB.
  maxPayload: 32 * 1024 * 1024,
  // A compact header cannot describe more than 2^32 - 1 bytes.
  maxDiscard: 2 ** 32 - 1,
  // Two full-size requests plus change: enough to keep the disk busy, bounded per peer.
  maxInFlightBytes: 64 * 1024 * 1024,
  // Deeper than any client's default queue (nbdcopy 64, qemu 16, fio as asked).
  maxInFlightRequests: 512,
  maxExtents: 2 ** 20,
  // Below this, the extents query costs more than the zeroes it saves.
  sparseReadMinimum: 64 * 1024,
});

/**
 * The largest maxPayload a server may be given: 2^32 - 9. A compact structured READ
 * reply carries the data length plus an 8-byte offset in a u32, and NBD_INFO_BLOCK_SIZE
 * advertises the maximum as a u32.
 */
export const MAX_PAYLOAD_LIMIT = 2 ** 32 - 9;

/**
 * Checks limits given to a server (library callers can set any); throws BlockError
 * EINVAL naming the bad key, so a bad setting fails at construction rather than as an
 * exception in a socket handler later.
 */
export function validateLimits(limits: ServerLimits): ServerLimits {
  for (const [key, value] of Object.entries(limits) as [keyof ServerLimits, number][]) {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw new BlockError('EINVAL', `limits.${key}: expected a non-negative integer, got ${String(value)}`);
    }
  }
  for (const key of ['maxOptions', 'maxInFlightRequests', 'maxInFlightBytes', 'maxExtents', 'handshakeTimeoutMs'] as const) {
    if (limits[key] < 1) throw new BlockError('EINVAL', `limits.${key}: must be at least 1`);
  }
  if (limits.maxPayload < 512 || limits.maxPayload > MAX_PAYLOAD_LIMIT) {
    throw new BlockError('EINVAL', `limits.maxPayload: must be between 512 and ${MAX_PAYLOAD_LIMIT}, got ${limits.maxPayload}`);
  }
  return limits;
}
