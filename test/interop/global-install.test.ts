/**
 * The package as a user gets it: `npm pack` of the repository, `npm install -g` of the
 * tarball into a temporary prefix, and the installed `blockgate` command run from an
 * unrelated directory with that prefix first in PATH.
 *
 * What is packed is the working tree (tracked files and untracked files not ignored by
 * .gitignore), copied into the temporary directory with a node_modules symlink to the
 * repository's, so uncommitted changes are tested and the repository's own dist/ is
 * neither used (stale files of deleted sources would be packed) nor rewritten. `npm pack`
 * runs `prepare`, which builds dist/ with tsc there.
 *
 * The install downloads the dependencies from the registry (or takes them from the npm
 * cache). npm 11 does not run install scripts that package.json's allowScripts does not
 * allow: koffi's `install` (a check of its prebuilt binaries) is skipped, and the
 * `--allow uid:N` smoke below shows koffi loads without it. `prepare` is not run for a
 * tarball either (npm only lists it in its install-scripts warning).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const PKG = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { name: string; version: string };
const MiB = 1024 * 1024;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-global-install-'));
const STAGE = path.join(tmp, 'stage');
const PREFIX = path.join(tmp, 'prefix');
const ELSEWHERE = path.join(tmp, 'elsewhere');
const BIN = path.join(PREFIX, 'bin', 'blockgate');

/** The environment of every npm child: nothing inherited from an `npm test` that runs us. */
const NPM_ENV: NodeJS.ProcessEnv = {
  ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^npm_/i.test(k))),
  npm_config_update_notifier: 'false',
  npm_config_fund: 'false',
  npm_config_audit: 'false',
};
/** The environment of the installed command: the prefix first, then node and the system tools. */
const USER_ENV: NodeJS.ProcessEnv = {
  ...NPM_ENV,
  PATH: [path.join(PREFIX, 'bin'), path.dirname(process.execPath), '/usr/bin', '/bin'].join(path.delimiter),
};

interface Run { stdout: string; stderr: string; ms: number }

/** Runs a command to completion within `timeoutMs`; anything but exit status 0 fails. */
function run(cmd: string, args: string[], opts: { cwd: string; env: NodeJS.ProcessEnv; timeoutMs: number }): Run {
  const t0 = Date.now();
  const r = spawnSync(cmd, args, {
    cwd: opts.cwd, env: opts.env, timeout: opts.timeoutMs, killSignal: 'SIGKILL',
    encoding: 'utf8', maxBuffer: 64 * MiB, stdio: ['ignore', 'pipe', 'pipe'],
  });
  const ms = Date.now() - t0;
  const what = `${cmd} ${args.join(' ')} (cwd ${opts.cwd}, ${ms} ms)`;
  if (r.error) throw new Error(`${what}: ${r.error.message}\n${r.stderr ?? ''}`);
  if (r.status !== 0) {
    throw new Error(`${what}: exit ${r.status ?? r.signal}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
  }
  return { stdout: r.stdout, stderr: r.stderr, ms };
}

interface PackResult { filename: string; size: number; entryCount: number; files: { path: string }[] }

let packed: PackResult;
let packedPaths: string[];

before(() => {
  // The working tree, without node_modules (an untracked symlink) and without deleted files.
  const listed = run('git', ['ls-files', '-z', '--cached', '--others', '--exclude-standard'], {
    cwd: ROOT, env: NPM_ENV, timeoutMs: 20_000,
  }).stdout.split('\0').filter((f) => f !== '' && f !== 'node_modules' && !f.startsWith('node_modules/'));
  for (const f of listed) {
    const from = path.join(ROOT, f);
    const st = fs.lstatSync(from, { throwIfNoEntry: false });
    if (!st || st.isDirectory()) continue;
    fs.mkdirSync(path.dirname(path.join(STAGE, f)), { recursive: true });
    fs.cpSync(from, path.join(STAGE, f), { verbatimSymlinks: true });
  }
  fs.symlinkSync(fs.realpathSync(path.join(ROOT, 'node_modules')), path.join(STAGE, 'node_modules'), 'dir');
  fs.mkdirSync(ELSEWHERE);

  const pack = run('npm', ['pack', '--json', '--pack-destination', tmp], { cwd: STAGE, env: NPM_ENV, timeoutMs: 90_000 });
  packed = (JSON.parse(pack.stdout) as PackResult[])[0]!;
  packedPaths = packed.files.map((f) => f.path).sort();
  const install = run('npm', [
    'install', '-g', '--prefix', PREFIX, path.join(tmp, packed.filename), '--no-audit', '--no-fund',
  ], { cwd: ELSEWHERE, env: NPM_ENV, timeoutMs: 120_000 });
  console.log(`npm pack ${pack.ms} ms (${packed.filename}: ${packed.size} bytes, ${packed.entryCount} files); ` +
    `npm install -g ${install.ms} ms`);
}, { timeout: 240_000 });

after(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

test('the tarball holds the built command, LICENSE, README.md and docs/, and no tests or TypeScript sources', () => {
  assert.equal(packed.filename, `${PKG.name}-${PKG.version}.tgz`);
  for (const f of ['dist/src/cli/main.js', 'dist/src/index.js', 'dist/src/index.d.ts', 'LICENSE', 'README.md', 'package.json']) {
    assert.ok(packedPaths.includes(f), `${f} is packed`);
  }
  for (const doc of fs.readdirSync(path.join(ROOT, 'docs'))) {
    assert.ok(packedPaths.includes(`docs/${doc}`), `docs/${doc} is packed`);
  }
  const unwanted = packedPaths.filter((f) =>
    /(^|\/)test\//.test(f) || /^(src|bench)\//.test(f) || (f.endsWith('.ts') && !f.endsWith('.d.ts')));
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
