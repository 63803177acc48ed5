/**
 * Pure encode/decode functions for every NBD message blockgate sends or receives.
 * No I/O here: sessions (src/nbd/session.ts) call these on buffers. Encoders either write into
 * a caller-owned buffer at an offset (hot path: reply headers) or return a new Buffer
 * (handshake, rare). Decoders read from a buffer at an offset and return plain objects;
 * they never throw on peer data, they return a `DecodeError` string instead.
 */
import { readU64, writeU64, writeU64Exact, writeU64Halves } from '../io/wire.js';
import {
  NBD_INFO,
  NBD_LIMIT,
  NBD_MAGIC,
  NBD_REPLY_FLAG,
  NBD_REPLY_TYPE,
  NBD_SIZE,
} from './constants.js';

/** A decoding failure description (for logs and NBD_REP_ERR_INVALID messages). */
export type DecodeError = { readonly error: string };

export function isDecodeError(x: unknown): x is DecodeError {
  return typeof x === 'object' && x !== null && 'error' in x;
}

// The u64 helpers are the ones every protocol shares (src/io/wire.ts); re-exported for the codec's users.
export { readU64, writeU64, writeU64Halves } from '../io/wire.js';

// ---------------------------------------------------------------------------------
// Handshake

const GREETING_PREFIX = (() => {
  const b = Buffer.alloc(16);
  b.writeBigUInt64BE(NBD_MAGIC.NBDMAGIC, 0);
  b.writeBigUInt64BE(NBD_MAGIC.IHAVEOPT, 8);
  return b;
})();

/** Server greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags (18 bytes). */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(NBD_SIZE.GREETING);
  GREETING_PREFIX.copy(b, 0);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

/** A client option header: IHAVEOPT, u32 option, u32 data length. */
export interface OptionHeader {
  /** The first 8 bytes were IHAVEOPT. */
  readonly magicOk: boolean;
  readonly option: number;
  readonly length: number;
}

export function decodeOptionHeader(buf: Buffer, off = 0): OptionHeader {
  return {
    magicOk: buf.readBigUInt64BE(off) === NBD_MAGIC.IHAVEOPT,
    option: buf.readUInt32BE(off + 8),
    length: buf.readUInt32BE(off + 12),
  };
}

