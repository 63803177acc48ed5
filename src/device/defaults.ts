/**
 * What the built-in devices share: the I/O size bounds and block sizes, the capability
 * sets of full and read-only devices, the errors of read-only and closed devices, and
 * the one-extent answer of devices without allocation data.
 */
import { BlockError } from '../errors/index.js';
import type { BlockSize, Capabilities, Extent } from './types.js';

/**
 * The largest read or write payload a backend accepts in one call: 32 MiB, the same as
 * qemu's NBD_MAX_BUFFER_SIZE, so every common NBD client stays under it.
 */
export const MAX_IO_SIZE = 32 * 2 ** 20;

/** The preferred I/O size advertised by the built-in backends: one 4 KiB page. */
export const PREFERRED_IO_SIZE = 4096;

/** Block sizes of the byte-addressable built-in backends (no alignment requirement). */
export const DEFAULT_BLOCK_SIZE: BlockSize = Object.freeze({
  minimum: 1,
  preferred: PREFERRED_IO_SIZE,
  maximum: MAX_IO_SIZE,
});

/**
 * The capabilities of a backend that does every operation itself and cheaply (memory,
 * null): writes, FUA, trim, fast zeroes, real extents, cache, and multi-conn because
 * every connection sees the one store.
 */
export const FULL_CAPABILITIES: Capabilities = Object.freeze({
  write: true,
  flush: true,
  fua: true,
  trim: true,
  zero: true,
  fastZero: true,
  extents: true,
  cache: true,
  multiConn: true,
});

/**
 * The capabilities of a read-only view of a device: nothing that changes data, and no
 * FUA (there are no writes to make durable). Reads, flush, extents and cache stay as
 * they are.
 */
export function readOnlyCapabilities(caps: Capabilities): Capabilities {
  return Object.freeze({ ...caps, write: false, trim: false, zero: false, fua: false, fastZero: false });
}

/** The error of a write, trim or zero on a read-only device. */
export function readOnlyError(op: string, what: string): BlockError {
  return new BlockError('EPERM', `${op}: ${what} is read-only`);
}

/** The error of any call on a closed device (like a closed file descriptor). */
export function closedError(op: string, what: string): BlockError {
  return new BlockError('EBADF', `${op}: ${what} is closed`);
}

/**
 * The extents answer of a device that has no allocation information (or is all one
 * kind): one extent with `flags` from `offset` to the end of the request, or to the
 * end of the device when `length` is 0. Empty only when `offset` is at the end.
 */
export function singleExtent(offset: number, length: number, size: number, flags: number): Extent[] {
  const end = length === 0 ? size : Math.min(size, offset + length);
  return end > offset ? [{ offset, length: end - offset, flags }] : [];
}
