/**
 * The copy engine behind `blockgate copy` (nbdcopy's job), usable without the CLI:
 *
 *   const src = await openCopySource('nbd://a/disk');
 *   const dst = await openCopyDestination('disk.img');
 *   try {
 *     const r = await copyImage(src.endpoint, dst.endpoint, { checksum: 'sha256' });
 *   } finally {
 *     await Promise.all([src.close(), dst.close()]);
 *   }
 *
 * Endpoints are random-access (an NbdClient, a file or block device through a
 * FileHandle, the null sink) or sequential streams (stdin, stdout, pipes). With a
 * random-access source, a pool of `requests` workers each owns one buffer of
 * `requestSize` bytes, allocated once: a worker takes the next piece of the image, reads
 * it and writes it, and takes the next. The pieces come from the source's extents
 * (NBD block status, base:allocation), fetched ahead of the workers: a range the source
 * says reads as zeroes (NBD_STATE_ZERO) is never read: it becomes WRITE_ZEROES on an NBD
 * destination, nothing at all on a destination known to be zero (a file the copy
 * truncated, or `destinationIsZero`), or written zeroes elsewhere. A piece that was read
 * and holds only zeroes is treated the same way (`detectZeroes`).
 *
 * Pieces complete in any order, except where order matters: a stream destination is
 * written in order, and the checksum (`checksum: 'sha256'`) is computed in order over
 * every byte of the image, zero ranges included, so it equals `sha256sum` of the raw
 * image. A worker that finished out of turn keeps its buffer until the pieces before it
 * are done.
 *
 * The first failure stops the copy: no new pieces are started, the pieces in flight
 * end, and copyImage rejects with a CopyError naming the side that failed (source or
 * destination) and keeping the original error's errno and message. A copy never resolves
 * unless every byte was read and written (or zeroed) without error.
 */
import { createHash, getHashes, type Hash } from 'node:crypto';
import fs from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import type { Readable, Writable } from 'node:stream';
import { BlockError, toBlockError } from '../errors/index.js';
import { BASE_ALLOCATION, NBD_STATE } from './constants.js';
import { NbdClient, type Extent } from './client.js';

export type CopySide = 'source' | 'destination';

/** A failure of one side of a copy: `side: message`, with the original errno. */
export class CopyError extends BlockError {
  readonly side: CopySide;
  /** `what`: the operation, e.g. `reading 262144 bytes at 1048576`. */
  constructor(side: CopySide, cause: unknown, what?: string) {
    const b = toBlockError(cause);
    super(b.code, `${side}: ${what ? `${what}: ` : ''}${b.message}`, { cause: b, ...(b.offset !== undefined ? { offset: b.offset } : {}) });
    this.side = side;
  }
}

// ---------------------------------------------------------------------------------
// Endpoints

/** A source that can be read anywhere. */
export interface RandomSource {
  readonly kind: 'random';
  readonly size: number;
  /** Reads `buf.length` bytes at `offset` (all of them, or rejects). */
  read(buf: Buffer, offset: number): Promise<void>;
  /** The extents from `offset` (a prefix of the range at least), or null when the source has none. */
  readonly extents: ((offset: number, length: number) => Promise<readonly Extent[]>) | null;
}

/** A source read in order, of unknown size (stdin, a pipe). */
export interface StreamSource {
  readonly kind: 'stream';
  /** Fills `buf` up to `length` bytes; fewer only at the end of the stream. */
  readInto(buf: Buffer, length: number): Promise<number>;
}

/** A destination that can be written anywhere. */
export interface RandomDestination {
  readonly kind: 'random';
  /** Its size, or null if the copy sets it (a regular file: `resize`). */
  readonly size: number | null;
  /** True if every byte reads as zero before the copy (zero ranges are then skipped). */
  readonly zeroed: boolean;
  write(buf: Buffer, offset: number): Promise<void>;
  /** Makes a range read as zeroes without sending them, or null (zeroes are then written). */
  readonly zero: ((offset: number, length: number) => Promise<void>) | null;
  /** Sets the size (regular files). */
  readonly resize: ((size: number) => Promise<void>) | null;
  flush(): Promise<void>;
}

