/**
 * The `nbd` backend: a device whose storage is an export of another NBD server, reached
 * with {@link NbdClient} (nbdkit's nbd plugin, with its retry filter built in). It lives
 * in src/nbd, not src/backends, because it speaks the protocol and src/backends may not
 * import src/nbd; the CLI adds it to the registry (src/cli/registry.ts).
 *
 *   { "type": "nbd", "uri": "nbd+unix:///disk?socket=/run/disk.sock",
 *     "connections": 1, "retries": 5, "retryDelay": 1, "retryDelayMax": 60, "readonly": false }
 *
 * What the device can do is what the remote negotiated: size, block sizes, and the
 * capabilities from its transmission flags (write unless READ_ONLY or `readonly`;
 * flush, FUA (native, or emulated with a FLUSH after the write), trim, zero, fast zero,
 * cache and multi-conn from the SEND_* / CAN_MULTI_CONN flags; extents if the remote
 * agreed to base:allocation, else one data extent).
 *
 * Errors, in three kinds:
 * - **The remote's error reply** to a request is that request's own error, returned to
 *   the caller as the remote sent it (errno and message) and recorded nowhere.
 * - **A FLUSH the remote fails** (and the FLUSH that emulates FUA) is a write-back
 *   failure: writes acknowledged earlier may be lost. It is thrown with
 *   `BlockError.writeback` set, as the file backend does for a failed fdatasync, so the
 *   frontend records it in the export's ErrSeq and every session hears of it.
 * - **A lost connection** (ECONNRESET or EPROTO from the client, or an ESHUTDOWN reply:
 *   the remote is shutting down and did not run the request) is a transport failure.
 *   It is never recorded as such: the requests it hit are run again on a new connection.
 *
 * Retry (nbdkit-retry-filter's model): after a loss the device reconnects, waiting
 * `retryDelay` before the first attempt and doubling the wait up to `retryDelayMax`, at
 * most `retries` attempts; one reconnection serves every request that was in flight or
 * queued. Those requests are then sent again on the new connection (each at most
 * `retries` times). If every attempt fails they fail with EIO naming the remote and the
 * cause; a later request starts a new round of attempts. With `retries: 0` the first
 * loss fails the requests at once and the device stays down (every request EIO).
 * The first connection (when the device is built) is not retried: a wrong URI or a
 * remote that is not there fails the export at startup.
 *
 * Sending a request again is safe because every NBD request is idempotent (a WRITE of
 * the same bytes at the same offset, a TRIM, ...), and no write is acknowledged that the
 * remote did not acknowledge. What a reconnection cannot bring back is a write the
 * remote acknowledged before the loss but had not made durable (no FUA, no successful
 * FLUSH covering it): if the remote restarted, that write may be gone. So the device
 * counts such writes (WRITE and WRITE_ZEROES without FUA, since the last FLUSH that
 * covered them), and when it reconnects with any outstanding it records EIO in the
 * export's ErrSeq (`ctx.errseq.set`; with `retries: 0`, at the loss, since there will be
 * no reconnection): every session's next FLUSH reports it, once - the
 * Linux errseq guarantee that an acknowledged write that may not be durable is never
 * silently forgotten. A write acknowledged on a connection that was already replaced
 * (the remote finishing a request during its graceful shutdown) is recorded at once,
 * since no FLUSH on the new connection covers it.
 */
import * as v from 'valibot';
import { BlockError, isBlockError, linuxErrno, toBlockError } from '../errors/index.js';
import { ErrSeq } from '../errseq/index.js';
import {
  EXTENT,
  MAX_IO_SIZE,
  REQ,
  booleanSetting,
  closedError,
  parseSettings,
  readOnlyError,
  settingsSchema,
  singleExtent,
  type BlockDevice,
  type BlockSize,
  type Capabilities,
  type Extent,
  type LayerDescription,
  type StackContext,
} from '../device/index.js';
import { MAX_CLIENT_CONNECTIONS, MAX_EFFECT_LENGTH, NbdClient, type NbdClientOptions } from './client.js';
import { NBD_FLAG } from './constants.js';
import { formatNbdUri, parseNbdUri, type NbdUri } from './uri.js';

