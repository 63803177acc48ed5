/**
 * The file backend: a regular file or a block device, accessed with positional I/O.
 *
 * I/O goes through the callback `fs.read` / `fs.write` / `fs.fdatasync`, each wrapped in
 * a promise here. `FileHandle` (fs/promises) did 1.7-1.9x fewer operations per second in
 * our measurements (shared/reference/node-performance.md 1.4, 2.3). One fd is shared by
 * every connection of the process, so all of them see the same data and one fdatasync
 * covers every write: multi-conn is safe.
 *
 * Short reads and writes are retried from where they stopped; a read that hits end of
 * file (the file shrank under the device) or a write that makes no progress is EIO,
 * never success (ggated's rule, reference FL5).
 *
 * Decisions about trim and zero: Node 20 has no fallocate(PUNCH_HOLE | ZERO_RANGE) and no
 * SEEK_DATA/SEEK_HOLE without a native addon (reference 2.4), so for now
 * - zero() writes zeroes in ZERO_CHUNK_SIZE chunks from one shared zero buffer, and
 *   zero() with FAST_ZERO fails EOPNOTSUPP at once (capability fastZero: false), as the
 *   NBD spec asks of a server that cannot zero faster than writing;
 * - cache() is a bounded readahead hint: Node has no posix_fadvise(WILLNEED), so it
 *   reads the first CACHE_READAHEAD_MAX bytes of the range and drops them;
 * - trim() is a hint that succeeds and does nothing (contents after a trim are
 *   unspecified, so keeping them is correct); capability trim stays true;
 * - extents() reports one data extent (capability extents: false).
 * A later change may add a small native helper (koffi or fs-native-extensions) for
 * punch-hole, ZERO_RANGE and SEEK_DATA, keeping these as the fallback.
 *
 * Inline or thread pool is decided once per request, by the bytes the whole request
 * moves (see INLINE_IO_MAX), never per chunk: a 1 GiB WRITE_ZEROES cut into 1 MiB
 * chunks that each went inline held the event loop for the whole gibibyte (issue 11),
 * because awaiting an already-settled promise only runs microtasks and never lets the
 * loop turn. A request above INLINE_IO_MAX goes through the thread pool chunk by chunk,
 * so the loop turns between chunks and does no synchronous I/O for it at all.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as v from 'valibot';
import { BlockError, toBlockError, type ErrnoCode } from '../errors/index.js';
import { formatSize } from '../device/size.js';
import { REQ, type BlockDevice, type Capabilities, type Extent } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import { DEFAULT_BLOCK_SIZE,
  booleanSetting,
  closedError,
  parseSettings,
  readOnlyCapabilities,
  readOnlyError,
  settingsSchema,
  singleExtent,
  sizeSetting, pathSetting } from '../device/index.js';

/**
 * zero() writes at most this many bytes per fs.write: 1 MiB, large enough to amortise
 * the thread-pool round trip, small enough that one shared buffer costs little.
 */
export const ZERO_CHUNK_SIZE = 2 ** 20;

/**
 * cache() reads ahead through a scratch buffer of at most this size, so that a large
 * prefetch request never allocates in proportion to its length.
 */
export const CACHE_CHUNK_SIZE = 2 ** 20;

/**
 * Most bytes one cache() reads: 4 MiB from the start of the range. CACHE is only a hint,
 * and without posix_fadvise the only way to give it is to read, which costs as much as a
 * real read: a client could otherwise keep a thread-pool worker (or, inline, the event
 * loop) busy for seconds with one 28-byte request for a gibibyte. A few MiB is of the
 * order of the kernel's own largest readahead window; a client streaming through the
 * device sends the next CACHE as it gets there.
 */
export const CACHE_READAHEAD_MAX = 4 * 2 ** 20;

/** The unit of /sys/class/block/<dev>/size (always 512-byte sectors on Linux). */
export const SYSFS_SECTOR_SIZE = 512;

/** Zeroes for zero(); shared by all devices, never written to (fs.write only reads it). */
const ZERO_CHUNK = Buffer.alloc(ZERO_CHUNK_SIZE);