/** A destination written in order (stdout, a pipe). */
export interface StreamDestination {
  readonly kind: 'stream';
  write(buf: Buffer): Promise<void>;
  flush(): Promise<void>;
}

export type CopySource = RandomSource | StreamSource;
export type CopyDestination = RandomDestination | StreamDestination;

const { NBD_STATE_ZERO } = NBD_STATE;

/** An NbdClient as a source; `extents`: use base:allocation when it was negotiated. */
export function nbdSource(client: NbdClient, opts: { readonly extents?: boolean } = {}): RandomSource {
  const useExtents = (opts.extents ?? true) && client.canBlockStatus(BASE_ALLOCATION);
  return {
    kind: 'random',
    size: client.size,
    read: (buf, offset) => client.pread(buf, offset),
    extents: useExtents ? (offset, length) => client.blockStatus(offset, length) : null,
  };
}

/** An NbdClient as a destination. */
export function nbdDestination(client: NbdClient, opts: { readonly destinationIsZero?: boolean; readonly flush?: boolean } = {}): RandomDestination {
  if (client.readOnly) throw new CopyError('destination', new BlockError('EROFS', 'the export is read-only'));
  return {
    kind: 'random',
    size: client.size,
    zeroed: opts.destinationIsZero ?? false,
    write: (buf, offset) => client.pwrite(buf, offset),
    zero: client.canZero ? (offset, length) => client.zero(offset, length) : null,
    resize: null,
    flush: async () => {
      if (client.canFlush) await client.flush();
    },
  };
}

/** A file or block device opened for reading, of `size` bytes. */
export function fileSource(handle: FileHandle, size: number): RandomSource {
  return {
    kind: 'random',
    size,
    async read(buf, offset) {
      let done = 0;
      while (done < buf.length) {
        const { bytesRead } = await handle.read(buf, done, buf.length - done, offset + done);
        if (bytesRead === 0) throw new BlockError('EIO', `the file ended at ${offset + done} bytes, before the ${size} it had when the copy began`);
        done += bytesRead;
      }
    },
    extents: null,
  };
}

/**
 * A file or block device opened for writing. `size`: a block device's (fixed), or null
 * for a regular file, which the copy resizes. `zeroed`: every byte reads as zero (a file
 * just truncated to 0).
 */
export function fileDestination(handle: FileHandle, opts: { readonly size: number | null; readonly zeroed: boolean }): RandomDestination {
  return {
    kind: 'random',
    size: opts.size,
    zeroed: opts.zeroed,
    async write(buf, offset) {
      let done = 0;
      while (done < buf.length) {
        const { bytesWritten } = await handle.write(buf, done, buf.length - done, offset + done);
        done += bytesWritten;
      }
    },
    zero: null,
    resize: opts.size === null ? (size) => handle.truncate(size) : null,
    flush: () => handle.datasync(),
  };
}

/** Discards everything (nbdcopy's `null:`). */
export function nullDestination(): RandomDestination {
  const done = Promise.resolve();
  return { kind: 'random', size: null, zeroed: true, write: () => done, zero: null, resize: () => done, flush: () => done };
}

/** A readable stream (stdin, a pipe) as a source. */
export function streamSource(stream: Readable): StreamSource {
  const it = stream[Symbol.asyncIterator]() as AsyncIterator<Buffer | string>;
  let chunk: Buffer | null = null;
  let pos = 0;
  let eof = false;
  return {
    kind: 'stream',
    async readInto(buf, length) {
      let n = 0;
      while (n < length) {
        if (chunk === null || pos >= chunk.length) {
          if (eof) break;
          const r = await it.next();
          if (r.done) {
            eof = true;
            break;
          }
          chunk = typeof r.value === 'string' ? Buffer.from(r.value) : r.value;
          pos = 0;
          continue;
        }
        const k = Math.min(length - n, chunk.length - pos);
        chunk.copy(buf, n, pos, pos + k);
        pos += k;
        n += k;
      }
      return n;
    },
  };
}

