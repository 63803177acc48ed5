/**
 * The package as a user gets it (test/helpers/installed-package.ts): `npm pack` of the
 * working tree, `npm install -g` of the tarball into a temporary prefix, and the
 * installed `blockgate` command run from an unrelated directory with that prefix first in
 * PATH; its man pages where npm puts them, PREFIX/share/man/manN.
 *
 * npm 11 does not run install scripts that package.json's allowScripts does not allow:
 * koffi's `install` (a check of its prebuilt binaries) is skipped, and the
 * `--allow uid:N` smoke below shows koffi loads without it.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { installPackage, NPM_ENV, PKG, ROOT, run, type InstalledPackage, type PackResult } from '../helpers/installed-package.js';

const MiB = 1024 * 1024;

let inst: InstalledPackage;
let packed: PackResult;
let packedPaths: string[];
let STAGE: string;
let PREFIX: string;
let ELSEWHERE: string;
let BIN: string;
let USER_ENV: NodeJS.ProcessEnv;

before(() => {
  inst = installPackage();
  ({ packed, packedPaths, stage: STAGE, prefix: PREFIX, elsewhere: ELSEWHERE, bin: BIN, userEnv: USER_ENV } = inst);
  console.log(inst.summary);
}, { timeout: 300_000 });

after(() => {
  inst?.remove();
});

test('the tarball holds the bundled command and library, their type declarations, LICENSE, README.md and docs/, and no tests, TypeScript sources or unbundled modules', () => {
  assert.equal(packed.filename, `${PKG.name}-${PKG.version}.tgz`);
  for (const f of ['dist/bundle/cli/main.js', 'dist/bundle/index.js', 'dist/bundle/plugin/index.js', 'dist/src/index.d.ts', 'dist/src/plugin/index.d.ts', 'LICENSE', 'README.md', 'package.json']) {
    assert.ok(packedPaths.includes(f), `${f} is packed`);
  }
  const docs = fs.readdirSync(path.join(ROOT, 'docs'), { recursive: true, encoding: 'utf8' })
    .filter((f) => fs.statSync(path.join(ROOT, 'docs', f)).isFile());
  assert.ok(docs.includes('man/blockgate-serve.1.md'));
  for (const doc of docs) {
    assert.ok(packedPaths.includes(`docs/${doc}`), `docs/${doc} is packed`);
  }
  const unwanted = packedPaths.filter((f) =>
    /(^|\/)test\//.test(f) || /^(src|bench)\//.test(f) || (f.endsWith('.ts') && !f.endsWith('.d.ts')) || /^dist\/src\/.*\.js$/.test(f));
  assert.deepEqual(unwanted, []);

  const dry = run('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: STAGE, env: NPM_ENV, timeoutMs: 60_000 });
  const dryPaths = (JSON.parse(dry.stdout) as PackResult[])[0]!.files.map((f) => f.path).sort();
  assert.deepEqual(dryPaths, packedPaths, 'npm pack --dry-run lists what npm pack packed');
});

test('blockgate --help works from another directory', () => {
  const which = run('sh', ['-c', 'command -v blockgate'], { cwd: ELSEWHERE, env: USER_ENV, timeoutMs: 10_000 });
  assert.equal(which.stdout.trim(), BIN);
  const help = run('blockgate', ['--help'], { cwd: ELSEWHERE, env: USER_ENV, timeoutMs: 20_000 });
  assert.match(help.stdout, /^Usage: blockgate /);
  for (const cmd of ['serve', 'ggated', 'ggatel', 'ggatec', 'status', 'info', 'map', 'copy']) {
    assert.match(help.stdout, new RegExp(`^  ${cmd} `, 'm'), `${cmd} is listed`);
  }
  const version = run(BIN, ['--version'], { cwd: ELSEWHERE, env: USER_ENV, timeoutMs: 20_000 });
  assert.equal(version.stdout.trim(), PKG.version);
});

test('blockgate serve --help works from another directory', () => {
  const help = run('blockgate', ['serve', '--help'], { cwd: ELSEWHERE, env: USER_ENV, timeoutMs: 20_000 });
  assert.match(help.stdout, /^Usage: blockgate serve /);
  assert.match(help.stdout, /--run /);
});

test('the installed command serves: blockgate serve --run nbdinfo memory:1M', () => {
  const r = run('blockgate', ['serve', '--run', 'nbdinfo --size "$uri"', 'memory:1M'], {
    cwd: ELSEWHERE, env: USER_ENV, timeoutMs: 30_000,
  });
  assert.equal(r.stdout.trim(), String(MiB));
});

test('koffi works in the installed package without its install script: --allow uid:<own uid> admits', () => {
  const uid = process.getuid?.();
  if (uid === undefined) return;
  const r = run('blockgate', ['serve', '--allow', `uid:${uid}`, '--run', 'nbdinfo --size "$uri"', 'memory:1M'], {
    cwd: ELSEWHERE, env: USER_ENV, timeoutMs: 30_000,
  });
  assert.equal(r.stdout.trim(), String(MiB));
});

test('the man pages are installed where npm puts them and render: PREFIX/share/man/man1/blockgate.1 and the rest', () => {
  assert.ok(PKG.man.length > 5);
  for (const page of PKG.man) {
    assert.ok(packedPaths.includes(page), `${page} is packed`);
    const installed = path.join(PREFIX, 'share', 'man', `man${page.slice(-1)}`, path.basename(page));
    assert.ok(fs.existsSync(installed), `${installed} is installed`);
  }
  assert.ok(fs.existsSync(path.join(PREFIX, 'share/man/man1/blockgate.1')));
  const env = { ...USER_ENV, MANWIDTH: '100', MANPAGER: 'cat', PAGER: 'cat', LC_ALL: 'C.UTF-8' };
  const local = run('man', ['--warnings', '-l', path.join(PREFIX, 'share/man/man1/blockgate.1')], { cwd: ELSEWHERE, env, timeoutMs: 20_000 });
  assert.equal(local.stderr, '');
  assert.match(local.stdout, /^BLOCKGATE\(1\)/);
  // As a user reads them: by name, from the prefix's man directory.
  for (const [name, header] of [['blockgate-serve', /^BLOCKGATE-SERVE\(1\)/], ['blockgate-ggated', /^BLOCKGATE-GGATED\(8\)/], ['blockgate-cow-filter', /^BLOCKGATE-COW-FILTER\(1\)/]] as const) {
    const r = run('man', ['--warnings', '-M', path.join(PREFIX, 'share/man'), name], { cwd: ELSEWHERE, env, timeoutMs: 20_000 });
    assert.equal(r.stderr, '', `man ${name} warned`);
    assert.match(r.stdout, header);
  }
});
