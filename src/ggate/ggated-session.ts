/**
 * One ggate client after its handshake: a pair of TCP connections sharing a token. The
 * client sends requests on the connection it registered with GGATE_FLAG_RECV (the
 * server receives on it) and reads replies from the one it registered with
 * GGATE_FLAG_SEND (the server sends on it).
 *
 * Requests are served one at a time in arrival order, like ggated's single disk thread:
 * replies leave in request order, and a FLUSH completes only after every write received
 * before it (FL4), with no extra bookkeeping. Reading runs ahead of the disk: requests
 * queue up to a bounded count and payload size, then the receive socket is paused
 * (TCP backpressure); the send socket's own buffer is bounded by waiting for 'drain'
 * before each request.
 *
 * Every request is validated before any I/O (validateGgateRequest: command, access,
 * length cap, safe offset, alignment, bounds); a bad one gets an error reply with its
 * cmd/offset/length/seq echoed, and a rejected WRITE's payload is skipped without being
 * stored, so the stream stays in sync. Errors on the wire are FreeBSD errno values.
 *
 * FLUSH follows the export's errseq discipline: the reply is the backend's flush error,
 * else any write-back error recorded on the export since this session's cursor
 * (sampled when the pair was completed); a backend flush failure is also recorded, so
 * every other client of the path hears of it once, at its own next FLUSH. A transport
 * failure (a client vanishing, a short frame) is never recorded (W9).
 */
import { flushExport } from '../export/flush.js';
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import { toBlockError, type ErrnoCode } from '../errors/index.js';
import {
  GGATE_CMD,
  GGATE_SIZE,
  decodeHdr,
  encodeHdr,
  replyTo,
  writeHdr,
  type GgateHdr,
} from './protocol.js';
import {
  validateGgateRequest,
  type GgateAccess,
  type GgateGeometry,
} from './validate.js';
import type { ExportSession } from '../export/export.js';
import { Deque } from '../io/deque.js';
import type { FrameReader } from '../io/framer.js';
import type { GgateLease } from './ggated-exports.js';

/** The limits a session needs from its server. */
export interface GgateSessionLimits {
  /** Largest gh_length accepted (READ and WRITE). */
  readonly maxRequestLength: number;
  /** Requests received and not yet served before the server stops reading. */
  readonly maxQueuedRequests: number;
  /** WRITE payload bytes received and not yet served before the server stops reading. */
  readonly maxQueuedBytes: number;
  /** Sector size announced in the sinit (at least the device's minimum block size). */
  readonly sectorSize: number;
}

/** What a session needs from the server that owns it. */
export interface GgateSessionHost {
  readonly logger: Logger;
  readonly limits: GgateSessionLimits;
  sessionClosed(session: GgateSession): void;
}

/** One side of a pair as the handshake leaves it: the socket and its frame reader. */
export interface GgateSide {
  readonly socket: Socket;
  readonly reader: FrameReader;
  /** Hooks the handshake installed on the socket; the session replaces them. */
  onEnd: () => void;
  onClose: () => void;
}

export interface GgateSessionOptions {
  /** The connection requests arrive on (GGATE_FLAG_RECV). */
  readonly recv: GgateSide;
  /** The connection replies leave on (GGATE_FLAG_SEND). */
  readonly send: GgateSide;
  readonly lease: GgateLease;
  readonly access: GgateAccess;
  readonly token: number;
  readonly path: string;
}

/** A request received and waiting for the disk. */
interface Request {
  readonly hdr: GgateHdr;
  /** The WRITE payload (null for other commands and for rejected WRITEs). */
  readonly payload: Buffer | null;
  /** The validation verdict; null if the request may run. */
  readonly error: ErrnoCode | null;
}

let nextSessionId = 1;

/** The sector size and media size a client of `device` is told (size rounded down to whole sectors). */
export function ggateGeometry(size: number, minimumBlock: number, sectorSize: number): { mediasize: number; sectorsize: number } {
  const sectorsize = Math.max(sectorSize, minimumBlock);
  return { mediasize: size - (size % sectorsize), sectorsize };
}

export class GgateSession implements ExportSession {
  readonly id = nextSessionId++;
  readonly peer: string;
  readonly path: string;
  readonly access: GgateAccess;
  readonly token: number;
  /** This session's write-back error cursor (an errseq sample taken at pairing). */
  cursor: number;

  readonly #host: GgateSessionHost;
  readonly #log: Logger;
  readonly #recv: GgateSide;
  readonly #send: GgateSide;
  readonly #lease: GgateLease;

  /** Received requests, front first; a ring so taking the front is O(1) on a deep queue. */
  readonly #queue = new Deque<Request>();
  #queuedBytes = 0;
  #readPaused = false;
  #pumping = false;
  /** The request on the device right now (its promise), so the lease outlives it. */
  #running: Promise<unknown> | null = null;
  /** The server is shutting down: serve what was received, then close. */
  #shutdown = false;
  /** The client closed its request connection: serve what was received, then close. */
  #recvEnded = false;
  #closed = false;
  #drainWaiter: (() => void) | null = null;

