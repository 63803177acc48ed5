/**
 * The control-socket protocol of `blockgate serve` (the /dev/ggctl of blockgate): the
 * GEOM Gate calls CREATE, MODIFY, DESTROY, CANCEL, START and DONE, plus LIST, STATUS and
 * ABORT, as binary frames on a unix stream socket. Pure codec: byte layouts, no I/O
 * (frames are cut from the stream by frames.ts, on the io FrameReader).
 *
 * Every integer is big-endian. 64-bit fields carry safe integers (<= 2^53 - 1); larger
 * values are a framing error. Errno values are Linux numbers of the one errno table
 * (src/errors/errno.ts), the host's own dialect.
 *
 * Request frame (client -> server): a 16-byte header, then `bodyLength` bytes of body.
 *
 *   0  u32 magic        CONTROL.REQUEST_MAGIC ("bgC1"; the framing revision)
 *   4  u16 version      G_GATE_VERSION of the caller; checked per call (mismatch: EINVAL)
 *   6  u16 op           CONTROL_OP
 *   8  u32 callId       chosen by the client, unique among its calls in flight
 *  12  u32 bodyLength   at most maxRequestBody(op)
 *
 * Request bodies:
 *   CREATE, MODIFY   UTF-8 JSON object (the fields of GateCreateArgs / GateModifyArgs, without version)
 *   LIST, STATUS     empty (or UTF-8 JSON, ignored)
 *   DESTROY          0 i32 unit, 4 u32 force (0 or 1), 8.. name (UTF-8, with unit -2 only)
 *   CANCEL           0 i32 unit, 4 u32 reserved (0), 8 u64 seq (0 = all), 16.. name (UTF-8, with unit -2 only)
 *   START            0 i32 unit, 4 u32 buffer length (a WRITE larger than this yields ENOMEM)
 *   DONE             0 i32 unit, 4 i32 error (0 or an errno; EAGAIN requeues), 8 u64 seq, 16.. data (READ: `length` bytes)
 *   ABORT            0 u32 callId of a START of this connection to interrupt (it fails EINTR)
 *
 * Reply frame (server -> client): a 20-byte header, then `bodyLength` bytes of body.
 *
 *   0  u32 magic        CONTROL.REPLY_MAGIC ("bgR1")
 *   4  u16 version      the server's G_GATE_VERSION
 *   6  u16 op           the request's op
 *   8  u32 callId       the request's callId
 *  12  i32 status       0: the call succeeded; else an errno: the *call* failed (channel 1)
 *  16  u32 bodyLength
 *
 * Reply bodies: status != 0: a UTF-8 message. Status 0: CREATE: JSON {unit, name};
 * LIST: JSON GateInfo[]; STATUS: JSON StatusReport; START: the instance result
 * (channel 2), 32 bytes then the WRITE payload:
 *
 *   0  i32 error        0 (a request), ECANCELED (the gate was destroyed) or ENOMEM (buffer too small)
 *   4  u32 cmd          bio_cmd of the request (BIO_CMD), 0 unless error is 0
 *   8  u64 seq          the request's sequence number (from 1), 0 unless error is 0
 *  16  u64 offset
 *  24  u64 length       the request's length; with ENOMEM the buffer length needed
 *  32  ..  data         WRITE only: exactly `length` bytes
 *
 * Other ops: an empty body. So the two error channels never mix: a call failure is the
 * header's status; a gate condition is a successful START whose result has `error` set.
 *
 * Over 500 lines: one encoder and one decoder per call and reply of a versioned binary
 * protocol, each beside the struct layout it reads (pure functions, no state).
 */
import { readU64Exact, writeU64Exact } from '../../io/wire.js';
import { BlockError, codeFromLinux, linuxErrno } from '../../errors/index.js';
import { BIO_CMD, GATE, type GateCommand, type GateStartResult } from '../index.js';

