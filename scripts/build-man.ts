/**
 * Builds blockgate's man pages (`npm run build:man`, part of `npm run build`):
 *
 * - the hand-written pages, docs/man/NAME.SECTION.md, with their generated parts filled
 *   in: an HTML comment `<!-- generated: WHAT -->` on a line of its own is replaced by
 *   the text WHAT names, read from the commands themselves (commander's own option,
 *   argument and subcommand descriptions), so a page cannot miss an option the command has:
 *     `options CMD`      CMD's options (CMD: a subcommand, or `SUB CMD` nested)
 *     `arguments CMD`    CMD's arguments
 *     `subcommands CMD`  each subcommand of CMD with its arguments and options
 *     `commands`         blockgate's subcommands with their man pages
 *     `layer-pages`      the backend and filter pages
 * - one page per built-in backend and filter, blockgate-NAME-backend(1) and
 *   blockgate-NAME-filter(1), generated from the same settings schemas `blockgate plugins`
 *   lists (src/cli/plugins.ts), with the layer's description taken from its row in the
 *   backend and filter tables of docs/CONFIG.md.
 *
 * Every page is converted from Markdown to roff by marked-man and written to OUTDIR
 * (default dist/man) as NAME.SECTION, the names package.json's `man` field lists, so that
 * `npm install -g` puts them under PREFIX/share/man/manSECTION.
 *
 *   node --import tsx scripts/build-man.ts [OUTDIR]
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Command } from 'commander';
import { serveCommand } from '../src/cli/serve.js';
import { ggatedCommand } from '../src/cli/ggated.js';
import { ggatelCommand } from '../src/cli/ggatel.js';
import { ggatecCommand } from '../src/cli/ggatec.js';
import { statusCommand } from '../src/cli/status.js';
import { infoCommand } from '../src/cli/info.js';
import { mapCommand } from '../src/cli/map.js';
import { copyCommand } from '../src/cli/copy.js';
import { s3Command } from '../src/cli/s3.js';
import { pluginsCommand, builtinLayers, type LayerInfo } from '../src/cli/plugins.js';
import { rbdCommand } from '../src/cli/rbd.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/** The hand-written pages. */
export const MAN_SOURCES = path.join(ROOT, 'docs/man');
const MARKED_MAN = path.join(ROOT, 'node_modules/.bin/marked-man');
/** The manual name marked-man puts in every page's header. */
const MANUAL = 'blockgate';
/** How long one marked-man conversion may take. */
const CONVERT_TIMEOUT_MS = 30_000;

/** One man page: its file name (`blockgate-serve.1`) and its Markdown. */
export interface ManPage {
  readonly file: string;
  readonly markdown: string;
}

/** Every subcommand of `blockgate`, as the real commands (no stand-ins: the pages describe them in full). */
function subcommands(): Command[] {
  return [serveCommand(), ggatedCommand(), ggatelCommand(), ggatecCommand(), statusCommand(), infoCommand(), mapCommand(), copyCommand(), rbdCommand(), s3Command(), pluginsCommand()];
}

/** The man page of each subcommand that has one (the others are described in blockgate(1)). */
const SUBCOMMAND_PAGES: Readonly<Record<string, string>> = {
  serve: 'blockgate-serve(1)',
  ggated: 'blockgate-ggated(8)',
  ggatel: 'blockgate-ggatel(8)',
  ggatec: 'blockgate-ggatec(8)',
  s3: 'blockgate-s3(1)',
};

