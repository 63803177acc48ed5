/**
 * Latency histograms as fixed arrays of bucket counts: the Prometheus bucket bounds
 * (upper bounds, seconds) suited to block I/O from 10 µs (a memory read on loopback) to
 * 10 s (a stalled backend), counted in place with no allocation per observation.
 */

/** Bucket upper bounds in seconds, 1-2.5-5 steps from 10 µs to 10 s; a last bucket (+Inf) takes the rest. */
export const LATENCY_BOUNDS_S = [
  0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
] as const;

/** Buckets per histogram: one per bound, plus +Inf. */
export const BUCKETS = LATENCY_BOUNDS_S.length + 1;

const BOUNDS = Float64Array.from(LATENCY_BOUNDS_S);

/** The bucket of a latency in seconds: the first whose bound is >= it (Prometheus's `le`), else the +Inf bucket. */
export function bucketOf(seconds: number): number {
  // Linear: block I/O latencies sit in the first few buckets, so this ends early.
  for (let i = 0; i < BOUNDS.length; i++) if (seconds <= BOUNDS[i]!) return i;
  return BOUNDS.length;
}

/**
 * The `q` quantile (0..1) of the histogram at `counts[at .. at + BUCKETS)`, as the upper
 * bound of the bucket it falls in (seconds; Infinity for the +Inf bucket), or null when
 * the histogram is empty. A bucket's bound, not an interpolation: it is what the
 * histogram knows.
 */
export function quantile(counts: ArrayLike<number>, q: number, at = 0): number | null {
  let total = 0;
  for (let i = 0; i < BUCKETS; i++) total += counts[at + i]!;
  if (total === 0) return null;
  // The smallest bucket whose cumulative count reaches q of the total (at least one observation).
  const rank = Math.max(1, Math.ceil(q * total));
  let seen = 0;
  for (let i = 0; i < BUCKETS; i++) {
    seen += counts[at + i]!;
    if (seen >= rank) return i < BOUNDS.length ? BOUNDS[i]! : Infinity;
  }
  return Infinity;
}
