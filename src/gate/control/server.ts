/**
 * The control socket of `blockgate serve` (the /dev/ggctl of blockgate): a unix stream
 * socket carrying the gate calls in the binary protocol of protocol.ts.
 *
 * Access: the socket file is created with mode 0600 (owner only), in a directory that
 * blockgate creates with mode 0700 when it creates it, and refuses to use if another
 * user could replace the socket (see checkSocketDir). Node does not expose the peer's
 * credentials (SO_PEERCRED), so no per-connection uid check is made: the file mode is
 * the access control, as /dev/ggctl's 0600 root:wheel is on FreeBSD.
 *
 * Each connection may have many calls in flight (every handler keeps STARTs
 * outstanding), matched to replies by call id. When a connection closes, its STARTs
 * still waiting are interrupted through their AbortSignal (so they take nothing) and
 * nothing else happens: requests it had already taken stay in flight on the gate until
 * a handler calls CANCEL (seq 0), as `ggatel rescue` does. A connection drop is a
 * transport event, never a gate or device error.
 *
 * Robustness: a frame that breaks the layout closes that connection; every limit is a
 * named constant (CONTROL); no input can throw out of a socket callback.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import pino, { type Logger } from 'pino';
import * as v from 'valibot';
import { BlockError, codeFromLinux, toBlockError } from '../../errors/index.js';
import { parseOrThrow } from '../../device/index.js';
import { claimSocketPath } from '../../io/listen.js';
import { GATE, GateRegistry, type GateStartResult } from '../index.js';
import {
  CONTROL,
  ControlFrameError,
  controlOpName,
  decodeRequest,
  encodeEmptyReply,
  encodeErrorReply,
  encodeJsonReply,
  encodeStartReply,
  type ControlRequest,
  type RequestHeader,
} from './protocol.js';
import { ControlFrameStream } from './frames.js';
import { defaultControlPath } from './paths.js';
import { GateService, type LiveFigures } from './gates.js';
import type { ExportTable } from '../../export/export.js';

export { defaultControlPath } from './paths.js';

/** File mode of the control socket: owner read/write only. */
export const CONTROL_SOCKET_MODE = 0o600;
/** Mode of a directory blockgate creates to hold the control socket. */
export const CONTROL_DIR_MODE = 0o700;
/** How long close() waits for control clients to hang up before cutting them. */
export const CONTROL_CLOSE_GRACE_MS = 2000;

export interface ControlServerOptions {
  readonly gates: GateService;
  /** Logger (pino). Default: silent. */
  readonly logger?: Logger;
}

const Int = v.pipe(v.number(), v.integer());
const CreateSchema = v.strictObject({
  unit: v.optional(Int),
  name: v.optional(v.string()),
  mediasize: v.number(),
  sectorsize: v.number(),
  flags: v.optional(Int),
  maxcount: v.optional(Int),
  timeout: v.optional(Int),
  info: v.optional(v.string()),
});
const ModifySchema = v.strictObject({
  unit: Int,
  mediasize: v.optional(v.number()),
  info: v.optional(v.string()),
});

/** A call's JSON arguments, validated with the one settings helper: `create: unit: ...`. */
function parseArgs<T extends v.GenericSchema>(schema: T, body: unknown, op: string): v.InferOutput<T> {
  return parseOrThrow(schema, body, op, '');
}

/** Listens on a unix socket and serves control connections. */
export class ControlServer {
  readonly gates: GateService;
  readonly logger: Logger;
  readonly #connections = new Set<ControlConnection>();
  #server: net.Server | undefined;
  #path: string | undefined;

  constructor(opts: ControlServerOptions) {
    this.gates = opts.gates;
    this.logger = opts.logger ?? pino({ level: 'silent' });
  }

  /** The socket path, once listening. */
  get path(): string | undefined {
    return this.#path;
  }

  /** Open control connections. */
  get connectionCount(): number {
    return this.#connections.size;
  }

