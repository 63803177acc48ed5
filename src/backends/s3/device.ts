/**
 * The `s3` backend: an export stored as fixed-size chunk objects in an S3 bucket (Ceph
 * RGW, AWS, MinIO), under a key prefix:
 *
 *   PREFIX/meta.json                  {"format":"blockgate-s3","version":1,"size":N,"chunkSize":C}
 *   PREFIX/chunk/<index, 16 hex>      chunk `index`: bytes [index*C, index*C + C) (the last one shorter)
 *   PREFIX/lease                      the single writer's lease (lease.ts)
 *
 * A chunk that has no object reads as zeroes: exports are sparse, block status comes
 * from a ListObjectsV2 listing taken at open and kept up to date by this gateway's own
 * PUTs and DELETEs (it is the only writer, the lease sees to that), and trimming or
 * zeroing a whole chunk deletes its object.
 *
 * Writes (the durability choice, docs/S3.md): a WRITE is acknowledged once its bytes are
 * in this process's chunk images; the PUT follows. That is what makes a sequential copy
 * fast (a 256 KiB write into a 1 MiB chunk waits for nothing; the chunk is PUT whole once
 * covered) and what the NBD spec allows: a write is durable only after a FLUSH (or with
 * FUA), and FLUSH here waits until every write acknowledged before it has its PUT (or
 * DELETE) completed. In detail:
 * - Each chunk being written has one in-memory image (an Entry). Writes copy into it; a
 *   chunk covered whole is uploaded at once, a partly written one after
 *   S3_WRITEBACK_DELAY_MS, at FLUSH, or when memory runs short, first filling the parts
 *   not written from the object (the read-modify-write, one GET). So two overlapping
 *   writes to one chunk never interleave a read-modify-write: there is one image and at
 *   most one PUT of a chunk in flight, the next starting only when it completed.
 * - Images held are bounded by S3_MAX_CACHED_BYTES; a write that would pass it waits
 *   for uploads to free room.
 * - A failed PUT is a write-back error: its errno is recorded in the export's ErrSeq
 *   (every session's next FLUSH reports it, once), the chunk stays in memory dirty so
 *   that reads keep returning what was acknowledged, and the next FLUSH, FUA write or
 *   close tries it again. While uploads keep failing, a write that would need room
 *   gets the error instead of waiting forever. flush() itself throws no write-back
 *   error: reporting goes through the ErrSeq only, so no session hears of it twice
 *   (the writeback filter's rule, docs/WRITEBACK-ERRORS.md).
 * - FUA: the write, then the upload of the chunks it touched; the upload's failure is
 *   also the write's own error.
 * - A crash loses what was acknowledged and not flushed, as a disk's volatile cache
 *   does; nothing a FLUSH or FUA acknowledged is lost.
 *
 * Reads: from the image when the chunk has one, else a ranged GET of the bytes asked
 * (a 404 is zeroes; a chunk the listing says is absent costs no request). S3 requests
 * of all kinds run at most S3_MAX_INFLIGHT at once (client.ts).
 *
 * Readers (`readonly`, the readonly filter, `serve -r`) take no lease and trust no
 * cache: every read is a GET, and the listing for block status is refreshed when older
 * than S3_READER_LISTING_MAX_AGE_MS.
 */
import { BlockError, toBlockError } from '../../errors/index.js';
import type { ErrSeq } from '../../errseq/index.js';
import { formatSize } from '../../device/size.js';
import { EXTENT, MAX_DEVICE_SIZE, REQ, type BlockDevice, type BlockSize, type Capabilities, type Extent } from '../../device/types.js';
import { MAX_IO_SIZE, closedError, readOnlyError } from '../../device/defaults.js';
import { Deque } from '../../io/deque.js';
import { S3Store, S3_LEASE_INFLIGHT, isNoSuchBucket } from './client.js';
import { S3Lease } from './lease.js';
import { S3_DEFAULT_CHUNK_SIZE, S3_MAX_CHUNK_SIZE, S3_MIN_CHUNK_SIZE, chunkKey, s3Key, type S3Options } from './settings.js';

/** Chunk images held in memory at most (dirty or being uploaded): 128 MiB per export. */
export const S3_MAX_CACHED_BYTES = 128 * 2 ** 20;
/** A partly written chunk is uploaded this long after its first unflushed write: 1 s. */
export const S3_WRITEBACK_DELAY_MS = 1000;
/**
 * Written ranges tracked per partly written chunk before it is filled from its object
 * (a GET) so that the ranges can be forgotten: 64 bounds the bookkeeping of a chunk
 * written in many small pieces.
 */
