/**
 * `blockgate info URI`: what nbdinfo prints about an NBD export: protocol, TLS and reply
 * mode, export name, description, size, the transmission flags (`is_read_only`,
 * `can_flush`, ...), block sizes and metadata contexts; `--json` with nbdinfo's keys;
 * `--list` for every export the server lists; `--map` for the extents (as `blockgate
 * map`); `--size` for the size alone; `--can WHAT` and `--is WHAT` as exit codes (0 yes,
 * 2 no, 1 error), as nbdinfo does.
 *
 * Differences from nbdinfo: the contexts shown are those selected (base:allocation and
 * any `--context`), not every context the server offers; there is no `content:` line
 * (nbdinfo runs file(1) on the first sector); the protocol is always `newstyle-fixed`
 * (NbdClient does not tell fixed from plain newstyle, which no current server speaks).
 */
import { Command, Option } from 'commander';
import { BlockError } from '../errors/index.js';
import { BASE_ALLOCATION } from '../nbd/constants.js';
import { NbdClient } from '../nbd/client.js';
import { formatNbdUri, parseNbdUri, type NbdUri } from '../nbd/uri.js';
import { bufferedStdout, fail, printMap, withClient } from './map.js';

interface InfoFlags {
  json?: boolean;
  list?: boolean;
  map?: boolean;
  totals?: boolean;
  raw?: boolean;
  size?: boolean;
  can?: string;
  is?: string;
  context?: string[];
}

/** libnbd's human_size: a suffix only when the size is an exact multiple of it. */
export function humanSize(bytes: number): { text: string; human: boolean } {
  const ext = ['E', 'P', 'T', 'G', 'M', 'K', ''];
  let i = 6;
  let b = bytes;
  if (b !== 0) {
    while (b % 1024 === 0 && i > 0) {
      b /= 1024;
      i--;
    }
  }
  return { text: `${b}${ext[i]}`, human: ext[i] !== '' };
}

/** The flags nbdinfo prints, in its order. */
function flagFields(c: NbdClient): [string, boolean][] {
  return [
    ['is_rotational', c.rotational],
    ['is_read_only', c.readOnly],
    ['can_cache', c.canCache],
    ['can_df', c.canDf],
    ['can_fast_zero', c.canFastZero],
    ['can_flush', c.canFlush],
    ['can_fua', c.canFua],
    ['can_multi_conn', c.canMultiConn],
    ['can_trim', c.canTrim],
    ['can_zero', c.canZero],
  ];
}

/** NbdClient does not say whether the server was fixed newstyle; every server it meets in practice is. */
function protocolName(_c: NbdClient): string {
  return 'newstyle-fixed';
}

function protocolLine(c: NbdClient): string {
  const tls = c.tls ? `with TLS (${c.tls.protocol}, ${c.tls.cipher})` : 'without TLS';
  const mode = c.mode === 'extended' ? 'using extended headers' : c.mode === 'structured' ? 'using structured packets' : 'using simple packets';
  return `protocol: ${protocolName(c)} ${tls}, ${mode}\n`;
}

function exportUri(base: NbdUri, name: string): string {
  try {
    return formatNbdUri({ ...base, exportName: name });
  } catch {
    return '';
  }
}

/** The text block of one export (nbdinfo's layout, tab-indented). */
export function exportText(c: NbdClient, uri: string): string {
  const out: string[] = [`export=${JSON.stringify(c.exportName)}:`];
  if (c.description) out.push(`\tdescription: ${c.description}`);
  const h = humanSize(c.size);
  out.push(`\texport-size: ${c.size}${h.human ? ` (${h.text})` : ''}`);
  if (uri) out.push(`\turi: ${uri}`);
  out.push('\tcontexts:', ...c.contexts.map((x) => `\t\t${x}`));
  for (const [k, v] of flagFields(c)) out.push(`\t${k}: ${v}`);
  if (c.blockSize) {
    out.push(`\tblock_size_minimum: ${c.blockSize.minimum}`, `\tblock_size_preferred: ${c.blockSize.preferred}`, `\tblock_size_maximum: ${c.blockSize.maximum}`);
  }
  return `${out.join('\n')}\n`;
}

/** One export as JSON (nbdinfo's keys, plus `mode`, `extended` and `tls`). */
export function exportJson(c: NbdClient, uri: string): Record<string, unknown> {
  const o: Record<string, unknown> = { 'export-name': c.exportName };
  if (c.description) o.description = c.description;
  if (uri) o.uri = uri;
  o.contexts = [...c.contexts];
  for (const [k, v] of flagFields(c)) o[k] = v;
  if (c.blockSize) {
    o.block_size_minimum = c.blockSize.minimum;
    o.block_size_preferred = c.blockSize.preferred;
    o.block_size_maximum = c.blockSize.maximum;
  }
  o['export-size'] = c.size;
  o['export-size-str'] = humanSize(c.size).text;
  return o;
}

function headerJson(c: NbdClient): Record<string, unknown> {
  return {
    protocol: protocolName(c),
    TLS: c.tls !== null,
    ...(c.tls ? { 'tls-protocol': c.tls.protocol, 'tls-cipher': c.tls.cipher } : {}),
    structured: c.mode !== 'simple',
    extended: c.mode === 'extended',
    mode: c.mode,
  };
}