const CAPABILITIES: Capabilities = Object.freeze({
  write: true,
  flush: true,
  fua: true,
  trim: true,
  zero: true,
  fastZero: false,
  extents: false,
  cache: true,
  multiConn: true,
});

/** Settings of a file device. */
export interface FileOptions {
  /** Path of a regular file or a block device. */
  readonly path: string;
  /**
   * For a regular file: the device size. A shorter file is extended (sparse) to it; a
   * longer one is an error (blockgate never truncates data). Not allowed for block
   * devices.
   * @default the file's size
   */
  readonly size?: number;
  /**
   * Create the file if it does not exist.
   * @default false
   */
  readonly create?: boolean;
  /**
   * Open O_RDONLY; writes, trims and zeroes fail EPERM.
   * @default false
   */
  readonly readonly?: boolean;
  /**
   * How I/O is done (see {@link FileIoMode}).
   * @default 'auto' (inline on tmpfs, the thread pool elsewhere)
   */
  readonly io?: FileIoMode;
}

function pread(fd: number, buf: Buffer, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, at, length, position, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function pwrite(fd: number, buf: Buffer, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, at, length, position, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function pwritev(fd: number, bufs: readonly Buffer[], position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.writev(fd, bufs, position, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.fdatasync(fd, (err) => (err ? reject(err) : resolve()));
  });
}

function openFd(file: string, flags: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.open(file, flags, 0o666, (err, fd) => (err ? reject(err) : resolve(fd)));
  });
}

function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.close(fd, (err) => (err ? reject(err) : resolve()));
  });
}

function fstat(fd: number): Promise<fs.Stats> {
  return new Promise((resolve, reject) => {
    fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st)));
  });
}

function ftruncate(fd: number, length: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.ftruncate(fd, length, (err) => (err ? reject(err) : resolve()));
  });
}

/** A Node error of an I/O call as a BlockError that keeps its errno and names the offset. */
function ioError(e: unknown, op: string, offset: number): BlockError {
  const b = toBlockError(e);
  return new BlockError(b.code, `${op} at offset ${offset}: ${b.message}`, { cause: e, offset });
}

/**
 * The size of a block device: Node's stat reports 0 for most, so fall back to sysfs
 * (`/sys/class/block/<name>/size`, in 512-byte sectors) of the resolved device node.
 */
async function blockDeviceSize(file: string, st: fs.Stats): Promise<number> {
  if (st.size > 0) return st.size;
  const name = path.basename(await fs.promises.realpath(file));
  try {
    const sectors = Number((await fs.promises.readFile(`/sys/class/block/${name}/size`, 'utf8')).trim());
    if (Number.isSafeInteger(sectors) && sectors >= 0) return sectors * SYSFS_SECTOR_SIZE;
  } catch {
    // Reported below.
  }
  throw new BlockError('EINVAL', `file: path: cannot determine the size of block device '${file}'`);
}

/** Most pieces one pwritev(2) call takes on Linux (IOV_MAX). */
export const IOV_MAX = 1024;

/**
 * The errors of an O_RDWR open after which the file is opened read-only instead of
 * refused: no permission to write (EACCES, EPERM) or a read-only filesystem (EROFS).
 */
export const READ_ONLY_FALLBACK_CODES: ReadonlySet<ErrnoCode> = new Set<ErrnoCode>(['EACCES', 'EPERM', 'EROFS']);

/** statfs(2) f_type of tmpfs (linux/magic.h TMPFS_MAGIC). */
export const TMPFS_MAGIC = 0x01021994;

/**
 * Largest request done with synchronous I/O on a RAM-backed file: 1 MiB. On tmpfs a
 * 1 MiB copy takes tens of microseconds, less than a round trip through the thread pool,
 * and the profile of 4 KiB random I/O was dominated by that round trip
 * (docs/PERFORMANCE.md). Larger requests still go through the thread pool, so this is
 * also the most synchronous I/O one request does in one event-loop turn. It bounds the
 * bytes of the whole request (for zero() the range, for cache() the readahead), not of
 * one chunk of it.
 */