/** A writable stream (stdout, a pipe) as a destination; each write resolves once the stream has taken the bytes. */
export function streamDestination(stream: Writable): StreamDestination {
  let failed: Error | null = null;
  stream.on('error', (e: Error) => (failed ??= e));
  return {
    kind: 'stream',
    write(buf) {
      if (failed) return Promise.reject(failed);
      return new Promise<void>((resolve, reject) => {
        stream.write(buf, (e) => (e ? reject(e) : failed ? reject(failed) : resolve()));
      });
    },
    flush: () => (failed ? Promise.reject(failed) : Promise.resolve()),
  };
}

// ---------------------------------------------------------------------------------
// Opening endpoints by name (what the CLI takes)

/** True if `s` is an NBD URI (the schemes parseNbdUri takes). */
export function isNbdUri(s: string): boolean {
  return /^nbds?(\+unix)?:\/\//.test(s);
}

export interface OpenOptions {
  /** NBD connections when the server advertises multi-conn (default 4). */
  readonly connections?: number;
  /** Requests in flight per connection (default 64). */
  readonly requests?: number;
  /** Largest request (default 256 KiB). */
  readonly requestSize?: number;
  /** Use the source's extents (default true). */
  readonly extents?: boolean;
  /** The destination reads as zeroes already. */
  readonly destinationIsZero?: boolean;
}

export interface OpenedEndpoint<E> {
  readonly endpoint: E;
  /** `nbd`, `file`, `device`, `stream` or `null`. */
  readonly type: 'nbd' | 'file' | 'device' | 'stream' | 'null';
  /** The size, when known (not for streams). */
  readonly size: number | null;
  /** The NBD client, for NBD endpoints. */
  readonly client: NbdClient | null;
  /** Disconnects or closes the file; never rejects. */
  close(): Promise<void>;
}

export const COPY_DEFAULTS = { connections: 4, requests: 64, requestSize: 256 * 1024 } as const;
/** The largest --request-size (the NBD protocol's 32 MiB). */
export const MAX_REQUEST_SIZE = 32 * 1024 * 1024;

/** A block device's size from sysfs (Node has no BLKGETSIZE64 nor lseek(SEEK_END)). */
function blockDeviceSize(st: fs.Stats, name: string): number {
  const rdev = st.rdev;
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | (Math.floor(rdev / 4096) & 0xfff00);
  try {
    const sectors = Number(fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim());
    if (Number.isSafeInteger(sectors)) return sectors * 512;
  } catch {
    // no sysfs
  }
  throw new BlockError('EOPNOTSUPP', `${name}: cannot find the size of block device ${major}:${minor} (no /sys/dev/block)`);
}

async function connectNbd(uri: string, o: OpenOptions): Promise<NbdClient> {
  const connections = o.connections ?? COPY_DEFAULTS.connections;
  // Requests are per connection (nbdcopy's -R): the client's budget covers all of them.
  const requests = Math.min(65536, (o.requests ?? COPY_DEFAULTS.requests) * connections);
  const requestSize = o.requestSize ?? COPY_DEFAULTS.requestSize;
  return NbdClient.connect(uri, {
    connections,
    maxInFlight: requests,
    maxInFlightBytes: Math.max(4096, requests * requestSize),
  });
}

/**
 * The workers for a copy between two opened endpoints: `requests` per connection, over
 * the connections both NBD sides opened (the fewer of the two; files and streams do not
 * limit it), as nbdcopy counts them.
 */
export function copyWorkers(requests: number, src: OpenedEndpoint<CopySource>, dst: OpenedEndpoint<CopyDestination>): number {
  const conns = [src.client?.connections, dst.client?.connections].filter((n): n is number => n !== undefined);
  return Math.min(65536, requests * (conns.length > 0 ? Math.min(...conns) : 1));
}

function closer(fn: () => Promise<unknown>): () => Promise<void> {
  let p: Promise<void> | null = null;
  return () => (p ??= fn().then(
    () => undefined,
    () => undefined,
  ));
}

