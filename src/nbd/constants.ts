/**
 * NBD protocol constants with the names of the specification
 * (NetworkBlockDevice/nbd doc/proto.md, including the extended-headers extension).
 * All integers on the wire are big-endian.
 */

/** Magic numbers. 64-bit ones are bigints; 32-bit ones numbers. */
export const NBD_MAGIC = {
  /** "NBDMAGIC": first 8 bytes the server sends. */
  NBDMAGIC: 0x4e42444d41474943n,
  /** "IHAVEOPT": newstyle greeting and every client option header. */
  IHAVEOPT: 0x49484156454f5054n,
  /** Every fixed-newstyle option reply starts with this. */
  NBD_REP_MAGIC: 0x0003e889045565a9n,
  /** Compact (28-byte) request. */
  NBD_REQUEST_MAGIC: 0x25609513,
  /** Extended (32-byte) request, with NBD_OPT_EXTENDED_HEADERS. */
  NBD_EXTENDED_REQUEST_MAGIC: 0x21e41c71,
  /** Simple reply (16 bytes). */
  NBD_SIMPLE_REPLY_MAGIC: 0x67446698,
  /** Structured reply chunk (20-byte header). */
  NBD_STRUCTURED_REPLY_MAGIC: 0x668e33ef,
  /** Extended reply chunk (32-byte header). */
  NBD_EXTENDED_REPLY_MAGIC: 0x6e8a278c,
} as const;

/** Handshake flags (u16, server to client). */
export const NBD_HS_FLAG = {
  NBD_FLAG_FIXED_NEWSTYLE: 1 << 0,
  NBD_FLAG_NO_ZEROES: 1 << 1,
} as const;

/** Client flags (u32, client to server). */
export const NBD_CLIENT_FLAG = {
  NBD_FLAG_C_FIXED_NEWSTYLE: 1 << 0,
  NBD_FLAG_C_NO_ZEROES: 1 << 1,
} as const;

/** Option codes (NBD_OPT_*). */
export const NBD_OPT = {
  NBD_OPT_EXPORT_NAME: 1,
  NBD_OPT_ABORT: 2,
  NBD_OPT_LIST: 3,
  NBD_OPT_PEEK_EXPORT: 4,
  NBD_OPT_STARTTLS: 5,
  NBD_OPT_INFO: 6,
  NBD_OPT_GO: 7,
  NBD_OPT_STRUCTURED_REPLY: 8,
  NBD_OPT_LIST_META_CONTEXT: 9,
  NBD_OPT_SET_META_CONTEXT: 10,
  NBD_OPT_EXTENDED_HEADERS: 11,
} as const;

/** Option reply types (NBD_REP_*); errors have bit 31 set. */
export const NBD_REP = {
  NBD_REP_ACK: 1,
  NBD_REP_SERVER: 2,
  NBD_REP_INFO: 3,
  NBD_REP_META_CONTEXT: 4,
  NBD_REP_ERR_UNSUP: 0x80000001,
  NBD_REP_ERR_POLICY: 0x80000002,
  NBD_REP_ERR_INVALID: 0x80000003,
  NBD_REP_ERR_PLATFORM: 0x80000004,
  NBD_REP_ERR_TLS_REQD: 0x80000005,
  NBD_REP_ERR_UNKNOWN: 0x80000006,
  NBD_REP_ERR_SHUTDOWN: 0x80000007,
  NBD_REP_ERR_BLOCK_SIZE_REQD: 0x80000008,
  NBD_REP_ERR_TOO_BIG: 0x80000009,
  NBD_REP_ERR_EXT_HEADER_REQD: 0x8000000a,
} as const;

/** Information types in NBD_REP_INFO replies and INFO/GO requests. */
export const NBD_INFO = {
  NBD_INFO_EXPORT: 0,
  NBD_INFO_NAME: 1,
  NBD_INFO_DESCRIPTION: 2,
  NBD_INFO_BLOCK_SIZE: 3,
} as const;

/** Transmission flags (u16, per export). */
export const NBD_FLAG = {
  NBD_FLAG_HAS_FLAGS: 1 << 0,
  NBD_FLAG_READ_ONLY: 1 << 1,
  NBD_FLAG_SEND_FLUSH: 1 << 2,
  NBD_FLAG_SEND_FUA: 1 << 3,
  NBD_FLAG_ROTATIONAL: 1 << 4,
  NBD_FLAG_SEND_TRIM: 1 << 5,
  NBD_FLAG_SEND_WRITE_ZEROES: 1 << 6,
  NBD_FLAG_SEND_DF: 1 << 7,
  NBD_FLAG_CAN_MULTI_CONN: 1 << 8,
  NBD_FLAG_SEND_RESIZE: 1 << 9,
  NBD_FLAG_SEND_CACHE: 1 << 10,
  NBD_FLAG_SEND_FAST_ZERO: 1 << 11,
  NBD_FLAG_BLOCK_STATUS_PAYLOAD: 1 << 12,
} as const;

