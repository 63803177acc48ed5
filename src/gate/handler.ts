/**
 * The handler SDK: serve a gate from TypeScript. `serveGate` runs the START/DONE loop of
 * a GEOM Gate handler (ggatel's, done right) against a control-socket client or an
 * in-process GateRegistry, calling your `read`/`write`/`delete`/`flush`.
 *
 * The loop follows the two error channels (D33996):
 * - an interrupted START (EINTR) is retried: an interruption is not an instance error,
 *   and internal wake-ups never even reach the loop (the server retries them);
 * - START resolving ENOMEM: the declared buffer grows to the length needed, then START
 *   again (the request waits at the head of the queue);
 * - START resolving ECANCELED: the gate was destroyed; the loop ends and the promise
 *   resolves. That is the only clean exit;
 * - anything else (a failed call: ENXIO, ENOENT, ECONNRESET...) rejects.
 *
 * Errors thrown by your callbacks are the request's result (DONE with that errno, EIO
 * for non-errno errors): the requester gets them, the loop goes on. Throwing EAGAIN
 * puts the request back at the head of the queue to be retried.
 */
import { BlockError, toBlockError, type ErrnoCode } from '../errors/index.js';
import {
  GATE,
  type GateCommand,
  type GateDoneArgs,
  type GateStartArgs,
  type GateStartRequest,
  type GateStartResult,
} from './index.js';
import { CONTROL } from './control/protocol.js';

export { ControlClient, connectControl, type Versioned } from './control/client.js';

/** The calls a handler loop needs. A ControlClient and a GateRegistry both have them. */
export interface GateCalls {
  start(args: GateStartArgs): Promise<GateStartResult>;
  done(args: GateDoneArgs): Promise<void>;
}

/** What a gate is served from. Offsets and lengths are bytes, sector-aligned and inside the media. */
export interface GateHandler {
  /** Returns `length` bytes read at `offset` (a longer buffer is cut; a shorter one fails the request EIO). */
  read(offset: number, length: number): Buffer | Promise<Buffer>;
  /** Writes `data` at `offset`. `data` is only valid until this returns/resolves: copy it to keep it. */
  write(offset: number, data: Buffer): void | Promise<void>;
  /**
   * BIO_DELETE (NBD trim): the range's contents may be discarded. Omitted: the request
   * fails EOPNOTSUPP. Never write a stale buffer here (FreeBSD ggatel's bug, A.4 #14).
   */
  delete?(offset: number, length: number): void | Promise<void>;
  /**
   * Makes every write completed before it durable. Omit it only if every write is
   * durable when `write` resolves: a missing flush succeeds.
   */
  flush?(): void | Promise<void>;
}

/** Default number of STARTs in flight (requests served concurrently). */
export const DEFAULT_GATE_CONCURRENCY = 4;
/** Default initial buffer declared to START: 128 KiB, FreeBSD's MAXPHYS; grown on ENOMEM. */
export const DEFAULT_GATE_BUFFER_SIZE = 128 * 1024;
/** Largest concurrency accepted: the control server reads no more than this many calls per connection. */
export const MAX_GATE_CONCURRENCY = 1024;

/** Something the loop did, for logs (`ggatel -v`). */
export type ServeGateEvent =
  | {
      readonly type: 'request';
      readonly cmd: GateCommand;
      readonly seq: number;
      readonly offset: number;
      readonly length: number;
      /** 0, or the errno the request was answered with. */
      readonly error: ErrnoCode | 0;
    }
  | { readonly type: 'interrupted' }
  | { readonly type: 'grow'; readonly length: number };

export interface ServeGateOptions {
  /** STARTs kept in flight, i.e. requests served at once; default {@link DEFAULT_GATE_CONCURRENCY}. */
  readonly concurrency?: number;
  /** Initial buffer length declared to START; default {@link DEFAULT_GATE_BUFFER_SIZE}. */
  readonly bufferSize?: number;
  /**
   * Largest buffer the loop grows to; a WRITE larger than this rejects the loop with
   * ENOMEM (it could never be taken). Default and maximum: CONTROL.MAX_DATA (32 MiB),
   * the largest payload the control socket carries.
   */
  readonly maxBufferSize?: number;
  /**
   * Stops serving: STARTs waiting are interrupted, requests already taken are answered,
   * then the promise rejects EINTR (stopping is not the gate's end).
   */
  readonly signal?: AbortSignal;
  /** Called for every request answered and every interruption or buffer growth. */
  readonly onEvent?: (e: ServeGateEvent) => void;
}

/** What a loop did, resolved when the gate was destroyed. */
export interface ServeGateResult {
  /** Requests answered (successfully or with an error). */
  readonly served: number;
  /** Requests answered with an error by the handler. */
  readonly failed: number;
  /** Interrupted STARTs that were retried. */
  readonly interruptions: number;
  /** Times the buffer grew on ENOMEM. */
  readonly grows: number;
  /** The buffer length declared at the end. */
  readonly bufferSize: number;
}

function isInterrupted(e: unknown): boolean {
  return e instanceof BlockError && e.code === 'EINTR';
}

function checkPositiveInt(v: number, what: string, max: number): void {
  if (!Number.isSafeInteger(v) || v < 1 || v > max) throw new BlockError('EINVAL', `serveGate: ${what} must be an integer in [1, ${max}], got ${v}`);
}

/**
 * Serves gate `unit` with `handler` until the gate is destroyed (resolves) or something
 * else ends the loop (rejects). See the module comment for the rules.
 */