/** Client side: encodes an option header plus data. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(NBD_SIZE.OPTION_HEADER + data.length);
  b.writeBigUInt64BE(NBD_MAGIC.IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

/** An option reply: magic, u32 option, u32 reply type, u32 length, data. */
export function encodeOptionReply(option: number, type: number, data: Buffer | string = ''): Buffer {
  const payload = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
  const b = Buffer.alloc(NBD_SIZE.OPTION_REPLY_HEADER + payload.length);
  b.writeBigUInt64BE(NBD_MAGIC.NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(payload.length, 16);
  payload.copy(b, 20);
  return b;
}

/** Decoded option reply header (client side and tests). */
export interface OptionReplyHeader {
  readonly magicOk: boolean;
  readonly option: number;
  readonly type: number;
  readonly length: number;
}

export function decodeOptionReplyHeader(buf: Buffer, off = 0): OptionReplyHeader {
  return {
    magicOk: buf.readBigUInt64BE(off) === NBD_MAGIC.NBD_REP_MAGIC,
    option: buf.readUInt32BE(off + 8),
    type: buf.readUInt32BE(off + 12),
    length: buf.readUInt32BE(off + 16),
  };
}

/** NBD_REP_SERVER payload: u32 name length, name, optional description. */
export function encodeRepServer(name: string, description = ''): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8');
  const b = Buffer.alloc(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

/** NBD_INFO_EXPORT payload: u16 type, u64 size, u16 transmission flags (12 bytes). */
export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(NBD_INFO.NBD_INFO_EXPORT, 0);
  writeU64(b, size, 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

/** NBD_INFO_NAME / NBD_INFO_DESCRIPTION payload: u16 type, string. */
export function encodeInfoString(type: number, text: string): Buffer {
  const s = Buffer.from(text, 'utf8');
  const b = Buffer.alloc(2 + s.length);
  b.writeUInt16BE(type, 0);
  s.copy(b, 2);
  return b;
}

/** NBD_INFO_BLOCK_SIZE payload: u16 type, u32 minimum, u32 preferred, u32 maximum (14 bytes). */
export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(NBD_INFO.NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

/** NBD_REP_META_CONTEXT payload: u32 context id, name. */
export function encodeRepMetaContext(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

/** Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 flags, then 124 zeroes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(NBD_SIZE.EXPORT_NAME_REPLY + (noZeroes ? 0 : NBD_SIZE.EXPORT_NAME_ZEROES));
  writeU64(b, size, 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

/** Reads a string field of `len` bytes, checking UTF-8 validity, NUL and the spec's 4096-byte cap. */
function readString(data: Buffer, off: number, len: number, what: string): string | DecodeError {
  if (len > NBD_LIMIT.MAX_STRING) return { error: `${what} is longer than ${NBD_LIMIT.MAX_STRING} bytes` };
  if (off + len > data.length) return { error: `${what} runs past the end of the option data` };
  const raw = data.subarray(off, off + len);
  if (raw.includes(0)) return { error: `${what} contains a NUL byte` };
  const s = raw.toString('utf8');
  if (!Buffer.from(s, 'utf8').equals(raw)) return { error: `${what} is not valid UTF-8` };
  return s;
}

/** Data of NBD_OPT_INFO and NBD_OPT_GO: u32 name length, name, u16 count, count x u16 info types. */
export interface InfoRequest {
  readonly name: string;
  readonly infos: readonly number[];
}

export function decodeInfoRequest(data: Buffer): InfoRequest | DecodeError {
  if (data.length < 6) return { error: 'option data shorter than 6 bytes' };
  const nameLen = data.readUInt32BE(0);
  const name = readString(data, 4, nameLen, 'export name');
  if (typeof name !== 'string') return name;
  const at = 4 + nameLen;
  if (at + 2 > data.length) return { error: 'missing information request count' };
  const n = data.readUInt16BE(at);
  if (at + 2 + 2 * n !== data.length) return { error: `option length does not match ${n} information requests` };
  const infos: number[] = [];
  for (let i = 0; i < n; i++) infos.push(data.readUInt16BE(at + 2 + 2 * i));
  return { name, infos };
}

/** Client side: data for NBD_OPT_INFO / NBD_OPT_GO. */
export function encodeInfoRequest(name: string, infos: readonly number[]): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + n.length + 2 * i));
  return b;
}

/** Data of LIST_META_CONTEXT / SET_META_CONTEXT: u32 name length, name, u32 count, count x (u32 len, query). */
export interface MetaContextRequest {
  readonly name: string;
  readonly queries: readonly string[];
}

export function decodeMetaContextRequest(data: Buffer): MetaContextRequest | DecodeError {
  if (data.length < 8) return { error: 'option data shorter than 8 bytes' };
  const nameLen = data.readUInt32BE(0);
  const name = readString(data, 4, nameLen, 'export name');
  if (typeof name !== 'string') return name;
  let at = 4 + nameLen;
  if (at + 4 > data.length) return { error: 'missing query count' };
  const n = data.readUInt32BE(at);
  at += 4;
  // Each query needs at least its 4-byte length, so n is bounded by the data length.
  if (n > (data.length - at) / 4) return { error: `query count ${n} does not fit in the option data` };
  const queries: string[] = [];
  for (let i = 0; i < n; i++) {
    if (at + 4 > data.length) return { error: `query ${i} runs past the end of the option data` };
    const len = data.readUInt32BE(at);
    const q = readString(data, at + 4, len, `query ${i}`);
    if (typeof q !== 'string') return q;
    queries.push(q);
    at += 4 + len;
  }
  if (at !== data.length) return { error: 'trailing bytes after the last query' };
  return { name, queries };
}

/** Client side: data for LIST/SET_META_CONTEXT. */
export function encodeMetaContextRequest(name: string, queries: readonly string[]): Buffer {
  const parts = [Buffer.alloc(4), Buffer.from(name, 'utf8'), Buffer.alloc(4)];
  parts[0]!.writeUInt32BE(parts[1]!.length, 0);
  parts[2]!.writeUInt32BE(queries.length, 0);
  for (const q of queries) {
    const qb = Buffer.from(q, 'utf8');
    const l = Buffer.alloc(4);
    l.writeUInt32BE(qb.length, 0);
    parts.push(l, qb);
  }
  return Buffer.concat(parts);
}

// ---------------------------------------------------------------------------------
// Transmission

/** A decoded request header (compact or extended). */
export interface RequestHeader {
  /** The magic matched the header form in use. */
  readonly magicOk: boolean;
  readonly flags: number;
  readonly type: number;
  /** Opaque, echoed in every reply. */
  readonly cookie: bigint;
  /** Not a safe integer if the wire value exceeds 2^53 - 1 (the validator rejects it). */
  readonly offset: number;
  /**
   * The wire offset's high and low u32, kept because `offset` rounds above 2^53 and
   * extended reply headers must echo the request's offset exactly, even one the
   * validator rejects (two numbers, so decoding allocates no bigint per request).
   */
  readonly offsetHigh: number;
  readonly offsetLow: number;
  /** 32-bit in compact headers, 64-bit (same discipline as offset) in extended ones. */
  readonly length: number;
}

/** Decodes a 28-byte compact request header. */
export function decodeCompactRequest(buf: Buffer, off = 0): RequestHeader {
  return {
    magicOk: buf.readUInt32BE(off) === NBD_MAGIC.NBD_REQUEST_MAGIC,
    flags: buf.readUInt16BE(off + 4),
    type: buf.readUInt16BE(off + 6),
    cookie: buf.readBigUInt64BE(off + 8),
    offset: readU64(buf, off + 16),
    offsetHigh: buf.readUInt32BE(off + 16),
    offsetLow: buf.readUInt32BE(off + 20),
    length: buf.readUInt32BE(off + 24),
  };
}

/** Decodes a 32-byte extended request header. */
export function decodeExtendedRequest(buf: Buffer, off = 0): RequestHeader {
  return {
    magicOk: buf.readUInt32BE(off) === NBD_MAGIC.NBD_EXTENDED_REQUEST_MAGIC,
    flags: buf.readUInt16BE(off + 4),
    type: buf.readUInt16BE(off + 6),
    cookie: buf.readBigUInt64BE(off + 8),
    offset: readU64(buf, off + 16),
    offsetHigh: buf.readUInt32BE(off + 16),
    offsetLow: buf.readUInt32BE(off + 20),
    length: readU64(buf, off + 24),
  };
}

/**
 * Client side: a compact (or, with `extended`, a 32-byte) request header. A bigint
 * offset or length reaches the u64 values a number cannot (tests probing the edge).
 */
export function encodeRequest(
  flags: number,
  type: number,
  cookie: bigint,
  offset: number | bigint,
  length: number | bigint,
  extended = false,
): Buffer {
  const b = Buffer.alloc(extended ? NBD_SIZE.EXTENDED_REQUEST : NBD_SIZE.COMPACT_REQUEST);
  b.writeUInt32BE(extended ? NBD_MAGIC.NBD_EXTENDED_REQUEST_MAGIC : NBD_MAGIC.NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  writeU64Exact(b, offset, 16);
  if (extended) writeU64Exact(b, length, 24);
  else b.writeUInt32BE(Number(length), 24);
  return b;
}

/** Writes a 16-byte simple reply header: magic, u32 error, u64 cookie. */
export function writeSimpleReply(buf: Buffer, off: number, error: number, cookie: bigint): void {
  buf.writeUInt32BE(NBD_MAGIC.NBD_SIMPLE_REPLY_MAGIC, off);
  buf.writeUInt32BE(error, off + 4);
  buf.writeBigUInt64BE(cookie, off + 8);
}

/** Writes a 20-byte structured chunk header: magic, u16 flags, u16 type, u64 cookie, u32 length. */
export function writeStructuredHeader(
  buf: Buffer,
  off: number,
  flags: number,
  type: number,
  cookie: bigint,
  length: number,
): void {
  buf.writeUInt32BE(NBD_MAGIC.NBD_STRUCTURED_REPLY_MAGIC, off);
  buf.writeUInt16BE(flags, off + 4);
  buf.writeUInt16BE(type, off + 6);
  buf.writeBigUInt64BE(cookie, off + 8);
  buf.writeUInt32BE(length, off + 16);
}

/**
 * Writes a 32-byte extended chunk header: magic, u16 flags, u16 type, u64 cookie,
 * u64 offset (the request's, echoed from its raw halves so any u64 comes back
 * exactly), u64 payload length (the server's own, a safe integer).
 */
export function writeExtendedHeader(
  buf: Buffer,
  off: number,
  flags: number,
  type: number,
  h: Pick<RequestHeader, 'cookie' | 'offsetHigh' | 'offsetLow'>,
  length: number,
): void {
  buf.writeUInt32BE(NBD_MAGIC.NBD_EXTENDED_REPLY_MAGIC, off);
  buf.writeUInt16BE(flags, off + 4);
  buf.writeUInt16BE(type, off + 6);
  buf.writeBigUInt64BE(h.cookie, off + 8);
  writeU64Halves(buf, h.offsetHigh, h.offsetLow, off + 16);
  writeU64(buf, length, off + 24);
}

/** A decoded reply header of any form (client side and tests). */
export interface ReplyHeader {
  readonly kind: 'simple' | 'structured' | 'extended' | 'bad';
  readonly error: number;
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly offset: number;
  /** The extended header's offset with all 64 bits (`offset` rounds above 2^53); 0n for other forms. */
  readonly exactOffset: bigint;
  readonly length: number;
  /** Header size in bytes. */
  readonly size: number;
}

/** Decodes whichever reply header starts at `off`; needs at least 32 bytes, or 16/20 by magic. */
export function decodeReplyHeader(buf: Buffer, off = 0): ReplyHeader {
  const magic = buf.readUInt32BE(off);
  if (magic === NBD_MAGIC.NBD_SIMPLE_REPLY_MAGIC) {
    return {
      kind: 'simple',
      error: buf.readUInt32BE(off + 4),
      flags: 0,
      type: 0,
      cookie: buf.readBigUInt64BE(off + 8),
      offset: 0,
      exactOffset: 0n,
      length: 0,
      size: 16,
    };
  }
  if (magic === NBD_MAGIC.NBD_STRUCTURED_REPLY_MAGIC) {
    return {
      kind: 'structured',
      error: 0,
      flags: buf.readUInt16BE(off + 4),
      type: buf.readUInt16BE(off + 6),
      cookie: buf.readBigUInt64BE(off + 8),
      offset: 0,
      exactOffset: 0n,
      length: buf.readUInt32BE(off + 16),
      size: 20,
    };
  }
  if (magic === NBD_MAGIC.NBD_EXTENDED_REPLY_MAGIC) {
    return {
      kind: 'extended',
      error: 0,
      flags: buf.readUInt16BE(off + 4),
      type: buf.readUInt16BE(off + 6),
      cookie: buf.readBigUInt64BE(off + 8),
      offset: readU64(buf, off + 16),
      exactOffset: buf.readBigUInt64BE(off + 16),
      length: readU64(buf, off + 24),
      size: 32,
    };
  }
  return { kind: 'bad', error: 0, flags: 0, type: 0, cookie: 0n, offset: 0, exactOffset: 0n, length: 0, size: 0 };
}

/** Longest error message sent in an ERROR chunk; longer ones are cut (spec strings SHOULD be <= 256). */
export const MAX_ERROR_MESSAGE = 256;

/**
 * Payload of an ERROR (or, with `offset`, ERROR_OFFSET) chunk: u32 error, u16 message
 * length, message, [u64 offset]. The message is cut at {@link MAX_ERROR_MESSAGE} bytes on
 * a UTF-8 character boundary.
 */
export function encodeErrorPayload(error: number, message: string, offset?: number): Buffer {
  let msg = Buffer.from(message, 'utf8');
  if (msg.length > MAX_ERROR_MESSAGE) {
    let end = MAX_ERROR_MESSAGE;
    while (end > 0 && (msg[end]! & 0xc0) === 0x80) end--;
    msg = msg.subarray(0, end);
  }
  const b = Buffer.alloc(6 + msg.length + (offset === undefined ? 0 : 8));
  b.writeUInt32BE(error, 0);
  b.writeUInt16BE(msg.length, 4);
  msg.copy(b, 6);
  if (offset !== undefined) writeU64(b, offset, 6 + msg.length);
  return b;
}

/** The chunk type of an error payload. */
export function errorChunkType(withOffset: boolean): number {
  return withOffset ? NBD_REPLY_TYPE.NBD_REPLY_TYPE_ERROR_OFFSET : NBD_REPLY_TYPE.NBD_REPLY_TYPE_ERROR;
}

/** OFFSET_HOLE payload: u64 offset, u32 size (12 bytes). */
export function encodeHolePayload(offset: number, size: number): Buffer {
  const b = Buffer.alloc(12);
  writeU64(b, offset, 0);
  b.writeUInt32BE(size, 8);
  return b;
}

/** One block-status descriptor. */
export interface Descriptor {
  readonly length: number;
  readonly flags: number;
}

/** BLOCK_STATUS payload: u32 context id, n x (u32 length, u32 flags). */
export function encodeBlockStatus(contextId: number, descs: readonly Descriptor[]): Buffer {
  const b = Buffer.alloc(4 + 8 * descs.length);
  b.writeUInt32BE(contextId, 0);
  let at = 4;
  for (const d of descs) {
    b.writeUInt32BE(d.length, at);
    b.writeUInt32BE(d.flags, at + 4);
    at += 8;
  }
  return b;
}

/** BLOCK_STATUS_EXT payload: u32 context id, u32 count, n x (u64 length, u64 flags). */
export function encodeBlockStatusExt(contextId: number, descs: readonly Descriptor[]): Buffer {
  const b = Buffer.alloc(8 + 16 * descs.length);
  b.writeUInt32BE(contextId, 0);
  b.writeUInt32BE(descs.length, 4);
  let at = 8;
  for (const d of descs) {
    writeU64(b, d.length, at);
    writeU64(b, d.flags, at + 8);
    at += 16;
  }
  return b;
}

/** The DONE flag, re-exported for brevity at call sites. */
export const DONE = NBD_REPLY_FLAG.NBD_REPLY_FLAG_DONE;
