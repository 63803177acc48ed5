/**
 * The ggatec forwarder: serves a gate by passing its requests to a remote ggated over
 * the GEOM Gate wire protocol (FreeBSD's `ggatec`, sbin/ggate/ggatec/ggatec.c), with
 * blockgate's gate calls (START/DONE/CANCEL over the control socket, or an in-process
 * GateRegistry) in place of the kernel's ioctls.
 *
 * Requests, as ggatec's send and receive threads do them:
 * - START takes the gate's next request. READ, WRITE and FLUSH go out on the send
 *   connection as a g_gate_hdr {cmd 0/1/3, offset, length, seq, error 0}, a WRITE
 *   followed by exactly `length` payload bytes. gh_seq is the client's own counter
 *   (FreeBSD sends the kernel's gctl_seq; the server only echoes it).
 * - DELETE (NBD trim) is not in the wire protocol (W2): it is answered here with
 *   EOPNOTSUPP, as FreeBSD's ggatec does. The gate still advertises trim to NBD
 *   clients, who see EOPNOTSUPP for it (trim is advisory; zeroing goes out as WRITEs
 *   of zeroes and works).
 * - Replies are matched by gh_seq. A reply must echo its request's cmd, offset and
 *   length (A.4 #11); its payload (READ with error 0 only, W3) is read exactly; DONE
 *   carries gh_error, a FreeBSD errno on the wire (W7), as an errno code: remote device
 *   errors reach the requester. A reply whose seq is unknown is skipped (the kernel
 *   ignores an unknown seq); one that does not echo its request is a protocol error
 *   and is handled like a lost connection.
 *
 * One START is outstanding at a time, and each request is put on the wire before the
 * next START, so requests leave in exactly the order the gate hands them out. ggated
 * serves each client's requests one at a time in arrival order, so a FLUSH completes
 * only after every write sent before it.
 *
 * Reconnecting (W8): any error, end or close of either connection, or a protocol
 * error, tears both connections down. No request is failed: the loop stops taking
 * requests, lets the DONEs of replies already received reach the gate, then connects
 * again at once and every `reconnectIntervalMs` (ggatec's sleep(2)), each attempt with
 * a fresh random token, until it succeeds. Then CANCEL (seq 0) puts every request still
 * in flight back at the head of the gate's queue in the order they were taken, and
 * they are resent, in that order, on the new connection. A lost connection is a
 * transport event (W9): it never becomes a DONE with an error, so nothing is recorded
 * in any ErrSeq on its account. (A `-t` timeout on the gate still fails requests that
 * wait longer than it, with EIO, as in FreeBSD.)
 *
 * How it ends: START resolving ECANCELED (the gate was destroyed) resolves the promise;
 * so does the gate vanishing while disconnected (checked with LIST between attempts,
 * where the gate calls have it) or a START/CANCEL finding the unit gone (ENXIO: it was
 * destroyed between two calls). Aborting `signal` stops taking requests, waits up to
 * `stopGraceMs` for the replies to those already sent, then rejects EINTR; requests
 * left unanswered stay in flight on the gate for `rescue` (CANCEL seq 0). Any other
 * failure of a gate call (the control socket lost) rejects.
 *
 * Over 500 lines: the forwarder's send and receive sides, its reconnection and the
 * requeueing of requests in flight across a reconnection share one table of outstanding
 * requests; the connection pair itself is in ggatec-link.ts.
 */
import { BlockError, toBlockError, type ErrnoCode } from '../errors/index.js';
import { GATE, type GateCancelArgs, type GateCommand, type GateInfo, type GateStartRequest } from '../gate/index.js';
import {
  ERRNO_DIALECT,
  GGATE_CMD,
  GGATE_SIZE,
  GGATE_TIMING,
  decodeHdr,
  encodeHdr,
  replyPayloadLength,
  wireErrorCode,
  type ErrnoDialect,
  type GgateHdr,
  type U64,
} from './protocol.js';
import {
  validateReply,
} from './validate.js';
import { CONTROL } from '../gate/control/protocol.js';
import type { GateCalls, ServeGateEvent } from '../gate/handler.js';
import { connectGgatec, randomToken, type GgatecLink, type GgatecTarget } from './ggatec-link.js';

