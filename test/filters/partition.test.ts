/**
 * The partition filter over memory and file devices holding tables written by sfdisk:
 * the backend contract over a partition, reads and writes landing in the partition's
 * bytes, the sector-size default, and the errors of the factory.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { FilterDevice } from '../../src/device/filter.js';
import { buildStack, type BlockDevice, type BlockSize } from '../../src/device/index.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import { PartitionFilter, partitionFilter } from '../../src/filters/partition.js';
import { defaultRegistry } from '../../src/export/registry.js';
import { DEBIAN_PATH } from '../helpers/run.js';
import { runContract } from '../backends/contract.js';

const MiB = 2 ** 20;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-partition-test-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Partition 1 from sector 2048 (1 MiB), 1 MiB + 77 sectors; partition 2 of 512 KiB after it. */
const GPT_SCRIPT = 'label: gpt\nstart=2048, size=2125, type=linux\nstart=6144, size=1024\n';
const P1 = { offset: 2048 * 512, length: 2125 * 512 };

let seq = 0;
/** A file holding random bytes with a table written over them by sfdisk. */
function imageFile(size: number, script: string): string {
  const file = path.join(dir, `disk${seq++}.img`);
  fs.writeFileSync(file, randomBytes(size));
  execFileSync('sfdisk', ['-q', '--no-reread', '--wipe', 'never', file], { input: script, env: { ...process.env, PATH: DEBIAN_PATH }, timeout: 30_000 });
  return file;
}

const gptFile = imageFile(8 * MiB, GPT_SCRIPT);
const gptBytes = fs.readFileSync(gptFile);

/** A memory device holding the bytes of `image`. */
async function memoryWith(image: Buffer): Promise<MemoryDevice> {
  const m = new MemoryDevice({ size: image.length });
  await m.write(image, 0, 0);
  return m;
}

/** A device that says its minimum block size is 4096 (and enforces it). */
class Strict4k extends FilterDevice {
  override get blockSize(): BlockSize {
    return { minimum: 4096, preferred: 4096, maximum: 32 * MiB };
  }
  override read(buf: Buffer, offset: number, flags: number): Promise<void> {
    assert.ok(offset % 4096 === 0 && buf.length % 4096 === 0, `read ${offset}+${buf.length} is aligned to 4096`);
    return this.next.read(buf, offset, flags);
  }
}

runContract(
  'partition filter (GPT partition 1) over memory',
  async () => ({ dev: await PartitionFilter.open(await memoryWith(gptBytes), { partition: 1 }), cleanup: async () => undefined }),
  { initial: (o, n) => gptBytes.subarray(P1.offset + o, P1.offset + o + n) },
);