/** The defaults of the `nbd` backend's settings. */
export const NBD_BACKEND_DEFAULTS = Object.freeze({
  /** Connections to the remote (used only if it advertises CAN_MULTI_CONN). */
  connections: 1,
  /** Reconnection attempts after a loss, and times one request is sent again; 0: fail at once. */
  retries: 5,
  /** Wait before the first reconnection attempt, in milliseconds (1 s); doubles each attempt. */
  retryDelayMs: 1000,
  /** The longest wait between two attempts, in milliseconds (60 s). */
  retryDelayMaxMs: 60_000,
});

/** The most retries a config may ask for. */
export const MAX_NBD_RETRIES = 1000;

/** What the device reports to an `onEvent` listener (logs, tests). */
export type NbdDeviceEvent =
  | { readonly kind: 'lost'; readonly cause: BlockError }
  | { readonly kind: 'reconnected'; readonly attempt: number; readonly unflushedWrites: number }
  | { readonly kind: 'attempt-failed'; readonly attempt: number; readonly error: BlockError }
  | { readonly kind: 'gave-up'; readonly error: BlockError }
  /** EIO was recorded in the export's ErrSeq: acknowledged writes may not be durable. */
  | { readonly kind: 'writes-at-risk'; readonly writes: number; readonly message: string };

/** Settings of an NbdDevice. */
export interface NbdDeviceOptions {
  /** The remote export, as an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://) or parsed. */
  readonly uri: string | NbdUri;
  /** @default 1 */
  readonly connections?: number;
  /** @default 5 */
  readonly retries?: number;
  /** @default 1000 */
  readonly retryDelayMs?: number;
  /** @default 60000 */
  readonly retryDelayMaxMs?: number;
  /** Refuse writes, trims and zeroes locally with EPERM. @default false */
  readonly readonly?: boolean;
  /** The export's write-back error sequence (StackContext.errseq). @default a new one */
  readonly errseq?: ErrSeq;
  /** More client options (timeouts, in-flight bounds); `connections` above wins. */
  readonly client?: Omit<NbdClientOptions, 'connections' | 'signal'>;
  /** Told about losses and reconnections. */
  readonly onEvent?: (e: NbdDeviceEvent) => void;
}

/** The URI without TLS file parameters: what the description shows (it may reach clients). */
function displayUri(u: NbdUri): string {
  const { tlsPskFile: _p, tlsCertificates: _c, ...rest } = u;
  return formatNbdUri(rest);
}

/** True for a failure of the connection rather than of the request (see the module comment). */
function isTransportError(e: unknown): e is BlockError {
  return isBlockError(e) && (e.code === 'ECONNRESET' || e.code === 'EPROTO' || e.code === 'ESHUTDOWN');
}

function powerOfTwoAtMost(n: number): number {
  return 2 ** Math.floor(Math.log2(n));
}

/** What a request's callback gets: the client and the generation of the connection it belongs to. */
type Attempt<T> = (c: NbdClient, gen: number) => Promise<T>;

/** A block device backed by an export of a remote NBD server. */
export class NbdDevice implements BlockDevice {
  readonly size: number;
  readonly capabilities: Capabilities;
  readonly blockSize: BlockSize;
  /** Every operation waits for the network (BlockDevice.nonBlocking's definition). */
  readonly nonBlocking = false;
  readonly description: string;
  /** The remote, as shown in messages. */
  readonly remote: string;

  readonly #uri: NbdUri;
  readonly #clientOptions: NbdClientOptions;
  readonly #retries: number;
  readonly #delay: number;
  readonly #delayMax: number;
  readonly #readonly: boolean;
  readonly #errseq: ErrSeq;
  readonly #onEvent: ((e: NbdDeviceEvent) => void) | undefined;
  readonly #abort = new AbortController();
  /** What the first connection negotiated that later ones must offer too. */
  readonly #needs: { readonly flags: number; readonly blockStatus: boolean };

