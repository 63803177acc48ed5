import { BlockError } from '../errors/index.js';
import { MAX_DEVICE_SIZE } from './types.js';

const UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

/**
 * Parses a size as users write it (nbdkit and qemu style): a decimal integer with an
 * optional binary suffix K, M, G, T, P or E (optionally followed by "iB" or "B"), e.g.
 * `4G`, `512`, `1MiB`, `2^50` is also accepted. Sizes above 2^53 - 1 are rejected.
 */
export function parseSize(text: string | number): number {
  if (typeof text === 'number') {
    if (!Number.isSafeInteger(text) || text < 0) throw new BlockError('EINVAL', `invalid size: ${text}`);
    return text;
  }
  const s = text.trim();
  const pow = /^2\^(\d+)$/.exec(s);
  if (pow) {
    const v = 2 ** Number(pow[1]);
    if (v > MAX_DEVICE_SIZE) throw new BlockError('EINVAL', `size too large: ${text} (at most 2^53 - 1)`);
    return v;
  }
  const m = /^(\d+)\s*([bkmgtpe]?)(i?b)?$/i.exec(s);
  if (!m) throw new BlockError('EINVAL', `invalid size: '${text}' (expected a number with an optional K/M/G/T/P/E suffix)`);
  const v = Number(m[1]) * (UNITS[(m[2] ?? '').toLowerCase()] ?? 1);
  if (!Number.isSafeInteger(v) || v > MAX_DEVICE_SIZE) {
    throw new BlockError('EINVAL', `size too large: ${text} (at most 2^53 - 1 bytes)`);
  }
  return v;
}

/** Formats a byte count for humans: 1073741824 -> "1GiB", 1000 -> "1000B". */
export function formatSize(n: number): string {
  const units = ['EiB', 'PiB', 'TiB', 'GiB', 'MiB', 'KiB'];
  let scale = 2 ** 60;
  for (const u of units) {
    if (n >= scale && n % scale === 0) return `${n / scale}${u}`;
    scale /= 1024;
  }
  return `${n}B`;
}