export const INLINE_IO_MAX = 1024 * 1024;

/**
 * How I/O is done: `thread-pool` (Node's callback fs calls), `inline` (synchronous calls
 * on the event loop, only sane when the file lives in RAM), or `auto`: inline on tmpfs,
 * the thread pool everywhere else.
 */
export type FileIoMode = 'auto' | 'inline' | 'thread-pool';

/** True if `file` lives on tmpfs (so its reads and writes never wait for a disk). */
async function onTmpfs(file: string): Promise<boolean> {
  try {
    return (await fs.promises.statfs(file)).type === TMPFS_MAGIC;
  } catch {
    return false;
  }
}

/** A regular file or block device, shared by every connection through one fd. */
export class FileDevice implements BlockDevice {
  readonly size: number;
  readonly capabilities: Capabilities;
  readonly blockSize = DEFAULT_BLOCK_SIZE;
  /** True when I/O is done inline (the file is in RAM); see {@link FileIoMode}. */
  readonly nonBlocking: boolean;
  readonly description: string;
  /** The path the device was opened from. */
  readonly path: string;

  #fd: number;
  #readonly: boolean;
  #closed = false;
  /** Operations started and not yet settled; close() waits for them before closing the fd. */
  #inflight = 0;
  #onIdle: (() => void) | undefined;
  /** Set when the file could not be opened for writing and was opened read-only instead: the errno of that refusal. */
  readonly readOnlyBecause: ErrnoCode | undefined;

  private constructor(file: string, fd: number, size: number, readonly: boolean, inline: boolean, readOnlyBecause?: ErrnoCode) {
    this.path = file;
    this.readOnlyBecause = readOnlyBecause;
    this.nonBlocking = inline;
    this.#fd = fd;
    this.size = size;
    this.#readonly = readonly;
    this.capabilities = readonly ? readOnlyCapabilities(CAPABILITIES) : CAPABILITIES;
    this.description = `file ${file} ${formatSize(size)}${readOnlyBecause ? ` (read-only: ${readOnlyBecause} opening it for writing)` : readonly ? ' (read-only)' : ''}`;
  }

  /** Opens (and with `create`/`size`, creates or extends) the file. */
  static async open(options: FileOptions): Promise<FileDevice> {
    const { path: file, size, create = false, readonly = false, io = 'auto' } = options;
    if (readonly && create) throw new BlockError('EINVAL', 'file: create: cannot create a file opened read-only');
    const flags = (readonly ? fs.constants.O_RDONLY : fs.constants.O_RDWR) | (create ? fs.constants.O_CREAT : 0);
    let fd: number;
    let readOnlyBecause: ErrnoCode | undefined;
    try {
      fd = await openFd(file, flags);
    } catch (e) {
      const b = toBlockError(e);
      // As nbdkit's file plugin: a file we may only read (mode 0444, a read-only mount) is
      // served read-only rather than refused; the description says why, and `serve` warns.
      if (!readonly && !create && READ_ONLY_FALLBACK_CODES.has(b.code)) {
        try {
          fd = await openFd(file, fs.constants.O_RDONLY);
          readOnlyBecause = b.code;
        } catch {
          throw new BlockError(b.code, `file: path: cannot open '${file}': ${b.message}`, { cause: e });
        }
      } else {
        throw new BlockError(b.code, `file: path: cannot open '${file}': ${b.message}`, { cause: e });
      }
    }
    const ro = readonly || readOnlyBecause !== undefined;
    try {
      const st = await fstat(fd);
      let devSize: number;
      if (st.isFile()) {
        devSize = st.size;
        if (size !== undefined && size !== st.size) {
          if (size < st.size) {
            throw new BlockError(
              'EINVAL',
              `file: size: ${formatSize(size)} is smaller than the existing file (${formatSize(st.size)}); files are never truncated`,
            );
          }
          if (ro) throw new BlockError('EINVAL', `file: size: cannot extend '${file}' opened read-only${readOnlyBecause ? ` (${readOnlyBecause} opening it for writing)` : ''}`);
          await ftruncate(fd, size);
          devSize = size;
        }
      } else if (st.isBlockDevice()) {
        if (size !== undefined) throw new BlockError('EINVAL', `file: size: block device '${file}' cannot be resized`);
        devSize = await blockDeviceSize(file, st);
      } else {
        throw new BlockError('EINVAL', `file: path: '${file}' is not a regular file or block device`);
      }
      const inline = io === 'inline' || (io === 'auto' && st.isFile() && (await onTmpfs(file)));
      return new FileDevice(file, fd, devSize, ro, inline, readOnlyBecause);
    } catch (e) {
      await closeFd(fd).catch(() => undefined);
      throw toBlockError(e);
    }
  }