export const CONTROL = {
  /** "bgC1": a control request frame of framing revision 1. A new layout gets a new magic. */
  REQUEST_MAGIC: 0x62674331,
  /** "bgR1": a control reply frame. */
  REPLY_MAGIC: 0x62675231,
  REQUEST_HEADER_SIZE: 16,
  REPLY_HEADER_SIZE: 20,
  /** Size of the fixed part of a START result. */
  START_RESULT_SIZE: 32,
  /** Size of the fixed part of a DONE request. */
  DONE_FIXED_SIZE: 16,
  DESTROY_FIXED_SIZE: 8,
  CANCEL_FIXED_SIZE: 16,
  START_SIZE: 8,
  ABORT_SIZE: 4,
  /**
   * Largest payload of one READ (DONE data) or WRITE (START data): the NBD server's
   * maximum payload (DEFAULT_LIMITS.maxPayload, 32 MiB), so any request an NBD client
   * may send through a gate fits in one frame.
   */
  MAX_DATA: 32 * 1024 * 1024,
  /**
   * Largest JSON body. LIST and STATUS are the big ones: 256 units with 2 KiB of info
   * each come to about 600 KiB; 4 MiB leaves room for many exports and sessions.
   */
  MAX_JSON: 4 * 1024 * 1024,
  /** Longest error message sent in a failed reply; longer ones are cut. */
  MAX_MESSAGE: 4096,
  /** Longest name in DESTROY/CANCEL: NAME_MAX less the NUL, as in FreeBSD's structs. */
  MAX_NAME: GATE.NAME_MAX - 1,
  /**
   * Calls one connection may have in flight before the server stops reading from it.
   * Handlers keep a few STARTs outstanding each; this bounds a misbehaving client.
   */
  MAX_CALLS_IN_FLIGHT: 4096,
} as const;

/**
 * Control ops. The six gate calls keep FreeBSD's ioctl numbers (G_GATE_CMD_CREATE = 0
 * ... G_GATE_CMD_DONE = 5, A.1); LIST, STATUS and ABORT are blockgate's own.
 */
export const CONTROL_OP = {
  CREATE: 0,
  MODIFY: 1,
  DESTROY: 2,
  CANCEL: 3,
  START: 4,
  DONE: 5,
  LIST: 16,
  STATUS: 17,
  ABORT: 18,
} as const;

export type ControlOp = (typeof CONTROL_OP)[keyof typeof CONTROL_OP];

const OP_NAMES = new Map<number, string>(Object.entries(CONTROL_OP).map(([k, v]) => [v, k]));

/** The name of an op for logs, e.g. "START", or "op 99". */
export function controlOpName(op: number): string {
  return OP_NAMES.get(op) ?? `op ${op}`;
}

/** True if `op` is one of CONTROL_OP. */
export function isControlOp(op: number): op is ControlOp {
  return OP_NAMES.has(op);
}

/**
 * A frame that breaks the layout: bad magic, a body over its limit, a fixed body of the
 * wrong size, bad UTF-8 or JSON, a 64-bit value over 2^53 - 1. The peer and we no
 * longer agree on where frames start, so the connection is closed.
 */
export class ControlFrameError extends Error {
  override readonly name = 'ControlFrameError';
}

export interface RequestHeader {
  readonly version: number;
  readonly op: number;
  readonly callId: number;
  readonly bodyLength: number;
}

export interface ReplyHeader {
  readonly version: number;
  readonly op: number;
  readonly callId: number;
  /** 0, or the Linux errno of a failed call. */
  readonly status: number;
  readonly bodyLength: number;
}

/** A decoded request. Field values are checked by the server, not here (EINVAL replies). */
export type ControlRequest = { readonly version: number; readonly callId: number } & (
  | { readonly op: 'create' | 'modify' | 'list' | 'status'; readonly body: unknown }
  | { readonly op: 'destroy'; readonly unit: number; readonly force: boolean; readonly name: string | undefined }
  | { readonly op: 'cancel'; readonly unit: number; readonly seq: number; readonly name: string | undefined }
  | { readonly op: 'start'; readonly unit: number; readonly length: number }
  | {
      readonly op: 'done';
      readonly unit: number;
      readonly seq: number;
      /** Raw Linux errno; the server maps it through the errno table (unknown: EINVAL). */
      readonly errno: number;
      readonly data: Buffer | undefined;
    }
  | { readonly op: 'abort'; readonly target: number }
  /** A well-framed request of an op this revision does not know (answered EOPNOTSUPP). */
  | { readonly op: 'unknown'; readonly code: number }
);

