/**
 * `blockgate ggatec`: a gate whose requests are served by a remote ggated (FreeBSD's
 * own, or `blockgate ggated`) over the GEOM Gate network protocol, with FreeBSD ggatec's
 * commands and flags, through the control socket of a running `blockgate serve`:
 *
 *   blockgate ggatec create [-n] [-v] [-o ro|wo|rw] [-p port] [-q queue_size] [-R rcvbuf]
 *                           [-S sndbuf] [-s sectorsize] [-t timeout] [-u unit] host path
 *   blockgate ggatec rescue [-n] [-v] [-o ro|wo|rw] [-p port] [-R rcvbuf] [-S sndbuf] -u unit host path
 *   blockgate ggatec destroy [-f] -u unit
 *   blockgate ggatec list [-v] [-u unit]
 *
 * Every command takes `--control PATH` (default: the same default path as serve).
 *
 * - create connects to the server first (a failure ends it with status 1), then makes
 *   the gate with the server's media size and sector size (-s overrides the sector
 *   size if it is a multiple of the server's; the media size is then rounded down to
 *   whole sectors), info "host:port path", queue size -q, timeout -t, and serves it.
 *   Like FreeBSD it prints the device name (`ggate<unit>`) when the unit was chosen
 *   automatically. The gate is the NBD export `ggate<unit>` of the server.
 * - rescue takes over a gate whose ggatec died: it connects, CANCELs (seq 0) so every
 *   request the dead handler had taken goes back to the queue in order, and serves.
 * - Lost connections are re-established every 2 s with a fresh token, and requests in
 *   flight are resent in order; the NBD clients only see a delay (src/client/ggatec.ts).
 * - DELETE (NBD trim) is answered EOPNOTSUPP, as FreeBSD's ggatec does: the protocol
 *   has no such command.
 * - Foreground always (FreeBSD daemonizes unless -v); -v logs every request. Connection
 *   losses and reconnections are always logged to stderr.
 * - -R / -S are accepted and checked, but Node.js cannot set SO_RCVBUF / SO_SNDBUF on
 *   TCP sockets: a warning is printed when they differ from FreeBSD's default.
 * - Status 0 when the gate is destroyed (ECANCELED) and after SIGINT/SIGTERM (the
 *   requests already sent are answered for a few seconds, then it exits and the gate
 *   stays for `rescue` or `destroy`); 1 on anything else.
 */
import { Command, Option } from 'commander';
import { BlockError, toBlockError } from '../errors/index.js';
import { formatSize } from '../device/index.js';
import { GATE, GATE_FLAG } from '../gate/index.js';
import { GGATE, GGATE_SIZE, type GgateAccess } from '../ggate/index.js';
import { connectControl, type ControlClient } from '../client/control-client.js';
import { connectGgatec, serveGgatec, type GgatecEvent, type GgatecLink, type GgatecTarget } from '../client/ggatec.js';
import { defaultControlPath } from '../server/control-protocol.js';
import { formatGateVerbose } from './ggatel.js';

interface CommonFlags {
  control?: string;
}
interface ConnectFlags extends CommonFlags {
  verbose: boolean;
  nagle: boolean;
  mode: GgateAccess;
  port: string;
  rcvbuf: string;
  sndbuf: string;
  unit?: string;
}
interface CreateFlags extends ConnectFlags {
  queue: string;
  sectorsize?: string;
  timeout: string;
}

function integer(name: string, text: string, min: number, max: number): number {
  if (!/^[0-9]+$/.test(text) || Number(text) < min || Number(text) > max) {
    throw new BlockError('EINVAL', `invalid ${name} '${text}' (expected an integer from ${min} to ${max})`);
  }
  return Number(text);
}

function unitOf(text: string | undefined): number {
  if (text === undefined) throw new BlockError('EINVAL', 'a unit is required (-u unit)');
  return integer('unit', text, 0, 0x7fff_ffff);
}

function gateFlags(mode: GgateAccess): number {
  return mode === 'ro' ? GATE_FLAG.READONLY : mode === 'wo' ? GATE_FLAG.WRITEONLY : 0;
}

function say(text: string): void {
  process.stderr.write(`ggatec: ${text}\n`);
}

