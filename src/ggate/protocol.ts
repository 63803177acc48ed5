/**
 * The ggated/ggatec network protocol (FreeBSD `sbin/ggate/shared/ggate.h`): constants,
 * wire struct layouts, and pure encode/decode functions. No I/O here; sessions call these
 * on buffers.
 *
 * All four wire structs are `__packed` C structs with big-endian integers (ggate.h's
 * `g_gate_swap2n_*` are htobe*). Every size and offset below follows from the packed
 * layout; the byte-level tests check them against hand-written vectors.
 *
 * Conventions:
 * - Encoders come in two forms: `writeX(buf, off, x)` writes into a caller-owned buffer
 *   and returns the offset after the struct; `encodeX(x)` allocates. Encoders throw a
 *   RangeError on values that cannot be represented (a caller bug, never peer data).
 * - Decoders `decodeX(buf, off)` never throw on peer data: they return
 *   `{ ok: true, value, size }` or, when the buffer holds too few bytes,
 *   `{ ok: false, need }` with the number of bytes still missing, so a stream parser
 *   knows how long to wait. Nonsense values are decoded as they are and judged by
 *   validate.ts, so a reply can still echo them.
 * - u64 fields decode to a number when they are at most 2^53 - 1 (the project's
 *   safe-integer discipline) and to the exact bigint otherwise; the validator rejects
 *   the bigint case, and encoders accept either, so an echoed reply is exact.
 * - Error fields carry a raw errno of the sending OS. Which numbering is used is an
 *   {@link ErrnoDialect} (FreeBSD by default, W7); the numbers themselves live only in
 *   src/errors/errno.ts.
 */
import { readU64Exact, writeU64Exact } from '../io/wire.js';
import { isUtf8 } from 'node:buffer';
import { codeFromFreebsd, codeFromLinux, freebsdErrno, linuxErrno, type ErrnoCode } from '../errors/index.js';

// ---------------------------------------------------------------------------------
// Constants (ggate.h names)

/** Defaults of ggate.h. */
export const GGATE = {
  /** TCP port ggated listens on (IPv4 only in FreeBSD). */
  G_GATE_PORT: 3080,
  /** Default SO_RCVBUF of both daemons (ggated/ggatec -R). */
  G_GATE_RCVBUF: 131072,
  /** Default SO_SNDBUF of both daemons (ggated/ggatec -S). */
  G_GATE_SNDBUF: 131072,
  /** Default kernel queue size of a ggatec-created provider (ggatec -q). */
  G_GATE_QUEUE_SIZE: 1024,
  /** Default request timeout of a ggatec-created provider, seconds; 0 = none (ggatec -t). */
  G_GATE_TIMEOUT: 0,
  /** The only protocol version (g_gate_version.gv_version). */
  GGATE_VERSION: 0,
} as const;

/** gv_magic: "GEOM_GATE" followed by 7 spaces, 16 bytes, no NUL on the wire. */
export const GGATE_MAGIC = 'GEOM_GATE       ';

/** g_gate_cinit.gc_flags bits. */
export const GGATE_FLAG = {
  /** The client wants read-only access (same bit as the kernel's G_GATE_FLAG_READONLY). */
  GGATE_FLAG_RDONLY: 0x0001,
  /** The client wants write-only access (G_GATE_FLAG_WRITEONLY). Neither bit: read-write. */
  GGATE_FLAG_WRONLY: 0x0002,
  /** This connection is the one the *server* sends replies on (client's receive socket). */
  GGATE_FLAG_SEND: 0x0004,
  /** This connection is the one the *server* receives requests on (client's send socket). */
  GGATE_FLAG_RECV: 0x0008,
} as const;

/** g_gate_hdr.gh_cmd values. 2 is unused; BIO_DELETE is not part of the protocol. */
export const GGATE_CMD = {
  /** Read gh_length bytes at gh_offset; a successful reply carries them. */
  GGATE_CMD_READ: 0,
  /** Write the gh_length bytes that follow the request header. */
  GGATE_CMD_WRITE: 1,
  /** fsync the backing store; gh_length is 0 (GEOM sends gh_offset = mediasize). */
  GGATE_CMD_FLUSH: 3,
} as const;