/** Opens a copy source: an NBD URI, `-` (stdin), or a file, block device or pipe. */
export async function openCopySource(spec: string, o: OpenOptions = {}): Promise<OpenedEndpoint<CopySource>> {
  try {
    if (isNbdUri(spec)) {
      const client = await connectNbd(spec, o);
      return { endpoint: nbdSource(client, { extents: o.extents ?? true }), type: 'nbd', size: client.size, client, close: closer(() => client.close()) };
    }
    if (spec === '-') return { endpoint: streamSource(process.stdin), type: 'stream', size: null, client: null, close: async () => undefined };
    const handle = await fs.promises.open(spec, 'r');
    const st = await handle.stat();
    if (st.isFile() || st.isBlockDevice()) {
      const size = st.isFile() ? st.size : blockDeviceSize(st, spec);
      return { endpoint: fileSource(handle, size), type: st.isFile() ? 'file' : 'device', size, client: null, close: closer(() => handle.close()) };
    }
    if (st.isDirectory()) {
      await handle.close();
      throw new BlockError('EISDIR', `${spec}: is a directory`);
    }
    const stream = handle.createReadStream();
    return { endpoint: streamSource(stream), type: 'stream', size: null, client: null, close: closer(() => handle.close()) };
  } catch (e) {
    throw e instanceof CopyError ? e : new CopyError('source', e);
  }
}

/**
 * Opens a copy destination: an NBD URI, `-` (stdout), `null:`, or a path. A regular
 * file is created or truncated to zero (so it reads as zeroes and zero ranges need no
 * writing), and the copy sizes it; a block device is written in place (at least the
 * source's size); a pipe or character device is written in order.
 */
