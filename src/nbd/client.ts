/**
 * `NbdClient`: an NBD client for TypeScript programs. Connect by URI (`nbd://`,
 * `nbds://`, `nbd+unix://`, `nbds+unix://`, with libnbd's TLS parameters), then read,
 * write, flush, trim, zero, cache and query block status with promises. Many requests
 * are in flight at once (bounded by a request count and a byte budget: calls beyond
 * wait their turn, in order), replies complete in any order, and a request larger than
 * the server accepts is split. With `connections: N` and a server that advertises
 * CAN_MULTI_CONN, requests are spread over N connections (a FLUSH on one then covers
 * writes completed on all, which is what CAN_MULTI_CONN promises).
 *
 *   const c = await NbdClient.connect('nbd://127.0.0.1/disk');
 *   const buf = Buffer.alloc(4096);
 *   await c.pread(buf, 0);
 *   await c.close();
 *
 * Errors are BlockErrors: a server's error reply keeps its errno and message; a lost
 * connection is ECONNRESET (every request in flight fails with it; the client does not
 * reconnect, so no write is ever silently replayed); a protocol violation is EPROTO.
 */
import net from 'node:net';
import { BlockError } from '../errors/index.js';
import { Deque } from '../io/deque.js';
import { BASE_ALLOCATION, MODE, NBD_CMD, NBD_CMD_FLAG, NBD_FLAG, type Mode } from './constants.js';
import { ClientHandshake, type ClientTls, type NegotiatedExport } from './client-handshake.js';
import { NbdConnection, type Extent, type WireRequest } from './client-connection.js';
import { parseNbdUri, type NbdTransport, type NbdUri } from './uri.js';

export type { Extent } from './client-connection.js';
export type { ClientTls, NegotiatedExport } from './client-handshake.js';

/** Client options; every key has a documented default in {@link CLIENT_DEFAULTS}. */
export interface NbdClientOptions {
  /** The export to open; default: the URI's. */
  readonly exportName?: string;
  /** Connections to open when the server advertises CAN_MULTI_CONN (else 1). */
  readonly connections?: number;
  /** Requests in flight at most (over all connections); more wait. */
  readonly maxInFlight?: number;
  /** Payload bytes (READ and WRITE data) in flight at most; more wait. */
  readonly maxInFlightBytes?: number;
  /** Metadata contexts to select. */
  readonly metaContexts?: readonly string[];
  /** Ask for extended headers; else structured replies; else simple replies. */
  readonly extendedHeaders?: boolean;
  readonly structuredReplies?: boolean;
  /** How long connecting and the handshake may take, per connection. */
  readonly handshakeTimeoutMs?: number;
  /** TLS settings; default: from the URI (nbds:// means TLS). */
  readonly tls?: ClientTls | null;
  /** Abandons connecting. */
  readonly signal?: AbortSignal;
  /**
   * Called once when the client becomes unusable other than by close(): a connection
   * lost (ECONNRESET) or a protocol violation (EPROTO), even while no request is in
   * flight, so a caller can reconnect at once rather than at its next request.
   */
  readonly onLost?: (error: BlockError) => void;
}

type Defaults = Required<Pick<NbdClientOptions, 'connections' | 'maxInFlight' | 'maxInFlightBytes' | 'metaContexts' | 'extendedHeaders' | 'structuredReplies' | 'handshakeTimeoutMs'>>;

export const CLIENT_DEFAULTS: Defaults = {
  connections: 1,
  maxInFlight: 64,
  maxInFlightBytes: 64 * 1024 * 1024,
  metaContexts: [BASE_ALLOCATION] as readonly string[],
  extendedHeaders: true,
  structuredReplies: true,
  handshakeTimeoutMs: 30_000,
};

/** The most connections a client opens. */
export const MAX_CLIENT_CONNECTIONS = 64;
/** The largest READ or WRITE sent in one request when the server states no maximum (the spec's 32 MiB). */
export const DEFAULT_MAX_REQUEST = 32 * 1024 * 1024;
/** The largest TRIM, WRITE_ZEROES, CACHE or BLOCK_STATUS length sent in one request (fits the compact header's u32). */
export const MAX_EFFECT_LENGTH = 0x1_0000_0000 - 1024 * 1024;

