/**
 * How a failed request is logged, the same for every frontend: the client always gets its
 * error reply; the log tells the operator what kind of failure it was.
 *
 * - An unexpected exception (a programming error: a TypeError thrown by a device, anything
 *   that is neither a BlockError nor a system error with an errno) is logged at `error`
 *   with its stack, once per kind per UNEXPECTED_LOG_INTERVAL_MS, with the number of
 *   repeats suppressed since: a bug hit by every request must not flood the log, and must
 *   not be silent either.
 * - An injected failure (the error filter) at `info`, as nbdkit's error filter does: the
 *   person who asked for it wants to see it happen.
 * - An expected device error (EIO from a disk, ENOSPC) at `debug`: the client has it.
 *
 * The error's text goes under `reason`, never `msg`, which is pino's own message key
 * (two `msg` keys in one JSON line lose one of them).
 */
import type { Logger } from 'pino';
import { isBlockError, isErrnoCode, type BlockError } from '../errors/index.js';

/** The least time between two `error` lines for the same kind of unexpected exception: 60 s. */
export const UNEXPECTED_LOG_INTERVAL_MS = 60_000;

/** Kinds of unexpected exception remembered for rate limiting: 256 (then the oldest is forgotten). */
export const MAX_UNEXPECTED_KINDS = 256;

/** True for an exception that is neither a BlockError nor a system error with a known errno. */
export function isUnexpectedError(thrown: unknown): boolean {
  if (isBlockError(thrown)) return false;
  return !(thrown instanceof Error && isErrnoCode((thrown as NodeJS.ErrnoException).code));
}

interface KindState {
  at: number;
  suppressed: number;
}

export class RequestErrorLog {
  readonly #kinds = new Map<string, KindState>();
  readonly #now: () => number;

  constructor(now: () => number = Date.now) {
    this.#now = now;
  }

  /**
   * Logs the failure of one request: `thrown` is what the device threw, `error` what the
   * client is told, `fields` the request in view (command, export, ...).
   */
  log(log: Logger, thrown: unknown, error: BlockError, fields: Record<string, unknown>): void {
    const line = { ...fields, code: error.code, reason: error.message };
    if (isUnexpectedError(thrown)) {
      const kind = thrown instanceof Error ? `${thrown.name}: ${thrown.message}` : typeof thrown;
      const now = this.#now();
      const seen = this.#kinds.get(kind);
      if (seen && now - seen.at < UNEXPECTED_LOG_INTERVAL_MS) {
        seen.suppressed++;
        return;
      }
      if (!seen && this.#kinds.size >= MAX_UNEXPECTED_KINDS) this.#kinds.delete(this.#kinds.keys().next().value!);
      const suppressed = seen?.suppressed ?? 0;
      this.#kinds.set(kind, { at: now, suppressed: 0 });
      log.error({ ...line, err: thrown, ...(suppressed > 0 ? { suppressed } : {}) }, 'unexpected exception in a request (a bug); the client got EIO');
      return;
    }
    if (error.injected) log.info(line, 'injected failure');
    else log.debug(line, 'request failed');
  }
}
