/**
 * One NBD client connection in transmission: requests out (many in flight, corked per
 * event-loop turn), replies in, matched by cookie, in any order, in the mode the
 * handshake agreed (simple, structured or extended). READ data goes straight from the
 * socket's chunks into the caller's buffer (OFFSET_DATA at its offset, OFFSET_HOLE as
 * zeroes); BLOCK_STATUS descriptors become extents; error chunks become BlockErrors with
 * the server's message.
 *
 * The server is not trusted: a chunk for an unknown cookie, data outside its request, a
 * payload longer than MAX_CHUNK_PAYLOAD (other than READ data, which goes to the caller's
 * buffer) or a bad magic ends the connection with EPROTO for every request in flight.
 * A lost connection fails them with ECONNRESET: a transport failure, not a device error.
 */
import type { Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import { lendReadBuffers } from '../io/lent-buffers.js';
import { BlockError, fromNbdError } from '../errors/index.js';
import { MODE, NBD_CMD, NBD_CMD_FLAG, NBD_MAGIC, NBD_REPLY_FLAG, NBD_REPLY_TYPE, NBD_SIZE, commandName, type Mode } from './constants.js';
import { writeU64 } from '../io/wire.js';

/** The largest non-data chunk payload accepted (error messages, block status descriptors). */
export const MAX_CHUNK_PAYLOAD = 8 * 1024 * 1024;

/** One extent of a metadata context: `flags` are the context's (base:allocation: NBD_STATE_HOLE | NBD_STATE_ZERO). */
export interface Extent {
  readonly offset: number;
  readonly length: number;
  readonly flags: number;
}

/** A request as the connection sends it. */
export interface WireRequest {
  readonly type: number;
  readonly flags: number;
  readonly offset: number;
  readonly length: number;
  /** WRITE payload (not copied: the caller keeps it unchanged until the request ends). */
  readonly payload?: Uint8Array | undefined;
  /** READ target, `length` bytes. */
  readonly target?: Uint8Array | undefined;
  /** BLOCK_STATUS: the id of the context whose extents are wanted. */
  readonly contextId?: number | undefined;
}

/**
 * READ data of at least this many bytes still to come is read by the kernel straight into
 * the caller's buffer (no copy in JS); less goes through the receive buffer.
 */
export const DIRECT_READ_MINIMUM = 16 * 1024;
/** The receive buffer of a plain (not TLS) connection, for headers and small payloads. */
export const CLIENT_RECEIVE_BUFFER = 64 * 1024;

/** What a request resolves with: extents for BLOCK_STATUS, else nothing. */
export type WireResult = Extent[] | undefined;

interface Pending {
  readonly req: WireRequest;
  readonly resolve: (r: WireResult) => void;
  readonly reject: (e: BlockError) => void;
  error: BlockError | null;
  extents: Extent[] | null;
  /** Set when the caller gave up: data for it is read and dropped, not written to its buffer. */
  abandoned: boolean;
  /** READ: bytes of the range the data and hole chunks (or the simple reply) have described so far. */
  covered: number;
  /** Called once when the request leaves the connection (its last reply, or the connection's end), abandoned or not. */
  readonly onEnd: (() => void) | undefined;
  /**
   * True if the caller may abandon it (it gave a signal): its data then never goes
   * straight from the kernel into its buffer, where an abort could not stop it.
   */
  readonly abortable: boolean;
}

const S = { HEADER: 0, DATA: 1, PAYLOAD: 2, DATA_OFFSET: 3, CLOSED: 4 } as const;
type State = (typeof S)[keyof typeof S];

const T = NBD_REPLY_TYPE;
const M = NBD_MAGIC;

export class NbdConnection {
  readonly #socket: Socket;
  readonly #mode: Mode;
  readonly #pending = new Map<number, Pending>();
  #nextCookie = 1;
  #corked = false;
  #closed: BlockError | null = null;
  readonly #onLost: (e: BlockError) => void;

  // Reply parsing.
  #state: State = S.HEADER;
  readonly #rx = Buffer.allocUnsafe(CLIENT_RECEIVE_BUFFER);
  /** The lent read in progress goes straight into the current READ's target. */
  #direct = false;
  readonly #head = Buffer.alloc(NBD_SIZE.EXTENDED_REQUEST);
  #headFill = 0;
  #headNeed = 4;
  #current: Pending | null = null;
  #cookie = 0;
  #chunkFlags = 0;
  #chunkType = 0;
  /** DATA: where the next data byte goes in the target, and how many remain. */
  #dataPos = 0;
  #dataLeft = 0;
  /** PAYLOAD: a non-data chunk's payload being collected. */
  #payload: Buffer | null = null;
  #payloadFill = 0;

  /**
   * `rest`: bytes already read past the handshake. `onLost` is called once when the
   * connection ends other than by close().
   */
  constructor(socket: Socket, mode: Mode, rest: Buffer, onLost: (e: BlockError) => void) {
    this.#mode = mode;
    this.#onLost = onLost;
    socket.setNoDelay(true);
    // Plain TCP and unix sockets read into buffers this connection chooses: READ data
    // goes straight into the caller's buffer (src/io/lent-buffers.ts; a TLS socket
    // decrypts into buffers of its own, so it keeps 'data' events).
    socket.pause();
    const lent =
      socket instanceof TLSSocket ? null : lendReadBuffers(socket, () => this.#nextReadBuffer(), (n, buf) => this.#onLentRead(n, buf as Buffer));
    this.#socket = lent ?? socket;
    socket = this.#socket;
    if (!lent) {
      socket.on('data', (b: Buffer) => this.#parse(b));
      socket.resume();
    }
    socket.on('error', (e) => this.#lose(new BlockError('ECONNRESET', `connection to the server failed: ${e.message}`, { cause: e })));
    socket.on('close', () => this.#lose(new BlockError('ECONNRESET', 'the server closed the connection')));
    if (rest.length > 0) this.#parse(rest);
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.#pending.size;
  }

  /** Null while usable; else why it is not. */
  get closedBy(): BlockError | null {
    return this.#closed;
  }

  /**
   * Sends a request; resolves when its (last) reply arrives. `signal` abandons the wait,
   * not the request: the request stays on the wire until its reply comes, and `onEnd`
   * runs then (or when the connection ends, or at once if the request is not sent), so
   * the caller can keep counting it as in flight until the server is done with it.
   */
  send(req: WireRequest, signal?: AbortSignal, onEnd?: () => void): Promise<WireResult> {
    if (this.#closed) {
      onEnd?.();
      return Promise.reject(this.#closed);
    }
    if (signal?.aborted) {
      // Aborted before it went out (between leaving the client's queue and here): never sent.
      onEnd?.();
      return Promise.reject(new BlockError('ECANCELED', `${commandName(req.type)} aborted before it was sent`, { cause: signal.reason }));
    }
    let cookie = this.#nextCookie;
    while (this.#pending.has(cookie)) cookie = (cookie % 0xffffffff) + 1;
    this.#nextCookie = (cookie % 0xffffffff) + 1;
    return new Promise<WireResult>((resolve, reject) => {
      let settle = { resolve, reject };
      if (signal) {
        const onAbort = () => {
          p.abandoned = true;
          reject(new BlockError('ECANCELED', `${commandName(req.type)} aborted`, { cause: signal.reason }));
        };
        signal.addEventListener('abort', onAbort, { once: true });
        // The listener goes when the request ends, so a long-lived signal does not collect them.
        settle = {
          resolve: (r) => {
            signal.removeEventListener('abort', onAbort);
            resolve(r);
          },
          reject: (e) => {
            signal.removeEventListener('abort', onAbort);
            reject(e);
          },
        };
      }
      const p: Pending = { req, ...settle, error: null, extents: null, abandoned: false, covered: 0, onEnd, abortable: signal !== undefined };
      this.#pending.set(cookie, p);
      this.#write(cookie, req);
    });
  }

  #write(cookie: number, req: WireRequest): void {
    const ext = this.#mode === MODE.EXTENDED;
    const h = Buffer.allocUnsafe(ext ? NBD_SIZE.EXTENDED_REQUEST : NBD_SIZE.COMPACT_REQUEST);
    h.writeUInt32BE(ext ? M.NBD_EXTENDED_REQUEST_MAGIC : M.NBD_REQUEST_MAGIC, 0);
    // Extended headers: a payload is announced by PAYLOAD_LEN (the length is then its size).
    const flags = ext && req.type === NBD_CMD.NBD_CMD_WRITE ? req.flags | NBD_CMD_FLAG.NBD_CMD_FLAG_PAYLOAD_LEN : req.flags;
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(req.type, 6);
    h.writeUInt32BE(0, 8);
    h.writeUInt32BE(cookie, 12);
    writeU64(h, req.offset, 16);
    if (ext) writeU64(h, req.length, 24);
    else h.writeUInt32BE(req.length, 24);
    if (!this.#corked) {
      this.#corked = true;
      this.#socket.cork();
      process.nextTick(this.#uncork);
    }
    this.#socket.write(h);
    if (req.payload && req.payload.length > 0) this.#socket.write(req.payload);
  }

  readonly #uncork = (): void => {
    this.#corked = false;
    this.#socket.uncork();
  };

  /** Sends NBD_CMD_DISC (no reply) and closes once the server has the bytes. Requests in flight fail. */
  close(): void {
    if (this.#closed) return;
    this.#closed = new BlockError('ENOTCONN', 'the connection was closed');
    if (!this.#socket.destroyed) {
      this.#write(0, { type: NBD_CMD.NBD_CMD_DISC, flags: 0, offset: 0, length: 0 });
      this.#socket.end();
    }
    this.#failAll(this.#closed);
  }

  /** Ends the connection at once. */
  destroy(error: BlockError): void {
    this.#lose(error);
    this.#socket.destroy();
  }

  #lose(e: BlockError): void {
    if (this.#closed) return;
    this.#closed = e;
    this.#state = S.CLOSED;
    this.#failAll(e);
    this.#onLost(e);
  }

  #failAll(e: BlockError): void {
    const all = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of all) {
      p.onEnd?.();
      if (!p.abandoned) p.reject(e);
    }
  }

  #protocolError(msg: string): void {
    const e = new BlockError('EPROTO', `protocol error from the server: ${msg}`);
    this.#lose(e);
    this.#socket.destroy();
  }

  // -------------------------------------------------------------------------------
  // Replies

  #parse(chunk: Buffer): void {
    let pos = 0;
    const end = chunk.length;
    while (pos < end) {
      switch (this.#state) {
        case S.CLOSED:
          return;
        case S.HEADER: {
          const n = Math.min(this.#headNeed - this.#headFill, end - pos);
          chunk.copy(this.#head, this.#headFill, pos, pos + n);
          this.#headFill += n;
          pos += n;
          if (this.#headFill < this.#headNeed) break;
          if (this.#headNeed === 4) {
            const size = this.#headerSize(this.#head.readUInt32BE(0));
            if (size === 0) return this.#protocolError(`bad reply magic 0x${this.#head.readUInt32BE(0).toString(16)}`);
            this.#headNeed = size;
            break;
          }
          this.#onHeader();
          break;
        }
        case S.DATA_OFFSET: {
          // The 8-byte offset that opens an OFFSET_DATA payload, read into the header scratch.
          const n = Math.min(8 - this.#headFill, end - pos);
          chunk.copy(this.#head, this.#headFill, pos, pos + n);
          this.#headFill += n;
          pos += n;
          if (this.#headFill === 8) this.#onDataOffset();
          break;
        }
        case S.DATA: {
          const n = Math.min(this.#dataLeft, end - pos);
          const p = this.#current!;
          if (!p.abandoned && p.req.target) {
            const t = p.req.target;
            t.set(chunk.subarray(pos, pos + n), this.#dataPos);
          }
          this.#dataPos += n;
          this.#dataLeft -= n;
          pos += n;
          if (this.#dataLeft === 0) this.#chunkDone();
          break;
        }
        case S.PAYLOAD: {
          const buf = this.#payload!;
          const n = Math.min(buf.length - this.#payloadFill, end - pos);
          chunk.copy(buf, this.#payloadFill, pos, pos + n);
          this.#payloadFill += n;
          pos += n;
          if (this.#payloadFill === buf.length) this.#onPayload(buf);
          break;
        }
      }
    }
  }

  /** Where the next lent read goes: into the READ target when enough of its data is due, else the receive buffer. */
  #nextReadBuffer(): Uint8Array {
    const p = this.#current;
    if (this.#state === S.DATA && p !== null && !p.abandoned && !p.abortable && p.req.target && this.#dataLeft >= DIRECT_READ_MINIMUM) {
      this.#direct = true;
      return p.req.target.subarray(this.#dataPos, this.#dataPos + this.#dataLeft);
    }
    this.#direct = false;
    return this.#rx;
  }

  #onLentRead(n: number, buf: Buffer): void {
    if (!this.#direct) return this.#parse(buf.subarray(0, n));
    // The bytes are already where they belong.
    this.#direct = false;
    this.#dataPos += n;
    this.#dataLeft -= n;
    if (this.#dataLeft === 0) this.#chunkDone();
  }

  #headerSize(magic: number): number {
    switch (this.#mode) {
      case MODE.EXTENDED:
        return magic === M.NBD_EXTENDED_REPLY_MAGIC ? NBD_SIZE.EXTENDED_REQUEST : 0;
      case MODE.STRUCTURED:
        return magic === M.NBD_STRUCTURED_REPLY_MAGIC ? 20 : magic === M.NBD_SIMPLE_REPLY_MAGIC ? 16 : 0;
      default:
        return magic === M.NBD_SIMPLE_REPLY_MAGIC ? 16 : 0;
    }
  }

  #expectHeader(): void {
    this.#state = S.HEADER;
    this.#headFill = 0;
    this.#headNeed = 4;
  }

  #onHeader(): void {
    const h = this.#head;
    const magic = h.readUInt32BE(0);
    const cookieHigh = h.readUInt32BE(8);
    const cookie = h.readUInt32BE(12);
    const p = cookieHigh === 0 ? this.#pending.get(cookie) : undefined;
    if (!p) return this.#protocolError(`a reply for a cookie not in flight (${cookieHigh}:${cookie})`);
    this.#current = p;
    this.#cookie = cookie;
    if (magic === M.NBD_SIMPLE_REPLY_MAGIC) {
      const error = h.readUInt32BE(4);
      if (p.req.type === NBD_CMD.NBD_CMD_BLOCK_STATUS && error === 0) return this.#protocolError('a simple reply to BLOCK_STATUS');
      if (error !== 0) p.error = wireError(error, '', p.req);
      if (error === 0 && p.req.type === NBD_CMD.NBD_CMD_READ && p.req.length > 0) {
        if (this.#mode !== MODE.SIMPLE) return this.#protocolError('a simple reply to READ after structured replies were agreed');
        this.#chunkFlags = NBD_REPLY_FLAG.NBD_REPLY_FLAG_DONE;
        this.#chunkType = T.NBD_REPLY_TYPE_NONE;
        this.#state = S.DATA;
        this.#dataPos = 0;
        this.#dataLeft = p.req.length;
        p.covered = p.req.length;
        return;
      }
      this.#chunkFlags = NBD_REPLY_FLAG.NBD_REPLY_FLAG_DONE;
      return this.#chunkDone();
    }
    this.#chunkFlags = h.readUInt16BE(4);
    this.#chunkType = h.readUInt16BE(6);
    let length: number;
    if (magic === M.NBD_EXTENDED_REPLY_MAGIC) {
      const high = h.readUInt32BE(24);
      if (high >= 0x200000) return this.#protocolError('a chunk longer than 2^53 bytes');
      length = high * 0x100000000 + h.readUInt32BE(28);
    } else {
      length = h.readUInt32BE(16);
    }
    if (this.#chunkType === T.NBD_REPLY_TYPE_OFFSET_DATA) {
      if (p.req.type !== NBD_CMD.NBD_CMD_READ || length < 8) return this.#protocolError('an OFFSET_DATA chunk that does not fit its request');
      this.#dataLeft = length - 8;
      this.#headFill = 0;
      this.#state = S.DATA_OFFSET;
      return;
    }
    if (length === 0) return this.#onPayload(Buffer.alloc(0));
    if (length > MAX_CHUNK_PAYLOAD) return this.#protocolError(`a ${length}-byte chunk (at most ${MAX_CHUNK_PAYLOAD} accepted)`);
    this.#payload = Buffer.allocUnsafe(length);
    this.#payloadFill = 0;
    this.#state = S.PAYLOAD;
  }

  #onDataOffset(): void {
    const p = this.#current!;
    const offset = Number(this.#head.readBigUInt64BE(0));
    const rel = offset - p.req.offset;
    if (rel < 0 || rel + this.#dataLeft > p.req.length) return this.#protocolError('OFFSET_DATA outside its READ');
    this.#dataPos = rel;
    p.covered += this.#dataLeft;
    if (this.#dataLeft === 0) return this.#chunkDone();
    this.#state = S.DATA;
  }

  #onPayload(buf: Buffer): void {
    const p = this.#current!;
    this.#payload = null;
    const type = this.#chunkType;
    if (type === T.NBD_REPLY_TYPE_NONE) {
      if (buf.length !== 0) return this.#protocolError('a NONE chunk with a payload');
    } else if (type === T.NBD_REPLY_TYPE_OFFSET_HOLE) {
      if (p.req.type !== NBD_CMD.NBD_CMD_READ || buf.length !== 12) return this.#protocolError('an OFFSET_HOLE chunk that does not fit its request');
      const rel = Number(buf.readBigUInt64BE(0)) - p.req.offset;
      const size = buf.readUInt32BE(8);
      if (rel < 0 || rel + size > p.req.length || size === 0) return this.#protocolError('OFFSET_HOLE outside its READ');
      if (!p.abandoned && p.req.target) p.req.target.fill(0, rel, rel + size);
      p.covered += size;
    } else if (type === T.NBD_REPLY_TYPE_BLOCK_STATUS || type === T.NBD_REPLY_TYPE_BLOCK_STATUS_EXT) {
      if (p.req.type !== NBD_CMD.NBD_CMD_BLOCK_STATUS) return this.#protocolError('block status for another command');
      const extents = parseExtents(buf, type === T.NBD_REPLY_TYPE_BLOCK_STATUS_EXT, p.req);
      if (typeof extents === 'string') return this.#protocolError(extents);
      if (extents.contextId === p.req.contextId && p.extents === null) p.extents = extents.list;
    } else if (type === T.NBD_REPLY_TYPE_ERROR || type === T.NBD_REPLY_TYPE_ERROR_OFFSET) {
      if (buf.length < 6) return this.#protocolError('a short error chunk');
      const len = buf.readUInt16BE(4);
      if (6 + len > buf.length) return this.#protocolError('an error message longer than its chunk');
      const message = buf.subarray(6, 6 + len).toString('utf8');
      let offset: number | undefined;
      if (type === T.NBD_REPLY_TYPE_ERROR_OFFSET) {
        if (buf.length < 6 + len + 8) return this.#protocolError('an ERROR_OFFSET chunk without its offset');
        offset = Number(buf.readBigUInt64BE(6 + len));
      }
      p.error ??= wireError(buf.readUInt32BE(0), message, p.req, offset);
    } else if ((type & 0x8000) !== 0) {
      // An error type this client does not know: the spec says treat it as an error with the value given.
      p.error ??= wireError(buf.length >= 4 ? buf.readUInt32BE(0) : 22, '', p.req);
    }
    // Other (unknown, non-error) chunk types are skipped, as the spec allows.
    this.#chunkDone();
  }

  #chunkDone(): void {
    const p = this.#current!;
    this.#expectHeader();
    if ((this.#chunkFlags & NBD_REPLY_FLAG.NBD_REPLY_FLAG_DONE) === 0) return;
    // A successful READ must have described every byte asked for: else the caller's buffer
    // would hold whatever was there before, returned as data.
    if (p.req.type === NBD_CMD.NBD_CMD_READ && p.error === null && p.covered !== p.req.length) {
      return this.#protocolError(`a READ reply that covered ${p.covered} of ${p.req.length} bytes`);
    }
    // A BLOCK_STATUS without extents for its context is a violation like any other:
    // EPROTO always means the connection is gone (checked while the request is still
    // pending, so it fails with the rest).
    if (p.req.type === NBD_CMD.NBD_CMD_BLOCK_STATUS && p.error === null && (p.extents === null || p.extents.length === 0)) {
      return this.#protocolError('BLOCK_STATUS ended without extents for the context asked');
    }
    this.#pending.delete(this.#cookie);
    this.#current = null;
    p.onEnd?.();
    if (p.abandoned) return;
    if (p.error) return p.reject(p.error);
    if (p.req.type === NBD_CMD.NBD_CMD_BLOCK_STATUS) return p.resolve(p.extents!);
    p.resolve(undefined);
  }
}

function wireError(value: number, message: string, req: WireRequest, offset?: number): BlockError {
  const code = fromNbdError(value);
  const text = message !== '' ? message : `${commandName(req.type)} failed`;
  return new BlockError(code, text, offset !== undefined ? { offset } : undefined);
}

/** Descriptors of a BLOCK_STATUS chunk as extents from the request's offset, clipped to the request. */
function parseExtents(buf: Buffer, ext: boolean, req: WireRequest): { contextId: number; list: Extent[] } | string {
  if (buf.length < (ext ? 8 : 4)) return 'a short block status chunk';
  const contextId = buf.readUInt32BE(0);
  const size = ext ? 16 : 8;
  const start = ext ? 8 : 4;
  if ((buf.length - start) % size !== 0) return 'a block status chunk that is not whole descriptors';
  const list: Extent[] = [];
  let offset = req.offset;
  const end = req.offset + req.length;
  for (let at = start; at < buf.length && offset < end; at += size) {
    const length = ext ? Number(buf.readBigUInt64BE(at)) : buf.readUInt32BE(at);
    const flags = ext ? Number(buf.readBigUInt64BE(at + 8) & 0xffffffffn) : buf.readUInt32BE(at + 4);
    if (length === 0) return 'a zero-length block status descriptor';
    const n = Math.min(length, end - offset);
    list.push({ offset, length: n, flags });
    offset += n;
  }
  return { contextId, list };
}
