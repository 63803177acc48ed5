/**
 * The rbd backend's device: one RBD image opened through librbd (./librbd.ts).
 *
 * Every read, write, discard, write-zeroes and flush is one librbd aio request. A request
 * is a completion created without a callback plus the aio call; the pending request (its
 * promise, and the Buffer librbd reads from or writes into) stays in a map keyed by the
 * completion's address until librbd reports it done on the image's eventfd and the event
 * loop collects it with rbd_poll_io_events. So no JavaScript runs on librbd's threads, and
 * a Buffer is referenced for as long as librbd may touch it.
 *
 * Zero-copy: Buffers are handed to librbd as pointers to their own memory (koffi passes a
 * Buffer to a `void *` parameter without copying). That is safe because a Node Buffer's
 * memory never moves (V8 backing stores are off-heap and fixed) and is kept alive by the
 * pending map until the completion; and with librbd's cache off (the default here)
 * librbd keeps no reference to a write's buffer after the completion fires. With the cache
 * on, librbd copies a write into its cache before completing it, so the same holds.
 *
 * Durability and multi-conn: with `rbd cache = false` (forced unless the `cache` setting
 * asks for it) librbd completes a write only once the OSDs have committed it, so every
 * acknowledged write, from any connection of any gateway, is already durable, and a read
 * from any connection or gateway reads the OSDs. That is the NBD multi-conn rule, so the
 * device advertises multiConn. With the cache on, a write is acknowledged from this
 * process's memory: other gateways do not see it and a FLUSH elsewhere does not cover it,
 * so multiConn is false (within one gateway every connection shares the one image, whose
 * flush covers all of them, but the capability speaks for every connection a client may
 * open, and a client cannot tell gateways apart).
 *
 * A failed flush is a write-back error: it is thrown with `writeback` set, and the export's
 * FLUSH rule (src/export/flush.ts) records it in the ErrSeq so every session of this
 * gateway hears of it once. With the cache off, a failed write has already failed to its
 * own client, so the flush error is about the cluster (blocklisted, unreachable), and the
 * other gateways' own flushes fail on their own clients the same way.
 */
import { BlockError, codeFromLinux, linuxErrno, type ErrnoCode } from '../../errors/index.js';
import { formatSize } from '../../device/size.js';
import { REQ, EXTENT, type BlockDevice, type Capabilities, type Extent } from '../../device/types.js';
import { DEFAULT_BLOCK_SIZE, FULL_CAPABILITIES, closedError, readOnlyCapabilities, readOnlyError } from '../../device/defaults.js';
import { Deque } from '../../io/deque.js';
import { EVENT_TYPE_EVENTFD, loadLibrbd, type Handle, type Librbd } from './librbd.js';

/**
 * Seconds an OSD request may wait before it fails with ETIMEDOUT (librados
 * `rados_osd_op_timeout`): 30 s. librados's default, 0, waits for ever, so a stopped
 * cluster would hang every request; with a bound, a request fails after at most this long
 * and the client gets EIO/ETIMEDOUT instead of a hang. Shorter than Linux's NBD default
 * request timeout (30 s of the kernel client is the same order), longer than an OSD
 * restart or a PG peering.
 */
export const RBD_OSD_OP_TIMEOUT_S = 30;

/**
 * Seconds connecting to the monitors may take (librados `client_mount_timeout` and
 * `rados_mon_op_timeout`): 30 s, instead of librados's 300 s, so a wrong `mon host` or an
 * unreachable cluster fails `serve` at start-up in reasonable time.
 */
export const RBD_CONNECT_TIMEOUT_S = 30;

/** Completions collected per rbd_poll_io_events call (the loop repeats until none are left). */
export const POLL_BATCH = 64;

/** Bytes of the image one extents() call asks librbd about at most: 1 GiB (the caller asks again for the rest). */
export const EXTENTS_QUERY_MAX = 2 ** 30;

/** How often the image size is re-read to notice a resize by another client: 1 s (and after every flush). */
export const SIZE_POLL_MS = 1000;

/**
 * Most koffi async calls (extents queries, size refreshes) one device runs at once: 4.
 * They run on koffi's few worker threads (as many as the machine has cores) and koffi
 * throws once 256 are running or queued in the process, so a burst of BLOCK_STATUS
 * requests, or calls stuck on a stopped OSD, wait here in order instead.
 */
