/**
 * Running a validated request on its export's device: what each command does, the FLUSH
 * and write-back error rules (errseq), sparse-read detection and BLOCK_STATUS extents.
 * Resolves to the reply to send, which the session hands to its ReplyWriter; knows no
 * socket and no framing.
 */
import { BlockError, toBlockError } from '../errors/index.js';
import { EXTENT, REQ, type BlockDevice, type Extent } from '../device/index.js';
import type { Export } from '../export/export.js';
import { flushExport } from '../export/flush.js';
import type { BufferPool } from '../io/buffer-pool.js';
import { NBD_CMD, NBD_CMD_FLAG, NBD_STATE } from './constants.js';
import type { Descriptor, RequestHeader } from './codec.js';
import type { ServerLimits } from './limits.js';
import type { ReadResult, ReplyWriter } from './replies.js';

/**
 * Extent queries one sparse READ may make to find its zero runs: a read covers at most
 * maxPayload bytes, and a device answering in tiny extents must not make it unbounded.
 */
const MAX_ZERO_RUN_QUERIES = 64;

/** A block-status descriptor's length is a u32: longer runs are split. */
const MAX_DESCRIPTOR_LENGTH = 0xffff_ffff;

/** The base:allocation state bits a descriptor carries (HOLE, ZERO). */
const STATE_MASK = NBD_STATE.NBD_STATE_HOLE | NBD_STATE.NBD_STATE_ZERO;

/** An error reply: the error, and whether its offset may be sent (ERROR_OFFSET, a READ's own failure). */
export class WireError {
  constructor(
    readonly error: BlockError,
    readonly withOffset = false,
    /** What the device threw (for the log: an unexpected exception is logged with its stack); null for errors found by the validator. */
    readonly thrown: unknown = null,
  ) {}
}

/** A WRITE payload: one buffer, or the socket's pieces for a device with writev. */
export type Payload = Buffer | Buffer[];

/** What a request resolves to: null = plain success, read data (copied or as device views), block status, or an error. */
export type Reply = null | ReadResult | { readonly views: readonly Buffer[] } | { readonly descs: Descriptor[] } | WireError;

/** The session's write-back error cursor (an errseq sample), which FLUSH and durability failures advance. */
export interface CursorHolder {
  cursor: number;
}

export interface RunnerOptions {
  readonly export: Export;
  readonly pool: BufferPool;
  readonly limits: Pick<ServerLimits, 'sparseReadMinimum' | 'maxExtents'>;
  /** How READ replies are framed: the header room read buffers keep, and whether holes may be sent. */
  readonly writer: Pick<ReplyWriter, 'readHeaderSize' | 'sparse'>;
  readonly holder: CursorHolder;
}

/** Runs one connection's requests on its export's device. */
export class RequestRunner {
  readonly #export: Export;
  readonly #device: BlockDevice;
  readonly #pool: BufferPool;
  readonly #limits: RunnerOptions['limits'];
  readonly #writer: RunnerOptions['writer'];
  readonly #holder: CursorHolder;

  constructor(opts: RunnerOptions) {
    this.#export = opts.export;
    this.#device = opts.export.device;
    this.#pool = opts.pool;
    this.#limits = opts.limits;
    this.#writer = opts.writer;
    this.#holder = opts.holder;
  }

  /** The error reply for a request whose run rejected with `e`. */
  failed(h: RequestHeader, e: unknown): WireError {
    return new WireError(this.#recordWriteback(toBlockError(e)), h.type === NBD_CMD.NBD_CMD_READ, e);
  }

  /** Runs a validated request on the device; resolves to the reply to send. */
  async run(h: RequestHeader, payload: Payload | null): Promise<Reply> {
    const dev = this.#device;
    const fua = h.flags & NBD_CMD_FLAG.NBD_CMD_FLAG_FUA ? REQ.FUA : 0;
    switch (h.type) {
      case NBD_CMD.NBD_CMD_READ:
        return this.#read(h);
      case NBD_CMD.NBD_CMD_WRITE:
        if (Array.isArray(payload)) await dev.writev!(payload, h.offset, fua);
        else await dev.write(payload as Buffer, h.offset, fua);
        return null;
      case NBD_CMD.NBD_CMD_FLUSH:
        return this.#flush();
      case NBD_CMD.NBD_CMD_TRIM:
        if (h.length > 0) await dev.trim(h.offset, h.length, fua);
        return null;
      case NBD_CMD.NBD_CMD_WRITE_ZEROES: {
        let flags = fua;
        if (h.flags & NBD_CMD_FLAG.NBD_CMD_FLAG_NO_HOLE) flags |= REQ.NO_HOLE;
        if (h.flags & NBD_CMD_FLAG.NBD_CMD_FLAG_FAST_ZERO) flags |= REQ.FAST_ZERO;
        if (h.length > 0) await dev.zero(h.offset, h.length, flags);
        return null;
      }
      case NBD_CMD.NBD_CMD_CACHE:
        // A hint whose failure changes nothing else, but the spec still wants it reported:
        // "If an error occurs, the server MUST set the appropriate error code".
        if (h.length > 0) await dev.cache(h.offset, h.length, 0);
        return null;
      case NBD_CMD.NBD_CMD_BLOCK_STATUS:
        return this.#blockStatus(h);
      default:
        throw new BlockError('EINVAL', `unknown command ${h.type}`);
    }
  }

  /** FLUSH: the export's flush rule (src/export/flush.ts), shared with other protocols' sessions. */
  async #flush(): Promise<Reply> {
    const { error, cursor } = await flushExport(this.#export, this.#device, this.#holder.cursor);
    this.#holder.cursor = cursor;
    return error ? new WireError(error) : null;
  }

  /**
   * A durability failure (BlockError.writeback: a FUA write whose fdatasync failed) is
   * this request's reply, and also the export's news: it is recorded so every other
   * session hears of it at its next FLUSH, and this session's cursor moves past it so
   * this session is not told twice.
   */
  #recordWriteback(e: BlockError): BlockError {
    if (e.writeback) {
      const errseq = this.#export.errseq;
      errseq.set(e.errno);
      this.#holder.cursor = errseq.checkAndAdvance(this.#holder.cursor).cursor;
    }
    return e;
  }