export const S3_MAX_COVER_RANGES = 64;
/** Chunks visited by one extents() call at most (the caller asks again from there). */
export const S3_MAX_EXTENT_CHUNKS = 65_536;
/** A reader's listing is refreshed for block status when older than 10 s. */
export const S3_READER_LISTING_MAX_AGE_MS = 10_000;
/** Format version of meta.json this code reads and writes. */
export const S3_FORMAT_VERSION = 1;

/** The contents of meta.json. */
export interface S3Meta {
  readonly format: 'blockgate-s3';
  readonly version: number;
  readonly size: number;
  readonly chunkSize: number;
}

/** What the device tells a listener (logs). */
export type S3DeviceEvent =
  | { readonly kind: 'upload-failed'; readonly chunk: number; readonly error: BlockError }
  | { readonly kind: 'lease-lost'; readonly error: BlockError };

/** One chunk being written: its image and upload state (see the module comment). */
interface Entry {
  readonly index: number;
  readonly length: number;
  /** The chunk's bytes; null: the chunk is all zeroes and its object is to be deleted. */
  data: Buffer | null;
  /** `data` is the body of the PUT in flight: copy it before changing it. */
  lent: boolean;
  /** Every byte of `data` is the chunk's (else only `covered` is, the rest to fill from S3). */
  full: boolean;
  /** Written ranges [start, end) of a not-full image, sorted, disjoint, not touching. */
  covered: number[];
  /**
   * Ranges written since the last upload started (as `covered`), to upload a chunk the
   * moment writes have covered it whole; null once more than S3_MAX_COVER_RANGES pieces
   * (the write-back delay or a FLUSH then sends it).
   */
  fresh: number[] | null;
  fill: Promise<void> | null;
  /** Bumped by every change; `durableGen` is the last one an upload made durable. */
  gen: number;
  durableGen: number;
  upload: Promise<UploadResult> | null;
  timer: NodeJS.Timeout | null;
  /** The last upload's failure, until one succeeds. */
  failed: BlockError | null;
}

interface UploadResult {
  readonly ok: boolean;
  readonly gen: number;
}

/** Adds [s, e) to the sorted disjoint ranges `r` (pairs), merging what touches. */
function addRange(r: number[], s: number, e: number): void {
  let i = 0;
  while (i < r.length && r[i + 1]! < s) i += 2;
  let j = i;
  while (j < r.length && r[j]! <= e) {
    s = Math.min(s, r[j]!);
    e = Math.max(e, r[j + 1]!);
    j += 2;
  }
  r.splice(i, j - i, s, e);
}

function rangeCovered(r: readonly number[], s: number, e: number): boolean {
  for (let i = 0; i < r.length; i += 2) if (r[i]! <= s && e <= r[i + 1]!) return true;
  return false;
}

export interface S3DeviceOptions extends S3Options {
  readonly errseq: ErrSeq;
  readonly onEvent?: (e: S3DeviceEvent) => void;
}

function parseMeta(text: string, where: string): S3Meta {
  let m: Partial<S3Meta>;
  try {
    m = JSON.parse(text) as Partial<S3Meta>;
  } catch (e) {
    throw new BlockError('EINVAL', `${where}: meta.json is not JSON: ${(e as Error).message}`);
  }
  if (m.format !== 'blockgate-s3') throw new BlockError('EINVAL', `${where}: meta.json is not a blockgate s3 export (format ${JSON.stringify(m.format)})`);
  if (m.version !== S3_FORMAT_VERSION) throw new BlockError('EINVAL', `${where}: meta.json has format version ${m.version}; this blockgate reads version ${S3_FORMAT_VERSION}`);
  if (typeof m.size !== 'number' || !Number.isSafeInteger(m.size) || m.size < 0 || m.size > MAX_DEVICE_SIZE) throw new BlockError('EINVAL', `${where}: meta.json: bad size ${m.size}`);
  const cs = m.chunkSize;
  if (typeof cs !== 'number' || cs < S3_MIN_CHUNK_SIZE || cs > S3_MAX_CHUNK_SIZE || (cs & (cs - 1)) !== 0) throw new BlockError('EINVAL', `${where}: meta.json: bad chunkSize ${cs}`);
  return m as S3Meta;
}

