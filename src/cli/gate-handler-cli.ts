/**
 * What the gate-handler commands (`blockgate ggatel`, `blockgate ggatec`) share: FreeBSD's
 * flag words and checks (-u unit, -o mode, integers), the control-socket connection, the
 * `destroy` and `list` subcommands (the same for every handler, as FreeBSD's ggatel and
 * ggatec share sbin/ggate/shared), serving until SIGINT/SIGTERM with the gate left for
 * `rescue`, and the mapping of a subcommand's outcome to the exit status.
 *
 * Each handler keeps what is its own: where requests are served from, its create/rescue
 * checks and its extra flags.
 */
import { Command, Option } from 'commander';
import { BlockError, toBlockError } from '../errors/index.js';
import { formatSize } from '../device/index.js';
import { GATE, GATE_FLAG, type GateInfo } from '../gate/index.js';
import type { GgateAccess } from '../ggate/index.js';
import { connectControl, type ControlClient } from '../gate/control/client.js';
import { defaultControlPath } from '../gate/control/server.js';

/** FreeBSD's largest unit number (an int in struct g_gate_ctl_create). */
const MAX_UNIT = 0x7fff_ffff;

/** Flags every subcommand takes. */
export interface CommonFlags {
  control?: string;
}

/** Flags create and rescue share in every handler. */
export interface ServeFlags extends CommonFlags {
  verbose: boolean;
  mode: GgateAccess;
  unit?: string;
}

/** The parsed options commander hands to an action. */
export type Opts = Record<string, string | boolean | undefined>;

/** A non-negative decimal integer from min to max, or EINVAL naming the flag. */
export function integer(name: string, text: string, min: number, max: number): number {
  if (!/^[0-9]+$/.test(text) || Number(text) < min || Number(text) > max) {
    throw new BlockError('EINVAL', `invalid ${name} '${text}' (expected an integer from ${min} to ${max})`);
  }
  return Number(text);
}

/** The -u unit; EINVAL when it is missing. */
export function unitOf(text: string | undefined): number {
  if (text === undefined) throw new BlockError('EINVAL', 'a unit is required (-u unit)');
  return integer('unit', text, 0, MAX_UNIT);
}

/** create's unit: -u, or the lowest free one when -u is not given. */
export function createUnitOf(text: string | undefined): number {
  return text === undefined ? GATE.UNIT_AUTO : unitOf(text);
}

/** The gate flags of -o. */
export function gateFlags(mode: GgateAccess): number {
  return mode === 'ro' ? GATE_FLAG.READONLY : mode === 'wo' ? GATE_FLAG.WRITEONLY : 0;
}

/** Writes `<tool>: <text>` lines to stderr. */
export function stderrSay(tool: string): (text: string) => void {
  return (text) => {
    process.stderr.write(`${tool}: ${text}\n`);
  };
}

/** Connects to the control socket of --control (or the default), hinting at serve on failure. */
export async function connectControlOf(flags: CommonFlags): Promise<ControlClient> {
  const path = flags.control ?? defaultControlPath();
  try {
    return await connectControl(path);
  } catch (e) {
    const b = toBlockError(e);
    throw new BlockError(b.code, `${b.message} (is \`blockgate serve\` running with this control socket?)`, { cause: e });
  }
}

/**
 * After create: the gate's name, printed on stdout when the unit was chosen
 * automatically (as FreeBSD does, so scripts can capture it).
 */
export function announceGate(requested: number, chosen: number): string {
  const name = `${GATE.PROVIDER_NAME}${chosen}`;
  if (requested === GATE.UNIT_AUTO) process.stdout.write(`${name}\n`);
  return name;
}

/** The gate of `unit`, for rescue; ENXIO when there is none. */
export async function gateOfUnit(client: ControlClient, unit: number): Promise<GateInfo> {
  const gate = (await client.list()).find((g) => g.unit === unit);
  if (gate === undefined) throw new BlockError('ENXIO', `no gate unit ${unit}`);
  return gate;
}

/**
 * Rescue's takeover: CANCEL with seq 0 puts every request the dead handler had taken
 * back at the head of the gate's queue, in order, for the new handler to serve.
 */
