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
  /** Open connections (in the handshake or in transmission); a client over the limit is closed at once. */
  readonly maxConnections: number;
  /** Largest READ/WRITE payload (advertised as the maximum block size). */
  readonly maxPayload: number;
  /** Largest oversized WRITE payload the server reads and throws away to stay in sync; beyond it, it hangs up. */
  readonly maxDiscard: number;
  /** Payload bytes (read and write) in flight per connection before the server stops reading the socket. */
  readonly maxInFlightBytes: number;
  /**
   * Payload bytes in flight over all connections together; when reached, every session
   * stops reading its socket until the total falls (see {@link InFlightBudget}).
   */
  readonly maxServerInFlightBytes: number;
  /** Requests in flight per connection before the server stops reading the socket. */
  readonly maxInFlightRequests: number;
  /** Most descriptors in one BLOCK_STATUS reply (the spec's recommended cap, 2^20). */
  readonly maxExtents: number;
  /** Reads at least this long are checked for holes and may be answered with OFFSET_HOLE chunks. */
  readonly sparseReadMinimum: number;
}

/**
 * Handshake deadline: 10 s, qemu's default since 9.1 (nbd-server-start
 * handshake-max-seconds, qemu-nbd --handshake-limit). It was 60 s here, to leave a human
 * in nbdsh option mode time to type; an idle peer holding one of maxConnections slots
 * for a minute matters more, and a library caller can raise it.
 */
export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;

/**
 * Connection limit: 100, qemu's default for nbd-server-start max-connections since 9.1
 * (set for CVE-2024-7409, the same unbounded-connections problem). With
 * the per-connection bounds (about maxInFlightBytes plus the socket's queues each) it
 * keeps what connections alone can make the server hold finite.
 */
export const DEFAULT_MAX_CONNECTIONS = 100;

/** Per-connection in-flight payload: 64 MiB, two full-size (32 MiB) requests. */
export const DEFAULT_MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024;

/**
 * Server-wide in-flight payload: 512 MiB, eight connections' worth of
 * DEFAULT_MAX_IN_FLIGHT_BYTES. Eight busy clients each get their full queue; beyond that
 * they share, so 100 connections that never read hold about 512 MiB, not 100 x 64 MiB.
 * The total can pass it by at most one request per connection: a session sees the
 * budget is spent when its next request goes in flight, then stops reading.
 */
export const DEFAULT_MAX_SERVER_IN_FLIGHT_BYTES = 8 * DEFAULT_MAX_IN_FLIGHT_BYTES;

export const DEFAULT_LIMITS: ServerLimits = Object.freeze({
  // Export names and queries are at most 4096 bytes each (spec); 64 KiB holds any sane
  // SET_META_CONTEXT request.
  maxOptionLength: 64 * 1024,
  // nbdkit stops at 32 options; clients probing contexts and infos need a few dozen.
  maxOptions: 256,
  // A real client finishes in milliseconds; a peer that connects and waits holds a slot.
  handshakeTimeoutMs: DEFAULT_HANDSHAKE_TIMEOUT_MS,
  maxConnections: DEFAULT_MAX_CONNECTIONS,
  // The spec's interoperable maximum: 32 MiB.
  maxPayload: 32 * 1024 * 1024,
  // A compact header cannot describe more than 2^32 - 1 bytes.
  maxDiscard: 2 ** 32 - 1,
  // Two full-size requests plus change: enough to keep the disk busy, bounded per peer.
  maxInFlightBytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
  maxServerInFlightBytes: DEFAULT_MAX_SERVER_IN_FLIGHT_BYTES,
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
  const positive = [
    'maxOptions',
    'maxInFlightRequests',
    'maxInFlightBytes',
    'maxServerInFlightBytes',
    'maxExtents',
    'handshakeTimeoutMs',
    'maxConnections',
  ] as const;
  for (const key of positive) {
    if (limits[key] < 1) throw new BlockError('EINVAL', `limits.${key}: must be at least 1`);
  }
  if (limits.maxPayload < 512 || limits.maxPayload > MAX_PAYLOAD_LIMIT) {
    throw new BlockError('EINVAL', `limits.maxPayload: must be between 512 and ${MAX_PAYLOAD_LIMIT}, got ${limits.maxPayload}`);
  }
  return limits;
}

/**
 * The server-wide in-flight byte budget its sessions share. A session takes a request's
 * cost when the request goes in flight and gives it back when the request ends; while
 * the budget is spent, sessions stop reading and wait here, and are woken when bytes
 * come back. Wakes run in a microtask, not inside the release: a release happens in the
 * middle of one session's reply path, and waking another session there would run that
 * session's parser inside this one's call stack.
 */
export class InFlightBudget {
  readonly #max: number;
  #used = 0;
  readonly #waiting = new Set<() => void>();
  #wakeQueued = false;

  constructor(max: number) {
    this.#max = max;
  }

  /** Bytes in flight over all sessions. */
  get used(): number {
    return this.#used;
  }

  /** True while the budget is spent: sessions should not read more requests. */
  get exhausted(): boolean {
    return this.#used >= this.#max;
  }

  take(bytes: number): void {
    this.#used += bytes;
  }

  release(bytes: number): void {
    this.#used -= bytes;
    if (this.#waiting.size > 0 && !this.exhausted && !this.#wakeQueued) {
      this.#wakeQueued = true;
      queueMicrotask(this.#wake);
    }
  }

  /** Calls `wake` once, the next time bytes are released below the budget. */
  wait(wake: () => void): void {
    this.#waiting.add(wake);
  }

  /** Stops waiting (a session that closed). */
  forget(wake: () => void): void {
    this.#waiting.delete(wake);
  }

  readonly #wake = (): void => {
    this.#wakeQueued = false;
    // Each woken session may read requests and spend the budget again (and wait again):
    // take the set first so a session that waits again waits for the next release.
    const woken = [...this.#waiting];
    this.#waiting.clear();
    for (const wake of woken) {
      if (this.exhausted) {
        this.#waiting.add(wake);
      } else {
        wake();
      }
    }
  };
}
