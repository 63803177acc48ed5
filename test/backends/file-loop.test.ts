/**
 * Issue 11 item 2: a large WRITE_ZEROES or CACHE on an inline (RAM-backed) file device
 * must not hold the event loop for the whole request.
 *
 * No wall-clock assertions: the loop turns are counted by a setImmediate ticker, and the
 * synchronous fs calls the backend makes are wrapped (through the builtin module object,
 * which `syncBuiltinESMExports` publishes to the backend's `import * as fs`) to add up
 * the bytes each turn moved and the bytes a cache() read in total.
 */
import { after, afterEach, beforeEach, describe, test, mock } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import * as os from 'node:os';
import * as path from 'node:path';
import { CACHE_READAHEAD_MAX, FileDevice, INLINE_IO_MAX } from '../../src/backends/file.js';

/**
 * The request length: 64 MiB, many times INLINE_IO_MAX (so a loop that never turns is
 * plain to see) yet small enough that tmpfs does not have to hold a gibibyte.
 */
const LARGE = 64 * 2 ** 20;

const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
const root = fs.mkdtempSync(path.join(base, 'blockgate-file-loop-'));
after(() => fs.rmSync(root, { recursive: true, force: true }));

/** Counts loop turns and the bytes of synchronous and asynchronous I/O in each. */
class LoopProbe {
  turn = 0;
  /** Bytes moved by readSync/writeSync, per turn number. */
  readonly syncBytes = new Map<number, number>();
  /** Bytes requested by every read (sync or through the thread pool). */
  readBytes = 0;
  #stopped = false;

  constructor() {
    const tick = () => {
      if (this.#stopped) return;
      this.turn++;
      setImmediate(tick);
    };
    setImmediate(tick);
    const addSync = (n: number) => this.syncBytes.set(this.turn, (this.syncBytes.get(this.turn) ?? 0) + n);
    const writeSync = fs.writeSync;
    const readSync = fs.readSync;
    const read = fs.read;
    // The backend calls the positional forms (fd, buffer, offset, length, position).
    mock.method(fs, 'writeSync', (...args: unknown[]) => {
      const n = (writeSync as (...a: unknown[]) => number)(...args);
      addSync(n);
      return n;
    });
    mock.method(fs, 'readSync', (...args: unknown[]) => {
      const n = (readSync as (...a: unknown[]) => number)(...args);
      addSync(n);
      this.readBytes += n;
      return n;
    });
    mock.method(fs, 'read', (...args: unknown[]) => {
      if (typeof args[3] === 'number') this.readBytes += args[3];
      return (read as (...a: unknown[]) => void)(...args);
    });
    syncBuiltinESMExports();
  }

  /** The most bytes of synchronous I/O done in one loop turn. */
  get maxSyncPerTurn(): number {
    return Math.max(0, ...this.syncBytes.values());
  }

  stop(): void {
    this.#stopped = true;
    mock.restoreAll();
    syncBuiltinESMExports();
  }
}

describe('file: large requests on an inline device leave the event loop turning', () => {
  let dev: FileDevice;
  let file: string;
  let probe: LoopProbe | undefined;

  beforeEach(async () => {
    file = path.join(root, 'disk.img');
    dev = await FileDevice.open({ path: file, create: true, size: LARGE, io: 'inline' });
    assert.equal(dev.nonBlocking, true);
  });

  afterEach(async () => {
    probe?.stop();
    probe = undefined;
    await dev.close();
    fs.rmSync(file, { force: true });
  });

  test('zero() of many chunks: the loop turns before it completes, each turn stays within INLINE_IO_MAX', async () => {
    // Marks at both ends and in the middle, so the zeroes are seen to land.
    const mark = Buffer.alloc(4096, 0xa5);
    for (const at of [0, LARGE / 2, LARGE - mark.length]) await dev.write(mark, at, 0);

    probe = new LoopProbe();
    let zeroDone = false;
    const zeroing = dev.zero(0, LARGE, 0).then(() => (zeroDone = true));
    const turnedFirst = new Promise<boolean>((resolve) => setImmediate(() => resolve(!zeroDone)));
    assert.equal(await turnedFirst, true, 'a setImmediate callback ran only after the whole zero()');
    await zeroing;
    const turns = probe.turn;
    const maxSync = probe.maxSyncPerTurn;
    probe.stop();
    probe = undefined;

    assert.ok(maxSync <= INLINE_IO_MAX, `one loop turn did ${maxSync} bytes of synchronous I/O`);
    assert.ok(turns >= 2, `the loop turned ${turns} times during the zero()`);
    for (const at of [0, LARGE / 2, LARGE - mark.length]) {
      const got = Buffer.alloc(mark.length, 1);
      await dev.read(got, at, 0);
      assert.deepEqual(got, Buffer.alloc(mark.length), `zeroes at ${at}`);
    }
  });

  test('cache() of a large range reads at most CACHE_READAHEAD_MAX, and no turn more than INLINE_IO_MAX', async () => {
    probe = new LoopProbe();
    let cacheDone = false;
    const caching = dev.cache(0, LARGE, 0).then(() => (cacheDone = true));
    const turnedFirst = new Promise<boolean>((resolve) => setImmediate(() => resolve(!cacheDone)));
    const turned = await turnedFirst;
    await caching;
    const { readBytes, maxSyncPerTurn } = probe;
    probe.stop();
    probe = undefined;

    assert.ok(readBytes > 0, 'cache() read nothing at all');
    assert.ok(readBytes <= CACHE_READAHEAD_MAX, `cache() read ${readBytes} bytes`);
    assert.ok(maxSyncPerTurn <= INLINE_IO_MAX, `one loop turn did ${maxSyncPerTurn} bytes of synchronous I/O`);
    // A readahead above INLINE_IO_MAX is not done inline, so the loop turns under it.
    if (CACHE_READAHEAD_MAX > INLINE_IO_MAX) assert.equal(turned, true, 'a setImmediate ran only after cache()');
  });

  test('cache() near the end of the device reads only up to the end of the range', async () => {
    probe = new LoopProbe();
    await dev.cache(LARGE - 8192, 8192, 0);
    const { readBytes } = probe;
    probe.stop();
    probe = undefined;
    assert.equal(readBytes, 8192);
  });
});