export type GgateCmd = (typeof GGATE_CMD)[keyof typeof GGATE_CMD];

/** Sizes of the wire structs and their string field, in bytes. */
export const GGATE_SIZE = {
  /** FreeBSD's PATH_MAX (sys/syslimits.h), which sizes gc_path. */
  PATH_MAX: 1024,
  /** gc_path: PATH_MAX + 1 bytes, a NUL-terminated string. */
  GC_PATH_SIZE: 1025,
  /** struct g_gate_version. */
  VERSION_SIZE: 20,
  /** struct g_gate_cinit. */
  CINIT_SIZE: 1039,
  /** struct g_gate_sinit. */
  SINIT_SIZE: 15,
  /** struct g_gate_hdr. */
  HDR_SIZE: 23,
} as const;

/** Behaviour constants of ggated/ggatec that are literals in the C code, named here. */
export const GGATE_TIMING = {
  /** ggated drops a half-open connection pair older than this at the next accept (connection_cleanups). */
  HALF_OPEN_TIMEOUT_MS: 10_000,
  /** SO_SNDTIMEO and SO_RCVTIMEO of every socket (g_gate_socket_settings). */
  SOCKET_TIMEOUT_MS: 8_000,
  /** ggatec retries a lost connection this often (g_gatec_loop: sleep(2)). */
  RECONNECT_INTERVAL_MS: 2_000,
  /** listen(2) backlog of ggated. */
  LISTEN_BACKLOG: 5,
  /** Connections per client: one per direction (gc_nconn). */
  NCONN: 2,
} as const;

// ---------------------------------------------------------------------------------
// Layouts: byte offset of every field inside its struct

/** struct g_gate_version (20 bytes), sent by the client first and echoed by the server. */
export const G_GATE_VERSION_LAYOUT = {
  /** char gv_magic[16]: {@link GGATE_MAGIC}; the server compares all 16 bytes. */
  gv_magic: 0,
  /** uint16_t gv_version: {@link GGATE.GGATE_VERSION}; anything else makes the server close. */
  gv_version: 16,
  /** uint16_t gv_error: 0 from the client; the server echoes 0 on success. */
  gv_error: 18,
} as const;

/** struct g_gate_cinit (1039 bytes), the client's initial packet on each connection. */
export const G_GATE_CINIT_LAYOUT = {
  /** char gc_path[PATH_MAX + 1]: the export path, NUL-terminated; bytes after the NUL are garbage. */
  gc_path: 0,
  /** uint64_t gc_flags: {@link GGATE_FLAG} access bits | direction bit. */
  gc_flags: 1025,
  /** uint16_t gc_nconn: number of connections of the session, always 2. */
  gc_nconn: 1033,
  /** uint32_t gc_token: random per connect attempt; pairs the two connections. */
  gc_token: 1035,
} as const;

/** struct g_gate_sinit (15 bytes), the server's answer to a cinit. */
export const G_GATE_SINIT_LAYOUT = {
  /** uint8_t gs_flags: unused, never byte-swapped, not initialised by ggated. */
  gs_flags: 0,
  /** uint64_t gs_mediasize: size of the export in bytes. */
  gs_mediasize: 1,
  /** uint32_t gs_sectorsize: sector size in bytes (512 for regular files). */
  gs_sectorsize: 9,
  /** uint16_t gs_error: 0, or the errno that refused the connection (then nothing else is meaningful). */
  gs_error: 13,
} as const;

/** struct g_gate_hdr (23 bytes): request header (client to server) and reply header (back). */
export const G_GATE_HDR_LAYOUT = {
  /** uint8_t gh_cmd: {@link GGATE_CMD}. */
  gh_cmd: 0,
  /** uint64_t gh_offset: device offset in bytes. */
  gh_offset: 1,
  /** uint32_t gh_length: request length in bytes (payload length of WRITE and of a successful READ reply). */
  gh_length: 9,
  /** uint64_t gh_seq: the client's request number, echoed in the reply. */
  gh_seq: 13,
  /** uint16_t gh_error: 0 in requests; 0 or an errno in replies. */
  gh_error: 21,
} as const;

