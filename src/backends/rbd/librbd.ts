/**
 * The C APIs of librados and librbd, bound through the koffi FFI package.
 *
 * Why koffi rather than an N-API addon: koffi ships prebuilt binaries in its npm package,
 * so nothing is compiled at install or in CI (an addon would need node-gyp, a compiler
 * and librbd-dev wherever blockgate is installed), and the project already uses it
 * (src/io/peer-cred.ts). Its cost per call was measured against the I/O it drives
 * (docs/CEPH.md, "librbd access"): a few hundred nanoseconds for each of the four calls
 * of one request, against the tens to hundreds of microseconds a round trip to an OSD
 * takes, so an addon would not change what a client sees.
 *
 * koffi and the two libraries are loaded on the first call of {@link loadLibrbd}, which
 * only opening an rbd export (or `blockgate rbd`) makes: a server of memory or file
 * exports never loads them (start-up time, and machines without librbd).
 *
 * No JavaScript runs on librbd's threads. Completions are created without a callback;
 * librbd signals them on an eventfd registered with rbd_set_image_notification, which
 * the event loop watches (koffi's uv_poll wrapper), and the loop collects them with
 * rbd_poll_io_events. rbd_diff_iterate2, the one call that takes a callback, runs through
 * koffi's async form on a worker thread, and koffi delivers each callback on the main
 * thread while the worker waits.
 */
import type * as Koffi from 'koffi';
import { createRequire } from 'node:module';
import { BlockError } from '../../errors/index.js';

/** The Debian package that provides librbd.so.1 and librados.so.2 (named in the error when they are missing). */
export const LIBRBD_PACKAGE = 'librbd1' as const;

/** rbd_set_image_notification's event type for an eventfd (librbd.h rbd_image_event_type). */
export const EVENT_TYPE_EVENTFD = 2;
/** eventfd(2) flags: EFD_CLOEXEC | EFD_NONBLOCK (Linux values). */
const EFD_FLAGS = 0o2000000 | 0o4000;
/** Bytes of one eventfd read (its 64-bit counter). */
const EVENTFD_COUNTER_BYTES = 8;

/** Opaque handles (rados_t, rados_ioctx_t, rbd_image_t, rbd_completion_t) as koffi gives them. */
export type Handle = unknown;

/** One diff_iterate2 callback: (offset, length, exists). */
export type DiffCallback = (offset: number, length: number, exists: number) => number;

/** The functions blockgate calls, with koffi's marshalling; `*Out` arguments are one-element arrays filled in. */
export interface Librbd {
  readonly koffi: typeof Koffi;
  radosCreate2(out: [Handle], cluster: string, name: string, flags: number): number;
  radosConfReadFile(cluster: Handle, path: string | null): number;
  radosConfSet(cluster: Handle, option: string, value: string): number;
  radosConnect(cluster: Handle): number;
  radosConnectAsync(cluster: Handle, cb: (err: unknown, rc: number) => void): void;
  radosShutdown(cluster: Handle): void;
  radosShutdownAsync(cluster: Handle, cb: (err: unknown) => void): void;
  radosIoctxCreate(cluster: Handle, pool: string, out: [Handle]): number;
  radosIoctxDestroy(io: Handle): void;
  radosGetaddrs(cluster: Handle, out: [string | null]): number;
  rbdOpenAsync(io: Handle, name: string, out: [Handle], snap: string | null, cb: (err: unknown, rc: number) => void): void;
  rbdOpenReadOnlyAsync(io: Handle, name: string, out: [Handle], snap: string | null, cb: (err: unknown, rc: number) => void): void;
  rbdCloseAsync(image: Handle, cb: (err: unknown, rc: number) => void): void;
  rbdCreateAsync(io: Handle, name: string, size: number, order: [number], cb: (err: unknown, rc: number) => void): void;
  rbdGetSize(image: Handle, out: [bigint | number]): number;
  rbdGetSizeAsync(image: Handle, out: [bigint | number], cb: (err: unknown, rc: number) => void): void;
  rbdResizeAsync(image: Handle, size: number, cb: (err: unknown, rc: number) => void): void;
  rbdSetImageNotification(image: Handle, fd: number, type: number): number;
  rbdPollIoEvents(image: Handle, comps: Buffer, max: number): number;
  rbdAioCreateCompletion(arg: null, cb: null, out: [Handle]): number;
  rbdAioRead(image: Handle, off: number, len: number, buf: Buffer, c: Handle): number;
  rbdAioWrite(image: Handle, off: number, len: number, buf: Buffer, c: Handle): number;
  rbdAioDiscard(image: Handle, off: number, len: number, c: Handle): number;
  rbdAioWriteZeroes(image: Handle, off: number, len: number, c: Handle, zeroFlags: number, opFlags: number): number;
  rbdAioFlush(image: Handle, c: Handle): number;
  rbdAioGetReturnValue(c: Handle): number;
  rbdAioRelease(c: Handle): void;
  rbdDiffIterate2Async(
    image: Handle, from: string | null, off: number, len: number, includeParent: number, wholeObject: number,
    cb: unknown, arg: null, done: (err: unknown, rc: number) => void,
  ): void;
  /** A koffi-registered diff callback (unregister it with koffi.unregister when done). */
  registerDiffCallback(fn: DiffCallback): unknown;
  eventfd(): number;
  /** Reads (and so resets) an eventfd's counter; -1 when it was already zero (EAGAIN). */
  readEventfd(fd: number): number;
  closeFd(fd: number): number;
  strerror(errno: number): string;
}

