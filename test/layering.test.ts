/**
 * The layering of src/, as docs/ARCHITECTURE.md draws it, checked against the code: every
 * import between folders must be an edge of the table in the "Layers and what they may
 * import" section, no module may import itself back through others (no cycles), and no
 * module may load another module of src/ without the check seeing the edge.
 *
 * Dynamic imports of a literal specifier are how a command loads only what it needs
 * (src/cli/main.ts loads each subcommand module only when it runs; serve loads the control
 * server only when it opens a control socket): loading everything up front was most of
 * the start-up time (docs/PERFORMANCE.md). They hide nothing, because a literal specifier
 * is counted as an edge like a static import, so the table and cycle checks see it.
 *
 * Loading a user's plugin by the path given on the command line or in a config file needs
 * a dynamic import of a computed specifier; this check cannot follow it, so it is kept to
 * the one module that loads plugins (src/cli/plugin-loader.ts), and a computed import
 * anywhere else fails here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';

const ROOT = path.resolve(import.meta.dirname, '..');
const SRC = path.join(ROOT, 'src');

/** Parses the table: `| \`folder\` | \`a\`, \`b\` |` rows under the section heading. */
function allowedEdges(): Map<string, Set<string>> {
  const doc = fs.readFileSync(path.join(ROOT, 'docs/ARCHITECTURE.md'), 'utf8');
  const start = doc.indexOf('## Layers and what they may import');
  assert.ok(start >= 0, 'docs/ARCHITECTURE.md has no "Layers and what they may import" section');
  const section = doc.slice(start).split('\n## ')[0]!;
  const table = new Map<string, Set<string>>();
  for (const line of section.split('\n')) {
    const m = /^\|\s*`([^`]+)`\s*\|([^|]*)\|/.exec(line);
    if (!m) continue;
    const targets = [...m[2]!.matchAll(/`([^`]+)`/g)].map((t) => t[1]!);
    table.set(m[1]!, new Set(targets));
  }
  assert.ok(table.size > 0, 'the layering table is empty');
  return table;
}

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? sourceFiles(p) : p.endsWith('.ts') ? [p] : [];
  });
}

/** The layer of a module: its first folder under src/, or `index.ts` for the package's entry. */
function layerOf(file: string): string {
  const rel = path.relative(SRC, file).split(path.sep);
  return rel.length === 1 ? rel[0]! : rel[0]!;
}

