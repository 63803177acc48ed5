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
 *   flight are resent in order; the NBD clients only see a delay (src/ggate/ggatec.ts).
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
import { Command } from 'commander';
import { BlockError, toBlockError } from '../errors/index.js';
import { formatSize } from '../device/index.js';
import { GATE } from '../gate/index.js';
import { GGATE, GGATE_SIZE } from '../ggate/index.js';
import type { ControlClient } from '../gate/control/client.js';
import { connectGgatec, serveGgatec, type GgatecEvent, type GgatecLink, type GgatecTarget } from '../ggate/ggatec.js';
import {
  action,
  addGateAdminCommands,
  announceGate,
  connectControlOf,
  controlOption,
  createUnitOf,
  gateFlags,
  gateOfUnit,
  integer,
  modeOption,
  requeueTaken,
  serveFlags,
  serveUntilSignal,
  stderrSay,
  unitOf,
  type Opts,
  type ServeFlags,
} from './gate-handler-cli.js';

interface ConnectFlags extends ServeFlags {
  nagle: boolean;
  port: string;
  rcvbuf: string;
  sndbuf: string;
}
interface CreateFlags extends ConnectFlags {
  queue: string;
  sectorsize?: string;
  timeout: string;
}

const say = stderrSay('ggatec');

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
  return serveUntilSignal(
    client,
    async (signal) => {
      const r = await serveGgatec(client, unit, {
        target,
        link,
        geometry,
        gateName: name,
        signal,
        onEvent: logEvent(name, target, flags.verbose),
      });
      if (flags.verbose) say(`${name}: destroyed; ${r.served} requests served, ${r.disconnects} reconnection(s)`);
    },
    (sig) => say(`${name}: stopped by ${sig}; the gate remains (blockgate ggatec rescue -u ${unit} ${target.host} ${target.path}, or destroy -u ${unit})`),
  );
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
  const unit = createUnitOf(flags.unit);
  const link = await connectServer(target);
  let client: ControlClient | undefined;
  try {
    const geometry = gateGeometry(link, sector);
    client = await connectControlOf(flags);
    const chosen = await client.create({
      unit,
      mediasize: geometry.mediasize,
      sectorsize: geometry.sectorsize,
      flags: gateFlags(flags.mode),
      timeout,
      maxcount: queue,
      info: `${host}:${target.port} ${path}`,
    });
    const name = announceGate(unit, chosen);
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
  const client = await connectControlOf(flags);
  let link: GgatecLink | undefined;
  try {
    const gate = await gateOfUnit(client, unit);
    link = await connectServer(target);
    if (link.mediasize < gate.mediasize || gate.sectorsize % link.sectorsize !== 0) {
      throw new BlockError(
        'EINVAL',
        `${host}:${target.port} ${path} (${link.mediasize} bytes, sector ${link.sectorsize}) cannot serve ${gate.name} (${gate.mediasize} bytes, sector ${gate.sectorsize})`,
      );
    }
    await requeueTaken(client, unit);
    if (flags.verbose) say(`${gate.name}: rescued, forwarding to ${host}:${target.port} ${path}`);
    return await forward(client, unit, gate.name, link, { mediasize: gate.mediasize, sectorsize: gate.sectorsize }, flags);
  } catch (e) {
    link?.close();
    await client.close().catch(() => undefined);
    throw e;
  }
}

/** The options create and rescue share, in FreeBSD's order. */
function connectOptions(cmd: Command): Command {
  return cmd
    .option('-n', 'do not set TCP_NODELAY')
    .option('-v, --verbose', 'log every request to stderr')
    .addOption(modeOption())
    .option('-p <port>', 'ggated TCP port', String(GGATE.G_GATE_PORT))
    .option('-R <rcvbuf>', 'socket receive buffer (accepted; not settable from Node.js)', String(GGATE.G_GATE_RCVBUF))
    .option('-S <sndbuf>', 'socket send buffer (accepted; not settable from Node.js)', String(GGATE.G_GATE_SNDBUF));
}

function connectFlags(o: Opts): ConnectFlags {
  return {
    ...serveFlags(o),
    nagle: o.n === true,
    port: o.p as string,
    rcvbuf: o.R as string,
    sndbuf: o.S as string,
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
      action('ggatec', 'create', (host: string, path: string, o: Opts) =>
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
    .action(action('ggatec', 'rescue', (host: string, path: string, o: Opts) => rescue(host, path, connectFlags(o))));
  return addGateAdminCommands(cmd, 'ggatec');
}
