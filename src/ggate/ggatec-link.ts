/**
 * One ggatec connection to a ggated: the pair of TCP connections of FreeBSD's
 * `g_gatec_connect()` (sbin/ggate/ggatec/ggatec.c), set up with one random token.
 *
 * 1. A fresh 32-bit token for every attempt (FreeBSD: arc4random; here crypto.randomInt).
 * 2. Connection #1 is the client's *receive* socket: its cinit carries GGATE_FLAG_SEND
 *    (direction bits are from the server's point of view: the server sends on it).
 *    Connection #2 is the client's *send* socket, with GGATE_FLAG_RECV.
 * 3. Each handshake: g_gate_version out, the echo in (magic, version 0, gv_error 0), then
 *    g_gate_cinit out {path, access | direction, nconn 2, token}, g_gate_sinit in. A
 *    server that dislikes the version just closes; a refused cinit gets an sinit whose
 *    gs_error (a FreeBSD errno, W7) says why, and that is the attempt's error.
 *
 * Unlike FreeBSD's ggatec, every read here is exact (a frame accumulator, not recv()
 * with only `== -1` checked, A.4 #9), and each handshake has a deadline.
 *
 * After the handshake a {@link GgatecLink} holds both sockets. Anything that happens to
 * either of them (an error, an end, a close, a protocol violation reported by the
 * user) marks the link lost once and tears both down: a link is never half alive
 * (W8). What to do then is the forwarder's business (ggatec.ts).
 */
import net from 'node:net';
import { randomInt } from 'node:crypto';
import { BlockError, toBlockError } from '../errors/index.js';
import {
  GGATE,
  GGATE_FLAG,
  GGATE_SIZE,
  GGATE_TIMING,
  decodeSinit,
  decodeVersion,
  encodeCinit,
  encodeVersion,
  ERRNO_DIALECT,
  type ErrnoDialect,
} from './protocol.js';
import {
  validateSinit,
  type GgateAccess,
} from './validate.js';
import { FrameReader } from '../io/framer.js';

/** Where a ggatec connects, and how. */
export interface GgatecTarget {
  /** Host name or IPv4 address of the ggated (names resolve to IPv4, as FreeBSD's g_gate_str2ip). */
  readonly host: string;
  /** TCP port; FreeBSD's default is GGATE.G_GATE_PORT (3080). */
  readonly port: number;
  /** The exported path, as named in the server's exports file (at most PATH_MAX bytes). */
  readonly path: string;
  /** Access asked for in gc_flags. */
  readonly access: GgateAccess;
  /** Set TCP_NODELAY (ggatec's default; `-n` turns it off). Default true. */
  readonly noDelay?: boolean;
}

/** Options of one connection attempt. */
export interface GgatecConnectOptions {
  /** The token; default a fresh random u32 (only tests pass one). */
  readonly token?: number;
  /** Deadline of each of the two handshakes, from connect() to the sinit; default {@link GGATEC_LINK.HANDSHAKE_TIMEOUT_MS}. */
  readonly handshakeTimeoutMs?: number;
  /** Aborting gives up the attempt (EINTR). */
  readonly signal?: AbortSignal;
  /** Errno numbering of the peer (FreeBSD by default, W7). */
  readonly dialect?: ErrnoDialect;
}

/** Constants of a ggatec connection. */
export const GGATEC_LINK = {
  /**
   * Deadline of one handshake: FreeBSD's sockets have SO_RCVTIMEO = SO_SNDTIMEO = 8 s
   * (g_gate_socket_settings), which is how long its handshake can stall.
   */
  HANDSHAKE_TIMEOUT_MS: GGATE_TIMING.SOCKET_TIMEOUT_MS,
  /**
   * TCP keepalive idle time. FreeBSD's ggatec has none (its recv() retries on the
   * receive timeout); keepalive lets a silent peer (a host that vanished without a
   * RST) be noticed eventually, so the link is lost and re-established rather than
   * stuck. Best effort: only the idle time can be set from Node.js.
   */
  KEEPALIVE_IDLE_MS: 15_000,
  /** The largest fixed frame a client reads: g_gate_hdr (23 bytes) > version (20) > sinit (15). */
  MAX_FIXED_FRAME: Math.max(GGATE_SIZE.HDR_SIZE, GGATE_SIZE.VERSION_SIZE, GGATE_SIZE.SINIT_SIZE),
  /** Exclusive upper bound of a token (u32). */
  TOKEN_LIMIT: 0x1_0000_0000,
} as const;

