/**
 * `blockgate ggatel`: serve a gate from a local file, with FreeBSD ggatel's commands and
 * flags, through the control socket of a running `blockgate serve`:
 *
 *   blockgate ggatel create [-v] [-o ro|wo|rw] [-s sectorsize] [-t timeout] [-u unit] path
 *   blockgate ggatel rescue [-v] [-o ro|wo|rw] -u unit path
 *   blockgate ggatel destroy [-f] -u unit
 *   blockgate ggatel list [-v] [-u unit]
 *
 * Every command takes `--control PATH` (default: the same default path as serve).
 *
 * - create makes the gate (mediasize = the file's size, info = the path) and serves it.
 *   Like FreeBSD it prints the device name (`ggate<unit>`) when the unit was chosen
 *   automatically (no -u). The gate is the NBD export `ggate<unit>` of the server.
 * - rescue takes over a gate whose handler died: CANCEL (seq 0) puts every request the
 *   dead handler had taken back in the queue, in order, then it serves them. Clients
 *   only see a delay.
 * - Foreground always: FreeBSD's ggatel daemonizes unless -v; blockgate never does (run
 *   it under a service manager, or with `&`). -v logs every request to stderr.
 * - The handler ends with status 0 when the gate is destroyed (ECANCELED), with 1 on any
 *   other failure. SIGINT/SIGTERM stop it after the requests in hand are answered; the
 *   gate stays, waiting for `rescue` or `destroy`, as when FreeBSD's ggatel is killed.
 * - DELETE (NBD trim) writes zeroes over the range (Node.js has no fallocate to punch a
 *   hole); FreeBSD's ggatel wrote whatever its buffer held (A.4 #14). FLUSH is
 *   fdatasync(2); FreeBSD opens the file O_DIRECT|O_FSYNC instead.
 * - `--concurrency N` (not in FreeBSD, whose ggatel serves one request at a time) sets
 *   how many requests are served at once.
 */
import { Command, Option } from 'commander';
import { BlockError } from '../errors/index.js';
import { FileDevice } from '../backends/index.js';
import { formatSize } from '../device/index.js';
import { GATE } from '../gate/index.js';
import type { ControlClient } from '../gate/control/client.js';
import {
  DEFAULT_GATE_CONCURRENCY,
  MAX_GATE_CONCURRENCY,
  serveGate,
  type GateHandler,
  type ServeGateEvent,
} from '../gate/handler.js';
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

// `blockgate status` and older callers take the gate formatter from here.
export { formatGateVerbose } from './gate-handler-cli.js';

/** FreeBSD's default sector size for a regular file (g_gate_sectorsize). */
export const GGATEL_DEFAULT_SECTOR_SIZE = 512;
/** FreeBSD's G_GATE_TIMEOUT (sbin/ggate/shared/ggate.h): 0, no timeout. */
export const GGATEL_DEFAULT_TIMEOUT = 0;

interface FileServeFlags extends ServeFlags {
  concurrency: string;
}
interface CreateFlags extends FileServeFlags {
  sectorsize: string;
  timeout: string;
}

const say = stderrSay('ggatel');

/** The handler over a file: READ pread, WRITE pwrite, DELETE writes zeroes, FLUSH fdatasync. */
export function fileHandler(dev: FileDevice): GateHandler {
  return {
    async read(offset, length) {
      const b = Buffer.allocUnsafe(length);
      await dev.read(b, offset, 0);
      return b;
    },
    write: (offset, data) => dev.write(data, offset, 0),
    delete: (offset, length) => dev.zero(offset, length, 0),
    flush: () => dev.flush(0),
  };
}

function logEvent(name: string): (e: ServeGateEvent) => void {
  return (e) => {
    if (e.type === 'request') {
      say(`${name}: ${e.cmd} seq=${e.seq} offset=${e.offset} length=${e.length}${e.error === 0 ? '' : ` error=${e.error}`}`);
    } else if (e.type === 'grow') {
      say(`${name}: buffer grown to ${e.length} bytes`);
    } else {
      say(`${name}: start interrupted, retrying`);
    }
  };
}