export { GGATEC_LINK, GgatecLink, cinitFlags, connectGgatec, randomToken, type GgatecConnectOptions, type GgatecTarget } from './ggatec-link.js';

/** Constants of the forwarder. */
export const GGATEC = {
  /** Pause between connection attempts after a loss (ggatec: `sleep(2)`); the first attempt is immediate. */
  RECONNECT_INTERVAL_MS: GGATE_TIMING.RECONNECT_INTERVAL_MS,
  /**
   * After a stop is asked for, how long replies to requests already sent are waited
   * for; the rest stay in flight on the gate for `rescue`. The socket timeout of
   * FreeBSD's ggatec (8 s), as the longest a reply is expected to take.
   */
  STOP_GRACE_MS: GGATE_TIMING.SOCKET_TIMEOUT_MS,
  /**
   * The buffer length declared to START. Nothing is allocated for it (the payload comes
   * with the START reply), so the largest the control socket carries is declared and
   * START never asks to grow (ENOMEM); larger WRITEs cannot reach a handler at all.
   */
  START_LENGTH: CONTROL.MAX_DATA,
} as const;

/** The gate calls the forwarder needs: a ControlClient or a GateRegistry has them. */
export interface GgatecGateCalls extends GateCalls {
  cancel(args: GateCancelArgs): Promise<void>;
  /** Used between connection attempts to notice that the gate was destroyed meanwhile. */
  list?(): GateInfo[] | Promise<GateInfo[]>;
}

/** Something the forwarder did, for logs (`ggatec -v`) and tests. */
export type GgatecEvent =
  | { readonly type: 'connecting'; readonly attempt: number; readonly token: number }
  | { readonly type: 'connect-failed'; readonly attempt: number; readonly token: number; readonly error: BlockError }
  | {
      readonly type: 'connected';
      readonly attempt: number;
      readonly token: number;
      readonly mediasize: number;
      readonly sectorsize: number;
    }
  /** Both connections were torn down; `inFlight` requests were on the wire unanswered. */
  | { readonly type: 'disconnected'; readonly reason: string; readonly inFlight: number }
  /** CANCEL (seq 0) after a reconnection: requests in flight are back at the head of the queue. */
  | { readonly type: 'requeued'; readonly token: number }
  /** A request done, as a handler loop reports it; `remote` false for those answered here without the server (DELETE). */
  | (Extract<ServeGateEvent, { readonly type: 'request' }> & { readonly remote: boolean })
  /** A reply with a seq nothing was sent with; skipped. */
  | { readonly type: 'stray-reply'; readonly seq: U64; readonly cmd: number };

/** What the gate must look like for a server's geometry to be usable for it. */
export interface GgatecGeometry {
  readonly mediasize: number;
  readonly sectorsize: number;
}

export interface GgatecOptions {
  /** The ggated and path to forward to. */
  readonly target: GgatecTarget;
  /**
   * A connection already made (create and rescue connect before they touch the gate,
   * so an unreachable server fails them at once). Without it the first connection is
   * made with the retry rules of a reconnection.
   */
  readonly link?: GgatecLink;
  /**
   * The gate's geometry. A connection whose server reports a smaller mediasize, or a
   * sector size that does not divide the gate's, counts as a failed attempt (EINVAL)
   * and is retried: requests wait rather than being sent to an export that changed.
   */
  readonly geometry?: GgatecGeometry;
  /** The gate's name, to tell it apart from a later gate reusing its unit when checking with LIST. */
  readonly gateName?: string;
  /** Default {@link GGATEC.RECONNECT_INTERVAL_MS}. */
  readonly reconnectIntervalMs?: number;
  /** Deadline of each handshake; default GGATEC_LINK.HANDSHAKE_TIMEOUT_MS. */
  readonly handshakeTimeoutMs?: number;
  /** Default {@link GGATEC.STOP_GRACE_MS}. */
  readonly stopGraceMs?: number;
  /** Errno numbering of the server (FreeBSD by default, W7). */
  readonly dialect?: ErrnoDialect;
  /** Stops the forwarder (see the module comment); the gate stays. */
  readonly signal?: AbortSignal;
  readonly onEvent?: (e: GgatecEvent) => void;
}

