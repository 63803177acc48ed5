/**
 * The block-device model: the interface every backend and filter implements.
 *
 * Offsets and lengths are JavaScript numbers under a *safe-integer discipline*: every
 * offset, length and size is an integer in [0, 2^53 - 1] (Number.MAX_SAFE_INTEGER,
 * 8 PiB). Protocol edges decode 64-bit wire values as `hi * 2^32 + lo` and reject
 * anything above {@link MAX_DEVICE_SIZE} before it reaches a device, so arithmetic below
 * the edge is exact and cheap (no bigint on the data path). Devices may assume that
 * every request they receive has passed {@link validateRequest}.
 */

/**
 * Request flags. The values equal the NBD command-flag bits of the same meaning so the
 * NBD edge can pass validated flags through without translation; other frontends
 * (ggate) build them from their own fields.
 */
export const REQ = {
  /** Force unit access: the request's data is durable when it completes. */
  FUA: 0x01,
  /** zero(): the range must stay allocated (no hole punching). */
  NO_HOLE: 0x02,
  /** extents(): return exactly one extent. */
  REQ_ONE: 0x08,
  /** zero(): fail fast with EOPNOTSUPP instead of writing zeroes slowly. */
  FAST_ZERO: 0x10,
} as const;

/** Extent flags; equal to NBD's base:allocation state bits. */
export const EXTENT = {
  /** The range is not allocated (a hole). */
  HOLE: 0x1,
  /** The range reads as zeroes. */
  ZERO: 0x2,
} as const;

/** The largest device size (and so offset + length) the stack accepts: 2^53 - 1. */
export const MAX_DEVICE_SIZE = Number.MAX_SAFE_INTEGER;

/** What a device can do. A frontend advertises only what is true here. */
export interface Capabilities {
  /** Writes are accepted (false: a read-only device; write/trim/zero fail EPERM). */
  readonly write: boolean;
  /** flush() does something meaningful (makes earlier writes durable). */
  readonly flush: boolean;
  /** The FUA flag is honoured natively or emulated with a flush. */
  readonly fua: boolean;
  /** trim() may deallocate. */
  readonly trim: boolean;
  /** zero() is supported. */
  readonly zero: boolean;
  /** zero() with FAST_ZERO is faster than writing zeroes (or fails EOPNOTSUPP quickly). */
  readonly fastZero: boolean;
  /** extents() reports real allocation information (else one data extent). */
  readonly extents: boolean;
  /** cache() prefetches. */
  readonly cache: boolean;
  /**
   * Every connection sees the same data and a flush on one connection makes writes of
   * all connections durable: safe to advertise NBD CAN_MULTI_CONN.
   */
  readonly multiConn: boolean;
}

/** Block-size constraints (NBD_INFO_BLOCK_SIZE). */
export interface BlockSize {
  /** Minimum I/O size and alignment, a power of two in [1, 65536]. */
  readonly minimum: number;
  /** Preferred I/O size, a power of two >= max(minimum, 512). */
  readonly preferred: number;
  /** Maximum payload of one read or write, >= preferred. */
  readonly maximum: number;
}

/** One extent: a range and its EXTENT flags. */
export interface Extent {
  readonly offset: number;
  readonly length: number;
  readonly flags: number;
}

/**
 * A block device. All methods are asynchronous and reject with a BlockError (see
 * src/errors) on failure; a rejected request never leaves the device inconsistent.
 *
 * `read` fills a caller-owned buffer so the frontend can leave room for a reply header
 * in front of the data (one write per reply). `write` receives a Buffer that the device
 * must not keep after its promise settles (a write-back cache copies it).
 */
export interface BlockDevice {
  /** Size in bytes. May change (a resized gate); frontends read it per request. */
  readonly size: number;
  readonly capabilities: Capabilities;
  readonly blockSize: BlockSize;
  /**
   * True if every operation completes without waiting for the thread pool or the
   * network (memory, null, pattern). Frontends may use it to batch replies tighter.
   */
  readonly nonBlocking: boolean;
  /** A short description for logs and `blockgate status`, e.g. "memory 1GiB". */
  readonly description: string;

  /** Reads `buf.length` bytes at `offset` into `buf`. */
  read(buf: Buffer, offset: number, flags: number): Promise<void>;
  /** Writes `data` at `offset`. With REQ.FUA the data is durable on success. */
  write(data: Buffer, offset: number, flags: number): Promise<void>;
  /**
   * Optional gather write: the same as `write(Buffer.concat(data), offset, flags)` without
   * the copy. Frontends use it when a payload arrived in several socket chunks. Filters do
   * not forward it (FilterDevice leaves it undefined), so a filter that changes writes is
   * never bypassed; only a bare backend offers it.
   */
  writev?(data: readonly Buffer[], offset: number, flags: number): Promise<void>;
  /**
   * Optional zero-copy read: views of the device's own storage that hold, in order, the
   * `length` bytes at `offset` (same checks and errors as `read`). A frontend sends them
   * to the peer as they are instead of copying them into a reply buffer, never writes
   * them, and drops them once sent. A write, trim or zero of the range that runs while
   * such a reply is still queued was sent by the client before it had the reply, so it
   * was concurrent with the read, and NBD lets such a read return old or new contents.
   * Filters do not forward it (as for writev); only a bare backend offers it.
   */
  readViews?(offset: number, length: number): Buffer[];
  /**
   * Optional: false when an extents() query costs a network round trip per object (rbd),
   * so a frontend should not ask for one alongside every large READ to send holes as hole
   * chunks (NBD's sparse READ replies); BLOCK_STATUS still asks. Absent means true. Filters
   * do not forward it (as for writev); only a bare backend says it.
   */
  readonly extentsOnRead?: boolean;
  /** Makes every write completed before this call durable. */
  flush(flags: number): Promise<void>;
  /** Discards a range (a hint: contents become unspecified). */
  trim(offset: number, length: number, flags: number): Promise<void>;
  /** Makes a range read as zeroes. NO_HOLE keeps it allocated; FAST_ZERO fails EOPNOTSUPP if slow. */
  zero(offset: number, length: number, flags: number): Promise<void>;
  /**
   * Describes allocation from `offset`: a non-empty list of contiguous extents, the
   * first starting at `offset`. It may cover less than `length` (the caller asks again)
   * or end past it; with REQ.REQ_ONE only the first extent is used.
   */
  extents(offset: number, length: number, flags: number): Promise<Extent[]>;
  /** Prefetch hint. Failure never changes what reads return. */
  cache(offset: number, length: number, flags: number): Promise<void>;
  /** Releases resources. Further calls fail. */
  close(): Promise<void>;
}
