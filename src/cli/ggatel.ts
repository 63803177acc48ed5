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
import { BlockError, toBlockError } from '../errors/index.js';
import { FileDevice } from '../backends/index.js';
import { formatSize } from '../device/index.js';
import { GATE, GATE_FLAG, type GateInfo } from '../gate/index.js';
import { connectControl, type ControlClient } from '../client/control-client.js';
import {
  DEFAULT_GATE_CONCURRENCY,
  MAX_GATE_CONCURRENCY,
  serveGate,
  type GateHandler,
  type ServeGateEvent,
} from '../client/gate-handler.js';
import { defaultControlPath } from '../server/control-protocol.js';

/** FreeBSD's default sector size for a regular file (g_gate_sectorsize). */
export const GGATEL_DEFAULT_SECTOR_SIZE = 512;
/** FreeBSD's G_GATE_TIMEOUT (sbin/ggate/shared/ggate.h): 0, no timeout. */
export const GGATEL_DEFAULT_TIMEOUT = 0;

type AccessMode = 'ro' | 'wo' | 'rw';

interface CommonFlags {
  control?: string;
}
interface ServeFlags extends CommonFlags {
  verbose?: boolean;
  mode: AccessMode;
  unit?: string;
  concurrency: string;
}
interface CreateFlags extends ServeFlags {
  sectorsize: string;
  timeout: string;
}

function integer(name: string, text: string, min: number, max: number): number {
  if (!/^-?[0-9]+$/.test(text) || Number(text) < min || Number(text) > max) {
    throw new BlockError('EINVAL', `invalid ${name} '${text}' (expected an integer from ${min} to ${max})`);
  }
  return Number(text);
}

function unitOf(text: string | undefined): number {
  if (text === undefined) throw new BlockError('EINVAL', 'a unit is required (-u unit)');
  return integer('unit', text, 0, 0x7fff_ffff);
}

function flagsOf(mode: AccessMode): number {
  return mode === 'ro' ? GATE_FLAG.READONLY : mode === 'wo' ? GATE_FLAG.WRITEONLY : 0;
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
      process.stderr.write(`ggatel: ${name}: ${e.cmd} seq=${e.seq} offset=${e.offset} length=${e.length}${e.error === 0 ? '' : ` error=${e.error}`}\n`);
    } else if (e.type === 'grow') {
      process.stderr.write(`ggatel: ${name}: buffer grown to ${e.length} bytes\n`);
    } else {
      process.stderr.write(`ggatel: ${name}: start interrupted, retrying\n`);
    }
  };
}

/** Serves `unit` from `dev` until the gate is destroyed (0) or a signal stops it (0); failures throw. */
async function serveFile(client: ControlClient, unit: number, name: string, dev: FileDevice, flags: ServeFlags): Promise<number> {
  const concurrency = integer('concurrency', flags.concurrency, 1, MAX_GATE_CONCURRENCY);
  const stop = new AbortController();
  const onSignal = (sig: NodeJS.Signals): void => stop.abort(sig);
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const r = await serveGate(client, unit, fileHandler(dev), {
      concurrency,
      signal: stop.signal,
      ...(flags.verbose ? { onEvent: logEvent(name) } : {}),
    });
    if (flags.verbose) process.stderr.write(`ggatel: ${name}: destroyed; ${r.served} requests served\n`);
    return 0;
  } catch (e) {
    if (stop.signal.aborted && e instanceof BlockError && e.code === 'EINTR') {
      process.stderr.write(
        `ggatel: ${name}: stopped by ${String(stop.signal.reason)}; the gate remains (blockgate ggatel rescue -u ${unit} ${dev.path}, or destroy -u ${unit})\n`,
      );
      return 0;
    }
    throw e;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await client.close().catch(() => undefined);
    await dev.close().catch(() => undefined);
  }
}

async function create(path: string, flags: CreateFlags): Promise<number> {
  const sectorsize = integer('sectorsize', flags.sectorsize, 1, GATE.MAX_SECTOR_SIZE);
  const timeout = integer('timeout', flags.timeout, 0, GATE.MAX_TIMEOUT);
  const unit = flags.unit === undefined ? GATE.UNIT_AUTO : unitOf(flags.unit);
  const dev = await FileDevice.open({ path, readonly: flags.mode === 'ro' });
  let client: ControlClient | undefined;
  try {
    if (dev.size === 0 || dev.size % sectorsize !== 0) {
      throw new BlockError('EINVAL', `${path}: size ${dev.size} is not a positive multiple of the sector size ${sectorsize}`);
    }
    client = await connect(flags);
    const chosen = await client.create({
      unit,
      mediasize: dev.size,
      sectorsize,
      flags: flagsOf(flags.mode),
      timeout,
      maxcount: 0,
      info: path,
    });
    const name = `${GATE.PROVIDER_NAME}${chosen}`;
    if (unit === GATE.UNIT_AUTO) process.stdout.write(`${name}\n`);
    if (flags.verbose) process.stderr.write(`ggatel: ${name}: serving ${path} (${formatSize(dev.size)}, sector ${sectorsize})\n`);
    return await serveFile(client, chosen, name, dev, flags);
  } catch (e) {
    await client?.close().catch(() => undefined);
    await dev.close().catch(() => undefined);
    throw e;
  }
}

