/**
 * `blockgate ggated`: the GEOM Gate network server, with FreeBSD ggated's options:
 *
 *   blockgate ggated [-nv] [-a address] [-p port] [-R rcvbuf] [-S sndbuf] [-c config.json] [exports-file]
 *
 * - the exports file (default /etc/gg.exports) is read at start (a bad file is fatal,
 *   as in ggated) and re-read on SIGHUP (a bad file is logged and the old exports stay);
 * - `-a` binds an IPv4 address or host name (default 0.0.0.0, INADDR_ANY, like ggated:
 *   every interface; restrict it with -a and the exports file);
 * - `-R` / `-S` are accepted and checked for compatibility, but Node.js cannot set
 *   SO_RCVBUF / SO_SNDBUF on TCP sockets: the kernel's defaults (and autotuning) apply;
 * - `-n` keeps Nagle's algorithm (no TCP_NODELAY);
 * - `-v` logs at debug level. blockgate never daemonizes (run it under a service
 *   manager), so ggated's other meaning of -v, "stay in the foreground", always holds;
 * - `-c FILE` maps ggate paths to blockgate stacks (JSON: `{ "/dev/x": { "backend":
 *   {...}, "filters": [...] } }`); any other exported path is opened as a file;
 * - `-F FILE` writes the process id there (ggated writes /var/run/ggated.pid by
 *   default; blockgate only when asked) once it listens, and removes it on exit;
 * - `--exit-with-parent`, `--log-format`, `-f` and the readiness notification
 *   (NOTIFY_SOCKET, and a 'ready' log line) are serve's (docs/SERVICE.md).
 *
 * SIGINT and SIGTERM stop the server gracefully.
 */
import fs from 'node:fs';
import net from 'node:net';
import { Command, Option } from 'commander';
import { LOG_FORMATS, createLogger, notifyReady, shutdownSignal, writePidFile, type LogFormat } from './daemon.js';
import * as v from 'valibot';
import { BlockError } from '../errors/index.js';
import { parseOrThrow, parseSize, type StackDescription } from '../device/index.js';
import { GGATE, GGATED_EXPORTS, MAX_REQUEST_LENGTH } from '../ggate/index.js';
import { GgatedServer, loadExportsFile, lookupIPv4 } from '../ggate/ggated.js';

interface GgatedFlags {
  address: string;
  port: string;
  rcvbuf: string;
  sndbuf: string;
  nagle?: boolean;
  verbose?: boolean;
  config?: string;
  pidfile?: string;
  exitWithParent?: boolean;
  foreground?: boolean;
  logFormat?: LogFormat;
  maxRequest: string;
}

const Layer = v.looseObject({ type: v.pipe(v.string(), v.minLength(1)) });
const StackSchema = v.strictObject({ backend: Layer, filters: v.optional(v.array(Layer)) });
/** The `--config` file: ggate path -> stack description. */
export const GgatedConfigSchema = v.record(v.pipe(v.string(), v.minLength(1)), StackSchema);

/** Reads and validates a `--config` file; the error names the bad key. */
export function loadGgatedConfig(file: string): Record<string, StackDescription> {
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new BlockError('EINVAL', `${file}: ${(e as Error).message}`, { cause: e });
  }
  return parseOrThrow(GgatedConfigSchema, raw, file);
}

/** An integer option in [min, max] (ggated uses strtoul; here junk is an error, not 0). */
function integerOption(name: string, text: string, min: number, max: number): number {
  if (!/^[0-9]+$/.test(text) || Number(text) < min || Number(text) > max) {
    throw new BlockError('EINVAL', `invalid ${name} '${text}' (expected an integer from ${min} to ${max})`);
  }
  return Number(text);
}

/** The IPv4 address to bind: a literal, or a host name resolved like ggated's g_gate_str2ip. */
async function bindAddress(text: string): Promise<string> {
  if (net.isIPv4(text)) return text;
  if (net.isIPv6(text)) throw new BlockError('EINVAL', `invalid IP/host name to bind to: '${text}' (ggated listens on IPv4 only)`);
  try {
    return await lookupIPv4(text);
  } catch (e) {
    throw new BlockError('EINVAL', `invalid IP/host name to bind to: '${text}': ${(e as Error).message}`, { cause: e });
  }
}