interface Waiter {
  readonly cost: number;
  /** Called with the slot already counted in the in-flight totals. */
  readonly resolve: () => void;
  readonly reject: (e: Error) => void;
}

/** Per-call options. */
export interface CallOptions {
  readonly signal?: AbortSignal;
}

function tlsFromUri(u: NbdUri): ClientTls | null {
  if (!u.tls) return null;
  return {
    pskFile: u.tlsPskFile,
    username: u.tlsUsername,
    certificates: u.tlsCertificates,
    verifyPeer: u.tlsVerifyPeer,
    hostname: u.tlsHostname,
  };
}

function dial(t: NbdTransport): net.Socket {
  return t.kind === 'unix' ? net.connect(t.path) : net.connect({ host: t.host, port: t.port });
}

/** Connects a socket and runs `fn` on its handshake under the timeout. */
async function withHandshake<T>(t: NbdTransport, timeoutMs: number, signal: AbortSignal | undefined, fn: (hs: ClientHandshake) => Promise<T>): Promise<T> {
  // An 'abort' listener added to a signal already aborted never runs.
  if (signal?.aborted) throw new BlockError('ECANCELED', 'connecting was aborted', { cause: signal.reason });
  const socket = dial(t);
  const hs = new ClientHandshake(socket);
  const where = t.kind === 'unix' ? t.path : `${t.host}:${t.port}`;
  const timer = setTimeout(() => hs.fail(new BlockError('ETIMEDOUT', `no NBD handshake with ${where} within ${timeoutMs} ms`)), timeoutMs);
  const onAbort = () => hs.fail(new BlockError('ECANCELED', 'connecting was aborted', { cause: signal?.reason }));
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    return await fn(hs);
  } catch (e) {
    hs.socket.destroy();
    if (e instanceof BlockError && e.code === 'ECONNRESET' && /closed the connection$/.test(e.message)) {
      throw new BlockError('ECONNRESET', `${where}: the server closed the connection during the handshake (it may require TLS, or refuse this client)`, { cause: e });
    }
    // A failed connect(2) (refused, no such socket, unreachable) reaches here as the stream
    // reader's ECONNRESET with the socket's error as its cause.
    const cause = e instanceof BlockError ? (e.cause as NodeJS.ErrnoException | undefined) : (e as NodeJS.ErrnoException);
    if (cause instanceof Error && cause.syscall === 'connect') {
      throw new BlockError('ECONNREFUSED', `cannot connect to ${where}: ${cause.message}`, { cause });
    }
    throw e;
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener('abort', onAbort);
  }
}

export class NbdClient {
  readonly #info: NegotiatedExport;
  readonly #conns: NbdConnection[];
  readonly #maxInFlight: number;
  readonly #maxBytes: number;
  readonly #maxRequest: number;
  #inFlight = 0;
  #bytes = 0;
  readonly #waiting = new Deque<Waiter>();
  #broken: BlockError | null = null;
  readonly #onLost: ((e: BlockError) => void) | undefined;
  #closing: Promise<void> | null = null;
  #idle: (() => void) | null = null;

  private constructor(
    info: NegotiatedExport,
    conns: NbdConnection[],
    opts: Required<Pick<NbdClientOptions, 'maxInFlight' | 'maxInFlightBytes'>> & Pick<NbdClientOptions, 'onLost'>,
  ) {
    this.#info = info;
    this.#conns = conns;
    this.#maxInFlight = opts.maxInFlight;
    this.#maxBytes = opts.maxInFlightBytes;
    this.#onLost = opts.onLost;
    const serverMax = info.blockSize?.maximum ?? DEFAULT_MAX_REQUEST;
    const min = info.blockSize?.minimum ?? 1;
    // At most the server's maximum, a multiple of its minimum block size, and at most the byte budget.
    const cap = Math.min(serverMax, DEFAULT_MAX_REQUEST, opts.maxInFlightBytes);
    this.#maxRequest = Math.max(min, cap - (cap % min));
  }