/** A decoded reply. */
export type ControlReply = { readonly version: number; readonly op: number; readonly callId: number } & (
  | { readonly kind: 'error'; readonly status: number; readonly message: string }
  | { readonly kind: 'empty' }
  | { readonly kind: 'json'; readonly body: unknown }
  | { readonly kind: 'start'; readonly result: GateStartResult }
);

const utf8 = new TextDecoder('utf-8', { fatal: true });

function decodeUtf8(b: Buffer, what: string): string {
  try {
    return utf8.decode(b);
  } catch {
    throw new ControlFrameError(`${what} is not valid UTF-8`);
  }
}

function decodeJson(b: Buffer, what: string): unknown {
  if (b.length === 0) return undefined;
  const text = decodeUtf8(b, what);
  try {
    return JSON.parse(text) as unknown;
  } catch (e) {
    throw new ControlFrameError(`${what} is not JSON: ${(e as Error).message}`);
  }
}

/** A u64 field that must be a safe integer (sizes, offsets): larger is a malformed frame. */
function readU64(b: Buffer, at: number, what: string): number {
  const v = readU64Exact(b, at);
  if (typeof v === 'bigint') throw new ControlFrameError(`${what} is larger than 2^53 - 1`);
  return v;
}

function writeU64(b: Buffer, at: number, v: number): void {
  writeU64Exact(b, v, at);
}

function checkU32(v: number, what: string): void {
  if (!Number.isInteger(v) || v < 0 || v > 0xffff_ffff) throw new RangeError(`${what}: ${v} is not a u32`);
}

function checkI32(v: number, what: string): void {
  if (!Number.isInteger(v) || v < -0x8000_0000 || v > 0x7fff_ffff) throw new RangeError(`${what}: ${v} is not an i32`);
}

/** The largest body a request of `op` may have. Unknown ops may carry up to MAX_JSON (skipped). */
export function maxRequestBody(op: number): number {
  switch (op) {
    case CONTROL_OP.START:
      return CONTROL.START_SIZE;
    case CONTROL_OP.ABORT:
      return CONTROL.ABORT_SIZE;
    case CONTROL_OP.DESTROY:
      return CONTROL.DESTROY_FIXED_SIZE + CONTROL.MAX_NAME;
    case CONTROL_OP.CANCEL:
      return CONTROL.CANCEL_FIXED_SIZE + CONTROL.MAX_NAME;
    case CONTROL_OP.DONE:
      return CONTROL.DONE_FIXED_SIZE + CONTROL.MAX_DATA;
    default:
      return CONTROL.MAX_JSON;
  }
}

/** The largest body a reply to `op` may have. */
export function maxReplyBody(op: number): number {
  if (op === CONTROL_OP.START) return CONTROL.START_RESULT_SIZE + CONTROL.MAX_DATA;
  return Math.max(CONTROL.MAX_JSON, CONTROL.MAX_MESSAGE);
}

// ---------------------------------------------------------------------------------
// Headers

/** The fields every header begins with, after its magic. */
type HeaderStart = Pick<RequestHeader, 'version' | 'op' | 'callId'>;

/** A header buffer of `size` bytes with its common start filled in: magic, version, op, callId. */
function encodeHeaderStart(size: number, magic: number, h: HeaderStart): Buffer {
  const b = Buffer.alloc(size);
  b.writeUInt32BE(magic, 0);
  b.writeUInt16BE(h.version & 0xffff, 4);
  b.writeUInt16BE(h.op, 6);
  b.writeUInt32BE(h.callId, 8);
  return b;
}

