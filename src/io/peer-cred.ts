/**
 * A unix socket peer's credentials (SO_PEERCRED), for rules that admit or refuse a client
 * by uid.
 *
 * Node has no API for them: net.Socket exposes neither getsockopt nor the peer's pid, uid
 * or gid. So this module calls libc's getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &ucred, &len)
 * itself through the koffi FFI package. koffi was chosen because its npm tarball ships
 * prebuilt binaries for every platform it supports, so nothing is compiled at install
 * (its install script only checks that the prebuilt binary loads; package.json denies it
 * in allowScripts, as it does esbuild's, and koffi loads without it).
 *
 * koffi is loaded lazily, with createRequire, the first time credentials are asked for, so
 * a server that never checks uids never loads it; the bound function, or the reason it
 * could not be had, is cached for the life of the process.
 *
 * The fd is the undocumented `socket._handle.fd` (a number >= 0 on Linux for TCP and pipe
 * handles). It is read once per call and never kept: call peerCredentials at accept time,
 * in the connection handler, while the socket is open. A closed socket's fd number may
 * already belong to another connection. The credentials themselves are the ones the kernel
 * recorded at connect(2), so they do not change while the connection lasts.
 *
 * On a TCP socket getsockopt(SO_PEERCRED) does not fail on Linux: it succeeds with pid 0 and
 * uid = gid = (uid_t)-1, the kernel's "no credentials" (test/io/peer-cred.test.ts pins it).
 * A -1 uid or gid is therefore read as "not a unix socket", never as an id.
 */
import type * as Koffi from 'koffi';
import { createRequire } from 'node:module';
import type { Socket } from 'node:net';

/** A unix socket peer's credentials, as the kernel recorded them at connect(2). */
export interface PeerCredentials {
  readonly pid: number;
  readonly uid: number;
  readonly gid: number;
}

const SOL_SOCKET = 1;
const SO_PEERCRED = 17;
/** sizeof(struct ucred) on Linux: { int32 pid; uint32 uid; uint32 gid }. */
const UCRED_SIZE = 12;
/** (uid_t)-1 and (gid_t)-1: what the kernel reports when the socket has no peer credentials. */
const NO_ID = 0xffff_ffff;

type GetSockOpt = (fd: number, level: number, optname: number, optval: Record<string, unknown>, optlen: number[]) => number;

/** The bound getsockopt once loaded, or the reason it cannot be; undefined before the first try. */
let loaded: { readonly getsockopt: GetSockOpt } | { readonly reason: string } | undefined;

function load(): { readonly getsockopt: GetSockOpt } | { readonly reason: string } {
  if (loaded !== undefined) return loaded;
  if (process.platform !== 'linux') {
    loaded = { reason: `peer credentials (SO_PEERCRED) are read only on Linux, not on ${process.platform}` };
    return loaded;
  }
  try {
    const koffi = createRequire(import.meta.url)('koffi') as typeof Koffi;
    // dlopen(NULL): the process's own global symbols, which include libc's, whatever
    // the libc's file is called (glibc's libc.so.6, musl's libc.musl-*.so.1).
    const libc = koffi.load(null);
    const ucred = koffi.struct({ pid: 'int32', uid: 'uint32', gid: 'uint32' });
    if (koffi.sizeof(ucred) !== UCRED_SIZE) throw new Error(`struct ucred is ${koffi.sizeof(ucred)} bytes, not ${UCRED_SIZE}`);
    const getsockopt = libc.func('getsockopt', 'int', [
      'int',
      'int',
      'int',
      koffi.out(koffi.pointer(ucred)),
      koffi.inout(koffi.pointer('uint32')),
    ]) as GetSockOpt;
    loaded = { getsockopt };
  } catch (err) {
    loaded = { reason: `cannot call getsockopt through koffi: ${err instanceof Error ? err.message : String(err)}` };
  }
  return loaded;
}

/** Why peerCredentials cannot work on this machine, or null if it can (for a clear startup error when uid rules are configured). */
export function peerCredentialsUnavailable(): string | null {
  const l = load();
  return 'reason' in l ? l.reason : null;
}

/** The credentials of the process at the other end of a connected unix socket, or null when they cannot be read (not Linux, koffi unavailable, not a unix socket, no fd). Never throws. */
export function peerCredentials(socket: Socket): PeerCredentials | null {
  try {
    if (socket.destroyed) return null;
    const fd = (socket as unknown as { _handle?: { fd?: unknown } | null })._handle?.fd;
    if (typeof fd !== 'number' || !Number.isInteger(fd) || fd < 0) return null;
    const l = load();
    if ('reason' in l) return null;
    const out: Record<string, unknown> = {};
    const len = [UCRED_SIZE];
    if (l.getsockopt(fd, SOL_SOCKET, SO_PEERCRED, out, len) !== 0) return null;
    if (len[0] !== UCRED_SIZE) return null;
    const { pid, uid, gid } = out;
    if (typeof pid !== 'number' || typeof uid !== 'number' || typeof gid !== 'number') return null;
    if (uid === NO_ID || gid === NO_ID) return null;
    return { pid, uid, gid };
  } catch {
    return null;
  }
}
