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

/** Resolves at the first SIGINT or SIGTERM, logged as 'shutting down'; both handlers are removed then. */
export function shutdownSignal(log: Logger): Promise<void> {
  return new Promise<void>((resolve) => {
    const onSignal = (sig: NodeJS.Signals): void => {
      log.info({ signal: sig }, 'shutting down');
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      resolve();
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
}
