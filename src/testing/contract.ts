/**
 * The contract every backend keeps (`blockgate/testing`), run by each backend's own test
 * file and by plugin authors' (node:test):
 *
 *   runContract('memory', async () => ({ dev: new MemoryDevice({ size }), cleanup: async () => {} }));
 *
 * Cases are chosen by the device's capabilities (a read-only device gets the EPERM
 * cases instead of the write cases), never skipped. Each case gets a fresh device from
 * `make` and calls `cleanup` afterwards. Devices should be at least MIN_CONTRACT_SIZE
 * bytes; a size that is not a multiple of any page size exercises tail handling.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { isBlockError } from '../errors/index.js';
import { EXTENT, REQ, type BlockDevice, type Extent } from '../device/types.js';

/**
 * Devices under contract must be at least this big: 300 KiB (the cases write 64 KiB near
 * both ends, and up to 300000 bytes from the start).
 */
export const MIN_CONTRACT_SIZE = 300 * 1024;

export interface ContractOptions {
  /**
   * The device's bytes before anything is written, for checking reads of a fresh
   * device. Omit when fresh contents are unspecified.
   */
  readonly initial?: (offset: number, length: number) => Buffer;
  /**
   * Writes are kept and read back (false for the null backend, which discards them and
   * always reads zeroes).
   * @default true
   */
  readonly stores?: boolean;
}

export interface DeviceUnderTest {
  readonly dev: BlockDevice;
  /** Removes whatever `make` created (temp files); the contract closes the device itself. */
  readonly cleanup: () => Promise<void>;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

async function readAt(dev: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length, 0xa5);
  await dev.read(buf, offset, 0);
  return buf;
}

/** Asserts the shape every extents() answer must have, and returns it. */
export function checkExtents(dev: BlockDevice, extents: Extent[], offset: number): Extent[] {
  assert.ok(extents.length > 0, `extents at ${offset} must not be empty`);
  assert.equal(extents[0]!.offset, offset, 'the first extent starts at the requested offset');
  let pos = offset;
  for (const e of extents) {
    assert.equal(e.offset, pos, 'extents are contiguous');
    assert.ok(Number.isSafeInteger(e.length) && e.length > 0, `extent length ${e.length} must be positive`);
    assert.equal(e.flags & ~(EXTENT.HOLE | EXTENT.ZERO), 0, 'only HOLE and ZERO flags');
    pos += e.length;
  }
  assert.ok(pos <= dev.size, 'extents end within the device');
  return extents;
}

// By brand, not instanceof: a plugin's device may throw the BlockError of its own copy of blockgate.
const isCode = (code: string) => (e: unknown) => isBlockError(e) && e.code === code;

/**
 * A seeded PRNG (mulberry32) for the property case: the same runs every time, and no
 * dependency of the package on a property-testing library.
 */
function prng(seed: number): (n: number) => number {
  let a = seed >>> 0;
  return (n) => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return Math.floor((((t ^ (t >>> 14)) >>> 0) / 2 ** 32) * n);
  };
}

