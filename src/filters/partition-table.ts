/**
 * A pure MBR and GPT partition table parser for the partition filter: bytes in,
 * partitions out, no I/O of its own.
 *
 * The parser is a generator ({@link partitionTableSteps}) that yields the byte ranges it
 * needs and is resumed with their contents, so the same code runs synchronously over a
 * Buffer ({@link parsePartitionTable}, the tests) and asynchronously over a device
 * ({@link readPartitionTable}, the filter). Every range it asks for lies inside the
 * disk, and every malformed table ends in BlockError EINVAL, never in anything else.
 *
 * What is read, as nbdkit's partition filter reads it:
 * - GPT when the disk has room for one (68 sectors) and LBA 1 starts with "EFI PART"
 *   (checked before the MBR, so a protective or hybrid MBR does not matter): entry N is
 *   partition N; an entry whose type GUID is all zeroes is unused. The entry array is
 *   read where the header says (nbdkit assumes LBA 2, where every tool puts it). CRCs are
 *   not checked (nbdkit does not either).
 * - MBR when sector 0 ends in 55 AA: primary partitions 1-4 (an entry of type 0 or of
 *   0 sectors is unused; an extended entry, type 05, 0F or 85, holds the logical
 *   partitions and is not itself served), and logical partitions 5, 6, ... from the
 *   chain of EBRs in the first extended partition. Like nbdkit the chain must move
 *   strictly forward (so it ends), and each logical partition must start after its EBR
 *   and end inside the extended partition. The chain is cut at 256 logical partitions
 *   (Linux's limit of partitions per disk) so a crafted disk cannot make the parser read
 *   for long.
 * - Sectors are 512 bytes unless told otherwise (4096 for 4Kn disks).
 */
import { BlockError } from '../errors/index.js';

/** The sector sizes a table may be read with. */
export const SECTOR_SIZES = [512, 4096] as const;
export type SectorSize = (typeof SECTOR_SIZES)[number];

/** At most this many logical partitions are followed in an EBR chain. */
export const MAX_LOGICAL_PARTITIONS = 256;
/** The largest GPT entry array read (entries x entry size): 1 MiB, 64 times the usual 16 KiB. */
export const MAX_GPT_ARRAY_BYTES = 2 ** 20;

const GPT_SIGNATURE = Buffer.from('EFI PART', 'latin1');
/** The MBR type bytes of extended partitions (as Linux's msdos.c and nbdkit). */
const EXTENDED_TYPES: ReadonlySet<number> = new Set([0x05, 0x0f, 0x85]);

/** One used slot of a partition table. */
export interface Partition {
  /** The partition number, counting from 1 (logical MBR partitions from 5). */
  readonly number: number;
  readonly kind: 'primary' | 'extended' | 'logical' | 'gpt';
  /** The MBR type byte as two hex digits, or the GPT type GUID in its usual form. */
  readonly type: string;
  /** Byte offset of the partition in the disk. */
  readonly offset: number;
  /** Length in bytes. */
  readonly length: number;
  /** Set when the entry is used but its bounds are impossible: why it cannot be served. */
  readonly problem?: string;
}

/** What the parser found on a disk. */
export interface PartitionTable {
  readonly scheme: 'mbr' | 'gpt';
  readonly sectorSize: SectorSize;
  /** Slots by partition number - 1; null where the slot is unused. */
  readonly slots: readonly (Partition | null)[];
  /**
   * Why the MBR logical partitions stop where they do, if the EBR chain was broken (an
   * error only for a request of a partition past its end); undefined for a chain that
   * ended properly, or no extended partition.
   */
  readonly chainError?: string;
  /** For an MBR: whether there is an extended partition (logical partitions may exist). */
  readonly hasExtended: boolean;
}

/** A byte range the parser needs, inside the disk. */
export interface ReadRequest {
  readonly offset: number;
  readonly length: number;
}

function invalid(message: string): BlockError {
  return new BlockError('EINVAL', message);
}

/** A little-endian u64 as a number, or undefined when it is above 2^53 - 1. */
function u64(buf: Buffer, at: number): number | undefined {
  const n = buf.readBigUInt64LE(at);
  return n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : undefined;
}

/** A GUID as GPT stores it (first three fields little-endian) in its usual text form. */
export function formatGuid(b: Buffer): string {
  const h = (from: number, to: number, le: boolean) => {
    const part = Buffer.from(b.subarray(from, to));
    return (le ? part.reverse() : part).toString('hex');
  };
  return `${h(0, 4, true)}-${h(4, 6, true)}-${h(6, 8, true)}-${h(8, 10, false)}-${h(10, 16, false)}`.toUpperCase();
}

