/**
 * A client of the control socket of `blockgate serve`: the gate calls as async methods
 * with the same shapes as GateRegistry's, so a handler loop runs unchanged against an
 * in-process registry or a server in another process.
 *
 * The two error channels of the protocol stay apart here: a call that fails (bad
 * version EINVAL, unknown unit ENXIO, a START interrupted by the caller's signal EINTR,
 * the connection lost ECONNRESET) rejects with a BlockError; a gate condition resolves
 * START with `error` set (ECANCELED: destroyed; ENOMEM: the buffer length needed).
 */
import net from 'node:net';
import { BlockError, codeFromLinux, linuxErrno, toBlockError } from '../../errors/index.js';
import {
  GATE,
  type GateCancelArgs,
  type GateCreateArgs,
  type GateDestroyArgs,
  type GateDoneArgs,
  type GateInfo,
  type GateModifyArgs,
  type GateStartArgs,
  type GateStartResult,
} from '../index.js';
import {
  decodeReply,
  encodeRequest,
  type ControlReply,
  type ControlRequestInput,
} from './protocol.js';
import { ControlFrameStream } from './frames.js';
import { defaultControlPath } from './paths.js';
import type { StatusReport } from './gates.js';

/** A registry argument type with `version` optional (default {@link GATE.VERSION}). */
export type Versioned<T extends { readonly version: number }> = Omit<T, 'version'> & { readonly version?: number };

/** Distributes Omit over a union so each variant keeps its own fields. */
type RequestBody = ControlRequestInput extends infer R ? (R extends unknown ? Omit<R, 'callId' | 'version'> : never) : never;

interface PendingCall {
  readonly resolve: (r: ControlReply) => void;
  readonly reject: (e: BlockError) => void;
}

/** The largest call id; ids wrap around and skip ids still in flight. */
const MAX_CALL_ID = 0xffff_ffff;