/** The target and the checks of the flags every connecting command shares. */
function targetOf(host: string, path: string, flags: ConnectFlags): GgatecTarget {
  const port = integer('port', flags.port, 1, 65535);
  const rcvbuf = integer('rcvbuf', flags.rcvbuf, 1, 2 ** 31 - 1);
  const sndbuf = integer('sndbuf', flags.sndbuf, 1, 2 ** 31 - 1);
  if (rcvbuf !== GGATE.G_GATE_RCVBUF || sndbuf !== GGATE.G_GATE_SNDBUF) {
    say('Node.js cannot set SO_RCVBUF/SO_SNDBUF on TCP sockets: -R/-S are ignored');
  }
  if (Buffer.byteLength(path) > GGATE_SIZE.PATH_MAX || path.includes('\0') || path === '') {
    throw new BlockError('EINVAL', `invalid path '${path}' (1 to ${GGATE_SIZE.PATH_MAX} bytes, no NUL)`);
  }
  return { host, port, path, access: flags.mode, noDelay: !flags.nagle };
}

async function connect(flags: CommonFlags): Promise<ControlClient> {
  const path = flags.control ?? defaultControlPath();
  try {
    return await connectControl(path);
  } catch (e) {
    const b = toBlockError(e);
    throw new BlockError(b.code, `${b.message} (is \`blockgate serve\` running with this control socket?)`, { cause: e });
  }
}

async function connectServer(target: GgatecTarget): Promise<GgatecLink> {
  try {
    return await connectGgatec(target);
  } catch (e) {
    const b = toBlockError(e);
    throw new BlockError(b.code, `cannot connect: ${b.message}`, { cause: e });
  }
}

function logEvent(name: string, target: GgatecTarget, verbose: boolean): (e: GgatecEvent) => void {
  const hex = (t: number): string => `0x${t.toString(16).padStart(8, '0')}`;
  const there = `${target.host}:${target.port} ${target.path}`;
  return (e) => {
    switch (e.type) {
      case 'disconnected':
        say(`${name}: lost connection to ${there} (${e.reason}); ${e.inFlight} request(s) will be resent`);
        break;
      case 'connecting':
        if (verbose) say(`${name}: connecting to ${there} (attempt ${e.attempt}, token ${hex(e.token)})`);
        break;
      case 'connect-failed':
        say(`${name}: cannot connect (attempt ${e.attempt}): ${e.error.message} (${e.error.code}); retrying`);
        break;
      case 'connected':
        if (e.attempt > 1 || verbose) say(`${name}: connected to ${there} (token ${hex(e.token)})`);
        break;
      case 'requeued':
        say(`${name}: reconnected to ${there} (token ${hex(e.token)}); requests in flight requeued in order`);
        break;
      case 'request':
        if (verbose) {
          say(`${name}: ${e.cmd} seq=${e.seq} offset=${e.offset} length=${e.length}${e.error === 0 ? '' : ` error=${e.error}`}${e.remote ? '' : ' (local)'}`);
        }
        break;
      case 'stray-reply':
        say(`${name}: ignored a reply with unknown seq ${String(e.seq)} (cmd ${e.cmd})`);
        break;
    }
  };
}

/** Serves `unit` through `link` until the gate is destroyed (0) or a signal stops it (0); failures throw. */
async function forward(
  client: ControlClient,
  unit: number,
  name: string,
  link: GgatecLink,
  geometry: { mediasize: number; sectorsize: number },
  flags: ConnectFlags,
): Promise<number> {
  const target = link.target;
  const stop = new AbortController();
  const onSignal = (sig: NodeJS.Signals): void => stop.abort(sig);
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const r = await serveGgatec(client, unit, {
      target,
      link,
      geometry,
      gateName: name,
      signal: stop.signal,
      onEvent: logEvent(name, target, flags.verbose),
    });
    if (flags.verbose) say(`${name}: destroyed; ${r.served} requests served, ${r.disconnects} reconnection(s)`);
    return 0;
  } catch (e) {
    if (stop.signal.aborted && e instanceof BlockError && e.code === 'EINTR') {
      say(
        `${name}: stopped by ${String(stop.signal.reason)}; the gate remains (blockgate ggatec rescue -u ${unit} ${target.host} ${target.path}, or destroy -u ${unit})`,
      );
      return 0;
    }
    throw e;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await client.close().catch(() => undefined);
  }
}