  #client: NbdClient | null;
  /** Bumped per connection; a request remembers the one it ran on. */
  #gen = 0;
  #reconnecting: Promise<NbdClient> | null = null;
  /** Set when the device is down for good (retries 0) or the last round of attempts failed. */
  #down: BlockError | null = null;
  #lastCause: BlockError | null = null;
  #closed = false;
  /** Writes acknowledged without FUA, counted; `#durable` is the count a successful FLUSH covered. */
  #acked = 0;
  #durable = 0;
  #lastLoss: string | null = null;

  private constructor(client: NbdClient, uri: NbdUri, o: NbdDeviceOptions & { clientOptions: NbdClientOptions }) {
    this.#client = client;
    this.#uri = uri;
    this.#clientOptions = o.clientOptions;
    this.#retries = o.retries ?? NBD_BACKEND_DEFAULTS.retries;
    this.#delay = o.retryDelayMs ?? NBD_BACKEND_DEFAULTS.retryDelayMs;
    this.#delayMax = Math.max(this.#delay, o.retryDelayMaxMs ?? NBD_BACKEND_DEFAULTS.retryDelayMaxMs);
    this.#readonly = o.readonly === true;
    this.#errseq = o.errseq ?? new ErrSeq();
    this.#onEvent = o.onEvent;
    this.remote = displayUri(uri);
    this.size = client.size;
    const writable = !this.#readonly && !client.readOnly;
    this.capabilities = Object.freeze({
      write: writable,
      flush: client.canFlush,
      fua: writable && (client.canFua || client.canFlush),
      trim: writable && client.canTrim,
      zero: writable && client.canZero,
      fastZero: writable && client.canZero && client.canFastZero,
      extents: client.canBlockStatus(),
      cache: client.canCache,
      multiConn: client.canMultiConn,
    });
    const bs = client.blockSize;
    const minimum = bs ? Math.min(Math.max(1, bs.minimum), 65536) : 1;
    const preferred = Math.max(512, minimum, bs ? powerOfTwoAtMost(Math.max(1, bs.preferred)) : 4096);
    const maximum = Math.max(preferred, Math.min(bs?.maximum ?? MAX_IO_SIZE, MAX_IO_SIZE));
    this.blockSize = Object.freeze({ minimum, preferred, maximum: maximum - (maximum % minimum) });
    // The flags behind the capabilities advertised (the write ones only if writable).
    const F = NBD_FLAG;
    const kept = F.NBD_FLAG_SEND_FLUSH | F.NBD_FLAG_SEND_CACHE | F.NBD_FLAG_CAN_MULTI_CONN;
    const writes = F.NBD_FLAG_SEND_FUA | F.NBD_FLAG_SEND_TRIM | F.NBD_FLAG_SEND_WRITE_ZEROES | F.NBD_FLAG_SEND_FAST_ZERO;
    this.#needs = { flags: client.flags & (writable ? kept | writes : kept), blockStatus: this.capabilities.extents };
    this.description = `nbd ${this.remote}${this.#readonly && !client.readOnly ? ' (read-only)' : ''}`;
  }

  /** Connects to the remote export (once, no retry) and returns the device. */
  static async open(options: NbdDeviceOptions): Promise<NbdDevice> {
    const uri = typeof options.uri === 'string' ? parseNbdUri(options.uri) : options.uri;
    const clientOptions: NbdClientOptions = { ...options.client, connections: options.connections ?? NBD_BACKEND_DEFAULTS.connections };
    let client: NbdClient;
    try {
      client = await NbdClient.connect(uri, clientOptions);
    } catch (e) {
      const b = toBlockError(e);
      throw new BlockError(b.code, `cannot open ${displayUri(uri)}: ${b.message}`, { cause: e });
    }
    return new NbdDevice(client, uri, { ...options, clientOptions });
  }

