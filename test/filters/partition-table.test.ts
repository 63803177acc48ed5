/**
 * The MBR/GPT parser on tables written by sfdisk (util-linux) into regular files, read
 * back and compared with what `sfdisk -J` says of them; on hand-broken tables; and on
 * random bytes (fast-check), where it must only ever fail with BlockError EINVAL and
 * never ask for a byte outside the disk.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import fc from 'fast-check';
import { BlockError } from '../../src/errors/index.js';
import { DEBIAN_PATH } from '../helpers/run.js';
import {
  MAX_LOGICAL_PARTITIONS,
  parsePartitionTable,
  partitionTableSteps,
  selectPartition,
  type PartitionTable,
  type SectorSize,
} from '../../src/filters/partition-table.js';

const MiB = 2 ** 20;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-ptable-test-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

let seq = 0;
/** Runs sfdisk with `args` and `input`, with Debian's tools in PATH. */
function sfdisk(args: string[], input = ''): string {
  return execFileSync('sfdisk', args, { input, env: { ...process.env, PATH: DEBIAN_PATH }, timeout: 30_000 }).toString();
}

interface SfdiskPartition {
  node: string;
  start: number;
  size: number;
  type: string;
}

/** A `size`-byte image with the table `script` written by sfdisk: its bytes and sfdisk's own listing. */
function image(size: number, script: string, edit?: (file: string) => void): { disk: Buffer; parts: SfdiskPartition[] } {
  const file = path.join(dir, `disk${seq++}.img`);
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, size);
  sfdisk(['-q', '--no-reread', file], script);
  edit?.(file);
  const listing = JSON.parse(sfdisk(['-J', file])) as { partitiontable: { partitions?: SfdiskPartition[] } };
  const disk = fs.readFileSync(file);
  fs.rmSync(file);
  return { disk, parts: listing.partitiontable.partitions ?? [] };
}

const numberOf = (node: string) => Number(/(\d+)$/.exec(node)![1]);

/** Every partition sfdisk lists is in the table, at the same place, with the same type. */
function assertMatchesSfdisk(table: PartitionTable, parts: SfdiskPartition[], sector = 512): void {
  assert.ok(parts.length > 0);
  for (const p of parts) {
    const n = numberOf(p.node);
    const slot = table.slots[n - 1];
    assert.ok(slot, `partition ${n} is in the table`);
    assert.equal(slot.offset, p.start * sector, `partition ${n} offset`);
    assert.equal(slot.length, p.size * sector, `partition ${n} length`);
    // sfdisk writes MBR types without a leading zero ("5"), the parser as two digits ("05").
    const norm = (t: string) => (table.scheme === 'mbr' ? parseInt(t, 16).toString(16) : t.toLowerCase());
    assert.equal(norm(slot.type), norm(p.type), `partition ${n} type`);
  }
  const used = table.slots.filter((s) => s !== null).length;
  assert.equal(used, parts.length, 'no partitions that sfdisk does not list');
}

const GPT_SCRIPT = 'label: gpt\nstart=2048, size=4096, type=linux\nstart=8192, size=2048, type=swap\nstart=12288, size=100\n';
const MBR_SCRIPT = [
  'label: dos',
  'start=2048, size=4096, type=83',
  'start=8192, size=40000, type=5',
  'start=10240, size=1000, type=83',
  'start=14336, size=2000, type=c',
  'start=20480, size=8000, type=7',
  'start=49152, size=1024, type=82',
  '',
].join('\n');