/** The meta.json text of a new export. */
export function metaText(size: number, chunkSize: number): string {
  const m: S3Meta = { format: 'blockgate-s3', version: S3_FORMAT_VERSION, size, chunkSize };
  return `${JSON.stringify(m)}\n`;
}

/**
 * Creates an export's meta.json (and the bucket if it does not exist); an existing
 * export is left alone and returned as it is. Used on first open with a size and by
 * `blockgate s3 create`.
 */
export async function createS3Meta(store: S3Store, prefix: string, size: number, chunkSize: number, where: string): Promise<{ meta: S3Meta; created: boolean }> {
  const key = s3Key(prefix, 'meta.json');
  await store.createBucket();
  try {
    await store.put(key, metaText(size, chunkSize), { ifNoneMatch: '*' });
    return { meta: { format: 'blockgate-s3', version: S3_FORMAT_VERSION, size, chunkSize }, created: true };
  } catch (e) {
    const now = await store.getText(key);
    if (now === null) throw e;
    return { meta: parseMeta(now.text, where), created: false };
  }
}

/** An s3 export as a BlockDevice. */
export class S3Device implements BlockDevice {
  readonly size: number;
  readonly capabilities: Capabilities;
  readonly blockSize: BlockSize;
  readonly nonBlocking = false;
  readonly description: string;
  readonly chunkSize: number;
  /** `s3://bucket/prefix`, as messages show it. */
  readonly where: string;

  readonly #store: S3Store;
  /** The lease's own connection (S3Store's constructor says why). */
  readonly #leaseStore: S3Store | null;
  readonly #prefix: string;
  readonly #lease: S3Lease | null;
  readonly #errseq: ErrSeq;
  readonly #onEvent: ((e: S3DeviceEvent) => void) | undefined;
  readonly #entries = new Map<number, Entry>();
  /** Chunks that have an object (as of the listing and our own PUTs/DELETEs). */
  #present: Set<number>;
  #listedAt: number;
  #cachedBytes = 0;
  readonly #roomWaiters = new Deque<() => void>();
  #closed = false;
  #zeroChunk: Buffer | null = null;

  private constructor(store: S3Store, leaseStore: S3Store | null, o: S3DeviceOptions, meta: S3Meta, lease: S3Lease | null, present: Set<number>) {
    this.#store = store;
    this.#leaseStore = leaseStore;
    this.#prefix = o.prefix;
    this.#lease = lease;
    this.#errseq = o.errseq;
    this.#onEvent = o.onEvent;
    this.#present = present;
    this.#listedAt = performance.now();
    this.size = meta.size;
    this.chunkSize = meta.chunkSize;
    this.where = `s3://${o.bucket}/${o.prefix}`;
    const writable = lease !== null;
    this.capabilities = Object.freeze({
      write: writable,
      flush: true,
      fua: writable,
      trim: writable,
      zero: writable,
      fastZero: writable,
      extents: true,
      cache: false,
      // One device per export serves every connection of this process: they share the
      // images, and a FLUSH waits for the uploads of all of them.
      multiConn: true,
    });
    this.blockSize = Object.freeze({ minimum: 1, preferred: Math.min(this.chunkSize, MAX_IO_SIZE), maximum: MAX_IO_SIZE });
    this.description = `s3 ${this.where} ${formatSize(this.size)} (chunks of ${formatSize(this.chunkSize)})${writable ? '' : ' (read-only)'}`;
  }

