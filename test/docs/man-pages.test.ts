/**
 * The man pages as scripts/build-man.ts builds them (into a temporary directory, not
 * dist/): every page renders with `man -l` without a warning, the generated backend and
 * filter pages list every setting their schema has, the command pages every option of
 * their commands, and package.json's `man` field lists exactly the pages the build makes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { buildMan, layerPageName, ROOT } from '../../scripts/build-man.js';
import { builtinLayers } from '../../src/cli/plugins.js';
import { serveCommand } from '../../src/cli/serve.js';
import { ggatedCommand } from '../../src/cli/ggated.js';
import { ggatelCommand } from '../../src/cli/ggatel.js';
import { ggatecCommand } from '../../src/cli/ggatec.js';
import { runOk } from '../helpers/run.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-man-test-'));
const OUT = path.join(tmp, 'man');
let files: string[] = [];
/** Each page as `man -l` renders it, joined lines undone (hyphenation off: MANWIDTH wide). */
const rendered = new Map<string, string>();

/** Renders one page the way a user's `man` would, with groff's warnings on; fails on any. */
async function render(file: string): Promise<string> {
  // A wide page so that no option term or setting key is hyphenated across lines.
  const r = await runOk('man', ['--warnings', '-l', file], { env: { MANWIDTH: '250', MANPAGER: 'cat', PAGER: 'cat', LC_ALL: 'C.UTF-8' } });
  assert.equal(r.stderr, '', `man -l ${path.basename(file)} warned`);
  return r.stdout;
}

before(async () => {
  files = buildMan(OUT);
  for (const f of files) rendered.set(f, await render(path.join(OUT, f)));
}, { timeout: 120_000 });
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** The terms of a page's list items (`• -p, --port <port>:` gives `-p, --port <port>`). */
function itemTerms(text: string): Set<string> {
  return new Set([...text.matchAll(/^\s*• (.+):$/gm)].map((m) => m[1]!.trim()));
}

describe('man pages', () => {
  test('every page renders with man -l, without a warning, with its name in the header and a NAME section', () => {
    assert.ok(files.length > 5);
    for (const f of files) {
      const text = rendered.get(f)!;
      const [name, section] = [f.replace(/\.\d$/, ''), f.slice(-1)];
      assert.match(text, new RegExp(`^${name.toUpperCase()}\\(${section}\\)`), `${f}: header`);
      assert.match(text, /^NAME\n\s+\S/m, `${f}: NAME section`);
      assert.doesNotMatch(text, /<!--|&quot;|&#39;|&lt;|&gt;|&amp;/, `${f}: no markup left over`);
    }
  });

  test('blockgate(1), blockgate-serve(1) and the ggate pages are built, in sections 1 and 8', () => {
    for (const f of ['blockgate.1', 'blockgate-serve.1', 'blockgate-ggated.8', 'blockgate-ggatec.8', 'blockgate-ggatel.8']) {
      assert.ok(files.includes(f), `${f} is built`);
    }
  });

  test('every built-in backend and filter has a page that lists every setting its schema has, with its type', () => {
    const layers = builtinLayers();
    assert.ok(layers.some((l) => l.kind === 'filter') && layers.some((l) => l.kind === 'backend'));
    for (const l of layers) {
      const file = `${layerPageName(l)}.1`;
      const text = rendered.get(file);
      assert.ok(text, `${file} is built`);
      const terms = itemTerms(text);
      for (const s of l.settings ?? []) {
        assert.ok(terms.has(s.key), `${file} lists the setting ${s.key}`);
        const line = text.split('\n').findIndex((x) => x.trim() === `• ${s.key}:`);
        assert.ok(text.split('\n')[line + 1]!.includes(s.type.split(' ')[0]!), `${file}: ${s.key} has its type (${s.type})`);
      }
      if ((l.settings ?? []).length === 0) assert.match(text, /^SETTINGS\n(?:.*\n)*?\s+\(none\)$/m, `${file} says it has no settings`);
    }
  });

  test('the command pages list every option of their commands (and of every subcommand)', () => {
    const pages: [string, Command][] = [
      ['blockgate-serve.1', serveCommand()],
      ['blockgate-ggated.8', ggatedCommand()],
      ['blockgate-ggatel.8', ggatelCommand()],
      ['blockgate-ggatec.8', ggatecCommand()],
    ];
    for (const [file, cmd] of pages) {
      const terms = itemTerms(rendered.get(file)!);
      const commands = cmd.commands.length > 0 ? (cmd.commands as Command[]) : [cmd];
      for (const c of commands) {
        for (const o of c.options.filter((x) => !(x as { hidden?: boolean }).hidden)) {
          assert.ok(terms.has(o.flags), `${file} lists ${c.name()}'s option ${o.flags}`);
        }
      }
    }
  });

  test("package.json's man field lists exactly the pages the build makes, under dist/man, which `files` packs", () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { man: string[]; files: string[]; scripts: Record<string, string> };
    assert.deepEqual([...pkg.man].sort(), files.map((f) => `dist/man/${f}`).sort());
    assert.ok(pkg.files.includes('dist/man'));
    assert.match(pkg.scripts.build!, /npm run build:man/);
  });
});