describe('partition filter', () => {
  test('serves the partition: size, reads of its bytes, writes landing inside it only', async () => {
    const below = await memoryWith(gptBytes);
    const dev = await PartitionFilter.open(below, { partition: 1 });
    assert.equal(dev.size, P1.length);
    assert.equal(dev.offset, P1.offset);
    assert.match(dev.description, /^memory 8MiB \(partition 1: gpt type 0FC63DAF-8483-4772-8E79-3D69D8477DE4, 1088000B at 1048576\)$/);
    const buf = Buffer.alloc(P1.length);
    await dev.read(buf, 0, 0);
    assert.deepEqual(buf, gptBytes.subarray(P1.offset, P1.offset + P1.length));
    const data = randomBytes(5000);
    await dev.write(data, P1.length - 5000, 0);
    const back = Buffer.alloc(gptBytes.length);
    await below.read(back, 0, 0);
    const expected = Buffer.from(gptBytes);
    data.copy(expected, P1.offset + P1.length - 5000);
    assert.deepEqual(back, expected, 'the write changed the end of the partition and nothing else');
  });

  test('reads the table with 4096-byte sectors over a device with that minimum block size, 512 otherwise', async () => {
    // sfdisk's 512-byte table moved onto 4 KiB sectors: its LBAs now count 4 KiB.
    const disk = Buffer.alloc(64 * MiB);
    gptBytes.copy(disk, 4096, 512, 1024);
    gptBytes.copy(disk, 8192, 1024, 1024 + 128 * 128);
    const strict = new Strict4k(await memoryWith(disk));
    const dev = await PartitionFilter.open(strict, { partition: 2 });
    assert.equal(dev.offset, 6144 * 4096);
    assert.equal(dev.size, 1024 * 4096);
    await assert.rejects(PartitionFilter.open(strict, { partition: 2, sectorSize: 512 }), { code: 'EINVAL', message: /no partition table/ });
    const plain = await PartitionFilter.open(await memoryWith(gptBytes), { partition: 2 });
    assert.equal(plain.offset, 6144 * 512);
  });

  test('through a stack description: a file backend and { type: "partition", partition: 2 }', async () => {
    const dev: BlockDevice = await buildStack({ backend: { type: 'file', path: gptFile, readonly: true }, filters: [{ type: 'partition', partition: 2 }] }, defaultRegistry);
    try {
      assert.equal(dev.size, 1024 * 512);
      const buf = Buffer.alloc(dev.size);
      await dev.read(buf, 0, 0);
      assert.deepEqual(buf, gptBytes.subarray(6144 * 512, 7168 * 512));
      assert.equal(dev.capabilities.write, false, 'the read-only backend shows through');
    } finally {
      await dev.close();
    }
  });

  test('the factory: settings validated, table errors named with the layer', async () => {
    const below = await memoryWith(gptBytes);
    const bad = (desc: Record<string, unknown>, re: RegExp) =>
      assert.rejects(async () => partitionFilter(below, { type: 'partition', ...desc }), { code: 'EINVAL', message: re });
    await bad({}, /^partition: partition: required setting is missing$/);
    await bad({ partition: 0 }, /^partition: partition: partition numbers count from 1$/);
    await bad({ partition: 1.5 }, /^partition: partition: expected a whole number$/);
    await bad({ partition: '1' }, /^partition: partition: expected a partition number/);
    await bad({ partition: 1, sectorSize: 1024 }, /^partition: sectorSize: expected 512 or 4096, got 1024$/);
    await bad({ partition: 1, offset: 5 }, /^partition: offset: unknown setting/);
    await bad({ partition: 3 }, /^partition: GPT partition 3 is an unused entry$/);
    await bad({ partition: 200 }, /^partition: GPT partition 200 is out of range/);
    await assert.rejects(async () => partitionFilter(new MemoryDevice({ size: MiB }), { type: 'partition', partition: 1 }), {
      code: 'EINVAL',
      message: /^partition: the disk has no partition table/,
    });
    // A table that promises more than the disk holds (a truncated image).
    await assert.rejects(async () => partitionFilter(await memoryWith(gptBytes.subarray(0, 3 * MiB)), { type: 'partition', partition: 2 }), {
      code: 'EINVAL',
      message: /^partition: GPT partition 2 \(byte 3145728, 524288 bytes\) is outside the disk \(size 3145728\)$/,
    });
    const ok = await partitionFilter(below, { type: 'partition', partition: 1, sectorSize: 512 });
    assert.equal(ok.size, P1.length);
  });

  test('MBR logical partition through the factory', async () => {
    const file = imageFile(16 * MiB, 'label: dos\nstart=2048, size=2048, type=83\nstart=8192, size=20000, type=5\nstart=10240, size=1000, type=83\n');
    const bytes = fs.readFileSync(file);
    const dev = await partitionFilter(await memoryWith(bytes), { type: 'partition', partition: 5 });
    assert.equal(dev.offset, 10240 * 512);
    const buf = Buffer.alloc(dev.size);
    await dev.read(buf, 0, 0);
    assert.deepEqual(buf, bytes.subarray(10240 * 512, 11240 * 512));
    await assert.rejects(async () => partitionFilter(await memoryWith(bytes), { type: 'partition', partition: 2 }), { message: /extended partition/ });
  });
});
