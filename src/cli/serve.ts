/**
 * `blockgate serve`: builds the exports from the command line or a config file, serves
 * them over NBD, and shuts down gracefully on SIGINT, SIGTERM and SIGHUP (SIGHUP: a
 * closed terminal or a service manager's stop must not lose what write-back caches
 * hold, and reloading the config in place would have to rebuild stacks under live
 * sessions, so SIGHUP does what SIGTERM does; docs/CONFIG.md). `--run` is nbdkit's
 * captive mode: serve on a private unix socket, run a command with `$uri` set, and exit
 * with the command's status.
 *
 * The control socket (`--control PATH`; default `$XDG_RUNTIME_DIR/blockgate/ctl.sock` or
 * `/tmp/blockgate-<uid>/ctl.sock`, mode 0600 in a 0700 directory) carries the gate calls
 * of handlers such as `blockgate ggatel` and `blockgate status`; each gate is exported
 * over NBD as `ggate<unit>` while it exists. At the default path a socket already in use
 * only costs a warning; an explicit --control must work. `--no-control` turns it off,
 * and captive --run mode has none unless --control is given.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Command, Option } from 'commander';
import { LOG_FORMATS, SHUTDOWN_SIGNALS, createLogger, notifyReady, shutdownSignal, writePidFile, type LogFormat } from './daemon.js';
import { takeActivatedSockets, type ActivatedSocket } from '../io/socket-activation.js';
import { missingV8Flags } from './v8-flags.js';
import { createStack } from '../export/registry.js';
import { serveRegistry, serveRegistryLogging } from './registry.js';
import { NbdServer, type ListenAddress, type ListenTarget, type ListenerOptions } from '../nbd/index.js';
import { loadTls, TLS_MODES, type TlsMode } from '../nbd/tls.js';
import type { ExportPolicySpec } from '../nbd/access.js';
import { Export } from '../export/index.js';
import { BlockError } from '../errors/index.js';
import { StackLayerError, newStackContext, type LayerDescription, type StackRegistry } from '../device/index.js';
import {
  DEFAULT_EXPORT_SPEC,
  DEFAULT_HOST,
  DEFAULT_PORT,
  LOG_LEVELS,
  parseConfig,
  parsePort,
  parseExportSpecs,
  type ServeConfig,
} from './config.js';
import { collectFilter, effectiveConfig } from './filter-option.js';
import { Observability, parseHttpOption } from './observability.js';
import { formatHttpAddress, parseHttpAddress, type HttpAddress } from '../http/address.js';

/** The signals that stop `serve` gracefully: SIGHUP too, which would otherwise kill it (exit 129). */
const SERVE_STOP_SIGNALS: readonly NodeJS.Signals[] = [...SHUTDOWN_SIGNALS, 'SIGHUP'];

/** The flags whose settings a config file holds (as ServeFlags keys); refused with --config. */
const CONFIG_CONFLICTS = [
  'address',
  'port',
  'unix',
  'readOnly',
  'defaultExport',
  'description',
  'tls',
  'tlsCertificates',
  'tlsPsk',
  'tlsVerifyPeer',
  'allow',
  'deny',
  'filter',
] satisfies (keyof ServeFlags)[];

interface ServeFlags {
  config?: string;
  /** Absent when no -a was given (the default host is then used). */
  address?: string[];
  port: number;
  unix?: string;
  readOnly?: boolean;
  defaultExport?: string;
  description?: string;
  printUri?: boolean;
  run?: string;
  logLevel: string;
  /** A path (--control), false (--no-control) or undefined (the default path). */
  control?: string | false;
  tls?: TlsMode;
  tlsCertificates?: string;
  tlsPsk?: string;
  tlsVerifyPeer?: boolean;
  allow?: string[];
  deny?: string[];
  /** `--filter` layers, the first nearest the client (src/cli/filter-option.ts). */
  filter?: LayerDescription[];
  dumpConfig?: boolean;
  pidfile?: string;
  exitWithParent?: boolean;
  verbose?: boolean;
  /** Accepted for nbdkit habits: serve never forks into the background. */
  foreground?: boolean;
  logFormat?: LogFormat;
  logFile?: string;
  /** `--http [HOST:]PORT` (docs/OBSERVABILITY.md). */
  http?: HttpAddress;
  /** false with --no-metrics. */
  metrics?: boolean;
}

