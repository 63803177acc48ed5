/**
 * One NBD connection over a socket: transport, framing and flow control, wiring the
 * parts that know no socket. Bytes are pushed in by the socket (into lent receive
 * buffers, see receive-buffers.ts, or as 'data' chunks) and parsed without growing
 * buffers: headers are decoded straight from the chunk (or from a small scratch buffer
 * when split across chunks), payloads are copied once into a buffer of their exact
 * size, used in place, or kept as slices of the receive buffers for a device with writev.
 *
 * The parts: handshake.ts haggles options, transmission.ts validates each request and
 * picks its NBD error value, execute.ts runs it on the device, replies.ts frames the
 * answer in the negotiated mode. Requests run concurrently; replies go out as they
 * complete, corked per event-loop turn so that many small replies leave in one writev.
 * Backend failures become error replies; only protocol violations by the peer (and
 * denial-of-service limits) close the connection.
 *
 * Over 500 lines because the input parse loop, its states, the payload accumulation and
 * the pause/resume flow control share the per-byte state of one connection and run on
 * the hot path; split apart they would need that state passed across an interface on
 * every chunk.
 */
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { Logger } from 'pino';
import { BlockError } from '../errors/index.js';
import type { BlockDevice } from '../device/index.js';
import {
  NBD_CMD,
  NBD_CMD_FLAG,
  NBD_HS_FLAG,
  NBD_SIZE,
  MODE,
  commandName,
  modeName,
  optionName,
  transmissionFlagNames,
  type Mode,
} from './constants.js';
import {
  decodeCompactRequest,
  decodeExtendedRequest,
  decodeOptionHeader,
  encodeGreeting,
  type RequestHeader,
} from './codec.js';
import type { Export, ExportSession, SessionFigures } from '../export/export.js';
import type { RequestErrorLog } from '../export/error-log.js';
import { Handshake, type ExportAccess, type HandshakeOutcome, type HandshakeStep } from './handshake.js';
import { describeTlsPeer, peerVerifyError, TLS_OFF, upgradeToTls, type ServerTls, type TlsPeer } from './tls.js';
import type { Client } from './access.js';
import { replyWriter, type ReplyWriter } from './replies.js';
import { RequestRunner, WireError, type Payload, type Reply } from './execute.js';
import { nbdErrno, validateRequest, type ValidationContext } from './transmission.js';
import type { InFlightBudget, ServerLimits } from './limits.js';
import type { BufferPool } from '../io/buffer-pool.js';
import { lendReadBuffers } from '../io/lent-buffers.js';
import { ReceiveBuffers, type RxBuffer } from './receive-buffers.js';
import type { HandshakeResult, NbdMetricsSink, RequestSink } from './metrics.js';

/** What a session needs from its server. */
export interface SessionHost {
  readonly limits: ServerLimits;
  readonly logger: Logger;
  /** Large buffers for payloads and read replies, shared by the server's sessions. */
  readonly pool: BufferPool;
  /** The in-flight byte budget shared by the server's sessions. */
  readonly budget: InFlightBudget;
  /** How failed requests are logged (rate limits unexpected exceptions server-wide). */
  readonly errorLog: RequestErrorLog;
  /** The export for a name ('' = the default export), or undefined. */
  findExport(name: string): Export | undefined;
  /** Every export, for NBD_OPT_LIST. */
  listExports(): readonly Export[];
  /** True once the server is shutting down. */
  readonly shuttingDown: boolean;
  /** Whether `client` may open `exp` now (the export's access rules). */
  access(exp: Export, client: Client): ExportAccess;
  /** Called once when the session has closed. */
  sessionClosed(session: NbdSession): void;
  /** The observer of connections and requests (src/nbd/metrics.ts), or null. */
  readonly metrics: NbdMetricsSink | null;
}

const EMPTY = Buffer.alloc(0);

/**
 * Bytes one block-status descriptor takes in a reply (the extended form; compact ones
 * take 8). A BLOCK_STATUS is charged for its largest possible reply against the
 * in-flight byte budget: without that, a peer could have maxInFlightRequests of them
 * each building maxExtents descriptors at once.
 */
const STATUS_DESCRIPTOR_BYTES = 16;

export { RECEIVE_BUFFER_SIZE, ZERO_COPY_MINIMUM } from './receive-buffers.js';

/** Input states. */
const S = {
  CLIENT_FLAGS: 0,
  OPTION_HEADER: 1,
  OPTION_DATA: 2,
  OPTION_SKIP: 3,
  REQUEST_HEADER: 4,
  WRITE_PAYLOAD: 5,
  DISCARD_PAYLOAD: 6,
  /** Input is ignored: after DISC, ABORT, a fatal error or close. */
  IGNORE: 7,
  /** A WRITE payload kept as slices of the socket's chunks, for a device with writev. */
  GATHER_PAYLOAD: 8,
  /** STARTTLS was accepted: the clear-text stream is over until the TLS handshake is done. */
  TLS_HANDSHAKE: 9,
} as const;
type State = (typeof S)[keyof typeof S];