  constructor(host: GgateSessionHost, opts: GgateSessionOptions) {
    this.#host = host;
    this.#recv = opts.recv;
    this.#send = opts.send;
    this.#lease = opts.lease;
    this.path = opts.path;
    this.access = opts.access;
    this.token = opts.token;
    const s = opts.recv.socket;
    this.peer = `${s.remoteAddress ?? '?'}:${s.remotePort ?? '?'}`;
    this.#log = host.logger.child({ session: this.id, path: this.path });

    const exp = this.#lease.export;
    this.cursor = exp.errseq.sample();
    exp.attach(this);

    this.#recv.onEnd = () => this.#onRecvEnd();
    // After the client's EOF the socket closes by itself (the server does not allow half
    // open sockets, so Node ends our side at once); what was received is still served.
    this.#recv.onClose = () => {
      if (!this.#recvEnded) this.#abort('request connection closed');
    };
    this.#send.onEnd = () => this.#abort('reply connection ended by the client');
    this.#send.onClose = () => this.#abort('reply connection closed');
    this.#send.socket.on('drain', this.#onDrain);

    this.#log.info({ peer: this.peer, access: this.access, token: this.token }, 'client connected');
    this.#expectHeader();
    this.#recv.reader.resume();
    this.#recv.socket.resume();
  }

  /** Requests received and not yet answered (the one on the device included). */
  get queued(): number {
    return this.#queue.size + (this.#running ? 1 : 0);
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Server shutdown: stop reading requests, answer those already received, then close. */
  shutdown(): void {
    this.#shutdown = true;
    this.#recv.reader.stop();
    this.#recv.socket.pause();
    this.#maybeFinish();
  }

  /** Closes both connections now. */
  destroy(): void {
    this.#abort('destroyed');
  }

  // -------------------------------------------------------------------------------
  // Input

  #expectHeader(): void {
    this.#recv.reader.expectFixed(GGATE_SIZE.HDR_SIZE, (buf, off) => this.#onHeader(buf, off));
  }

  #geometry(): GgateGeometry {
    const dev = this.#lease.export.device;
    const g = ggateGeometry(dev.size, dev.blockSize.minimum, this.#host.limits.sectorSize);
    return { mediasize: g.mediasize, sectorsize: g.sectorsize, access: this.access, maxLength: this.#host.limits.maxRequestLength };
  }

  #onHeader(buf: Buffer, off: number): void {
    const d = decodeHdr(buf, off);
    // The reader delivers exactly HDR_SIZE bytes, so this cannot be short.
    if (!d.ok) return this.#abort('short request header');
    const hdr = d.value;
    const error = validateGgateRequest(hdr, this.#geometry());
    if (hdr.cmd !== GGATE_CMD.GGATE_CMD_WRITE) return this.#enqueue({ hdr, payload: null, error });
    if (error === null) {
      // Validated: length <= maxRequestLength, so this allocation is bounded.
      this.#recv.reader.expectBody(hdr.length, (payload) => this.#enqueue({ hdr, payload, error: null }));
    } else {
      // The payload follows whatever the verdict; drop it without storing it.
      this.#recv.reader.expectSkip(hdr.length, () => this.#enqueue({ hdr, payload: null, error }));
    }
  }

  #enqueue(req: Request): void {
    if (this.#closed) return;
    this.#queue.pushBack(req);
    if (req.payload) this.#queuedBytes += req.payload.length;
    this.#expectHeader();
    const l = this.#host.limits;
    if (this.#queue.size >= l.maxQueuedRequests || this.#queuedBytes >= l.maxQueuedBytes) this.#pauseInput();
    this.#pump().catch((e: unknown) => {
      // A bug, not the client's doing: drop this client, keep the server.
      this.#log.error({ err: e }, 'serving a request failed');
      this.#abort('internal error');
    });
  }

  #pauseInput(): void {
    if (this.#readPaused) return;
    this.#readPaused = true;
    this.#recv.reader.pause();
    this.#recv.socket.pause();
  }

