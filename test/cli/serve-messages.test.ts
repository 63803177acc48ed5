/**
 * Every bad input to `blockgate serve` gets one line naming what was wrong, where, and
 * what is allowed, never the schema library's own wording ("Expected never",
 * "Expected Object but received Object") or a misleading cause.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run } from '../helpers/run.js';
import { buildExports } from '../../src/cli/serve.js';
import { parseConfig, parseExportSpec } from '../../src/cli/config.js';

const MAIN = path.resolve(import.meta.dirname, '../../src/cli/main.ts');
const CLI = [process.execPath, '--import', 'tsx', MAIN];
const RUN_MS = 60_000;

function serveFails(args: string[]) {
  return run(CLI[0]!, [...CLI.slice(1), 'serve', '--no-control', ...args], { timeoutMs: RUN_MS });
}

test('-p abc is refused with one line saying what a port is', async () => {
  const r = await serveFails(['-p', 'abc']);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /-p, --port <port>' argument 'abc' is invalid\. expected a port number from 0 to 65535, got 'abc'/);
  assert.doesNotMatch(r.stderr, /Expected Object|received Object/);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
});

test('--help shows the default address instead of (default: [])', async () => {
  const r = await run(CLI[0]!, [...CLI.slice(1), 'serve', '--help'], { timeoutMs: RUN_MS });
  assert.equal(r.code, 0, r.stderr);
  assert.doesNotMatch(r.stdout, /default: \[\]/);
  assert.match(r.stdout, /default: 127\.0\.0\.1/);
});

test('an unknown key in a config export is named with the keys allowed, not "Expected never"', () => {
  assert.throws(
    () => parseConfig({ exports: [{ name: 'a', readonly: true, backend: { type: 'null' } }] }, 'db.json'),
    (e: Error) => {
      assert.equal(e.message, 'db.json: exports[0].readonly: unknown key (known: name, description, readOnly, backend, filters, tls, allow, deny, pskIdentities, subjects)');
      return true;
    },
  );
});

test('a wrong type in a config file says what was expected at which key', () => {
  assert.throws(
    () => parseConfig({ listen: [{ host: '127.0.0.1', port: 'x' }], exports: [{ name: 'a', backend: { type: 'null' } }] }, 'db.json'),
    /^BlockError: db\.json: listen\[0\]: expected \{ "host": \.\.\., "port": \.\.\. \} or \{ "path": \.\.\. \}/,
  );
  assert.throws(() => parseConfig({ exports: [{ name: 1, backend: { type: 'null' } }] }, 'db.json'), /db\.json: exports\[0\]\.name: expected an export name string, got 1/);
});

test('a mistyped backend type (ram:1G) is reported as an unknown type, not a missing file', () => {
  assert.throws(() => parseExportSpec('ram:1G'), /unknown backend type 'ram' \(known: memory:SIZE, null:SIZE, pattern:SIZE, file:PATH, rbd:POOL\/IMAGE, nbd:URI, plugin:PATH, s3:\/\/BUCKET\/PREFIX; a file whose name has a colon: file:ram:1G\)/);
  // A file that exists with a colon in its name is still served as a file.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-spec-'));
  try {
    const cwd = process.cwd();
    process.chdir(dir);
    try {
      fs.writeFileSync('disk:1', '');
      assert.deepEqual(parseExportSpec('disk:1').backend, { type: 'file', path: 'disk:1' });
    } finally {
      process.chdir(cwd);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('an error inside a filter or backend names the file and the key path of the layer', async () => {
  await assert.rejects(
    buildExports({ exports: [{ name: 'a', backend: { type: 'memory', size: '1M' }, filters: [{ type: 'readonly' }, { type: 'writeback', maxDirty: 'lots' }] }] }, 'db.json'),
    (e: Error) => {
      assert.match(e.message, /^db\.json: exports\[0\]\.filters\[1\]: writeback: maxDirty: /);
      return true;
    },
  );
  await assert.rejects(
    buildExports({ exports: [{ name: 'a', backend: { type: 'memory', size: '1M' } }, { name: 'b', backend: { type: 'memory', size: 'x' } }] }, 'db.json'),
    /^BlockError: db\.json: exports\[1\]\.backend: memory: size: /,
  );
  await assert.rejects(buildExports({ exports: [{ name: 'a', backend: { type: 'nope' } }] }, 'db.json'), /db\.json: exports\[0\]\.backend: unknown backend 'nope'/);
});
