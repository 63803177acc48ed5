/**
 * The graceful end of a listening server, shared by the NBD server and ggated: ask
 * every session to finish, force the stragglers after a grace period, then close the
 * listeners.
 */
import type net from 'node:net';

/** A session as the shutdown sees it. */
export interface DrainableSession {
  /** Stop taking requests and end once the ones in hand are answered. */
  shutdown(): void;
  /** End now. */
  destroy(): void;
}

/**
 * Asks every session in `sessions` to shut down and waits for `drained`, which the
 * owner resolves when its last session is gone; sessions still open after `graceMs`
 * are destroyed. `drained` must be created before the call, so that a session ending
 * at once is not missed.
 */
export async function drainSessions(sessions: ReadonlySet<DrainableSession>, graceMs: number, drained: Promise<void>): Promise<void> {
  for (const s of sessions) s.shutdown();
  const timer = setTimeout(() => {
    for (const s of sessions) s.destroy();
  }, graceMs);
  await drained;
  clearTimeout(timer);
}

/** Closes every listener that is still listening; resolves when all are closed. */
export async function closeListeners(servers: readonly net.Server[]): Promise<void> {
  await Promise.all(servers.map((s) => new Promise<void>((r) => (s.listening ? s.close(() => r()) : r()))));
}
