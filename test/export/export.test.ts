import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/backends/memory.js';
import { ErrSeq } from '../../src/errseq/index.js';
import { Export, recordStackErrseq, stackErrseqOf } from '../../src/export/export.js';

test('an Export without errseq takes the ErrSeq recorded for its device stack', () => {
  const device = new MemoryDevice({ size: 1 << 20 });
  const errseq = new ErrSeq();
  recordStackErrseq(device, errseq);
  assert.equal(stackErrseqOf(device), errseq);
  assert.equal(new Export({ name: '', device }).errseq, errseq);
  assert.equal(new Export({ name: '', device, errseq }).errseq, errseq, 'the same one, explicitly, is fine');
});

test('an Export given an errseq other than its stack’s recorded one is refused with EINVAL', () => {
  const device = new MemoryDevice({ size: 1 << 20 });
  recordStackErrseq(device, new ErrSeq());
  assert.throws(() => new Export({ name: 'x', device, errseq: new ErrSeq() }), { code: 'EINVAL' });
  assert.throws(() => recordStackErrseq(device, new ErrSeq()), { code: 'EINVAL' });
});

test('an Export of a device with no recorded ErrSeq makes its own or takes the one given', () => {
  const device = new MemoryDevice({ size: 1 << 20 });
  assert.ok(new Export({ name: '', device }).errseq instanceof ErrSeq);
  const errseq = new ErrSeq();
  assert.equal(new Export({ name: '', device, errseq }).errseq, errseq);
});
