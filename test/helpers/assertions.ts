/** Assertions shared by test files of several layers. */
import assert from 'node:assert/strict';
import { BlockError, type ErrnoCode } from '../../src/errors/index.js';

/** Asserts that `p` rejects with a BlockError of `code` whose message matches `re` when given. */
export async function rejectsWith(p: Promise<unknown>, code: ErrnoCode, re?: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof BlockError, `expected a BlockError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    if (re) assert.match(e.message, re);
    return true;
  });
}

/** Asserts two buffers are equal, naming the first differing byte (not dumping megabytes). */
export function assertSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  if (actual.equals(expected)) return;
  let i = 0;
  while (actual[i] === expected[i]) i++;
  assert.fail(`${what}: first difference at byte ${i}`);
}
