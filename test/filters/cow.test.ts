import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { EXTENT, REQ } from '../../src/device/types.js';
import { newStackContext as bareContext, type StackContext } from '../../src/device/stack.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import { FileDevice } from '../../src/backends/file.js';
import { ErrSeq } from '../../src/errseq/index.js';
import fc from 'fast-check';
import { BlockMap, COW_BLOCK_SIZE, CowFilter, cowFilter, type CowBlockState } from '../../src/filters/cow.js';
import { WritebackFilter } from '../../src/filters/writeback.js';
import { createStack, defaultRegistry } from '../../src/export/registry.js';
import { runContract } from '../backends/contract.js';
import { RecordingDevice } from './recording.js';

/** A context as buildStack hands it to a layer: the errseq and the registry (cow builds its upper store with it). */
const newStackContext = (): StackContext => ({ ...bareContext(), registry: defaultRegistry });

const SIZE = 2 ** 20 + 77;
const B = COW_BLOCK_SIZE;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-cow-test-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** The base: 0x42 in its first 64 KiB and 0x17 in [200000, 300000). */
async function base(): Promise<MemoryDevice> {
  const m = new MemoryDevice({ size: SIZE });
  await m.write(Buffer.alloc(B, 0x42), 0, 0);
  await m.write(Buffer.alloc(100000, 0x17), 200000, 0);
  return m;
}

function baseContents(offset: number, length: number): Buffer {
  const b = Buffer.alloc(SIZE);
  b.fill(0x42, 0, B);
  b.fill(0x17, 200000, 300000);
  return b.subarray(offset, offset + length);
}

function make(next: MemoryDevice, opts: { volatile?: boolean; errseq?: ErrSeq } = {}) {
  const upper = new RecordingDevice(new MemoryDevice({ size: SIZE }));
  const upperErrseq = opts.errseq ?? new ErrSeq();
  const dev = new CowFilter(next, { upper, upperErrseq, volatile: opts.volatile ?? false });
  return { dev, upper, upperErrseq };
}

async function readAt(dev: { read(b: Buffer, o: number, f: number): Promise<void> }, offset: number, length: number) {
  const buf = Buffer.alloc(length, 0xa5);
  await dev.read(buf, offset, 0);
  return buf;
}

runContract('cow over memory', async () => ({ dev: make(await base()).dev, cleanup: async () => undefined }), {
  initial: baseContents,
});

runContract(
  'cow (volatile, file upper) over memory',
  async () => ({
    dev: await cowFilter(await base(), { type: 'cow', upper: 'file', dir, volatile: true }, newStackContext()),
    cleanup: async () => undefined,
  }),
  { initial: baseContents },
);