/** Text put into Markdown as it is: every character Markdown could read as markup is escaped. */
export function md(text: string): string {
  return text.replace(/[\\`*_<>[\]#|{}]/g, '\\$&');
}

/** A command found by its path of names from `blockgate` (`['ggatel', 'create']`). */
function commandAt(names: readonly string[]): Command {
  let list = subcommands();
  let found: Command | undefined;
  for (const n of names) {
    found = list.find((c) => c.name() === n);
    if (!found) throw new Error(`build-man: no command 'blockgate ${names.join(' ')}'`);
    list = found.commands as Command[];
  }
  if (!found) throw new Error('build-man: an empty command path');
  return found;
}

/** A definition list item: the term in bold code, the description indented under it. */
function item(term: string, description: string): string {
  return `* \`${term}\`:\n  ${md(description.replace(/\s+/g, ' ').trim())}`;
}

function optionsOf(cmd: Command): string {
  const help = cmd.createHelp();
  return help.visibleOptions(cmd).map((o) => item(help.optionTerm(o), help.optionDescription(o))).join('\n');
}

function argumentsOf(cmd: Command): string {
  const help = cmd.createHelp();
  const args = help.visibleArguments(cmd);
  if (args.length === 0) return '(none)';
  return args.map((a) => item(help.argumentTerm(a), help.argumentDescription(a))).join('\n');
}

/** The command's usage after its own name (`[options] <path>`). */
function usageOf(cmd: Command): string {
  return cmd.usage();
}

function subcommandsOf(cmd: Command): string {
  return (cmd.commands as Command[])
    .filter((c) => c.name() !== 'help')
    .map((c) => {
      const parts = [`### ${md(`${cmd.name()} ${c.name()} ${usageOf(c)}`)}`, '', md(c.description())];
      if (c.registeredArguments.length > 0) parts.push('', 'Arguments:', '', argumentsOf(c));
      parts.push('', 'Options:', '', optionsOf(c));
      return parts.join('\n');
    })
    .join('\n\n');
}

function commandsList(): string {
  return subcommands()
    .map((c) => item(`${c.name()} ${usageOf(c)}`, `${c.description()}${SUBCOMMAND_PAGES[c.name()] ? `; see ${SUBCOMMAND_PAGES[c.name()]}` : ''}`))
    .join('\n');
}

/** A layer's man page name, without the section. */
export function layerPageName(l: Pick<LayerInfo, 'kind' | 'name'>): string {
  return `blockgate-${l.name}-${l.kind}`;
}

function layerPagesList(): string {
  return builtinLayers()
    .map((l) => `${layerPageName(l)}(1)`)
    .join(', ');
}

/** Fills the `<!-- generated: WHAT -->` lines of a hand-written page. */
export function fillGenerated(markdown: string, file: string): string {
  return markdown.replace(/^<!-- generated: ([\w -]+?) -->$/gm, (_all, what: string) => {
    const [kind, ...names] = what.split(' ');
    switch (kind) {
      case 'options':
        return optionsOf(commandAt(names));
      case 'arguments':
        return argumentsOf(commandAt(names));
      case 'subcommands':
        return subcommandsOf(commandAt(names));
      case 'commands':
        return commandsList();
      case 'layer-pages':
        return layerPagesList();
      default:
        throw new Error(`build-man: ${file}: unknown generated part '${what}'`);
    }
  });
}

/**
 * The description of each built-in backend and filter: the second cell of its row in the
 * backend and filter tables of docs/CONFIG.md (`| \`memory\` | ... |`), one source for both.
 */
export function layerDescriptions(): { backend: Map<string, string>; filter: Map<string, string> } {
  const lines = fs.readFileSync(path.join(ROOT, 'docs/CONFIG.md'), 'utf8').split('\n');
  /** The rows of the table that follows the line `caption`. */
  const table = (caption: string): Map<string, string> => {
    const start = lines.indexOf(caption);
    if (start < 0) throw new Error(`build-man: docs/CONFIG.md has no line '${caption}' before its table`);
    const rows = new Map<string, string>();
    let inTable = false;
    for (const line of lines.slice(start + 1)) {
      if (line.startsWith('|')) inTable = true;
      else if (inTable || line.trim() !== '') break;
      const m = /^\|\s*`([\w-]+)`\s*\|(.*)\|\s*$/.exec(line);
      if (m) rows.set(m[1]!, m[2]!.trim());
    }
    return rows;
  };
  return { backend: table('Backends:'), filter: table('Filters:') };
}

function formatDefault(value: unknown): string {
  return typeof value === 'string' ? value : JSON.stringify(value);
}

/** The generated page of one built-in layer. */
export function layerPage(l: LayerInfo, description: string | undefined): ManPage {
  const name = layerPageName(l);
  if (description === undefined) throw new Error(`build-man: the ${l.kind} '${l.name}' has no row in docs/CONFIG.md's ${l.kind} table`);
  if (!l.settings) throw new Error(`build-man: the ${l.kind} '${l.name}' has no settings schema`);
  const synopsis =
    l.kind === 'filter'
      ? [
          `\`blockgate serve --filter ${l.name}${l.settings.length ? `:KEY=VALUE,...` : ''}\` EXPORT...`,
          '',
          `In a config file: \`"filters": [{ "type": "${l.name}"${l.settings.length ? ', KEY: VALUE, ...' : ''} }]\``,
        ]
      : [`In a config file: \`"backend": { "type": "${l.name}"${l.settings.length ? ', KEY: VALUE, ...' : ''} }\``, '', 'On the command line: the EXPORT forms of blockgate-serve(1).'];
  const settings =
    l.settings.length === 0
      ? ['(none)']
      : l.settings.map((s) => {
          const state = s.required ? 'required' : 'default' in s ? `default ${formatDefault(s.default)}` : 'optional';
          return item(s.key, `${s.type}, ${state}${s.doc ? `. ${s.doc}` : ''}`);
        });
  const markdown = [
    `# ${name}(1) -- the ${l.name} ${l.kind} of blockgate serve`,
    '',
    '## SYNOPSIS',
    '',
    ...synopsis,
    '',
    '## DESCRIPTION',
    '',
    // The CONFIG.md cell is Markdown already (code spans, links to other docs).
    description,
    '',
    '## SETTINGS',
    '',
    'As `blockgate plugins` lists them, from the settings schema the layer checks its settings with. On the command line, values are converted to what a key expects (`true`/`false`, numbers, `a+b` for lists).',
    '',
    ...settings,
    '',
    '## SEE ALSO',
    '',
    'blockgate-serve(1), blockgate(1); docs/CONFIG.md and docs/PLUGINS.md in the package.',
    '',
  ].join('\n');
  return { file: `${name}.1`, markdown };
}

/** Every page: the hand-written ones (filled in), then one per built-in backend and filter. */
export function manPages(): ManPage[] {
  const hand = fs
    .readdirSync(MAN_SOURCES)
    .filter((f) => /\.\d\.md$/.test(f))
    .sort()
    .map((f) => ({ file: f.replace(/\.md$/, ''), markdown: fillGenerated(fs.readFileSync(path.join(MAN_SOURCES, f), 'utf8'), f) }));
  const descriptions = layerDescriptions();
  const layers = builtinLayers().map((l) => layerPage(l, descriptions[l.kind].get(l.name)));
  return [...hand, ...layers];
}

/** The package version, for the pages' footer. */
function version(): string {
  return (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
}

/** Converts one page to roff with marked-man. */
export function toRoff(page: ManPage): string {
  const r = spawnSync(MARKED_MAN, ['--version', version(), '--manual', MANUAL], {
    input: page.markdown,
    encoding: 'utf8',
    timeout: CONVERT_TIMEOUT_MS,
    killSignal: 'SIGKILL',
  });
  if (r.error) throw new Error(`build-man: marked-man for ${page.file}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`build-man: marked-man for ${page.file} exited ${r.status ?? r.signal}: ${r.stderr}`);
  return decodeEntities(r.stdout);
}

/** HTML entities and the characters they stand for. */
const ENTITIES: Readonly<Record<string, string>> = { '&quot;': '"', '&#39;': "'", '&lt;': '<', '&gt;': '>', '&amp;': '&' };

/**
 * marked-man 2.1.1 writes a code span's quotes, apostrophes and angle brackets as the
 * HTML entities marked escapes them to (`&quot;`), which roff prints as they are; no
 * page's text holds an entity of its own, so every one is put back.
 */
function decodeEntities(roff: string): string {
  return roff.replace(/&(?:quot|#39|lt|gt|amp);/g, (e) => ENTITIES[e]!);
}

/** Writes every page's roff into `outDir` (emptied first, so no page of a removed layer stays); returns the file names. */
export function buildMan(outDir: string): string[] {
  const pages = manPages();
  fs.rmSync(outDir, { recursive: true, force: true });
  fs.mkdirSync(outDir, { recursive: true });
  for (const p of pages) fs.writeFileSync(path.join(outDir, p.file), toRoff(p));
  return pages.map((p) => p.file);
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  const out = path.resolve(process.argv[2] ?? path.join(ROOT, 'dist/man'));
  const files = buildMan(out);
  process.stderr.write(`build-man: ${files.length} pages in ${path.relative(process.cwd(), out) || '.'}\n`);
}
