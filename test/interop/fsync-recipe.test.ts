/**
 * The "Recipe: does my database survive a failed fsync?" of docs/WRITEBACK-ERRORS.md,
 * run as written. The ```sh blocks marked `<!-- fsync-recipe:run -->` are taken from the
 * doc in order and run as one bash script (`set -eu`), with one substitution: the
 * server is started from the sources (`npx blockgate` needs a build). The script's
 * `mktemp -d` lands in this test's own temporary directory (TMPDIR).
 *
 * The transcript must hold the doc's `<!-- fsync-recipe:expect -->` blocks, in order,
 * and more: each nbdsh connection is told EIO exactly once, nbdcopy's flush failed with
 * EIO, e2fsck checked the copy and found it clean, and the copy holds the state before
 * the failed update. The recipe's own clean-up step must stop the server and remove its
 * directory; whatever it leaves behind (a server still running) is killed by PID.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DEBIAN_PATH, type RunResult } from '../helpers/run.js';

const ROOT = path.resolve(import.meta.dirname, '../..');
const DOC = path.join(ROOT, 'docs/WRITEBACK-ERRORS.md');
const MAIN = path.join(ROOT, 'src/cli/main.ts');
const HEADING = '## Recipe: does my database survive a failed fsync?';
/** Bound on the whole recipe run (bash is killed after it). */
const RUN_TIMEOUT_MS = 120_000;
/** Bound on the wait for the server to exit after the recipe's `kill`. */
const EXIT_WAIT_MS = 10_000;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-fsync-recipe-'));
/** Servers the recipe started (PIDs read from its server.pid), to kill if it left them running. */
const servers = new Set<number>();