/** Which of the listen flags the user typed (commander's option sources), not their defaults. */
interface GivenFlags {
  readonly port: boolean;
  readonly logLevel: boolean;
}

/** Collects a repeatable option's values. */
const collect = (v: string, prev: string[] | undefined): string[] => [...(prev ?? []), v];

/** What a URI says about TLS: the mode, and for a PSK listener the key file and (if only one) its identity. */
export interface UriTls {
  readonly mode: TlsMode;
  readonly pskFile?: string | undefined;
  readonly pskIdentity?: string | undefined;
}

/**
 * An NBD URI for an address and export name (doc/uri.md). On a listener that requires
 * TLS it is `nbds`; with a PSK file it names the file (`tls-psk-file`, an absolute path)
 * and the identity when the file has only one, so that the printed URI works as is.
 */
export function nbdUri(addr: ListenAddress, exportName: string, tls: UriTls = { mode: 'off' }): string {
  const name = encodeURIComponent(exportName).replace(/%2F/g, '/');
  const secure = tls.mode === 'require';
  const scheme = secure ? 'nbds' : 'nbd';
  const user = secure && tls.pskIdentity !== undefined ? `${encodeURIComponent(tls.pskIdentity)}@` : '';
  const query: string[] = [];
  if ('path' in addr) query.push(`socket=${encodeURIComponent(addr.path)}`);
  if (secure && tls.pskFile !== undefined) query.push(`tls-psk-file=${encodeURIComponent(path.resolve(tls.pskFile))}`);
  const q = query.length > 0 ? `?${query.join('&')}` : '';
  if ('path' in addr) return `${scheme}+unix://${user}/${name}${q}`;
  const host = addr.host.includes(':') ? `[${addr.host}]` : addr.host;
  return `${scheme}://${user}${host}:${addr.port}/${name}${q}`;
}

/**
 * Turns command-line flags into a config (the same shape `--config` files have). With
 * `config` set, the listen and export flags must be absent (the command refuses them,
 * CONFIG_CONFLICTS).
 */
/**
 * The configuration the flags (or the --config file they name) describe. `levelGiven`
 * false: -l was left at its default, so the configuration carries a level only if the
 * file sets one (a --run command then logs only warnings).
 */
export function configFromFlags(specs: string[], flags: ServeFlags, levelGiven = true): ServeConfig {
  const flagLevel = levelGiven ? { logLevel: flags.logLevel } : {};
  if (flags.config) {
    if (specs.length > 0) throw new BlockError('EINVAL', 'give exports either on the command line or in --config, not both');
    let raw: unknown;
    try {
      raw = JSON.parse(fs.readFileSync(flags.config, 'utf8'));
    } catch (e) {
      throw new BlockError('EINVAL', `${flags.config}: ${(e as Error).message}`, { cause: e });
    }
    const cfg = resolvePluginPaths(parseConfig(raw, flags.config), path.dirname(path.resolve(flags.config)));
    return cfg.logLevel !== undefined || !levelGiven ? cfg : { ...cfg, logLevel: flags.logLevel as ServeConfig['logLevel'] };
  }
  const filters = flags.filter ?? [];
  const exports = parseExportSpecs(specs.length > 0 ? specs : [DEFAULT_EXPORT_SPEC], flags.readOnly).map((e) =>
    filters.length > 0 ? { ...e, filters: [...filters] } : e,
  );
  if (flags.description && exports[0]) exports[0] = { ...exports[0], description: flags.description };
  const port = flags.port;
  const security = {
    ...(flags.tls !== undefined ? { tls: flags.tls } : {}),
    ...(flags.tlsCertificates !== undefined ? { tlsCertificates: flags.tlsCertificates } : {}),
    ...(flags.tlsPsk !== undefined ? { tlsPsk: flags.tlsPsk } : {}),
    ...(flags.tlsVerifyPeer ? { tlsVerifyPeer: true } : {}),
    ...(flags.allow ? { allow: flags.allow } : {}),
    ...(flags.deny ? { deny: flags.deny } : {}),
  };
  const listen: NonNullable<ServeConfig['listen']> = [];
  if (flags.unix) listen.push({ path: flags.unix, ...security });
  else for (const host of flags.address ?? [DEFAULT_HOST]) listen.push({ host, port, ...security });
  return parseConfig(
    { exports, listen, ...flagLevel, ...(flags.defaultExport !== undefined ? { defaultExport: flags.defaultExport } : {}) },
    'command line',
  );
}