const ACCESS_FLAGS: Record<GgateAccess, number> = {
  ro: GGATE_FLAG.GGATE_FLAG_RDONLY,
  wo: GGATE_FLAG.GGATE_FLAG_WRONLY,
  rw: 0,
};

/** The gc_flags of one connection: the access bits and the direction bit. */
export function cinitFlags(access: GgateAccess, direction: 'send' | 'recv'): number {
  return ACCESS_FLAGS[access] | (direction === 'send' ? GGATE_FLAG.GGATE_FLAG_SEND : GGATE_FLAG.GGATE_FLAG_RECV);
}

/** A fresh random token (a u32, as arc4random() gives). */
export function randomToken(): number {
  return randomInt(0, GGATEC_LINK.TOKEN_LIMIT);
}

/** One socket and its frame reader, with a replaceable hook for "this socket is gone". */
interface Side {
  readonly socket: net.Socket;
  readonly reader: FrameReader;
  /** Called once, when the socket errors, ends or closes (the first of them). */
  gone: (why: string) => void;
}

function where(t: GgatecTarget): string {
  return `${t.host}:${t.port} ${t.path}`;
}

/**
 * One handshake on a new TCP connection; resolves with the socket (data flowing into its
 * reader) and the server's geometry. Rejects with the sinit's error, or with a
 * transport error (ECONNREFUSED, ECONNRESET when the server closed, ETIMEDOUT, EINTR).
 */
