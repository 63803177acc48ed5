import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { REQ } from '../../src/device/types.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import { BlockError, linuxErrno } from '../../src/errors/index.js';
import { ERROR_OPS, ErrorFilter, Xorshift32, errorFilter, type ErrorOptions } from '../../src/filters/error.js';
import { REQ_WRITEBACK } from '../../src/filters/writeback.js';
import { runContract } from '../backends/contract.js';

const SIZE = 2 ** 20;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-error-test-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

function make(options: ErrorOptions = {}): { dev: ErrorFilter; mem: MemoryDevice } {
  const mem = new MemoryDevice({ size: SIZE });
  return { dev: new ErrorFilter(mem, options), mem };
}

/** Runs one request of `op` (write-back flavoured for 'writeback') and says whether it failed. */
async function fails(dev: ErrorFilter, op: (typeof ERROR_OPS)[number], offset = 0, length = 512): Promise<string | null> {
  const run = (): Promise<unknown> => {
    switch (op) {
      case 'read':
        return dev.read(Buffer.alloc(length), offset, 0);
      case 'write':
        return dev.write(Buffer.alloc(length, 1), offset, 0);
      case 'writeback':
        return dev.write(Buffer.alloc(length, 1), offset, REQ_WRITEBACK);
      case 'flush':
        return dev.flush(0);
      case 'trim':
        return dev.trim(offset, length, 0);
      case 'zero':
        return dev.zero(offset, length, 0);
      case 'extents':
        return dev.extents(offset, length, 0);
      case 'cache':
        return dev.cache(offset, length, 0);
    }
  };
  try {
    await run();
    return null;
  } catch (e) {
    assert.ok(e instanceof BlockError);
    return e.code;
  }
}

runContract(
  'error filter (trigger file absent) over memory',
  async () => ({ dev: make({ file: path.join(dir, 'never') }).dev, cleanup: async () => undefined }),
  { initial: (_o, n) => Buffer.alloc(n) },
);

