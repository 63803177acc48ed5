/**
 * Readiness notification to a service manager (sd_notify(3)): one datagram such as
 * "READY=1\nMAINPID=1234\n" sent to the AF_UNIX SOCK_DGRAM socket NOTIFY_SOCKET names
 * (a path, or '@name' for the abstract namespace).
 *
 * Node has no unix datagram sockets (node:dgram is UDP only), so the datagram is sent
 * with libc's socket(2)/sendto(2)/close(2) through koffi, loaded lazily as
 * src/io/peer-cred.ts does; a service without NOTIFY_SOCKET never loads it. The calls
 * are non-blocking in effect: a datagram to a local socket either queues at once or
 * fails (EAGAIN when the manager's queue is full, which sd_notify also reports).
 */
import type * as Koffi from 'koffi';
import { createRequire } from 'node:module';
import { BlockError } from '../errors/index.js';

const AF_UNIX = 1;
const SOCK_DGRAM = 2;
/** SOCK_CLOEXEC on Linux: the socket must not leak into a --run command. */
const SOCK_CLOEXEC = 0o2000000;
/** MSG_NOSIGNAL: a vanished peer is an error return, never SIGPIPE. */
const MSG_NOSIGNAL = 0x4000;
/** sizeof(sockaddr_un.sun_path) on Linux. */
const SUN_PATH_MAX = 108;

interface Libc {
  socket(domain: number, type: number, protocol: number): number;
  sendto(fd: number, buf: Buffer, len: number, flags: number, addr: Buffer, addrlen: number): number;
  close(fd: number): number;
}

let libc: Libc | undefined;

function load(): Libc {
  if (libc) return libc;
  if (process.platform !== 'linux') throw new BlockError('EOPNOTSUPP', `NOTIFY_SOCKET is supported on Linux only, not on ${process.platform}`);
  const koffi = createRequire(import.meta.url)('koffi') as typeof Koffi;
  const lib = koffi.load(null);
  libc = {
    socket: lib.func('socket', 'int', ['int', 'int', 'int']) as Libc['socket'],
    sendto: lib.func('sendto', 'long', ['int', 'void *', 'size_t', 'int', 'void *', 'uint32']) as Libc['sendto'],
    close: lib.func('close', 'int', ['int']) as Libc['close'],
  };
  return libc;
}

/** struct sockaddr_un for `where` and its length, as sendto wants them. */
export function unixAddress(where: string): { addr: Buffer; len: number } {
  const abstract = where.startsWith('@');
  const name = Buffer.from(abstract ? where.slice(1) : where);
  // A path needs its terminating NUL inside sun_path; an abstract name is exactly its bytes after a leading NUL.
  const pathBytes = abstract ? 1 + name.length : name.length + 1;
  if (name.length === 0 || pathBytes > SUN_PATH_MAX) throw new BlockError('EINVAL', `NOTIFY_SOCKET=${where}: not a usable unix socket address`);
  if (!abstract && !where.startsWith('/')) throw new BlockError('EINVAL', `NOTIFY_SOCKET=${where}: expected an absolute path or @name`);
  const addr = Buffer.alloc(2 + SUN_PATH_MAX);
  addr.writeUInt16LE(AF_UNIX, 0);
  name.copy(addr, abstract ? 3 : 2);
  return { addr, len: 2 + pathBytes };
}

/** Sends `state` (e.g. "READY=1\nMAINPID=123") to the socket NOTIFY_SOCKET names. Throws BlockError on failure. */
export function sdNotify(notifySocket: string, state: string): void {
  const { addr, len } = unixAddress(notifySocket);
  const c = load();
  const fd = c.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw new BlockError('EIO', 'NOTIFY_SOCKET: socket(AF_UNIX, SOCK_DGRAM) failed');
  try {
    const msg = Buffer.from(state);
    if (c.sendto(fd, msg, msg.length, MSG_NOSIGNAL, addr, len) !== msg.length) {
      throw new BlockError('EIO', `NOTIFY_SOCKET=${notifySocket}: the notification could not be sent`);
    }
  } finally {
    c.close(fd);
  }
}