  read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    return this.#run('read', () => this.#readFully(buf, offset));
  }

  write(data: Buffer, offset: number, flags: number): Promise<void> {
    return this.#runWritable('write', async () => {
      await this.#writeFully(data, offset);
      if (flags & REQ.FUA) await this.#sync('write');
    });
  }

  /**
   * Gather write: the pieces go to pwritev(2) as they are (no concatenation), inline on
   * tmpfs like write(). A short write continues from where it stopped.
   */
  writev(data: readonly Buffer[], offset: number, flags: number): Promise<void> {
    return this.#runWritable('write', async () => {
      let pieces = data.filter((b) => b.length > 0);
      let at = offset;
      const total = pieces.reduce((t, b) => t + b.length, 0);
      const inline = this.#inlineFor(total);
      while (pieces.length > 0) {
        let n: number;
        try {
          // pwritev takes at most IOV_MAX pieces per call; the loop writes the rest.
          const batch = pieces.length > IOV_MAX ? pieces.slice(0, IOV_MAX) : pieces;
          n = inline ? fs.writevSync(this.#fd, batch, at) : await pwritev(this.#fd, batch, at);
        } catch (e) {
          throw ioError(e, 'write', at);
        }
        if (n === 0) throw new BlockError('EIO', `write: no progress at offset ${at}`, { offset: at });
        at += n;
        // Drop what was written; keep the rest of a piece cut in the middle.
        while (n > 0 && pieces.length > 0) {
          const first = pieces[0]!;
          if (n >= first.length) {
            n -= first.length;
            pieces = pieces.slice(1);
          } else {
            pieces = [first.subarray(n), ...pieces.slice(1)];
            n = 0;
          }
        }
      }
      if (flags & REQ.FUA) await this.#sync('write');
    });
  }

  flush(_flags: number): Promise<void> {
    return this.#run('flush', () => this.#sync('flush'));
  }

  /** A hint that does nothing for now (see the module comment). */
  trim(_offset: number, _length: number, _flags: number): Promise<void> {
    return this.#runWritable('trim', async () => undefined);
  }

  /** Writes zeroes; FAST_ZERO fails EOPNOTSUPP at once since that is all it can do. */
  zero(offset: number, length: number, flags: number): Promise<void> {
    return this.#runWritable('zero', async () => {
      if (flags & REQ.FAST_ZERO) {
        throw new BlockError('EOPNOTSUPP', 'zero: the file backend cannot zero faster than writing zeroes');
      }
      const end = offset + length;
      const inline = this.#inlineFor(length);
      for (let pos = offset; pos < end; pos += ZERO_CHUNK_SIZE) {
        await this.#writeFully(ZERO_CHUNK.subarray(0, Math.min(ZERO_CHUNK_SIZE, end - pos)), pos, inline);
      }
      if (flags & REQ.FUA) await this.#sync('zero');
    });
  }

  /** No allocation information without SEEK_DATA: one data extent. */
  extents(offset: number, length: number, _flags: number): Promise<Extent[]> {
    return this.#run('extents', async () => singleExtent(offset, length, this.size, 0));
  }

  /**
   * A readahead hint: reads the first CACHE_READAHEAD_MAX bytes of the range (into the
   * page cache) through a bounded scratch buffer, and ignores the rest.
   */
  cache(offset: number, length: number, _flags: number): Promise<void> {
    return this.#run('cache', async () => {
      const ahead = Math.min(length, CACHE_READAHEAD_MAX);
      const scratch = Buffer.allocUnsafe(Math.min(CACHE_CHUNK_SIZE, ahead));
      const end = offset + ahead;
      const inline = this.#inlineFor(ahead);
      for (let pos = offset; pos < end; pos += CACHE_CHUNK_SIZE) {
        await this.#readFully(scratch.subarray(0, Math.min(CACHE_CHUNK_SIZE, end - pos)), pos, inline);
      }
    });
  }

  /** Waits for operations in flight, then closes the fd. Calling it again does nothing. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#inflight > 0) await new Promise<void>((resolve) => (this.#onIdle = resolve));
    try {
      await closeFd(this.#fd);
    } catch (e) {
      throw ioError(e, 'close', 0);
    }
  }

  /**
   * Runs one operation: rejects it on a closed device, and counts it in flight so that
   * close() never closes the fd (whose number the kernel could hand to another file)
   * under a running operation.
   */
  async #run<T>(op: string, fn: () => Promise<T>): Promise<T> {
    if (this.#closed) throw closedError(op, this.description);
    this.#inflight++;
    try {
      return await fn();
    } finally {
      if (--this.#inflight === 0 && this.#onIdle) this.#onIdle();
    }
  }

  #runWritable<T>(op: string, fn: () => Promise<T>): Promise<T> {
    if (this.#readonly && !this.#closed) return Promise.reject(readOnlyError(op, this.description));
    return this.#run(op, fn);
  }

  /** Whether a request moving `bytes` in all is done inline (see INLINE_IO_MAX). */
  #inlineFor(bytes: number): boolean {
    return this.nonBlocking && bytes <= INLINE_IO_MAX;
  }

  /** Reads all of `buf`; `inline` is decided by the caller for the whole request. */
  async #readFully(buf: Buffer, offset: number, inline = this.#inlineFor(buf.length)): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      let n: number;
      try {
        n = inline
          ? fs.readSync(this.#fd, buf, done, buf.length - done, offset + done)
          : await pread(this.#fd, buf, done, buf.length - done, offset + done);
      } catch (e) {
        throw ioError(e, 'read', offset + done);
      }
      if (n === 0) {
        throw new BlockError('EIO', `read: unexpected end of file at offset ${offset + done} (the file shrank?)`, {
          offset: offset + done,
        });
      }
      done += n;
    }
  }

  /** Writes all of `data`; `inline` is decided by the caller for the whole request. */
  async #writeFully(data: Buffer, offset: number, inline = this.#inlineFor(data.length)): Promise<void> {
    let done = 0;
    while (done < data.length) {
      let n: number;
      try {
        n = inline
          ? fs.writeSync(this.#fd, data, done, data.length - done, offset + done)
          : await pwrite(this.#fd, data, done, data.length - done, offset + done);
      } catch (e) {
        throw ioError(e, 'write', offset + done);
      }
      if (n === 0) {
        throw new BlockError('EIO', `write: no progress at offset ${offset + done}`, { offset: offset + done });
      }
      done += n;
    }
  }

  async #sync(op: string): Promise<void> {
    try {
      await fdatasync(this.#fd);
    } catch (e) {
      const b = toBlockError(e);
      throw new BlockError(b.code, `${op}: fdatasync failed: ${b.message}`, { cause: e, writeback: true });
    }
  }
}

/** The settings schema (listed by `blockgate plugins`). */
export const fileSettings = settingsSchema({
  path: pathSetting,
  size: v.optional(sizeSetting),
  create: booleanSetting,
  readonly: booleanSetting,
  io: v.optional(v.picklist(['auto', 'inline', 'thread-pool'])),
});

/** Backend factory: `{ type: 'file', path, size?, create?, readonly? }`. */
export async function fileBackend(desc: LayerDescription): Promise<FileDevice> {
  const s = parseSettings('file', fileSettings, desc);
  return await FileDevice.open({
    path: s.path,
    size: s.size,
    create: s.create ?? false,
    readonly: s.readonly ?? false,
    io: s.io ?? 'auto',
  });
}
