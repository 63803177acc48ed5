/**
 * The command's V8 flags: main.ts starts with the shebang that carries them, that shebang
 * really passes them to Node (run through /usr/bin/env -S as the kernel does), `npm start`
 * passes them too, and a server started without them says so.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SHEBANG, V8_FLAGS, missingV8Flags } from '../../src/cli/v8-flags.js';
import { run } from '../helpers/run.js';

const ROOT = path.resolve(import.meta.dirname, '../..');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-v8flags-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe('V8 flags of the blockgate command', () => {
  test('src/cli/main.ts starts with the shebang built from V8_FLAGS', () => {
    const first = fs.readFileSync(path.join(ROOT, 'src/cli/main.ts'), 'utf8').split('\n')[0];
    assert.equal(first, SHEBANG);
    assert.ok(V8_FLAGS.length > 0);
  });

  test('a script with that shebang, run as an executable, gets the flags in execArgv', async () => {
    const script = path.join(tmp, 'probe.mjs');
    fs.writeFileSync(script, `${SHEBANG}\nprocess.stdout.write(JSON.stringify(process.execArgv));\n`, { mode: 0o755 });
    // The shebang names `node`: put this Node first in PATH so the one under test runs.
    const r = await run(script, [], { timeoutMs: 30_000, env: { PATH: `${path.dirname(process.execPath)}:${process.env.PATH ?? ''}` } });
    assert.equal(r.code, 0, r.stderr);
    const execArgv = JSON.parse(r.stdout) as string[];
    assert.deepEqual(missingV8Flags(execArgv), []);
  });

  test('npm start passes the same flags', () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
    for (const f of V8_FLAGS) assert.ok(pkg.scripts.start!.includes(f), `npm start lacks ${f}`);
  });

  test('serve says when it was started without them, and not when it was started with them', async () => {
    const main = path.join(ROOT, 'src/cli/main.ts');
    const serve = ['serve', '-l', 'info', 'memory:1M', '--run', 'true'];
    const without = await run(process.execPath, ['--import', 'tsx', main, ...serve], { timeoutMs: 60_000 });
    assert.equal(without.code, 0, without.stderr);
    assert.match(without.stderr, /started without the V8 flags/);
    assert.match(without.stderr, new RegExp(V8_FLAGS[0]!));
    const withFlags = await run(process.execPath, [...V8_FLAGS, '--import', 'tsx', main, ...serve], { timeoutMs: 60_000 });
    assert.equal(withFlags.code, 0, withFlags.stderr);
    assert.match(withFlags.stderr, /"msg":"listening"/);
    assert.doesNotMatch(withFlags.stderr, /started without the V8 flags/);
  });

  test('missingV8Flags names exactly the absent flags', () => {
    assert.deepEqual(missingV8Flags([]), [...V8_FLAGS]);
    assert.deepEqual(missingV8Flags(['--inspect', ...V8_FLAGS]), []);
  });
});
