import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as v from 'valibot';
import { parseOrThrow, parseSettings } from '../../src/device/settings.js';

const Schema = v.object({ exports: v.array(v.object({ backend: v.object({ type: v.string('expected a string') }) })) });

test('parseOrThrow names the bad key as a config file spells it: exports[0].backend.type', () => {
  assert.throws(() => parseOrThrow(Schema, { exports: [{ backend: { type: 1 } }] }, 'db.json'), {
    code: 'EINVAL',
    message: 'db.json: exports[0].backend.type: expected a string',
  });
});

test('parseOrThrow names the value itself when the issue is about it, or leaves the key out', () => {
  const Num = v.number('expected a number');
  assert.throws(() => parseOrThrow(Num, 'x', 'db.json'), { message: 'db.json: (top level): expected a number' });
  assert.throws(() => parseOrThrow(Num, 'x', 'START', ''), { message: 'START: expected a number' });
  assert.throws(() => parseSettings('memory', Num, 'x'), { message: 'memory: (settings): expected a number' });
});