// ---------------------------------------------------------------------------------
// Errno dialects (W7)

/**
 * How error fields are numbered on the wire. FreeBSD peers send and expect FreeBSD
 * errno values (EAGAIN 35, EOPNOTSUPP 45, ECANCELED 85); a peer built on Linux sends
 * Linux values (11, 95, 125). Both come from the one table in src/errors.
 */
export interface ErrnoDialect {
  readonly name: 'freebsd' | 'linux';
  /** The wire number of a code. */
  toWire(code: ErrnoCode): number;
  /** The code of a wire number, or undefined if the table has no row for it. */
  fromWire(errno: number): ErrnoCode | undefined;
}

export const ERRNO_DIALECT = {
  freebsd: { name: 'freebsd', toWire: freebsdErrno, fromWire: codeFromFreebsd },
  linux: { name: 'linux', toWire: linuxErrno, fromWire: codeFromLinux },
} as const satisfies Record<string, ErrnoDialect>;

/**
 * The code for a raw wire error: null for 0 (success); a number the table does not know
 * becomes EIO, since all a receiver can say is that the remote operation failed (the raw
 * value stays available as `errno` for logs).
 */
export function wireErrorCode(errno: number, dialect: ErrnoDialect = ERRNO_DIALECT.freebsd): ErrnoCode | null {
  if (errno === 0) return null;
  return dialect.fromWire(errno) ?? 'EIO';
}

function wireErrno(code: ErrnoCode | null, dialect: ErrnoDialect): number {
  return code === null ? 0 : dialect.toWire(code);
}

// ---------------------------------------------------------------------------------
// Decoded shapes

/** A u64 wire value: a number when at most 2^53 - 1, else the exact bigint. */
export type U64 = number | bigint;

/** The result of a decoder: the value and its size, or how many more bytes are needed. */
export type Decoded<T> =
  | { readonly ok: true; readonly value: T; readonly size: number }
  | { readonly ok: false; readonly need: number };

/** struct g_gate_version, as given to an encoder (the magic is always written). */
export interface GgateVersionInit {
  /** gv_version. */
  readonly version: number;
  /** gv_error: null for 0. */
  readonly error: ErrnoCode | null;
}

/** struct g_gate_version, decoded. */
export interface GgateVersion extends GgateVersionInit {
  /** gv_magic equals {@link GGATE_MAGIC} in all 16 bytes. */
  readonly magicOk: boolean;
  /** gv_error as sent. */
  readonly errno: number;
}

/** struct g_gate_cinit, as given to an encoder. */
export interface GgateCinitInit {
  /** gc_path: at most PATH_MAX (1024) UTF-8 bytes, no NUL. */
  readonly path: string;
  /** gc_flags. */
  readonly flags: U64;
  /** gc_nconn. */
  readonly nconn: number;
  /** gc_token (u32). */
  readonly token: number;
}

/** struct g_gate_cinit, decoded. */
export interface GgateCinit extends GgateCinitInit {
  /**
   * gc_path up to its first NUL, decoded as UTF-8 (invalid sequences replaced). If there
   * is no NUL in the 1025 bytes, all of them (and `pathTerminated` is false).
   */
  readonly path: string;
  /** A NUL was found inside gc_path. */
  readonly pathTerminated: boolean;
  /** The bytes before the NUL are valid UTF-8 (else `path` is not the client's name). */
  readonly pathUtf8: boolean;
}

/** struct g_gate_sinit, as given to an encoder. */
export interface GgateSinitInit {
  /** gs_flags (u8, unused by FreeBSD); 0 if omitted. */
  readonly flags?: number;
  /** gs_mediasize. */
  readonly mediasize: U64;
  /** gs_sectorsize (u32). */
  readonly sectorsize: number;
  /** gs_error: null for 0. */
  readonly error: ErrnoCode | null;
}

/** struct g_gate_sinit, decoded. */
export interface GgateSinit extends GgateSinitInit {
  /** gs_flags as sent (meaningless: ggated leaves it uninitialised). */
  readonly flags: number;
  /** gs_error as sent. */
  readonly errno: number;
}

