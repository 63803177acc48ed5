import { BlockError } from '../errors/index.js';
import { MAX_DEVICE_SIZE, type BlockDevice } from './types.js';

/** The operations {@link validateRequest} knows. */
export type Operation = 'read' | 'write' | 'trim' | 'zero' | 'extents' | 'cache';

/**
 * The one place where a request's range is checked against a device, used by every
 * frontend at its protocol edge (and by library callers). Devices below may assume
 * valid ranges.
 *
 * - offset and length must be safe non-negative integers;
 * - offset + length past the end: ENOSPC for write and zero (NBD advice: the client
 *   tried to grow the device), EINVAL otherwise;
 * - write, trim and zero on a device without write capability: EPERM.
 *
 * Alignment to the device's minimum block size is checked by {@link checkAlignment},
 * because protocols differ in what they do about it.
 */
export function validateRequest(dev: BlockDevice, op: Operation, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new BlockError('EINVAL', `${op}: offset ${offset} or length ${length} is not a valid integer`);
  }
  if ((op === 'write' || op === 'trim' || op === 'zero') && !dev.capabilities.write) {
    throw new BlockError('EPERM', `${op}: the device is read-only`);
  }
  const size = dev.size;
  if (offset + length > size || offset + length > MAX_DEVICE_SIZE) {
    const code = op === 'write' || op === 'zero' ? 'ENOSPC' : 'EINVAL';
    throw new BlockError(code, `${op}: range ${offset}+${length} is past the end of the device (size ${size})`);
  }
}

/** Throws EINVAL if offset or length is not a multiple of the device's minimum block size. */
export function checkAlignment(dev: BlockDevice, op: Operation, offset: number, length: number): void {
  const min = dev.blockSize.minimum;
  if (min > 1 && (offset % min !== 0 || length % min !== 0)) {
    throw new BlockError('EINVAL', `${op}: offset ${offset} and length ${length} must be multiples of ${min}`);
  }
}