/** What a forwarder did, resolved when the gate is gone. */
export interface GgatecResult {
  /** Requests answered (successfully or with an error). */
  readonly served: number;
  /** Requests answered with an error (from the server, or EOPNOTSUPP for DELETE). */
  readonly failed: number;
  /** Connections lost (each followed by a reconnection, unless the forwarder ended first). */
  readonly disconnects: number;
  /** Successful connections, the first included. */
  readonly connects: number;
}

/** A request on the wire, waiting for its reply. */
interface Sent {
  readonly gateSeq: number;
  readonly gateCmd: GateCommand;
  readonly cmd: number;
  readonly offset: number;
  readonly length: number;
}

const WIRE_CMD = {
  read: GGATE_CMD.GGATE_CMD_READ,
  write: GGATE_CMD.GGATE_CMD_WRITE,
  flush: GGATE_CMD.GGATE_CMD_FLUSH,
} as const;

function hasCode(e: unknown, ...codes: ErrnoCode[]): boolean {
  return e instanceof BlockError && codes.includes(e.code);
}

function checkDelay(v: number, what: string): void {
  if (!Number.isSafeInteger(v) || v < 0) throw new BlockError('EINVAL', `ggatec: ${what} must be a non-negative integer (ms), got ${v}`);
}

/**
 * Serves gate `unit` by forwarding to `opts.target` until the gate is destroyed
 * (resolves) or the forwarder is stopped (rejects EINTR) or fails (rejects).
 */
export function serveGgatec(calls: GgatecGateCalls, unit: number, opts: GgatecOptions): Promise<GgatecResult> {
  return new GgatecForwarder(calls, unit, opts).run();
}

class GgatecForwarder {
  readonly #calls: GgatecGateCalls;
  readonly #unit: number;
  readonly #opts: GgatecOptions;
  readonly #dialect: ErrnoDialect;
  readonly #interval: number;
  readonly #grace: number;
  readonly #emit: (e: GgatecEvent) => void;
  /** Aborted by the caller's signal or by a failure: ends every wait. */
  readonly #halt = new AbortController();

  #link: GgatecLink | null = null;
  /**
   * Aborted when the current link is lost or the forwarder halts: the signal of every
   * START on that link. Made once per link, not per START: on Node 20 each
   * AbortSignal.any() leaves an entry in its sources until they abort, so one per
   * request would grow the long-lived #halt signal without bound.
   */
  #linkSignal: AbortSignal | null = null;
  /** Requests on the current link, by wire seq (a JS number: 2^53 requests will not happen). */
  readonly #sent = new Map<number, Sent>();
  #wireSeq = 1;
  /** DONE calls not yet settled. */
  readonly #dones = new Set<Promise<void>>();
  /** Woken whenever #sent shrinks or the link is lost (the stop grace waits on it). */
  #progress: (() => void) | null = null;

  #stopped = false;
  #destroyed = false;
  #failure: { error: unknown } | undefined;
  #stats = { served: 0, failed: 0, disconnects: 0, connects: 0 };