export const ASYNC_CALLS_MAX = 4;

/** librbd's RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: keep the zeroed range allocated (NBD NO_HOLE). */
const WRITE_ZEROES_THICK = 1;

/** Bytes of a pointer (the completions rbd_poll_io_events writes). */
const POINTER_BYTES = 8;

/** Settings of an RBD device, after validation. */
export interface RbdOptions {
  readonly pool: string;
  readonly image: string;
  /** ceph.conf path; librados's default search (CEPH_CONF, /etc/ceph/ceph.conf, ...) when absent. */
  readonly conf?: string;
  /** cephx user without `client.` (e.g. `admin`). @default 'admin' */
  readonly id?: string;
  /** Keyring path (else the conf's). */
  readonly keyring?: string;
  /** Open read-only. */
  readonly readonly?: boolean;
  /** librbd's write-back cache (`rbd cache`). @default false (see the module comment) */
  readonly cache?: boolean;
  /** OSD request timeout in seconds. @default RBD_OSD_OP_TIMEOUT_S */
  readonly timeout?: number;
  /** Further librados/librbd options, `rados_conf_set` in this order after the others. */
  readonly options?: Readonly<Record<string, string>>;
}

interface Pending {
  readonly completion: Handle;
  readonly op: string;
  readonly offset: number;
  /** Kept referenced until librbd is done with it. */
  readonly buffer: Buffer | undefined;
  readonly resolve: (rc: number) => void;
  readonly reject: (e: BlockError) => void;
}

/** A librbd return code (negative errno) as a BlockError naming the operation. */
export function rbdError(lib: Librbd, rc: number, what: string, extra: { offset?: number; writeback?: boolean } = {}): BlockError {
  const errno = -rc;
  // librados reports a blocklisted client as ESHUTDOWN (its EBLOCKLISTED); to an NBD client
  // ESHUTDOWN means "the server is going away", which is not what happened: say EIO.
  const code: ErrnoCode = errno === linuxErrno('ESHUTDOWN') ? 'EIO' : (codeFromLinux(errno) ?? 'EIO');
  const why = errno === linuxErrno('ESHUTDOWN') ? 'this client is blocklisted by the cluster' : lib.strerror(errno);
  return new BlockError(code, `${what}: ${why} (errno ${errno})`, extra);
}

/** A connected librados client (one per device, so that each gateway is one cluster client). */
export class RadosClient {
  readonly lib: Librbd;
  readonly cluster: Handle;
  #shut = false;

  private constructor(lib: Librbd, cluster: Handle) {
    this.lib = lib;
    this.cluster = cluster;
  }

  /** Creates, configures and connects a client; throws a BlockError saying which step failed. */
  static async connect(o: Pick<RbdOptions, 'conf' | 'id' | 'keyring' | 'cache' | 'timeout' | 'options'>): Promise<RadosClient> {
    const lib = loadLibrbd();
    const out: [Handle] = [null];
    const id = o.id ?? 'admin';
    let rc = lib.radosCreate2(out, 'ceph', `client.${id}`, 0);
    if (rc < 0) throw rbdError(lib, rc, `rbd: rados_create2 (client.${id})`);
    const client = new RadosClient(lib, out[0]);
    try {
      rc = lib.radosConfReadFile(client.cluster, o.conf ?? null);
      if (rc < 0) throw rbdError(lib, rc, `rbd: conf: cannot read ${o.conf ?? 'the default ceph.conf'}`);
      const timeout = String(o.timeout ?? RBD_OSD_OP_TIMEOUT_S);
      const set: [string, string][] = [
        ['rados_osd_op_timeout', timeout],
        ['client_mount_timeout', String(RBD_CONNECT_TIMEOUT_S)],
        ['rados_mon_op_timeout', String(RBD_CONNECT_TIMEOUT_S)],
        ['rbd_cache', o.cache ? 'true' : 'false'],
        ...(o.keyring !== undefined ? [['keyring', o.keyring] as [string, string]] : []),
        ...Object.entries(o.options ?? {}),
      ];
      for (const [k, v] of set) {
        rc = lib.radosConfSet(client.cluster, k, v);
        if (rc < 0) throw rbdError(lib, rc, `rbd: options: cannot set ${k}=${v}`);
      }
      rc = await new Promise<number>((resolve, reject) => lib.radosConnectAsync(client.cluster, (e, r) => (e ? reject(e) : resolve(r))));
      if (rc < 0) throw rbdError(lib, rc, `rbd: cannot connect to the cluster as client.${id} (conf ${o.conf ?? 'default'}; bounded by ${RBD_CONNECT_TIMEOUT_S} s)`);
      return client;
    } catch (e) {
      await client.shutdown();
      throw e;
    }
  }

