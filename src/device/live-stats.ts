/**
 * Figures a layer can report while the server runs (the stats filter does), found by
 * walking a stack: how `blockgate status` shows per-export counts without the status
 * code knowing which filter keeps them (it sits in a layer that may not import filters).
 */
import { FilterDevice } from './filter.js';
import type { BlockDevice } from './types.js';

/** One operation's figures since counting started. */
export interface OpFigures {
  readonly count: number;
  /** Bytes of successful requests. */
  readonly bytes: number;
  readonly errors: number;
  /** Latency percentiles, µs (a histogram bucket's upper bound); null before the first request. */
  readonly p50Us: number | null;
  readonly p99Us: number | null;
}

export interface LiveStats {
  /** Seconds since counting started. */
  readonly elapsed: number;
  /** By operation name (read, write, flush, trim, zero, extents, cache). */
  readonly ops: Readonly<Record<string, OpFigures>>;
}

/** A layer that reports live figures. */
export interface LiveStatsSource {
  liveStats(): LiveStats;
}

function isSource(d: BlockDevice): d is BlockDevice & LiveStatsSource {
  return typeof (d as Partial<LiveStatsSource>).liveStats === 'function';
}

/** The live figures of the topmost layer of `device`'s stack that keeps them, or undefined. */
export function liveStatsOf(device: BlockDevice): LiveStats | undefined {
  let d: BlockDevice | undefined = device;
  while (d !== undefined) {
    if (isSource(d)) return d.liveStats();
    d = d instanceof FilterDevice ? d.next : undefined;
  }
  return undefined;
}
