/**
 * The docs' commands work as written with the installed command: every shell block of
 * README.md and docs/*.md marked safe to run (a fence whose info string is `sh doc-test`)
 * is run with `sh -e` by the `blockgate` that `npm install -g` of the packed tarball put
 * on PATH (test/helpers/installed-package.ts), from a fresh empty directory, and must exit
 * 0. When the block is followed by a ```` ```text doc-test-output ```` block, that is its
 * standard output, line for line.
 *
 * A block is safe when it needs nothing but the installed command and the Debian tools
 * the tests use, starts no server that outlives it (`serve --run` is captive), listens on
 * no fixed TCP port and writes only into its working directory.
 *
 * And every doc that shows a bare `blockgate` command says how it gets on PATH: README.md
 * in its Install section, the others by a link to it.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { installPackage, ROOT, run, type InstalledPackage } from '../helpers/installed-package.js';

/** Bound on one block's run (a few captive servers and clients). */
const BLOCK_TIMEOUT_MS = 60_000;
/** The fewest marked blocks there must be (so that a broken marker cannot pass by running none). */
const MIN_BLOCKS = 8;

const DOCS = ['README.md', ...fs.readdirSync(path.join(ROOT, 'docs')).filter((f) => f.endsWith('.md')).map((f) => `docs/${f}`)];

interface Snippet {
  /** `docs/CLIENT.md:123`, the line of the opening fence. */
  readonly where: string;
  readonly script: string;
  /** The documented standard output, if the doc shows it. */
  readonly output?: string;
}

/** A fenced block: its info string, its lines and where it starts and ends. */
interface Fence {
  readonly info: string;
  readonly body: string;
  readonly line: number;
  readonly end: number;
}

function fences(lines: readonly string[]): Fence[] {
  const out: Fence[] = [];
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(.*)$/.exec(lines[i]!);
    if (!open) continue;
    const close = lines.findIndex((l, j) => j > i && /^```\s*$/.test(l));
    assert.ok(close > i, `an unclosed code block at line ${i + 1}`);
    out.push({ info: open[1]!.trim(), body: lines.slice(i + 1, close).join('\n'), line: i + 1, end: close });
    i = close;
  }
  return out;
}

function snippets(file: string): Snippet[] {
  const lines = fs.readFileSync(path.join(ROOT, file), 'utf8').split('\n');
  const all = fences(lines);
  const out: Snippet[] = [];
  all.forEach((f, k) => {
    if (f.info !== 'sh doc-test') {
      assert.doesNotMatch(f.info, /doc-test(?!-output)/, `${file}:${f.line}: a doc-test block is marked exactly \`sh doc-test\``);
      return;
    }
    const next = all[k + 1];
    const between = next ? lines.slice(f.end + 1, next.line - 1) : [];
    const output = next && next.info === 'text doc-test-output' && between.every((l) => l.trim() === '') ? next.body : undefined;
    out.push({ where: `${file}:${f.line}`, script: f.body, ...(output !== undefined ? { output } : {}) });
  });
  return out;
}

const ALL = DOCS.flatMap(snippets);

/** Output compared line for line, trailing spaces and the final newline aside. */
function lines(text: string): string[] {
  return text.replace(/\n+$/, '').split('\n').map((l) => l.trimEnd());
}

let inst: InstalledPackage;
before(() => {
  inst = installPackage();
  console.log(inst.summary);
}, { timeout: 300_000 });
after(() => inst?.remove());

describe('the docs\' marked shell blocks run as written with the installed blockgate', () => {
  test(`there are at least ${MIN_BLOCKS} of them, and every output block follows a doc-test block`, () => {
    assert.ok(ALL.length >= MIN_BLOCKS, `found ${ALL.length}: ${ALL.map((s) => s.where).join(', ')}`);
    for (const file of DOCS) {
      const lines = fs.readFileSync(path.join(ROOT, file), 'utf8').split('\n');
      const outputs = fences(lines).filter((f) => f.info === 'text doc-test-output').length;
      assert.equal(outputs, snippets(file).filter((s) => s.output !== undefined).length, `${file}: an output block not right after a doc-test block`);
    }
  });

  for (const s of ALL) {
    test(`${s.where}: ${s.script.split('\n')[0]}${s.output !== undefined ? ' (output as shown)' : ''}`, () => {
      const cwd = fs.mkdtempSync(path.join(inst.tmp, 'snippet-'));
      const r = run('sh', ['-e', '-c', s.script], { cwd, env: inst.userEnv, timeoutMs: BLOCK_TIMEOUT_MS });
      if (s.output !== undefined) assert.deepEqual(lines(r.stdout), lines(s.output));
    });
  }
});

describe('every doc that shows a bare blockgate command says how it gets on PATH', () => {
  /** The docs with a code block line that runs `blockgate` (as a command, not in prose). */
  const usesBare = DOCS.filter((file) =>
    fences(fs.readFileSync(path.join(ROOT, file), 'utf8').split('\n')).some((f) => /^\s*(?:\$\s+)?blockgate\s/m.test(f.body)),
  );

  test('README.md installs it in its Install section (npm pack, npm install -g)', () => {
    const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
    const install = readme.slice(readme.indexOf('\n## Install\n')).split('\n## ')[1] ?? '';
    assert.match(install, /npm pack/);
    assert.match(install, /npm install -g \.\/blockgate-\*\.tgz/);
  });

  test('every other doc that shows one links to README.md#install', () => {
    assert.ok(usesBare.length >= 4, `docs with a bare blockgate: ${usesBare.join(', ')}`);
    const missing = usesBare.filter((f) => f !== 'README.md' && !fs.readFileSync(path.join(ROOT, f), 'utf8').includes('(../README.md#install)'));
    assert.deepEqual(missing, []);
  });
});