  /** The client's own address, as `ceph osd blocklist` and `rbd status` name it. */
  address(): string {
    const out: [string | null] = [null];
    const rc = this.lib.radosGetaddrs(this.cluster, out);
    if (rc < 0) throw rbdError(this.lib, rc, 'rbd: rados_getaddrs');
    return out[0] ?? '';
  }

  /** An I/O context on `pool` (throws ENOENT naming the pool when it does not exist). */
  ioctx(pool: string): Handle {
    const out: [Handle] = [null];
    const rc = this.lib.radosIoctxCreate(this.cluster, pool, out);
    if (rc < 0) throw rbdError(this.lib, rc, `rbd: pool '${pool}'`);
    return out[0];
  }

  /** Disconnects (off the event loop: it waits for librados's threads). */
  async shutdown(): Promise<void> {
    if (this.#shut) return;
    this.#shut = true;
    await new Promise<void>((resolve) => this.lib.radosShutdownAsync(this.cluster, () => resolve()));
  }
}

/** Creates an RBD image (format 2, the cluster's default features) of `size` bytes. */
export async function createImage(client: RadosClient, pool: string, image: string, size: number): Promise<void> {
  const io = client.ioctx(pool);
  try {
    const rc = await new Promise<number>((resolve, reject) =>
      client.lib.rbdCreateAsync(io, image, size, [0], (e, r) => (e ? reject(e) : resolve(r))),
    );
    if (rc < 0) throw rbdError(client.lib, rc, `rbd: cannot create ${pool}/${image}`);
  } finally {
    client.lib.radosIoctxDestroy(io);
  }
}

/** Everything but NBD_CMD_CACHE, which this backend does not offer (no prefetch into librbd is wired up). */
const CAPABILITIES: Capabilities = Object.freeze({ ...FULL_CAPABILITIES, cache: false });

/** An open RBD image. */
export class RbdDevice implements BlockDevice {
  readonly capabilities: Capabilities;
  readonly blockSize = DEFAULT_BLOCK_SIZE;
  readonly nonBlocking = false;
  /**
   * No extents query beside every large READ: rbd_diff_iterate2 costs an OSD round trip per
   * object and a worker-thread hop, which halved sequential reads in the bench (docs/CEPH.md)
   * and doubles the cluster's operations. Holes are still reported by BLOCK_STATUS, which
   * sparse-aware clients (nbdcopy, qemu-img) ask for themselves.
   */
  readonly extentsOnRead = false;
  readonly description: string;
  /** `POOL/IMAGE`. */
  readonly spec: string;

  #lib: Librbd;
  #client: RadosClient;
  #io: Handle;
  #image: Handle;
  #size: number;
  #readonly: boolean;
  #cache: boolean;
  #efd: number;
  #poll: { close(): void };
  #pending = new Map<bigint, Pending>();
  #comps = Buffer.alloc(POLL_BATCH * POINTER_BYTES);
  #sizeTimer: NodeJS.Timeout;
  #sizeQuery: Promise<void> | undefined;
  #closed = false;
  #onIdle: (() => void) | undefined;