describe('partition table parser', () => {
  test('GPT written by sfdisk: every entry as sfdisk lists it, 128 slots, the rest unused', () => {
    const { disk, parts } = image(8 * MiB, GPT_SCRIPT);
    const table = parsePartitionTable(disk);
    assert.equal(table.scheme, 'gpt');
    assert.equal(table.slots.length, 128);
    assertMatchesSfdisk(table, parts);
    assert.equal(table.slots[0]!.type, '0FC63DAF-8483-4772-8E79-3D69D8477DE4');
    assert.deepEqual(selectPartition(table, 2, disk.length), table.slots[1]);
  });

  test('MBR written by sfdisk: primaries, the extended partition and the logical partitions 5-7 of its EBR chain', () => {
    const { disk, parts } = image(32 * MiB, MBR_SCRIPT);
    const table = parsePartitionTable(disk);
    assert.equal(table.scheme, 'mbr');
    assert.equal(table.chainError, undefined);
    assert.deepEqual(
      table.slots.map((s) => s && `${s.number}:${s.kind}:${s.type}`),
      ['1:primary:83', '2:extended:05', '3:primary:82', null, '5:logical:83', '6:logical:0c', '7:logical:07'],
    );
    assertMatchesSfdisk(table, parts);
    assert.equal(selectPartition(table, 6, disk.length).offset, 14336 * 512);
  });

  test('GPT with 4096-byte sectors (sfdisk\'s 512-byte table moved onto 4 KiB sectors) is read with sectorSize 4096', () => {
    const { disk: small, parts } = image(8 * MiB, GPT_SCRIPT);
    // Same header and entries, at LBA 1 and 2 of a 4Kn disk; the LBAs now count 4 KiB sectors.
    const disk = Buffer.alloc(64 * MiB);
    small.copy(disk, 4096, 512, 1024);
    small.copy(disk, 2 * 4096, 1024, 1024 + 128 * 128);
    const table = parsePartitionTable(disk, 4096);
    assert.equal(table.scheme, 'gpt');
    assert.equal(table.sectorSize, 4096);
    assertMatchesSfdisk(table, parts, 4096);
    assert.throws(() => parsePartitionTable(disk, 512), { code: 'EINVAL', message: /no partition table/ });
  });

  test('MBR with 4096-byte sectors: LBAs count 4 KiB sectors, EBRs included', () => {
    const { disk: small, parts } = image(32 * MiB, MBR_SCRIPT);
    const disk = Buffer.alloc(210 * MiB);
    // Move every sector sfdisk wrote (MBR and EBRs) to the same LBA with 4 KiB sectors.
    for (let lba = 0; lba < small.length / 512; lba++) {
      const s = small.subarray(lba * 512, lba * 512 + 512);
      if (s.some((b) => b !== 0)) s.copy(disk, lba * 4096);
    }
    const table = parsePartitionTable(disk, 4096);
    assertMatchesSfdisk(table, parts, 4096);
  });

  test('selectPartition: clear errors for out-of-range numbers, unused entries, extended and past-the-end partitions', () => {
    const gpt = image(8 * MiB, GPT_SCRIPT, (f) => sfdisk(['-q', '--no-reread', '--delete', f, '2']));
    const g = parsePartitionTable(gpt.disk);
    assert.equal(g.slots[1], null);
    assert.throws(() => selectPartition(g, 2, gpt.disk.length), { code: 'EINVAL', message: /^GPT partition 2 is an unused entry$/ });
    assert.throws(() => selectPartition(g, 129, gpt.disk.length), { code: 'EINVAL', message: /GPT partition 129 is out of range \(the table has 128 entries\)/ });
    assert.throws(() => selectPartition(g, 0, gpt.disk.length), { code: 'EINVAL', message: /count from 1/ });
    assert.throws(() => selectPartition(g, 3, 12288 * 512 + 99), { code: 'EINVAL', message: /GPT partition 3 .* is outside the disk/ });

    const mbr = image(32 * MiB, MBR_SCRIPT);
    const m = parsePartitionTable(mbr.disk);
    assert.throws(() => selectPartition(m, 4, mbr.disk.length), { code: 'EINVAL', message: /^MBR partition 4 is an unused entry$/ });
    assert.throws(() => selectPartition(m, 2, mbr.disk.length), { code: 'EINVAL', message: /extended partition/ });
    assert.throws(() => selectPartition(m, 8, mbr.disk.length), {
      code: 'EINVAL',
      message: /MBR partition 8 is out of range \(primary 1-4 and 3 logical partitions\)/,
    });

    const primaries = image(8 * MiB, 'label: dos\nstart=2048, size=4096, type=83\n');
    const p = parsePartitionTable(primaries.disk);
    assert.throws(() => selectPartition(p, 5, primaries.disk.length), { code: 'EINVAL', message: /no extended partition/ });
  });

  test('a broken EBR chain: the partitions before the break are served, those after fail with the reason', () => {
    const { disk } = image(32 * MiB, MBR_SCRIPT);
    const table0 = parsePartitionTable(disk);
    // The EBR of partition 6 sits one alignment step (2048 sectors) before it; make its link point back.
    const ebr6 = table0.slots[5]!.offset - 2048 * 512;
    assert.equal(disk.readUInt16LE(ebr6 + 510), 0xaa55);
    disk.writeUInt32LE(0, ebr6 + 0x1be + 16 + 8);
    disk.writeUInt32LE(1, ebr6 + 0x1be + 16 + 12);
    const table = parsePartitionTable(disk);
    assert.match(table.chainError ?? '', /invalid EBR chain: the EBR after partition 6 .* is not after/);
    assert.equal(selectPartition(table, 6, disk.length).number, 6);
    assert.throws(() => selectPartition(table, 7, disk.length), { code: 'EINVAL', message: /MBR partition 7 not found: invalid EBR chain/ });

    // A logical partition that runs out of its extended partition.
    const { disk: d2 } = image(32 * MiB, MBR_SCRIPT);
    const ebr5 = 8192 * 512;
    d2.writeUInt32LE(100000, ebr5 + 0x1be + 12);
    const t2 = parsePartitionTable(d2);
    assert.match(t2.chainError ?? '', /logical partition 5 .* does not lie after its EBR inside the extended partition/);
    assert.throws(() => selectPartition(t2, 5, d2.length), { code: 'EINVAL' });
  });

  test('no table, or a disk too small for one, is EINVAL', () => {
    assert.throws(() => parsePartitionTable(Buffer.alloc(MiB)), {
      code: 'EINVAL',
      message: /the disk has no partition table \(no GPT header at byte 512, no MBR signature 55 AA at byte 510\)/,
    });
    assert.throws(() => parsePartitionTable(Buffer.alloc(1000)), { code: 'EINVAL', message: /too small/ });
    assert.throws(() => parsePartitionTable(Buffer.alloc(4096), 4096), { code: 'EINVAL', message: /too small/ });
  });

  test('a GPT header with absurd fields is refused before anything big is read', () => {
    const { disk } = image(8 * MiB, GPT_SCRIPT);
    const bad = (patch: (h: Buffer) => void, re: RegExp) => {
      const d = Buffer.from(disk);
      patch(d.subarray(512, 1024));
      assert.throws(() => parsePartitionTable(d), { code: 'EINVAL', message: re });
    };
    bad((h) => h.writeUInt32LE(100, 84), /entry size 100 is invalid/);
    bad((h) => h.writeUInt32LE(0xffffffff, 80), /larger than 1048576 bytes/);
    bad((h) => h.writeBigUInt64LE(2n ** 62n, 72), /outside the disk/);
    bad((h) => h.writeBigUInt64LE(1n, 72), /outside the disk/);
    // An entry with its LBAs the wrong way round, or beyond any disk, is listed but not servable.
    const d = Buffer.from(disk);
    d.writeBigUInt64LE(10n, 1024 + 40);
    d.writeBigUInt64LE(2n ** 63n, 1024 + 128 + 32);
    const t = parsePartitionTable(d);
    assert.throws(() => selectPartition(t, 1, d.length), { code: 'EINVAL', message: /last LBA 10 is before its first LBA 2048/ });
    assert.throws(() => selectPartition(t, 2, d.length), { code: 'EINVAL', message: /beyond any disk/ });
  });

  test('an EBR chain longer than the limit is cut there', () => {
    // A hand-made MBR: one extended partition holding a chain of 300 one-sector-apart EBRs.
    const S = 512;
    const n = 300;
    const disk = Buffer.alloc((4 + 2 * n) * S);
    const entry = (sector: Buffer, i: number, type: number, start: number, count: number) => {
      sector[0x1be + 16 * i + 4] = type;
      sector.writeUInt32LE(start, 0x1be + 16 * i + 8);
      sector.writeUInt32LE(count, 0x1be + 16 * i + 12);
      sector.writeUInt16LE(0xaa55, 510);
    };
    entry(disk, 0, 0x05, 2, 2 * n);
    for (let k = 0; k < n; k++) {
      const ebr = disk.subarray((2 + 2 * k) * S, (3 + 2 * k) * S);
      entry(ebr, 0, 0x83, 1, 1);
      if (k + 1 < n) entry(ebr, 1, 0x05, 2 * (k + 1), 2);
    }
    const t = parsePartitionTable(disk);
    assert.equal(t.slots.length, 4 + MAX_LOGICAL_PARTITIONS);
    assert.match(t.chainError ?? '', /more than 256 logical partitions/);
  });

  test('random bytes: only BlockError EINVAL, never a read outside the disk, never a partition outside it (property)', () => {
    const sizes = fc.constantFrom(0, 1, 511, 1024, 4096, 68 * 512, 40000, 300000);
    const disk = fc
      .record({
        size: sizes,
        seed: fc.uint8Array({ minLength: 64, maxLength: 64 }),
        gpt: fc.boolean(),
        mbr: fc.boolean(),
        ext: fc.boolean(),
        count: fc.integer({ min: 0, max: 600 }),
        entrySize: fc.constantFrom(0, 128, 256, 136, 1 << 20),
        arrayLba: fc.integer({ min: 0, max: 700 }),
        magicEvery: fc.boolean(),
        sector: fc.constantFrom<SectorSize>(512, 4096),
        pick: fc.integer({ min: 0, max: 300 }),
      })
      .map((r) => {
        const b = Buffer.alloc(r.size);
        for (let i = 0; i < b.length; i++) b[i] = r.seed[i % 64]! ^ ((i * 2654435761) >>> 24);
        const S = r.sector;
        if (r.gpt && b.length >= 2 * S) {
          b.write('EFI PART', S, 'latin1');
          b.writeUInt32LE(r.count, S + 80);
          b.writeUInt32LE(r.entrySize, S + 84);
          b.writeBigUInt64LE(BigInt(r.arrayLba), S + 72);
        }
        if (r.mbr && b.length >= 512) b.writeUInt16LE(0xaa55, 510);
        if (r.ext && b.length >= 512) {
          b[0x1be + 4] = 0x05;
          b.writeUInt32LE(r.arrayLba, 0x1be + 8);
          b.writeUInt32LE(r.count * 4, 0x1be + 12);
        }
        if (r.magicEvery) for (let at = 510; at + 2 <= b.length; at += S) b.writeUInt16LE(0xaa55, at);
        return { b, S, pick: r.pick };
      });
    fc.assert(
      fc.property(disk, ({ b, S, pick }) => {
        const steps = partitionTableSteps(b.length, S);
        let table: PartitionTable;
        try {
          let r = steps.next();
          let reads = 0;
          while (!r.done) {
            const { offset, length } = r.value;
            assert.ok(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length > 0, 'a sane request');
            assert.ok(offset + length <= b.length, `read ${offset}+${length} is inside the ${b.length}-byte disk`);
            assert.ok(++reads <= MAX_LOGICAL_PARTITIONS + 3, 'a bounded number of reads');
            r = steps.next(b.subarray(offset, offset + length));
          }
          table = r.value;
        } catch (e) {
          if (e instanceof assert.AssertionError) throw e;
          assert.ok(e instanceof BlockError && e.code === 'EINVAL', `only EINVAL, got ${String(e)}`);
          return;
        }
        for (const n of [1, 2, 4, 5, 6, pick + 1]) {
          try {
            const p = selectPartition(table, n, b.length);
            assert.ok(p.offset >= 0 && p.length >= 0 && p.offset + p.length <= b.length, 'a selected partition lies inside the disk');
          } catch (e) {
            if (e instanceof assert.AssertionError) throw e;
            assert.ok(e instanceof BlockError && e.code === 'EINVAL', `only EINVAL, got ${String(e)}`);
          }
        }
      }),
      { numRuns: 400 },
    );
  });
});