function handshake(
  target: GgatecTarget,
  direction: 'send' | 'recv',
  token: number,
  timeoutMs: number,
  dialect: ErrnoDialect,
  signal: AbortSignal | undefined,
): Promise<{ side: Side; mediasize: number; sectorsize: number }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({
      host: target.host,
      port: target.port,
      // FreeBSD's ggatec speaks IPv4 only; a host name resolves to an IPv4 address.
      ...(net.isIPv6(target.host) ? {} : { family: 4 }),
    });
    socket.setNoDelay(target.noDelay ?? true);
    socket.setKeepAlive(true, GGATEC_LINK.KEEPALIVE_IDLE_MS);
    const reader = new FrameReader(GGATEC_LINK.MAX_FIXED_FRAME);
    let settled = false;
    const side: Side = { socket, reader, gone: (why) => fail(new BlockError('ECONNRESET', `${where(target)}: ${why} during the handshake`)) };
    let goneOnce = false;
    const gone = (why: string): void => {
      if (goneOnce) return;
      goneOnce = true;
      side.gone(why);
    };
    let lastError: Error | undefined;
    socket.on('data', (chunk: Buffer) => reader.push(chunk));
    socket.on('error', (err) => {
      lastError = err;
      gone(`connection failed: ${err.message}`);
    });
    socket.on('end', () => gone('the server closed the connection'));
    socket.on('close', () => gone('the connection closed'));

    const timer = setTimeout(() => fail(new BlockError('ETIMEDOUT', `${where(target)}: no answer within ${timeoutMs} ms`)), timeoutMs);
    const onAbort = (): void => fail(new BlockError('EINTR', `${where(target)}: connection attempt abandoned`, { cause: signal?.reason }));
    signal?.addEventListener('abort', onAbort, { once: true });

    function cleanup(): void {
      settled = true;
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    }
    function fail(e: BlockError): void {
      if (settled) return;
      cleanup();
      reader.stop();
      socket.destroy();
      // A socket error carries the real errno (ECONNREFUSED...); keep it as the code.
      if (lastError !== undefined && e.code === 'ECONNRESET') {
        const b = toBlockError(lastError);
        reject(new BlockError(b.code, `${where(target)}: ${lastError.message}`, { cause: lastError }));
      } else {
        reject(e);
      }
    }
    if (signal?.aborted) return onAbort();

    socket.once('connect', () => {
      if (settled) return;
      socket.write(encodeVersion({ version: GGATE.GGATE_VERSION, error: null }, dialect));
      reader.expectFixed(GGATE_SIZE.VERSION_SIZE, (buf, off) => {
        const v = decodeVersion(buf, off, dialect);
        if (!v.ok) return fail(new BlockError('EIO', `${where(target)}: short version packet`));
        if (!v.value.magicOk || v.value.version !== GGATE.GGATE_VERSION) {
          return fail(new BlockError('EINVAL', `${where(target)}: the server answered with a bad magic or version ${v.value.version}`));
        }
        if (v.value.error !== null) {
          return fail(new BlockError(v.value.error, `${where(target)}: the server refused the version (error ${v.value.errno})`));
        }
        socket.write(encodeCinit({ path: target.path, flags: cinitFlags(target.access, direction), nconn: GGATE_TIMING.NCONN, token }));
        reader.expectFixed(GGATE_SIZE.SINIT_SIZE, (b, o) => {
          const s = decodeSinit(b, o, dialect);
          if (!s.ok) return fail(new BlockError('EIO', `${where(target)}: short initial packet`));
          if (s.value.error !== null) {
            return fail(new BlockError(s.value.error, `${where(target)}: the server refused the connection (${s.value.error}, errno ${s.value.errno})`));
          }
          const bad = validateSinit(s.value);
          if (bad !== null) {
            return fail(
              new BlockError(bad, `${where(target)}: unusable geometry from the server (mediasize ${String(s.value.mediasize)}, sectorsize ${s.value.sectorsize})`),
            );
          }
          cleanup();
          // Nothing is expected from the server until the link's user asks for replies:
          // stop reading, so whatever it sends meanwhile waits in the kernel (TCP
          // backpressure) rather than piling up in the reader (see FrameReader).
          socket.pause();
          // From now on the link decides what a lost socket means.
          side.gone = () => undefined;
          resolve({ side, mediasize: s.value.mediasize as number, sectorsize: s.value.sectorsize });
        });
      });
    });
  });
}

/**
 * Connects to a ggated like ggatec's g_gatec_connect(): receive connection first, then
 * send connection, one token. Rejects if either handshake fails (the other connection
 * is closed).
 */
export async function connectGgatec(target: GgatecTarget, opts: GgatecConnectOptions = {}): Promise<GgatecLink> {
  const token = opts.token ?? randomToken();
  const timeout = opts.handshakeTimeoutMs ?? GGATEC_LINK.HANDSHAKE_TIMEOUT_MS;
  const dialect = opts.dialect ?? ERRNO_DIALECT.freebsd;
  const rx = await handshake(target, 'send', token, timeout, dialect, opts.signal);
  let tx: Awaited<ReturnType<typeof handshake>>;
  try {
    tx = await handshake(target, 'recv', token, timeout, dialect, opts.signal);
  } catch (e) {
    rx.side.reader.stop();
    rx.side.socket.destroy();
    throw e;
  }
  return new GgatecLink(target, token, rx.side, tx.side, tx.mediasize, tx.sectorsize);
}

/**
 * An established ggatec connection pair. The receive side's frame reader is left to the
 * user (it continues right after the sinit, so no byte is missed); its connection is not
 * read until the user calls {@link GgatecLink.receive}. The send side never carries
 * anything from the server, and whatever arrives there is discarded.
 */