/** struct g_gate_hdr, as given to an encoder. */
export interface GgateHdrInit {
  /** gh_cmd (u8; values other than {@link GGATE_CMD} are representable so replies can echo them). */
  readonly cmd: number;
  /** gh_offset. */
  readonly offset: U64;
  /** gh_length (u32). */
  readonly length: number;
  /** gh_seq. */
  readonly seq: U64;
  /** gh_error: null for 0 (always null in requests). */
  readonly error: ErrnoCode | null;
}

/** struct g_gate_hdr, decoded. */
export interface GgateHdr extends GgateHdrInit {
  /** gh_error as sent. */
  readonly errno: number;
}

// ---------------------------------------------------------------------------------
// Primitives

const MAGIC_BYTES = Buffer.from(GGATE_MAGIC, 'latin1');

/** Reads a u64: a number when safe, else the exact bigint (the shared helper of src/io/wire.ts). */
export const readGgateU64: (buf: Buffer, off: number) => U64 = readU64Exact;

/** Writes a u64 from a non-negative safe integer or a bigint in [0, 2^64 - 1] (ggate's argument order). */
export function writeGgateU64(buf: Buffer, off: number, value: U64): void {
  writeU64Exact(buf, value, off);
}

/** True if `bit` (a single power-of-two flag such as {@link GGATE_FLAG}) is set in a u64 flags value. */
export function hasFlag(flags: U64, bit: number): boolean {
  return typeof flags === 'bigint' ? (flags & BigInt(bit)) !== 0n : (Math.floor(flags / bit) & 1) === 1;
}

function checkRoom(buf: Buffer, off: number, size: number, what: string): void {
  if (!Number.isInteger(off) || off < 0 || off + size > buf.length) {
    throw new RangeError(`${what}: ${size} bytes do not fit at offset ${off} of a ${buf.length}-byte buffer`);
  }
}

/** How many more bytes a struct of `size` bytes at `off` needs (0: it is all there). */
export function bytesNeeded(buf: Buffer, off: number, size: number): number {
  return Math.max(0, off + size - buf.length);
}

// ---------------------------------------------------------------------------------
// g_gate_version

export function writeVersion(buf: Buffer, off: number, v: GgateVersionInit, dialect: ErrnoDialect = ERRNO_DIALECT.freebsd): number {
  checkRoom(buf, off, GGATE_SIZE.VERSION_SIZE, 'g_gate_version');
  MAGIC_BYTES.copy(buf, off + G_GATE_VERSION_LAYOUT.gv_magic);
  buf.writeUInt16BE(v.version, off + G_GATE_VERSION_LAYOUT.gv_version);
  buf.writeUInt16BE(wireErrno(v.error, dialect), off + G_GATE_VERSION_LAYOUT.gv_error);
  return off + GGATE_SIZE.VERSION_SIZE;
}

export function encodeVersion(v: GgateVersionInit, dialect?: ErrnoDialect): Buffer {
  const b = Buffer.alloc(GGATE_SIZE.VERSION_SIZE);
  writeVersion(b, 0, v, dialect);
  return b;
}

export function decodeVersion(buf: Buffer, off = 0, dialect: ErrnoDialect = ERRNO_DIALECT.freebsd): Decoded<GgateVersion> {
  const need = bytesNeeded(buf, off, GGATE_SIZE.VERSION_SIZE);
  if (need > 0) return { ok: false, need };
  const magicOk = buf.compare(MAGIC_BYTES, 0, MAGIC_BYTES.length, off, off + MAGIC_BYTES.length) === 0;
  const errno = buf.readUInt16BE(off + G_GATE_VERSION_LAYOUT.gv_error);
  return {
    ok: true,
    size: GGATE_SIZE.VERSION_SIZE,
    value: {
      magicOk,
      version: buf.readUInt16BE(off + G_GATE_VERSION_LAYOUT.gv_version),
      error: wireErrorCode(errno, dialect),
      errno,
    },
  };
}

// ---------------------------------------------------------------------------------
// g_gate_cinit

