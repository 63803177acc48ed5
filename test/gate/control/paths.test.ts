import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { defaultControlPath } from '../../../src/gate/control/server.js';

test('defaultControlPath: $XDG_RUNTIME_DIR/blockgate/ctl.sock, else <tmp>/blockgate-<uid>/ctl.sock', () => {
  assert.equal(defaultControlPath({ XDG_RUNTIME_DIR: '/run/user/1000' }, 1000), '/run/user/1000/blockgate/ctl.sock');
  assert.equal(defaultControlPath({}, 1000), path.join(os.tmpdir(), 'blockgate-1000', 'ctl.sock'));
  assert.equal(defaultControlPath({ XDG_RUNTIME_DIR: 'relative' }, 7), path.join(os.tmpdir(), 'blockgate-7', 'ctl.sock'));
});

test('the control protocol codec reads nothing from the process (no env, no uid)', () => {
  const src = fs.readFileSync(new URL('../../../src/gate/control/protocol.ts', import.meta.url), 'utf8');
  assert.doesNotMatch(src, /\bprocess\./);
  assert.doesNotMatch(src, /from 'node:(os|fs|net|path)'/);
});
