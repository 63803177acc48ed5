/**
 * Reply writers, one per reply mode, chosen once when transmission starts: simple
 * replies, structured replies, or extended headers. Each turns a request's result into
 * the bytes the client reads, and hands them to the session's `send` (which corks and
 * writes them), so the framing decision is made once per connection instead of on every
 * reply. Reads stay zero-copy: device views go out behind one header, pooled read
 * buffers carry their header in front (`readHeaderSize`) and go back to the pool once
 * written, and sparse reads become data and hole chunks.
 */
import type { BufferPool } from '../io/buffer-pool.js';
import type { Extent } from '../device/index.js';
import { MODE, NBD_REPLY_TYPE, NBD_SIZE, type Mode } from './constants.js';
import {
  DONE,
  encodeBlockStatus,
  encodeBlockStatusExt,
  encodeErrorPayload,
  encodeHolePayload,
  errorChunkType,
  writeExtendedHeader,
  writeSimpleReply,
  writeStructuredHeader,
  writeU64,
  type Descriptor,
  type RequestHeader,
} from './codec.js';
import { BASE_ALLOCATION_ID } from './handshake.js';

const EMPTY = Buffer.alloc(0);

/** Bytes of the u64 offset that starts an OFFSET_DATA chunk's payload. */
const DATA_OFFSET_BYTES = 8;

/** A successful READ: the buffer with `prefix` bytes of header room, and zero runs for sparse replies. */
export interface ReadResult {
  readonly buf: Buffer;
  /** The pooled buffer `buf` is a view of; back to the pool once the reply is written. */
  readonly owner: Buffer;
  readonly prefix: number;
  readonly zeroRuns: Extent[] | null;
}

/** Queues bytes for the peer; `release` goes back to the pool once they are written. */
export type Send = (buf: Buffer, release?: Buffer) => void;

/** The replies of one connection, in the mode it negotiated. */
export interface ReplyWriter {
  readonly mode: Mode;
  /** Bytes in front of the data of a READ answered in one piece (room a read buffer keeps for its header). */
  readonly readHeaderSize: number;
  /** True if a READ may be answered with hole chunks for its zero runs. */
  readonly sparse: boolean;
  /** Success without data. */
  done(h: RequestHeader): void;
  /** Failure with NBD error `errno`; `offset` (inside the request) is sent where the mode can carry it. */
  error(h: RequestHeader, errno: number, message: string, offset: number | undefined): void;
  /** A whole READ whose data are the device's own views: one header, then the views (one writev). */
  views(h: RequestHeader, views: readonly Buffer[]): void;
  /** A READ read into a pooled buffer with `readHeaderSize` bytes of room in front. */
  read(h: RequestHeader, r: ReadResult): void;
  /** A BLOCK_STATUS answer for base:allocation. */
  blockStatus(h: RequestHeader, descs: Descriptor[]): void;
}

/** The writer for `mode`. */
export function replyWriter(mode: Mode, send: Send, pool: BufferPool): ReplyWriter {
  switch (mode) {
    case MODE.SIMPLE:
      return new SimpleReplies(send);
    case MODE.STRUCTURED:
      return new ChunkedReplies(STRUCTURED, send, pool);
    case MODE.EXTENDED:
      return new ChunkedReplies(EXTENDED, send, pool);
  }
}

function simpleReply(error: number, h: RequestHeader): Buffer {
  const b = Buffer.allocUnsafe(NBD_SIZE.SIMPLE_REPLY);
  writeSimpleReply(b, 0, error, h.cookie);
  return b;
}

/** Simple replies: a 16-byte header, followed by the data for a successful READ. */
class SimpleReplies implements ReplyWriter {
  readonly mode = MODE.SIMPLE;
  readonly readHeaderSize = NBD_SIZE.SIMPLE_REPLY;
  readonly sparse = false;
  readonly #send: Send;

  constructor(send: Send) {
    this.#send = send;
  }

  done(h: RequestHeader): void {
    this.#send(simpleReply(0, h));
  }

  error(h: RequestHeader, errno: number): void {
    this.#send(simpleReply(errno, h));
  }

  views(h: RequestHeader, views: readonly Buffer[]): void {
    this.#send(simpleReply(0, h));
    for (const v of views) this.#send(v);
  }

  read(h: RequestHeader, r: ReadResult): void {
    writeSimpleReply(r.buf, 0, 0, h.cookie);
    this.#send(r.buf, r.owner);
  }

  blockStatus(): void {
    // Unreachable: BLOCK_STATUS needs a metadata context, which needs structured replies.
    throw new Error('BLOCK_STATUS reply without structured replies');
  }
}

/** How chunk headers look: structured (20 bytes) or extended (32 bytes, with the request's offset). */
interface ChunkFormat {
  readonly mode: Mode;
  readonly headerSize: number;
  writeHeader(buf: Buffer, flags: number, type: number, h: RequestHeader, length: number): void;
  /** Successful replies without data: a simple reply is still allowed with structured replies, not with extended headers. */
  done(h: RequestHeader): Buffer;
  /** The block status chunk: its type and payload. */
  blockStatus(descs: Descriptor[]): { readonly type: number; readonly payload: Buffer };
}