/** A plugin layer's relative `path` made absolute against `dir` (a config file's directory). */
function resolvePluginLayer(layer: LayerDescription, dir: string): LayerDescription {
  return layer.type === 'plugin' && typeof layer.path === 'string' ? { ...layer, path: path.resolve(dir, layer.path) } : layer;
}

/** Every plugin path of a config file, relative to the file's directory, made absolute. */
function resolvePluginPaths(cfg: ServeConfig, dir: string): ServeConfig {
  return {
    ...cfg,
    exports: cfg.exports.map((e) => ({
      ...e,
      backend: resolvePluginLayer(e.backend, dir) as typeof e.backend,
      ...(e.filters ? { filters: e.filters.map((f) => resolvePluginLayer(f, dir) as typeof f) } : {}),
    })),
  };
}

/** What buildExports needs of an export (a config file's entry, or a test's). */
export interface ExportSpec {
  readonly name: string;
  readonly description?: string | undefined;
  readonly readOnly?: boolean | undefined;
  readonly backend: LayerDescription;
  readonly filters?: readonly LayerDescription[] | undefined;
}

/**
 * Builds every export's device stack; on failure closes what was built. A layer's error
 * names where it is: `source: exports[0].filters[1]: writeback: maxDirty: ...`. Stacks
 * are built with `registry`: by default the built-ins plus the `nbd` backend
 * (src/cli/registry.ts).
 */
export async function buildExports(
  cfg: { readonly exports: readonly ExportSpec[] },
  source = 'config',
  registry: StackRegistry = serveRegistry,
): Promise<Export[]> {
  const built: Export[] = [];
  try {
    for (const [i, e] of cfg.exports.entries()) {
      // A read-only export never writes: backends may open without writer-only resources.
      const ctx = e.readOnly ? { ...newStackContext(), readOnly: true } : newStackContext();
      let device;
      try {
        device = await createStack({ backend: e.backend, filters: e.filters ?? [] }, ctx, registry);
      } catch (err) {
        if (!(err instanceof StackLayerError)) throw err;
        throw new BlockError(err.code, `${source}: exports[${i}].${err.layer}: ${err.message}`, { cause: err });
      }
      built.push(
        new Export({
          name: e.name,
          device,
          errseq: ctx.errseq,
          readOnly: e.readOnly ?? false,
          ...(e.description !== undefined ? { description: e.description } : {}),
        }),
      );
    }
  } catch (e) {
    await Promise.all(built.map((x) => x.device.close().catch(() => undefined)));
    throw e;
  }
  return built;
}

type ListenerConfig = NonNullable<ServeConfig['listen']>[number];

function listenAddress(l: ListenerConfig): ListenAddress {
  return 'path' in l ? { path: l.path } : { host: l.host, port: l.port };
}

/**
 * A listener's TLS credentials and rules. Credentials without a `tls` mode mean
 * 'require' (as qemu-nbd's --tls-creds): giving a key and still serving in clear
 * to whoever asks would be the surprising choice; `on` says so explicitly.
 */
function listenerOptions(l: ListenerConfig): ListenerOptions {
  const hasCreds = l.tlsCertificates !== undefined || l.tlsPsk !== undefined;
  const mode: TlsMode = l.tls ?? (hasCreds ? 'require' : 'off');
  const tls = loadTls({ mode, certificates: l.tlsCertificates, psk: l.tlsPsk, verifyPeer: l.tlsVerifyPeer });
  return { tls, ...(l.allow || l.deny ? { rules: { ...(l.allow ? { allow: l.allow } : {}), ...(l.deny ? { deny: l.deny } : {}) } } : {}) };
}

/** The values a --run command finds in its environment, as nbdkit-captive(1) names them. */
export function captiveEnv(addr: ListenAddress, exportName: string, tls: UriTls): Record<string, string> {
  const uri = nbdUri(addr, exportName, tls);
  return {
    uri,
    // nbdkit >= 1.24 gives both names the same URI.
    nbd: uri,
    exportname: exportName,
    port: 'port' in addr ? String(addr.port) : '',
    unixsocket: 'path' in addr ? addr.path : '',
    // nbdkit: unset with --tls=off, "1" with on, "2" with require.
    ...(tls.mode === 'on' ? { tls: '1' } : tls.mode === 'require' ? { tls: '2' } : {}),
  };
}