export class GgatecLink {
  readonly target: GgatecTarget;
  readonly token: number;
  /** gs_mediasize of the server. */
  readonly mediasize: number;
  /** gs_sectorsize of the server. */
  readonly sectorsize: number;
  readonly #rx: Side;
  readonly #tx: Side;
  readonly #lost = new AbortController();
  #reason: string | undefined;
  readonly #drainWaiters = new Set<() => void>();

  constructor(target: GgatecTarget, token: number, rx: Side, tx: Side, mediasize: number, sectorsize: number) {
    this.target = target;
    this.token = token;
    this.mediasize = mediasize;
    this.sectorsize = sectorsize;
    this.#rx = rx;
    this.#tx = tx;
    rx.gone = (why) => this.lose(`receive connection: ${why}`);
    tx.gone = (why) => this.lose(`send connection: ${why}`);
    tx.reader.discard();
    // Read (and drop) what arrives, so the server closing it is noticed.
    tx.socket.resume();
    tx.socket.on('drain', () => this.#wakeDrain());
    // A socket may have gone between its handshake and now.
    for (const [s, name] of [
      [rx.socket, 'receive'],
      [tx.socket, 'send'],
    ] as const) {
      if (s.destroyed || s.readableEnded) this.lose(`${name} connection closed during the handshake of the other`);
    }
  }

  /** The frame reader of the receive connection (replies). */
  get reader(): FrameReader {
    return this.#rx.reader;
  }

  /**
   * Starts reading the receive connection into {@link reader}: set the first
   * expectation, then call this. Until then the connection is paused, so a server
   * sending early cannot make the client buffer without bound.
   */
  receive(): void {
    if (!this.lost) this.#rx.socket.resume();
  }

  /** Aborted when the link is lost. */
  get signal(): AbortSignal {
    return this.#lost.signal;
  }

  get lost(): boolean {
    return this.#lost.signal.aborted;
  }

  /** Why the link was lost (undefined while it is up). */
  get reason(): string | undefined {
    return this.#reason;
  }

  /** The send connection has more buffered than its high-water mark: wait for {@link drained}. */
  get needsDrain(): boolean {
    return !this.lost && this.#tx.socket.writableNeedDrain;
  }

  /** Resolves when the send connection drained, the link is lost, or `signal` aborts. */
  drained(signal?: AbortSignal): Promise<void> {
    if (!this.needsDrain || signal?.aborted) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const done = (): void => {
        this.#drainWaiters.delete(done);
        signal?.removeEventListener('abort', done);
        resolve();
      };
      this.#drainWaiters.add(done);
      signal?.addEventListener('abort', done, { once: true });
    });
  }

  /**
   * Sends a request: the header and, for WRITE, its payload, in one corked write (the
   * payload is referenced, not copied, until the kernel has it). Nothing is sent on a
   * lost link.
   */
  send(header: Buffer, payload?: Buffer): void {
    if (this.lost) return;
    const s = this.#tx.socket;
    s.cork();
    s.write(header);
    if (payload !== undefined && payload.length > 0) s.write(payload);
    s.uncork();
  }

  /** Marks the link lost (once) and tears both connections down. */
  lose(why: string): void {
    if (this.lost) return;
    this.#reason = why;
    this.#rx.reader.stop();
    this.#tx.reader.stop();
    this.#rx.socket.destroy();
    this.#tx.socket.destroy();
    this.#lost.abort(new BlockError('ECONNRESET', why));
    this.#wakeDrain();
  }

  /**
   * Closes both connections in an orderly way (FIN after what was written): the
   * server serves what it received and closes its side.
   */
  close(): void {
    if (this.lost) return;
    this.#reason = 'closed by the client';
    this.#rx.reader.stop();
    this.#tx.reader.stop();
    for (const s of [this.#tx.socket, this.#rx.socket]) {
      s.end();
      s.destroySoon();
    }
    this.#lost.abort(new BlockError('ECONNRESET', 'closed by the client'));
    this.#wakeDrain();
  }

  #wakeDrain(): void {
    for (const w of [...this.#drainWaiters]) w();
  }
}