export function writeCinit(buf: Buffer, off: number, c: GgateCinitInit): number {
  checkRoom(buf, off, GGATE_SIZE.CINIT_SIZE, 'g_gate_cinit');
  const path = Buffer.from(c.path, 'utf8');
  if (path.includes(0)) throw new RangeError('gc_path must not contain a NUL byte');
  // ggatec refuses a path whose strlcpy into gc_path would truncate: at most PATH_MAX bytes.
  if (path.length > GGATE_SIZE.PATH_MAX) {
    throw new RangeError(`gc_path is ${path.length} bytes, more than PATH_MAX (${GGATE_SIZE.PATH_MAX})`);
  }
  const start = off + G_GATE_CINIT_LAYOUT.gc_path;
  path.copy(buf, start);
  // Zero the rest: the NUL terminator and deterministic padding (ggatec sends stack garbage).
  buf.fill(0, start + path.length, start + GGATE_SIZE.GC_PATH_SIZE);
  writeGgateU64(buf, off + G_GATE_CINIT_LAYOUT.gc_flags, c.flags);
  buf.writeUInt16BE(c.nconn, off + G_GATE_CINIT_LAYOUT.gc_nconn);
  buf.writeUInt32BE(c.token, off + G_GATE_CINIT_LAYOUT.gc_token);
  return off + GGATE_SIZE.CINIT_SIZE;
}

export function encodeCinit(c: GgateCinitInit): Buffer {
  const b = Buffer.alloc(GGATE_SIZE.CINIT_SIZE);
  writeCinit(b, 0, c);
  return b;
}

export function decodeCinit(buf: Buffer, off = 0): Decoded<GgateCinit> {
  const need = bytesNeeded(buf, off, GGATE_SIZE.CINIT_SIZE);
  if (need > 0) return { ok: false, need };
  const start = off + G_GATE_CINIT_LAYOUT.gc_path;
  // The search is bounded by the field: only these 1025 bytes are ever looked at.
  const field = buf.subarray(start, start + GGATE_SIZE.GC_PATH_SIZE);
  const nul = field.indexOf(0);
  const pathBytes = nul === -1 ? field : field.subarray(0, nul);
  return {
    ok: true,
    size: GGATE_SIZE.CINIT_SIZE,
    value: {
      path: pathBytes.toString('utf8'),
      pathTerminated: nul !== -1,
      pathUtf8: isUtf8(pathBytes),
      flags: readGgateU64(buf, off + G_GATE_CINIT_LAYOUT.gc_flags),
      nconn: buf.readUInt16BE(off + G_GATE_CINIT_LAYOUT.gc_nconn),
      token: buf.readUInt32BE(off + G_GATE_CINIT_LAYOUT.gc_token),
    },
  };
}

// ---------------------------------------------------------------------------------
// g_gate_sinit

export function writeSinit(buf: Buffer, off: number, s: GgateSinitInit, dialect: ErrnoDialect = ERRNO_DIALECT.freebsd): number {
  checkRoom(buf, off, GGATE_SIZE.SINIT_SIZE, 'g_gate_sinit');
  buf.writeUInt8(s.flags ?? 0, off + G_GATE_SINIT_LAYOUT.gs_flags);
  writeGgateU64(buf, off + G_GATE_SINIT_LAYOUT.gs_mediasize, s.mediasize);
  buf.writeUInt32BE(s.sectorsize, off + G_GATE_SINIT_LAYOUT.gs_sectorsize);
  buf.writeUInt16BE(wireErrno(s.error, dialect), off + G_GATE_SINIT_LAYOUT.gs_error);
  return off + GGATE_SIZE.SINIT_SIZE;
}

export function encodeSinit(s: GgateSinitInit, dialect?: ErrnoDialect): Buffer {
  const b = Buffer.alloc(GGATE_SIZE.SINIT_SIZE);
  writeSinit(b, 0, s, dialect);
  return b;
}

/** The sinit ggated sends when it refuses a connection: only gs_error is meaningful (sendfail). */
export function encodeSinitFailure(error: ErrnoCode, dialect?: ErrnoDialect): Buffer {
  return encodeSinit({ mediasize: 0, sectorsize: 0, error }, dialect);
}

