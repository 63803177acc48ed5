/**
 * Pieces every backend shares: settings validation (valibot schemas and one parse
 * function that names the offending key), the block-size defaults, the read-only
 * capability mask and the one-extent answer of backends without allocation data.
 */
import * as v from 'valibot';
import { BlockError } from '../errors/index.js';
import { parseSize } from '../device/size.js';
import type { BlockSize, Capabilities, Extent } from '../device/types.js';

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
 * A size setting: a number of bytes or a string such as "1G" (see parseSize). The
 * parse error becomes a valibot issue so that it is reported with the key's name.
 */
export const sizeSetting = v.pipe(
  v.union([v.number(), v.string()], (issue) => `expected a size (a number or a string like "1G"), got ${issue.received}`),
  v.rawTransform<number | string, number>(({ dataset, addIssue, NEVER }) => {
    try {
      return parseSize(dataset.value);
    } catch (e) {
      addIssue({ message: (e as Error).message });
      return NEVER;
    }
  }),
);

/** An optional boolean setting. */
export const booleanSetting = v.optional(v.boolean((issue) => `expected true or false, got ${issue.received}`));

/**
 * A layer's settings object: the given entries plus `type`, any other key rejected
 * (a typo in a config file should fail loudly, not be ignored).
 */
export function settingsSchema<const E extends v.ObjectEntries>(entries: E) {
  const all = { type: v.string(), ...entries };
  const known = Object.keys(all).join(', ');
  return v.strictObject(all, (issue) => {
    if (issue.expected === 'never') return `unknown setting (known: ${known})`;
    if (issue.expected === 'Object') return `expected a settings object, got ${issue.received}`;
    return 'required setting is missing';
  });
}

/**
 * Validates `desc` against `schema`; on failure throws BlockError EINVAL whose message
 * names the layer and the bad key, e.g. "memory: size: invalid size 'x' (...)".
 */
export function parseSettings<S extends v.GenericSchema>(layer: string, schema: S, desc: unknown): v.InferOutput<S> {
  const result = v.safeParse(schema, desc);
  if (result.success) return result.output;
  const issue = result.issues[0];
  const where = v.getDotPath(issue) ?? '(settings)';
  throw new BlockError('EINVAL', `${layer}: ${where}: ${issue.message}`);
}

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