/** Commands (NBD_CMD_*). */
export const NBD_CMD = {
  NBD_CMD_READ: 0,
  NBD_CMD_WRITE: 1,
  NBD_CMD_DISC: 2,
  NBD_CMD_FLUSH: 3,
  NBD_CMD_TRIM: 4,
  NBD_CMD_CACHE: 5,
  NBD_CMD_WRITE_ZEROES: 6,
  NBD_CMD_BLOCK_STATUS: 7,
  NBD_CMD_RESIZE: 8,
} as const;

/** Command flags (u16). */
export const NBD_CMD_FLAG = {
  NBD_CMD_FLAG_FUA: 1 << 0,
  NBD_CMD_FLAG_NO_HOLE: 1 << 1,
  NBD_CMD_FLAG_DF: 1 << 2,
  NBD_CMD_FLAG_REQ_ONE: 1 << 3,
  NBD_CMD_FLAG_FAST_ZERO: 1 << 4,
  NBD_CMD_FLAG_PAYLOAD_LEN: 1 << 5,
} as const;

/** Structured reply chunk flags. */
export const NBD_REPLY_FLAG = {
  NBD_REPLY_FLAG_DONE: 1 << 0,
} as const;

/** Structured reply chunk types. Error types have bit 15 set. */
export const NBD_REPLY_TYPE = {
  NBD_REPLY_TYPE_NONE: 0,
  NBD_REPLY_TYPE_OFFSET_DATA: 1,
  NBD_REPLY_TYPE_OFFSET_HOLE: 2,
  NBD_REPLY_TYPE_BLOCK_STATUS: 5,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT: 6,
  NBD_REPLY_TYPE_ERROR: 0x8001,
  NBD_REPLY_TYPE_ERROR_OFFSET: 0x8002,
} as const;

/** base:allocation state flags. */
export const NBD_STATE = {
  NBD_STATE_HOLE: 1 << 0,
  NBD_STATE_ZERO: 1 << 1,
} as const;

/** The one metadata context blockgate serves. */
export const BASE_ALLOCATION = 'base:allocation';

/** Sizes of fixed messages, in bytes. */
export const NBD_SIZE = {
  /** NBDMAGIC + IHAVEOPT + u16 handshake flags. */
  GREETING: 18,
  /** u32 client flags. */
  CLIENT_FLAGS: 4,
  /** IHAVEOPT + u32 option + u32 length. */
  OPTION_HEADER: 16,
  /** magic + u32 option + u32 type + u32 length. */
  OPTION_REPLY_HEADER: 20,
  /** u64 size + u16 flags (+ 124 zero bytes unless NO_ZEROES). */
  EXPORT_NAME_REPLY: 10,
  EXPORT_NAME_ZEROES: 124,
  COMPACT_REQUEST: 28,
  EXTENDED_REQUEST: 32,
  SIMPLE_REPLY: 16,
  STRUCTURED_REPLY_HEADER: 20,
  EXTENDED_REPLY_HEADER: 32,
} as const;

/** Spec limits. */
export const NBD_LIMIT = {
  /** Longest string (export name, message) the spec allows: 4096 bytes. */
  MAX_STRING: 4096,
  /** Default maximum payload clients assume when none is advertised: 32 MiB. */
  DEFAULT_MAX_PAYLOAD: 2 ** 25,
  /** Largest minimum block size the spec allows. */
  MAX_MINIMUM_BLOCK: 2 ** 16,
  /** Unfragmented (DF) reads a server must support. */
  DF_MINIMUM: 65536,
  /** Most descriptors per BLOCK_STATUS chunk the spec recommends. */
  MAX_EXTENTS: 2 ** 20,
} as const;

/** Reverse lookups for logs and messages. */
export function optionName(opt: number): string {
  for (const [k, v] of Object.entries(NBD_OPT)) if (v === opt) return k;
  return `option ${opt}`;
}
export function commandName(cmd: number): string {
  for (const [k, v] of Object.entries(NBD_CMD)) if (v === cmd) return k;
  return `command ${cmd}`;
}
/**
 * Transmission flags as names joined by '|' without the NBD_FLAG_ prefix
 * ('HAS_FLAGS|SEND_FLUSH|...'); bits the spec does not name appear as hex.
 */
export function transmissionFlagNames(flags: number): string {
  const names: string[] = [];
  let rest = flags;
  for (const [k, v] of Object.entries(NBD_FLAG)) {
    if ((flags & v) !== 0) {
      names.push(k.replace(/^NBD_FLAG_/, ''));
      rest &= ~v;
    }
  }
  if (rest !== 0) names.push(`0x${(rest >>> 0).toString(16)}`);
  return names.join('|');
}

/**
 * Reply framing negotiated in the handshake (blockgate's own names, not the spec's):
 * simple replies only, structured replies (NBD_OPT_STRUCTURED_REPLY), or extended
 * headers (NBD_OPT_EXTENDED_HEADERS). Shared by the handshake, the validator and the
 * reply writers, which each depend on it.
 */
export const MODE = { SIMPLE: 0, STRUCTURED: 1, EXTENDED: 2 } as const;
export type Mode = (typeof MODE)[keyof typeof MODE];
/** A reply mode's name for logs: 'simple', 'structured' or 'extended'. */
export function modeName(mode: Mode): string {
  return mode === MODE.EXTENDED ? 'extended' : mode === MODE.STRUCTURED ? 'structured' : 'simple';
}
