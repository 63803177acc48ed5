/**
 * A plugin as a user writes it: the package is packed (`npm pack`, which builds dist),
 * installed from the tarball into a scratch package, and the plugin of docs/PLUGINS.md
 * (the 30-line RAM disk, taken from the doc's `pack-test` blocks, so the doc is what is
 * tested) is served by the installed `blockgate serve`; nbdcopy reads it back, qemu-img
 * writes to it, and `node --test` runs the exported contract suite (`blockgate/testing`)
 * on it. Needs the npm registry or npm's cache for blockgate's dependencies.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { run, runOk } from '../helpers/run.js';

const ROOT = path.resolve(import.meta.dirname, '../..');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-plugin-pack-'));
const scratch = path.join(tmp, 'scratch');
const SIZE = 8 * 1024 * 1024;
/** Node first (the installed bin's `env node`), then Debian's tools. */
const PATH = `${path.dirname(process.execPath)}:/usr/bin:/bin:${process.env.PATH ?? ''}`;
const env = { PATH, npm_config_update_notifier: 'false' };
let server: ChildProcess | undefined;

/** The code block after `<!-- pack-test: NAME -->` in docs/PLUGINS.md. */
function fromDoc(name: string): string {
  const doc = fs.readFileSync(path.join(ROOT, 'docs/PLUGINS.md'), 'utf8');
  const m = new RegExp(`<!-- pack-test: ${name.replace('.', '\\.')} -->\\n\`\`\`js\\n([\\s\\S]*?)\`\`\`\\n`).exec(doc);
  assert.ok(m, `docs/PLUGINS.md has no pack-test block ${name}`);
  return m[1]!;
}

before(async () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { exports: Record<string, unknown>; files: string[] };
  assert.ok(pkg.exports['./plugin'] && pkg.exports['./testing'], 'package.json "exports" needs "./plugin" and "./testing" (dist/bundle/plugin/index.js, dist/bundle/testing/index.js)');
  assert.ok(pkg.files.includes('dist/bundle') && pkg.files.includes('dist/src/**/*.d.ts'), 'package.json "files" ships dist/bundle and the declarations in dist/src');
  const packs = path.join(tmp, 'packs');
  fs.mkdirSync(packs);
  await runOk('npm', ['pack', '--pack-destination', packs, '--silent'], { env, timeoutMs: 120_000, cwd: ROOT });
  const tarball = fs.readdirSync(packs).find((f) => f.endsWith('.tgz'));
  assert.ok(tarball, 'npm pack made no tarball');
  fs.mkdirSync(scratch);
  fs.writeFileSync(path.join(scratch, 'package.json'), JSON.stringify({ name: 'mydisk', version: '1.0.0', type: 'module', private: true }));
  await runOk('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', '--ignore-scripts', '--silent', path.join(packs, tarball)], {
    env,
    timeoutMs: 120_000,
    cwd: scratch,
  });
  fs.writeFileSync(path.join(scratch, 'mydisk.js'), fromDoc('mydisk.js'));
  fs.writeFileSync(path.join(scratch, 'mydisk.test.js'), fromDoc('mydisk.test.js'));
});

after(() => {
  if (server && server.exitCode === null) server.kill('SIGKILL');
  fs.rmSync(tmp, { recursive: true, force: true });
});

test('the doc\'s plugin is about 30 lines', () => {
  const lines = fromDoc('mydisk.js').trim().split('\n').length;
  assert.ok(lines <= 35, `${lines} lines`);
});

test('the installed blockgate serves the plugin: nbdcopy reads it back, qemu-img writes to it', async () => {
  const sock = path.join(tmp, 'nbd.sock');
  server = spawn(path.join(scratch, 'node_modules/.bin/blockgate'), ['serve', '--print-uri', '--no-control', '-l', 'warn', '-U', sock, './mydisk.js', `size=${SIZE}`, 'fill=7'], {
    cwd: scratch,
    env: { ...process.env, PATH },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const child = server;
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const uri = await new Promise<string>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no URI; stderr: ${err}`)), 30_000);
    child.stdout!.once('data', (b: Buffer) => {
      clearTimeout(t);
      resolve(b.toString().trim());
    });
    child.once('exit', (code) => {
      clearTimeout(t);
      reject(new Error(`serve exited ${code}: ${err}`));
    });
  });
  const out = path.join(tmp, 'out.img');
  await runOk('nbdcopy', [uri, out], { env: { PATH } });
  assert.ok(fs.readFileSync(out).equals(Buffer.alloc(SIZE, 7)), 'nbdcopy reads the fill byte everywhere');

  const src = path.join(tmp, 'src.img');
  const data = randomBytes(SIZE);
  fs.writeFileSync(src, data);
  await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri], { env: { PATH } });
  await runOk('nbdcopy', [uri, out], { env: { PATH } });
  assert.ok(fs.readFileSync(out).equals(data), 'what qemu-img wrote is read back');

  const stopped = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  child.kill('SIGTERM');
  const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
  assert.equal(await stopped, 0, err);
  clearTimeout(t);
});

test('the exported contract suite passes on the plugin with node --test', async () => {
  // Without the parent runner's NODE_TEST_CONTEXT, which would make this run report to it instead of printing.
  const r = await run('/usr/bin/env', ['-u', 'NODE_TEST_CONTEXT', process.execPath, '--test', '--test-reporter=tap', 'mydisk.test.js'], {
    env: { PATH },
    timeoutMs: 60_000,
    cwd: scratch,
  });
  assert.equal(r.code, 0, `${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout, /# pass [1-9]\d*\n# fail 0\n/);
  assert.match(r.stdout, /mydisk: backend contract/);
});