  /** Writes acknowledged by the remote that no FLUSH or FUA has made durable yet. */
  get unflushedWrites(): number {
    return this.#acked - this.#durable;
  }

  /** Why EIO was last recorded in the ErrSeq for writes that may not be durable, or null. */
  get lastWritebackLoss(): string | null {
    return this.#lastLoss;
  }

  /** True while a connection to the remote is open (false while reconnecting or down). */
  get connected(): boolean {
    return this.#client !== null;
  }

  // -------------------------------------------------------------------------------
  // Operations

  async read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    await this.#run('read', (c) => c.pread(buf, offset));
  }

  async write(data: Buffer, offset: number, flags: number): Promise<void> {
    this.#checkWritable('write');
    const fua = (flags & REQ.FUA) !== 0;
    await this.#run('write', async (c, gen) => {
      if (fua && !c.canFua) {
        await c.pwrite(data, offset);
        await this.#remoteFlush(c, 'write (FUA)');
      } else {
        await c.pwrite(data, offset, { fua });
      }
      this.#ack(gen, fua);
    });
  }

  async flush(_flags: number): Promise<void> {
    this.#check('flush');
    if (!this.capabilities.flush) return;
    await this.#run('flush', async (c, gen) => {
      // A FLUSH covers the writes acknowledged before it was sent.
      const covers = this.#acked;
      await this.#remoteFlush(c, 'flush');
      if (gen === this.#gen) this.#durable = Math.max(this.#durable, covers);
    });
  }

  async trim(offset: number, length: number, flags: number): Promise<void> {
    this.#checkWritable('trim');
    const fua = (flags & REQ.FUA) !== 0;
    // Trim is a hint: losing one loses no data, so it is never counted as unflushed.
    await this.#run('trim', async (c) => {
      if (fua && !c.canFua) {
        await c.trim(offset, length);
        await this.#remoteFlush(c, 'trim (FUA)');
      } else {
        await c.trim(offset, length, { fua });
      }
    });
  }

  async zero(offset: number, length: number, flags: number): Promise<void> {
    this.#checkWritable('zero');
    const fua = (flags & REQ.FUA) !== 0;
    const noHole = (flags & REQ.NO_HOLE) !== 0;
    const fastZero = (flags & REQ.FAST_ZERO) !== 0;
    await this.#run('zero', async (c, gen) => {
      if (fua && !c.canFua) {
        await c.zero(offset, length, { noHole, fastZero });
        await this.#remoteFlush(c, 'zero (FUA)');
      } else {
        await c.zero(offset, length, { fua, noHole, fastZero });
      }
      this.#ack(gen, fua);
    });
  }

  async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    this.#check('extents');
    if (!this.capabilities.extents) return singleExtent(offset, length, this.size, 0);
    const len = Math.min(length === 0 ? this.size - offset : length, MAX_EFFECT_LENGTH);
    if (len <= 0) return [];
    const reqOne = (flags & REQ.REQ_ONE) !== 0;
    const list = await this.#run('extents', (c) => c.blockStatus(offset, len, { reqOne }));
    // base:allocation's state bits are EXTENT's; anything else the remote sets is dropped.
    return list.map((e) => ({ offset: e.offset, length: e.length, flags: e.flags & (EXTENT.HOLE | EXTENT.ZERO) }));
  }

  async cache(offset: number, length: number, _flags: number): Promise<void> {
    this.#check('cache');
    // A hint: without CACHE on the remote there is nothing to ask for.
    if (!this.capabilities.cache) return;
    await this.#run('cache', (c) => c.cache(offset, length));
  }

  /** Disconnects (after the requests in flight); waits for a reconnection no longer. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#abort.abort(closedError('close', this.description));
    const c = this.#client;
    this.#client = null;
    await c?.close().catch(() => undefined);
  }

  // -------------------------------------------------------------------------------
  // Internals

  #check(op: string): void {
    if (this.#closed) throw closedError(op, this.description);
  }

  #checkWritable(op: string): void {
    this.#check(op);
    if (!this.capabilities.write) throw readOnlyError(op, this.description);
  }

  /** The remote's FLUSH; its failure is a write-back failure (earlier writes may be lost). */
  async #remoteFlush(c: NbdClient, op: string): Promise<void> {
    try {
      await c.flush();
    } catch (e) {
      if (isTransportError(e)) throw e;
      const b = toBlockError(e);
      throw new BlockError(b.code, `${op}: FLUSH failed on ${this.remote}: ${b.message}`, { cause: e, writeback: true });
    }
  }

  /** A write the remote acknowledged on connection `gen`: durable if `fua`, else counted. */
  #ack(gen: number, fua: boolean): void {
    if (fua || !this.capabilities.flush) return;
    if (gen === this.#gen) {
      this.#acked++;
      return;
    }
    // Acknowledged on a connection already replaced: no FLUSH will ever cover it.
    this.#recordLoss(1, `a write was acknowledged by ${this.remote} on a connection that was then replaced`);
  }

  /** Records EIO if acknowledged writes were not yet durable when the connection was lost; returns how many. */
  #recordUnflushed(): number {
    const unflushed = this.#acked - this.#durable;
    if (unflushed > 0) {
      this.#durable = this.#acked;
      this.#recordLoss(unflushed, `${unflushed} write(s) acknowledged by ${this.remote} before the connection was lost had not been flushed and may have been lost`);
    }
    return unflushed;
  }

  /** Records EIO in the export's ErrSeq, so every session's next FLUSH reports it. */
  #recordLoss(writes: number, message: string): void {
    this.#errseq.set(linuxErrno('EIO'));
    this.#lastLoss = message;
    this.#onEvent?.({ kind: 'writes-at-risk', writes, message });
  }

  /**
   * Runs `attempt` on the current connection; on a transport failure waits for the
   * reconnection and runs it again (at most `retries` times).
   */
  async #run<T>(op: string, attempt: Attempt<T>): Promise<T> {
    let retried = 0;
    for (;;) {
      this.#check(op);
      const c = this.#client ?? (await this.#connection(op));
      const gen = this.#gen;
      try {
        return await attempt(c, gen);
      } catch (e) {
        if (this.#closed) throw closedError(op, this.description);
        if (!isTransportError(e)) throw e;
        this.#lost(gen, c, e);
        if (retried >= this.#retries) throw this.#failure(op, e, retried);
        retried++;
      }
    }
  }

  #failure(op: string, cause: BlockError, retried: number): BlockError {
    const why =
      this.#retries === 0
        ? 'not retried (retries: 0)'
        : retried === 0
          ? 'no connection could be made'
          : `given up after ${retried} ${retried === 1 ? 'retry' : 'retries'}`;
    return new BlockError('EIO', `${op}: the connection to ${this.remote} was lost (${cause.message}); ${why}`, { cause });
  }

  /** The connection a request should use once the device has one again. */
  async #connection(op: string): Promise<NbdClient> {
    if (this.#client) return this.#client;
    if (!this.#reconnecting) {
      if (this.#retries === 0 || this.#lastCause === null) {
        throw new BlockError('EIO', `${op}: ${this.#down?.message ?? `no connection to ${this.remote}`}`, { cause: this.#down ?? undefined });
      }
      // The last round of attempts failed; this request starts another.
      this.#startReconnect(this.#lastCause);
    }
    try {
      return await this.#reconnecting!;
    } catch (e) {
      if (this.#closed) throw closedError(op, this.description);
      const b = toBlockError(e);
      throw new BlockError('EIO', `${op}: ${b.message}`, { cause: e });
    }
  }

  /** Connection `gen` failed with `cause`: drop it (once) and start reconnecting. */
  #lost(gen: number, c: NbdClient, cause: BlockError): void {
    if (gen !== this.#gen || this.#client !== c) return;
    this.#client = null;
    this.#lastCause = cause;
    // Requests still running on it (a remote finishing them during its shutdown) may end; then it disconnects.
    c.close().catch(() => undefined);
    this.#onEvent?.({ kind: 'lost', cause });
    if (this.#retries === 0) {
      this.#down = new BlockError('EIO', `the connection to ${this.remote} was lost (${cause.message}); not retried (retries: 0)`, { cause });
      // There will be no reconnection to report them at: they are at risk now.
      this.#recordUnflushed();
      return;
    }
    this.#startReconnect(cause);
  }

  #startReconnect(cause: BlockError): void {
    const p = this.#reconnect(cause);
    this.#reconnecting = p;
    p.then(
      () => undefined,
      (e: unknown) => {
        this.#down = toBlockError(e);
      },
    ).finally(() => {
      if (this.#reconnecting === p) this.#reconnecting = null;
    });
  }

  async #reconnect(cause: BlockError): Promise<NbdClient> {
    const signal = this.#abort.signal;
    let delay = this.#delay;
    let last: BlockError = cause;
    for (let attempt = 1; attempt <= this.#retries; attempt++) {
      await sleep(delay, signal);
      delay = Math.min(delay * 2, this.#delayMax);
      let c: NbdClient | null = null;
      try {
        c = await NbdClient.connect(this.#uri, { ...this.#clientOptions, signal });
        this.#checkSame(c);
      } catch (e) {
        if (c) await c.close().catch(() => undefined);
        if (this.#closed) throw closedError('reconnect', this.description);
        last = toBlockError(e);
        this.#onEvent?.({ kind: 'attempt-failed', attempt, error: last });
        continue;
      }
      if (this.#closed) {
        await c.close().catch(() => undefined);
        throw closedError('reconnect', this.description);
      }
      this.#gen++;
      this.#client = c;
      this.#down = null;
      // Acknowledged, not yet durable, and the remote may have restarted: never forget them silently.
      const unflushed = this.#recordUnflushed();
      this.#onEvent?.({ kind: 'reconnected', attempt, unflushedWrites: unflushed });
      return c;
    }
    const error = new BlockError(
      'EIO',
      `the connection to ${this.remote} was lost (${cause.message}) and ${this.#retries} reconnection ${this.#retries === 1 ? 'attempt' : 'attempts'} failed (last: ${last.message})`,
      { cause: last },
    );
    this.#onEvent?.({ kind: 'gave-up', error });
    throw error;
  }

  /** A new connection must be to the same export: same size, and everything advertised still offered. */
  #checkSame(c: NbdClient): void {
    if (c.size !== this.size) throw new BlockError('EIO', `${this.remote} changed size from ${this.size} to ${c.size} bytes; not reconnecting to it`);
    const lostFlags = this.#needs.flags & ~c.flags;
    const nowReadOnly = this.capabilities.write && c.readOnly;
    if (lostFlags !== 0 || nowReadOnly || (this.#needs.blockStatus && !c.canBlockStatus())) {
      throw new BlockError('EIO', `${this.remote} no longer offers what it did (needed transmission flags 0x${this.#needs.flags.toString(16)}, now 0x${c.flags.toString(16)}${nowReadOnly ? ', now read-only' : ''}); not reconnecting to it`);
    }
  }
}

/** Waits `ms`, or rejects when `signal` aborts. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) {
      reject(toBlockError(signal.reason));
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(toBlockError(signal.reason));
    };
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

// ---------------------------------------------------------------------------------
// Settings

const MAX_DELAY_MS = 24 * 3600 * 1000;

/**
 * A duration setting: a number of seconds (fractions allowed, as nbdkit's retry-delay)
 * or a string with a unit, "250ms", "2s", "1m"; in milliseconds.
 */
const durationSetting = v.pipe(
  v.union([v.number(), v.string()], (issue) => `expected a duration (seconds, or a string like "500ms", "2s", "1m"), got ${issue.received}`),
  v.rawTransform<number | string, number>(({ dataset, addIssue, NEVER }) => {
    const value = dataset.value;
    let ms: number;
    if (typeof value === 'number') {
      ms = value * 1000;
    } else {
      const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$/.exec(value);
      if (!m) {
        addIssue({ message: `invalid duration '${value}' (seconds, or a number with ms, s or m)` });
        return NEVER;
      }
      const n = Number(m[1]);
      ms = m[2] === 'ms' ? n : m[2] === 'm' ? n * 60_000 : n * 1000;
    }
    if (!Number.isFinite(ms) || ms < 0 || ms > MAX_DELAY_MS) {
      addIssue({ message: `expected a duration from 0 to 24 hours, got ${String(value)}` });
      return NEVER;
    }
    return Math.round(ms);
  }),
);

const intSetting = (min: number, max: number) =>
  v.pipe(
    v.number((issue) => `expected a whole number from ${min} to ${max}, got ${issue.received}`),
    v.integer(`expected a whole number from ${min} to ${max}`),
    v.minValue(min, `expected a whole number from ${min} to ${max}`),
    v.maxValue(max, `expected a whole number from ${min} to ${max}`),
  );

const uriSetting = v.pipe(
  v.string((issue) => `expected an NBD URI string such as "nbd://host:10809/name", got ${issue.received}`),
  v.rawTransform<string, NbdUri>(({ dataset, addIssue, NEVER }) => {
    try {
      return parseNbdUri(dataset.value);
    } catch (e) {
      addIssue({ message: (e as Error).message });
      return NEVER;
    }
  }),
);

/** The settings schema (listed by `blockgate plugins`). */
export const nbdSettings = settingsSchema({
  uri: uriSetting,
  connections: v.optional(intSetting(1, MAX_CLIENT_CONNECTIONS)),
  retries: v.optional(intSetting(0, MAX_NBD_RETRIES)),
  retryDelay: v.optional(durationSetting),
  retryDelayMax: v.optional(durationSetting),
  readonly: booleanSetting,
});

/** Parses an `nbd` layer's settings into device options (without the errseq). Throws EINVAL naming the key. */
export function parseNbdSettings(desc: unknown): Omit<NbdDeviceOptions, 'errseq' | 'onEvent' | 'client'> & { readonly uri: NbdUri } {
  const s = parseSettings('nbd', nbdSettings, desc);
  const delay = s.retryDelay ?? NBD_BACKEND_DEFAULTS.retryDelayMs;
  const delayMax = s.retryDelayMax ?? Math.max(delay, NBD_BACKEND_DEFAULTS.retryDelayMaxMs);
  if (delayMax < delay) throw new BlockError('EINVAL', `nbd: retryDelayMax: must not be shorter than retryDelay (${delay} ms), got ${delayMax} ms`);
  return {
    uri: s.uri,
    connections: s.connections ?? NBD_BACKEND_DEFAULTS.connections,
    retries: s.retries ?? NBD_BACKEND_DEFAULTS.retries,
    retryDelayMs: delay,
    retryDelayMaxMs: delayMax,
    readonly: s.readonly ?? false,
  };
}

/**
 * Backend factory: `{ type: 'nbd', uri, connections?, retries?, retryDelay?, retryDelayMax?, readonly? }`
 * (defaults in {@link NBD_BACKEND_DEFAULTS}; delays in seconds or with a unit). The
 * device records its reconnection losses in the stack's ErrSeq.
 */
export function nbdBackend(desc: LayerDescription, ctx: StackContext): Promise<NbdDevice> {
  return NbdDevice.open({ ...parseNbdSettings(desc), errseq: ctx.errseq });
}

/** The same factory, telling `onEvent` about every device's losses and reconnections (for logs). */
export function nbdBackendWith(onEvent: (e: NbdDeviceEvent, device: string) => void): (desc: LayerDescription, ctx: StackContext) => Promise<NbdDevice> {
  return (desc, ctx) => {
    const s = parseNbdSettings(desc);
    const remote = displayUri(s.uri);
    return NbdDevice.open({ ...s, errseq: ctx.errseq, onEvent: (e) => onEvent(e, remote) });
  };
}
