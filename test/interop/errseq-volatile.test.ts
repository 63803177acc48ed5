/**
 * Interop, FL6 "volatile" mode with a real client: a cow filter in volatile mode whose
 * upper store is modelled as an upper filesystem with a page cache (a writeback filter
 * with `maxDirty: 4096` over an error filter on write-back, over memory). A background
 * failure inside the upper store must fail the overlay for good, without consuming the
 * upper store's error, exactly as overlayfs volatile mounts do.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { nbdsh } from '../helpers/run.js';
import { startServer } from '../helpers/server.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import { ErrSeq } from '../../src/errseq/index.js';
import { CowFilter } from '../../src/filters/cow.js';

const SCENARIO_TIMEOUT_MS = 60_000;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-volatile-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

const PRELUDE = `
import os
uri = os.environ['uri']
def conn():
    c = nbd.NBD()
    c.connect_uri(uri)
    return c
def attempt(name, what, f):
    try:
        f()
        print(name, what, 'OK')
    except nbd.Error as e:
        print(name, what, e.errno)
A = b'\\x01' * 4096
B = b'\\x02' * 4096
C = b'\\x03' * 4096
`;

describe('errseq scenarios: FL6 volatile overlay', () => {
  for (const upper of ['memory', 'file'] as const) {
    test(`FL6 (${upper} upper) after an upper-store write-back failure every FLUSH, read and write fails EIO, for good`, async () => {
      const trigger = path.join(dir, `trigger-${upper}`);
      const s = await startServer([
        {
          name: '',
          backend: { type: 'pattern', size: '64M' },
          filters: [
            {
              type: 'cow',
              volatile: true,
              upper,
              ...(upper === 'file' ? { dir } : {}),
              upperFilters: [
                { type: 'writeback', maxDirty: 4096 },
                // Only from 64 KiB on: A's write-back (at 0) may still be in flight when the
                // trigger appears, and must not be the one that fails.
                { type: 'error', ops: ['writeback'], file: trigger, offset: 65536 },
              ],
            },
          ],
        },
      ]);
      try {
        const cow = s.exports[0]!.device as CowFilter;
        const r = await nbdsh(
          PRELUDE +
            `
h1 = conn()
attempt('h1', 'write', lambda: h1.pwrite(A, 0))
attempt('h1', 'flush', lambda: h1.flush())
open(${JSON.stringify(trigger)}, 'w').close()
attempt('h1', 'write', lambda: h1.pwrite(B, 65536))
# The upper cache has room for one write: this one is acknowledged only after B's upper
# write-back failed, or it is refused because the overlay already noticed. Either way the
# failure has happened once it returns, so its own outcome is not printed.
try:
    h1.pwrite(C, 131072)
except nbd.Error:
    pass
os.remove(${JSON.stringify(trigger)})
attempt('h1', 'flush', lambda: h1.flush())
attempt('h1', 'flush', lambda: h1.flush())
attempt('h1', 'read', lambda: h1.pread(4096, 0))
attempt('h1', 'write', lambda: h1.pwrite(A, 0))
h2 = conn()
attempt('h2', 'read', lambda: h2.pread(4096, 0))
attempt('h2', 'flush', lambda: h2.flush())
`,
          s.uri(),
          SCENARIO_TIMEOUT_MS,
        );
        assert.deepEqual(r.stdout.trim().split('\n'), [
          'h1 write OK',
          'h1 flush OK',
          'h1 write OK',
          'h1 flush EIO',
          'h1 flush EIO',
          'h1 read EIO',
          'h1 write EIO',
          'h2 read EIO',
          'h2 flush EIO',
        ]);
        assert.equal(cow.failed, true);
        // The overlay only looked: the upper store's error is still unseen by its own readers.
        assert.equal(cow.upperErrseq.describe().errorName, 'EIO');
        assert.equal(cow.upperErrseq.seen, false);
        assert.equal(cow.upperErrseq.sample(), 0, 'a new reader of the upper store would still be told');
      } finally {
        await s.close();
      }
    });
  }

  // Through a config the upper store is always fresh, so the refusal is shown on a
  // library-built overlay whose upper store already failed.
  test('FL6 attach is refused with EIO while the upper store has an unseen error, and allowed once it was seen', async () => {
    const upperErrseq = new ErrSeq();
    upperErrseq.set(5);
    const upper = new MemoryDevice({ size: 2 ** 20 });
    const base = new MemoryDevice({ size: 2 ** 20 });
    assert.throws(() => new CowFilter(base, { upper, upperErrseq, volatile: true }), {
      code: 'EIO',
      message: /unseen error/,
    });
    // "Sync upperdir fs to clear state": someone reports the error, then attach works.
    assert.equal(upperErrseq.checkAndAdvance(upperErrseq.sample()).error, 5);
    const cow = new CowFilter(base, { upper, upperErrseq, volatile: true });
    await cow.write(Buffer.alloc(10, 1), 0, 0);
    await cow.flush(0);
    assert.equal(cow.failed, false, 'the old, already reported error does not fail the overlay');
    upperErrseq.set(28);
    await assert.rejects(cow.flush(0), { code: 'EIO' });
    await cow.close();
  });
});
