/**
 * The figures of a running server: the NBD sink (src/nbd/metrics.ts) counting into
 * typed arrays per (export, listener) and per listener, the write-back error timeline,
 * and what status and the status page read of them. prom-client reads them at scrape
 * time through registry.ts; nothing here allocates per request.
 */
import { FilterDevice, type BlockDevice, type LiveStats, type OpFigures } from '../device/index.js';
import type { Export } from '../export/export.js';
import { WritebackFilter } from '../filters/writeback.js';
import type { HandshakeResult, NbdMetricsSink, RefusedReason } from '../nbd/metrics.js';
import { BUCKETS, quantile } from './histogram.js';
import { COMMANDS, HANDSHAKE_RESULTS, ListenerFigures, REFUSED_REASONS, RESULTS, RequestFigures } from './figures.js';

/** Write-back error events the timeline keeps (the oldest go first): enough for hours of a flapping backend. */
export const MAX_TIMELINE_EVENTS = 256;

/** One event of the write-back error timeline. */
export interface ErrseqEvent {
  /** Milliseconds since the epoch. A `recorded` event is stamped when the server noticed it (at most one sampling interval late). */
  readonly at: number;
  readonly export: string;
  readonly kind: 'recorded' | 'reported';
  /** The Linux errno recorded or reported. */
  readonly errno: number;
  /** For `reported`: the session told. */
  readonly session?: number;
  readonly peer?: string;
}

/** The sums over every listener of one export's request figures. */
export interface ExportTotals {
  readonly requests: Float64Array;
  readonly latency: Float64Array;
  readonly bytesRead: number;
  readonly bytesWritten: number;
  readonly inFlightRequests: number;
  readonly inFlightBytes: number;
}

/** The op names of status's live figures (those of the stats filter), by command slot; null = not shown. */
const OP_NAMES: readonly (string | null)[] = ['read', 'write', null, 'flush', 'trim', 'cache', 'zero', 'extents', 'other'];

/** The write-back filters of a stack, top first. */
export function writebackLayers(device: BlockDevice): WritebackFilter[] {
  const out: WritebackFilter[] = [];
  for (let d: BlockDevice | undefined = device; d !== undefined; d = d instanceof FilterDevice ? d.next : undefined) {
    if (d instanceof WritebackFilter) out.push(d);
  }
  return out;
}

export class ServerMetrics implements NbdMetricsSink {
  readonly startedAt = Date.now();
  readonly #listeners = new Map<string, ListenerFigures>();
  readonly #requests = new Map<Export, Map<string, RequestFigures>>();
  /** The timeline as a ring: #events[#eventHead] is the oldest once full. */
  readonly #events: ErrseqEvent[] = [];
  #eventHead = 0;
  /** Per export, the ErrSeq's `recorded` count when last looked at. */
  readonly #recordedSeen = new WeakMap<Export, number>();