/** Reads the common start of a header at `at`; throws ControlFrameError when the magic is not `magic`. */
function decodeHeaderStart(b: Buffer, at: number, magic: number, kind: 'request' | 'reply'): HeaderStart {
  const got = b.readUInt32BE(at);
  if (got !== magic) {
    throw new ControlFrameError(`bad ${kind} magic 0x${got.toString(16).padStart(8, '0')}`);
  }
  return {
    version: b.readUInt16BE(at + 4),
    op: b.readUInt16BE(at + 6),
    callId: b.readUInt32BE(at + 8),
  };
}

export function encodeRequestHeader(h: RequestHeader): Buffer {
  checkU32(h.callId, 'callId');
  checkU32(h.bodyLength, 'bodyLength');
  const b = encodeHeaderStart(CONTROL.REQUEST_HEADER_SIZE, CONTROL.REQUEST_MAGIC, h);
  b.writeUInt32BE(h.bodyLength, 12);
  return b;
}

/** Decodes a request header at `at`; throws ControlFrameError on a bad magic or oversized body. */
export function decodeRequestHeader(b: Buffer, at = 0): RequestHeader {
  const h = {
    ...decodeHeaderStart(b, at, CONTROL.REQUEST_MAGIC, 'request'),
    bodyLength: b.readUInt32BE(at + 12),
  };
  if (h.bodyLength > maxRequestBody(h.op)) {
    throw new ControlFrameError(`${controlOpName(h.op)} body of ${h.bodyLength} bytes exceeds ${maxRequestBody(h.op)}`);
  }
  return h;
}

export function encodeReplyHeader(h: ReplyHeader): Buffer {
  checkU32(h.callId, 'callId');
  checkU32(h.bodyLength, 'bodyLength');
  checkI32(h.status, 'status');
  const b = encodeHeaderStart(CONTROL.REPLY_HEADER_SIZE, CONTROL.REPLY_MAGIC, h);
  b.writeInt32BE(h.status, 12);
  b.writeUInt32BE(h.bodyLength, 16);
  return b;
}

export function decodeReplyHeader(b: Buffer, at = 0): ReplyHeader {
  const h = {
    ...decodeHeaderStart(b, at, CONTROL.REPLY_MAGIC, 'reply'),
    status: b.readInt32BE(at + 12),
    bodyLength: b.readUInt32BE(at + 16),
  };
  if (h.bodyLength > maxReplyBody(h.op)) {
    throw new ControlFrameError(`${controlOpName(h.op)} reply body of ${h.bodyLength} bytes exceeds ${maxReplyBody(h.op)}`);
  }
  return h;
}

// ---------------------------------------------------------------------------------
// Requests

/** What a client sends; encodeRequest turns it into frame chunks (header first). */
export type ControlRequestInput = { readonly version: number; readonly callId: number } & (
  | { readonly op: 'create' | 'modify'; readonly body: object }
  | { readonly op: 'list' | 'status' }
  | { readonly op: 'destroy'; readonly unit: number; readonly force: boolean; readonly name?: string | undefined }
  | { readonly op: 'cancel'; readonly unit: number; readonly seq: number; readonly name?: string | undefined }
  | { readonly op: 'start'; readonly unit: number; readonly length: number }
  | {
      readonly op: 'done';
      readonly unit: number;
      readonly seq: number;
      readonly errno: number;
      readonly data?: Buffer | undefined;
    }
  | { readonly op: 'abort'; readonly target: number }
);

function nameBytes(name: string | undefined): Buffer {
  const b = Buffer.from(name ?? '', 'utf8');
  if (b.length > CONTROL.MAX_NAME) throw new BlockError('EINVAL', `name is longer than ${CONTROL.MAX_NAME} bytes`);
  return b;
}

/**
 * Encodes a request as the chunks to write in order (header first; a DONE payload is a
 * separate chunk so it is never copied). Throws BlockError EINVAL for a value the layout
 * cannot carry (a name or payload over its limit, an out-of-range integer).
 */