export function decodeSinit(buf: Buffer, off = 0, dialect: ErrnoDialect = ERRNO_DIALECT.freebsd): Decoded<GgateSinit> {
  const need = bytesNeeded(buf, off, GGATE_SIZE.SINIT_SIZE);
  if (need > 0) return { ok: false, need };
  const errno = buf.readUInt16BE(off + G_GATE_SINIT_LAYOUT.gs_error);
  return {
    ok: true,
    size: GGATE_SIZE.SINIT_SIZE,
    value: {
      flags: buf.readUInt8(off + G_GATE_SINIT_LAYOUT.gs_flags),
      mediasize: readGgateU64(buf, off + G_GATE_SINIT_LAYOUT.gs_mediasize),
      sectorsize: buf.readUInt32BE(off + G_GATE_SINIT_LAYOUT.gs_sectorsize),
      error: wireErrorCode(errno, dialect),
      errno,
    },
  };
}

// ---------------------------------------------------------------------------------
// g_gate_hdr

export function writeHdr(buf: Buffer, off: number, h: GgateHdrInit, dialect: ErrnoDialect = ERRNO_DIALECT.freebsd): number {
  checkRoom(buf, off, GGATE_SIZE.HDR_SIZE, 'g_gate_hdr');
  buf.writeUInt8(h.cmd, off + G_GATE_HDR_LAYOUT.gh_cmd);
  writeGgateU64(buf, off + G_GATE_HDR_LAYOUT.gh_offset, h.offset);
  buf.writeUInt32BE(h.length, off + G_GATE_HDR_LAYOUT.gh_length);
  writeGgateU64(buf, off + G_GATE_HDR_LAYOUT.gh_seq, h.seq);
  buf.writeUInt16BE(wireErrno(h.error, dialect), off + G_GATE_HDR_LAYOUT.gh_error);
  return off + GGATE_SIZE.HDR_SIZE;
}

export function encodeHdr(h: GgateHdrInit, dialect?: ErrnoDialect): Buffer {
  const b = Buffer.alloc(GGATE_SIZE.HDR_SIZE);
  writeHdr(b, 0, h, dialect);
  return b;
}

export function decodeHdr(buf: Buffer, off = 0, dialect: ErrnoDialect = ERRNO_DIALECT.freebsd): Decoded<GgateHdr> {
  const need = bytesNeeded(buf, off, GGATE_SIZE.HDR_SIZE);
  if (need > 0) return { ok: false, need };
  const errno = buf.readUInt16BE(off + G_GATE_HDR_LAYOUT.gh_error);
  return {
    ok: true,
    size: GGATE_SIZE.HDR_SIZE,
    value: {
      cmd: buf.readUInt8(off + G_GATE_HDR_LAYOUT.gh_cmd),
      offset: readGgateU64(buf, off + G_GATE_HDR_LAYOUT.gh_offset),
      length: buf.readUInt32BE(off + G_GATE_HDR_LAYOUT.gh_length),
      seq: readGgateU64(buf, off + G_GATE_HDR_LAYOUT.gh_seq),
      error: wireErrorCode(errno, dialect),
      errno,
    },
  };
}

/**
 * The reply header for a request: cmd, offset, length and seq echoed exactly (W3), with
 * the given error.
 */
export function replyTo(request: GgateHdrInit, error: ErrnoCode | null): GgateHdrInit {
  return { cmd: request.cmd, offset: request.offset, length: request.length, seq: request.seq, error };
}

// ---------------------------------------------------------------------------------
// Framing (W3): how many payload bytes follow a header

/** Payload bytes after a request header: exactly gh_length for WRITE, none otherwise. */
export function requestPayloadLength(hdr: Pick<GgateHdrInit, 'cmd' | 'length'>): number {
  return hdr.cmd === GGATE_CMD.GGATE_CMD_WRITE ? hdr.length : 0;
}

/**
 * Payload bytes after a reply header: gh_length for a READ whose raw gh_error is 0, none
 * otherwise (what ggatec's recv_thread reads).
 */
export function replyPayloadLength(hdr: Pick<GgateHdr, 'cmd' | 'length' | 'errno'>): number {
  return hdr.cmd === GGATE_CMD.GGATE_CMD_READ && hdr.errno === 0 ? hdr.length : 0;
}