  #listener(label: string): ListenerFigures {
    let l = this.#listeners.get(label);
    if (l === undefined) this.#listeners.set(label, (l = new ListenerFigures(label)));
    return l;
  }

  connectionOpened(listener: string): void {
    this.#listener(listener).opened++;
  }

  connectionClosed(listener: string): void {
    this.#listener(listener).closed++;
  }

  connectionRefused(listener: string, reason: RefusedReason): void {
    this.#listener(listener).refused[REFUSED_REASONS.indexOf(reason)]!++;
  }

  handshake(listener: string, result: HandshakeResult, tls: boolean): void {
    this.#listener(listener).handshakes[HANDSHAKE_RESULTS.indexOf(result) * 2 + (tls ? 1 : 0)]!++;
  }

  requests(exp: Export, listener: string): RequestFigures {
    let byListener = this.#requests.get(exp);
    if (byListener === undefined) this.#requests.set(exp, (byListener = new Map()));
    let f = byListener.get(listener);
    if (f === undefined) byListener.set(listener, (f = new RequestFigures(exp.name, listener)));
    return f;
  }

  errorReported(exp: Export, sessionId: number, peer: string, errno: number): void {
    this.noteRecorded([exp]);
    this.#push({ at: Date.now(), export: exp.name, kind: 'reported', errno, session: sessionId, peer });
  }

  /** Adds a `recorded` event for each export whose ErrSeq recorded errors since the last look. Consumes nothing. */
  noteRecorded(exports: readonly Export[]): void {
    for (const e of exports) {
      const n = e.errseq.recorded;
      const seen = this.#recordedSeen.get(e) ?? 0;
      if (n === seen) continue;
      this.#recordedSeen.set(e, n);
      // Several records between two looks are one event: the word keeps only the latest error.
      this.#push({ at: Date.now(), export: e.name, kind: 'recorded', errno: e.errseq.peekError() });
    }
  }

  #push(ev: ErrseqEvent): void {
    if (this.#events.length < MAX_TIMELINE_EVENTS) this.#events.push(ev);
    else {
      this.#events[this.#eventHead] = ev;
      this.#eventHead = (this.#eventHead + 1) % MAX_TIMELINE_EVENTS;
    }
  }

  /** The timeline, oldest first. */
  timeline(): ErrseqEvent[] {
    return [...this.#events.slice(this.#eventHead), ...this.#events.slice(0, this.#eventHead)];
  }

  /** Every listener's figures. */
  listeners(): readonly ListenerFigures[] {
    return [...this.#listeners.values()];
  }

  /** Every (export, listener) pair's figures. */
  requestFigures(): RequestFigures[] {
    return [...this.#requests.values()].flatMap((m) => [...m.values()]);
  }

  /** One export's request figures summed over its listeners. */
  totals(exp: Export): ExportTotals {
    const requests = new Float64Array(COMMANDS.length * RESULTS.length);
    const latency = new Float64Array(COMMANDS.length * BUCKETS);
    let bytesRead = 0;
    let bytesWritten = 0;
    let inFlightRequests = 0;
    let inFlightBytes = 0;
    for (const f of this.#requests.get(exp)?.values() ?? []) {
      for (let i = 0; i < requests.length; i++) requests[i]! += f.requests[i]!;
      for (let i = 0; i < latency.length; i++) latency[i]! += f.latency[i]!;
      bytesRead += f.bytesRead;
      bytesWritten += f.bytesWritten;
      inFlightRequests += f.inFlightRequests;
      inFlightBytes += f.inFlightBytes;
    }
    return { requests, latency, bytesRead, bytesWritten, inFlightRequests, inFlightBytes };
  }

  /** Status's live figures of an export (the shape the stats filter reports): per op count, bytes, errors, p50/p99. */
  liveStats(exp: Export): LiveStats {
    const t = this.totals(exp);
    const ops: Record<string, OpFigures> = {};
    for (let c = 0; c < COMMANDS.length; c++) {
      const name = OP_NAMES[c];
      if (name === null || name === undefined) continue;
      let count = 0;
      let errors = 0;
      for (let r = 0; r < RESULTS.length; r++) {
        const n = t.requests[c * RESULTS.length + r]!;
        count += n;
        if (r > 0) errors += n;
      }
      if (count === 0 && name === 'other') continue;
      const bytes = c === 0 ? t.bytesRead : c === 1 ? t.bytesWritten : 0;
      ops[name] = { count, bytes, errors, p50Us: toUs(quantile(t.latency, 0.5, c * BUCKETS)), p99Us: toUs(quantile(t.latency, 0.99, c * BUCKETS)) };
    }
    return { elapsed: (Date.now() - this.startedAt) / 1000, ops };
  }
}

/** A bucket bound in seconds as whole µs (null stays null; the +Inf bucket is reported as null too: no bound). */
function toUs(s: number | null): number | null {
  return s === null || !Number.isFinite(s) ? null : Math.round(s * 1e6);
}