  private constructor(client: RadosClient, io: Handle, image: Handle, size: number, o: RbdOptions) {
    this.#lib = client.lib;
    this.#client = client;
    this.#io = io;
    this.#image = image;
    this.#size = size;
    this.#readonly = o.readonly ?? false;
    this.#cache = o.cache ?? false;
    this.spec = `${o.pool}/${o.image}`;
    const caps = this.#cache ? { ...CAPABILITIES, multiConn: false } : CAPABILITIES;
    this.capabilities = this.#readonly ? readOnlyCapabilities(caps) : caps;
    this.description = `rbd ${this.spec} ${formatSize(size)}${this.#cache ? ' (rbd cache on)' : ''}${this.#readonly ? ' (read-only)' : ''}`;
    const lib = this.#lib;
    this.#efd = lib.eventfd();
    if (this.#efd < 0) throw new BlockError('EMFILE', 'rbd: eventfd() failed');
    const rc = lib.rbdSetImageNotification(image, this.#efd, EVENT_TYPE_EVENTFD);
    if (rc < 0) {
      lib.closeFd(this.#efd);
      throw rbdError(lib, rc, `rbd: ${this.spec}: rbd_set_image_notification`);
    }
    this.#poll = lib.koffi.node.poll(this.#efd, { readable: true }, () => this.#collect());
    this.#sizeTimer = setInterval(() => void this.#refreshSize(), SIZE_POLL_MS).unref();
  }

  /** Connects to the cluster and opens the image. */
  static async open(o: RbdOptions): Promise<RbdDevice> {
    const client = await RadosClient.connect(o);
    let io: Handle;
    try {
      io = client.ioctx(o.pool);
    } catch (e) {
      await client.shutdown();
      throw e;
    }
    const lib = client.lib;
    const out: [Handle] = [null];
    try {
      // Read-only: rbd_open_read_only, which never takes the exclusive lock and works with
      // a cephx user that may only read the pool.
      const openAsync = o.readonly ? lib.rbdOpenReadOnlyAsync : lib.rbdOpenAsync;
      const rc = await new Promise<number>((resolve, reject) => openAsync(io, o.image, out, null, (e, r) => (e ? reject(e) : resolve(r))));
      if (rc < 0) {
        const e = rbdError(lib, rc, `rbd: cannot open image ${o.pool}/${o.image}`);
        throw rc === -linuxErrno('ENOENT') ? new BlockError('ENOENT', `${e.message}; create it with \`blockgate rbd create ${o.pool}/${o.image} SIZE\``) : e;
      }
      const size: [bigint | number] = [0];
      const src = lib.rbdGetSize(out[0], size);
      if (src < 0) throw rbdError(lib, src, `rbd: ${o.pool}/${o.image}: size`);
      return new RbdDevice(client, io, out[0], Number(size[0]), o);
    } catch (e) {
      if (out[0] !== null) await new Promise((r) => lib.rbdCloseAsync(out[0], r));
      lib.radosIoctxDestroy(io);
      await client.shutdown();
      throw e;
    }
  }

  get size(): number {
    return this.#size;
  }

  /** This gateway's cluster address (what `rbd status` lists as a watcher). */
  clientAddress(): string {
    return this.#client.address();
  }

  read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    // librbd asserts (aborts the process) on a zero-length read: koffi passes an empty
    // Buffer as NULL, and Striper's assemble_result wants a buffer. Never send one.
    if (buf.length === 0) return this.#nothing('read');
    return this.#submit('read', offset, buf, (c) => this.#lib.rbdAioRead(this.#image, offset, buf.length, buf, c)).then((n) => {
      if (n !== buf.length) throw new BlockError('EIO', `read at offset ${offset}: librbd returned ${n} of ${buf.length} bytes (the image shrank?)`, { offset });
    });
  }

  write(data: Buffer, offset: number, flags: number): Promise<void> {
    if (this.#readonly) return Promise.reject(readOnlyError('write', this.description));
    if (data.length === 0) return this.#nothing('write');
    const w = this.#submit('write', offset, data, (c) => this.#lib.rbdAioWrite(this.#image, offset, data.length, data, c));
    return this.#fua(w, flags);
  }

  flush(_flags: number): Promise<void> {
    const f = this.#submit('flush', 0, undefined, (c) => this.#lib.rbdAioFlush(this.#image, c)).then(
      () => this.#refreshSize(),
      (e: BlockError) => {
        throw new BlockError(e.code, `flush of rbd ${this.spec} failed: ${e.message}`, { cause: e, writeback: true });
      },
    );
    return f;
  }