  /** Opens (and with `size`, creates if missing) the export; a writer takes the lease. */
  static async open(o: S3DeviceOptions): Promise<S3Device> {
    const store = new S3Store(o);
    const leaseStore = o.readonly ? null : new S3Store(o, S3_LEASE_INFLIGHT);
    const where = `s3://${o.bucket}/${o.prefix}`;
    let lease: S3Lease | null = null;
    try {
      const metaKey = s3Key(o.prefix, 'meta.json');
      let bucketMissing = false;
      let current = await store.getText(metaKey).catch((e: unknown) => {
        if (!isNoSuchBucket(e)) throw e;
        bucketMissing = true;
        return null;
      });
      if (current === null && (o.size === undefined || o.readonly)) {
        const what = bucketMissing ? `the bucket ${o.bucket} does not exist` : `${metaKey} is missing`;
        throw new BlockError('ENOENT', `${where}: no export there (${what}): create it with \`blockgate s3 create ${where} SIZE\` or give a size`);
      }
      if (bucketMissing) await store.createBucket();
      let device: S3Device | null = null;
      const onLost = (e: BlockError): void => {
        if (device !== null) device.#leaseLost(e);
      };
      if (leaseStore !== null) lease = await S3Lease.acquire(leaseStore, s3Key(o.prefix, 'lease'), where, onLost);
      let meta: S3Meta;
      if (current === null) {
        meta = (await createS3Meta(store, o.prefix, o.size!, o.chunkSize ?? S3_DEFAULT_CHUNK_SIZE, where)).meta;
        current = { text: metaText(meta.size, meta.chunkSize), etag: '' };
      } else {
        meta = parseMeta(current.text, where);
      }
      if (o.size !== undefined && o.size !== meta.size) {
        throw new BlockError('EINVAL', `${where}: size: the export is ${meta.size} bytes (meta.json), the settings say ${o.size}`);
      }
      if (o.chunkSize !== undefined && o.chunkSize !== meta.chunkSize) {
        throw new BlockError('EINVAL', `${where}: chunkSize: the export has chunks of ${meta.chunkSize} bytes (meta.json), the settings say ${o.chunkSize}`);
      }
      const present = await listChunks(store, o.prefix);
      device = new S3Device(store, leaseStore, o, meta, lease, present);
      return device;
    } catch (e) {
      await lease?.release().catch(() => undefined);
      store.close();
      leaseStore?.close();
      throw e;
    }
  }

  /** Chunks with an object, as this device believes (tests, bench). */
  get presentChunks(): readonly number[] {
    return [...this.#present].sort((a, b) => a - b);
  }

  #chunkLength(index: number): number {
    return Math.min(this.chunkSize, this.size - index * this.chunkSize);
  }