interface MbrEntry {
  readonly type: number;
  readonly start: number;
  readonly sectors: number;
}

function mbrEntry(sector: Buffer, i: number): MbrEntry {
  const at = 0x1be + 16 * i;
  return { type: sector[at + 4]!, start: sector.readUInt32LE(at + 8), sectors: sector.readUInt32LE(at + 12) };
}

const hex2 = (n: number) => n.toString(16).padStart(2, '0');

/**
 * The parser: yields the ranges it needs (each inside [0, size)) and returns the table.
 * Throws BlockError EINVAL when the disk has no table it can read.
 */
export function* partitionTableSteps(size: number, sectorSize: SectorSize = 512): Generator<ReadRequest, PartitionTable, Buffer> {
  const S = sectorSize;
  if (!Number.isSafeInteger(size) || size < 2 * S) {
    throw invalid(`the disk (size ${size}) is too small to hold a partition table (${2 * S} bytes with ${S}-byte sectors)`);
  }
  const head = yield { offset: 0, length: 2 * S };
  if (head.length !== 2 * S) throw invalid('short read of the partition table');
  if (size >= 2 * 34 * S && head.subarray(S, S + 8).equals(GPT_SIGNATURE)) {
    return yield* gptSteps(size, S, head.subarray(S, 2 * S));
  }
  if (head[0x1fe] === 0x55 && head[0x1ff] === 0xaa) {
    return yield* mbrSteps(size, S, head.subarray(0, S));
  }
  throw invalid(`the disk has no partition table (no GPT header at byte ${S}, no MBR signature 55 AA at byte 510)`);
}

function* gptSteps(size: number, S: SectorSize, header: Buffer): Generator<ReadRequest, PartitionTable, Buffer> {
  const count = header.readUInt32LE(80);
  const entrySize = header.readUInt32LE(84);
  const arrayLba = u64(header, 72);
  if (entrySize < 128 || entrySize % 8 !== 0) throw invalid(`GPT entry size ${entrySize} is invalid (at least 128 and a multiple of 8)`);
  if (count * entrySize > MAX_GPT_ARRAY_BYTES) {
    throw invalid(`GPT entry array of ${count} x ${entrySize} bytes is larger than ${MAX_GPT_ARRAY_BYTES} bytes`);
  }
  // nbdkit's sanity check: room for the array twice (primary and backup) plus the MBR and both headers.
  if (size < 3 * S + 2 * count * entrySize) throw invalid('GPT entry array is too large for this disk');
  if (arrayLba === undefined || arrayLba < 2 || arrayLba * S + count * entrySize > size) {
    throw invalid(`GPT entry array at LBA ${header.readBigUInt64LE(72)} is outside the disk`);
  }
  const array = count === 0 ? Buffer.alloc(0) : yield { offset: arrayLba * S, length: count * entrySize };
  if (array.length !== count * entrySize) throw invalid('short read of the GPT entry array');
  const slots: (Partition | null)[] = [];
  for (let i = 0; i < count; i++) {
    const e = array.subarray(i * entrySize, i * entrySize + 128);
    const typeGuid = e.subarray(0, 16);
    if (typeGuid.every((b) => b === 0)) {
      slots.push(null);
      continue;
    }
    const first = u64(e, 32);
    const last = u64(e, 40);
    const n = i + 1;
    const type = formatGuid(typeGuid);
    if (first === undefined || last === undefined || (last + 1) * S > Number.MAX_SAFE_INTEGER) {
      slots.push({ number: n, kind: 'gpt', type, offset: 0, length: 0, problem: 'its LBAs are beyond any disk' });
    } else if (last < first) {
      slots.push({ number: n, kind: 'gpt', type, offset: first * S, length: 0, problem: `its last LBA ${last} is before its first LBA ${first}` });
    } else {
      slots.push({ number: n, kind: 'gpt', type, offset: first * S, length: (last - first + 1) * S });
    }
  }
  return { scheme: 'gpt', sectorSize: S, slots, hasExtended: false };
}