/** The gate's geometry from the server's and -s (see the module comment). */
export function gateGeometry(server: { mediasize: number; sectorsize: number }, sectorsize?: number): { mediasize: number; sectorsize: number } {
  const sector = sectorsize ?? server.sectorsize;
  if (sector % server.sectorsize !== 0) {
    throw new BlockError('EINVAL', `sector size ${sector} is not a multiple of the server's sector size ${server.sectorsize}`);
  }
  const mediasize = server.mediasize - (server.mediasize % sector);
  if (mediasize === 0) throw new BlockError('EINVAL', `the server's media (${server.mediasize} bytes) holds no whole ${sector}-byte sector`);
  return { mediasize, sectorsize: sector };
}

async function create(host: string, path: string, flags: CreateFlags): Promise<number> {
  const target = targetOf(host, path, flags);
  const queue = integer('queue_size', flags.queue, 0, GATE.MAX_QUEUE_SIZE);
  const timeout = integer('timeout', flags.timeout, 0, GATE.MAX_TIMEOUT);
  const sector = flags.sectorsize === undefined ? undefined : integer('sectorsize', flags.sectorsize, 1, GATE.MAX_SECTOR_SIZE);
  const unit = flags.unit === undefined ? GATE.UNIT_AUTO : unitOf(flags.unit);
  const link = await connectServer(target);
  let client: ControlClient | undefined;
  try {
    const geometry = gateGeometry(link, sector);
    client = await connect(flags);
    const chosen = await client.create({
      unit,
      mediasize: geometry.mediasize,
      sectorsize: geometry.sectorsize,
      flags: gateFlags(flags.mode),
      timeout,
      maxcount: queue,
      info: `${host}:${target.port} ${path}`,
    });
    const name = `${GATE.PROVIDER_NAME}${chosen}`;
    if (unit === GATE.UNIT_AUTO) process.stdout.write(`${name}\n`);
    if (flags.verbose) {
      say(`${name}: forwarding to ${host}:${target.port} ${path} (${formatSize(geometry.mediasize)}, sector ${geometry.sectorsize}, token 0x${link.token.toString(16)})`);
    }
    return await forward(client, chosen, name, link, geometry, flags);
  } catch (e) {
    link.close();
    await client?.close().catch(() => undefined);
    throw e;
  }
}

async function rescue(host: string, path: string, flags: ConnectFlags): Promise<number> {
  const target = targetOf(host, path, flags);
  const unit = unitOf(flags.unit);
  const client = await connect(flags);
  let link: GgatecLink | undefined;
  try {
    const gate = (await client.list()).find((g) => g.unit === unit);
    if (gate === undefined) throw new BlockError('ENXIO', `no gate unit ${unit}`);
    link = await connectServer(target);
    if (link.mediasize < gate.mediasize || gate.sectorsize % link.sectorsize !== 0) {
      throw new BlockError(
        'EINVAL',
        `${host}:${target.port} ${path} (${link.mediasize} bytes, sector ${link.sectorsize}) cannot serve ${gate.name} (${gate.mediasize} bytes, sector ${gate.sectorsize})`,
      );
    }
    // Every request the dead handler took goes back to the head of the queue, in order.
    await client.cancel({ unit, seq: 0 });
    if (flags.verbose) say(`${gate.name}: rescued, forwarding to ${host}:${target.port} ${path}`);
    return await forward(client, unit, gate.name, link, { mediasize: gate.mediasize, sectorsize: gate.sectorsize }, flags);
  } catch (e) {
    link?.close();
    await client.close().catch(() => undefined);
    throw e;
  }
}

async function destroy(flags: CommonFlags & { force?: boolean; unit?: string }): Promise<number> {
  const unit = unitOf(flags.unit);
  const client = await connect(flags);
  try {
    await client.destroy({ unit, force: flags.force === true });
    return 0;
  } finally {
    await client.close().catch(() => undefined);
  }
}

async function list(flags: CommonFlags & { verbose?: boolean; unit?: string }): Promise<number> {
  const unit = flags.unit === undefined ? undefined : unitOf(flags.unit);
  const client = await connect(flags);
  try {
    const gates = (await client.list()).filter((g) => unit === undefined || g.unit === unit);
    for (const g of gates) process.stdout.write(flags.verbose ? `${formatGateVerbose(g)}\n` : `${g.name}\n`);
    return 0;
  } finally {
    await client.close().catch(() => undefined);
  }
}