  #maybeResumeInput(): void {
    if (!this.#readPaused || this.#closed) return;
    const l = this.#host.limits;
    if (this.#queue.size >= l.maxQueuedRequests || this.#queuedBytes >= l.maxQueuedBytes) return;
    this.#readPaused = false;
    if (!this.#recvEnded && !this.#shutdown) this.#recv.socket.resume();
    // Parses what is already queued (also after the client's EOF); it may pause again.
    this.#recv.reader.resume();
  }

  #onRecvEnd(): void {
    // The client will send nothing more. A frame cut short is a transport event: it is
    // dropped without a reply, and nothing is recorded (W9).
    this.#recvEnded = true;
    if (this.#recv.reader.midFrame && !this.#readPaused) this.#log.info('request connection ended in the middle of a request');
    this.#maybeFinish();
  }

  // -------------------------------------------------------------------------------
  // The disk loop

  async #pump(): Promise<void> {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while (!this.#closed && this.#queue.size > 0) {
        if (this.#send.socket.writableNeedDrain) {
          await new Promise<void>((resolve) => (this.#drainWaiter = resolve));
          continue;
        }
        const req = this.#queue.popFront()!;
        if (req.payload) this.#queuedBytes -= req.payload.length;
        this.#maybeResumeInput();
        const running = this.#serve(req);
        this.#running = running;
        const reply = await running;
        this.#running = null;
        if (this.#closed) break;
        this.#write(reply);
      }
    } finally {
      this.#pumping = false;
      this.#running = null;
    }
    this.#maybeFinish();
  }

  readonly #onDrain = (): void => {
    const w = this.#drainWaiter;
    this.#drainWaiter = null;
    w?.();
  };

  /** Runs one request; resolves to the bytes of its reply. Never rejects. */
  async #serve(req: Request): Promise<Buffer> {
    const { hdr } = req;
    if (req.error !== null) return this.#errorReply(hdr, req.error, 'invalid request');
    const dev = this.#lease.export.device;
    // Validation rejected offsets above 2^53 - 1, so it is a number here.
    const offset = hdr.offset as number;
    try {
      switch (hdr.cmd) {
        case GGATE_CMD.GGATE_CMD_READ: {
          const buf = Buffer.allocUnsafe(GGATE_SIZE.HDR_SIZE + hdr.length);
          if (hdr.length > 0) await dev.read(buf.subarray(GGATE_SIZE.HDR_SIZE), offset, 0);
          writeHdr(buf, 0, replyTo(hdr, null));
          return buf;
        }
        case GGATE_CMD.GGATE_CMD_WRITE:
          if (hdr.length > 0) await dev.write(req.payload!, offset, 0);
          return encodeHdr(replyTo(hdr, null));
        case GGATE_CMD.GGATE_CMD_FLUSH:
          return await this.#flush(hdr);
        default:
          // validateGgateRequest admits nothing else.
          return this.#errorReply(hdr, 'EOPNOTSUPP', 'unknown command');
      }
    } catch (e) {
      const be = toBlockError(e);
      return this.#errorReply(hdr, be.code, be.message);
    }
  }

  /**
   * FLUSH: the backend's flush error, else a write-back error recorded on the export
   * since this session's cursor; a backend failure is recorded too, and the cursor
   * advances in both cases (syncfs: `ret ? ret : ret2`).
   */
  async #flush(hdr: GgateHdr): Promise<Buffer> {
    const exp = this.#lease.export;
    const r = await flushExport(exp, exp.device, this.cursor);
    this.cursor = r.cursor;
    if (r.error) return this.#errorReply(hdr, r.error.code, r.error.message);
    return encodeHdr(replyTo(hdr, null));
  }

  #errorReply(hdr: GgateHdr, code: ErrnoCode, why: string): Buffer {
    this.#log.debug({ cmd: hdr.cmd, offset: String(hdr.offset), length: hdr.length, seq: String(hdr.seq), code, why }, 'request failed');
    return encodeHdr(replyTo(hdr, code));
  }

  #write(buf: Buffer): void {
    const s = this.#send.socket;
    if (s.destroyed || !s.writable) return;
    s.write(buf);
  }

  // -------------------------------------------------------------------------------
  // Close

  #maybeFinish(): void {
    if (this.#closed || (!this.#shutdown && !this.#recvEnded)) return;
    if (this.#queue.size > 0 || this.#pumping) return;
    // After the client's EOF, a paused reader may still hold whole requests to serve; an
    // unpaused one has parsed all it can (what is left is a frame cut short).
    if (!this.#shutdown && this.#readPaused) return;
    this.#closed = true;
    this.#log.info('client disconnected');
    // Replies already written are flushed before the FIN.
    this.#send.socket.end();
    this.#recv.socket.end();
    this.#send.socket.destroySoon();
    this.#recv.socket.destroySoon();
    this.#finish();
  }

  #abort(why: string): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#log.info({ why, dropped: this.#queue.size }, 'client disconnected');
    // Requests not yet on the device were never acknowledged: ggatec resends them after
    // reconnecting. Dropping them records nothing (W9).
    this.#queue.clear();
    this.#queuedBytes = 0;
    this.#recv.reader.stop();
    this.#send.reader.stop();
    this.#recv.socket.destroy();
    this.#send.socket.destroy();
    this.#onDrain();
    this.#finish();
  }

  #finish(): void {
    this.#send.socket.off('drain', this.#onDrain);
    const exp = this.#lease.export;
    exp.detach(this);
    // The request on the device (if any) must settle before the device may be closed.
    const running = this.#running ?? Promise.resolve();
    void running.then(
      () => this.#lease.release(),
      () => this.#lease.release(),
    );
    this.#host.sessionClosed(this);
  }
}