export function encodeRequest(r: ControlRequestInput): Buffer[] {
  try {
    let op: ControlOp;
    let body: Buffer[];
    switch (r.op) {
      case 'create':
      case 'modify': {
        op = r.op === 'create' ? CONTROL_OP.CREATE : CONTROL_OP.MODIFY;
        const json = Buffer.from(JSON.stringify(r.body), 'utf8');
        if (json.length > CONTROL.MAX_JSON) throw new BlockError('EINVAL', `${r.op}: arguments exceed ${CONTROL.MAX_JSON} bytes`);
        body = [json];
        break;
      }
      case 'list':
      case 'status':
        op = r.op === 'list' ? CONTROL_OP.LIST : CONTROL_OP.STATUS;
        body = [];
        break;
      case 'destroy': {
        op = CONTROL_OP.DESTROY;
        const f = Buffer.alloc(CONTROL.DESTROY_FIXED_SIZE);
        checkI32(r.unit, 'unit');
        f.writeInt32BE(r.unit, 0);
        f.writeUInt32BE(r.force ? 1 : 0, 4);
        body = [f, nameBytes(r.name)];
        break;
      }
      case 'cancel': {
        op = CONTROL_OP.CANCEL;
        const f = Buffer.alloc(CONTROL.CANCEL_FIXED_SIZE);
        checkI32(r.unit, 'unit');
        f.writeInt32BE(r.unit, 0);
        writeU64(f, 8, r.seq);
        body = [f, nameBytes(r.name)];
        break;
      }
      case 'start': {
        op = CONTROL_OP.START;
        const f = Buffer.alloc(CONTROL.START_SIZE);
        checkI32(r.unit, 'unit');
        checkU32(r.length, 'buffer length');
        f.writeInt32BE(r.unit, 0);
        f.writeUInt32BE(r.length, 4);
        body = [f];
        break;
      }
      case 'done': {
        op = CONTROL_OP.DONE;
        const f = Buffer.alloc(CONTROL.DONE_FIXED_SIZE);
        checkI32(r.unit, 'unit');
        checkI32(r.errno, 'error');
        f.writeInt32BE(r.unit, 0);
        f.writeInt32BE(r.errno, 4);
        writeU64(f, 8, r.seq);
        if (r.data !== undefined && r.data.length > CONTROL.MAX_DATA) {
          throw new BlockError('EINVAL', `done: ${r.data.length} bytes of data exceed ${CONTROL.MAX_DATA}`);
        }
        body = r.data !== undefined && r.data.length > 0 ? [f, r.data] : [f];
        break;
      }
      case 'abort': {
        op = CONTROL_OP.ABORT;
        const f = Buffer.alloc(CONTROL.ABORT_SIZE);
        checkU32(r.target, 'target');
        f.writeUInt32BE(r.target, 0);
        body = [f];
        break;
      }
    }
    const bodyLength = body.reduce((n, b) => n + b.length, 0);
    return [encodeRequestHeader({ version: r.version, op, callId: r.callId, bodyLength }), ...body];
  } catch (e) {
    if (e instanceof RangeError) throw new BlockError('EINVAL', `${r.op}: ${e.message}`, { cause: e });
    throw e;
  }
}