async function ggated(exportsFile: string, flags: GgatedFlags): Promise<number> {
  const port = integerOption('port', flags.port, 0, 65535);
  const rcvbuf = integerOption('rcvbuf', flags.rcvbuf, 1, 2 ** 31 - 1);
  const sndbuf = integerOption('sndbuf', flags.sndbuf, 1, 2 ** 31 - 1);
  const maxRequestLength = parseSize(flags.maxRequest);
  if (maxRequestLength < 512 || maxRequestLength > 2 ** 32 - 1) {
    throw new BlockError('EINVAL', `invalid --max-request '${flags.maxRequest}' (expected 512 bytes to 4 GiB - 1)`);
  }
  const host = await bindAddress(flags.address);
  const stacks = flags.config ? loadGgatedConfig(flags.config) : {};
  const log = createLogger({ level: flags.verbose === true ? 'debug' : 'info', format: flags.logFormat });

  log.info({ file: exportsFile }, 'reading exports file (%s)', exportsFile);
  const exports = await loadExportsFile(exportsFile);
  log.info({ count: exports.length }, 'exporting %d object(s)', exports.length);
  for (const p of Object.keys(stacks)) {
    if (!exports.some((e) => e.path === p)) log.warn({ path: p }, 'configured stack %s is not in the exports file: no client can reach it', p);
  }
  if (rcvbuf !== GGATE.G_GATE_RCVBUF || sndbuf !== GGATE.G_GATE_SNDBUF) {
    log.warn({ rcvbuf, sndbuf }, 'Node.js cannot set SO_RCVBUF/SO_SNDBUF on TCP sockets: -R/-S are ignored');
  }

  const server = new GgatedServer({
    exports,
    exportsFile,
    stacks,
    logger: log,
    noDelay: flags.nagle !== true,
    limits: { maxRequestLength },
  });
  let bound: { host: string; port: number };
  try {
    bound = await server.listen({ host, port });
  } catch (e) {
    await server.close(0);
    throw e;
  }
  // After listening (FreeBSD's ggated writes it before): whoever waits for the pid file
  // may connect at once.
  const removePidFile = flags.pidfile ? writePidFile(flags.pidfile) : undefined;
  notifyReady(log, { host: bound.host, port: bound.port });

  const onHup = (): void => {
    server.reload().then(
      () => log.info('exports reloaded'),
      (err: unknown) => log.error({ err }, 'cannot reload the exports file; the old exports stay in force'),
    );
  };
  process.on('SIGHUP', onHup);
  await shutdownSignal(log, { exitWithParent: flags.exitWithParent === true });
  process.off('SIGHUP', onHup);
  await server.close();
  removePidFile?.();
  return 0;
}

export function ggatedCommand(): Command {
  return new Command('ggated')
    .description('GEOM Gate network server, wire-compatible with FreeBSD ggatec (see docs/GGATE.md)')
    .argument('[exports-file]', 'exports file: "host[/bits] RO|RD|WO|RW path" lines', GGATED_EXPORTS.GGATED_EXPORT_FILE)
    .option('-a, --address <address>', 'IPv4 address or host name to listen on (ggated binds all interfaces)', '0.0.0.0')
    .option('-p, --port <port>', 'TCP port', String(GGATE.G_GATE_PORT))
    .option('-R, --rcvbuf <bytes>', 'socket receive buffer size (accepted for compatibility; not settable from Node.js)', String(GGATE.G_GATE_RCVBUF))
    .option('-S, --sndbuf <bytes>', 'socket send buffer size (accepted for compatibility; not settable from Node.js)', String(GGATE.G_GATE_SNDBUF))
    .option('-n, --nagle', 'do not set TCP_NODELAY')
    .option('-v, --verbose', 'debug logging (the server always stays in the foreground)')
    .option('-c, --config <file>', 'JSON file mapping ggate paths to blockgate stacks')
    .option('-F, --pidfile <file>', 'write the process id to this file once listening (removed on exit)')
    .option('--exit-with-parent', 'shut down gracefully when the parent process exits')
    .option('-f, --foreground', 'accepted for habit: the server always stays in the foreground')
    .addOption(new Option('--log-format <format>', 'log lines: pretty, json, or auto (pretty on a terminal)').choices(LOG_FORMATS).default('auto'))
    .option('--max-request <size>', 'largest request accepted (a FreeBSD peer with a larger kern.maxphys needs more)', String(MAX_REQUEST_LENGTH))
    .action(async (exportsFile: string, flags: GgatedFlags) => {
      try {
        process.exitCode = await ggated(exportsFile, flags);
      } catch (e) {
        process.stderr.write(`blockgate ggated: ${(e as Error).message}\n`);
        process.exitCode = 1;
      }
    });
}
