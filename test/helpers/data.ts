/** Test data computed here, so that a round trip can be checked against what it must be. */

/**
 * Deterministic pseudo-random bytes (a splitmix-style 32-bit mixer over a counter): the
 * same seed gives the same bytes, so a failure reproduces. A tail shorter than a word
 * is filled from the seed and the index.
 */
export function seededBytes(seed: number, n: number): Buffer {
  const buf = Buffer.alloc(n);
  const words = new Uint32Array(buf.buffer, buf.byteOffset, Math.floor(n / 4));
  let s = seed >>> 0;
  for (let i = 0; i < words.length; i++) {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
    words[i] = (z ^ (z >>> 16)) >>> 0;
  }
  for (let i = words.length * 4; i < n; i++) buf[i] = (seed + i) & 0xff;
  return buf;
}

/**
 * A small deterministic PRNG (mulberry32) returning floats in [0, 1): seedable, so a
 * failing randomized run can be replayed.
 */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