/** A request being served. */
interface Request {
  readonly h: RequestHeader;
  /** Payload bytes counted against the in-flight budget. */
  readonly cost: number;
  /** The pooled buffer holding a WRITE payload, returned to the pool when the request ends. */
  readonly owner: Buffer | null;
  /** Receive buffers the WRITE payload's slices live in, released when the request ends. */
  readonly rx: readonly RxBuffer[] | null;
  /** When it started, for the metrics sink (0 without one). */
  readonly t0: number;
}

/** Bytes received while input was paused, and the receive buffer they are in (null for a 'data' chunk). */
interface PendingChunk {
  readonly chunk: Buffer;
  readonly rx: RxBuffer | null;
  /** When it arrived (performance.now(); 0 without a metrics sink). */
  readonly at: number;
}

/** What the listener that accepted the connection sets for it. */
export interface SessionOptions {
  /** The listener's TLS policy and credentials. Default: TLS off. */
  readonly tls?: ServerTls;
  /** A unix peer's uid (SO_PEERCRED), when the server read it. */
  readonly uid?: number | undefined;
  /** The listener's label for the metrics sink. Default: ''. */
  readonly listener?: string;
}

let nextSessionId = 1;

export class NbdSession implements ExportSession {
  readonly id = nextSessionId++;
  readonly peer: string;
  /** The connection; replaced by its TLSSocket after STARTTLS. */
  #socket: Socket;
  readonly #address: string | undefined;
  readonly #uid: number | undefined;
  readonly #tlsConfig: ServerTls;
  /** What TLS agreed, once the TLS handshake is done. */
  #tlsPeer: TlsPeer | null = null;
  readonly #host: SessionHost;
  readonly #log: Logger;

  // Input parsing.
  #state: State = S.CLIENT_FLAGS;
  #need: number = NBD_SIZE.CLIENT_FLAGS;
  readonly #scratch = Buffer.alloc(NBD_SIZE.EXTENDED_REQUEST);
  #scratchFill = 0;
  #body: Buffer | null = null;
  /** The pooled buffer `#body` is a view of, when it came from the pool. */
  #bodyOwner: Buffer | null = null;
  #bodyFill = 0;
  /** GATHER_PAYLOAD: the pieces so far, the receive buffers they hold, and the payload length. */
  #slices: Buffer[] = [];
  #sliceRx: RxBuffer[] = [];
  #gatherLength = 0;
  #skip = 0;
  /** Bytes kept while input is paused, fed in order from #pendingHead (an index, not shift()). */
  #pendingChunks: PendingChunk[] = [];
  #pendingHead = 0;
  #readPaused = false;
  /** True when the socket reads into buffers this session lends it (else 'data' chunks, never reused). */
  #lent: boolean;
  /** The receive buffers lent to the socket (lent mode) and their holders. */
  readonly #rxBuffers: ReceiveBuffers;
  /** When the bytes being parsed now arrived (performance.now(); 0 without a metrics sink): a request's start for its latency. */
  #arrived = 0;
  /** The clock read of the first request that ended in the current batch of replies. */
  #batchTime = 0;
  /** The receive buffer holding the bytes being parsed now; null for 'data' chunks. */
  #feeding: RxBuffer | null = null;
  /** True while #feed runs. */
  #parsing = false;
  /** Input was unpaused while parsing: feed the pending bytes and resume the socket after it. */
  #resumeAfterParse = false;

  // Handshake state (what the haggling agrees lives in #handshake).
  readonly #handshake: Handshake;
  #optionCount = 0;
  #option = 0;
  /** Extended headers were negotiated: requests use the 32-byte form. Fixed when transmission starts. */
  #extended = false;
  /** Bytes of a request header in the negotiated form. */
  #requestSize: number = NBD_SIZE.COMPACT_REQUEST;
  /** The replies in that framing, set when transmission starts. */
  #writer: ReplyWriter | null = null;
  /** Runs requests on the export's device, set when transmission starts. */
  #runner: RequestRunner | null = null;
  #handshakeTimer: NodeJS.Timeout | null = null;

  // Transmission state.
  #export: Export | null = null;
  #device: BlockDevice | null = null;
  /** What requests are validated against, set when transmission starts. */
  #vctx: ValidationContext | null = null;
  #current: RequestHeader | null = null;
  #inFlight = 0;
  #inFlightBytes = 0;
  #disconnecting = false;
  #closed = false;
  #corked = false;
  /** This session's write-back error cursor (an errseq sample). */
  cursor = 0;

  // Observation: what status and the metrics sink see.
  readonly #listener: string;
  /** The sink's request hooks for this session's export, set when transmission starts. */
  #requestSink: RequestSink | null = null;
  /** The handshake's outcome was reported to the sink. */
  #handshakeReported = false;
  /** The cursor last seen: a change after a request means the session was told of an error. */
  #seenCursor = 0;
  #replies = '';
  #flagNames = '';
  #requests = 0;
  #bytesRead = 0;
  #bytesWritten = 0;

