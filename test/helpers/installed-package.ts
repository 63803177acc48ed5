/**
 * The package as a user gets it, for the tests that run the installed command
 * (test/interop/global-install.test.ts, test/docs/doc-snippets.test.ts): `npm pack` of
 * the repository, `npm install -g` of the tarball into a temporary prefix, and the
 * installed `blockgate` run from an unrelated directory with that prefix first in PATH.
 *
 * What is packed is the working tree (tracked files and untracked files not ignored by
 * .gitignore), copied into the temporary directory with a node_modules symlink to the
 * repository's, so uncommitted changes are tested and the repository's own dist/ is
 * neither used (stale files of deleted sources would be packed) nor rewritten. `npm pack`
 * runs `prepare`, which builds dist/ (tsc and the man pages) there.
 *
 * The install downloads the dependencies from the registry (or takes them from the npm
 * cache). npm 11 does not run install scripts that package.json's allowScripts does not
 * allow: koffi's `install` (a check of its prebuilt binaries) is skipped. `prepare` is
 * not run for a tarball either (npm only lists it in its install-scripts warning).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const PKG = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { name: string; version: string; man: string[] };
const MiB = 1024 * 1024;
/** Bounds on the steps of an install. */
const GIT_LS_TIMEOUT_MS = 20_000;
const PACK_TIMEOUT_MS = 120_000;
const INSTALL_TIMEOUT_MS = 120_000;
/** Longest output a command run here may print. */
const MAX_OUTPUT = 64 * MiB;

/** The environment of every npm child: nothing inherited from an `npm test` that runs us. */
export const NPM_ENV: NodeJS.ProcessEnv = {
  ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^npm_/i.test(k))),
  npm_config_update_notifier: 'false',
  npm_config_fund: 'false',
  npm_config_audit: 'false',
};

export interface Run {
  stdout: string;
  stderr: string;
  ms: number;
}

/** Runs a command to completion within `timeoutMs`; anything but exit status 0 fails. */
export function run(cmd: string, args: string[], opts: { cwd: string; env: NodeJS.ProcessEnv; timeoutMs: number; input?: string }): Run {
  const t0 = Date.now();
  const r = spawnSync(cmd, args, {
    cwd: opts.cwd, env: opts.env, timeout: opts.timeoutMs, killSignal: 'SIGKILL',
    encoding: 'utf8', maxBuffer: MAX_OUTPUT, stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    ...(opts.input !== undefined ? { input: opts.input } : {}),
  });
  const ms = Date.now() - t0;
  const what = `${cmd} ${args.join(' ')} (cwd ${opts.cwd}, ${ms} ms)`;
  if (r.error) throw new Error(`${what}: ${r.error.message}\n${r.stderr ?? ''}`);
  if (r.status !== 0) {
    throw new Error(`${what}: exit ${r.status ?? r.signal}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
  }
  return { stdout: r.stdout, stderr: r.stderr, ms };
}

export interface PackResult { filename: string; size: number; entryCount: number; files: { path: string }[] }

export interface InstalledPackage {
  /** The temporary directory holding everything below; remove() deletes it. */
  readonly tmp: string;
  /** The copy of the working tree that was packed. */
  readonly stage: string;
  readonly prefix: string;
  /** An empty directory outside the repository, to run the command from. */
  readonly elsewhere: string;
  /** PREFIX/bin/blockgate. */
  readonly bin: string;
  readonly packed: PackResult;
  /** The tarball's files, sorted. */
  readonly packedPaths: string[];
  /** The installed command's environment: the prefix's bin first, then node and the system tools. */
  readonly userEnv: NodeJS.ProcessEnv;
  /** How long pack and install took, for the log. */
  readonly summary: string;
  remove(): void;
}

/** Packs the working tree and installs the tarball globally into a fresh temporary prefix. */
export function installPackage(): InstalledPackage {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-global-install-'));
  const stage = path.join(tmp, 'stage');
  const prefix = path.join(tmp, 'prefix');
  const elsewhere = path.join(tmp, 'elsewhere');
  try {
    // The working tree, without node_modules (an untracked symlink) and without deleted files.
    const listed = run('git', ['ls-files', '-z', '--cached', '--others', '--exclude-standard'], {
      cwd: ROOT, env: NPM_ENV, timeoutMs: GIT_LS_TIMEOUT_MS,
    }).stdout.split('\0').filter((f) => f !== '' && f !== 'node_modules' && !f.startsWith('node_modules/'));
    for (const f of listed) {
      const from = path.join(ROOT, f);
      const st = fs.lstatSync(from, { throwIfNoEntry: false });
      if (!st || st.isDirectory()) continue;
      fs.mkdirSync(path.dirname(path.join(stage, f)), { recursive: true });
      fs.cpSync(from, path.join(stage, f), { verbatimSymlinks: true });
    }
    fs.symlinkSync(fs.realpathSync(path.join(ROOT, 'node_modules')), path.join(stage, 'node_modules'), 'dir');
    fs.mkdirSync(elsewhere);

    const pack = run('npm', ['pack', '--json', '--pack-destination', tmp], { cwd: stage, env: NPM_ENV, timeoutMs: PACK_TIMEOUT_MS });
    const packed = (JSON.parse(pack.stdout) as PackResult[])[0]!;
    const install = run('npm', [
      'install', '-g', '--prefix', prefix, path.join(tmp, packed.filename), '--no-audit', '--no-fund',
    ], { cwd: elsewhere, env: NPM_ENV, timeoutMs: INSTALL_TIMEOUT_MS });
    return {
      tmp, stage, prefix, elsewhere, packed,
      bin: path.join(prefix, 'bin', 'blockgate'),
      packedPaths: packed.files.map((f) => f.path).sort(),
      userEnv: {
        ...NPM_ENV,
        PATH: [path.join(prefix, 'bin'), path.dirname(process.execPath), '/usr/bin', '/bin', '/usr/sbin', '/sbin'].join(path.delimiter),
      },
      summary: `npm pack ${pack.ms} ms (${packed.filename}: ${packed.size} bytes, ${packed.entryCount} files); npm install -g ${install.ms} ms`,
      remove: () => fs.rmSync(tmp, { recursive: true, force: true }),
    };
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
}
