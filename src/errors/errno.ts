/**
 * The one errno table of blockgate.
 *
 * Every protocol speaks a different dialect of errno: Node reports Linux values (or
 * libuv's negative codes with a string `code`), FreeBSD's ggate wire protocol carries
 * FreeBSD values, and NBD has its own short list of wire values. Each row names the
 * condition once and gives the number in every dialect, so no protocol module carries
 * its own numbers.
 *
 * Columns:
 * - `linux`: the Linux errno (what Node's `err.errno` is, negated, on Linux).
 * - `freebsd`: the FreeBSD errno (sys/sys/errno.h), used on the ggate wire.
 * - `nbd`: the NBD wire error (doc/proto.md "Error values"). Conditions NBD has no
 *   value for map to `NBD_EINVAL` or `NBD_EIO` through {@link toNbdError}.
 */
export const ERRNO = {
  EPERM: { linux: 1, freebsd: 1, message: 'Operation not permitted' },
  ENOENT: { linux: 2, freebsd: 2, message: 'No such file or directory' },
  EINTR: { linux: 4, freebsd: 4, message: 'Interrupted system call' },
  EIO: { linux: 5, freebsd: 5, message: 'Input/output error' },
  ENXIO: { linux: 6, freebsd: 6, message: 'Device not configured' },
  EBADF: { linux: 9, freebsd: 9, message: 'Bad file descriptor' },
  EAGAIN: { linux: 11, freebsd: 35, message: 'Resource temporarily unavailable' },
  ENOMEM: { linux: 12, freebsd: 12, message: 'Cannot allocate memory' },
  EACCES: { linux: 13, freebsd: 13, message: 'Permission denied' },
  EFAULT: { linux: 14, freebsd: 14, message: 'Bad address' },
  EBUSY: { linux: 16, freebsd: 16, message: 'Device busy' },
  EEXIST: { linux: 17, freebsd: 17, message: 'File exists' },
  ENODEV: { linux: 19, freebsd: 19, message: 'Operation not supported by device' },
  EISDIR: { linux: 21, freebsd: 21, message: 'Is a directory' },
  EINVAL: { linux: 22, freebsd: 22, message: 'Invalid argument' },
  ENFILE: { linux: 23, freebsd: 23, message: 'Too many open files in system' },
  EMFILE: { linux: 24, freebsd: 24, message: 'Too many open files' },
  EFBIG: { linux: 27, freebsd: 27, message: 'File too large' },
  ENOSPC: { linux: 28, freebsd: 28, message: 'No space left on device' },
  ESPIPE: { linux: 29, freebsd: 29, message: 'Illegal seek' },
  EROFS: { linux: 30, freebsd: 30, message: 'Read-only file system' },
  EPIPE: { linux: 32, freebsd: 32, message: 'Broken pipe' },
  ERANGE: { linux: 34, freebsd: 34, message: 'Result too large' },
  ENAMETOOLONG: { linux: 36, freebsd: 63, message: 'File name too long' },
  ENOSYS: { linux: 38, freebsd: 78, message: 'Function not implemented' },
  EPROTO: { linux: 71, freebsd: 92, message: 'Protocol error' },
  EOVERFLOW: { linux: 75, freebsd: 84, message: 'Value too large to be stored in data type' },
  EOPNOTSUPP: { linux: 95, freebsd: 45, message: 'Operation not supported' },
  ECONNRESET: { linux: 104, freebsd: 54, message: 'Connection reset by peer' },
  ENOTCONN: { linux: 107, freebsd: 57, message: 'Socket is not connected' },
  ESHUTDOWN: { linux: 108, freebsd: 58, message: "Can't send after socket shutdown" },
  ETIMEDOUT: { linux: 110, freebsd: 60, message: 'Operation timed out' },
  ECONNREFUSED: { linux: 111, freebsd: 61, message: 'Connection refused' },
  EDQUOT: { linux: 122, freebsd: 69, message: 'Disc quota exceeded' },
  ECANCELED: { linux: 125, freebsd: 85, message: 'Operation canceled' },
} as const satisfies Record<string, { linux: number; freebsd: number; message: string }>;

/** A symbolic errno name known to blockgate, e.g. `'EIO'`. */
export type ErrnoCode = keyof typeof ERRNO;