/** The shared objects loaded (the sonames of Ceph's C APIs, stable since Ceph 0.x). */
export const LIBRARY_FILES = Object.freeze({ rados: 'librados.so.2', rbd: 'librbd.so.1' } as const);

let loaded: Librbd | { readonly reason: string } | undefined;

/**
 * The bound libraries, loaded once per process; throws a BlockError naming the package when
 * they cannot be loaded. Other `files` (tests) are loaded afresh, never cached.
 */
export function loadLibrbd(files: { readonly rados: string; readonly rbd: string } = LIBRARY_FILES): Librbd {
  if (files !== LIBRARY_FILES) {
    try {
      return bind(files);
    } catch (e) {
      return refuse(e instanceof Error ? e.message : String(e));
    }
  }
  if (loaded === undefined) {
    try {
      loaded = bind(files);
    } catch (e) {
      loaded = { reason: e instanceof Error ? e.message : String(e) };
    }
  }
  if ('reason' in loaded) return refuse(loaded.reason);
  return loaded;
}

function refuse(reason: string): never {
  throw new BlockError(
    'ENOSYS',
    `rbd: cannot load librbd.so.1 / librados.so.2 (install the Debian package ${LIBRBD_PACKAGE}, or your distribution's librbd): ${reason}`,
  );
}

