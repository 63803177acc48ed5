/**
 * Bundles the built modules (`npm run build:bundle`, part of `npm run build`, after tsc):
 * dist/src/** (one file per module, ~120 of them) becomes dist/bundle/** with one file per
 * entry point and shared chunks, which is what package.json's `bin` and `exports` name.
 *
 * Why: most of the command's start-up time was Node resolving, reading and compiling
 * modules one by one (docs/PERFORMANCE.md, start-up row); a few files do the same work in
 * a fraction of it. The entry points are bundled together, with code splitting, so that
 *
 * - each lazy `import()` (a subcommand, the control server) stays a chunk of its own,
 *   loaded only when used, and
 * - the CLI, the library (`blockgate`), the plugin API (`blockgate/plugin`) and the test
 *   kit (`blockgate/testing`) share one copy of every module: a plugin that extends the
 *   FilterDevice it imports from `blockgate/plugin` extends the very class the server
 *   walks its stacks with.
 *
 * npm packages stay outside (`packages: 'external'`), resolved from node_modules as
 * before; the type declarations stay in dist/src (`types` in package.json).
 *
 *   node --import tsx scripts/bundle.ts
 */
import fs from 'node:fs';
import path from 'node:path';
import { build } from 'esbuild';

const ROOT = path.resolve(import.meta.dirname, '..');
const FROM = path.join(ROOT, 'dist/src');
const OUT = path.join(ROOT, 'dist/bundle');
/** The modules package.json's bin and exports name, relative to dist/src. */
export const BUNDLE_ENTRIES = ['cli/main.js', 'index.js', 'plugin/index.js', 'testing/index.js'] as const;

fs.rmSync(OUT, { recursive: true, force: true });
const result = await build({
  entryPoints: BUNDLE_ENTRIES.map((e) => path.join(FROM, e)),
  outbase: FROM,
  outdir: OUT,
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  packages: 'external',
  // Readable stack traces over a few kilobytes: no minification of names.
  sourcemap: 'linked',
  chunkNames: 'chunks/[name]-[hash]',
  metafile: true,
  logLevel: 'warning',
});
const files = Object.keys(result.metafile.outputs).filter((f) => f.endsWith('.js'));
fs.chmodSync(path.join(OUT, 'cli/main.js'), 0o755);
process.stderr.write(`bundle: ${Object.keys(result.metafile.inputs).length} modules into ${files.length} files in dist/bundle\n`);