export async function serveGate(
  client: GateCalls,
  unit: number,
  handler: GateHandler,
  opts: ServeGateOptions = {},
): Promise<ServeGateResult> {
  const concurrency = opts.concurrency ?? DEFAULT_GATE_CONCURRENCY;
  const maxBuffer = opts.maxBufferSize ?? CONTROL.MAX_DATA;
  checkPositiveInt(concurrency, 'concurrency', MAX_GATE_CONCURRENCY);
  checkPositiveInt(maxBuffer, 'maxBufferSize', CONTROL.MAX_DATA);
  let buffer = opts.bufferSize ?? Math.min(DEFAULT_GATE_BUFFER_SIZE, maxBuffer);
  checkPositiveInt(buffer, 'bufferSize', maxBuffer);
  const emit = opts.onEvent ?? (() => undefined);
  const userSignal = opts.signal;
  if (userSignal?.aborted) throw new BlockError('EINTR', 'serveGate: stopped before it started', { cause: userSignal.reason });

  const stats = { served: 0, failed: 0, interruptions: 0, grows: 0 };
  // Ends every worker's START: on ECANCELED, on a failure, on the caller's signal.
  const stop = new AbortController();
  let canceled = false;
  let stopped = false;
  let failure: { error: unknown } | undefined;
  const finishing = (): boolean => canceled || stopped || failure !== undefined;
  const onUserAbort = (): void => {
    stopped = true;
    stop.abort(userSignal?.reason);
  };
  userSignal?.addEventListener('abort', onUserAbort, { once: true });

  /** Runs one request in the handler; resolves with what DONE should say. */
  const handle = async (r: GateStartRequest): Promise<{ error: ErrnoCode | 0; data?: Buffer }> => {
    try {
      switch (r.cmd) {
        case 'read': {
          const b = await handler.read(r.offset, r.length);
          if (!Buffer.isBuffer(b) || b.length < r.length) {
            throw new BlockError('EIO', `read handler returned ${Buffer.isBuffer(b) ? b.length : 'no'} bytes of ${r.length}`);
          }
          return { error: 0, data: b.length === r.length ? b : b.subarray(0, r.length) };
        }
        case 'write':
          await handler.write(r.offset, r.data!);
          return { error: 0 };
        case 'delete':
          if (!handler.delete) throw new BlockError('EOPNOTSUPP', 'this handler does not support delete');
          await handler.delete(r.offset, r.length);
          return { error: 0 };
        case 'flush':
          await handler.flush?.();
          return { error: 0 };
      }
    } catch (e) {
      return { error: toBlockError(e).code };
    }
  };

  const startCall = (): Promise<GateStartResult> => {
    const p = client.start({ version: GATE.VERSION, unit, length: buffer, signal: stop.signal });
    // Awaited later; never let an abandoned one (the loop failing) become unhandled.
    p.catch(() => undefined);
    return p;
  };

  const worker = async (): Promise<void> => {
    // The next START is sent before the DONE of the current request, so from the moment
    // a requester sees its request complete, this worker is already waiting in START:
    // a DESTROY that follows reaches it as ECANCELED rather than finding it between
    // calls (where its next START would fail ENXIO).
    let next: Promise<GateStartResult> | undefined;
    for (;;) {
      if (next === undefined && finishing()) return;
      let r: GateStartResult;
      try {
        r = await (next ?? startCall());
      } catch (e) {
        if (isInterrupted(e)) {
          if (finishing()) return;
          // ERESTART rule: an interruption is about the call, not the gate.
          stats.interruptions++;
          emit({ type: 'interrupted' });
          continue;
        } else if (canceled) {
          return; // the unit is gone (ENXIO) after another worker's ECANCELED
        }
        throw e;
      } finally {
        next = undefined;
      }
      if (r.error === 'ECANCELED') {
        canceled = true;
        stop.abort(new BlockError('ECANCELED', 'the gate was destroyed'));
        return;
      }
      if (r.error === 'ENOMEM') {
        if (r.length > maxBuffer) {
          throw new BlockError('ENOMEM', `a write of ${r.length} bytes is waiting; maxBufferSize is ${maxBuffer}`);
        }
        if (r.length > buffer) {
          buffer = r.length;
          stats.grows++;
          emit({ type: 'grow', length: buffer });
        }
        continue;
      }
      // A request taken is always answered, even if the loop is finishing.
      const { error, data } = await handle(r);
      if (!finishing()) next = startCall();
      try {
        await client.done({ version: GATE.VERSION, unit, seq: r.seq, error, ...(data !== undefined ? { data } : {}) });
      } catch (e) {
        // The gate went away while we served (another worker already saw ECANCELED).
        if (canceled) continue;
        throw e;
      }
      stats.served++;
      if (error !== 0) stats.failed++;
      emit({ type: 'request', cmd: r.cmd, seq: r.seq, offset: r.offset, length: r.length, error });
    }
  };

  const workers = Array.from({ length: concurrency }, () =>
    worker().catch((e: unknown) => {
      failure ??= { error: e };
      stop.abort(e);
    }),
  );
  await Promise.all(workers);
  userSignal?.removeEventListener('abort', onUserAbort);
  // Narrowed by hand: TypeScript cannot see the workers' assignments.
  const failed = failure as { error: unknown } | undefined;
  if (failed !== undefined) throw failed.error;
  if (canceled) return { ...stats, bufferSize: buffer };
  throw new BlockError('EINTR', 'serveGate: stopped by the caller', { cause: userSignal?.reason });
}