export async function openCopyDestination(spec: string, o: OpenOptions = {}): Promise<OpenedEndpoint<CopyDestination>> {
  try {
    if (isNbdUri(spec)) {
      const client = await connectNbd(spec, o);
      try {
        const endpoint = nbdDestination(client, { destinationIsZero: o.destinationIsZero ?? false });
        return { endpoint, type: 'nbd', size: client.size, client, close: closer(() => client.close()) };
      } catch (e) {
        await client.close().catch(() => undefined);
        throw e;
      }
    }
    if (spec === '-') return { endpoint: streamDestination(process.stdout), type: 'stream', size: null, client: null, close: async () => undefined };
    if (spec === 'null:') return { endpoint: nullDestination(), type: 'null', size: null, client: null, close: async () => undefined };
    let st: fs.Stats | null = null;
    try {
      st = await fs.promises.stat(spec);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    if (st?.isDirectory()) throw new BlockError('EISDIR', `${spec}: is a directory`);
    if (st?.isBlockDevice()) {
      const size = blockDeviceSize(st, spec);
      const handle = await fs.promises.open(spec, fs.constants.O_WRONLY);
      return {
        endpoint: fileDestination(handle, { size, zeroed: o.destinationIsZero ?? false }),
        type: 'device',
        size,
        client: null,
        close: closer(() => handle.close()),
      };
    }
    if (st && !st.isFile()) {
      const handle = await fs.promises.open(spec, fs.constants.O_WRONLY);
      const stream = handle.createWriteStream();
      return { endpoint: streamDestination(stream), type: 'stream', size: null, client: null, close: closer(() => new Promise<void>((r) => stream.end(r)).then(() => handle.close())) };
    }
    const handle = await fs.promises.open(spec, 'w');
    return { endpoint: fileDestination(handle, { size: null, zeroed: true }), type: 'file', size: null, client: null, close: closer(() => handle.close()) };
  } catch (e) {
    throw e instanceof CopyError ? e : new CopyError('destination', e);
  }
}

// ---------------------------------------------------------------------------------
// The copy

export interface CopyOptions {
  /** Requests in flight (workers, each with one buffer); default 64. */
  readonly requests?: number;
  /** Largest read or write; default 256 KiB. */
  readonly requestSize?: number;
  /** Skip zero ranges entirely: the destination already reads as zeroes. */
  readonly destinationIsZero?: boolean;
  /** Treat a piece that was read and holds only zeroes as a zero range (default true). */
  readonly detectZeroes?: boolean;
  /** Flush the destination at the end. */
  readonly flush?: boolean;
  /** Hash the image in order with this algorithm (e.g. 'sha256'). */
  readonly checksum?: string;
  /** Called as bytes complete: `total` is null for a stream source. */
  readonly onProgress?: (done: number, total: number | null) => void;
  /** Stops the copy (it rejects with ECANCELED). */
  readonly signal?: AbortSignal;
}

export interface CopyResult {
  /** Bytes of the image (the source's size, or what the stream held). */
  readonly size: number;
  /** Bytes read from the source. */
  readonly bytesRead: number;
  /** Bytes written as data to the destination (zeroes written as data included). */
  readonly bytesWritten: number;
  /** Bytes made zero with a zero request (WRITE_ZEROES). */
  readonly bytesZeroed: number;
  /** Bytes of zero ranges not sent at all (the destination reads as zeroes already). */
  readonly bytesSkipped: number;
  /** Block status requests made to the source. */
  readonly extentRequests: number;
  /** The hex digest, when asked for. */
  readonly checksum: string | null;
  readonly elapsedMs: number;
}

/** The largest zero range handed out at once. */
const MAX_ZERO_PIECE = 1024 * 1024 * 1024;
/** How much of the source's map to ask for per block status request. */
const EXTENTS_REQUEST = 2 * 1024 * 1024 * 1024;

interface Piece {
  offset: number;
  length: number;
  zero: boolean;
}

interface Span {
  readonly offset: number;
  end: number;
  readonly zero: boolean;
}

/** The source's map, fetched ahead of the workers and handed out in pieces. */
class Walker {
  readonly #size: number;
  readonly #query: RandomSource['extents'];
  readonly #ahead: number;
  readonly #maxData: number;
  #spans: Span[] = [];
  #head = 0;
  /** End of the part of the map known. */
  #known = 0;
  /** Next byte to hand out. */
  #cursor = 0;
  #fetching: Promise<void> | null = null;
  #error: CopyError | null = null;
  requests = 0;

  constructor(size: number, query: RandomSource['extents'], maxData: number, ahead: number) {
    this.#size = size;
    this.#query = query;
    this.#maxData = maxData;
    this.#ahead = ahead;
    if (!query) {
      if (size > 0) this.#spans.push({ offset: 0, end: size, zero: false });
      this.#known = size;
    }
  }

  /** The next piece into `out`, or false at the end. */
  async next(out: Piece): Promise<boolean> {
    for (;;) {
      if (this.#error) throw this.#error;
      if (this.#take(out)) {
        this.#prefetch();
        return true;
      }
      if (this.#known >= this.#size) return false;
      this.#prefetch();
      await this.#fetching;
    }
  }

  #take(out: Piece): boolean {
    while (this.#head < this.#spans.length) {
      const s = this.#spans[this.#head]!;
      if (this.#cursor >= s.end) {
        this.#head++;
        continue;
      }
      const len = Math.min(s.end - this.#cursor, s.zero ? MAX_ZERO_PIECE : this.#maxData);
      out.offset = this.#cursor;
      out.length = len;
      out.zero = s.zero;
      this.#cursor += len;
      if (this.#head > 1024) {
        this.#spans = this.#spans.slice(this.#head);
        this.#head = 0;
      }
      return true;
    }
    return false;
  }

  #prefetch(): void {
    if (this.#fetching || this.#error || this.#known >= this.#size || this.#known - this.#cursor >= this.#ahead) return;
    this.#fetching = this.#fetch().finally(() => (this.#fetching = null));
  }

  async #fetch(): Promise<void> {
    const from = this.#known;
    let extents: readonly Extent[];
    try {
      this.requests++;
      extents = await this.#query!(from, Math.min(this.#size - from, EXTENTS_REQUEST));
    } catch (e) {
      this.#error = new CopyError('source', e);
      return;
    }
    let pos = from;
    for (const e of extents) {
      if (pos >= this.#size) break;
      const len = Math.min(e.length, this.#size - pos);
      if (len <= 0) continue;
      const zero = (e.flags & NBD_STATE_ZERO) !== 0;
      const last = this.#spans[this.#spans.length - 1];
      if (last && last.zero === zero && last.end === pos && this.#spans.length > this.#head) last.end = pos + len;
      else this.#spans.push({ offset: pos, end: pos + len, zero });
      pos += len;
    }
    if (pos === from) {
      this.#error = new CopyError('source', new BlockError('EPROTO', `block status at ${from} described no extents`));
      return;
    }
    this.#known = pos;
  }
}

/** Hands out turns in offset order (the checksum, an in-order destination). */
class Order {
  next = 0;
  readonly #waiting = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();
  #error: Error | null = null;

  /** Resolves when every byte before `offset` is done. */
  wait(offset: number): Promise<void> {
    if (this.#error) return Promise.reject(this.#error);
    if (offset === this.next) return Promise.resolve();
    return new Promise((resolve, reject) => this.#waiting.set(offset, { resolve, reject }));
  }

  done(end: number): void {
    this.next = end;
    const w = this.#waiting.get(end);
    if (w) {
      this.#waiting.delete(end);
      w.resolve();
    }
  }

  fail(e: Error): void {
    this.#error ??= e;
    for (const w of this.#waiting.values()) w.reject(e);
    this.#waiting.clear();
  }
}

function checkHash(algo: string): Hash {
  if (!getHashes().includes(algo.toLowerCase())) throw new BlockError('EINVAL', `unknown checksum algorithm '${algo}' (try sha256, sha512, sha1, md5)`);
  return createHash(algo.toLowerCase());
}

function positiveInt(name: string, v: number, min: number, max: number): number {
  if (!Number.isSafeInteger(v) || v < min || v > max) throw new BlockError('EINVAL', `${name}: expected an integer from ${min} to ${max}, got ${v}`);
  return v;
}

/** Copies `src` to `dst`. See the module comment. */
export async function copyImage(src: CopySource, dst: CopyDestination, opts: CopyOptions = {}): Promise<CopyResult> {
  const requests = positiveInt('requests', opts.requests ?? COPY_DEFAULTS.requests, 1, 65536);
  const requestSize = positiveInt('request size', opts.requestSize ?? COPY_DEFAULTS.requestSize, 512, MAX_REQUEST_SIZE);
  const hash = opts.checksum ? checkHash(opts.checksum) : null;
  const started = performance.now();
  const engine = new Engine(src, dst, requests, requestSize, hash, opts);
  const size = await engine.run();
  return {
    size,
    bytesRead: engine.bytesRead,
    bytesWritten: engine.bytesWritten,
    bytesZeroed: engine.bytesZeroed,
    bytesSkipped: engine.bytesSkipped,
    extentRequests: engine.extentRequests,
    checksum: hash ? hash.digest('hex') : null,
    elapsedMs: performance.now() - started,
  };
}

class Engine {
  readonly #src: CopySource;
  readonly #dst: CopyDestination;
  readonly #requests: number;
  readonly #requestSize: number;
  readonly #hash: Hash | null;
  readonly #opts: CopyOptions;
  readonly #zeroes: Buffer;
  readonly #dstZeroed: boolean;
  readonly #detect: boolean;
  #error: CopyError | null = null;
  #order: Order | null = null;
  bytesRead = 0;
  bytesWritten = 0;
  bytesZeroed = 0;
  bytesSkipped = 0;
  extentRequests = 0;
  #done = 0;
  #total: number | null = null;

  constructor(src: CopySource, dst: CopyDestination, requests: number, requestSize: number, hash: Hash | null, opts: CopyOptions) {
    this.#src = src;
    this.#dst = dst;
    this.#requests = requests;
    this.#requestSize = requestSize;
    this.#hash = hash;
    this.#opts = opts;
    this.#zeroes = Buffer.alloc(requestSize);
    this.#dstZeroed = dst.kind === 'random' && (dst.zeroed || (opts.destinationIsZero ?? false));
    // Worth checking read data for zeroes only where a zero range costs less than data.
    this.#detect = (opts.detectZeroes ?? true) && dst.kind === 'random' && (this.#dstZeroed || dst.zero !== null);
  }

  #fail(side: CopySide, e: unknown, what?: string): void {
    if (this.#error) return;
    this.#error = e instanceof CopyError ? e : new CopyError(side, e, what);
    this.#order?.fail(this.#error);
  }

  #progress(n: number): void {
    this.#done += n;
    this.#opts.onProgress?.(this.#done, this.#total);
  }

  async run(): Promise<number> {
    const signal = this.#opts.signal;
    const onAbort = () => this.#fail('source', new BlockError('ECANCELED', 'the copy was interrupted'));
    signal?.addEventListener('abort', onAbort, { once: true });
    if (signal?.aborted) onAbort();
    try {
      const size = this.#src.kind === 'random' ? await this.#runRandom(this.#src) : await this.#runStream(this.#src);
      if (this.#error) throw this.#error;
      if (this.#opts.flush) {
        try {
          await this.#dst.flush();
        } catch (e) {
          throw new CopyError('destination', e);
        }
      }
      return size;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  // -- A random-access source: workers over the map ---------------------------------

  async #runRandom(src: RandomSource): Promise<number> {
    const dst = this.#dst;
    const size = src.size;
    this.#total = size;
    if (dst.kind === 'random') {
      if (dst.size !== null && dst.size < size) {
        throw new CopyError('destination', new BlockError('ENOSPC', `${dst.size} bytes, smaller than the source (${size} bytes)`));
      }
      if (dst.resize) {
        try {
          await dst.resize(size);
        } catch (e) {
          throw new CopyError('destination', e);
        }
      }
    }
    if (this.#hash || dst.kind === 'stream') this.#order = new Order();
    const walker = new Walker(size, src.extents, this.#requestSize, Math.max(this.#requests * this.#requestSize * 2, 64 * 1024 * 1024));
    const workers: Promise<void>[] = [];
    const n = Math.max(1, Math.min(this.#requests, Math.ceil(size / this.#requestSize)));
    for (let i = 0; i < n; i++) workers.push(this.#worker(src, walker, Buffer.allocUnsafeSlow(this.#requestSize)));
    await Promise.all(workers);
    this.extentRequests = walker.requests;
    return size;
  }

  async #worker(src: RandomSource, walker: Walker, buf: Buffer): Promise<void> {
    const piece: Piece = { offset: 0, length: 0, zero: false };
    while (!this.#error) {
      try {
        if (!(await walker.next(piece))) return;
      } catch (e) {
        this.#fail('source', e);
        return;
      }
      if (this.#error) return;
      const { offset, length } = piece;
      if (piece.zero) {
        await this.#zeroRange(offset, length);
        continue;
      }
      const view = length === buf.length ? buf : buf.subarray(0, length);
      try {
        await src.read(view, offset);
      } catch (e) {
        this.#fail('source', e, `reading ${length} bytes at ${offset}`);
        return;
      }
      this.bytesRead += length;
      if (this.#error) return;
      await this.#deliver(view, offset);
    }
  }

  /** Data read at `offset`: written (or zeroed, if it is all zeroes), hashed in turn. */
  async #deliver(view: Buffer, offset: number): Promise<void> {
    const dst = this.#dst;
    const length = view.length;
    if (dst.kind === 'stream') {
      try {
        await this.#order!.wait(offset);
      } catch {
        return;
      }
      this.#hash?.update(view);
      try {
        await dst.write(view);
      } catch (e) {
        this.#fail('destination', e);
        return;
      }
      this.bytesWritten += length;
      this.#order!.done(offset + length);
      this.#progress(length);
      return;
    }
    const zero = this.#detect && view[0] === 0 && view[length - 1] === 0 && view.compare(this.#zeroes, 0, length) === 0;
    const writing = zero ? this.#zeroDst(dst, offset, length) : this.#writeDst(dst, view, offset);
    if (this.#order) {
      try {
        await this.#order.wait(offset);
      } catch {
        await writing;
        return;
      }
      this.#hash?.update(view);
      this.#order.done(offset + length);
    }
    if (await writing) this.#progress(length);
  }

  async #writeDst(dst: RandomDestination, view: Buffer, offset: number): Promise<boolean> {
    try {
      await dst.write(view, offset);
      this.bytesWritten += view.length;
      return true;
    } catch (e) {
      this.#fail('destination', e, `writing ${view.length} bytes at ${offset}`);
      return false;
    }
  }

  /** Makes a range of a random destination zero: skipped, zeroed or written. */
  async #zeroDst(dst: RandomDestination, offset: number, length: number): Promise<boolean> {
    if (this.#dstZeroed) {
      this.bytesSkipped += length;
      return true;
    }
    try {
      if (dst.zero) {
        await dst.zero(offset, length);
        this.bytesZeroed += length;
      } else {
        for (let off = offset; off < offset + length && !this.#error; off += this.#requestSize) {
          const n = Math.min(this.#requestSize, offset + length - off);
          await dst.write(n === this.#zeroes.length ? this.#zeroes : this.#zeroes.subarray(0, n), off);
          this.bytesWritten += n;
        }
      }
      return true;
    } catch (e) {
      this.#fail('destination', e, `zeroing ${length} bytes at ${offset}`);
      return false;
    }
  }

  /** A zero range of the source's map: never read. */
  async #zeroRange(offset: number, length: number): Promise<void> {
    const dst = this.#dst;
    if (dst.kind === 'stream') {
      try {
        await this.#order!.wait(offset);
      } catch {
        return;
      }
      for (let off = offset; off < offset + length; off += this.#requestSize) {
        const n = Math.min(this.#requestSize, offset + length - off);
        const z = n === this.#zeroes.length ? this.#zeroes : this.#zeroes.subarray(0, n);
        this.#hash?.update(z);
        try {
          await dst.write(z);
        } catch (e) {
          this.#fail('destination', e);
          return;
        }
        this.bytesWritten += n;
        this.#progress(n);
      }
      this.#order!.done(offset + length);
      return;
    }
    const zeroing = this.#zeroDst(dst, offset, length);
    if (this.#order) {
      try {
        await this.#order.wait(offset);
      } catch {
        await zeroing;
        return;
      }
      this.#hashZeroes(length);
      this.#order.done(offset + length);
    }
    if (await zeroing) this.#progress(length);
  }

  #hashZeroes(length: number): void {
    const h = this.#hash;
    if (!h) return;
    const z = this.#zeroes;
    let left = length;
    while (left >= z.length) {
      h.update(z);
      left -= z.length;
    }
    if (left > 0) h.update(z.subarray(0, left));
  }

  // -- A stream source: one reader in order, writes in flight ----------------------

  async #runStream(src: StreamSource): Promise<number> {
    const dst = this.#dst;
    const free: Buffer[] = [];
    let allocated = 0;
    let inFlight = 0;
    let wake: (() => void) | null = null;
    const settle = () => {
      inFlight--;
      const w = wake;
      wake = null;
      w?.();
    };
    let offset = 0;
    for (;;) {
      if (this.#error) break;
      while (free.length === 0 && allocated >= this.#requests) await new Promise<void>((r) => (wake = r));
      if (this.#error) break;
      let buf = free.pop();
      if (!buf) {
        buf = Buffer.allocUnsafeSlow(this.#requestSize);
        allocated++;
      }
      let n: number;
      try {
        n = await src.readInto(buf, buf.length);
      } catch (e) {
        this.#fail('source', e);
        break;
      }
      if (n === 0) break;
      const view = n === buf.length ? buf : buf.subarray(0, n);
      this.bytesRead += n;
      this.#hash?.update(view);
      if (dst.kind === 'stream') {
        try {
          await dst.write(view);
        } catch (e) {
          this.#fail('destination', e);
          break;
        }
        this.bytesWritten += n;
        this.#progress(n);
        free.push(buf);
      } else {
        if (dst.size !== null && offset + n > dst.size) {
          this.#fail('destination', new BlockError('ENOSPC', `${dst.size} bytes, smaller than the input (which goes on past that)`));
          break;
        }
        const zero = this.#detect && view[0] === 0 && view[n - 1] === 0 && view.compare(this.#zeroes, 0, n) === 0;
        inFlight++;
        const b = buf;
        const at = offset;
        void (zero ? this.#zeroDst(dst, at, n) : this.#writeDst(dst, view, at)).then((ok) => {
          if (ok) this.#progress(n);
          free.push(b);
          settle();
        });
      }
      offset += n;
      if (n < buf.length) break;
    }
    while (inFlight > 0) await new Promise<void>((r) => (wake = r));
    if (!this.#error && dst.kind === 'random' && dst.resize) {
      try {
        await dst.resize(offset);
      } catch (e) {
        this.#fail('destination', e);
      }
    }
    return offset;
  }
}