const CAN: Record<string, (c: NbdClient) => boolean> = {
  connect: () => true,
  cache: (c) => c.canCache,
  df: (c) => c.canDf,
  'fast-zero': (c) => c.canFastZero,
  flush: (c) => c.canFlush,
  fua: (c) => c.canFua,
  'multi-conn': (c) => c.canMultiConn,
  trim: (c) => c.canTrim,
  zero: (c) => c.canZero,
  'block-status': (c) => c.canBlockStatus(BASE_ALLOCATION),
  'structured-reply': (c) => c.mode !== 'simple',
  'extended-headers': (c) => c.mode === 'extended',
};
const IS: Record<string, (c: NbdClient) => boolean> = {
  'read-only': (c) => c.readOnly,
  rotational: (c) => c.rotational,
  tls: (c) => c.tls !== null,
};

function predicate(table: Record<string, (c: NbdClient) => boolean>, what: string, opt: string): (c: NbdClient) => boolean {
  const f = table[what.toLowerCase().replace(/_/g, '-')];
  if (!f) throw new BlockError('EINVAL', `unknown --${opt} option: ${what} (one of: ${Object.keys(table).join(', ')})`);
  return f;
}

async function runInfo(uriText: string, flags: InfoFlags): Promise<void> {
  const uri = parseNbdUri(uriText);
  const contexts = [BASE_ALLOCATION, ...(flags.context ?? []).filter((x) => x !== BASE_ALLOCATION)];
  const out = bufferedStdout();
  if (flags.can !== undefined || flags.is !== undefined) {
    const test = flags.can !== undefined ? predicate(CAN, flags.can, 'can') : predicate(IS, flags.is!, 'is');
    const yes = await withClient(uriText, contexts, async (c) => test(c));
    process.exitCode = yes ? 0 : 2;
    return;
  }
  if (flags.list) {
    const listed = await NbdClient.list(uri);
    const texts: string[] = [];
    const jsons: Record<string, unknown>[] = [];
    let header: Record<string, unknown> | null = null;
    for (const e of listed) {
      const u = exportUri(uri, e.name);
      try {
        await withClient(uriText, contexts, async (c) => {
          header ??= headerJson(c);
          if (texts.length === 0) texts.push(protocolLine(c));
          texts.push(exportText(c, u));
          jsons.push(exportJson(c, u));
        }, e.name);
      } catch (err) {
        // Listed but not openable (a policy, TLS): what the list said.
        const msg = err instanceof Error ? err.message : String(err);
        texts.push(`export=${JSON.stringify(e.name)}:\n${e.description ? `\tdescription: ${e.description}\n` : ''}${e.size !== null ? `\texport-size: ${e.size}\n` : ''}\terror: ${msg}\n`);
        jsons.push({ 'export-name': e.name, ...(e.description ? { description: e.description } : {}), ...(u ? { uri: u } : {}), ...(e.size !== null ? { 'export-size': e.size } : {}), error: msg });
      }
    }
    if (flags.json) out.write(`${JSON.stringify({ ...(header ?? { protocol: 'newstyle-fixed', TLS: uri.tls }), exports: jsons }, null, 2)}\n`);
    else out.write(texts.join(''));
    await out.end();
    return;
  }
  await withClient(uriText, flags.map && flags.context?.length ? flags.context : contexts, async (c) => {
    if (flags.size) out.write(`${c.size}\n`);
    else if (flags.map) await printMap(c, { context: flags.context?.[0] ?? BASE_ALLOCATION, json: flags.json ?? false, totals: flags.totals ?? false, raw: flags.raw ?? false }, out.write);
    else {
      const u = exportUri(uri, c.exportName === '' ? uri.exportName : c.exportName);
      if (flags.json) out.write(`${JSON.stringify({ ...headerJson(c), exports: [exportJson(c, u)] }, null, 2)}\n`);
      else out.write(protocolLine(c) + exportText(c, u));
    }
  });
  await out.end();
}

function collect(v: string, prev: string[] | undefined): string[] {
  return [...(prev ?? []), v];
}

export function infoCommand(): Command {
  return new Command('info')
    .description('show information about an NBD export (as nbdinfo)')
    .argument('<uri>', 'NBD URI of the export (of the server, with --list)')
    .option('--json', 'print JSON (nbdinfo --json keys)')
    .option('-L, --list', 'every export the server lists')
    .option('--map', 'print the extents of base:allocation (or --context) instead, as blockgate map')
    .option('--totals', 'with --map: bytes per type')
    .option('--raw', 'with --map: do not merge adjacent extents of the same type')
    .option('--size', 'print the size in bytes only')
    .addOption(new Option('--can <what>', 'exit 0 if the export can WHAT, 2 if not: connect, cache, df, fast-zero, flush, fua, multi-conn, trim, zero, block-status, structured-reply, extended-headers').conflicts(['is', 'map', 'size', 'list']))
    .addOption(new Option('--is <what>', 'exit 0 if the export is WHAT, 2 if not: read-only, rotational, tls').conflicts(['map', 'size', 'list']))
    .option('--context <name>', 'also select this metadata context (repeatable); with --map: the context mapped', collect)
    .addHelpText(
      'after',
      `
Exit status: 0; 1 on error; with --can or --is, 0 (yes), 2 (no) or 1 (error).

Examples:
  blockgate info nbd://localhost/disk
  blockgate info --json 'nbd+unix:///?socket=/tmp/nbd.sock'
  blockgate info --list nbd://localhost
  blockgate info --can flush nbd://localhost && echo can flush`,
    )
    .action(async (uri: string, flags: InfoFlags) => {
      try {
        await runInfo(uri, flags);
      } catch (e) {
        fail('info', e);
      }
    });
}