describe('cow filter', () => {
  test('the base is never written; reads see the writes over the base', async () => {
    const b = await base();
    const { dev } = make(b);
    const data = randomBytes(100);
    await dev.write(data, 1000, 0);
    await dev.zero(250000, 1000, 0);
    await dev.trim(0, SIZE, 0);
    assert.deepEqual(await readAt(b, 0, 300000), baseContents(0, 300000), 'the base is unchanged');
    const expected = Buffer.from(baseContents(0, 300000));
    data.copy(expected, 1000);
    expected.fill(0, 250000, 251000);
    assert.deepEqual(await readAt(dev, 0, 300000), expected, 'the trim was a hint: the blocks keep their bytes');
    assert.equal(dev.allocatedBytes, 2 * B);
  });

  test('a partial write copies the rest of its block up from the base, at both ends', async () => {
    const b = await base();
    const { dev, upper } = make(b);
    // From inside block 3 to inside block 4: block 3 holds 0x17 from 200000.
    const at = 3 * B + 10;
    await dev.write(Buffer.alloc(B, 9), at, 0);
    const expected = Buffer.from(baseContents(3 * B, 2 * B));
    expected.fill(9, 10, 10 + B);
    assert.deepEqual(await readAt(dev, 3 * B, 2 * B), expected);
    assert.deepEqual(await readAt(upper.next, 3 * B, 2 * B), expected, 'the upper store holds whole blocks');
    assert.deepEqual(
      upper.of('write').map((c) => [c.offset, c.length]),
      [
        [3 * B, 10],
        [4 * B + 10, B - 10],
        [at, B],
      ],
    );
  });

  test('the last, short block is copied up only to the end of the device', async () => {
    const b = await base();
    const { dev } = make(b);
    await dev.write(Buffer.alloc(1, 1), SIZE - 50, 0);
    const expected = Buffer.alloc(77);
    expected[27] = 1;
    assert.deepEqual(await readAt(dev, SIZE - 77, 77), expected);
  });

  test('concurrent partial writes into one new block both survive', async () => {
    const b = await base();
    const { dev } = make(b);
    await Promise.all([dev.write(Buffer.alloc(10, 1), 100, 0), dev.write(Buffer.alloc(10, 2), 5000, 0), dev.zero(9000, 10, 0)]);
    const expected = Buffer.alloc(B, 0x42);
    expected.fill(1, 100, 110);
    expected.fill(2, 5000, 5010);
    expected.fill(0, 9000, 9010);
    assert.deepEqual(await readAt(dev, 0, B), expected);
  });

  test('extents: blocks in the upper store are data, zero blocks read as zero, the rest is as the base says', async () => {
    const b = await base();
    const { dev } = make(b);
    await dev.zero(10 * B, 2 * B, 0);
    await dev.write(Buffer.alloc(1), 13 * B, 0);
    assert.deepEqual(await dev.extents(8 * B, 6 * B, 0), [
      { offset: 8 * B, length: 2 * B, flags: EXTENT.HOLE | EXTENT.ZERO },
      { offset: 10 * B, length: 2 * B, flags: EXTENT.ZERO },
      { offset: 12 * B, length: B, flags: EXTENT.HOLE | EXTENT.ZERO },
      { offset: 13 * B, length: B, flags: 0 },
    ]);
    assert.deepEqual(await dev.extents(8 * B, 6 * B, REQ.REQ_ONE), [{ offset: 8 * B, length: 2 * B, flags: EXTENT.HOLE | EXTENT.ZERO }]);
  });

  test('zeroing whole blocks stores nothing; only partial end blocks are written', async () => {
    const b = await base();
    const { dev, upper } = make(b);
    await dev.write(Buffer.alloc(B, 5), 5 * B, 0);
    assert.equal(dev.allocatedBytes, B);
    await dev.zero(100, SIZE - 100, 0); // to the end: the short last block counts as whole
    assert.deepEqual(
      upper.calls.filter((c) => c.op !== 'read').map((c) => `${c.op}@${c.offset}+${c.length}`),
      [`write@${5 * B}+${B}`, 'write@0+100', 'zero@100+65436', `trim@${5 * B}+${B}`],
    );
    assert.equal(dev.blockState(0), 'upper');
    assert.equal(dev.blockState(5 * B), 'zero');
    assert.equal(dev.blockState(SIZE - 1), 'zero');
    assert.equal(dev.allocatedBytes, B);
    const expected = Buffer.alloc(300000);
    expected.fill(0x42, 0, 100);
    assert.deepEqual(await readAt(dev, 0, 300000), expected);
    assert.deepEqual(await readAt(dev, SIZE - 1000, 1000), Buffer.alloc(1000));
  });

  test('a partial write into a zero block copies up zeroes, not the base', async () => {
    const b = await base();
    const { dev } = make(b);
    await dev.zero(0, B, 0);
    assert.equal(dev.blockState(0), 'zero');
    await dev.write(Buffer.alloc(10, 9), 1000, 0);
    const expected = Buffer.alloc(B);
    expected.fill(9, 1000, 1010);
    assert.deepEqual(await readAt(dev, 0, B), expected);
    assert.equal(dev.blockState(0), 'upper');
  });

  test('BlockMap matches a per-block model under random set() calls (property)', () => {
    const N = 64;
    fc.assert(
      fc.property(
        fc.array(fc.record({ s: fc.nat(N - 1), n: fc.integer({ min: 1, max: 20 }), state: fc.constantFrom('upper', 'zero') }), {
          maxLength: 40,
        }),
        (ops) => {
          const map = new BlockMap();
          const model: CowBlockState[] = Array.from({ length: N }, () => 'base');
          for (const o of ops) {
            const e = Math.min(N, o.s + o.n);
            map.set(o.s, e, o.state as 'upper' | 'zero');
            for (let i = o.s; i < e; i++) model[i] = o.state as CowBlockState;
          }
          for (let i = 0; i < N; i++) assert.equal(map.get(i), model[i], `block ${i}`);
          const runs = map.runs(0, N);
          let pos = 0;
          for (const [k, r] of runs.entries()) {
            assert.equal(r.start, pos);
            assert.ok(r.end > r.start);
            if (k > 0) assert.notEqual(r.state, runs[k - 1]!.state, 'runs are maximal');
            for (let i = r.start; i < r.end; i++) assert.equal(model[i], r.state);
            pos = r.end;
          }
          assert.equal(pos, N);
          assert.equal(map.count('upper'), model.filter((x) => x === 'upper').length);
          for (let i = 0; i + 3 <= N; i += 3) {
            assert.equal(map.covers(i, i + 3, 'upper'), model.slice(i, i + 3).every((x) => x === 'upper'));
          }
        },
      ),
      { numRuns: 300 },
    );
  });

  test('capabilities: writable over a read-only base; FAST_ZERO is refused', async () => {
    const ro = new MemoryDevice({ size: SIZE, readonly: true });
    const { dev } = make(ro);
    assert.equal(dev.capabilities.write, true);
    assert.equal(dev.capabilities.multiConn, true);
    await dev.write(Buffer.alloc(10, 1), 0, 0);
    assert.deepEqual(await readAt(dev, 0, 10), Buffer.alloc(10, 1));
    await assert.rejects(dev.zero(0, 10, REQ.FAST_ZERO), { code: 'EOPNOTSUPP' });
  });

  test('refuses an upper store smaller than the base, or read-only', async () => {
    const b = await base();
    assert.throws(() => new CowFilter(b, { upper: new MemoryDevice({ size: 10 }), upperErrseq: new ErrSeq() }), {
      code: 'EINVAL',
      message: /smaller than the base/,
    });
    assert.throws(
      () => new CowFilter(b, { upper: new MemoryDevice({ size: SIZE, readonly: true }), upperErrseq: new ErrSeq() }),
      { code: 'EINVAL', message: /read-only/ },
    );
  });

  test('close closes the upper store and the base', async () => {
    const b = await base();
    const { dev, upper } = make(b);
    await dev.close();
    await assert.rejects(upper.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
    await assert.rejects(b.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
  });

  describe('normal mode', () => {
    test('flush and FUA flush the upper store', async () => {
      const { dev, upper } = make(await base());
      await dev.write(Buffer.alloc(10), 0, REQ.FUA);
      await dev.flush(0);
      assert.equal(upper.of('flush').length, 2);
    });

    test('an upper store write-back error is reported by the next flush, once', async () => {
      const { dev, upperErrseq } = make(await base());
      await dev.write(Buffer.alloc(10), 0, 0);
      upperErrseq.set(28);
      await assert.rejects(dev.write(Buffer.alloc(10), 0, REQ.FUA).then(() => dev.flush(0)), { code: 'ENOSPC' });
      await dev.flush(0);
      assert.equal(upperErrseq.seen, true, 'the overlay consumed it, like a file open on the upper filesystem');
    });

    test('an unseen upper error from before attach is reported at the first flush (it was never reported)', async () => {
      const errseq = new ErrSeq();
      errseq.set(5);
      const { dev } = make(await base(), { errseq });
      await assert.rejects(dev.flush(0), { code: 'EIO' });
      await dev.flush(0);
    });
  });

  describe('volatile mode (FL6)', () => {
    test('never flushes the upper store, not even for FUA', async () => {
      const { dev, upper } = make(await base(), { volatile: true });
      await dev.write(Buffer.alloc(10), 0, REQ.FUA);
      await dev.zero(0, 10, REQ.FUA);
      await dev.flush(0);
      assert.equal(upper.of('flush').length, 0);
      assert.equal(dev.failed, false);
      assert.match(dev.description, /copy-on-write, volatile/);
    });

    test('attach is refused with EIO while the upper store has an unseen error', async () => {
      const errseq = new ErrSeq();
      errseq.set(5);
      await assert.rejects(async () => make(await base(), { volatile: true, errseq }), {
        code: 'EIO',
        message: /unseen error/,
      });
      assert.equal(errseq.seen, false, 'refusing did not consume the error');
      assert.equal(errseq.sample(), 0, 'a later reader of the upper store still sees it');
    });

    test('an error already seen before attach is not held against the overlay', async () => {
      const errseq = new ErrSeq();
      errseq.set(5);
      errseq.checkAndAdvance(0);
      const { dev } = make(await base(), { volatile: true, errseq });
      await dev.flush(0);
      assert.equal(dev.failed, false);
    });

    test('once the upper store has an error, every later flush, read and write fails EIO, for good', async () => {
      const { dev, upperErrseq } = make(await base(), { volatile: true });
      const reader = upperErrseq.sample(); // another reader of the upper store
      await dev.write(Buffer.alloc(10, 1), 0, 0);
      upperErrseq.set(28);
      assert.equal(dev.failed, true);
      for (let i = 0; i < 3; i++) await assert.rejects(dev.flush(0), { code: 'EIO', message: /will not recover/ });
      await assert.rejects(dev.read(Buffer.alloc(10), 0, 0), { code: 'EIO' });
      await assert.rejects(dev.write(Buffer.alloc(10), 0, 0), { code: 'EIO' });
      await assert.rejects(dev.zero(0, 10, 0), { code: 'EIO' });
      await assert.rejects(dev.trim(0, 10, 0), { code: 'EIO' });
      await assert.rejects(dev.extents(0, 10, 0), { code: 'EIO' });
      await assert.rejects(dev.cache(0, 10, 0), { code: 'EIO' });
      // Checking never consumed: the upper store's own readers still get the error once.
      assert.equal(upperErrseq.seen, false);
      assert.equal(upperErrseq.checkAndAdvance(reader).error, 28);
      // Consuming it elsewhere (SEEN set) does not revive the overlay, and it is no phantom for it.
      await assert.rejects(dev.flush(0), { code: 'EIO' });
      await dev.close();
    });

    test('a read that overlaps an upper failure fails rather than return what the failure left behind', async () => {
      const { dev, upperErrseq } = make(await base(), { volatile: true });
      await dev.write(Buffer.alloc(B, 1), 0, 0);
      const upperRead = dev.upper.read.bind(dev.upper);
      dev.upper.read = async (buf, offset, flags) => {
        await upperRead(buf, offset, flags);
        upperErrseq.set(5); // the upper store's write-back fails while the read is in flight
      };
      await assert.rejects(dev.read(Buffer.alloc(10), 0, 0), { code: 'EIO' });
    });

    test('with an upper store modelled as writeback + error filters: a background upper failure fails the overlay', async () => {
      const trigger = path.join(dir, 'upper-trigger');
      const dev = (await cowFilter(
        await base(),
        {
          type: 'cow',
          volatile: true,
          upperFilters: [{ type: 'writeback', maxDirty: 4096 }, { type: 'error', ops: ['writeback'], file: trigger }],
        },
        newStackContext(),
      )) as CowFilter;
      assert.ok(dev.upper instanceof WritebackFilter);
      await dev.write(Buffer.alloc(4096, 1), 0, 0);
      await dev.flush(0);
      fs.writeFileSync(trigger, '');
      await dev.write(Buffer.alloc(4096, 2), 8192, 0);
      // The upper store's own write-out (its flush records failures, consumes nothing):
      // after it, the background failure has certainly happened.
      await dev.upper.flush(0);
      fs.rmSync(trigger);
      assert.equal(dev.upperErrseq.peekError(), 5);
      assert.equal(dev.failed, true);
      await assert.rejects(dev.flush(0), { code: 'EIO' });
      await dev.close();
    });
  });

  describe('factory', () => {
    test('without a stack registry in its context, cow refuses with EINVAL instead of importing one', async () => {
      await assert.rejects(cowFilter(await base(), { type: 'cow' }, bareContext()), { code: 'EINVAL', message: /needs a stack registry/ });
    });

    test('memory upper by default, of the base size, with its own ErrSeq', async () => {
      const ctx = newStackContext();
      const dev = (await cowFilter(await base(), { type: 'cow' }, ctx)) as CowFilter;
      assert.ok(dev.upper instanceof MemoryDevice);
      assert.equal(dev.upper.size, SIZE);
      assert.notEqual(dev.upperErrseq, ctx.errseq);
      assert.equal(dev.volatile, false);
      await dev.close();
    });

    test("upper: 'file' makes a temporary file in dir and removes it at close", async () => {
      const d = fs.mkdtempSync(path.join(dir, 'files-'));
      const dev = (await cowFilter(await base(), { type: 'cow', upper: 'file', dir: d }, newStackContext())) as CowFilter;
      assert.ok(dev.upper instanceof FileDevice);
      const made = fs.readdirSync(d);
      assert.equal(made.length, 1);
      await dev.write(Buffer.alloc(10, 3), 100, REQ.FUA);
      assert.deepEqual(await readAt(dev, 100, 10), Buffer.alloc(10, 3));
      await dev.close();
      assert.deepEqual(fs.readdirSync(d), []);
    });

    test('the registry builds it over any backend', async () => {
      const dev = await createStack({ backend: { type: 'pattern', size: '1M' }, filters: [{ type: 'cow' }] });
      assert.equal(dev.capabilities.write, true);
      await dev.write(Buffer.alloc(8, 0xff), 8, 0);
      const b = await readAt(dev, 0, 24);
      assert.deepEqual(b.subarray(8, 16), Buffer.alloc(8, 0xff));
      await dev.close();
    });

    const bad: [Record<string, unknown>, RegExp][] = [
      [{ upper: 'disk' }, /^cow: upper: expected one of memory, file/],
      [{ volatile: 'yes' }, /^cow: volatile: expected true or false/],
      [{ dir: '/tmp' }, /^cow: dir: only used with upper: 'file'/],
      [{ upperFilters: 'writeback' }, /^cow: upperFilters: expected a list/],
      [{ upperFilters: [{ kind: 'x' }] }, /^cow: upperFilters\[0\]\.type: /],
      [{ upperFilters: [{ type: 'writeback', maxDirty: 'x' }] }, /^cow: upperFilters: writeback: maxDirty: /],
      [{ upperFilters: [{ type: 'nope' }] }, /^cow: upperFilters: unknown filter 'nope'/],
      [{ uper: 'memory' }, /^cow: uper: unknown setting/],
    ];
    for (const [settings, message] of bad) {
      test(`rejects ${JSON.stringify(settings)}`, async () => {
        await assert.rejects(cowFilter(await base(), { type: 'cow', ...settings }, newStackContext()), { code: 'EINVAL', message });
      });
    }

    test('a dir that cannot hold the temporary file is reported with its errno, naming the key', async () => {
      await assert.rejects(
        cowFilter(await base(), { type: 'cow', upper: 'file', dir: path.join(dir, 'missing', 'deeper') }, newStackContext()),
        { code: 'ENOENT', message: /^cow: dir: cannot create a temporary directory/ },
      );
    });
  });
});