  /**
   * Listens on `socketPath`. Creates its directory (mode 0700) if missing. A socket file
   * left by a dead server is replaced; one with a live server behind it fails EADDRINUSE.
   */
  async listen(socketPath: string): Promise<void> {
    const dir = path.dirname(socketPath);
    fs.mkdirSync(dir, { recursive: true, mode: CONTROL_DIR_MODE });
    checkSocketDir(dir);
    await claimSocketPath(socketPath);
    const server = net.createServer((socket) => this.#accept(socket));
    server.on('error', (err) => this.logger.error({ err }, 'control listener error'));
    // bind(2) creates the socket file with the umask applied; narrow the umask around
    // the (synchronous) bind so the file never exists with wider permissions.
    const oldMask = process.umask(0o777 & ~CONTROL_SOCKET_MODE);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(socketPath, () => {
          server.off('error', reject);
          resolve();
        });
        // bind(2) ran synchronously inside listen(); restore the umask at once.
        process.umask(oldMask);
      });
    } finally {
      process.umask(oldMask);
    }
    fs.chmodSync(socketPath, CONTROL_SOCKET_MODE);
    this.#server = server;
    this.#path = socketPath;
  }

  #accept(socket: net.Socket): void {
    const c = new ControlConnection(socket, this, () => this.#connections.delete(c));
    this.#connections.add(c);
  }

  /**
   * Stops listening and closes every connection (their waiting STARTs are interrupted),
   * then removes the socket file. Replies already written (ECANCELED after the gates
   * were destroyed, say) are flushed first: connections are ended, and cut only if a
   * peer has not closed its side after `graceMs`.
   */
  async close(graceMs = CONTROL_CLOSE_GRACE_MS): Promise<void> {
    const server = this.#server;
    this.#server = undefined;
    if (this.#path) fs.rmSync(this.#path, { force: true });
    for (const c of this.#connections) c.end();
    const timer = setTimeout(() => {
      for (const c of this.#connections) c.destroy();
    }, graceMs);
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
    clearTimeout(timer);
  }
}

/**
 * Refuses a directory where another user could swap our socket for theirs: one owned by
 * a user other than us or root (a /tmp/blockgate-<uid> planted by someone else), or
 * writable by group or others without the sticky bit. /tmp itself (root, sticky) is fine.
 */
function checkSocketDir(dir: string): void {
  const st = fs.lstatSync(dir);
  const uid = process.getuid?.();
  if (!st.isDirectory()) throw new BlockError('EINVAL', `${dir} is not a directory`);
  if (uid !== undefined && st.uid !== uid && st.uid !== 0) {
    throw new BlockError('EACCES', `${dir} belongs to uid ${st.uid}, not to us (${uid}); refusing to put the control socket there`);
  }
  if ((st.mode & 0o022) !== 0 && (st.mode & 0o1000) === 0) {
    throw new BlockError('EACCES', `${dir} is writable by others and not sticky; refusing to put the control socket there`);
  }
}

/** One call in flight on a connection. */
interface Call {
  readonly op: number;
  /** START only: interrupts the registry call (connection closed, or ABORT). */
  readonly abort?: AbortController;
}

class ControlConnection {
  readonly #socket: net.Socket;
  readonly #server: ControlServer;
  readonly #log: Logger;
  /** Frames off the socket; paused (with the socket) while this connection is over its limits. */
  readonly #frames: ControlFrameStream<RequestHeader>;
  readonly #calls = new Map<number, Call>();
  readonly #onClosed: () => void;
  #closed = false;
  #paused = false;

  constructor(socket: net.Socket, server: ControlServer, onClosed: () => void) {
    this.#socket = socket;
    this.#server = server;
    this.#onClosed = onClosed;
    this.#log = server.logger.child({ control: true });
    this.#frames = ControlFrameStream.requests(
      (h, body) => this.#onFrame(h, body),
      (e) => this.#fatal(e),
    );
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('drain', () => this.#maybeResume());
    socket.on('error', (err) => this.#log.debug({ err }, 'control socket error'));
    socket.on('close', () => this.#onClose());
  }

  destroy(): void {
    this.#socket.destroy();
  }

  /** Flushes what was written, then closes (our STARTs are interrupted when the socket closes). */
  end(): void {
    if (this.#closed) return;
    setImmediate(() => this.#socket.end());
  }

  #onData(chunk: Buffer): void {
    if (this.#closed) return;
    // Frames run synchronously from here; one that breaks the layout calls #fatal.
    this.#frames.push(chunk);
  }

  #fatal(e: unknown): void {
    if (e instanceof ControlFrameError) this.#log.info({ reason: e.message }, 'bad control frame, closing the connection');
    else this.#log.error({ err: e }, 'control connection failed, closing it');
    this.#socket.destroy();
  }

  /**
   * Runs one call. At MAX_CALLS_IN_FLIGHT calls in flight the frame stream and the
   * socket pause (#maybePause), so later frames, even of the same chunk, wait until
   * calls finish. While paused, a peer that hangs up is noticed only when a reply is
   * written or the pause ends; handlers built with serveGate stay far below the limit
   * (MAX_GATE_CONCURRENCY).
   */
  #onFrame(h: RequestHeader, body: Buffer): void {
    this.#dispatch(h, body);
    this.#maybePause();
  }

  #dispatch(h: RequestHeader, body: Buffer): void {
    if (this.#calls.has(h.callId)) {
      throw new ControlFrameError(`call id ${h.callId} is already in flight`);
    }
    // A caller of another API version: fail the call (FreeBSD: EINVAL) without
    // interpreting a body whose layout may differ.
    if (h.version !== GATE.VERSION) {
      this.#reply(
        encodeErrorReply(h.op, h.callId, new BlockError('EINVAL', `gate API version ${h.version} is not ${GATE.VERSION}`)),
      );
      return;
    }
    const req = decodeRequest(h, body);
    if (req.op === 'start') {
      const abort = new AbortController();
      this.#calls.set(h.callId, { op: h.op, abort });
      this.#run(h, this.#start(req, abort.signal), (r) => encodeStartReply(h.callId, r));
      return;
    }
    this.#calls.set(h.callId, { op: h.op });
    this.#run(h, this.#call(req), (r) => (r === undefined ? encodeEmptyReply(h.op, h.callId) : encodeJsonReply(h.op, h.callId, r)));
  }

  async #start(req: ControlRequest & { op: 'start' }, signal: AbortSignal): Promise<GateStartResult> {
    // A WRITE larger than one frame cannot be shipped: declare at most MAX_DATA, so the
    // handler gets ENOMEM with the length needed and can tell it cannot serve it.
    const length = Math.min(req.length, CONTROL.MAX_DATA);
    return this.#server.gates.registry.start({ version: req.version, unit: req.unit, length, signal });
  }

  async #call(req: ControlRequest): Promise<unknown> {
    const gates = this.#server.gates;
    switch (req.op) {
      case 'create': {
        const a = parseArgs(CreateSchema, req.body, 'create');
        return gates.create({ ...a, version: req.version });
      }
      case 'modify': {
        const a = parseArgs(ModifySchema, req.body, 'modify');
        await gates.modify({ ...a, version: req.version });
        return undefined;
      }
      case 'destroy':
        await gates.destroy({
          version: req.version,
          unit: req.unit,
          force: req.force,
          ...(req.name !== undefined ? { name: req.name } : {}),
        });
        return undefined;
      case 'cancel':
        await gates.registry.cancel({
          version: req.version,
          unit: req.unit,
          seq: req.seq,
          ...(req.name !== undefined ? { name: req.name } : {}),
        });
        return undefined;
      case 'done': {
        const error = req.errno === 0 ? 0 : codeFromLinux(req.errno);
        if (error === undefined) throw new BlockError('EINVAL', `done: unknown errno ${req.errno}`);
        await gates.registry.done({
          version: req.version,
          unit: req.unit,
          seq: req.seq,
          error,
          ...(req.data !== undefined ? { data: req.data } : {}),
        });
        return undefined;
      }
      case 'list':
        return gates.list();
      case 'status':
        return gates.status();
      case 'abort': {
        // Interrupts a START of this connection; the START itself replies (EINTR, or a
        // request if it had already taken one). Any other target is ignored.
        const target = this.#calls.get(req.target);
        target?.abort?.abort(new BlockError('EINTR', 'aborted by the client'));
        return undefined;
      }
      case 'start':
        throw new BlockError('EINVAL', 'start is not dispatched here');
      case 'unknown':
        throw new BlockError('EOPNOTSUPP', `unknown control op ${req.code}`);
    }
  }

  #run<T>(h: RequestHeader, p: Promise<T>, encode: (r: T) => Buffer[]): void {
    p.then(
      (r) => {
        this.#calls.delete(h.callId);
        let chunks: Buffer[];
        try {
          chunks = encode(r);
        } catch (e) {
          chunks = encodeErrorReply(h.op, h.callId, toBlockError(e));
        }
        this.#reply(chunks);
      },
      (e: unknown) => {
        this.#calls.delete(h.callId);
        const b = toBlockError(e);
        if (b.code !== 'EINTR') this.#log.debug({ op: controlOpName(h.op), code: b.code, msg: b.message }, 'control call failed');
        this.#reply(encodeErrorReply(h.op, h.callId, b));
      },
    ).finally(() => this.#maybeResume());
  }

  #reply(chunks: Buffer[]): void {
    if (this.#closed || this.#socket.destroyed) return;
    this.#socket.cork();
    for (const c of chunks) this.#socket.write(c);
    process.nextTick(() => this.#socket.uncork());
  }

  /** Stops reading while too many calls are in flight or the peer is not reading replies. */
  #maybePause(): void {
    if (this.#paused || this.#closed) return;
    if (this.#calls.size >= CONTROL.MAX_CALLS_IN_FLIGHT || this.#socket.writableNeedDrain) {
      this.#paused = true;
      this.#frames.pause();
      this.#socket.pause();
    }
  }

  #maybeResume(): void {
    if (!this.#paused || this.#closed) return;
    if (this.#calls.size < CONTROL.MAX_CALLS_IN_FLIGHT && !this.#socket.writableNeedDrain) {
      this.#paused = false;
      // Runs the frames queued meanwhile; they may pause the connection again.
      this.#frames.resume();
      if (!this.#paused) this.#socket.resume();
    }
  }

  #onClose(): void {
    if (this.#closed) return;
    this.#closed = true;
    // Frames queued while paused are never run.
    this.#frames.stop();
    // Interrupt the STARTs still waiting: they take nothing more. Requests already
    // taken stay in flight on their gates (FreeBSD semantics); nothing else is failed.
    let interrupted = 0;
    for (const call of this.#calls.values()) {
      if (call.abort) {
        call.abort.abort(new BlockError('EINTR', 'control connection closed'));
        interrupted++;
      }
    }
    this.#log.debug({ interrupted }, 'control connection closed');
    this.#onClosed();
  }
}

/** A running control socket with its gates, as `blockgate serve` holds it. */
export interface ControlHandle {
  readonly control: ControlServer;
  readonly gates: GateService;
  readonly path: string;
  /** Destroys every gate (handlers get ECANCELED), then closes the socket. */
  close(): Promise<void>;
}

export interface StartControlOptions {
  /** The NBD server gates are exported on. */
  readonly nbd: ExportTable;
  /** Socket path; default {@link defaultControlPath}. */
  readonly path?: string;
  /**
   * True when the path was asked for explicitly: failing to listen is then an error.
   * At the default path a failure (another server already has it) is logged and the
   * server runs without a control socket.
   */
  readonly required: boolean;
  readonly logger: Logger;
  /** Size of the gate unit table; default GATE.DEFAULT_MAX_UNITS. */
  readonly maxUnits?: number;
  /** The server's live figures per export, for STATUS (src/metrics). */
  readonly live?: LiveFigures;
}

/** Creates the gate registry and the control socket of `blockgate serve`. */
export async function startControlServer(opts: StartControlOptions): Promise<ControlHandle | undefined> {
  const socketPath = opts.path ?? defaultControlPath();
  const gates = new GateService(new GateRegistry(opts.maxUnits !== undefined ? { maxUnits: opts.maxUnits } : {}), opts.nbd, opts.live);
  const control = new ControlServer({ gates, logger: opts.logger });
  try {
    await control.listen(socketPath);
  } catch (e) {
    if (opts.required) throw e;
    opts.logger.warn({ path: socketPath, reason: (e as Error).message }, 'no control socket (gates and status unavailable)');
    return undefined;
  }
  opts.logger.info({ control: socketPath }, 'control socket');
  return {
    control,
    gates,
    path: socketPath,
    async close() {
      await gates.close();
      await control.close();
    },
  };
}
