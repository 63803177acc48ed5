/**
 * The u64 helpers of every wire protocol (NBD, ggate, the gate control socket). Offsets
 * and lengths are numbers under a safe-integer discipline (at most 2^53 - 1); a peer's
 * u64 that may be larger is read exactly as a bigint, or kept as its two u32 halves so it
 * can be echoed bit for bit without allocating.
 */

/** 2^32: the weight of a u64's high u32 half. */
export const U32_RANGE = 0x1_0000_0000;

/** The largest high half whose u64 is still a safe integer: hi < 2^21 keeps hi * 2^32 + lo <= 2^53 - 1. */
const SAFE_HIGH_LIMIT = 0x20_0000;

const U64_MAX = (1n << 64n) - 1n;

/** Reads a u64 as a number; above 2^53 - 1 the result is not a safe integer (callers check). */
export function readU64(buf: Buffer, off: number): number {
  return buf.readUInt32BE(off) * U32_RANGE + buf.readUInt32BE(off + 4);
}

/** Reads a u64 exactly: a number when it is a safe integer, else the bigint. */
export function readU64Exact(buf: Buffer, off: number): number | bigint {
  const hi = buf.readUInt32BE(off);
  const lo = buf.readUInt32BE(off + 4);
  if (hi < SAFE_HIGH_LIMIT) return hi * U32_RANGE + lo;
  return (BigInt(hi) << 32n) | BigInt(lo);
}

/** Writes a non-negative safe integer as a u64. Hot path: the caller chose the value and it is not checked. */
export function writeU64(buf: Buffer, value: number, off: number): void {
  buf.writeUInt32BE(Math.floor(value / U32_RANGE), off);
  buf.writeUInt32BE(value >>> 0, off + 4);
}

/** Writes a u64 from a non-negative safe integer or a bigint in [0, 2^64 - 1]; RangeError otherwise (a caller's bug). */
export function writeU64Exact(buf: Buffer, value: number | bigint, off: number): void {
  if (typeof value === 'bigint') {
    if (value < 0n || value > U64_MAX) throw new RangeError(`u64 out of range: ${value}`);
    buf.writeBigUInt64BE(value, off);
    return;
  }
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`u64 must be a non-negative safe integer: ${value}`);
  writeU64(buf, value, off);
}

/** Writes a u64 given as the two u32 halves it was read as; any pair of u32 is valid, so this cannot throw. */
export function writeU64Halves(buf: Buffer, high: number, low: number, off: number): void {
  buf.writeUInt32BE(high, off);
  buf.writeUInt32BE(low, off + 4);
}