/** Refuses what cannot go with socket activation: the sockets are given, so nothing may say where to listen. */
function checkActivation(activated: readonly ActivatedSocket[] | null, flags: ServeFlags, given: GivenFlags, cfg: ServeConfig): void {
  if (activated === null) return;
  const clash = [
    flags.address ? '-a/--address' : null,
    given.port ? '-p/--port' : null,
    flags.unix ? '-U/--unix' : null,
    flags.run !== undefined ? '--run' : null,
    flags.config && cfg.listen && cfg.listen.length > 0 ? "the config file's listen" : null,
  ].filter((x) => x !== null);
  if (clash.length > 0) {
    throw new BlockError('EINVAL', `socket activation (LISTEN_FDS) gives the listening sockets; do not combine it with ${clash.join(', ')}`);
  }
}

async function serve(specs: string[], flags: ServeFlags, given: GivenFlags): Promise<number> {
  if (flags.run && (flags.address?.length ?? 0) > 1) {
    throw new BlockError('EINVAL', '--run gives the command one URI; give at most one --address with it');
  }
  if (flags.run && flags.unix && (flags.address || given.port)) {
    throw new BlockError('EINVAL', '--run serves on --unix or on TCP (--address/--port), not both');
  }
  const cfg = configFromFlags(specs, flags, given.logLevel);
  if (flags.dumpConfig) {
    const observed = { ...(flags.http ? { http: formatHttpAddress(flags.http) } : {}), ...(flags.metrics === false ? { metrics: false } : {}) };
    process.stdout.write(`${JSON.stringify({ ...effectiveConfig(cfg, [{ host: DEFAULT_HOST, port: DEFAULT_PORT }]), ...observed }, null, 2)}\n`);
    return 0;
  }
  const activated = takeActivatedSockets();
  checkActivation(activated, flags, given, cfg);
  // A captive command's output is the user's: only problems are logged, unless asked.
  const level = flags.verbose ? 'debug' : (cfg.logLevel ?? (flags.run ? 'warn' : flags.logLevel));
  const log = createLogger({ level, format: flags.logFormat, file: flags.logFile });
  const exports = await buildExports(cfg, flags.config ?? 'command line', serveRegistryLogging(log));
  exports.forEach((e, i) => {
    // A file that could only be opened read-only (0444, a read-only mount) is served so, as nbdkit does, but said aloud.
    if (e.readOnly && cfg.exports[i]?.readOnly !== true) log.warn({ export: e.name, device: e.device.description }, 'serving read-only: the device cannot be written');
  });
  const access: Record<string, ExportPolicySpec> = {};
  for (const e of cfg.exports) {
    if (e.tls || e.allow || e.deny || e.pskIdentities || e.subjects) access[e.name] = e;
  }
  const obs = new Observability({
    metrics: flags.metrics !== false && cfg.metrics !== false,
    http: flags.http ?? (cfg.http !== undefined ? parseHttpAddress(cfg.http) : undefined),
    logger: log,
  });
  const server = new NbdServer({ exports, logger: log, access, ...(obs.sink ? { metrics: obs.sink } : {}), ...(cfg.defaultExport !== undefined ? { defaultExport: cfg.defaultExport } : {}) });
  const defaultName = cfg.defaultExport ?? exports[0]!.name;

  // Before listening, so that a bad --control leaves nothing running.
  const ctl =
    flags.control === false || (flags.run !== undefined && flags.control === undefined)
      ? undefined
      : // Loaded only when a control socket is opened: the gate kernel and the control
        // protocol are a tenth of serve's modules, of no use to a captive --run.
        await (await import('../gate/control/server.js')).startControlServer({
          nbd: server,
          ...(typeof flags.control === 'string' ? { path: flags.control } : {}),
          required: typeof flags.control === 'string',
          logger: log,
          ...(obs.live ? { live: obs.live } : {}),
        });

  let tmpDir: string | null = null;
  const configured: ListenerConfig[] = cfg.listen && cfg.listen.length > 0 ? cfg.listen : [{ host: DEFAULT_HOST, port: DEFAULT_PORT }];
  const listen: { target: ListenTarget; config: ListenerConfig; name?: string }[] = [];
  if (activated) {
    // The passed sockets keep the TLS and address settings the flags gave.
    for (const a of activated) listen.push({ target: { fd: a.fd }, config: configured[0]!, name: a.name });
  } else if (flags.run && !flags.unix && !flags.address && !given.port) {
    // Captive with no address given: a private socket nobody else can reach, as nbdkit -U -.
    tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-'));
    const { host: _h, port: _p, ...security } = configured[0] as ListenerConfig & { host?: string; port?: number };
    const l = { ...security, path: path.join(tmpDir, 'nbd.sock') };
    listen.push({ target: listenAddress(l), config: l });
  } else {
    for (const l of configured) listen.push({ target: listenAddress(l), config: l });
  }
  const bound: { addr: ListenAddress; tls: UriTls }[] = [];
  for (const { target, config: l, name } of listen) {
    const opts = listenerOptions(l);
    const keys = opts.tls?.pskKeys;
    const uriTls: UriTls = {
      mode: opts.tls?.mode ?? 'off',
      pskFile: l.tlsPsk,
      pskIdentity: keys && keys.size === 1 ? [...keys.keys()][0] : undefined,
    };
    const addr = await server.listen(target, opts);
    bound.push({ addr, tls: uriTls });
    log.info({ uri: nbdUri(addr, defaultName, uriTls), tls: uriTls.mode, exports: exports.map((e) => e.name), ...('fd' in target ? { fd: target.fd, fdName: name } : {}) }, 'listening');
  }
  let removePidFile: (() => void) | undefined;
  const stop = async (): Promise<void> => {
    await obs.close();
    await server.close();
    await ctl?.close();
    await Promise.all(exports.map((e) => e.device.close().catch((err: unknown) => log.error({ err }, 'close failed'))));
    if (tmpDir) fs.rmSync(tmpDir, { recursive: true, force: true });
    removePidFile?.();
  };
  await obs.start({ server, control: ctl }).catch(async (e: unknown) => {
    // A busy --http port: nothing may keep running.
    await stop();
    throw e;
  });
  const missing = missingV8Flags();
  if (missing.length > 0) {
    log.info({ missing }, 'started without the V8 flags of the blockgate command: sequential writes are slower (docs/PERFORMANCE.md)');
  }
  // Installed before the URI is printed, so whoever waits for the URI can signal at once.
  const stopSignal = flags.run ? undefined : shutdownSignal(log, { signals: SERVE_STOP_SIGNALS, exitWithParent: flags.exitWithParent === true });
  if (flags.pidfile) removePidFile = writePidFile(flags.pidfile);
  if (flags.printUri) process.stdout.write(`${nbdUri(bound[0]!.addr, defaultName, bound[0]!.tls)}\n`);
  if (!flags.run) notifyReady(log, { uris: bound.map((b) => nbdUri(b.addr, defaultName, b.tls)) });


  if (flags.run) {
    const env = { ...process.env, ...captiveEnv(bound[0]!.addr, defaultName, bound[0]!.tls) };
    const child = spawn('/bin/sh', ['-c', flags.run], { stdio: 'inherit', env });
    const forward = (sig: NodeJS.Signals) => child.kill(sig);
    // The command decides what a signal means to it; serve stops when it exits.
    for (const sig of SERVE_STOP_SIGNALS) process.on(sig, forward);
    const status = await new Promise<number>((resolve) => {
      child.on('error', (err) => {
        log.error({ err }, '--run: cannot start the command');
        resolve(127);
      });
      // As nbdkit: the command's status, or 128 + the signal that killed it (said on stderr).
      child.on('exit', (code, signal) => {
        if (signal) log.warn({ signal }, '--run: the command was killed by a signal');
        resolve(code ?? (signal ? 128 + (os.constants.signals[signal] ?? 0) : 1));
      });
    });
    await stop();
    return status;
  }

  await stopSignal;
  await stop();
  return 0;
}