/** Decodes a request body (already bounded by maxRequestBody). Throws ControlFrameError on a layout violation. */
export function decodeRequest(h: RequestHeader, body: Buffer): ControlRequest {
  const base = { version: h.version, callId: h.callId };
  const fixed = (n: number, exact: boolean): void => {
    if (exact ? body.length !== n : body.length < n) {
      throw new ControlFrameError(`${controlOpName(h.op)} body is ${body.length} bytes, expected ${exact ? '' : 'at least '}${n}`);
    }
  };
  const optName = (at: number): string | undefined =>
    body.length > at ? decodeUtf8(body.subarray(at), `${controlOpName(h.op)} name`) : undefined;
  switch (h.op) {
    case CONTROL_OP.CREATE:
      return { ...base, op: 'create', body: decodeJson(body, 'CREATE body') };
    case CONTROL_OP.MODIFY:
      return { ...base, op: 'modify', body: decodeJson(body, 'MODIFY body') };
    case CONTROL_OP.LIST:
      return { ...base, op: 'list', body: decodeJson(body, 'LIST body') };
    case CONTROL_OP.STATUS:
      return { ...base, op: 'status', body: decodeJson(body, 'STATUS body') };
    case CONTROL_OP.DESTROY: {
      fixed(CONTROL.DESTROY_FIXED_SIZE, false);
      const force = body.readUInt32BE(4);
      if (force > 1) throw new ControlFrameError(`DESTROY force must be 0 or 1, got ${force}`);
      return { ...base, op: 'destroy', unit: body.readInt32BE(0), force: force === 1, name: optName(CONTROL.DESTROY_FIXED_SIZE) };
    }
    case CONTROL_OP.CANCEL:
      fixed(CONTROL.CANCEL_FIXED_SIZE, false);
      return {
        ...base,
        op: 'cancel',
        unit: body.readInt32BE(0),
        seq: readU64(body, 8, 'CANCEL seq'),
        name: optName(CONTROL.CANCEL_FIXED_SIZE),
      };
    case CONTROL_OP.START:
      fixed(CONTROL.START_SIZE, true);
      return { ...base, op: 'start', unit: body.readInt32BE(0), length: body.readUInt32BE(4) };
    case CONTROL_OP.DONE:
      fixed(CONTROL.DONE_FIXED_SIZE, false);
      return {
        ...base,
        op: 'done',
        unit: body.readInt32BE(0),
        errno: body.readInt32BE(4),
        seq: readU64(body, 8, 'DONE seq'),
        data: body.length > CONTROL.DONE_FIXED_SIZE ? body.subarray(CONTROL.DONE_FIXED_SIZE) : undefined,
      };
    case CONTROL_OP.ABORT:
      fixed(CONTROL.ABORT_SIZE, true);
      return { ...base, op: 'abort', target: body.readUInt32BE(0) };
    default:
      return { ...base, op: 'unknown', code: h.op };
  }
}

// ---------------------------------------------------------------------------------
// Replies

function replyHeader(op: number, callId: number, status: number, bodyLength: number): Buffer {
  return encodeReplyHeader({ version: GATE.VERSION, op, callId, status, bodyLength });
}

/** A failed call: the status is the errno of `e`, the body its message (cut to MAX_MESSAGE bytes). */
export function encodeErrorReply(op: number, callId: number, e: BlockError): Buffer[] {
  let msg = Buffer.from(e.message, 'utf8');
  if (msg.length > CONTROL.MAX_MESSAGE) {
    // Cut on a character boundary so the peer's strict UTF-8 decoder accepts it.
    let end = CONTROL.MAX_MESSAGE;
    while (end > 0 && (msg[end]! & 0xc0) === 0x80) end--;
    msg = msg.subarray(0, end);
  }
  return [replyHeader(op, callId, e.errno, msg.length), msg];
}

/** A successful call without a result (MODIFY, DESTROY, CANCEL, DONE, ABORT). */
export function encodeEmptyReply(op: number, callId: number): Buffer[] {
  return [replyHeader(op, callId, 0, 0)];
}

/** A successful call with a JSON result (CREATE, LIST, STATUS). A result over MAX_JSON fails the call EOVERFLOW. */
export function encodeJsonReply(op: number, callId: number, value: unknown): Buffer[] {
  const json = Buffer.from(JSON.stringify(value) ?? 'null', 'utf8');
  if (json.length > CONTROL.MAX_JSON) {
    return encodeErrorReply(op, callId, new BlockError('EOVERFLOW', `result of ${json.length} bytes exceeds ${CONTROL.MAX_JSON}`));
  }
  return [replyHeader(op, callId, 0, json.length), json];
}

/**
 * A successful START: the instance result. A WRITE payload follows as its own chunk
 * (the requester's buffer, not copied). A WRITE larger than MAX_DATA cannot be framed;
 * the caller must not pass one (the server answers ENOMEM instead, see ControlServer).
 */
