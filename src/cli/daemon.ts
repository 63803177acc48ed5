/**
 * What the long-running commands (`serve`, `ggated`) share: the logger, the wait for
 * the signal (or the parent's exit) that stops them gracefully, the pid file and the
 * readiness notification. docs/SERVICE.md describes them for users.
 */
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import pino, { type DestinationStream, type Logger } from 'pino';
import { sdNotify } from '../io/sd-notify.js';

/** How log lines look: `pretty` (one readable line each), `json` (pino's), or `auto`: pretty on a terminal, else JSON. */
export const LOG_FORMATS = ['auto', 'json', 'pretty'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

export interface LoggerOptions {
  readonly level: string;
  /** Default 'auto'. */
  readonly format?: LogFormat;
  /** Append to this file instead of writing to stderr. */
  readonly file?: string | undefined;
}

/** The fields pretty lines leave out: the same on every line of a process. */
const PRETTY_IGNORE = 'pid,hostname';

/**
 * A pino logger that writes synchronously (so nothing is lost when the process exits
 * right after logging), to stderr or a file, with the pid on every JSON line. Pretty
 * lines come from pino-pretty in the same thread (pino's worker transports write
 * asynchronously and could drop the last lines at exit); it is loaded only when used.
 */
export function createLogger(opts: LoggerOptions): Logger {
  const toFile = opts.file !== undefined;
  const format = opts.format ?? 'auto';
  const pretty = format === 'pretty' || (format === 'auto' && !toFile && process.stderr.isTTY === true);
  let dest: DestinationStream;
  if (pretty) {
    const prettyStream = createRequire(import.meta.url)('pino-pretty') as (o: Record<string, unknown>) => DestinationStream;
    dest = prettyStream({
      destination: toFile ? path.resolve(opts.file!) : 2,
      sync: true,
      append: true,
      colorize: !toFile && process.stderr.isTTY === true,
      translateTime: 'SYS:HH:MM:ss.l',
      // One line per event, as a terminal reader (and grep) expects.
      singleLine: true,
      ignore: PRETTY_IGNORE,
    });
  } else {
    dest = pino.destination({ dest: toFile ? path.resolve(opts.file!) : 2, sync: true, append: true, mkdir: toFile });
  }
  return pino({ level: opts.level, base: { pid: process.pid } }, dest);
}

/** The signals that stop a long-running command gracefully unless it asks for others. */
export const SHUTDOWN_SIGNALS: readonly NodeJS.Signals[] = ['SIGINT', 'SIGTERM'];

/**
 * How often --exit-with-parent looks at the parent process id. Node offers no
 * prctl(PR_SET_PDEATHSIG) (and that signal follows the parent *thread*, which a
 * multi-threaded parent such as a Node or Go program may end at any time), so the
 * server polls getppid(2), which changes to a reaper's pid when the parent dies.
 */
export const PARENT_POLL_MS = 250;

export interface StopOptions {
  /** Signals that stop; default {@link SHUTDOWN_SIGNALS}. */
  readonly signals?: readonly NodeJS.Signals[];
  /** Also stop when the parent process exits (--exit-with-parent). */
  readonly exitWithParent?: boolean;
}

/**
 * Resolves at the first of `signals`, logged as 'shutting down', or when the parent
 * exits with `exitWithParent`; all the handlers are removed then. Installing a handler is
 * also what keeps a signal such as SIGHUP from killing the process outright (Node's
 * default for it).
 */
export function shutdownSignal(log: Logger, signals: readonly NodeJS.Signals[] | StopOptions = SHUTDOWN_SIGNALS): Promise<void> {
  const o: StopOptions = Array.isArray(signals) ? { signals: signals as readonly NodeJS.Signals[] } : (signals as StopOptions);
  const sigs = o.signals ?? SHUTDOWN_SIGNALS;
  return new Promise<void>((resolve) => {
    let timer: NodeJS.Timeout | undefined;
    const done = (): void => {
      for (const s of sigs) process.off(s, onSignal);
      if (timer) clearInterval(timer);
      resolve();
    };
    const onSignal = (sig: NodeJS.Signals): void => {
      log.info({ signal: sig }, 'shutting down');
      done();
    };
    for (const s of sigs) process.on(s, onSignal);
    if (o.exitWithParent) {
      const parent = process.ppid;
      const check = (): void => {
        if (process.ppid === parent) return;
        log.info({ parent }, 'parent process exited, shutting down');
        done();
      };
      // Not unref'd: with this option the process lives until the parent goes.
      timer = setInterval(check, PARENT_POLL_MS);
      // A parent that died between our start and now: the pid is already a reaper's (1 or a subreaper).
      if (parent === 1) check();
    }
  });
}

/**
 * Writes the process id to `file` (through a temporary file and a rename, so that a
 * reader never sees it half-written) and returns a function that removes it. Called
 * only once every listener is bound: a pid file means "ready for clients".
 */
export function writePidFile(file: string): () => void {
  const abs = path.resolve(file);
  const tmp = `${abs}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, `${process.pid}\n`);
  fs.renameSync(tmp, abs);
  return () => fs.rmSync(abs, { force: true });
}

/**
 * Says the service is ready: to the service manager if NOTIFY_SOCKET is set
 * (`READY=1`, with MAINPID; the variable is then removed so that children do not
 * notify in our name), and always as a 'ready' log line with `details`. A notification
 * that cannot be sent is logged as a warning; serving goes on.
 */
export function notifyReady(log: Logger, details: Record<string, unknown>): void {
  const socket = process.env.NOTIFY_SOCKET;
  if (socket !== undefined && socket !== '') {
    delete process.env.NOTIFY_SOCKET;
    try {
      sdNotify(socket, `READY=1\nMAINPID=${process.pid}\n`);
    } catch (err) {
      log.warn({ err, notifySocket: socket }, 'could not notify the service manager');
    }
  }
  log.info(details, 'ready');
}