/** Serves `unit` from `dev` until the gate is destroyed (0) or a signal stops it (0); failures throw. */
async function serveFile(client: ControlClient, unit: number, name: string, dev: FileDevice, flags: FileServeFlags): Promise<number> {
  const concurrency = integer('concurrency', flags.concurrency, 1, MAX_GATE_CONCURRENCY);
  try {
    return await serveUntilSignal(
      client,
      async (signal) => {
        const r = await serveGate(client, unit, fileHandler(dev), {
          concurrency,
          signal,
          ...(flags.verbose ? { onEvent: logEvent(name) } : {}),
        });
        if (flags.verbose) say(`${name}: destroyed; ${r.served} requests served`);
      },
      (sig) => say(`${name}: stopped by ${sig}; the gate remains (blockgate ggatel rescue -u ${unit} ${dev.path}, or destroy -u ${unit})`),
    );
  } finally {
    await dev.close().catch(() => undefined);
  }
}

async function create(path: string, flags: CreateFlags): Promise<number> {
  const sectorsize = integer('sectorsize', flags.sectorsize, 1, GATE.MAX_SECTOR_SIZE);
  const timeout = integer('timeout', flags.timeout, 0, GATE.MAX_TIMEOUT);
  const unit = createUnitOf(flags.unit);
  const dev = await FileDevice.open({ path, readonly: flags.mode === 'ro' });
  let client: ControlClient | undefined;
  try {
    if (dev.size === 0 || dev.size % sectorsize !== 0) {
      throw new BlockError('EINVAL', `${path}: size ${dev.size} is not a positive multiple of the sector size ${sectorsize}`);
    }
    client = await connectControlOf(flags);
    const chosen = await client.create({
      unit,
      mediasize: dev.size,
      sectorsize,
      flags: gateFlags(flags.mode),
      timeout,
      maxcount: 0,
      info: path,
    });
    const name = announceGate(unit, chosen);
    if (flags.verbose) say(`${name}: serving ${path} (${formatSize(dev.size)}, sector ${sectorsize})`);
    return await serveFile(client, chosen, name, dev, flags);
  } catch (e) {
    await client?.close().catch(() => undefined);
    await dev.close().catch(() => undefined);
    throw e;
  }
}

async function rescue(path: string, flags: FileServeFlags): Promise<number> {
  const unit = unitOf(flags.unit);
  const dev = await FileDevice.open({ path, readonly: flags.mode === 'ro' });
  let client: ControlClient | undefined;
  try {
    client = await connectControlOf(flags);
    const gate = await gateOfUnit(client, unit);
    if (gate.mediasize > dev.size) {
      throw new BlockError('EINVAL', `${path} (${dev.size} bytes) is smaller than ${gate.name} (${gate.mediasize} bytes)`);
    }
    await requeueTaken(client, unit);
    if (flags.verbose) say(`${gate.name}: rescued, serving ${path}`);
    return await serveFile(client, unit, gate.name, dev, flags);
  } catch (e) {
    await client?.close().catch(() => undefined);
    await dev.close().catch(() => undefined);
    throw e;
  }
}

const concurrencyOption = (): Option =>
  new Option('--concurrency <n>', 'requests served at once (FreeBSD: 1)').default(String(DEFAULT_GATE_CONCURRENCY));

export function ggatelCommand(): Command {
  const cmd = new Command('ggatel').description('serve a GEOM Gate device from a local file (FreeBSD ggatel)');
  cmd
    .command('create')
    .description('create a gate backed by PATH and serve it (prints ggate<unit> when -u is not given)')
    .argument('<path>', 'file or block device')
    .option('-v, --verbose', 'log every request to stderr')
    .addOption(modeOption())
    .option('-s <sectorsize>', 'sector size in bytes', String(GGATEL_DEFAULT_SECTOR_SIZE))
    .option('-t <timeout>', 'seconds after which a request fails EIO (0: never)', String(GGATEL_DEFAULT_TIMEOUT))
    .option('-u <unit>', 'unit number (default: the lowest free one)')
    .addOption(concurrencyOption())
    .addOption(controlOption())
    .action(
      action('ggatel', 'create', (path: string, o: Opts) =>
        create(path, { ...serveFlags(o), sectorsize: o.s as string, timeout: o.t as string, concurrency: o.concurrency as string }),
      ),
    );
  cmd
    .command('rescue')
    .description('take over gate -u UNIT whose handler died, serving it from PATH')
    .argument('<path>', 'file or block device')
    .option('-v, --verbose', 'log every request to stderr')
    .addOption(modeOption())
    .requiredOption('-u <unit>', 'unit number')
    .addOption(concurrencyOption())
    .addOption(controlOption())
    .action(action('ggatel', 'rescue', (path: string, o: Opts) => rescue(path, { ...serveFlags(o), concurrency: o.concurrency as string })));
  return addGateAdminCommands(cmd, 'ggatel');
}
