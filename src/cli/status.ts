/**
 * `blockgate status [--control PATH] [--json] [--watch [--interval S] [--count N]]`:
 * what a running `blockgate serve` holds, read over its control socket: every export
 * with its write-back error state (the errseq word: last error, SEEN, counter), the
 * server's live counts (ops, bytes, errors, p50/p99 per operation) and, per attached
 * session, what it negotiated and moved and whether its next FLUSH will report an
 * error; then every gate. `--watch` asks again every interval and shows the rates
 * since the last frame too (redrawn in place on a terminal; one frame after another,
 * or one JSON object a line with --json, otherwise).
 *
 * Looking never changes what a client will see: the server peeks at the errseq word and
 * compares each session's cursor with the SEEN flag masked; nothing is marked seen and
 * no cursor moves.
 */
import { Command, InvalidArgumentError } from 'commander';
import { toBlockError } from '../errors/index.js';
import { formatSize, type LiveStats } from '../device/index.js';
import { connectControl } from '../gate/control/client.js';
import { defaultControlPath } from '../gate/control/server.js';
import type { ExportStatus, StatusReport } from '../gate/control/gates.js';
import { formatGateVerbose } from './ggatel.js';

function errseqText(e: ExportStatus['errseq']): string {
  const word = `0x${e.value.toString(16).padStart(8, '0')}`;
  if (e.error === 0) return `no write-back error recorded (errseq ${word})`;
  const name = e.errorName ?? `errno ${e.error}`;
  return `last write-back error ${name} (${e.error}), ${e.seen ? 'seen' : 'not yet seen'}, counter ${e.counter} (errseq ${word})`;
}

/** A latency bound in µs as status prints it (a bucket bound; null = beyond the last bound). */
const us = (v: number | null): string => (v === null ? '> 10 s' : `${v} µs`);

/** One line per operation that has run: count, bytes, errors, latency percentiles. */
function statsLines(st: LiveStats, what: string): string[] {
  const lines: string[] = [];
  for (const [op, f] of Object.entries(st.ops)) {
    if (f.count === 0) continue;
    const bytes = f.bytes > 0 ? `, ${formatSize(f.bytes)}` : '';
    lines.push(`  ${op}: ${f.count} ops${bytes}, ${f.errors} errors, p50 ${us(f.p50Us)}, p99 ${us(f.p99Us)}`);
  }
  return lines.length > 0 ? [`  ${what} over ${st.elapsed.toFixed(1)} s:`, ...lines.map((l) => `  ${l}`)] : [`  ${what} over ${st.elapsed.toFixed(1)} s: no requests`];
}

/** The rates between two frames' live counts of one export: ops/s and bytes/s each way. */
function rateLine(cur: LiveStats, prev: LiveStats): string {
  const secs = Math.max(0.001, cur.elapsed - prev.elapsed);
  let ops = 0;
  for (const [op, f] of Object.entries(cur.ops)) ops += f.count - (prev.ops[op]?.count ?? 0);
  const bytes = (op: string): number => (cur.ops[op]?.bytes ?? 0) - (prev.ops[op]?.bytes ?? 0);
  return `  rates over ${secs.toFixed(1)} s: ${Math.round(ops / secs)} IOPS, read ${formatSize(Math.round(bytes('read') / secs))}/s, write ${formatSize(Math.round(bytes('write') / secs))}/s`;
}

/**
 * The human form of a status report; with `previous` (the last frame of --watch), the
 * rates since it too.
 */