const STRUCTURED: ChunkFormat = {
  mode: MODE.STRUCTURED,
  headerSize: NBD_SIZE.STRUCTURED_REPLY_HEADER,
  writeHeader(buf, flags, type, h, length) {
    writeStructuredHeader(buf, 0, flags, type, h.cookie, length);
  },
  done: (h) => simpleReply(0, h),
  blockStatus: (descs) => ({ type: NBD_REPLY_TYPE.NBD_REPLY_TYPE_BLOCK_STATUS, payload: encodeBlockStatus(BASE_ALLOCATION_ID, descs) }),
};

const EXTENDED: ChunkFormat = {
  mode: MODE.EXTENDED,
  headerSize: NBD_SIZE.EXTENDED_REPLY_HEADER,
  writeHeader(buf, flags, type, h, length) {
    writeExtendedHeader(buf, 0, flags, type, h, length);
  },
  done(h) {
    const b = Buffer.allocUnsafe(NBD_SIZE.EXTENDED_REPLY_HEADER);
    writeExtendedHeader(b, 0, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_NONE, h, 0);
    return b;
  },
  blockStatus: (descs) => ({ type: NBD_REPLY_TYPE.NBD_REPLY_TYPE_BLOCK_STATUS_EXT, payload: encodeBlockStatusExt(BASE_ALLOCATION_ID, descs) }),
};

/** Structured replies and extended headers: chunks, the last one flagged DONE. */
class ChunkedReplies implements ReplyWriter {
  readonly mode: Mode;
  readonly readHeaderSize: number;
  readonly sparse = true;
  readonly #format: ChunkFormat;
  readonly #send: Send;
  readonly #pool: BufferPool;

  constructor(format: ChunkFormat, send: Send, pool: BufferPool) {
    this.#format = format;
    this.mode = format.mode;
    this.readHeaderSize = format.headerSize + DATA_OFFSET_BYTES;
    this.#send = send;
    this.#pool = pool;
  }

  done(h: RequestHeader): void {
    this.#send(this.#format.done(h));
  }

  error(h: RequestHeader, errno: number, message: string, offset: number | undefined): void {
    this.#chunk(h, DONE, errorChunkType(offset !== undefined), encodeErrorPayload(errno, message, offset));
  }

  views(h: RequestHeader, views: readonly Buffer[]): void {
    const head = Buffer.allocUnsafe(this.readHeaderSize);
    this.#writeDataHeader(head, h, DONE, h.offset, h.length);
    this.#send(head);
    for (const v of views) this.#send(v);
  }

  read(h: RequestHeader, r: ReadResult): void {
    const { buf, prefix, owner } = r;
    if (h.length === 0) {
      // A zero-length READ still needs a final chunk, and never a simple reply.
      this.#pool.put(owner);
      return this.#chunk(h, DONE, NBD_REPLY_TYPE.NBD_REPLY_TYPE_NONE, EMPTY);
    }
    if (r.zeroRuns === null) {
      this.#writeDataHeader(buf, h, DONE, h.offset, h.length);
      return this.#send(buf, owner);
    }
    // Sparse: data chunks for the data, hole chunks for zero runs, the last one DONE.
    const data = buf.subarray(prefix);
    const pieces: { offset: number; length: number; hole: boolean }[] = [];
    let at = h.offset;
    const end = h.offset + h.length;
    for (const z of r.zeroRuns) {
      if (z.offset > at) pieces.push({ offset: at, length: z.offset - at, hole: false });
      pieces.push({ offset: z.offset, length: z.length, hole: true });
      at = z.offset + z.length;
    }
    if (at < end) pieces.push({ offset: at, length: end - at, hole: false });
    pieces.forEach((p, i) => {
      const flags = i === pieces.length - 1 ? DONE : 0;
      if (p.hole) {
        this.#chunk(h, flags, NBD_REPLY_TYPE.NBD_REPLY_TYPE_OFFSET_HOLE, encodeHolePayload(p.offset, p.length));
      } else {
        const hdr = Buffer.allocUnsafe(prefix);
        this.#writeDataHeader(hdr, h, flags, p.offset, p.length);
        this.#send(hdr);
        this.#send(data.subarray(p.offset - h.offset, p.offset - h.offset + p.length));
      }
    });
    // Writes complete in order: once an empty write queued after the pieces is done, so are they.
    this.#send(EMPTY, owner);
  }

  blockStatus(h: RequestHeader, descs: Descriptor[]): void {
    const { type, payload } = this.#format.blockStatus(descs);
    this.#chunk(h, DONE, type, payload);
  }

  /** One chunk with a separate payload buffer. */
  #chunk(h: RequestHeader, flags: number, type: number, payload: Buffer): void {
    const hdr = Buffer.allocUnsafe(this.#format.headerSize);
    this.#format.writeHeader(hdr, flags, type, h, payload.length);
    this.#send(hdr);
    if (payload.length > 0) this.#send(payload);
  }

  /** Writes an OFFSET_DATA chunk header plus its u64 offset into the first readHeaderSize bytes of `buf`. */
  #writeDataHeader(buf: Buffer, h: RequestHeader, flags: number, offset: number, length: number): void {
    this.#format.writeHeader(buf, flags, NBD_REPLY_TYPE.NBD_REPLY_TYPE_OFFSET_DATA, h, length + DATA_OFFSET_BYTES);
    writeU64(buf, offset, this.#format.headerSize);
  }
}
