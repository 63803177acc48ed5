import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockError, isBlockError, toBlockError } from '../../src/errors/index.js';

test('a BlockError from another copy of the module is recognised by its brand and passed through by toBlockError', async () => {
  // A query string makes the loader evaluate the module again: a second class, as when a
  // plugin bundles its own copy of blockgate.
  const copy = (await import(`../../src/errors/block-error.ts?copy=${Date.now()}`)) as typeof import('../../src/errors/block-error.js');
  assert.notEqual(copy.BlockError, BlockError);
  const foreign = new copy.BlockError('ENOSPC', 'from the other copy');
  assert.equal(foreign instanceof BlockError, false);
  assert.equal(isBlockError(foreign), true);
  const e = toBlockError(foreign);
  assert.equal(e, foreign, 'passed through, not wrapped as EIO');
  assert.equal(e.code, 'ENOSPC');
});

test('plain errors and look-alikes without the brand are not BlockErrors', () => {
  assert.equal(isBlockError(new Error('x')), false);
  assert.equal(isBlockError({ name: 'BlockError', code: 'EIO' }), false);
  assert.equal(isBlockError(null), false);
  assert.equal(toBlockError({ name: 'BlockError', code: 'ENOSPC' }).code, 'EIO');
});