/** Runs a subcommand body: its status becomes the exit code; errors are printed, status 1. */
function action<A extends unknown[]>(name: string, fn: (...args: A) => Promise<number>): (...args: A) => Promise<void> {
  return async (...args: A) => {
    try {
      process.exitCode = await fn(...args);
    } catch (e) {
      const b = toBlockError(e);
      process.stderr.write(`blockgate ggatec ${name}: ${b.message} (${b.code})\n`);
      process.exitCode = 1;
    }
  };
}

type Opts = Record<string, string | boolean | undefined>;

const controlOption = (): Option =>
  new Option('--control <path>', 'control socket of blockgate serve (default: $XDG_RUNTIME_DIR/blockgate/ctl.sock or /tmp/blockgate-<uid>/ctl.sock)');

/** The options create and rescue share, in FreeBSD's order. */
function connectOptions(cmd: Command): Command {
  return cmd
    .option('-n', 'do not set TCP_NODELAY')
    .option('-v, --verbose', 'log every request to stderr')
    .addOption(new Option('-o <mode>', 'access: ro, wo or rw').choices(['ro', 'wo', 'rw']).default('rw'))
    .option('-p <port>', 'ggated TCP port', String(GGATE.G_GATE_PORT))
    .option('-R <rcvbuf>', 'socket receive buffer (accepted; not settable from Node.js)', String(GGATE.G_GATE_RCVBUF))
    .option('-S <sndbuf>', 'socket send buffer (accepted; not settable from Node.js)', String(GGATE.G_GATE_SNDBUF));
}

function connectFlags(o: Opts): ConnectFlags {
  return {
    verbose: o.verbose === true,
    nagle: o.n === true,
    mode: o.o as GgateAccess,
    port: o.p as string,
    rcvbuf: o.R as string,
    sndbuf: o.S as string,
    ...(o.u !== undefined ? { unit: o.u as string } : {}),
    ...(o.control !== undefined ? { control: o.control as string } : {}),
  };
}

export function ggatecCommand(): Command {
  const cmd = new Command('ggatec').description('a GEOM Gate device served by a remote ggated (FreeBSD ggatec)');
  connectOptions(
    cmd.command('create').description('create a gate forwarding to PATH on HOST\'s ggated and serve it (prints ggate<unit> when -u is not given)'),
  )
    .argument('<host>', 'ggated host (IPv4 address or name)')
    .argument('<path>', 'exported path')
    .option('-q <queue_size>', 'gate queue size (0: unlimited)', String(GGATE.G_GATE_QUEUE_SIZE))
    .option('-s <sectorsize>', "sector size (default: the server's)")
    .option('-t <timeout>', 'seconds after which a request fails EIO (0: never)', String(GGATE.G_GATE_TIMEOUT))
    .option('-u <unit>', 'unit number (default: the lowest free one)')
    .addOption(controlOption())
    .action(
      action('create', (host: string, path: string, o: Opts) =>
        create(host, path, {
          ...connectFlags(o),
          queue: o.q as string,
          timeout: o.t as string,
          ...(o.s !== undefined ? { sectorsize: o.s as string } : {}),
        }),
      ),
    );
  connectOptions(cmd.command('rescue').description('take over gate -u UNIT whose ggatec died, forwarding to PATH on HOST'))
    .argument('<host>', 'ggated host (IPv4 address or name)')
    .argument('<path>', 'exported path')
    .requiredOption('-u <unit>', 'unit number')
    .addOption(controlOption())
    .action(action('rescue', (host: string, path: string, o: Opts) => rescue(host, path, connectFlags(o))));
  cmd
    .command('destroy')
    .description('destroy gate -u UNIT (EBUSY while an NBD client has it open, unless -f)')
    .option('-f, --force', 'destroy even if open: outstanding requests fail')
    .requiredOption('-u <unit>', 'unit number')
    .addOption(controlOption())
    .action(
      action('destroy', (o: Opts) =>
        destroy({
          force: o.force === true,
          unit: o.u as string,
          ...(o.control !== undefined ? { control: o.control as string } : {}),
        }),
      ),
    );
  cmd
    .command('list')
    .description('list gates (-v: details)')
    .option('-v, --verbose', 'details of each gate')
    .option('-u <unit>', 'only this unit')
    .addOption(controlOption())
    .action(
      action('list', (o: Opts) =>
        list({
          verbose: o.verbose === true,
          ...(o.u !== undefined ? { unit: o.u as string } : {}),
          ...(o.control !== undefined ? { control: o.control as string } : {}),
        }),
      ),
    );
  return cmd;
}