function* mbrSteps(size: number, S: SectorSize, mbr: Buffer): Generator<ReadRequest, PartitionTable, Buffer> {
  const slots: (Partition | null)[] = [];
  let extended: MbrEntry | undefined;
  for (let i = 0; i < 4; i++) {
    const e = mbrEntry(mbr, i);
    if (e.type === 0 || e.sectors === 0) {
      slots.push(null);
      continue;
    }
    const isExtended = EXTENDED_TYPES.has(e.type);
    if (isExtended) extended ??= e;
    slots.push({ number: i + 1, kind: isExtended ? 'extended' : 'primary', type: hex2(e.type), offset: e.start * S, length: e.sectors * S });
  }
  if (!extended) return { scheme: 'mbr', sectorSize: S, slots, hasExtended: false };

  const epStart = extended.start * S;
  const epEnd = (extended.start + extended.sectors) * S;
  let ebr = epStart;
  let chainError: string | undefined;
  for (let n = 5; ; n++) {
    if (n - 4 > MAX_LOGICAL_PARTITIONS) {
      chainError = `the EBR chain has more than ${MAX_LOGICAL_PARTITIONS} logical partitions`;
      break;
    }
    if (ebr < S || ebr + S > size) {
      chainError = `invalid EBR chain: the EBR of partition ${n} (byte ${ebr}) is outside the disk`;
      break;
    }
    const sector = yield { offset: ebr, length: S };
    if (sector.length !== S) throw invalid('short read of an EBR');
    if (sector[0x1fe] !== 0x55 || sector[0x1ff] !== 0xaa) {
      // An empty extended partition: no logical partitions. Anywhere else a broken link.
      if (n > 5) chainError = `invalid EBR chain: the EBR of partition ${n} (byte ${ebr}) has no 55 AA signature`;
      break;
    }
    const own = mbrEntry(sector, 0);
    const start = ebr + own.start * S;
    const length = own.sectors * S;
    if (own.type === 0 && own.sectors === 0 && n === 5) break; // an empty first EBR
    if (start <= ebr || start + length > epEnd) {
      chainError =
        `logical partition ${n} (byte ${start}, ${length} bytes) does not lie after its EBR inside ` +
        `the extended partition (bytes ${epStart} to ${epEnd})`;
      break;
    }
    slots.push({ number: n, kind: 'logical', type: hex2(own.type), offset: start, length });
    const link = mbrEntry(sector, 1);
    if (link.start === 0 && link.sectors === 0) break;
    const next = epStart + link.start * S;
    if (next <= ebr) {
      chainError = `invalid EBR chain: the EBR after partition ${n} (byte ${next}) is not after the EBR at byte ${ebr}`;
      break;
    }
    ebr = next;
  }
  return { scheme: 'mbr', sectorSize: S, slots, hasExtended: true, ...(chainError !== undefined ? { chainError } : {}) };
}

/** Runs the parser over a whole disk image held in memory. */
export function parsePartitionTable(disk: Buffer, sectorSize: SectorSize = 512): PartitionTable {
  const steps = partitionTableSteps(disk.length, sectorSize);
  let r = steps.next();
  while (!r.done) {
    const { offset, length } = r.value;
    r = steps.next(disk.subarray(offset, offset + length));
  }
  return r.value;
}

/** Runs the parser over a device of `size` bytes read with `read`. */
export async function readPartitionTable(
  read: (offset: number, length: number) => Promise<Buffer>,
  size: number,
  sectorSize: SectorSize = 512,
): Promise<PartitionTable> {
  const steps = partitionTableSteps(size, sectorSize);
  let r = steps.next();
  while (!r.done) r = steps.next(await read(r.value.offset, r.value.length));
  return r.value;
}

/**
 * Partition `n` (counting from 1) of `table` on a disk of `diskSize` bytes, checked to be
 * servable: a used, non-extended slot that lies inside the disk. Throws BlockError
 * EINVAL saying what is wrong.
 */
export function selectPartition(table: PartitionTable, n: number, diskSize: number): Partition {
  const scheme = table.scheme.toUpperCase();
  if (!Number.isSafeInteger(n) || n < 1) throw invalid(`partition numbers count from 1, got ${n}`);
  const slot = table.slots[n - 1];
  if (slot === undefined) {
    if (table.scheme === 'gpt') throw invalid(`GPT partition ${n} is out of range (the table has ${table.slots.length} entries)`);
    if (table.chainError !== undefined) throw invalid(`MBR partition ${n} not found: ${table.chainError}`);
    if (n > 4 && !table.hasExtended) throw invalid(`MBR logical partition ${n} selected, but there is no extended partition`);
    const logical = table.slots.length - 4;
    throw invalid(`MBR partition ${n} is out of range (primary 1-4 and ${logical} logical partition${logical === 1 ? '' : 's'})`);
  }
  if (slot === null) throw invalid(`${scheme} partition ${n} is an unused entry`);
  if (slot.kind === 'extended') throw invalid(`MBR partition ${n} is an extended partition (it holds logical partitions 5+), not a partition to serve`);
  if (slot.problem !== undefined) throw invalid(`${scheme} partition ${n} cannot be served: ${slot.problem}`);
  if (slot.offset + slot.length > diskSize) {
    throw invalid(`${scheme} partition ${n} (byte ${slot.offset}, ${slot.length} bytes) is outside the disk (size ${diskSize})`);
  }
  return slot;
}