/** ENOTSUP is the same number as EOPNOTSUPP on Linux and FreeBSD; one name is kept. */
export const ENOTSUP: ErrnoCode = 'EOPNOTSUPP';

/**
 * NBD wire error values (doc/proto.md, "Error values"). A server SHOULD use only these;
 * clients treat any other value as EINVAL.
 */
export const NBD_ERROR = {
  NBD_SUCCESS: 0,
  NBD_EPERM: 1,
  NBD_EIO: 5,
  NBD_ENOMEM: 12,
  NBD_EINVAL: 22,
  NBD_ENOSPC: 28,
  NBD_EOVERFLOW: 75,
  NBD_ENOTSUP: 95,
  NBD_ESHUTDOWN: 108,
} as const;

export type NbdErrorValue = (typeof NBD_ERROR)[keyof typeof NBD_ERROR];

const byLinux = new Map<number, ErrnoCode>();
const byFreebsd = new Map<number, ErrnoCode>();
for (const [code, row] of Object.entries(ERRNO) as [ErrnoCode, (typeof ERRNO)[ErrnoCode]][]) {
  byLinux.set(row.linux, code);
  byFreebsd.set(row.freebsd, code);
}

/** True if `name` is a code of the table. */
export function isErrnoCode(name: unknown): name is ErrnoCode {
  return typeof name === 'string' && Object.hasOwn(ERRNO, name);
}

/** The Linux errno of a code. */
export function linuxErrno(code: ErrnoCode): number {
  return ERRNO[code].linux;
}

/** The FreeBSD errno of a code (ggate wire). */
export function freebsdErrno(code: ErrnoCode): number {
  return ERRNO[code].freebsd;
}

/** The code of a Linux errno, or undefined if the table has no row for it. */
export function codeFromLinux(errno: number): ErrnoCode | undefined {
  return byLinux.get(errno);
}

/** The code of a FreeBSD errno, or undefined if the table has no row for it. */
export function codeFromFreebsd(errno: number): ErrnoCode | undefined {
  return byFreebsd.get(errno);
}

/**
 * The NBD wire value for a code, following doc/proto.md's advice: EDQUOT and EFBIG are
 * reported as ENOSPC, EROFS and EACCES as EPERM, ESHUTDOWN as itself; anything else
 * without an NBD value becomes EIO (a device-level failure) except argument errors,
 * which become EINVAL.
 */
export function toNbdError(code: ErrnoCode): NbdErrorValue {
  switch (code) {
    case 'EPERM':
    case 'EROFS':
    case 'EACCES':
      return NBD_ERROR.NBD_EPERM;
    case 'EIO':
      return NBD_ERROR.NBD_EIO;
    case 'ENOMEM':
      return NBD_ERROR.NBD_ENOMEM;
    case 'EINVAL':
    case 'ERANGE':
    case 'ESPIPE':
    case 'ENAMETOOLONG':
      return NBD_ERROR.NBD_EINVAL;
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return NBD_ERROR.NBD_ENOSPC;
    case 'EOVERFLOW':
      return NBD_ERROR.NBD_EOVERFLOW;
    case 'EOPNOTSUPP':
    case 'ENOSYS':
      return NBD_ERROR.NBD_ENOTSUP;
    case 'ESHUTDOWN':
      return NBD_ERROR.NBD_ESHUTDOWN;
    default:
      return NBD_ERROR.NBD_EIO;
  }
}

/** The code an NBD client should assume for a wire value; unknown values are EINVAL (spec). */
export function fromNbdError(value: number): ErrnoCode {
  switch (value) {
    case NBD_ERROR.NBD_EPERM:
      return 'EPERM';
    case NBD_ERROR.NBD_EIO:
      return 'EIO';
    case NBD_ERROR.NBD_ENOMEM:
      return 'ENOMEM';
    case NBD_ERROR.NBD_ENOSPC:
      return 'ENOSPC';
    case NBD_ERROR.NBD_EOVERFLOW:
      return 'EOVERFLOW';
    case NBD_ERROR.NBD_ENOTSUP:
      return 'EOPNOTSUPP';
    case NBD_ERROR.NBD_ESHUTDOWN:
      return 'ESHUTDOWN';
    default:
      return 'EINVAL';
  }
}