export function encodeStartReply(callId: number, r: GateStartResult): Buffer[] {
  const f = Buffer.alloc(CONTROL.START_RESULT_SIZE);
  if (r.error === 'ECANCELED') {
    f.writeInt32BE(linuxErrno('ECANCELED'), 0);
    return [replyHeader(CONTROL_OP.START, callId, 0, f.length), f];
  }
  if (r.error === 'ENOMEM') {
    f.writeInt32BE(linuxErrno('ENOMEM'), 0);
    writeU64(f, 24, r.length);
    return [replyHeader(CONTROL_OP.START, callId, 0, f.length), f];
  }
  f.writeUInt32BE(BIO_CMD[r.cmd], 4);
  writeU64(f, 8, r.seq);
  writeU64(f, 16, r.offset);
  writeU64(f, 24, r.length);
  if (r.cmd === 'write') {
    const data = r.data!.subarray(0, r.length);
    if (data.length !== r.length) throw new RangeError(`start: write payload is ${data.length} of ${r.length} bytes`);
    if (data.length > CONTROL.MAX_DATA) throw new RangeError(`start: write payload exceeds ${CONTROL.MAX_DATA}`);
    return [replyHeader(CONTROL_OP.START, callId, 0, f.length + data.length), f, data];
  }
  return [replyHeader(CONTROL_OP.START, callId, 0, f.length), f];
}

const CMD_BY_BIO = new Map<number, GateCommand>(
  (Object.entries(BIO_CMD) as [GateCommand, number][]).map(([name, v]) => [v, name]),
);

function decodeStartResult(body: Buffer): GateStartResult {
  if (body.length < CONTROL.START_RESULT_SIZE) {
    throw new ControlFrameError(`START result is ${body.length} bytes, expected at least ${CONTROL.START_RESULT_SIZE}`);
  }
  const errno = body.readInt32BE(0);
  const length = readU64(body, 24, 'START length');
  if (errno !== 0) {
    if (body.length !== CONTROL.START_RESULT_SIZE) throw new ControlFrameError('START result with an error carries data');
    const code = codeFromLinux(errno);
    if (code === 'ECANCELED') return { error: 'ECANCELED' };
    if (code === 'ENOMEM') return { error: 'ENOMEM', length };
    throw new ControlFrameError(`START result error ${errno} is neither ECANCELED nor ENOMEM`);
  }
  const cmd = CMD_BY_BIO.get(body.readUInt32BE(4));
  if (cmd === undefined) throw new ControlFrameError(`START result has unknown bio_cmd ${body.readUInt32BE(4)}`);
  const seq = readU64(body, 8, 'START seq');
  const offset = readU64(body, 16, 'START offset');
  const dataLength = body.length - CONTROL.START_RESULT_SIZE;
  if (dataLength !== (cmd === 'write' ? length : 0)) {
    throw new ControlFrameError(`START ${cmd} of ${length} bytes carries ${dataLength} bytes of data`);
  }
  const out = { error: 0 as const, seq, cmd, offset, length };
  return cmd === 'write' ? { ...out, data: body.subarray(CONTROL.START_RESULT_SIZE) } : out;
}

/** Decodes a reply body (already bounded by maxReplyBody). Throws ControlFrameError on a layout violation. */
export function decodeReply(h: ReplyHeader, body: Buffer): ControlReply {
  const base = { version: h.version, op: h.op, callId: h.callId };
  if (h.status !== 0) return { ...base, kind: 'error', status: h.status, message: decodeUtf8(body, 'error message') };
  switch (h.op) {
    case CONTROL_OP.START:
      return { ...base, kind: 'start', result: decodeStartResult(body) };
    case CONTROL_OP.CREATE:
    case CONTROL_OP.LIST:
    case CONTROL_OP.STATUS:
      return { ...base, kind: 'json', body: decodeJson(body, `${controlOpName(h.op)} result`) };
    default:
      if (body.length !== 0) throw new ControlFrameError(`${controlOpName(h.op)} reply carries ${body.length} unexpected bytes`);
      return { ...base, kind: 'empty' };
  }
}
