/**
 * `blockgate status [--control PATH] [--json]`: what a running `blockgate serve` holds,
 * read over its control socket: every export with its write-back error state (the
 * errseq word: last error, SEEN, counter) and, per attached session, whether its next
 * FLUSH will report an error; then every gate.
 *
 * Looking never changes what a client will see: the server peeks at the errseq word and
 * compares each session's cursor with the SEEN flag masked; nothing is marked seen and
 * no cursor moves.
 */
import { Command } from 'commander';
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

/** One line per operation that has run: count, bytes, errors, latency percentiles. */
function statsLines(st: LiveStats): string[] {
  const lines: string[] = [];
  for (const [op, f] of Object.entries(st.ops)) {
    if (f.count === 0) continue;
    const bytes = f.bytes > 0 ? `, ${formatSize(f.bytes)}` : '';
    lines.push(`  ${op}: ${f.count} ops${bytes}, ${f.errors} errors, p50 ${f.p50Us} µs, p99 ${f.p99Us} µs`);
  }
  return lines.length > 0 ? [`  stats over ${st.elapsed.toFixed(1)} s:`, ...lines.map((l) => `  ${l}`)] : [`  stats over ${st.elapsed.toFixed(1)} s: no requests`];
}

/** The human form of a status report. */
export function formatStatus(r: StatusReport): string {
  const out: string[] = [];
  for (const e of r.exports) {
    const name = e.name === '' ? "'' (default)" : e.name;
    const gate = e.gate !== undefined ? `, gate unit ${e.gate}` : '';
    out.push(`export ${name}: ${e.description}, ${formatSize(e.size)}, ${e.readOnly ? 'read-only' : 'read-write'}${gate}`);
    out.push(`  ${errseqText(e.errseq)}`);
    if (e.stats) out.push(...statsLines(e.stats));
    if (e.sessions.length === 0) out.push('  no sessions');
    for (const s of e.sessions) {
      out.push(`  session ${s.id} (${s.peer}${s.security ? `, ${s.security}` : ''}): ${s.errorPending ? 'ERROR PENDING (its next flush reports it)' : 'no error pending'}`);
    }
  }
  if (r.gates.length === 0) out.push('no gates');
  for (const g of r.gates) out.push('', formatGateVerbose(g).trimEnd());
  return `${out.join('\n')}\n`;
}

export function statusCommand(): Command {
  return new Command('status')
    .description('show exports (write-back error state, sessions with an error pending) and gates of a running server')
    .option('--control <path>', 'control socket of blockgate serve (default: $XDG_RUNTIME_DIR/blockgate/ctl.sock or /tmp/blockgate-<uid>/ctl.sock)')
    .option('--json', 'print the report as JSON')
    .action(async (flags: { control?: string; json?: boolean }) => {
      const path = flags.control ?? defaultControlPath();
      try {
        const client = await connectControl(path);
        try {
          const report = await client.status();
          process.stdout.write(flags.json ? `${JSON.stringify(report, null, 2)}\n` : formatStatus(report));
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