  /** The range [offset, offset + length) cut at chunk boundaries: chunk, offset in it, bytes before it, length. */
  *#pieces(offset: number, length: number): Generator<{ index: number; at: number; done: number; n: number }> {
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / this.chunkSize);
      const at = pos - index * this.chunkSize;
      const n = Math.min(this.chunkSize - at, length - done);
      yield { index, at, done, n };
      done += n;
    }
  }

  #check(op: string): void {
    if (this.#closed) throw closedError(op, this.description);
  }

  #checkWritable(op: string): void {
    this.#check(op);
    if (this.#lease === null) throw readOnlyError(op, this.description);
    if (!this.#lease.valid) throw this.#lease.invalidError;
  }

  // ---- reads ----

  async read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    this.#check('read');
    await Promise.all([...this.#pieces(offset, buf.length)].map((p) => this.#readPiece(p.index, p.at, buf.subarray(p.done, p.done + p.n))));
  }

  async #readPiece(index: number, at: number, dst: Buffer): Promise<void> {
    for (;;) {
      const e = this.#entries.get(index);
      if (e === undefined) break;
      if (e.data === null) {
        dst.fill(0);
        return;
      }
      if (e.full || rangeCovered(e.covered, at, at + dst.length)) {
        e.data.copy(dst, 0, at, at + dst.length);
        return;
      }
      await this.#fill(e);
    }
    if (this.#lease !== null && !this.#present.has(index)) {
      dst.fill(0);
      return;
    }
    const n = await this.#store.getInto(chunkKey(this.#prefix, index), at, dst);
    if (n === false) dst.fill(0);
    else if (n < dst.length) dst.fill(0, n);
  }

  /** Reads the parts of `e` not written from its object (the read of a read-modify-write). */
  #fill(e: Entry): Promise<void> {
    e.fill ??= (async () => {
      try {
        const base = Buffer.allocUnsafe(e.length);
        const n = this.#lease !== null && !this.#present.has(e.index) ? false : await this.#store.getInto(chunkKey(this.#prefix, e.index), 0, base, true);
        if (e.data !== null && !e.full) {
          // Unwritten bytes of the image are zero already; copy the object's over them.
          if (n !== false) {
            let pos = 0;
            for (let i = 0; i <= e.covered.length; i += 2) {
              const end = Math.min(i < e.covered.length ? e.covered[i]! : e.length, n);
              if (end > pos) base.copy(e.data, pos, pos, end);
              pos = i < e.covered.length ? e.covered[i + 1]! : e.length;
            }
          }
          e.full = true;
          e.covered = [];
        }
      } finally {
        e.fill = null;
        this.#settled(e);
      }
    })();
    return e.fill;
  }

  // ---- writes ----

  async write(data: Buffer, offset: number, flags: number): Promise<void> {
    this.#checkWritable('write');
    const touched: Entry[] = [];
    for (const p of this.#pieces(offset, data.length)) touched.push(await this.#writePiece(p.index, p.at, data.subarray(p.done, p.done + p.n)));
    if (flags & REQ.FUA) await this.#syncOrThrow(touched);
  }

  /** Copies `src` into chunk `index` at `at`; resolves once it is in the image. */
  async #writePiece(index: number, at: number, src: Buffer | null): Promise<Entry> {
    const length = this.#chunkLength(index);
    const end = at + (src?.length ?? 0);
    for (;;) {
      let e = this.#entries.get(index);
      if (e === undefined) {
        await this.#room(length);
        e = this.#entries.get(index);
        if (e === undefined) {
          // Whole chunk written, or the chunk has no object: no read needed, ever.
          const whole = at === 0 && end === length;
          const known = this.#lease !== null && !this.#present.has(index);
          e = this.#newEntry(index, length, whole ? Buffer.allocUnsafe(length) : Buffer.alloc(length), whole || known);
        }
      }
      if (e.data === null) {
        e.data = Buffer.alloc(length);
        e.full = true;
        e.covered = [];
      } else if (e.lent) {
        e.data = Buffer.from(e.data);
        e.lent = false;
      }
      if (!e.full && e.covered.length >= 2 * S3_MAX_COVER_RANGES) {
        await this.#fill(e);
        continue;
      }
      if (src === null) e.data.fill(0, at, end);
      else src.copy(e.data, at);
      if (!e.full) {
        addRange(e.covered, at, end);
        if (e.covered.length === 2 && e.covered[0] === 0 && e.covered[1] === length) {
          e.full = true;
          e.covered = [];
        }
      }
      this.#dirtied(e, at, end);
      return e;
    }
  }

  #newEntry(index: number, length: number, data: Buffer | null, full: boolean): Entry {
    const e: Entry = { index, length, data, lent: false, full, covered: [], fresh: [], fill: null, gen: 0, durableGen: 0, upload: null, timer: null, failed: null };
    this.#entries.set(index, e);
    this.#cachedBytes += length;
    return e;
  }

  /**
   * Bytes [at, end) of `e` changed (the whole chunk when not given): upload it now if the
   * writes since its last upload cover it whole (nothing more is likely to come: a
   * sequential stream has moved on), else after the write-back delay.
   */
  #dirtied(e: Entry, at = 0, end = e.length): void {
    e.gen++;
    if (e.fresh !== null) {
      addRange(e.fresh, at, end);
      if (e.fresh.length > 2 * S3_MAX_COVER_RANGES) e.fresh = null;
    }
    this.#schedule(e);
  }

  /** Starts the upload of dirty `e` now if written whole since the last one, else arms the delay. */
  #schedule(e: Entry): void {
    const covered = e.fresh !== null && e.fresh.length === 2 && e.fresh[0] === 0 && e.fresh[1] === e.length;
    if (e.upload !== null) return; // #settled calls this again when it completes
    if (covered) {
      this.#startUpload(e);
    } else if (e.timer === null) {
      e.timer = setTimeout(() => {
        e.timer = null;
        if (e.upload === null && e.gen > e.durableGen) this.#startUpload(e);
      }, S3_WRITEBACK_DELAY_MS);
      e.timer.unref();
    }
  }

  /** Waits until an image of `length` bytes fits in S3_MAX_CACHED_BYTES. */
  async #room(length: number): Promise<void> {
    while (this.#cachedBytes > 0 && this.#cachedBytes + length > S3_MAX_CACHED_BYTES) {
      // Uploads in flight free room by themselves. Only when none is does a partly
      // written chunk go out early: uploading it while its other writes are still
      // coming (a sequential stream that has not covered it yet) would PUT it twice.
      let progressing = false;
      let failure: BlockError | null = null;
      for (const e of this.#entries.values()) if (e.upload !== null || e.fill !== null) progressing = true;
      if (!progressing) {
        for (const e of this.#entries.values()) {
          if (e.failed !== null) failure = e.failed;
          else if (e.gen > e.durableGen) {
            this.#startUpload(e);
            progressing = true;
          }
        }
      }
      if (!progressing) {
        throw new BlockError(failure?.code ?? 'EIO', `${this.where}: no room for the write: earlier writes could not be uploaded (${failure?.message ?? 'unknown'})`, { cause: failure });
      }
      await new Promise<void>((resolve) => this.#roomWaiters.pushBack(resolve));
      this.#check('write');
    }
  }

  #startUpload(e: Entry): Promise<UploadResult> {
    if (e.upload !== null) return e.upload;
    if (e.timer !== null) {
      clearTimeout(e.timer);
      e.timer = null;
    }
    e.upload = this.#upload(e);
    return e.upload;
  }

  async #upload(e: Entry): Promise<UploadResult> {
    let gen = e.gen;
    let body: Buffer | null = null;
    try {
      if (!e.full) await this.#fill(e);
      gen = e.gen;
      body = e.data;
      e.fresh = [];
      const key = chunkKey(this.#prefix, e.index);
      // Checked when the request leaves the queue, so it goes out inside the lease's margin.
      const guard = (): void => {
        if (this.#lease !== null && !this.#lease.valid) throw this.#lease.invalidError;
      };
      if (body === null) {
        await this.#store.delete(key, guard);
        this.#present.delete(e.index);
      } else {
        e.lent = true;
        await this.#store.put(key, body, {}, guard);
        this.#present.add(e.index);
      }
      e.durableGen = Math.max(e.durableGen, gen);
      e.failed = null;
      return { ok: true, gen };
    } catch (err) {
      const error = toBlockError(err);
      e.failed = error;
      this.#errseq.set(error.errno);
      this.#onEvent?.({ kind: 'upload-failed', chunk: e.index, error });
      return { ok: false, gen };
    } finally {
      if (e.data === body) e.lent = false;
      e.upload = null;
      queueMicrotask(() => this.#settled(e));
    }
  }

  /** After an upload or fill of `e`: upload again if changed meanwhile, or drop the clean image. */
  #settled(e: Entry): void {
    if (this.#entries.get(e.index) !== e || e.upload !== null || e.fill !== null) return;
    if (e.gen === e.durableGen) {
      if (e.timer !== null) clearTimeout(e.timer);
      this.#entries.delete(e.index);
      this.#cachedBytes -= e.length;
    } else if (e.failed === null && !this.#closed) {
      // Changed while uploading: as any change (upload now if covered whole, else later).
      this.#schedule(e);
    }
    this.#wakeRoom();
  }

  #wakeRoom(): void {
    for (const w of this.#roomWaiters.drain()) w();
  }

  /** Makes `e` durable up to `target`; resolves to the failure, or null. */
  async #syncEntry(e: Entry, target: number): Promise<BlockError | null> {
    while (e.durableGen < target) {
      const r = await this.#startUpload(e);
      if (!r.ok && r.gen >= target) return e.failed ?? new BlockError('EIO', `${this.where}: chunk ${e.index} could not be uploaded`);
    }
    return null;
  }

  async #syncOrThrow(entries: readonly Entry[]): Promise<void> {
    const errors = await Promise.all(entries.map((e) => this.#syncEntry(e, e.gen)));
    const first = errors.find((x) => x !== null);
    if (first) throw first;
  }

  /**
   * Waits until every write acknowledged before the call is uploaded. Upload failures
   * are in the ErrSeq (recorded when they happened); this throws nothing for them.
   */
  async flush(_flags: number): Promise<void> {
    this.#check('flush');
    await this.#syncAll();
  }

  async #syncAll(): Promise<BlockError[]> {
    const targets = [...this.#entries.values()].filter((e) => e.gen > e.durableGen).map((e) => [e, e.gen] as const);
    const errors = await Promise.all(targets.map(([e, g]) => this.#syncEntry(e, g)));
    return errors.filter((x): x is BlockError => x !== null);
  }

  /** Deletes the objects of whole chunks in range; parts of chunks keep their bytes (trim is a hint). */
  async trim(offset: number, length: number, _flags: number): Promise<void> {
    this.#checkWritable('trim');
    const first = Math.ceil(offset / this.chunkSize);
    const endFull = offset + length === this.size ? Math.ceil(this.size / this.chunkSize) : Math.floor((offset + length) / this.chunkSize);
    for (let i = first; i < endFull; i++) await this.#discard(i);
  }

  /**
   * Whole chunks are deleted, the parts of chunks at either end written with zeroes.
   * NO_HOLE is accepted and not acted on (an object of zeroes reserves nothing on S3,
   * so there is nothing to keep allocated); every zero is at least as fast as writing
   * zeroes, so FAST_ZERO needs no special case.
   */
  async zero(offset: number, length: number, flags: number): Promise<void> {
    this.#checkWritable('zero');
    const touched: Entry[] = [];
    for (const { index, at, n } of this.#pieces(offset, length)) {
      if (at === 0 && n === this.#chunkLength(index)) {
        const e = await this.#discard(index);
        if (e) touched.push(e);
      } else {
        touched.push(await this.#writePiece(index, at, this.#zeroes(n)));
      }
    }
    if (flags & REQ.FUA) await this.#syncOrThrow(touched);
  }

  #zeroes(n: number): Buffer {
    this.#zeroChunk ??= Buffer.alloc(this.chunkSize);
    return this.#zeroChunk.subarray(0, n);
  }

  /** Chunk `index` becomes all zeroes: its object is deleted (unless it has none). */
  async #discard(index: number): Promise<Entry | null> {
    let e = this.#entries.get(index);
    if (e === undefined) {
      if (!this.#present.has(index)) return null;
      await this.#room(this.#chunkLength(index));
      e = this.#entries.get(index) ?? this.#newEntry(index, this.#chunkLength(index), null, true);
    }
    e.data = null;
    e.lent = false;
    e.full = true;
    e.covered = [];
    this.#dirtied(e);
    return e;
  }

  // ---- block status ----

  async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    this.#check('extents');
    if (this.#lease === null && performance.now() - this.#listedAt > S3_READER_LISTING_MAX_AGE_MS) {
      this.#present = await listChunks(this.#store, this.#prefix);
      this.#listedAt = performance.now();
    }
    const cs = this.chunkSize;
    const end = length === 0 ? Math.min(this.size, (Math.floor(offset / cs) + 1) * cs) : Math.min(this.size, offset + length);
    const out: Extent[] = [];
    let pos = offset;
    let visits = 0;
    while (pos < end && visits < S3_MAX_EXTENT_CHUNKS) {
      const index = Math.floor(pos / cs);
      const kind = this.#isData(index) ? 0 : EXTENT.HOLE | EXTENT.ZERO;
      const runEnd = Math.min(end, (index + 1) * cs);
      visits++;
      const last = out[out.length - 1];
      if (last && last.flags === kind) out[out.length - 1] = { offset: last.offset, length: runEnd - last.offset, flags: kind };
      else {
        if (last && flags & REQ.REQ_ONE) break;
        out.push({ offset: pos, length: runEnd - pos, flags: kind });
      }
      pos = runEnd;
    }
    return out;
  }

  #isData(index: number): boolean {
    const e = this.#entries.get(index);
    if (e !== undefined) return e.data !== null;
    return this.#present.has(index);
  }

  /** A hint; S3 has nothing to prefetch into. */
  async cache(_offset: number, _length: number, _flags: number): Promise<void> {
    this.#check('cache');
  }

  #leaseLost(error: BlockError): void {
    this.#errseq.set(error.errno);
    this.#onEvent?.({ kind: 'lease-lost', error });
    this.#wakeRoom();
  }

  /**
   * Uploads what is left, releases the lease, closes the connections. If uploads fail,
   * the lease is still released and close throws: acknowledged writes are lost.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    const failed = await this.#syncAll();
    this.#closed = true;
    for (const e of this.#entries.values()) if (e.timer !== null) clearTimeout(e.timer);
    await Promise.all([...this.#entries.values()].map((e) => e.upload));
    this.#wakeRoom();
    try {
      await this.#lease?.release();
    } finally {
      this.#store.close();
      this.#leaseStore?.close();
    }
    if (failed.length > 0) {
      throw new BlockError(failed[0]!.code, `${this.where}: ${failed.length} chunk(s) could not be uploaded at close; writes acknowledged since the last good flush are lost: ${failed[0]!.message}`, { cause: failed[0] });
    }
  }
}

/** The indexes of the chunks that have an object under `prefix`. */
async function listChunks(store: S3Store, prefix: string): Promise<Set<number>> {
  const present = new Set<number>();
  const head = s3Key(prefix, 'chunk/');
  await store.list(head, (key) => {
    const hex = key.slice(head.length);
    if (/^[0-9a-f]{16}$/.test(hex)) present.add(Number.parseInt(hex, 16));
  });
  return present;
}
