import { ERRNO, type ErrnoCode, isErrnoCode, linuxErrno } from './errno.js';

/**
 * The brand every BlockError carries, in the global symbol registry: two copies of this
 * module (a plugin bundling its own blockgate, say) make two classes, so `instanceof`
 * fails across them, but `Symbol.for` gives both the same symbol.
 */
const BRAND: unique symbol = Symbol.for('blockgate.BlockError') as never;

/**
 * The one error class of the device stack. It carries a symbolic errno `code` (stable,
 * what tests and protocols look at), the Linux `errno` number, and a human message that
 * may be sent to a client (NBD structured ERROR chunks carry it). The original error,
 * if any, is kept as `cause`.
 *
 * Backends and filters throw it (or let Node's own errors through, which
 * {@link toBlockError} converts); protocol frontends turn it into a wire error reply.
 */
export class BlockError extends Error {
  override readonly name = 'BlockError';
  /** Symbolic errno, e.g. `'EIO'`. */
  readonly code: ErrnoCode;
  /** The Linux errno number of `code`. */
  readonly errno: number;
  /** For ERROR_OFFSET replies: the first offset that failed, when known. */
  readonly offset: number | undefined;
  /**
   * True if the failure is about durability of data already written, not only about this
   * request: an fdatasync that failed (the kernel reports that once per file, so whoever
   * receives it must pass it on). Frontends record such failures in the export's ErrSeq
   * so every session hears of them, even when one request got it as its own reply.
   */
  readonly writeback: boolean;
  /** True for a failure made on purpose (the error filter): logged where people look, at info. */
  readonly injected: boolean;
  /** See {@link isBlockError}. */
  readonly [BRAND] = true;

  constructor(code: ErrnoCode, message?: string, options?: { cause?: unknown; offset?: number; writeback?: boolean; injected?: boolean }) {
    super(message ?? ERRNO[code].message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.errno = linuxErrno(code);
    this.offset = options?.offset;
    this.writeback = options?.writeback ?? false;
    this.injected = options?.injected ?? false;
  }
}

/** True for a BlockError, also one made by another copy of this module (by its brand). */
export function isBlockError(e: unknown): e is BlockError {
  return typeof e === 'object' && e !== null && (e as { [BRAND]?: unknown })[BRAND] === true;
}

/**
 * Converts anything thrown below the protocol edge into a BlockError: BlockErrors pass
 * through, Node system errors keep their errno code when the table knows it, everything
 * else (a bug, a plain Error) becomes EIO with the original as cause, so that no failure
 * is swallowed or turned into a disconnect.
 */
export function toBlockError(e: unknown): BlockError {
  if (isBlockError(e)) return e;
  if (e instanceof Error) {
    const code = (e as NodeJS.ErrnoException).code;
    if (isErrnoCode(code)) return new BlockError(code, e.message, { cause: e });
    return new BlockError('EIO', e.message, { cause: e });
  }
  return new BlockError('EIO', String(e), { cause: e });
}