const STATIC = /(?:^|\n)\s*(?:import|export)\s[^;]*?\sfrom\s*['"]([^'"]+)['"]/g;
const SIDE_EFFECT = /(?:^|\n)\s*import\s*['"]([^'"]+)['"]/g;
const DYNAMIC = /\bimport\s*\(/;
/** The one module allowed a dynamic import of a computed specifier (the user's plugin path). */
const PLUGIN_LOADER = 'src/cli/plugin-loader.ts';
/** The module that loads the subcommands lazily. */
const LAZY_MAIN = 'src/cli/main.ts';
/** Every dynamic import of a string literal, with its specifier. */
const DYNAMIC_SPEC = /\bimport\s*\(\s*(['"`])([^'"`$]*)\1\s*\)/g;

/** The relative specifiers of a file's literal dynamic imports: edges like static imports. */
function lazyImports(text: string): string[] {
  return [...text.matchAll(DYNAMIC_SPEC)].map((m) => m[2]!).filter((s) => s.startsWith('.'));
}

/** The text left once the literal dynamic imports (counted as edges) are taken out. */
function withoutLiteralImports(text: string): string {
  return text.replace(DYNAMIC_SPEC, '');
}

function importsOf(file: string): string[] {
  const text = fs.readFileSync(file, 'utf8');
  const specs = [...text.matchAll(STATIC), ...text.matchAll(SIDE_EFFECT)].map((m) => m[1]!);
  specs.push(...lazyImports(text));
  return specs
    .filter((s) => s.startsWith('.'))
    .map((s) => path.resolve(path.dirname(file), s).replace(/\.js$/, '.ts'));
}

const files = sourceFiles(SRC);

test('every import between folders of src/ is an edge of the documented layering table', () => {
  const table = allowedEdges();
  const bad: string[] = [];
  for (const f of files) {
    const from = layerOf(f);
    const allowed = table.get(from);
    if (!allowed) {
      bad.push(`${path.relative(ROOT, f)}: folder '${from}' is not in the table`);
      continue;
    }
    for (const target of importsOf(f)) {
      const to = layerOf(target);
      if (to !== from && !allowed.has(to) && !allowed.has('*')) {
        bad.push(`${path.relative(ROOT, f)} imports ${path.relative(ROOT, target)} (${from} -> ${to})`);
      }
    }
  }
  assert.deepEqual(bad, []);
});

test('the layering table itself has no cycle', () => {
  const table = allowedEdges();
  const state = new Map<string, 'visiting' | 'done'>();
  const visit = (n: string, trail: string[]): void => {
    if (state.get(n) === 'done') return;
    assert.notEqual(state.get(n), 'visiting', `cycle in the table: ${[...trail, n].join(' -> ')}`);
    state.set(n, 'visiting');
    for (const m of table.get(n) ?? []) if (m !== '*') visit(m, [...trail, n]);
    state.set(n, 'done');
  };
  for (const n of table.keys()) visit(n, []);
});

test('no module of src/ imports itself back through others', () => {
  const graph = new Map(files.map((f) => [f, importsOf(f).filter((t) => fs.existsSync(t))]));
  const state = new Map<string, 'visiting' | 'done'>();
  const cycles: string[] = [];
  const visit = (n: string, trail: string[]): void => {
    if (state.get(n) === 'done') return;
    if (state.get(n) === 'visiting') {
      cycles.push([...trail.slice(trail.indexOf(n)), n].map((p) => path.relative(SRC, p)).join(' -> '));
      return;
    }
    state.set(n, 'visiting');
    for (const m of graph.get(n) ?? []) visit(m, [...trail, n]);
    state.set(n, 'done');
  };
  for (const f of files) visit(f, []);
  assert.deepEqual(cycles, []);
});

test(`only ${PLUGIN_LOADER} uses a dynamic import of a computed specifier (a user's plugin path), which this check cannot follow`, () => {
  const dynamic = files
    .filter((f) => DYNAMIC.test(withoutLiteralImports(fs.readFileSync(f, 'utf8'))))
    .map((f) => path.relative(ROOT, f));
  assert.deepEqual(dynamic.filter((f) => f !== PLUGIN_LOADER), []);
});

test('every literal dynamic import of a module of src/ names a file that exists and is counted as an edge', () => {
  const bad: string[] = [];
  for (const f of files) {
    const edges = new Set(importsOf(f));
    for (const spec of lazyImports(fs.readFileSync(f, 'utf8'))) {
      const target = path.resolve(path.dirname(f), spec).replace(/\.js$/, '.ts');
      if (!fs.existsSync(target) || !edges.has(target)) bad.push(`${path.relative(ROOT, f)}: import('${spec}')`);
    }
  }
  assert.deepEqual(bad, []);
});

test(`${LAZY_MAIN}'s lazy imports are counted as edges: every subcommand module it loads is one of its imports`, () => {
  const main = path.join(ROOT, LAZY_MAIN);
  const lazy = lazyImports(fs.readFileSync(main, 'utf8'));
  // serve, ggated, ggatel, ggatec, status, info, map, copy, plugins
  assert.ok(lazy.length >= 9, `expected the subcommand modules among ${LAZY_MAIN}'s lazy imports, found ${lazy.join(', ')}`);
  const edges = new Set(importsOf(main));
  for (const spec of lazy) {
    const target = path.resolve(path.dirname(main), spec).replace(/\.js$/, '.ts');
    assert.ok(fs.existsSync(target), `${LAZY_MAIN} lazily imports ${spec}, which does not exist`);
    assert.ok(edges.has(target), `${spec} is not counted as an edge of ${LAZY_MAIN}`);
  }
});