  /**
   * `accepted` should be paused (the server accepts with pauseOnConnect) so that its
   * reads can be switched to lent buffers before the first byte; a flowing socket is
   * served through its 'data' events.
   */
  constructor(accepted: Socket, host: SessionHost, opts: SessionOptions = {}) {
    this.#host = host;
    this.#tlsConfig = opts.tls ?? TLS_OFF;
    this.#uid = opts.uid;
    this.#listener = opts.listener ?? '';
    this.#address = accepted.remoteAddress;
    const rxBuffers = new ReceiveBuffers(host.pool, host.limits.maxInFlightBytes);
    this.#rxBuffers = rxBuffers;
    this.#handshake = new Handshake({
      maxPayload: host.limits.maxPayload,
      get shuttingDown() {
        return host.shuttingDown;
      },
      findExport: (name) => host.findExport(name),
      listExports: () => host.listExports(),
      tlsMode: this.#tlsConfig.mode,
      access: (exp) => host.access(exp, this.client),
    });
    const lent = lendReadBuffers(
      accepted,
      () => rxBuffers.next(),
      (n, buf) => this.#onData((buf as Buffer).subarray(0, n), rxBuffers.filled(n)),
    );
    const socket = lent ?? accepted;
    this.#socket = socket;
    this.#lent = lent !== null;
    this.peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    this.#log = host.logger.child({ session: this.id, peer: this.peer });
    socket.setNoDelay(true);
    if (!lent) {
      socket.on('data', (chunk: Buffer) => this.#onData(chunk, null));
      socket.resume();
    }
    this.#listen(socket);
    host.metrics?.connectionOpened(this.#listener);
    this.#handshakeTimer = setTimeout(() => {
      this.#log.info('handshake timed out');
      this.#reportHandshake('timeout');
      this.#hangUp();
    }, host.limits.handshakeTimeoutMs);
    this.#handshakeTimer.unref();
    socket.write(encodeGreeting(NBD_HS_FLAG.NBD_FLAG_FIXED_NEWSTYLE | NBD_HS_FLAG.NBD_FLAG_NO_ZEROES));
  }

  #listen(socket: Socket): void {
    socket.on('error', (err) => this.#log.debug({ err }, 'socket error'));
    socket.on('close', () => this.#onClose());
    socket.on('drain', () => this.#maybeResume());
  }

  /** The client as access rules see it: address (or unix uid) and TLS identity. */
  get client(): Client {
    return { address: this.#address, uid: this.#uid, tls: this.#tlsPeer };
  }

  /** For status: the TLS protocol, suite and client identity; null in clear. */
  get security(): string | null {
    const t = this.#tlsPeer;
    if (t === null) return null;
    const who = t.pskIdentity !== undefined ? ` psk=${t.pskIdentity}` : t.subject !== undefined ? ` subject=${t.subject}` : '';
    return `${t.protocol} ${t.cipher}${who}`;
  }

  /** What TLS agreed (protocol, suite, PSK identity or certificate subject); null in clear. */
  get tls(): TlsPeer | null {
    return this.#tlsPeer;
  }

  /** The export this session is attached to, once in transmission. */
  get export(): Export | null {
    return this.#export;
  }

  /** Requests in flight. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** The label of the listener that accepted it. */
  get listener(): string {
    return this.#listener;
  }

  /** What it negotiated and moved, once in transmission (for status); null before. */
  figures(): SessionFigures | null {
    if (this.#export === null) return null;
    return {
      replies: this.#replies,
      flags: this.#flagNames,
      requests: this.#requests,
      bytesRead: this.#bytesRead,
      bytesWritten: this.#bytesWritten,
      inFlight: this.#inFlight,
    };
  }

  #reportHandshake(result: HandshakeResult): void {
    if (this.#handshakeReported) return;
    this.#handshakeReported = true;
    this.#host.metrics?.handshake(this.#listener, result, this.#tlsPeer !== null);
  }

  /**
   * Server shutdown: in the handshake, hang up now; in transmission, requests already
   * running finish, new ones get ESHUTDOWN, and the connection closes when none is left.
   */
  shutdown(): void {
    if (this.#export === null) {
      this.#hangUp();
      return;
    }
    if (this.#inFlight === 0) this.#hangUp();
  }

  /** Closes the connection at once. */
  destroy(): void {
    this.#hangUp();
  }

  // -------------------------------------------------------------------------------
  // Input

  #onData(chunk: Buffer, rx: RxBuffer | null): void {
    // One clock read per chunk, not per request: at QD32 a chunk holds many requests, and
    // their latency is counted from when their bytes arrived.
    const at = this.#requestSink !== null ? performance.now() : 0;
    if (this.#readPaused || this.#pendingHead < this.#pendingChunks.length) {
      if (rx) this.#rxBuffers.hold(rx);
      this.#pendingChunks.push({ chunk, rx, at });
      return;
    }
    this.#feed(chunk, rx, at);
  }

  /**
   * Parses as much of `chunk` (held in `rx`, or a fresh 'data' chunk) as the state allows;
   * keeps the rest if paused. Never re-entered: a resume asked for while parsing (a
   * request answered at once, from inside the parse) only unpauses, and the pending
   * bytes are fed, in order, once this parse is done.
   */
  #feed(chunk: Buffer, rx: RxBuffer | null, at: number): void {
    this.#feeding = rx;
    this.#arrived = at;
    this.#parsing = true;
    try {
      this.#parse(chunk);
    } finally {
      this.#feeding = null;
      this.#parsing = false;
    }
    if (this.#resumeAfterParse) {
      this.#resumeAfterParse = false;
      if (!this.#readPaused && !this.#closed) this.#resumeInput();
    }
  }

  #parse(chunk: Buffer): void {
    let pos = 0;
    const end = chunk.length;
    while (pos < end) {
      if (this.#readPaused) {
        const rx = this.#feeding;
        if (rx) this.#rxBuffers.hold(rx);
        this.#pendingChunks.push({ chunk: chunk.subarray(pos), rx, at: this.#arrived });
        return;
      }
      switch (this.#state) {
        case S.IGNORE:
          return;
        case S.TLS_HANDSHAKE:
          // The client must wait for STARTTLS's ACK before its ClientHello: bytes here
          // were sent in clear after the option and would be lost or misread.
          this.#log.info('data after STARTTLS before the TLS handshake, closing');
          this.#hangUp();
          return;
        case S.CLIENT_FLAGS:
        case S.OPTION_HEADER:
        case S.REQUEST_HEADER: {
          const need = this.#need;
          if (this.#scratchFill === 0 && end - pos >= need) {
            this.#onHeader(chunk, pos);
            pos += need;
          } else {
            const n = Math.min(need - this.#scratchFill, end - pos);
            chunk.copy(this.#scratch, this.#scratchFill, pos, pos + n);
            this.#scratchFill += n;
            pos += n;
            if (this.#scratchFill === need) {
              this.#scratchFill = 0;
              this.#onHeader(this.#scratch, 0);
            }
          }
          break;
        }
        case S.OPTION_DATA:
        case S.WRITE_PAYLOAD: {
          const body = this.#body!;
          const want = body.length - this.#bodyFill;
          if (this.#bodyFill === 0 && end - pos >= body.length && this.#state === S.WRITE_PAYLOAD && this.#feeding === null) {
            // The whole payload is in this 'data' chunk: use it in place ('data' chunks are never reused).
            this.#body = chunk.subarray(pos, pos + want);
            if (this.#bodyOwner) this.#host.pool.put(this.#bodyOwner);
            this.#bodyOwner = null;
            pos += want;
          } else {
            const n = Math.min(want, end - pos);
            chunk.copy(body, this.#bodyFill, pos, pos + n);
            this.#bodyFill += n;
            pos += n;
            if (this.#bodyFill < body.length) break;
          }
          const data = this.#body!;
          const owner = this.#bodyOwner;
          this.#body = null;
          this.#bodyOwner = null;
          this.#bodyFill = 0;
          if (this.#state === S.OPTION_DATA) this.#onOption(this.#option, data);
          else this.#onWritePayload(data, owner);
          break;
        }
        case S.GATHER_PAYLOAD: {
          // 'data' chunks are fresh allocations, never reused: slices of them stay valid.
          // A lent receive buffer is held until the request ends.
          const n = Math.min(this.#gatherLength - this.#bodyFill, end - pos);
          this.#slices.push(chunk.subarray(pos, pos + n));
          const rx = this.#feeding;
          if (rx) {
            this.#rxBuffers.hold(rx);
            this.#sliceRx.push(rx);
          }
          this.#bodyFill += n;
          pos += n;
          if (this.#bodyFill < this.#gatherLength) break;
          const slices = this.#slices;
          const held = this.#sliceRx;
          this.#slices = [];
          this.#sliceRx = [];
          this.#bodyFill = 0;
          this.#onWritePayload(slices.length === 1 ? slices[0]! : slices, null, held.length > 0 ? held : null);
          break;
        }
        case S.OPTION_SKIP:
        case S.DISCARD_PAYLOAD: {
          const n = Math.min(this.#skip, end - pos);
          this.#skip -= n;
          pos += n;
          if (this.#skip === 0) {
            if (this.#state === S.OPTION_SKIP) {
              this.#expect(S.OPTION_HEADER, NBD_SIZE.OPTION_HEADER);
              this.#onStep(this.#handshake.optionTooLong(this.#option));
            } else {
              this.#onDiscarded();
            }
          }
          break;
        }
      }
    }
  }

  #expect(state: State, need: number): void {
    this.#state = state;
    this.#need = need;
    this.#scratchFill = 0;
  }

  #onHeader(buf: Buffer, off: number): void {
    switch (this.#state) {
      case S.CLIENT_FLAGS:
        return this.#onClientFlags(buf.readUInt32BE(off));
      case S.OPTION_HEADER:
        return this.#onOptionHeader(buf, off);
      case S.REQUEST_HEADER:
        return this.#onRequestHeader(buf, off);
    }
  }

  // -------------------------------------------------------------------------------
  // Handshake

  #onClientFlags(flags: number): void {
    const outcome = this.#handshake.clientFlags(flags);
    if (outcome.kind !== 'continue') return this.#onOutcome(outcome);
    this.#expect(S.OPTION_HEADER, NBD_SIZE.OPTION_HEADER);
  }

  #onOptionHeader(buf: Buffer, off: number): void {
    const h = decodeOptionHeader(buf, off);
    if (!h.magicOk) {
      this.#log.info('bad option magic, closing');
      return this.#hangUp();
    }
    if (++this.#optionCount > this.#host.limits.maxOptions) {
      this.#log.info('too many options, closing');
      return this.#hangUp();
    }
    this.#option = h.option;
    if (h.length > this.#host.limits.maxOptionLength) {
      this.#skip = h.length;
      this.#state = S.OPTION_SKIP;
      return;
    }
    if (h.length === 0) return this.#onOption(h.option, EMPTY);
    this.#body = Buffer.allocUnsafe(h.length);
    this.#bodyFill = 0;
    this.#state = S.OPTION_DATA;
  }

  #onOption(option: number, data: Buffer): void {
    this.#expect(S.OPTION_HEADER, NBD_SIZE.OPTION_HEADER);
    this.#log.debug({ option: optionName(option), length: data.length }, 'option');
    this.#host.metrics?.option(this.#listener, option);
    this.#onStep(this.#handshake.option(option, data));
  }

  /** Sends a handshake step's replies, then acts on its outcome. */
  #onStep(step: HandshakeStep): void {
    // Bounded by maxOptions per connection, so a client cannot flood the log.
    if (step.refused !== null) this.#log.info(step.refused);
    if (!this.#closed) for (const r of step.replies) this.#socket.write(r);
    this.#onOutcome(step.outcome);
  }

  #onOutcome(outcome: HandshakeOutcome): void {
    switch (outcome.kind) {
      case 'continue':
        return;
      case 'hangUp':
        if (outcome.reason !== null) this.#log.info(outcome.reason);
        return this.#hangUp();
      case 'abort':
        this.#reportHandshake('abort');
        this.#state = S.IGNORE;
        this.#socket.end();
        return;
      case 'startTls':
        return this.#startTls();
      case 'transmission':
        return this.#enterTransmission(outcome.export, outcome.flags, outcome.mode, outcome.metaSelected);
    }
  }

  /**
   * After STARTTLS's ACK: stop reading in clear, and once the ACK has left, wrap the
   * socket in TLS. The handshake timer keeps running, so a client that stalls in the TLS
   * handshake is closed like one that stalls in the options.
   */
  #startTls(): void {
    this.#state = S.TLS_HANDSHAKE;
    const raw = this.#socket;
    raw.pause();
    raw.write(EMPTY, (err) => {
      if (err || this.#closed || this.#state !== S.TLS_HANDSHAKE) return;
      if (this.#pendingHead < this.#pendingChunks.length) {
        this.#log.info('data after STARTTLS before the TLS handshake, closing');
        return this.#hangUp();
      }
      let secure: TLSSocket;
      try {
        secure = upgradeToTls(raw, this.#tlsConfig);
      } catch (e) {
        this.#log.error({ err: e }, 'cannot start TLS');
        return this.#hangUp();
      }
      this.#socket = secure;
      this.#lent = false;
      secure.on('secure', () => this.#onSecure(secure));
      // Before 'secure', an error is a failed TLS handshake (wrong key, unknown CA, garbage).
      secure.on('error', (err: NodeJS.ErrnoException) => {
        if (this.#tlsPeer === null) this.#log.info({ code: err.code, reason: err.message }, 'TLS handshake failed, closing');
        secure.destroy();
      });
      secure.on('data', (chunk: Buffer) => this.#onData(chunk, null));
      this.#listen(secure);
    });
  }

  #onSecure(secure: TLSSocket): void {
    if (this.#closed) return;
    if (this.#tlsConfig.verifyPeer && this.#tlsConfig.pskKeys.size === 0) {
      const why = peerVerifyError(secure);
      if (why !== null) {
        this.#log.info({ reason: why }, 'TLS client certificate rejected, closing');
        secure.destroy();
        return;
      }
    }
    this.#tlsPeer = describeTlsPeer(secure);
    this.#handshake.tlsEstablished();
    const t = this.#tlsPeer;
    this.#log.info({ protocol: t.protocol, cipher: t.cipher, pskIdentity: t.pskIdentity, subject: t.subject }, 'TLS established');
    this.#expect(S.OPTION_HEADER, NBD_SIZE.OPTION_HEADER);
  }

  #enterTransmission(exp: Export, flags: number, mode: Mode, metaSelected: boolean): void {
    if (this.#handshakeTimer) clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = null;
    this.#extended = mode === MODE.EXTENDED;
    this.#requestSize = this.#extended ? NBD_SIZE.EXTENDED_REQUEST : NBD_SIZE.COMPACT_REQUEST;
    this.#writer = replyWriter(mode, (buf, release) => this.#send(buf, release), this.#host.pool);
    this.#runner = new RequestRunner({ export: exp, pool: this.#host.pool, limits: this.#host.limits, writer: this.#writer, holder: this });
    this.#export = exp;
    this.#device = exp.device;
    this.#vctx = {
      mode,
      tflags: flags,
      readOnly: exp.readOnly,
      metaSelected,
      device: exp.device,
      maxPayload: this.#host.limits.maxPayload,
      shuttingDown: false,
      hasPayload: false,
    };
    this.cursor = exp.errseq.sample();
    this.#seenCursor = this.cursor;
    exp.attach(this);
    this.#replies = modeName(mode);
    this.#flagNames = transmissionFlagNames(flags);
    const metrics = this.#host.metrics;
    if (metrics) {
      this.#reportHandshake('transmission');
      this.#requestSink = metrics.requests(exp, this.#listener);
      // Requests the client sent in the chunk that ended the handshake (read before there was a sink) start now.
      this.#arrived = performance.now();
    }
    this.#log.info({ export: exp.name, replies: this.#replies, flags: this.#flagNames }, 'transmission');
    this.#expect(S.REQUEST_HEADER, this.#requestSize);
  }

  // -------------------------------------------------------------------------------
  // Transmission: framing

  #onRequestHeader(buf: Buffer, off: number): void {
    const extended = this.#extended;
    const h = extended ? decodeExtendedRequest(buf, off) : decodeCompactRequest(buf, off);
    if (!h.magicOk) {
      // The stream is out of sync: nothing after this can be trusted.
      this.#log.info('bad request magic, closing');
      return this.#hangUp();
    }
    // Which requests carry a payload: compact WRITE; extended, any request with PAYLOAD_LEN.
    const hasPayload = extended
      ? (h.flags & NBD_CMD_FLAG.NBD_CMD_FLAG_PAYLOAD_LEN) !== 0
      : h.type === NBD_CMD.NBD_CMD_WRITE;
    if (!hasPayload) return this.#dispatch(h, null);
    const limits = this.#host.limits;
    if (h.type !== NBD_CMD.NBD_CMD_WRITE || h.length > limits.maxPayload) {
      if (!Number.isSafeInteger(h.length) || h.length > limits.maxDiscard) {
        this.#log.info({ length: h.length }, 'payload too large to skip, closing');
        return this.#hangUp();
      }
      this.#current = h;
      this.#skip = h.length;
      this.#state = S.DISCARD_PAYLOAD;
      if (h.length === 0) this.#onDiscarded();
      return;
    }
    this.#current = h;
    if (h.length === 0) return this.#onWritePayload(EMPTY, null);
    const dev = this.#device!;
    if (dev.writev && (!this.#lent || this.#rxBuffers.mayHold(h.length, dev.nonBlocking))) {
      // Zero copy: the device takes the payload as the socket delivered it.
      this.#gatherLength = h.length;
      this.#bodyFill = 0;
      this.#state = S.GATHER_PAYLOAD;
      return;
    }
    this.#bodyOwner = this.#host.pool.get(h.length);
    this.#body = this.#bodyOwner.subarray(0, h.length);
    this.#bodyFill = 0;
    this.#state = S.WRITE_PAYLOAD;
  }

  #onWritePayload(data: Payload, owner: Buffer | null, rx: readonly RxBuffer[] | null = null): void {
    const h = this.#current!;
    this.#current = null;
    this.#expect(S.REQUEST_HEADER, this.#requestSize);
    this.#dispatch(h, data, owner, rx);
  }

  #onDiscarded(): void {
    const h = this.#current!;
    this.#current = null;
    this.#expect(S.REQUEST_HEADER, this.#requestSize);
    const msg =
      h.type === NBD_CMD.NBD_CMD_WRITE
        ? `write of ${h.length} bytes exceeds the maximum payload of ${this.#host.limits.maxPayload}`
        : `${commandName(h.type)} does not take a payload`;
    // EINVAL, not EOVERFLOW: the spec keeps EOVERFLOW for DF reads and oversized payload-less requests.
    const code = 'EINVAL';
    const t0 = this.#begin(0);
    this.#finish({ h, cost: 0, owner: null, rx: null, t0 }, new WireError(new BlockError(code, msg)));
  }

  // -------------------------------------------------------------------------------
  // Transmission: requests

  /** Counts a request in flight; returns its start time for the metrics sink (when its bytes arrived; 0 without one). */
  #begin(cost: number): number {
    this.#inFlight++;
    this.#inFlightBytes += cost;
    this.#host.budget.take(cost);
    const l = this.#host.limits;
    if (!this.#readPaused && (this.#inFlight >= l.maxInFlightRequests || this.#inFlightBytes >= l.maxInFlightBytes)) {
      this.#pauseInput();
    }
    if (!this.#readPaused && this.#host.budget.exhausted) {
      this.#pauseInput();
      this.#host.budget.wait(this.#wake);
    }
    if (this.#requestSink === null) return 0;
    this.#requestSink.begin(cost);
    return this.#arrived;
  }

  #dispatch(h: RequestHeader, payload: Payload | null, owner: Buffer | null = null, rx: readonly RxBuffer[] | null = null): void {
    if (h.type === NBD_CMD.NBD_CMD_DISC) {
      // No reply; finish what is in flight, then close.
      this.#log.debug('DISC');
      this.#disconnecting = true;
      this.#state = S.IGNORE;
      if (this.#inFlight === 0) this.#hangUp();
      return;
    }
    const cost =
      payload ? h.length
      : h.type === NBD_CMD.NBD_CMD_READ ? Math.min(h.length, this.#host.limits.maxPayload)
      : h.type === NBD_CMD.NBD_CMD_BLOCK_STATUS ? this.#statusCost(h)
      : 0;
    const t0 = this.#begin(cost);
    const req: Request = { h, cost, owner, rx, t0 };
    const ctx = this.#vctx!;
    ctx.shuttingDown = this.#host.shuttingDown;
    ctx.hasPayload = payload !== null;
    const invalid = validateRequest(h, ctx);
    if (invalid) return this.#finish(req, new WireError(invalid));
    const runner = this.#runner!;
    runner.run(h, payload).then(
      (result) => this.#finish(req, result),
      (e: unknown) => this.#finish(req, runner.failed(h, e)),
    );
  }

  /** The most reply bytes a BLOCK_STATUS can need: one descriptor per minimum block, at most maxExtents. */
  #statusCost(h: RequestHeader): number {
    if (h.flags & NBD_CMD_FLAG.NBD_CMD_FLAG_REQ_ONE) return STATUS_DESCRIPTOR_BYTES;
    const blocks = Math.ceil(h.length / this.#device!.blockSize.minimum);
    return Math.min(blocks, this.#host.limits.maxExtents) * STATUS_DESCRIPTOR_BYTES;
  }

  // -------------------------------------------------------------------------------
  // Replies

  #finish(req: Request, result: Reply): void {
    this.#inFlight--;
    this.#inFlightBytes -= req.cost;
    this.#host.budget.release(req.cost);
    // The device is done with the payload (BlockDevice.write must not keep it).
    if (req.owner) this.#host.pool.put(req.owner);
    if (req.rx) for (const r of req.rx) this.#rxBuffers.release(r);
    this.#count(req, result);
    if (!this.#closed) {
      // The last request in flight: nothing else can join this batch, so its reply leaves
      // now (one writev) rather than at the end of the event-loop turn. At queue depth 1
      // this saves a loop phase per request (measured +7-10 % IOPS with fio QD1).
      const flushNow = this.#inFlight === 0 && !this.#corked;
      if (flushNow) {
        this.#corked = true;
        this.#socket.cork();
      }
      try {
        this.#reply(req.h, result);
      } catch (e) {
        this.#log.error({ err: e }, 'failed to encode a reply');
        this.#hangUp();
      }
      if (flushNow && this.#corked) {
        this.#corked = false;
        this.#socket.uncork();
        // As #uncork does: a peer that stops reading while sending one request at a time must still be paused.
        if (!this.#readPaused && this.#repliesBacklogged()) this.#pauseInput();
      }
    }
    if (this.#inFlight === 0 && (this.#disconnecting || this.#host.shuttingDown)) {
      this.#hangUp();
      return;
    }
    this.#maybeResume();
  }

  /** The figures of a finished request: this session's, and the metrics sink's. No allocation. */
  #count(req: Request, result: Reply): void {
    const h = req.h;
    const failed = result instanceof WireError;
    this.#requests++;
    if (!failed) {
      if (h.type === NBD_CMD.NBD_CMD_READ) this.#bytesRead += h.length;
      else if (h.type === NBD_CMD.NBD_CMD_WRITE) this.#bytesWritten += h.length;
    }
    const sink = this.#requestSink;
    if (sink === null) return;
    const errno = failed ? nbdErrno(result.error, h.type, h.flags) : 0;
    // Replies queued in one batch (corked until the end of the event-loop turn) share the
    // clock read of the first: they end microseconds apart, below the first bucket's 10 µs.
    const now = this.#corked ? this.#batchTime : (this.#batchTime = performance.now());
    sink.end(h.type, h.length, req.cost, errno, req.t0, now);
    if (this.cursor !== this.#seenCursor) {
      // The runner advanced the cursor: this request's reply told the session of a write-back error.
      this.#seenCursor = this.cursor;
      this.#host.metrics!.errorReported(this.#export!, this.id, this.peer, this.#export!.errseq.peekError());
    }
  }

  /** Queues bytes for the peer, corked until the end of this event-loop turn; `release` goes back to the pool once written. */
  #send(buf: Buffer, release?: Buffer): void {
    if (!this.#corked) {
      this.#corked = true;
      this.#socket.cork();
      setImmediate(this.#uncork);
    }
    if (release) {
      const pool = this.#host.pool;
      this.#socket.write(buf, () => pool.put(release));
    } else {
      this.#socket.write(buf);
    }
  }

  readonly #uncork = (): void => {
    this.#corked = false;
    this.#socket.uncork();
    if (!this.#readPaused && this.#repliesBacklogged()) this.#pauseInput();
  };

  #reply(h: RequestHeader, result: Reply): void {
    const w = this.#writer!;
    if (result instanceof WireError) return this.#replyError(w, h, result);
    if (result === null) return w.done(h);
    if ('descs' in result) return w.blockStatus(h, result.descs);
    if ('views' in result) {
      if (this.#closed) return;
      return w.views(h, result.views);
    }
    if (this.#closed) return this.#host.pool.put(result.owner);
    w.read(h, result);
  }

  #replyError(w: ReplyWriter, h: RequestHeader, err: WireError): void {
    const e = err.error;
    if (e.code !== 'ESHUTDOWN') this.#host.errorLog.log(this.#log, err.thrown ?? e, e, { cmd: commandName(h.type), export: this.#export?.name });
    // The failing offset is sent only if it lies inside the request (a read's own failure).
    const withOffset = err.withOffset && e.offset !== undefined && e.offset >= h.offset && e.offset < h.offset + h.length;
    w.error(h, nbdErrno(e, h.type, h.flags), e.message, withOffset ? e.offset : undefined);
  }

  // -------------------------------------------------------------------------------
  // Flow control and close

  /**
   * True when replies wait in the socket's own queue (the kernel did not take them all).
   * Not `writableNeedDrain`: that stays set until the next tick even when the write just
   * went out whole, and pausing on it stopped and restarted reading (two epoll_ctl calls
   * and a 'drain' round) after every batch of replies above 16 KiB.
   */
  #repliesBacklogged(): boolean {
    return this.#socket.writableLength >= this.#socket.writableHighWaterMark;
  }

  #pauseInput(): void {
    this.#readPaused = true;
    this.#socket.pause();
  }

  #maybeResume(): void {
    if (!this.#readPaused || this.#closed) return;
    const l = this.#host.limits;
    if (this.#inFlight >= l.maxInFlightRequests || this.#inFlightBytes >= l.maxInFlightBytes) return;
    if (this.#repliesBacklogged()) return;
    if (this.#host.budget.exhausted) return this.#host.budget.wait(this.#wake);
    this.#readPaused = false;
    if (this.#parsing) {
      this.#resumeAfterParse = true;
      return;
    }
    this.#resumeInput();
  }

  /** Feeds the bytes kept while paused, in order, then lets the socket read again. */
  /** Called by the server budget when bytes come back. */
  readonly #wake = (): void => this.#maybeResume();

  #resumeInput(): void {
    // The fields, not locals: feeding can pause again (and queue the rest) or resume
    // the feeding from inside #feed.
    while (this.#pendingHead < this.#pendingChunks.length && !this.#readPaused) {
      const { chunk, rx, at } = this.#pendingChunks[this.#pendingHead++]!;
      this.#feed(chunk, rx, at);
      if (rx) this.#rxBuffers.release(rx);
    }
    if (this.#pendingHead === this.#pendingChunks.length) {
      this.#pendingChunks = [];
      this.#pendingHead = 0;
    }
    if (!this.#readPaused && !this.#closed) this.#socket.resume();
  }

  #hangUp(): void {
    this.#state = S.IGNORE;
    if (this.#handshakeTimer) clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = null;
    if (this.#corked) {
      this.#corked = false;
      this.#socket.uncork();
    }
    this.#socket.end();
    // Half-closed peers that never read would keep the socket; destroy after the flush.
    this.#socket.destroySoon();
  }

  #onClose(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#state = S.IGNORE;
    this.#pendingChunks = [];
    this.#pendingHead = 0;
    this.#rxBuffers.close();
    this.#host.budget.forget(this.#wake);
    if (this.#handshakeTimer) clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = null;
    this.#export?.detach(this);
    this.#reportHandshake('failed');
    this.#host.metrics?.connectionClosed(this.#listener);
    // A session that served an export gets a closing line beside its 'transmission' one;
    // probes that never got past the handshake (nbdinfo --list, health checks) stay at debug.
    if (this.#export) this.#log.info({ export: this.#export.name }, 'closed');
    else this.#log.debug('closed');
    this.#host.sessionClosed(this);
  }
}