  /** Opens a connection (or several) to the export a URI names. */
  static async connect(target: string | NbdUri, options: NbdClientOptions = {}): Promise<NbdClient> {
    const uri = typeof target === 'string' ? parseNbdUri(target) : target;
    const o = { ...CLIENT_DEFAULTS, ...options };
    validateOptions(o);
    const tls = options.tls !== undefined ? options.tls : tlsFromUri(uri);
    const exportName = options.exportName ?? uri.exportName;
    const host = uri.transport.kind === 'tcp' ? uri.transport.host : undefined;
    let lostEarly: BlockError | null = null;
    let broken: (e: BlockError) => void = (e) => (lostEarly ??= e);
    const open = () =>
      withHandshake(uri.transport, o.handshakeTimeoutMs, options.signal, async (hs) => {
        await hs.open(tls, host);
        const { negotiated, rest } = await hs.go({
          exportName,
          tls,
          host,
          extendedHeaders: o.extendedHeaders,
          structuredReplies: o.structuredReplies,
          metaContexts: o.metaContexts,
        });
        const conn = new NbdConnection(hs.socket, negotiated.mode, rest, (e) => broken(e));
        return { negotiated, conn };
      });
    const first = await open();
    const conns = [first.conn];
    try {
      if (o.connections > 1 && (first.negotiated.flags & NBD_FLAG.NBD_FLAG_CAN_MULTI_CONN) !== 0) {
        // allSettled, not all: when one fails, the ones that did open are closed too.
        const more = await Promise.allSettled(Array.from({ length: o.connections - 1 }, () => open()));
        for (const m of more) if (m.status === 'fulfilled') conns.push(m.value.conn);
        const failed = more.find((m): m is PromiseRejectedResult => m.status === 'rejected');
        if (failed) throw failed.reason;
      }
    } catch (e) {
      for (const c of conns) c.close();
      throw e;
    }
    const client = new NbdClient(first.negotiated, conns, o);
    // A connection lost before the client existed is passed on now, not dropped.
    const early = lostEarly;
    broken = (e) => client.#lost(e);
    if (early) client.#lost(early);
    return client;
  }

  /** The exports a server lists (NBD_OPT_LIST, then INFO for each), with sizes where the server tells them. */
  static async list(target: string | NbdUri, options: Pick<NbdClientOptions, 'tls' | 'handshakeTimeoutMs' | 'signal'> = {}) {
    const uri = typeof target === 'string' ? parseNbdUri(target) : target;
    const tls = options.tls !== undefined ? options.tls : tlsFromUri(uri);
    const host = uri.transport.kind === 'tcp' ? uri.transport.host : undefined;
    return withHandshake(uri.transport, options.handshakeTimeoutMs ?? CLIENT_DEFAULTS.handshakeTimeoutMs, options.signal, async (hs) => {
      await hs.open(tls, host);
      return hs.list();
    });
  }

  // -------------------------------------------------------------------------------
  // What was negotiated