function bind(files: { readonly rados: string; readonly rbd: string }): Librbd {
  const koffi = createRequire(import.meta.url)('koffi') as typeof Koffi;
  // koffi's message does not say which file it could not open.
  const open = (file: string): Koffi.IKoffiLib => {
    try {
      return koffi.load(file);
    } catch (e) {
      throw new Error(`${file}: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
    }
  };
  const rados = open(files.rados);
  const rbd = open(files.rbd);
  const libc = koffi.load(null);
  // Every handle is a `void *` to koffi: an opaque External that is passed back as is.
  const outPtr = koffi.out(koffi.pointer('void *'));
  const diffCb = koffi.proto('int blockgate_rbd_diff_cb(uint64_t off, size_t len, int exists, void *arg)');
  const f = <T>(lib: Koffi.IKoffiLib, name: string, ret: string, args: readonly unknown[]): T =>
    lib.func(name, ret, args as Koffi.TypeSpec[]) as unknown as T;
  type Fn = Koffi.KoffiFunction;
  const radosConnect = f<Fn>(rados, 'rados_connect', 'int', ['void *']);
  const radosShutdown = f<Fn>(rados, 'rados_shutdown', 'void', ['void *']);
  const rbdOpen = f<Fn>(rbd, 'rbd_open', 'int', ['void *', 'str', outPtr, 'str']);
  const rbdOpenReadOnly = f<Fn>(rbd, 'rbd_open_read_only', 'int', ['void *', 'str', outPtr, 'str']);
  const rbdClose = f<Fn>(rbd, 'rbd_close', 'int', ['void *']);
  const rbdCreate = f<Fn>(rbd, 'rbd_create', 'int', ['void *', 'str', 'uint64_t', koffi.inout(koffi.pointer('int'))]);
  const getSize = f<Fn>(rbd, 'rbd_get_size', 'int', ['void *', koffi.out(koffi.pointer('uint64_t'))]);
  const eventfd = f<(init: number, flags: number) => number>(libc, 'eventfd', 'int', ['uint', 'int']);
  const rbdResize = f<Fn>(rbd, 'rbd_resize', 'int', ['void *', 'uint64_t']);
  const diffIterate = f<Fn>(rbd, 'rbd_diff_iterate2', 'int', [
    'void *', 'str', 'uint64_t', 'uint64_t', 'uint8_t', 'uint8_t', koffi.pointer(diffCb), 'void *',
  ]);
  const read = f<(fd: number, buf: Buffer, n: number) => number>(libc, 'read', 'long', ['int', 'void *', 'size_t']);
  const counter = Buffer.alloc(EVENTFD_COUNTER_BYTES);
  const strerror = f<(e: number) => string>(libc, 'strerror', 'str', ['int']);
  return {
    koffi,
    radosCreate2: f(rados, 'rados_create2', 'int', [outPtr, 'str', 'str', 'uint64_t']),
    radosConfReadFile: f(rados, 'rados_conf_read_file', 'int', ['void *', 'str']),
    radosConfSet: f(rados, 'rados_conf_set', 'int', ['void *', 'str', 'str']),
    radosConnect,
    radosConnectAsync: (c, cb) => radosConnect.async(c, cb),
    radosShutdown,
    radosShutdownAsync: (c, cb) => radosShutdown.async(c, cb),
    radosIoctxCreate: f(rados, 'rados_ioctx_create', 'int', ['void *', 'str', outPtr]),
    radosIoctxDestroy: f(rados, 'rados_ioctx_destroy', 'void', ['void *']),
    // The string librados allocates here is owned by the cluster handle (freed at shutdown).
    radosGetaddrs: f(rados, 'rados_getaddrs', 'int', ['void *', koffi.out(koffi.pointer('str'))]),
    rbdOpenAsync: (io, name, out, snap, cb) => rbdOpen.async(io, name, out, snap, cb),
    rbdOpenReadOnlyAsync: (io, name, out, snap, cb) => rbdOpenReadOnly.async(io, name, out, snap, cb),
    rbdCloseAsync: (image, cb) => rbdClose.async(image, cb),
    rbdCreateAsync: (io, name, size, order, cb) => rbdCreate.async(io, name, size, order, cb),
    rbdGetSize: getSize,
    rbdGetSizeAsync: (image, out, cb) => getSize.async(image, out, cb),
    rbdResizeAsync: (image, size, cb) => rbdResize.async(image, size, cb),
    rbdSetImageNotification: f(rbd, 'rbd_set_image_notification', 'int', ['void *', 'int', 'int']),
    rbdPollIoEvents: f(rbd, 'rbd_poll_io_events', 'int', ['void *', 'void *', 'int']),
    rbdAioCreateCompletion: f(rbd, 'rbd_aio_create_completion', 'int', ['void *', 'void *', outPtr]),
    // Buffers go to `void *` parameters as pointers to their own memory: no copy either
    // way (see RbdDevice for why that is safe with asynchronous completion).
    rbdAioRead: f(rbd, 'rbd_aio_read', 'int', ['void *', 'uint64_t', 'size_t', 'void *', 'void *']),
    rbdAioWrite: f(rbd, 'rbd_aio_write', 'int', ['void *', 'uint64_t', 'size_t', 'void *', 'void *']),
    rbdAioDiscard: f(rbd, 'rbd_aio_discard', 'int', ['void *', 'uint64_t', 'uint64_t', 'void *']),
    rbdAioWriteZeroes: f(rbd, 'rbd_aio_write_zeroes', 'int', ['void *', 'uint64_t', 'size_t', 'void *', 'int', 'int']),
    rbdAioFlush: f(rbd, 'rbd_aio_flush', 'int', ['void *', 'void *']),
    rbdAioGetReturnValue: f(rbd, 'rbd_aio_get_return_value', 'long', ['void *']),
    rbdAioRelease: f(rbd, 'rbd_aio_release', 'void', ['void *']),
    rbdDiffIterate2Async: (image, from, off, len, ip, wo, cb, arg, done) => diffIterate.async(image, from, off, len, ip, wo, cb, arg, done),
    registerDiffCallback: (fn) => koffi.register((off: number | bigint, len: number | bigint, exists: number) => fn(Number(off), Number(len), exists), koffi.pointer(diffCb)),
    eventfd: () => eventfd(0, EFD_FLAGS),
    readEventfd: (fd) => read(fd, counter, EVENTFD_COUNTER_BYTES),
    closeFd: f(libc, 'close', 'int', ['int']),
    strerror,
  };
}
