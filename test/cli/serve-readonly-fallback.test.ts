/**
 * Without -r, a file the server may only read (mode 0444 for a user other than root) is
 * served read-only with a warning, as nbdkit's file plugin does, instead of refused.
 * The server runs as `nobody` (setpriv), since root may write a 0444 file anyway.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run } from '../helpers/run.js';

const MAIN = path.resolve(import.meta.dirname, '../../src/cli/main.ts');
const NOBODY = '65534';
const RUN_MS = 60_000;

test('a 0444 file is served read-only with a warning when the server cannot open it for writing', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-rofallback-'));
  fs.chmodSync(dir, 0o755);
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, Buffer.alloc(1 << 20, 0x5a));
  fs.chmodSync(file, 0o444);
  try {
    const r = await run(
      'setpriv',
      [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', process.execPath, '--import', 'tsx', MAIN, 'serve', '--run', 'nbdinfo --json "$uri"', file],
      { timeoutMs: RUN_MS, env: { HOME: dir } },
    );
    assert.equal(r.code, 0, r.stderr);
    const info = JSON.parse(r.stdout) as { exports: { 'is_read_only': boolean; 'export-size': number }[] };
    assert.equal(info.exports[0]!.is_read_only, true);
    assert.equal(info.exports[0]!['export-size'], 1 << 20);
    assert.match(r.stderr, /serving read-only/);
    assert.match(r.stderr, /read-only: EACCES opening it for writing/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