after(() => {
  for (const pid of servers) if (running(pid)) process.kill(pid, 'SIGKILL');
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** The recipe section of the doc: from its heading to the next "## " heading. */
function recipeSection(): string {
  const doc = fs.readFileSync(DOC, 'utf8');
  const start = doc.indexOf(HEADING);
  assert.ok(start >= 0, `docs/WRITEBACK-ERRORS.md has the heading "${HEADING}"`);
  const end = doc.indexOf('\n## ', start + HEADING.length);
  return doc.slice(start, end < 0 ? undefined : end);
}

/** The bodies of the ```LANG blocks that follow `<!-- fsync-recipe:MARK -->`, in order. */
function blocks(section: string, mark: string, lang: string): string[] {
  const re = new RegExp(`<!-- fsync-recipe:${mark} -->\\n\`\`\`${lang}\\n([\\s\\S]*?)\`\`\`\\n`, 'g');
  return [...section.matchAll(re)].map((m) => m[1]!);
}

/** Replaces `from` in `code` exactly once, so drift of the doc fails loudly. */
function replaceOnce(code: string, from: string, to: string): string {
  const at = code.indexOf(from);
  assert.ok(at >= 0 && code.indexOf(from, at + 1) < 0, `the recipe contains ${from} exactly once`);
  return code.slice(0, at) + to + code.slice(at + from.length);
}

/** Shell single-quoting. */
const sq = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

/** True while `pid` is a live (not zombie) process. */
function running(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/** Records the PID of every server.pid the recipe wrote under `tmp` (so far). */
function collectServerPids(): void {
  for (const d of fs.readdirSync(tmp)) {
    try {
      const pid = Number(fs.readFileSync(path.join(tmp, d, 'server.pid'), 'utf8').trim());
      if (Number.isSafeInteger(pid) && pid > 0) servers.add(pid);
    } catch {
      // not written yet, or already removed by the recipe's clean-up
    }
  }
}

/** Runs the script in bash from the repository root (tsx resolves from there), bounded. */
function runRecipe(script: string): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn('bash', ['-euc', script], {
      cwd: ROOT,
      env: { ...process.env, PATH: DEBIAN_PATH, TMPDIR: tmp },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    const poll = setInterval(collectServerPids, 20);
    const timer = setTimeout(() => child.kill('SIGKILL'), RUN_TIMEOUT_MS);
    const done = (): void => {
      clearInterval(poll);
      clearTimeout(timer);
    };
    child.on('error', (e) => {
      done();
      reject(e);
    });
    child.on('close', (code, signal) => {
      done();
      resolve({ code, signal, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() });
    });
  });
}

/** Asserts that `expected`'s lines occur in `lines` in order, from `from`; returns the index after the last. */
function assertInOrder(lines: readonly string[], expected: readonly string[], from: number, what: string): number {
  let i = from;
  for (const want of expected) {
    const at = lines.indexOf(want, i);
    assert.ok(at >= 0, `${what}: "${want}" in order in the transcript:\n${lines.join('\n')}`);
    i = at + 1;
  }
  return i;
}

async function exited(pid: number): Promise<boolean> {
  const deadline = Date.now() + EXIT_WAIT_MS;
  while (running(pid)) {
    if (Date.now() > deadline) return false;
    await new Promise<void>((resolve) => setTimeout(resolve, 20));
  }
  return true;
}

test('the fsync recipe of docs/WRITEBACK-ERRORS.md runs as written and every connection is told EIO once', async () => {
  const section = recipeSection();
  const run = blocks(section, 'run', 'sh');
  const expect = blocks(section, 'expect', 'text').map((b) => b.split('\n').filter((l) => l.length > 0));
  assert.ok(run.length >= 4, `the recipe has its run blocks (found ${run.length})`);
  assert.equal(expect.length, 3, 'the recipe shows three expected transcripts');

  const script = replaceOnce(run.join('\n'), 'npx blockgate serve', `${sq(process.execPath)} --import tsx ${sq(MAIN)} serve`);
  const r = await runRecipe(script);
  collectServerPids();
  const report = `exit ${r.code ?? r.signal}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`;
  assert.equal(r.code, 0, report);
  const lines = r.stdout.split('\n');

  // The transcripts the doc shows, in the doc's order.
  let at = 0;
  expect.forEach((want, i) => {
    at = assertInOrder(lines, want, at, `expected transcript ${i + 1}`);
  });

  // The nbdsh script: each connection told once, the second FLUSH of each succeeds.
  for (const h of ['h1', 'h2']) {
    const mine = lines.filter((l) => l.startsWith(`${h} flush `));
    assert.deepEqual(mine, [`${h} flush OK`, `${h} flush EIO`, `${h} flush OK`], `${h}'s flushes\n${report}`);
  }
  // The failed writes were dropped: old data, and zeroes where nothing had been written.
  assert.ok(lines.includes("read back b'a' b'\\x00'"), report);

  // The filesystem update: nbdcopy's flush got EIO, a later connection was not told.
  assert.match(r.stderr, /nbd_flush: flush: .*Input\/output error/, report);
  assert.ok(lines.includes('update: nbdcopy failed, exit 1'), report);
  assert.ok(lines.includes('later connection: flush OK'), report);

  // The check: e2fsck went through all passes on the copy and found it clean; the copy
  // holds the filesystem before the failed update (a.txt, and no b.txt).
  assert.ok(lines.includes('Pass 5: Checking group summary information'), report);
  assert.match(r.stdout, /after\.img: \d+\/\d+ files/, report);
  assert.ok(lines.includes('fsck: clean'), report);
  const listing = lines.find((l) => /\(\d+\) lost\+found/.test(l));
  assert.ok(listing, `debugfs listed the root directory\n${report}`);
  assert.match(listing, /\(\d+\) a\.txt/);
  assert.doesNotMatch(listing, /b\.txt/);

  // The clean-up step: the server stopped and the recipe's directory is gone.
  assert.equal(servers.size, 1, `the recipe started one server\n${report}`);
  for (const pid of servers) assert.ok(await exited(pid), `the server (pid ${pid}) exited after the recipe's kill`);
  // (tsx keeps its cache in TMPDIR too, as tsx-UID; mktemp's directories are tmp.XXXXXXXXXX.)
  assert.deepEqual(fs.readdirSync(tmp).filter((d) => d.startsWith('tmp.')), [], 'the recipe removed its directory');
});