export class ControlClient {
  /** The socket path this client is connected to. */
  readonly path: string;
  readonly #socket: net.Socket;
  readonly #frames = ControlFrameStream.replies(
    (h, body) => this.#onReply(decodeReply(h, body)),
    (e) => this.#onBadReply(e),
  );
  readonly #calls = new Map<number, PendingCall>();
  #nextId = 1;
  #closed = false;
  #closeReason: BlockError | undefined;
  readonly #closedPromise: Promise<void>;

  private constructor(socket: net.Socket, socketPath: string) {
    this.#socket = socket;
    this.path = socketPath;
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('error', (err) => {
      this.#closeReason ??= new BlockError('ECONNRESET', `control connection to ${socketPath} failed: ${err.message}`, { cause: err });
    });
    this.#closedPromise = new Promise<void>((resolve) => {
      socket.on('close', () => {
        this.#onClose();
        resolve();
      });
    });
  }

  /** Connects to a control socket (default: {@link defaultControlPath}). */
  static connect(socketPath: string = defaultControlPath()): Promise<ControlClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(socketPath);
      const onError = (err: Error): void => {
        const b = toBlockError(err);
        reject(new BlockError(b.code, `cannot connect to the control socket ${socketPath}: ${err.message}`, { cause: err }));
      };
      s.once('error', onError);
      s.once('connect', () => {
        s.off('error', onError);
        resolve(new ControlClient(s, socketPath));
      });
    });
  }

  /** True once the connection is closed (every later call rejects ECONNRESET). */
  get closed(): boolean {
    return this.#closed;
  }

  /** Resolves when the connection has closed, for whatever reason. */
  get whenClosed(): Promise<void> {
    return this.#closedPromise;
  }

  /** Calls in flight on this connection. */
  get pendingCalls(): number {
    return this.#calls.size;
  }

  /** CREATE: resolves with the unit number. */
  async create(args: Versioned<GateCreateArgs>): Promise<number> {
    const { version, ...body } = args;
    const r = await this.#call({ op: 'create', body }, version);
    const unit = (r.kind === 'json' ? (r.body as { unit?: unknown } | null)?.unit : undefined) ?? undefined;
    if (typeof unit !== 'number') throw new BlockError('EIO', 'create: the server returned no unit');
    return unit;
  }

  async modify(args: Versioned<GateModifyArgs>): Promise<void> {
    const { version, ...body } = args;
    await this.#call({ op: 'modify', body }, version);
  }

  async destroy(args: Versioned<GateDestroyArgs>): Promise<void> {
    await this.#call({ op: 'destroy', unit: args.unit, force: args.force, name: args.name }, args.version);
  }

  async cancel(args: Versioned<GateCancelArgs>): Promise<void> {
    await this.#call({ op: 'cancel', unit: args.unit, seq: args.seq, name: args.name }, args.version);
  }

  /**
   * START: waits for the next request of the gate. Aborting `signal` asks the server to
   * interrupt the call (it then rejects EINTR); if the server had already handed over a
   * request, that request is still delivered, so none is ever lost to a late abort.
   */
  async start(args: Versioned<GateStartArgs>): Promise<GateStartResult> {
    const signal = args.signal;
    if (signal?.aborted) throw new BlockError('EINTR', 'start interrupted by the caller', { cause: signal.reason });
    let onAbort: (() => void) | undefined;
    const r = await this.#call({ op: 'start', unit: args.unit, length: args.length }, args.version, (id) => {
      if (signal === undefined) return;
      onAbort = () => {
        // Fire and forget: the START's own reply says how it ended.
        this.#call({ op: 'abort', target: id }, args.version).catch(() => undefined);
      };
      signal.addEventListener('abort', onAbort, { once: true });
    }).finally(() => {
      if (onAbort) signal?.removeEventListener('abort', onAbort);
    });
    if (r.kind !== 'start') throw new BlockError('EIO', 'start: the server returned no result');
    return r.result;
  }

  /** DONE. A READ's `data` is sent as is (at least `length` bytes are needed). */
  async done(args: Versioned<GateDoneArgs>): Promise<void> {
    const error = args.error ?? 0;
    await this.#call(
      { op: 'done', unit: args.unit, seq: args.seq, errno: error === 0 ? 0 : linuxErrno(error), data: args.data },
      args.version,
    );
  }

  async list(): Promise<GateInfo[]> {
    const r = await this.#call({ op: 'list' });
    return r.kind === 'json' && Array.isArray(r.body) ? (r.body as GateInfo[]) : [];
  }

  /** Exports (errseq state, sessions with an error pending) and gates; consumes nothing. */
  async status(): Promise<StatusReport> {
    const r = await this.#call({ op: 'status' });
    if (r.kind !== 'json' || typeof r.body !== 'object' || r.body === null) {
      throw new BlockError('EIO', 'status: the server returned no report');
    }
    return r.body as StatusReport;
  }

  /** Closes the connection. Calls in flight reject ECONNRESET; the server interrupts our STARTs. */
  async close(): Promise<void> {
    this.#closeReason ??= new BlockError('ECONNRESET', 'control connection closed by the client');
    this.#socket.end();
    this.#socket.destroySoon();
    await this.#closedPromise;
  }

  #call(body: RequestBody, version: number = GATE.VERSION, sent?: (id: number) => void): Promise<ControlReply> {
    if (this.#closed) {
      return Promise.reject(this.#closeReason ?? new BlockError('ECONNRESET', 'control connection is closed'));
    }
    const callId = this.#allocateId();
    let chunks: Buffer[];
    try {
      chunks = encodeRequest({ ...body, callId, version } as ControlRequestInput);
    } catch (e) {
      return Promise.reject(toBlockError(e));
    }
    const p = new Promise<ControlReply>((resolve, reject) => {
      this.#calls.set(callId, { resolve, reject });
    });
    this.#socket.cork();
    for (const c of chunks) this.#socket.write(c);
    this.#socket.uncork();
    sent?.(callId);
    return p.then((r) => {
      if (r.kind !== 'error') return r;
      const code = codeFromLinux(r.status);
      throw code !== undefined
        ? new BlockError(code, r.message)
        : new BlockError('EIO', `call failed with errno ${r.status}, unknown here: ${r.message}`);
    });
  }

  #allocateId(): number {
    for (;;) {
      const id = this.#nextId;
      this.#nextId = id === MAX_CALL_ID ? 1 : id + 1;
      if (!this.#calls.has(id)) return id;
    }
  }

  #onData(chunk: Buffer): void {
    // Replies are decoded and delivered synchronously; a bad one calls #onBadReply.
    this.#frames.push(chunk);
  }

  #onReply(reply: ControlReply): void {
    const call = this.#calls.get(reply.callId);
    if (call === undefined) return; // a reply to a call we gave up on (none today); harmless
    this.#calls.delete(reply.callId);
    call.resolve(reply);
  }

  #onBadReply(e: unknown): void {
    this.#closeReason ??= new BlockError('EIO', `bad reply from the control server: ${(e as Error).message}`, { cause: e });
    this.#socket.destroy();
  }

  #onClose(): void {
    this.#closed = true;
    const reason = this.#closeReason ?? new BlockError('ECONNRESET', `control connection to ${this.path} closed`);
    this.#closeReason = reason;
    const calls = [...this.#calls.values()];
    this.#calls.clear();
    for (const c of calls) c.reject(reason);
  }
}

/** Connects to the control socket of a `blockgate serve` (default path: {@link defaultControlPath}). */
export function connectControl(socketPath?: string): Promise<ControlClient> {
  return ControlClient.connect(socketPath);
}
