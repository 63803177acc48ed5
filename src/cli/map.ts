/**
 * `blockgate map URI`: the extents of a metadata context (default base:allocation), as
 * `nbdinfo --map` prints them: `offset length type description` columns, or `--json`
 * (the same array nbdinfo prints), or `--totals` (bytes and percentage per type).
 * Adjacent extents of the same type are merged, as nbdinfo does; `--raw` prints them as
 * the server sent them. `blockgate info --map` is the same report.
 */
import { Command } from 'commander';
import { BlockError, toBlockError } from '../errors/index.js';
import { BASE_ALLOCATION } from '../nbd/constants.js';
import { NbdClient, MAX_EFFECT_LENGTH } from '../nbd/client.js';

export interface MapFlags {
  context?: string;
  json?: boolean;
  totals?: boolean;
  raw?: boolean;
}

/** One row of the map. */
export interface MapEntry {
  offset: number;
  length: number;
  type: number;
}

/** What a type means in a context (nbdinfo's words), or null if it does not know the context. */
export function extentDescription(context: string, type: number): string | null {
  if (context === BASE_ALLOCATION) {
    switch (type) {
      case 0:
        return 'data';
      case 1:
        return 'hole';
      case 2:
        return 'zero';
      case 3:
        return 'hole,zero';
      default:
        return null;
    }
  }
  if (context.startsWith('qemu:dirty-bitmap:')) return type === 0 ? 'clean' : type === 1 ? 'dirty' : null;
  if (context === 'qemu:allocation-depth') return type === 0 ? 'absent' : type === 1 ? 'local' : `backing depth ${type}`;
  return null;
}

/** Walks the whole map of `context`, calling `each` in order (merged unless `raw`). */
export async function walkMap(client: NbdClient, context: string, raw: boolean, each: (e: MapEntry) => void): Promise<void> {
  const size = client.size;
  let pending: MapEntry | null = null;
  let pos = 0;
  while (pos < size) {
    const extents = await client.blockStatus(pos, Math.min(size - pos, MAX_EFFECT_LENGTH), { context });
    const from = pos;
    for (const e of extents) {
      if (pos >= size) break;
      const length = Math.min(e.length, size - pos);
      if (length <= 0) continue;
      if (pending && !raw && pending.type === e.flags) pending.length += length;
      else {
        if (pending) each(pending);
        pending = { offset: pos, length, type: e.flags };
      }
      pos += length;
    }
    if (pos === from) throw new BlockError('EPROTO', `the server described no extents at offset ${pos}`);
  }
  if (pending) each(pending);
}

/** nbdinfo's text row: `%10d  %10d  %3d  description`. */
export function mapLine(e: MapEntry, context: string): string {
  const d = extentDescription(context, e.type);
  return `${String(e.offset).padStart(10)}  ${String(e.length).padStart(10)}  ${String(e.type).padStart(3)}${d !== null ? `  ${d}` : ''}\n`;
}

function jsonEntry(e: MapEntry, context: string): string {
  const d = extentDescription(context, e.type);
  return `{ "offset": ${e.offset}, "length": ${e.length}, "type": ${e.type}${d !== null ? `, "description": ${JSON.stringify(d)}` : ''}}`;
}

/** %g as C prints it (6 significant digits, no trailing zeros). */
function g6(x: number): string {
  return String(Number(x.toPrecision(6)));
}

/** Prints the map of `client` on stdout. */
export async function printMap(client: NbdClient, flags: MapFlags, out: (s: string) => void): Promise<void> {
  const context = flags.context ?? BASE_ALLOCATION;
  if (!client.canBlockStatus(context)) throw new BlockError('EOPNOTSUPP', `the server does not support metadata context "${context}"`);
  if (flags.totals) {
    const totals = new Map<number, number>();
    await walkMap(client, context, true, (e) => totals.set(e.type, (totals.get(e.type) ?? 0) + e.length));
    const rows = [...totals.entries()].sort((a, b) => a[0] - b[0]);
    const size = client.size;
    if (flags.json) {
      const items = rows.map(([type, n]) => {
        const d = extentDescription(context, type);
        return `{ "size": ${n}, "percent": ${g6((100 * n) / size)}, "type": ${type}${d !== null ? `, "description": ${JSON.stringify(d)}` : ''} }`;
      });
      out(`[\n${items.join(',\n')}${items.length ? '\n' : ''}]\n`);
    } else {
      for (const [type, n] of rows) {
        const d = extentDescription(context, type);
        out(`${String(n).padStart(10)} ${((100 * n) / size).toFixed(1).padStart(5)}% ${String(type).padStart(3)}${d !== null ? ` ${d}` : ''}\n`);
      }
    }
    return;
  }
  if (flags.json) {
    let first = true;
    out('[\n');
    await walkMap(client, context, flags.raw ?? false, (e) => {
      out(`${first ? '' : ',\n'}${jsonEntry(e, context)}`);
      first = false;
    });
    out(`${first ? '' : '\n'}]\n`);
    return;
  }
  await walkMap(client, context, flags.raw ?? false, (e) => out(mapLine(e, context)));
}

/** Buffers stdout writes into fewer, larger ones. */
export function bufferedStdout(): { write: (s: string) => void; end: () => Promise<void> } {
  let buf: string[] = [];
  let n = 0;
  const flush = () => {
    if (buf.length === 0) return;
    process.stdout.write(buf.join(''));
    buf = [];
    n = 0;
  };
  return {
    write(s) {
      buf.push(s);
      n += s.length;
      if (n > 64 * 1024) flush();
    },
    end: () => {
      flush();
      return new Promise<void>((r) => process.stdout.write('', () => r()));
    },
  };
}

export function mapCommand(): Command {
  return new Command('map')
    .description('print the extents (allocation map) of an NBD export, as nbdinfo --map')
    .argument('<uri>', 'NBD URI of the export')
    .option('--context <name>', 'metadata context to map', BASE_ALLOCATION)
    .option('--json', 'print the extents as JSON (the array nbdinfo --map --json prints)')
    .option('--totals', 'print the bytes of each type instead of the extents (nbdinfo --map --totals)')
    .option('--raw', 'do not merge adjacent extents of the same type')
    .addHelpText(
      'after',
      `
Columns: offset, length, type (the context's flags; base:allocation: 0 data, 1 hole, 2 zero,
3 hole,zero) and its meaning. Exit status: 0, or 1 on error.

Examples:
  blockgate map nbd://localhost/disk
  blockgate map --json 'nbd+unix:///?socket=/tmp/nbd.sock'
  blockgate map --totals nbd://localhost/`,
    )
    .action(async (uri: string, flags: MapFlags) => {
      try {
        const out = bufferedStdout();
        await withClient(uri, [flags.context ?? BASE_ALLOCATION], (c) => printMap(c, flags, out.write));
        await out.end();
      } catch (e) {
        fail('map', e);
      }
    });
}

/** Connects, runs `fn`, and disconnects. */
export async function withClient<T>(uri: string, contexts: readonly string[], fn: (c: NbdClient) => Promise<T>, exportName?: string): Promise<T> {
  const client = await NbdClient.connect(uri, { metaContexts: contexts, ...(exportName !== undefined ? { exportName } : {}) });
  try {
    return await fn(client);
  } finally {
    await client.close().catch(() => undefined);
  }
}

/** The CLI's error line: `blockgate CMD: message (ERRNO)`, exit 1. */
export function fail(cmd: string, e: unknown): void {
  const b = toBlockError(e);
  process.stderr.write(`blockgate ${cmd}: ${b.message} (${b.code})\n`);
  process.exitCode = 1;
}
