/**
 * What the NBD server tells an observer (src/metrics implements it; this folder does not
 * import prom-client or know how figures are kept). Every hook is a plain call with
 * numbers and strings the caller already has, so that a sink can count in place without
 * an allocation per request; with no sink the server makes no call at all.
 */
import type { Export } from '../export/export.js';

/** Why a connection was closed before the greeting. */
export type RefusedReason = 'rules' | 'limit' | 'shutdown';

/**
 * How a handshake ended: `transmission` (an export was selected), `abort` (NBD_OPT_ABORT,
 * e.g. `nbdinfo --list`), `timeout` (handshakeTimeoutMs), `failed` (anything else: a
 * refused option that ends the connection, a failed TLS handshake, the peer hanging up).
 */
export type HandshakeResult = 'transmission' | 'abort' | 'timeout' | 'failed';

/** The request hooks of one (export, listener) pair, taken once per session at the start of transmission. */
export interface RequestSink {
  /** A request starts: `cost` payload bytes are in flight. */
  begin(cost: number): void;
  /**
   * The request ended. `cmd` is the NBD command, `length` the request's length, `errno`
   * the NBD wire error value of the reply (0 = success), `t0` the `performance.now()`
   * at which its bytes arrived (the session reads the clock once per received chunk).
   */
  end(cmd: number, length: number, cost: number, errno: number, t0: number): void;
}

/** A server's observer. `listener` is the label {@link NbdMetricsSink.listenerLabel} made. */
export interface NbdMetricsSink {
  connectionOpened(listener: string): void;
  connectionClosed(listener: string): void;
  connectionRefused(listener: string, reason: RefusedReason): void;
  handshake(listener: string, result: HandshakeResult, tls: boolean): void;
  /** The request hooks for sessions of `exp` accepted on `listener`. */
  requests(exp: Export, listener: string): RequestSink;
  /** A session was told of a write-back error (a FLUSH's reply, or its own durability failure). */
  errorReported(exp: Export, sessionId: number, peer: string, errno: number): void;
}