async function rescue(path: string, flags: ServeFlags): Promise<number> {
  const unit = unitOf(flags.unit);
  const dev = await FileDevice.open({ path, readonly: flags.mode === 'ro' });
  let client: ControlClient | undefined;
  try {
    client = await connect(flags);
    const gate = (await client.list()).find((g) => g.unit === unit);
    if (gate === undefined) throw new BlockError('ENXIO', `no gate unit ${unit}`);
    if (gate.mediasize > dev.size) {
      throw new BlockError('EINVAL', `${path} (${dev.size} bytes) is smaller than ${gate.name} (${gate.mediasize} bytes)`);
    }
    // Every request the dead handler took goes back to the head of the queue, in order.
    await client.cancel({ unit, seq: 0 });
    if (flags.verbose) process.stderr.write(`ggatel: ${gate.name}: rescued, serving ${path}\n`);
    return await serveFile(client, unit, gate.name, dev, flags);
  } catch (e) {
    await client?.close().catch(() => undefined);
    await dev.close().catch(() => undefined);
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

function modeText(flags: number): string {
  if ((flags & GATE_FLAG.READONLY) !== 0) return 'ro';
  if ((flags & GATE_FLAG.WRITEONLY) !== 0) return 'wo';
  return 'rw';
}

/** `list -v`: GEOM-style blocks, as `geom gate list` prints them on FreeBSD. */
export function formatGateVerbose(g: GateInfo): string {
  return [
    `Geom name: ${g.name}`,
    `unit: ${g.unit}`,
    `info: ${g.info}`,
    `access: ${modeText(g.flags)}`,
    `timeout: ${g.timeout}`,
    `queue_size: ${g.maxcount}`,
    `queue_count: ${g.queued + g.inFlight} (${g.queued} queued, ${g.inFlight} in flight)`,
    `handlers waiting: ${g.sleeping}`,
    'Providers:',
    `1. Name: ${g.name}`,
    `   Mediasize: ${g.mediasize} (${formatSize(g.mediasize)})`,
    `   Sectorsize: ${g.sectorsize}`,
    `   Opens: ${g.openCount}`,
    '',
  ].join('\n');
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
      process.stderr.write(`blockgate ggatel ${name}: ${b.message} (${b.code})\n`);
      process.exitCode = 1;
    }
  };
}

const controlOption = (): Option =>
  new Option('--control <path>', 'control socket of blockgate serve (default: $XDG_RUNTIME_DIR/blockgate/ctl.sock or /tmp/blockgate-<uid>/ctl.sock)');
const modeOption = (): Option => new Option('-o <mode>', 'access: ro, wo or rw').choices(['ro', 'wo', 'rw']).default('rw');
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
      action('create', (path: string, o: Record<string, string | boolean | undefined>) =>
        create(path, {
          verbose: o.verbose === true,
          mode: o.o as AccessMode,
          sectorsize: o.s as string,
          timeout: o.t as string,
          concurrency: o.concurrency as string,
          ...(o.u !== undefined ? { unit: o.u as string } : {}),
          ...(o.control !== undefined ? { control: o.control as string } : {}),
        }),
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
    .action(
      action('rescue', (path: string, o: Record<string, string | boolean | undefined>) =>
        rescue(path, {
          verbose: o.verbose === true,
          mode: o.o as AccessMode,
          unit: o.u as string,
          concurrency: o.concurrency as string,
          ...(o.control !== undefined ? { control: o.control as string } : {}),
        }),
      ),
    );
  cmd
    .command('destroy')
    .description('destroy gate -u UNIT (EBUSY while an NBD client has it open, unless -f)')
    .option('-f, --force', 'destroy even if open: outstanding requests fail')
    .requiredOption('-u <unit>', 'unit number')
    .addOption(controlOption())
    .action(
      action('destroy', (o: Record<string, string | boolean | undefined>) =>
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
      action('list', (o: Record<string, string | boolean | undefined>) =>
        list({
          verbose: o.verbose === true,
          ...(o.u !== undefined ? { unit: o.u as string } : {}),
          ...(o.control !== undefined ? { control: o.control as string } : {}),
        }),
      ),
    );
  return cmd;
}
