/**
 * The partition filter: serves one partition of a partitioned disk (nbdkit's partition
 * filter, like `qemu-nbd -P`). The MBR or GPT partition table is read once, when the
 * filter is made (src/filters/partition-table.ts says what is accepted); from then on
 * the filter is an offset filter over the partition's bytes.
 *
 * The table is read with `sectorSize`-byte sectors, by default 4096 when the device
 * below has a 4096-byte minimum block size and 512 otherwise (nbdkit's
 * partition-sectorsize default).
 */
import * as v from 'valibot';
import type { BlockDevice } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import { formatSize, parseSettings, settingsSchema } from '../device/index.js';
import { BlockError } from '../errors/index.js';
import { OffsetFilter } from './offset.js';
import { SECTOR_SIZES, readPartitionTable, selectPartition, type Partition, type SectorSize } from './partition-table.js';

/** Settings of a partition filter. */
export interface PartitionOptions {
  /** The partition to serve, counting from 1 (MBR: 1-4 primary, 5+ logical). */
  readonly partition: number;
  /** Sector size the table is read with. @default 4096 if the device below has that minimum block size, else 512 */
  readonly sectorSize?: SectorSize;
}

/** One partition of `next`: an offset filter over its bytes. */
export class PartitionFilter extends OffsetFilter {
  readonly partition: Partition;

  constructor(next: BlockDevice, partition: Partition) {
    super(next, { offset: partition.offset, range: partition.length });
    this.partition = partition;
  }

  override get description(): string {
    const p = this.partition;
    return `${this.next.description} (partition ${p.number}: ${p.kind} type ${p.type}, ${formatSize(p.length)} at ${p.offset})`;
  }

  /** Reads the table of `next` and makes the filter for partition `options.partition`. */
  static async open(next: BlockDevice, options: PartitionOptions): Promise<PartitionFilter> {
    const sectorSize = options.sectorSize ?? (next.blockSize.minimum === 4096 ? 4096 : 512);
    const table = await readPartitionTable((offset, length) => readRounded(next, offset, length), next.size, sectorSize);
    return new PartitionFilter(next, selectPartition(table, options.partition, next.size));
  }
}

/** Reads [offset, offset + length) of `dev` with a read rounded out to its minimum block size. */
async function readRounded(dev: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const min = dev.blockSize.minimum;
  const start = offset - (offset % min);
  const end = Math.min(Math.ceil((offset + length) / min) * min, dev.size);
  const buf = Buffer.alloc(end - start);
  await dev.read(buf, start, 0);
  return buf.subarray(offset - start, offset - start + length);
}

/** The settings schema (listed by `blockgate plugins`). */
export const partitionSettings = settingsSchema({
  partition: v.pipe(
    v.number((issue) => `expected a partition number (1, 2, ...), got ${issue.received}`),
    v.safeInteger('expected a whole number'),
    v.minValue(1, 'partition numbers count from 1'),
  ),
  sectorSize: v.optional(
    v.picklist(SECTOR_SIZES, (issue) => `expected ${SECTOR_SIZES.join(' or ')}, got ${issue.received}`),
  ),
});

/** Filter factory: `{ type: 'partition', partition, sectorSize? }` (see {@link PartitionOptions}). */
export async function partitionFilter(next: BlockDevice, desc: LayerDescription): Promise<PartitionFilter> {
  const s = parseSettings('partition', partitionSettings, desc);
  try {
    return await PartitionFilter.open(next, { partition: s.partition, ...(s.sectorSize !== undefined ? { sectorSize: s.sectorSize } : {}) });
  } catch (e) {
    if (e instanceof BlockError) throw new BlockError(e.code, `partition: ${e.message}`);
    throw e;
  }
}