export function serveCommand(): Command {
  return new Command('serve')
    .description('serve block devices over NBD (default: a 1 GiB memory disk on 127.0.0.1:10809)')
    .argument(
      '[export...]',
      'exports: PATH (a file), TYPE:ARG (memory:SIZE, null:SIZE, pattern:SIZE, file:PATH, rbd:POOL/IMAGE, nbd:URI, plugin:PATH), s3://BUCKET/PREFIX[?endpoint=URL&size=SIZE] (docs/S3.md), an NBD URI (nbd://HOST:PORT/NAME, nbd+unix:///NAME?socket=PATH) to re-export, a plugin module ./mydisk.js [key=value ...] (docs/PLUGINS.md), NAME=... to name one',
    )
    .addOption(
      // The file says where to listen and what to serve; rather than guess which of the
      // two wins, commander refuses these flags next to --config with a one-line error.
      new Option('-c, --config <file>', 'JSON configuration file (exports, filters, listeners); see docs/CONFIG.md').conflicts(
        CONFIG_CONFLICTS,
      ),
    )
    .option('-a, --address <host>', `listen on this address (repeatable; IPv6 allowed; default: ${DEFAULT_HOST})`, collect)
    .option('-p, --port <port>', 'TCP port', parsePort, DEFAULT_PORT)
    .option('-U, --unix <path>', 'listen on a unix socket instead of TCP')
    .option('-r, --read-only', 'serve the exports read-only')
    .option('-e, --default-export <name>', "export given to clients that ask for ''")
    .option('-D, --description <text>', 'description of the first export')
    .option('--print-uri', 'print the NBD URI of the default export once listening')
    .addOption(new Option('--tls <mode>', 'TLS: off, on (the client chooses) or require (default: require when credentials are given, else off; docs/SECURITY.md)').choices(TLS_MODES))
    .option('--tls-certificates <dir>', 'X.509 credentials: DIR/server-cert.pem, DIR/server-key.pem, and DIR/ca-cert.pem for --tls-verify-peer')
    .option('--tls-psk <file>', 'pre-shared keys: identity:hexkey lines, as GnuTLS psktool writes them')
    .option('--tls-verify-peer', 'require a client certificate signed by DIR/ca-cert.pem')
    .option('--allow <rule>', 'admit only clients matching: an address, CIDR range (v4 or v6) or uid:N for unix sockets (repeatable)', collect)
    .option('--deny <rule>', 'refuse clients matching an address, CIDR range or uid:N (repeatable; wins over --allow)', collect)
    .option(
      '--filter <name[:key=value,...]>',
      'put a filter over every export: a built-in (readonly, error:ops=read+write, writeback:maxDirty=64M, ...) or a plugin module ./myfilter.js[:key=value,...]; repeatable, the first nearest the client (as nbdkit); see blockgate plugins',
      collectFilter,
    )
    .option('--dump-config', 'print the effective configuration (listeners, exports with backend and filters) as --config JSON and exit')
    .option(
      '--run <command>',
      'captive mode (as nbdkit --run): run COMMAND with $uri, $nbd, $exportname, $port, $unixsocket and $tls set, serving on a private unix socket unless -U, -a or -p is given; exit with its status; logs only warnings unless -l or -v',
    )
    .option('--control <path>', 'control socket for gate handlers (blockgate ggatel) and blockgate status (default: $XDG_RUNTIME_DIR/blockgate/ctl.sock, else /tmp/blockgate-<uid>/ctl.sock; mode 0600)')
    .option('--no-control', 'open no control socket')
    .option('-P, --pidfile <file>', 'write the process id to FILE once listening (removed at exit)')
    .option('--exit-with-parent', 'shut down gracefully when the parent process exits (polled; docs/SERVICE.md)')
    .option('-f, --foreground', 'accepted for nbdkit habits: blockgate serve always stays in the foreground')
    .option('-v, --verbose', 'debug logging (same as --log-level debug)')
    .addOption(new Option('-l, --log-level <level>', 'log level').choices(LOG_LEVELS).default('info'))
    .addOption(new Option('--log-format <format>', 'log lines: pretty (readable), json, or auto (pretty on a terminal, else json)').choices(LOG_FORMATS).default('auto'))
    .option('--log-file <file>', 'append the log to FILE instead of stderr')
    .option('--http <[host:]port>', 'HTTP listener for /metrics (Prometheus), /healthz, /readyz, /api/status and the live status page at / (host default: 127.0.0.1; docs/OBSERVABILITY.md)', parseHttpOption)
    .option('--no-metrics', 'count nothing (no live figures in blockgate status, no --http); for the last per cent of speed')
    .action(async (specs: string[], flags: ServeFlags, cmd: Command) => {
      try {
        const given: GivenFlags = { port: cmd.getOptionValueSource('port') === 'cli', logLevel: cmd.getOptionValueSource('logLevel') === 'cli' };
        process.exitCode = await serve(specs, flags, given);
      } catch (e) {
        process.stderr.write(`blockgate serve: ${(e as Error).message}\n`);
        process.exitCode = 1;
      }
    });
}