export function formatStatus(r: StatusReport, previous?: StatusReport): string {
  const out: string[] = [];
  for (const e of r.exports) {
    const name = e.name === '' ? "'' (default)" : e.name;
    const gate = e.gate !== undefined ? `, gate unit ${e.gate}` : '';
    out.push(`export ${name}: ${e.description}, ${formatSize(e.size)}, ${e.readOnly ? 'read-only' : 'read-write'}${gate}`);
    out.push(`  ${errseqText(e.errseq)}`);
    // Only once there is something to say: an idle server's status reads as before.
    if (e.live && Object.values(e.live.ops).some((f) => f.count > 0)) {
      out.push(...statsLines(e.live, 'live counts'));
      const before = previous?.exports.find((p) => p.name === e.name)?.live;
      if (before) out.push(rateLine(e.live, before));
    }
    if (e.stats) out.push(...statsLines(e.stats, 'stats filter'));
    if (e.sessions.length === 0) out.push('  no sessions');
    for (const s of e.sessions) {
      const f = s.figures;
      const moved = f ? `, ${f.replies} replies, ${f.requests} requests, read ${formatSize(f.bytesRead)}, written ${formatSize(f.bytesWritten)}` : '';
      out.push(`  session ${s.id} (${s.peer}${s.security ? `, ${s.security}` : ''}${moved}): ${s.errorPending ? 'ERROR PENDING (its next flush reports it)' : 'no error pending'}`);
    }
  }
  if (r.gates.length === 0) out.push('no gates');
  for (const g of r.gates) out.push('', formatGateVerbose(g).trimEnd());
  return `${out.join('\n')}\n`;
}

/** The default --interval, seconds. */
const DEFAULT_INTERVAL_S = 2;
/** The shortest --interval: a watch must not turn into a polling storm on the control socket. */
const MIN_INTERVAL_S = 0.1;
/** ANSI: cursor home and clear the screen, for redrawing a --watch frame on a terminal. */
const CLEAR = '\x1b[H\x1b[2J';

function parseInterval(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n < MIN_INTERVAL_S) throw new InvalidArgumentError(`expected a number of seconds >= ${MIN_INTERVAL_S}, got '${value}'`);
  return n;
}

function parseCount(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || n < 1 || !Number.isSafeInteger(n)) throw new InvalidArgumentError(`expected a whole number >= 1, got '${value}'`);
  return n;
}

interface StatusFlags {
  control?: string;
  json?: boolean;
  watch?: boolean;
  interval: number;
  count?: number;
}

/** Prints frames until --count is reached (forever without it: ^C ends a watch). */
async function watch(client: Awaited<ReturnType<typeof connectControl>>, flags: StatusFlags): Promise<void> {
  const tty = process.stdout.isTTY === true && !flags.json;
  let previous: StatusReport | undefined;
  for (let frame = 1; flags.count === undefined || frame <= flags.count; frame++) {
    if (frame > 1) await new Promise((r) => setTimeout(r, flags.interval * 1000));
    const report = await client.status();
    if (flags.json) process.stdout.write(`${JSON.stringify(report)}\n`);
    else process.stdout.write(`${tty ? CLEAR : frame > 1 ? '\n' : ''}${new Date().toISOString()}\n${formatStatus(report, previous)}`);
    previous = report;
  }
}

export function statusCommand(): Command {
  return new Command('status')
    .description('show exports (write-back error state, live counts, sessions with an error pending) and gates of a running server')
    .option('--control <path>', 'control socket of blockgate serve (default: $XDG_RUNTIME_DIR/blockgate/ctl.sock or /tmp/blockgate-<uid>/ctl.sock)')
    .option('--json', 'print the report as JSON (with --watch: one object a line)')
    .option('-w, --watch', 'ask again every interval and show the rates since the last frame (redrawn in place on a terminal)')
    .option('--interval <seconds>', `seconds between --watch frames (at least ${MIN_INTERVAL_S})`, parseInterval, DEFAULT_INTERVAL_S)
    .option('--count <n>', 'with --watch: stop after N frames', parseCount)
    .action(async (flags: StatusFlags) => {
      const path = flags.control ?? defaultControlPath();
      try {
        const client = await connectControl(path);
        try {
          if (flags.watch) await watch(client, flags);
          else {
            const report = await client.status();
            process.stdout.write(flags.json ? `${JSON.stringify(report, null, 2)}\n` : formatStatus(report));
          }
        } finally {
          await client.close().catch(() => undefined);
        }
      } catch (e) {
        const b = toBlockError(e);
        process.stderr.write(`blockgate status: ${b.message} (${b.code})\n`);
        process.exitCode = 1;
      }
    });
}