  trim(offset: number, length: number, flags: number): Promise<void> {
    if (this.#readonly) return Promise.reject(readOnlyError('trim', this.description));
    if (length === 0) return this.#nothing('trim');
    return this.#fua(this.#submit('trim', offset, undefined, (c) => this.#lib.rbdAioDiscard(this.#image, offset, length, c)), flags);
  }

  zero(offset: number, length: number, flags: number): Promise<void> {
    if (this.#readonly) return Promise.reject(readOnlyError('zero', this.description));
    if (length === 0) return this.#nothing('zero');
    const thick = (flags & REQ.NO_HOLE) !== 0;
    // Thick zeroing writes zero buffers: not faster than a write (NBD FAST_ZERO).
    if (thick && flags & REQ.FAST_ZERO) return Promise.reject(new BlockError('EOPNOTSUPP', 'zero: NO_HOLE zeroing writes zeroes on RBD; not fast'));
    const z = this.#submit('zero', offset, undefined, (c) =>
      this.#lib.rbdAioWriteZeroes(this.#image, offset, length, c, thick ? WRITE_ZEROES_THICK : 0, 0),
    );
    return this.#fua(z, flags);
  }

  /**
   * Allocation from rbd_diff_iterate2 against the image's creation (no snapshot, parents
   * included, exact extents rather than whole objects): what it reports is data, the rest
   * holes that read as zeroes, as `rbd diff` shows them.
   */
  async extents(offset: number, length: number, _flags: number): Promise<Extent[]> {
    if (this.#closed) throw closedError('extents', this.description);
    if (offset >= this.#size) return [];
    // Length 0 asks about the rest of the image (as the memory backend answers it).
    const want = length === 0 ? this.#size - offset : length;
    const end = Math.min(offset + Math.min(want, EXTENTS_QUERY_MAX), this.#size);
    const lib = this.#lib;
    const found: { off: number; len: number; exists: boolean }[] = [];
    const cb = lib.registerDiffCallback((off, len, exists) => {
      found.push({ off, len, exists: exists !== 0 });
      return 0;
    });
    let rc: number;
    try {
      rc = await this.#offLoop((done) => lib.rbdDiffIterate2Async(this.#image, null, offset, end - offset, 1, 0, cb, null, done));
    } finally {
      lib.koffi.unregister(cb as Parameters<typeof lib.koffi.unregister>[0]);
    }
    if (rc < 0) throw rbdError(lib, rc, `extents at offset ${offset}`, { offset });
    found.sort((a, b) => a.off - b.off);
    const out: Extent[] = [];
    const HOLE = EXTENT.HOLE | EXTENT.ZERO;
    const push = (off: number, len: number, flags: number): void => {
      if (len <= 0) return;
      const last = out[out.length - 1];
      if (last && last.flags === flags && last.offset + last.length === off) out[out.length - 1] = { offset: last.offset, length: last.length + len, flags };
      else out.push({ offset: off, length: len, flags });
    };
    let pos = offset;
    for (const f of found) {
      const s = Math.max(f.off, pos);
      const e = Math.min(f.off + f.len, end);
      if (e <= s) continue;
      push(pos, s - pos, HOLE);
      push(s, e - s, f.exists ? 0 : HOLE);
      pos = e;
    }
    push(pos, end - pos, HOLE);
    return out;
  }

  cache(_offset: number, _length: number, _flags: number): Promise<void> {
    return this.#closed ? Promise.reject(closedError('cache', this.description)) : Promise.resolve();
  }

  /** Waits for requests in flight, then closes the image and disconnects. Calling it again does nothing. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#sizeTimer);
    if (this.#pending.size > 0 || this.#busy > 0) await new Promise<void>((resolve) => (this.#onIdle = resolve));
    await this.#sizeQuery;
    this.#poll.close();
    const lib = this.#lib;
    const rc = await new Promise<number>((resolve) => lib.rbdCloseAsync(this.#image, (_e, r) => resolve(r)));
    lib.closeFd(this.#efd);
    lib.radosIoctxDestroy(this.#io);
    await this.#client.shutdown();
    if (rc < 0) throw rbdError(lib, rc, `rbd: closing ${this.spec}`);
  }

  /** A request of length 0: nothing to do, but a closed device still refuses it. */
  #nothing(op: string): Promise<void> {
    return this.#closed ? Promise.reject(closedError(op, this.description)) : Promise.resolve();
  }

  /** Requests other than aio ones (extents, size queries) running or waiting now; close() waits for them. */
  #busy = 0;
  /** koffi async calls of this device running now (at most ASYNC_CALLS_MAX). */
  #asyncRunning = 0;
  #asyncWaiting = new Deque<() => void>();

  /**
   * Runs one koffi async call (`start` gets the completion callback), at most
   * ASYNC_CALLS_MAX at a time; resolves with its return code. koffi throwing (its queue
   * full) rejects like any failure.
   */
  async #offLoop(start: (done: (err: unknown, rc: number) => void) => void): Promise<number> {
    this.#busy++;
    try {
      if (this.#asyncRunning >= ASYNC_CALLS_MAX) await new Promise<void>((resolve) => this.#asyncWaiting.pushBack(resolve));
      this.#asyncRunning++;
      try {
        return await new Promise<number>((resolve, reject) => start((e, r) => (e ? reject(e) : resolve(r))));
      } catch (e) {
        throw new BlockError('EIO', `rbd ${this.spec}: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
      } finally {
        this.#asyncRunning--;
        this.#asyncWaiting.popFront()?.();
      }
    } finally {
      this.#idleCheck(--this.#busy);
    }
  }

  #idleCheck(busy: number): void {
    if (busy === 0 && this.#pending.size === 0 && this.#onIdle) this.#onIdle();
  }

  /** With the cache on, FUA is a flush after the request; with it off every acknowledged write is already durable. */
  #fua(p: Promise<number>, flags: number): Promise<void> {
    if (!(flags & REQ.FUA) || !this.#cache) return p.then(() => undefined);
    return p.then(() => this.flush(0));
  }

  /** Starts one aio request; resolves with its return value (>= 0), rejects with its error. */
  #submit(op: string, offset: number, buffer: Buffer | undefined, start: (c: Handle) => number): Promise<number> {
    if (this.#closed) return Promise.reject(closedError(op, this.description));
    const lib = this.#lib;
    const out: [Handle] = [null];
    const rc = lib.rbdAioCreateCompletion(null, null, out);
    if (rc < 0) return Promise.reject(rbdError(lib, rc, `${op}: rbd_aio_create_completion`));
    const completion = out[0];
    return new Promise<number>((resolve, reject) => {
      const key = lib.koffi.address(completion);
      this.#pending.set(key, { completion, op, offset, buffer, resolve, reject });
      const r = start(completion);
      if (r < 0) {
        this.#pending.delete(key);
        lib.rbdAioRelease(completion);
        reject(rbdError(lib, r, `${op} at offset ${offset}`, { offset }));
      }
    });
  }

  /** The eventfd is readable: reset it, then collect every finished completion. */
  #collect(): void {
    const lib = this.#lib;
    lib.readEventfd(this.#efd);
    for (;;) {
      const n = lib.rbdPollIoEvents(this.#image, this.#comps, POLL_BATCH);
      if (n <= 0) break;
      for (let i = 0; i < n; i++) {
        const key = this.#comps.readBigUInt64LE(i * POINTER_BYTES);
        const p = this.#pending.get(key);
        if (!p) continue;
        this.#pending.delete(key);
        const rv = lib.rbdAioGetReturnValue(p.completion);
        lib.rbdAioRelease(p.completion);
        if (rv < 0) p.reject(rbdError(lib, rv, `${p.op} at offset ${p.offset}`, { offset: p.offset }));
        else p.resolve(rv);
      }
      if (n < POLL_BATCH) break;
    }
    this.#idleCheck(this.#busy);
  }

  /** Re-reads the size (off the event loop: a pending header refresh reads from the cluster). */
  #refreshSize(): Promise<void> {
    if (this.#closed && this.#sizeQuery === undefined) return Promise.resolve();
    this.#sizeQuery ??= (async () => {
      try {
        const out: [bigint | number] = [0];
        const rc = await this.#offLoop((done) => this.#lib.rbdGetSizeAsync(this.#image, out, done));
        if (rc >= 0) this.#size = Number(out[0]);
      } catch {
        // A failed size query keeps the last size; the next request reports the cluster's state.
      } finally {
        this.#sizeQuery = undefined;
      }
    })();
    return this.#sizeQuery;
  }
}