describe('error filter', () => {
  test('by default every operation fails EIO, before reaching the layer below', async () => {
    const { dev, mem } = make();
    for (const op of ERROR_OPS) assert.equal(await fails(dev, op), 'EIO', op);
    assert.equal(dev.injected, ERROR_OPS.length);
    assert.equal(mem.allocatedBytes, 0, 'the failed writes did not happen');
    const e = await dev.read(Buffer.alloc(1), 4096, 0).then(
      () => assert.fail('the read must fail'),
      (x: unknown) => x as BlockError,
    );
    assert.equal(e.errno, linuxErrno('EIO'));
    assert.equal(e.offset, 4096);
    assert.match(e.message, /injected EIO/);
  });

  test('any errno of the table can be injected', async () => {
    for (const code of ['ENOSPC', 'EDQUOT', 'EPERM', 'ESHUTDOWN'] as const) {
      assert.equal(await fails(make({ error: code }).dev, 'write'), code);
    }
  });

  test('ops chooses the operations; the others pass through', async () => {
    const { dev } = make({ ops: ['flush', 'extents'] });
    for (const op of ERROR_OPS) {
      assert.equal(await fails(dev, op), op === 'flush' || op === 'extents' ? 'EIO' : null, op);
    }
  });

  test("'writeback' fails only write-back requests (REQ_WRITEBACK); 'write' fails every write", async () => {
    const wb = make({ ops: ['writeback'] }).dev;
    assert.equal(await fails(wb, 'write'), null);
    assert.equal(await fails(wb, 'writeback'), 'EIO');
    await assert.rejects(wb.zero(0, 10, REQ_WRITEBACK | REQ.NO_HOLE), { code: 'EIO' });
    await assert.rejects(wb.trim(0, 10, REQ_WRITEBACK), { code: 'EIO' });
    await wb.zero(0, 10, REQ.NO_HOLE);
    await wb.flush(REQ_WRITEBACK);
    assert.match((await wb.write(Buffer.alloc(1), 0, REQ_WRITEBACK).catch((e: Error) => e))!.message, /write-back write/);
    const w = make({ ops: ['write'] }).dev;
    assert.equal(await fails(w, 'write'), 'EIO');
    assert.equal(await fails(w, 'writeback'), 'EIO');
  });

  test('offset and length restrict failures to requests that meet the range; flush always meets it', async () => {
    const { dev } = make({ offset: 4096, length: 4096 });
    assert.equal(await fails(dev, 'read', 0, 4096), null, 'ends where the range starts');
    assert.equal(await fails(dev, 'read', 0, 4097), 'EIO');
    assert.equal(await fails(dev, 'write', 8191, 1), 'EIO');
    assert.equal(await fails(dev, 'write', 8192, 100), null, 'starts where the range ends');
    assert.equal(await fails(dev, 'read', 4096, 0), 'EIO', 'a zero-length request inside the range');
    assert.equal(await fails(dev, 'flush'), 'EIO');
    const tail = make({ offset: SIZE - 1 }).dev;
    assert.equal(await fails(tail, 'read', 0, 100), null);
    assert.equal(await fails(tail, 'read', SIZE - 1, 1), 'EIO');
  });

  test('the trigger file turns failures on and off, checked per request', async () => {
    const trigger = path.join(dir, 'trigger');
    const { dev } = make({ file: trigger });
    assert.equal(await fails(dev, 'write'), null);
    fs.writeFileSync(trigger, '');
    assert.equal(await fails(dev, 'write'), 'EIO');
    assert.equal(await fails(dev, 'read'), 'EIO');
    fs.rmSync(trigger);
    assert.equal(await fails(dev, 'write'), null);
    assert.equal(dev.injected, 2);
  });

  test('count bounds the failures in all; requests that do not qualify do not use it up', async () => {
    const { dev } = make({ count: 2, ops: ['write'] });
    assert.equal(await fails(dev, 'read'), null);
    assert.equal(await fails(dev, 'write'), 'EIO');
    assert.equal(await fails(dev, 'write'), 'EIO');
    assert.equal(await fails(dev, 'write'), null);
    assert.equal(dev.injected, 2);
    assert.equal(await fails(make({ count: 0 }).dev, 'write'), null);
  });

  test('rate with a seed gives the same failure pattern on every run; 0 never fails, 1 always', async () => {
    const pattern = async (opts: ErrorOptions): Promise<string> => {
      const { dev } = make(opts);
      let s = '';
      for (let i = 0; i < 200; i++) s += (await fails(dev, 'read')) ? 'x' : '.';
      return s;
    };
    const a = await pattern({ rate: 0.3, seed: 42 });
    assert.equal(await pattern({ rate: 0.3, seed: 42 }), a);
    assert.notEqual(await pattern({ rate: 0.3, seed: 43 }), a);
    const failures = [...a].filter((c) => c === 'x').length;
    assert.ok(failures > 0 && failures < 200, `some but not all fail (${failures})`);
    assert.equal(await pattern({ rate: 0, seed: 1 }), '.'.repeat(200));
    assert.equal(await pattern({ rate: 1 }), 'x'.repeat(200));
  });

  test('rate and count together: the PRNG is drawn only for requests that passed the other checks', async () => {
    const run = async (): Promise<string> => {
      const { dev } = make({ rate: 0.5, seed: 7, count: 5, ops: ['write'] });
      let s = '';
      for (let i = 0; i < 40; i++) {
        await fails(dev, 'read'); // does not qualify: must not shift the sequence
        s += (await fails(dev, 'write')) ? 'x' : '.';
      }
      return s;
    };
    const s = await run();
    assert.equal([...s].filter((c) => c === 'x').length, 5);
    assert.equal(await run(), s);
  });

  test('Xorshift32 is deterministic, in [0, 1), and survives a zero seed', () => {
    const a = new Xorshift32(123);
    const b = new Xorshift32(123);
    for (let i = 0; i < 1000; i++) {
      const x = a.next();
      assert.equal(b.next(), x);
      assert.ok(x >= 0 && x < 1);
    }
    const z = new Xorshift32(0);
    assert.notEqual(z.next(), 0);
  });

  describe('factory', () => {
    const mem = new MemoryDevice({ size: SIZE });
    const bad: [Record<string, unknown>, RegExp][] = [
      [{ error: 'EFOO' }, /^error: error: expected an errno name/],
      [{ error: 5 }, /^error: error: /],
      [{ ops: ['read', 'frobnicate'] }, /^error: ops\[1\]: expected one of read, write, flush/],
      [{ ops: [] }, /^error: ops: must name at least one operation/],
      [{ ops: 'read' }, /^error: ops: expected a list/],
      [{ rate: 1.5 }, /^error: rate: must be from 0 to 1/],
      [{ rate: -0.1 }, /^error: rate: must be from 0 to 1/],
      [{ count: 1.5 }, /^error: count: expected a whole number/],
      [{ count: -1 }, /^error: count: must not be negative/],
      [{ offset: 'far' }, /^error: offset: /],
      [{ length: -5 }, /^error: length: /],
      [{ file: '' }, /^error: file: must not be empty/],
      [{ seed: 'x' }, /^error: seed: expected a whole number/],
      [{ probability: 1 }, /^error: probability: unknown setting/],
    ];
    for (const [settings, message] of bad) {
      test(`rejects ${JSON.stringify(settings)}`, () => {
        assert.throws(() => errorFilter(mem, { type: 'error', ...settings }), { code: 'EINVAL', message });
      });
    }

    test('accepts every setting; sizes take suffixes', async () => {
      const dev = errorFilter(mem, {
        type: 'error',
        error: 'ENOSPC',
        ops: ['write'],
        rate: 1,
        count: 1,
        offset: '4K',
        length: '4K',
        seed: 9,
      });
      assert.equal(await fails(dev, 'write', 0, 10), null);
      assert.equal(await fails(dev, 'write', 4096, 10), 'ENOSPC');
      assert.equal(await fails(dev, 'write', 4096, 10), null);
      assert.match(dev.description, /error: ENOSPC on write/);
    });
  });
});