export async function requeueTaken(client: ControlClient, unit: number): Promise<void> {
  await client.cancel({ unit, seq: 0 });
}

/**
 * Runs `serve` (a handler serving a gate until it is destroyed) with a signal that
 * SIGINT/SIGTERM abort. Resolves 0 when serve returns, and 0 when a signal stopped it
 * (serve rejects EINTR; `stopped` says so, the gate stays for rescue or destroy); any
 * other failure throws. The control client is closed in every case.
 */
export async function serveUntilSignal(
  client: ControlClient,
  serve: (signal: AbortSignal) => Promise<void>,
  stopped: (signal: string) => void,
): Promise<number> {
  const stop = new AbortController();
  const onSignal = (sig: NodeJS.Signals): void => stop.abort(sig);
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    await serve(stop.signal);
    return 0;
  } catch (e) {
    if (stop.signal.aborted && e instanceof BlockError && e.code === 'EINTR') {
      stopped(String(stop.signal.reason));
      return 0;
    }
    throw e;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await client.close().catch(() => undefined);
  }
}

async function destroy(flags: CommonFlags & { force?: boolean; unit?: string }): Promise<number> {
  const unit = unitOf(flags.unit);
  const client = await connectControlOf(flags);
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
  const client = await connectControlOf(flags);
  try {
    const gates = (await client.list()).filter((g) => unit === undefined || g.unit === unit);
    for (const g of gates) process.stdout.write(flags.verbose ? `${formatGateVerbose(g)}\n` : `${g.name}\n`);
    return 0;
  } finally {
    await client.close().catch(() => undefined);
  }
}

/**
 * Wraps a subcommand body of `blockgate <tool>`: its status becomes the exit code;
 * an error is printed as `blockgate <tool> <name>: message (CODE)`, status 1.
 */
export function action<A extends unknown[]>(tool: string, name: string, fn: (...args: A) => Promise<number>): (...args: A) => Promise<void> {
  return async (...args: A) => {
    try {
      process.exitCode = await fn(...args);
    } catch (e) {
      const b = toBlockError(e);
      process.stderr.write(`blockgate ${tool} ${name}: ${b.message} (${b.code})\n`);
      process.exitCode = 1;
    }
  };
}

export const controlOption = (): Option =>
  new Option('--control <path>', 'control socket of blockgate serve (default: $XDG_RUNTIME_DIR/blockgate/ctl.sock or /tmp/blockgate-<uid>/ctl.sock)');

export const modeOption = (): Option => new Option('-o <mode>', 'access: ro, wo or rw').choices(['ro', 'wo', 'rw']).default('rw');

/** --control, when given. */
export function commonFlags(o: Opts): CommonFlags {
  return o.control !== undefined ? { control: o.control as string } : {};
}

/** -v, -o, -u and --control, as create and rescue parse them. */
export function serveFlags(o: Opts): ServeFlags {
  return {
    verbose: o.verbose === true,
    mode: o.o as GgateAccess,
    ...(o.u !== undefined ? { unit: o.u as string } : {}),
    ...commonFlags(o),
  };
}

/** Adds the `destroy` and `list` subcommands of `blockgate <tool>` to `cmd`. */
export function addGateAdminCommands(cmd: Command, tool: string): Command {
  cmd
    .command('destroy')
    .description('destroy gate -u UNIT (EBUSY while an NBD client has it open, unless -f)')
    .option('-f, --force', 'destroy even if open: outstanding requests fail')
    .requiredOption('-u <unit>', 'unit number')
    .addOption(controlOption())
    .action(action(tool, 'destroy', (o: Opts) => destroy({ force: o.force === true, unit: o.u as string, ...commonFlags(o) })));
  cmd
    .command('list')
    .description('list gates (-v: details)')
    .option('-v, --verbose', 'details of each gate')
    .option('-u <unit>', 'only this unit')
    .addOption(controlOption())
    .action(
      action(tool, 'list', (o: Opts) =>
        list({
          verbose: o.verbose === true,
          ...(o.u !== undefined ? { unit: o.u as string } : {}),
          ...commonFlags(o),
        }),
      ),
    );
  return cmd;
}
