/**
 * Once a second, the per-export rates of the last interval (throughput, IOPS, errors,
 * latency percentiles of the requests that ended in it) and the event loop's delay
 * (perf_hooks.monitorEventLoopDelay), kept for the last HISTORY_SAMPLES seconds: what
 * the status page draws. A new page gets the history at once, then one sample a second
 * over its event stream, so an open page costs one JSON line a second, not a poll.
 */
import { monitorEventLoopDelay, type IntervalHistogram } from 'node:perf_hooks';
import type { Export } from '../export/export.js';
import { BUCKETS, quantile } from './histogram.js';
import { COMMANDS, RESULTS } from './figures.js';
import type { ExportTotals, ServerMetrics } from './server-metrics.js';

/** Seconds of history kept (the page's graphs span this). */
export const HISTORY_SAMPLES = 300;
/** Milliseconds between samples. */
export const SAMPLE_INTERVAL_MS = 1000;
/** monitorEventLoopDelay's resolution, ms. */
const LOOP_RESOLUTION_MS = 10;

/** One export's figures over one interval. */
export interface ExportSample {
  readonly export: string;
  readonly readBytesPerSec: number;
  readonly writeBytesPerSec: number;
  readonly iops: number;
  readonly errorsPerSec: number;
  /** Latency percentiles of the requests that ended in the interval, ms (a bucket bound); null if none ended. */
  readonly p50Ms: number | null;
  readonly p99Ms: number | null;
}

export interface Sample {
  /** Milliseconds since the epoch. */
  readonly at: number;
  /** The event loop's delay over the interval, ms: p99 and max. */
  readonly loopP99Ms: number;
  readonly loopMaxMs: number;
  readonly exports: readonly ExportSample[];
}

const ms = (s: number | null): number | null => (s === null ? null : Number.isFinite(s) ? s * 1000 : null);

export class Sampler {
  readonly #metrics: ServerMetrics;
  readonly #exports: () => readonly Export[];
  readonly #loop: IntervalHistogram;
  readonly #last = new Map<Export, ExportTotals>();
  #lastAt = Date.now();
  readonly #history: Sample[] = [];
  #timer: NodeJS.Timeout | null = null;
  readonly #listeners = new Set<(s: Sample) => void>();

  constructor(metrics: ServerMetrics, exports: () => readonly Export[]) {
    this.#metrics = metrics;
    this.#exports = exports;
    this.#loop = monitorEventLoopDelay({ resolution: LOOP_RESOLUTION_MS });
  }

  start(): void {
    this.#loop.enable();
    for (const e of this.#exports()) this.#last.set(e, this.#metrics.totals(e));
    this.#timer = setInterval(() => this.#tick(), SAMPLE_INTERVAL_MS);
    this.#timer.unref();
  }

  stop(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
    this.#loop.disable();
  }

  /** Called with each new sample. */
  onSample(fn: (s: Sample) => void): void {
    this.#listeners.add(fn);
  }

  /** The samples kept, oldest first. */
  history(): readonly Sample[] {
    return this.#history;
  }

  #tick(): void {
    const now = Date.now();
    const secs = Math.max(0.001, (now - this.#lastAt) / 1000);
    this.#lastAt = now;
    const exports = this.#exports();
    this.#metrics.noteRecorded(exports);
    const samples: ExportSample[] = [];
    for (const e of exports) {
      const cur = this.#metrics.totals(e);
      const prev = this.#last.get(e);
      this.#last.set(e, cur);
      samples.push(rates(e.name, cur, prev, secs));
    }
    for (const e of this.#last.keys()) if (!exports.includes(e)) this.#last.delete(e);
    const sample: Sample = {
      at: now,
      loopP99Ms: this.#loop.percentile(99) / 1e6,
      loopMaxMs: this.#loop.max / 1e6,
      exports: samples,
    };
    this.#loop.reset();
    // At most HISTORY_SAMPLES: dropping the oldest of 300 once a second is no hot path.
    if (this.#history.length >= HISTORY_SAMPLES) this.#history.splice(0, this.#history.length - HISTORY_SAMPLES + 1);
    this.#history.push(sample);
    for (const fn of this.#listeners) fn(sample);
  }
}

/** The difference of two totals as rates over `secs`. */
function rates(name: string, cur: ExportTotals, prev: ExportTotals | undefined, secs: number): ExportSample {
  let ops = 0;
  let errors = 0;
  for (let i = 0; i < cur.requests.length; i++) {
    const d = cur.requests[i]! - (prev?.requests[i] ?? 0);
    ops += d;
    if (i % RESULTS.length !== 0) errors += d;
  }
  const delta = new Float64Array(BUCKETS);
  for (let c = 0; c < COMMANDS.length; c++) {
    for (let b = 0; b < BUCKETS; b++) delta[b]! += cur.latency[c * BUCKETS + b]! - (prev?.latency[c * BUCKETS + b] ?? 0);
  }
  return {
    export: name,
    readBytesPerSec: (cur.bytesRead - (prev?.bytesRead ?? 0)) / secs,
    writeBytesPerSec: (cur.bytesWritten - (prev?.bytesWritten ?? 0)) / secs,
    iops: ops / secs,
    errorsPerSec: errors / secs,
    p50Ms: ms(quantile(delta, 0.5)),
    p99Ms: ms(quantile(delta, 0.99)),
  };
}