  async #read(h: RequestHeader): Promise<Reply> {
    const dev = this.#device;
    const len = h.length;
    const prefix = this.#writer.readHeaderSize;
    const sparse =
      this.#writer.sparse &&
      dev.capabilities.extents &&
      dev.extentsOnRead !== false &&
      len >= this.#limits.sparseReadMinimum &&
      !(h.flags & NBD_CMD_FLAG.NBD_CMD_FLAG_DF);
    let knownRuns: Extent[] | null | undefined;
    if (dev.readViews && len > 0) {
      // Zero copy unless there are holes worth sending as hole chunks.
      knownRuns = sparse ? await this.#zeroRuns(h.offset, len) : null;
      if (knownRuns === null) return { views: dev.readViews(h.offset, len) };
    }
    const owner = this.#pool.get(prefix + len);
    const buf = owner.subarray(0, prefix + len);
    try {
      const [, zeroRuns] = await Promise.all([
        len > 0 ? dev.read(buf.subarray(prefix), h.offset, 0) : undefined,
        knownRuns !== undefined ? knownRuns : sparse ? this.#zeroRuns(h.offset, len) : null,
      ]);
      return { buf, owner, prefix, zeroRuns };
    } catch (e) {
      this.#pool.put(owner);
      throw e;
    }
  }

  /** Ranges of a read that read as zeroes (from extents), or null if there are none worth sending as holes. */
  async #zeroRuns(offset: number, length: number): Promise<Extent[] | null> {
    const dev = this.#device;
    const end = offset + length;
    const runs: Extent[] = [];
    let at = offset;
    // Bounded: a read covers at most maxPayload bytes; stop after a fixed number of queries.
    for (let q = 0; at < end && q < MAX_ZERO_RUN_QUERIES; q++) {
      const ext = await dev.extents(at, end - at, 0);
      if (ext.length === 0) break;
      for (const e of ext) {
        const s = Math.max(e.offset, at);
        const t = Math.min(e.offset + e.length, end);
        if (t <= s) continue;
        if (e.flags & EXTENT.ZERO) runs.push({ offset: s, length: t - s, flags: EXTENT.ZERO });
        at = t;
        if (at >= end) break;
      }
    }
    return runs.length > 0 ? runs : null;
  }

  async #blockStatus(h: RequestHeader): Promise<Reply> {
    const dev = this.#device;
    const reqOne = (h.flags & NBD_CMD_FLAG.NBD_CMD_FLAG_REQ_ONE) !== 0;
    const end = h.offset + h.length;
    const max = reqOne ? 1 : this.#limits.maxExtents;
    const descs: { length: number; flags: number }[] = [];
    if (!dev.capabilities.extents) {
      descs.push({ length: h.length, flags: 0 });
    } else {
      let at = h.offset;
      // Each query advances `at` by at least one extent, so this ends; the cap bounds the reply.
      while (at < end && descs.length < max) {
        const ext = await dev.extents(at, end - at, reqOne ? REQ.REQ_ONE : 0);
        if (ext.length === 0) throw new BlockError('EIO', 'the device returned no extents');
        let progressed = false;
        for (const e of ext) {
          const s = Math.max(e.offset, at);
          const t = Math.min(e.offset + e.length, end);
          if (t <= s) continue;
          if (e.offset > at) throw new BlockError('EIO', `the device returned an extent at ${e.offset}, expected ${at}`);
          const last = descs[descs.length - 1];
          if (last && last.flags === e.flags && last.length + (t - s) <= MAX_DESCRIPTOR_LENGTH) last.length += t - s;
          else if (descs.length < max) descs.push({ length: t - s, flags: e.flags & STATE_MASK });
          else break;
          at = t;
          progressed = true;
          if (at >= end || reqOne) break;
        }
        if (!progressed || reqOne) break;
      }
    }
    return { descs };
  }
}