  constructor(calls: GgatecGateCalls, unit: number, opts: GgatecOptions) {
    this.#calls = calls;
    this.#unit = unit;
    this.#opts = opts;
    this.#dialect = opts.dialect ?? ERRNO_DIALECT.freebsd;
    this.#interval = opts.reconnectIntervalMs ?? GGATEC.RECONNECT_INTERVAL_MS;
    this.#grace = opts.stopGraceMs ?? GGATEC.STOP_GRACE_MS;
    checkDelay(this.#interval, 'reconnectIntervalMs');
    checkDelay(this.#grace, 'stopGraceMs');
    this.#emit = opts.onEvent ?? (() => undefined);
  }

  async run(): Promise<GgatecResult> {
    const user = this.#opts.signal;
    const onStop = (): void => {
      this.#stopped = true;
      this.#halt.abort(user?.reason);
    };
    if (user?.aborted) {
      this.#opts.link?.close();
      throw new BlockError('EINTR', 'ggatec: stopped before it started', { cause: user.reason });
    }
    user?.addEventListener('abort', onStop, { once: true });
    try {
      if (this.#opts.link !== undefined) {
        this.#stats.connects++;
        this.#attach(this.#opts.link);
      }
      await this.#loop();
    } catch (e) {
      this.#fail(e);
    } finally {
      user?.removeEventListener('abort', onStop);
    }
    await this.#finish();
    const failed = this.#failure as { error: unknown } | undefined;
    if (failed !== undefined) throw failed.error;
    if (this.#destroyed) return { ...this.#stats };
    throw new BlockError('EINTR', 'ggatec: stopped by the caller', { cause: user?.reason });
  }

  get #ending(): boolean {
    return this.#stopped || this.#destroyed || this.#failure !== undefined;
  }

  #fail(e: unknown): void {
    this.#failure ??= { error: e };
    this.#halt.abort(e);
  }

  // -------------------------------------------------------------------------------
  // The send side: START, then onto the wire

  async #loop(): Promise<void> {
    while (!this.#ending) {
      const link = this.#link;
      const signal = this.#linkSignal;
      if (link === null || link.lost || signal === null) {
        await this.#recover();
        continue;
      }
      let r;
      try {
        r = await this.#calls.start({
          version: GATE.VERSION,
          unit: this.#unit,
          length: GGATEC.START_LENGTH,
          signal,
        });
      } catch (e) {
        // Our own abort (link lost, stop, failure): the loop looks again.
        if (hasCode(e, 'EINTR')) continue;
        // The unit vanished between two STARTs: it was destroyed (see the module comment).
        if (hasCode(e, 'ENXIO')) {
          this.#destroyed = true;
          return;
        }
        throw e;
      }
      if (r.error === 'ECANCELED') {
        this.#destroyed = true;
        return;
      }
      if (r.error === 'ENOMEM') {
        throw new BlockError('ENOMEM', `a write of ${r.length} bytes is waiting; the control socket carries at most ${GGATEC.START_LENGTH}`);
      }
      this.#dispatch(r, link);
      if (link.needsDrain) await link.drained(this.#halt.signal);
    }
  }

  /** Puts a request taken from the gate on the wire (or answers a DELETE). */
  #dispatch(r: GateStartRequest, link: GgatecLink): void {
    // Taken while the link went down: it is in flight on the gate, and the CANCEL after
    // the reconnection puts it back in order.
    if (link.lost) return;
    if (r.cmd === 'delete') {
      this.#done(r.seq, 'EOPNOTSUPP', undefined);
      this.#count(r, 'EOPNOTSUPP', false);
      return;
    }
    const cmd = WIRE_CMD[r.cmd];
    let payload: Buffer | undefined;
    if (r.cmd === 'write') {
      payload = r.data ?? Buffer.alloc(0);
      if (payload.length !== r.length) {
        // Never happens with a correct gate; refuse rather than desynchronise the stream.
        this.#done(r.seq, 'EIO', undefined);
        this.#count(r, 'EIO', false);
        return;
      }
    }
    const seq = this.#wireSeq++;
    this.#sent.set(seq, { gateSeq: r.seq, gateCmd: r.cmd, cmd, offset: r.offset, length: r.length });
    link.send(encodeHdr({ cmd, offset: r.offset, length: r.length, seq, error: null }, this.#dialect), payload);
  }

  // -------------------------------------------------------------------------------
  // The receive side: replies to DONE

  #attach(link: GgatecLink): void {
    this.#link = link;
    this.#linkSignal = AbortSignal.any([link.signal, this.#halt.signal]);
    this.#sent.clear();
    link.signal.addEventListener('abort', () => this.#wake(), { once: true });
    this.#expectReply(link);
    link.receive();
  }

  #expectReply(link: GgatecLink): void {
    link.reader.expectFixed(GGATE_SIZE.HDR_SIZE, (buf, off) => this.#onReply(link, buf, off));
  }

  #onReply(link: GgatecLink, buf: Buffer, off: number): void {
    if (link !== this.#link || link.lost) return;
    const d = decodeHdr(buf, off, this.#dialect);
    // The reader delivers exactly HDR_SIZE bytes.
    if (!d.ok) return link.lose('short reply header');
    const hdr = d.value;
    const sent = typeof hdr.seq === 'number' ? this.#sent.get(hdr.seq) : undefined;
    const payload = replyPayloadLength(hdr);
    if (sent === undefined) {
      this.#emit({ type: 'stray-reply', seq: hdr.seq, cmd: hdr.cmd });
      link.reader.expectSkip(payload, () => this.#expectReply(link));
      return;
    }
    if (validateReply(sent, hdr) !== null) {
      // The payload length follows from the header, so a header that does not echo its
      // request may put us out of step: start over on a new connection (W8).
      return link.lose(`reply ${String(hdr.seq)} does not echo its request (cmd ${hdr.cmd}/${sent.cmd}, length ${hdr.length}/${sent.length})`);
    }
    if (payload === 0) {
      this.#complete(hdr.seq as number, sent, hdr, undefined);
      this.#expectReply(link);
      return;
    }
    // validateReply made payload === sent.length: bounded by what we asked for.
    link.reader.expectBody(payload, (data) => {
      if (link !== this.#link || link.lost) return;
      this.#complete(hdr.seq as number, sent, hdr, data);
      this.#expectReply(link);
    });
  }

  #complete(wireSeq: number, sent: Sent, hdr: GgateHdr, data: Buffer | undefined): void {
    this.#sent.delete(wireSeq);
    const error = wireErrorCode(hdr.errno, this.#dialect) ?? 0;
    this.#done(sent.gateSeq, error, error === 0 ? data : undefined);
    this.#count({ cmd: sent.gateCmd, seq: sent.gateSeq, offset: sent.offset, length: sent.length }, error, true);
    this.#wake();
  }

  #count(r: { cmd: GateCommand; seq: number; offset: number; length: number }, error: ErrnoCode | 0, remote: boolean): void {
    this.#stats.served++;
    if (error !== 0) this.#stats.failed++;
    this.#emit({ type: 'request', cmd: r.cmd, seq: r.seq, offset: r.offset, length: r.length, error, remote });
  }

  #done(seq: number, error: ErrnoCode | 0, data: Buffer | undefined): void {
    const p = this.#calls
      .done({ version: GATE.VERSION, unit: this.#unit, seq, error, ...(data !== undefined ? { data } : {}) })
      .catch((e: unknown) => {
        // The unit is gone (destroyed while the reply travelled): START says so next.
        if (hasCode(e, 'ENOENT', 'ENXIO')) return;
        this.#fail(e);
      })
      .finally(() => this.#dones.delete(p));
    this.#dones.add(p);
  }

  #wake(): void {
    const w = this.#progress;
    this.#progress = null;
    w?.();
  }

  // -------------------------------------------------------------------------------
  // Reconnecting

  /** After a loss (or before the first connection): connect, CANCEL (seq 0), attach. */
  async #recover(): Promise<void> {
    const old = this.#link;
    if (old !== null) {
      this.#link = null;
      this.#linkSignal = null;
      this.#stats.disconnects++;
      this.#emit({ type: 'disconnected', reason: old.reason ?? 'lost', inFlight: this.#sent.size });
      this.#sent.clear();
    }
    // DONEs of replies that arrived before the loss reach the gate before the CANCEL
    // (calls on one control connection run in order; waiting makes it plain).
    await Promise.allSettled([...this.#dones]);
    const link = await this.#connectLoop();
    if (link === null) return;
    try {
      await this.#calls.cancel({ version: GATE.VERSION, unit: this.#unit, seq: 0 });
    } catch (e) {
      link.close();
      if (hasCode(e, 'ENXIO')) {
        this.#destroyed = true;
        return;
      }
      throw e;
    }
    this.#stats.connects++;
    this.#emit({ type: 'requeued', token: link.token });
    this.#attach(link);
  }

  /** Connects until it works; null if the forwarder is ending (stopped, or the gate is gone). */
  async #connectLoop(): Promise<GgatecLink | null> {
    for (let attempt = 1; ; attempt++) {
      if (this.#ending) return null;
      const token = randomToken();
      this.#emit({ type: 'connecting', attempt, token });
      try {
        const link = await connectGgatec(this.#opts.target, {
          token,
          signal: this.#halt.signal,
          dialect: this.#dialect,
          ...(this.#opts.handshakeTimeoutMs !== undefined ? { handshakeTimeoutMs: this.#opts.handshakeTimeoutMs } : {}),
        });
        const misfit = this.#misfit(link);
        if (misfit === null) {
          this.#emit({ type: 'connected', attempt, token, mediasize: link.mediasize, sectorsize: link.sectorsize });
          return link;
        }
        link.close();
        this.#emit({ type: 'connect-failed', attempt, token, error: misfit });
      } catch (e) {
        if (this.#ending) return null;
        this.#emit({ type: 'connect-failed', attempt, token, error: toBlockError(e) });
      }
      if (await this.#gateGone()) {
        this.#destroyed = true;
        return null;
      }
      await this.#sleep(this.#interval);
    }
  }

  /** Why a new connection cannot serve this gate, or null. */
  #misfit(link: GgatecLink): BlockError | null {
    const g = this.#opts.geometry;
    if (g === undefined) return null;
    if (link.mediasize < g.mediasize || g.sectorsize % link.sectorsize !== 0) {
      return new BlockError(
        'EINVAL',
        `the server's ${this.#opts.target.path} is now ${link.mediasize} bytes with ${link.sectorsize}-byte sectors; the gate needs ${g.mediasize} bytes with sectors dividing ${g.sectorsize}`,
      );
    }
    return null;
  }

  async #gateGone(): Promise<boolean> {
    if (this.#calls.list === undefined) return false;
    const gates = await this.#calls.list();
    const name = this.#opts.gateName;
    return !gates.some((g) => g.unit === this.#unit && (name === undefined || g.name === name));
  }

  #sleep(ms: number): Promise<void> {
    const signal = this.#halt.signal;
    if (signal.aborted) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        signal.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal.addEventListener('abort', done, { once: true });
    });
  }

  // -------------------------------------------------------------------------------
  // Ending

  async #finish(): Promise<void> {
    const link = this.#link;
    if (this.#stopped && !this.#destroyed && this.#failure === undefined && link !== null) {
      // Answer what can be answered: replies to requests already sent, for a while.
      const deadline = Date.now() + this.#grace;
      while (this.#sent.size > 0 && !link.lost && Date.now() < deadline) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(() => {
            this.#progress = null;
            resolve();
          }, deadline - Date.now());
          this.#progress = () => {
            clearTimeout(timer);
            resolve();
          };
        });
      }
    }
    await Promise.allSettled([...this.#dones]);
    this.#link = null;
    link?.close();
  }
}