export function runContract(name: string, make: () => Promise<DeviceUnderTest>, opts: ContractOptions = {}): void {
  const stores = opts.stores ?? true;

  /** Runs `fn` on a fresh device, then closes it and cleans up. */
  async function withDevice(fn: (dev: BlockDevice) => Promise<void>): Promise<void> {
    const { dev, cleanup } = await make();
    try {
      await fn(dev);
    } finally {
      await dev.close().catch(() => undefined);
      await cleanup();
    }
  }

  /** What a read of [offset, offset + data.length) must return after writing `data` there. */
  const expectAfterWrite = (data: Buffer) => (stores ? data : Buffer.alloc(data.length));

  describe(`${name}: backend contract`, () => {
    test('size, block size, capabilities and description are sane', () =>
      withDevice(async (dev) => {
        assert.ok(Number.isSafeInteger(dev.size) && dev.size >= MIN_CONTRACT_SIZE, `size ${dev.size}`);
        const { minimum, preferred, maximum } = dev.blockSize;
        assert.ok(isPowerOfTwo(minimum) && minimum <= 65536, `minimum ${minimum}`);
        assert.ok(isPowerOfTwo(preferred) && preferred >= Math.max(minimum, 512), `preferred ${preferred}`);
        assert.ok(Number.isSafeInteger(maximum) && maximum >= preferred, `maximum ${maximum}`);
        assert.equal(typeof dev.nonBlocking, 'boolean');
        assert.ok(typeof dev.description === 'string' && dev.description.length > 0);
        const c = dev.capabilities;
        for (const key of ['write', 'flush', 'fua', 'trim', 'zero', 'fastZero', 'extents', 'cache', 'multiConn'] as const) {
          assert.equal(typeof c[key], 'boolean', key);
        }
        if (!c.write) {
          assert.equal(c.trim || c.zero || c.fua || c.fastZero, false, 'a read-only device changes nothing');
        }
        if (c.fastZero) assert.ok(c.zero, 'fastZero implies zero');
      }));

    if (opts.initial) {
      const initial = opts.initial;
      test('a fresh device reads its initial contents at the start, middle, end and unaligned', () =>
        withDevice(async (dev) => {
          for (const [offset, length] of [
            [0, 4096],
            [Math.floor(dev.size / 2) - 7, 5000],
            [dev.size - 4096, 4096],
            [dev.size - 1, 1],
            [12345, 1],
          ] as const) {
            assert.deepEqual(await readAt(dev, offset, length), initial(offset, length), `read ${offset}+${length}`);
          }
        }));
    }

    test('reads and requests of length 0, including at the very end, succeed', () =>
      withDevice(async (dev) => {
        await dev.read(Buffer.alloc(0), 0, 0);
        await dev.read(Buffer.alloc(0), dev.size, 0);
        await dev.cache(dev.size, 0, 0);
        if (dev.capabilities.write) {
          await dev.write(Buffer.alloc(0), dev.size, 0);
          await dev.zero(dev.size, 0, 0);
          await dev.trim(dev.size, 0, 0);
        }
      }));

    test('flush succeeds', () =>
      withDevice(async (dev) => {
        await dev.flush(0);
        await dev.flush(0);
      }));

    test('cache succeeds and does not change what reads return', () =>
      withDevice(async (dev) => {
        const before = await readAt(dev, 1000, 70000);
        await dev.cache(1000, 70000, 0);
        await dev.cache(0, dev.size, 0);
        assert.deepEqual(await readAt(dev, 1000, 70000), before);
      }));

    test('extents are non-empty, start at the offset, are contiguous and honour REQ_ONE', () =>
      withDevice(async (dev) => {
        for (const [offset, length] of [
          [0, dev.size],
          [0, 1],
          [4097, 100000],
          [Math.floor(dev.size / 3), dev.size - Math.floor(dev.size / 3)],
          [dev.size - 1, 1],
        ] as const) {
          const all = checkExtents(dev, await dev.extents(offset, length, 0), offset);
          const one = checkExtents(dev, await dev.extents(offset, length, REQ.REQ_ONE), offset);
          // Caller convention: with REQ_ONE only the first extent is used; it must agree.
          assert.equal(one[0]!.flags, all[0]!.flags);
        }
      }));

    test('ranges reported as ZERO read as zeroes', () =>
      withDevice(async (dev) => {
        let pos = 0;
        const limit = Math.min(dev.size, 4 * 2 ** 20);
        while (pos < limit) {
          const [e] = checkExtents(dev, await dev.extents(pos, limit - pos, REQ.REQ_ONE), pos);
          const len = Math.min(e!.length, limit - pos);
          if (e!.flags & EXTENT.ZERO) assert.deepEqual(await readAt(dev, pos, len), Buffer.alloc(len), `zero extent at ${pos}`);
          pos += len;
        }
      }));

    test('extents requests of length 0 do not fail', () =>
      withDevice(async (dev) => {
        const out = await dev.extents(0, 0, 0);
        if (out.length > 0) checkExtents(dev, out, 0);
      }));

    test('close makes further calls fail', () =>
      withDevice(async (dev) => {
        await dev.close();
        await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), (e) => isBlockError(e));
        await assert.rejects(dev.flush(0), (e) => isBlockError(e));
      }));

    describe('writes (chosen by capabilities.write)', () => {
      test('a device without write capability rejects write, trim and zero with EPERM, unchanged', () =>
        withDevice(async (dev) => {
          if (dev.capabilities.write) {
            // Writable: a write is accepted and keeps the size.
            await dev.write(Buffer.alloc(1, 1), 0, 0);
            assert.ok(dev.size >= MIN_CONTRACT_SIZE);
            return;
          }
          const before = await readAt(dev, 0, 4096);
          await assert.rejects(dev.write(Buffer.alloc(4096, 1), 0, 0), isCode('EPERM'));
          await assert.rejects(dev.write(Buffer.alloc(4096, 1), 0, REQ.FUA), isCode('EPERM'));
          await assert.rejects(dev.trim(0, 4096, 0), isCode('EPERM'));
          await assert.rejects(dev.zero(0, 4096, 0), isCode('EPERM'));
          await assert.rejects(dev.zero(0, 4096, REQ.NO_HOLE), isCode('EPERM'));
          assert.deepEqual(await readAt(dev, 0, 4096), before);
        }));

      test('write then read at the start, middle, last block, last byte and unaligned offsets', () =>
        withDevice(async (dev) => {
          if (!dev.capabilities.write) return assertReadOnly(dev);
          const cases: [number, number][] = [
            [0, 4096],
            [Math.floor(dev.size / 2), 65536],
            [dev.size - 4096, 4096],
            [dev.size - 1, 1],
            [1, 1],
            [4095, 3],
            [65535, 65538],
            [dev.size - 70001, 70001],
          ];
          const written: [number, Buffer][] = [];
          for (const [offset, length] of cases) {
            const data = randomBytes(length);
            await dev.write(data, offset, 0);
            assert.deepEqual(await readAt(dev, offset, length), expectAfterWrite(data), `write ${offset}+${length}`);
            written.push([offset, data]);
          }
          // Every write is still intact where no later write overlapped it.
          for (const [i, [offset, data]] of written.entries()) {
            const expected = Buffer.from(data);
            for (const [later, laterData] of written.slice(i + 1)) {
              const start = Math.max(offset, later);
              const end = Math.min(offset + data.length, later + laterData.length);
              if (start < end) laterData.copy(expected, start - offset, start - later, end - later);
            }
            assert.deepEqual(await readAt(dev, offset, data.length), expectAfterWrite(expected), `again ${offset}`);
          }
        }));

      test('a FUA write succeeds and is read back; flush after writes succeeds', () =>
        withDevice(async (dev) => {
          if (!dev.capabilities.write) return assertReadOnly(dev);
          const data = randomBytes(8192);
          await dev.write(data, 12288, dev.capabilities.fua ? REQ.FUA : 0);
          await dev.flush(0);
          assert.deepEqual(await readAt(dev, 12288, 8192), expectAfterWrite(data));
        }));

      test('concurrent writes to distinct ranges all land', () =>
        withDevice(async (dev) => {
          if (!dev.capabilities.write) return assertReadOnly(dev);
          const chunks = Array.from({ length: 16 }, () => randomBytes(9000));
          await Promise.all(chunks.map((c, i) => dev.write(c, i * 9000 + 3, 0)));
          const back = await Promise.all(chunks.map((_c, i) => readAt(dev, i * 9000 + 3, 9000)));
          back.forEach((b, i) => assert.deepEqual(b, expectAfterWrite(chunks[i]!)));
        }));

      for (const [label, flags] of [
        ['zero()', 0],
        ['zero(NO_HOLE)', REQ.NO_HOLE],
        ['zero(FUA)', REQ.FUA],
      ] as const) {
        test(`${label} reads back zeroes and leaves the neighbours alone`, () =>
          withDevice(async (dev) => {
            if (!dev.capabilities.write) return assertReadOnly(dev);
            assert.ok(dev.capabilities.zero, 'writable built-in backends support zero');
            const data = randomBytes(200000);
            await dev.write(data, 1000, 0);
            // Unaligned bounds inside the written range, crossing 64 KiB boundaries.
            await dev.zero(5000, 150001, flags);
            assert.deepEqual(await readAt(dev, 5000, 150001), Buffer.alloc(150001));
            assert.deepEqual(await readAt(dev, 1000, 4000), expectAfterWrite(data.subarray(0, 4000)));
            assert.deepEqual(await readAt(dev, 155001, 45999), expectAfterWrite(data.subarray(154001)));
            // A whole-device zero, then everything reads zero.
            await dev.zero(0, dev.size, flags);
            assert.deepEqual(await readAt(dev, 0, 300000 > dev.size ? dev.size : 300000), Buffer.alloc(Math.min(dev.size, 300000)));
            assert.deepEqual(await readAt(dev, dev.size - 4096, 4096), Buffer.alloc(4096));
          }));
      }

      test('zero(FAST_ZERO) zeroes when fastZero is advertised, else fails EOPNOTSUPP leaving data', () =>
        withDevice(async (dev) => {
          if (!dev.capabilities.write) return assertReadOnly(dev);
          const data = randomBytes(65536);
          await dev.write(data, 0, 0);
          if (dev.capabilities.fastZero) {
            await dev.zero(0, 65536, REQ.FAST_ZERO);
            assert.deepEqual(await readAt(dev, 0, 65536), Buffer.alloc(65536));
          } else {
            await assert.rejects(dev.zero(0, 65536, REQ.FAST_ZERO), isCode('EOPNOTSUPP'));
            assert.deepEqual(await readAt(dev, 0, 65536), expectAfterWrite(data));
          }
        }));

      test('trim then read is not an error; data outside the range is kept', () =>
        withDevice(async (dev) => {
          if (!dev.capabilities.write) return assertReadOnly(dev);
          const data = randomBytes(300000);
          await dev.write(data, 0, 0);
          await dev.trim(10000, 200000, 0);
          await readAt(dev, 10000, 200000);
          assert.deepEqual(await readAt(dev, 0, 10000), expectAfterWrite(data.subarray(0, 10000)));
          assert.deepEqual(await readAt(dev, 210000, 90000), expectAfterWrite(data.subarray(210000)));
          await dev.trim(0, dev.size, 0);
          await readAt(dev, dev.size - 1, 1);
        }));

      test('written data is never reported as a ZERO extent', () =>
        withDevice(async (dev) => {
          if (!dev.capabilities.write) return assertReadOnly(dev);
          await dev.write(Buffer.alloc(3, 0xff), 70000, 0);
          const ext = checkExtents(dev, await dev.extents(70000, 3, 0), 70000);
          if (stores) assert.equal(ext[0]!.flags & EXTENT.ZERO, 0);
        }));

      test('random writes and zeroes match a flat-buffer model (seeded runs)', () =>
        withDevice(async (dev) => {
          if (!dev.capabilities.write) return assertReadOnly(dev);
          const span = Math.min(dev.size, 3 * 65536 + 4321);
          const base = dev.size - span;
          const model = Buffer.alloc(span);
          const kinds = ['write', 'zero', 'zeroNoHole'] as const;
          for (let run = 0; run < 25; run++) {
            const rand = prng(0x5eed + run);
            // Every run starts from zeroes so that runs are independent.
            await dev.write(Buffer.alloc(span), base, 0);
            model.fill(0);
            const ops: string[] = [];
            for (let i = rand(13); i > 0; i--) {
              const kind = kinds[rand(3)]!;
              const start = rand(span);
              const len = Math.min(rand(140001), span - start);
              const byte = 1 + rand(255);
              const at = base + start;
              ops.push(`${kind} ${start}+${len}`);
              if (kind === 'write') {
                await dev.write(Buffer.alloc(len, byte), at, 0);
                if (stores) model.fill(byte, start, start + len);
              } else {
                await dev.zero(at, len, kind === 'zeroNoHole' ? REQ.NO_HOLE : 0);
                model.fill(0, start, start + len);
              }
            }
            const got = await readAt(dev, base, span);
            assert.ok(got.equals(stores ? model : Buffer.alloc(span)), `run ${run} (relative to ${base}): ${ops.join(', ')}`);
          }
        }));
    });
  });
}

/** For the write cases on a read-only device: the EPERM path instead. */
async function assertReadOnly(dev: BlockDevice): Promise<void> {
  await assert.rejects(dev.write(Buffer.alloc(1), 0, 0), isCode('EPERM'));
  await assert.rejects(dev.zero(0, 1, 0), isCode('EPERM'));
  await assert.rejects(dev.trim(0, 1, 0), isCode('EPERM'));
}
