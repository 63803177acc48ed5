/**
 * What the long-running commands (`serve`, `ggated`) share: a logger on stderr and the
 * wait for the signal that stops them gracefully.
 */
import pino, { type Logger } from 'pino';

/**
 * A pino logger writing synchronously to stderr (so that nothing is lost when the
 * process exits right after logging) with the pid on every line.
 */
export function stderrLogger(level: string): Logger {
  return pino({ level, base: { pid: process.pid } }, pino.destination({ dest: 2, sync: true }));
}

/** The signals that stop a long-running command gracefully unless it asks for others. */
export const SHUTDOWN_SIGNALS: readonly NodeJS.Signals[] = ['SIGINT', 'SIGTERM'];

/**
 * Resolves at the first of `signals` (default SIGINT, SIGTERM), logged as 'shutting
 * down'; all the handlers are removed then. Installing a handler is also what keeps a
 * signal such as SIGHUP from killing the process outright (Node's default for it).
 */
export function shutdownSignal(log: Logger, signals: readonly NodeJS.Signals[] = SHUTDOWN_SIGNALS): Promise<void> {
  return new Promise<void>((resolve) => {
    const onSignal = (sig: NodeJS.Signals): void => {
      log.info({ signal: sig }, 'shutting down');
      for (const s of signals) process.off(s, onSignal);
      resolve();
    };
    for (const s of signals) process.on(s, onSignal);
  });
}