  get size(): number {
    return this.#info.size;
  }
  get exportName(): string {
    return this.#info.name;
  }
  get description(): string {
    return this.#info.description;
  }
  /** Transmission flags (NBD_FLAG_*). */
  get flags(): number {
    return this.#info.flags;
  }
  get blockSize(): NegotiatedExport['blockSize'] {
    return this.#info.blockSize;
  }
  /** 'simple', 'structured' or 'extended'. */
  get mode(): 'simple' | 'structured' | 'extended' {
    const m: Mode = this.#info.mode;
    return m === MODE.EXTENDED ? 'extended' : m === MODE.STRUCTURED ? 'structured' : 'simple';
  }
  /** The metadata contexts selected, by name. */
  get contexts(): readonly string[] {
    return [...this.#info.contexts.keys()];
  }
  /** TLS protocol and suite, or null in clear. */
  get tls(): NegotiatedExport['tls'] {
    return this.#info.tls;
  }
  /** Why the client can no longer be used (lost, protocol error, closed), or null while it can. */
  get error(): BlockError | null {
    return this.#broken;
  }

  /** Connections open. */
  get connections(): number {
    return this.#conns.length;
  }
  #flag(f: number): boolean {
    return (this.#info.flags & f) !== 0;
  }
  get readOnly(): boolean {
    return this.#flag(NBD_FLAG.NBD_FLAG_READ_ONLY);
  }
  get canFlush(): boolean {
    return this.#flag(NBD_FLAG.NBD_FLAG_SEND_FLUSH);
  }
  get canFua(): boolean {
    return this.#flag(NBD_FLAG.NBD_FLAG_SEND_FUA);
  }
  get canTrim(): boolean {
    return this.#flag(NBD_FLAG.NBD_FLAG_SEND_TRIM);
  }
  get canZero(): boolean {
    return this.#flag(NBD_FLAG.NBD_FLAG_SEND_WRITE_ZEROES);
  }
  get canFastZero(): boolean {
    return this.#flag(NBD_FLAG.NBD_FLAG_SEND_FAST_ZERO);
  }
  get canCache(): boolean {
    return this.#flag(NBD_FLAG.NBD_FLAG_SEND_CACHE);
  }
  get canDf(): boolean {
    return this.#flag(NBD_FLAG.NBD_FLAG_SEND_DF);
  }
  get canMultiConn(): boolean {
    return this.#flag(NBD_FLAG.NBD_FLAG_CAN_MULTI_CONN);
  }
  get rotational(): boolean {
    return this.#flag(NBD_FLAG.NBD_FLAG_ROTATIONAL);
  }
  /** True if `context` (default base:allocation) was selected, so blockStatus can ask for it. */
  canBlockStatus(context: string = BASE_ALLOCATION): boolean {
    return this.#info.contexts.has(context);
  }

  // -------------------------------------------------------------------------------
  // Operations

  /** Reads `buf.length` bytes at `offset` into `buf`. */
  async pread(buf: Uint8Array, offset: number, opts: CallOptions & { readonly df?: boolean } = {}): Promise<void> {
    this.#range(offset, buf.length, 'pread');
    const flags = opts.df ? NBD_CMD_FLAG.NBD_CMD_FLAG_DF : 0;
    await this.#split(offset, buf.length, this.#maxRequest, (off, len) => {
      const target = buf.subarray(off - offset, off - offset + len);
      return this.#send({ type: NBD_CMD.NBD_CMD_READ, flags, offset: off, length: len, target }, len, opts.signal);
    });
  }

  /** Writes `buf` at `offset` (`fua`: durable when it resolves). `buf` must not change until then. */
  async pwrite(buf: Uint8Array, offset: number, opts: CallOptions & { readonly fua?: boolean } = {}): Promise<void> {
    this.#writable('pwrite');
    this.#range(offset, buf.length, 'pwrite');
    const flags = opts.fua ? this.#fua() : 0;
    await this.#split(offset, buf.length, this.#maxRequest, (off, len) => {
      const payload = buf.subarray(off - offset, off - offset + len);
      return this.#send({ type: NBD_CMD.NBD_CMD_WRITE, flags, offset: off, length: len, payload }, len, opts.signal);
    });
  }

  /** Makes every completed write durable (on every connection, when the server has CAN_MULTI_CONN). */
  async flush(opts: CallOptions = {}): Promise<void> {
    if (!this.canFlush) throw new BlockError('EOPNOTSUPP', 'the server does not support FLUSH');
    await this.#send({ type: NBD_CMD.NBD_CMD_FLUSH, flags: 0, offset: 0, length: 0 }, 0, opts.signal);
  }

  /** A hint that the range is no longer needed (reads may then return anything, or zeroes). */
  async trim(offset: number, length: number, opts: CallOptions & { readonly fua?: boolean } = {}): Promise<void> {
    this.#writable('trim');
    if (!this.canTrim) throw new BlockError('EOPNOTSUPP', 'the server does not support TRIM');
    this.#range(offset, length, 'trim');
    const flags = opts.fua ? this.#fua() : 0;
    await this.#split(offset, length, MAX_EFFECT_LENGTH, (off, len) => this.#send({ type: NBD_CMD.NBD_CMD_TRIM, flags, offset: off, length: len }, 0, opts.signal));
  }

  /**
   * Writes zeroes. `noHole`: allocate (no punched hole); `fastZero`: fail with
   * EOPNOTSUPP rather than fall back to writing zeroes slowly.
   */
  async zero(offset: number, length: number, opts: CallOptions & { readonly fua?: boolean; readonly noHole?: boolean; readonly fastZero?: boolean } = {}): Promise<void> {
    this.#writable('zero');
    if (!this.canZero) throw new BlockError('EOPNOTSUPP', 'the server does not support WRITE_ZEROES');
    if (opts.fastZero && !this.canFastZero) throw new BlockError('EOPNOTSUPP', 'the server does not support FAST_ZERO');
    this.#range(offset, length, 'zero');
    let flags = opts.fua ? this.#fua() : 0;
    if (opts.noHole) flags |= NBD_CMD_FLAG.NBD_CMD_FLAG_NO_HOLE;
    if (opts.fastZero) flags |= NBD_CMD_FLAG.NBD_CMD_FLAG_FAST_ZERO;
    await this.#split(offset, length, MAX_EFFECT_LENGTH, (off, len) =>
      this.#send({ type: NBD_CMD.NBD_CMD_WRITE_ZEROES, flags, offset: off, length: len }, 0, opts.signal),
    );
  }

  /** Asks the server to prefetch the range. */
  async cache(offset: number, length: number, opts: CallOptions = {}): Promise<void> {
    if (!this.canCache) throw new BlockError('EOPNOTSUPP', 'the server does not support CACHE');
    this.#range(offset, length, 'cache');
    await this.#split(offset, length, MAX_EFFECT_LENGTH, (off, len) => this.#send({ type: NBD_CMD.NBD_CMD_CACHE, flags: 0, offset: off, length: len }, 0, opts.signal));
  }

  /**
   * The extents of `context` (default base:allocation) from `offset`: they cover a
   * prefix of the range (the server may answer for less than asked; ask again from
   * where they end). `reqOne`: at most one extent.
   */
  async blockStatus(offset: number, length: number, opts: CallOptions & { readonly context?: string; readonly reqOne?: boolean } = {}): Promise<Extent[]> {
    const context = opts.context ?? BASE_ALLOCATION;
    const id = this.#info.contexts.get(context);
    if (id === undefined) throw new BlockError('EOPNOTSUPP', `metadata context '${context}' was not negotiated`);
    this.#range(offset, length, 'blockStatus');
    if (length === 0) return [];
    const len = Math.min(length, MAX_EFFECT_LENGTH);
    const flags = opts.reqOne ? NBD_CMD_FLAG.NBD_CMD_FLAG_REQ_ONE : 0;
    const r = await this.#send({ type: NBD_CMD.NBD_CMD_BLOCK_STATUS, flags, offset, length: len, contextId: id }, 0, opts.signal);
    return r ?? [];
  }

  /**
   * Waits for the requests in flight, then disconnects (NBD_CMD_DISC). Calls made after
   * close fail with ENOTCONN (ESHUTDOWN is kept for the server's own NBD_ESHUTDOWN replies).
   */
  close(): Promise<void> {
    return (this.#closing ??= this.#close());
  }

  async #close(): Promise<void> {
    if (this.#inFlight > 0 || this.#waiting.size > 0) await new Promise<void>((r) => (this.#idle = r));
    this.#broken ??= new BlockError('ENOTCONN', 'the client was closed');
    for (const c of this.#conns) c.close();
  }

  // -------------------------------------------------------------------------------
  // Internals

  #fua(): number {
    if (!this.canFua) throw new BlockError('EOPNOTSUPP', 'the server does not support FUA');
    return NBD_CMD_FLAG.NBD_CMD_FLAG_FUA;
  }

  #writable(op: string): void {
    if (this.readOnly) throw new BlockError('EPERM', `${op}: the export is read-only`);
  }

  #range(offset: number, length: number, op: string): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new BlockError('EINVAL', `${op}: offset and length must be non-negative integers`);
    }
    if (offset + length > this.#info.size) {
      throw new BlockError('EINVAL', `${op}: ${length} bytes at ${offset} go past the end of the export (${this.#info.size} bytes)`);
    }
  }

  /** Runs `fn` on pieces of at most `max` bytes, all in flight together; rejects with the first failure. */
  async #split(offset: number, length: number, max: number, fn: (off: number, len: number) => Promise<unknown>): Promise<void> {
    if (length <= max) {
      await fn(offset, length);
      return;
    }
    const parts: Promise<unknown>[] = [];
    for (let off = offset; off < offset + length; off += max) parts.push(fn(off, Math.min(max, offset + length - off)));
    const results = await Promise.allSettled(parts);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  async #send(req: WireRequest, cost: number, signal: AbortSignal | undefined): Promise<Extent[] | undefined> {
    if (this.#broken) throw this.#broken;
    if (this.#closing) throw new BlockError('ENOTCONN', 'the client is closing');
    signal?.throwIfAborted();
    // Waiters go first, in order; a request larger than the budget runs alone.
    if (this.#waiting.size > 0 || !this.#fits(cost)) {
      await this.#wait(cost, signal);
    } else {
      this.#inFlight++;
      this.#bytes += cost;
    }
    // The slot is given back when the request leaves the wire (its reply, or the
    // connection's end), not when the caller stops waiting: an aborted request is still
    // in flight at the server, and counts against maxInFlight and maxInFlightBytes.
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      this.#inFlight--;
      this.#bytes -= cost;
      this.#wake();
    };
    let conn: NbdConnection;
    try {
      conn = this.#pick();
    } catch (e) {
      release();
      throw e;
    }
    return conn.send(req, signal, release);
  }

  #fits(cost: number): boolean {
    return this.#inFlight < this.#maxInFlight && (this.#bytes + cost <= this.#maxBytes || this.#inFlight === 0);
  }

  #wait(cost: number, signal: AbortSignal | undefined): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      if (!signal) {
        this.#waiting.pushBack({ cost, resolve, reject });
        return;
      }
      const onAbort = () => {
        const removed = this.#waiting.filter((x) => x !== w);
        if (removed.length === 0) return;
        reject(new BlockError('ECANCELED', 'aborted while waiting to be sent', { cause: signal.reason }));
        // The waiters behind it may fit now (it may have been the large one at the front).
        this.#wake();
      };
      const w: Waiter = {
        cost,
        resolve: () => {
          signal.removeEventListener('abort', onAbort);
          resolve();
        },
        reject: (e) => {
          signal.removeEventListener('abort', onAbort);
          reject(e);
        },
      };
      signal.addEventListener('abort', onAbort, { once: true });
      this.#waiting.pushBack(w);
    });
  }

  #wake(): void {
    for (;;) {
      const w = this.#waiting.peekFront();
      if (!w) break;
      if (this.#broken) {
        this.#waiting.popFront();
        w.reject(this.#broken);
        continue;
      }
      if (!this.#fits(w.cost)) break;
      this.#waiting.popFront();
      // Counted here, before the waiter runs, so the next one in line sees its share.
      this.#inFlight++;
      this.#bytes += w.cost;
      w.resolve();
    }
    if (this.#inFlight === 0 && this.#waiting.size === 0 && this.#idle) {
      const idle = this.#idle;
      this.#idle = null;
      idle();
    }
  }

  /** The open connection with the fewest requests in flight. */
  #pick(): NbdConnection {
    let best: NbdConnection | null = null;
    for (const c of this.#conns) {
      if (c.closedBy) continue;
      if (!best || c.inFlight < best.inFlight) best = c;
    }
    if (!best) throw this.#broken ?? new BlockError('ECONNRESET', 'no connection to the server is open');
    return best;
  }

  /** A connection was lost: the client is unusable (no reconnect: a write in flight may or may not have happened). */
  #lost(e: BlockError): void {
    if (this.#broken) return;
    this.#broken = e;
    for (const c of this.#conns) c.destroy(e);
    this.#wake();
    this.#onLost?.(e);
  }
}

function validateOptions(o: Defaults): void {
  const int = (k: string, v: number, min: number, max: number) => {
    if (!Number.isSafeInteger(v) || v < min || v > max) throw new BlockError('EINVAL', `NbdClient option ${k}: expected an integer from ${min} to ${max}, got ${v}`);
  };
  int('connections', o.connections, 1, MAX_CLIENT_CONNECTIONS);
  int('maxInFlight', o.maxInFlight, 1, 65536);
  int('maxInFlightBytes', o.maxInFlightBytes, 4096, 2 ** 40);
  int('handshakeTimeoutMs', o.handshakeTimeoutMs, 1, 3_600_000);
}
