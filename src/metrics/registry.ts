/**
 * The Prometheus registry of `blockgate serve --http`: prom-client metrics whose
 * `collect()` copies the server's in-place counters (server-metrics.ts) at scrape time,
 * so the hot path never touches prom-client; plus prom-client's process metrics
 * (`process_*`, `nodejs_*`, among them `nodejs_eventloop_lag_*` from
 * perf_hooks.monitorEventLoopDelay). docs/OBSERVABILITY.md lists every metric.
 */
import { createRequire } from 'node:module';
import type { Counter, Gauge, Metric, Registry } from 'prom-client';
import type * as PromClientModule from 'prom-client';
import type { Export } from '../export/export.js';
import type { GateInfo } from '../gate/gate-registry.js';
import { BUCKETS, LATENCY_BOUNDS_S } from './histogram.js';
import { COMMANDS, HANDSHAKE_RESULTS, REFUSED_REASONS, RESULTS } from './figures.js';
import { writebackLayers, type ServerMetrics } from './server-metrics.js';

type PromClient = typeof PromClientModule;

/**
 * prom-client, loaded on first use: it takes 40-80 ms to load, which `serve` without
 * --http (and the start-up row of the bench, `serve --run`) must not pay. A require of
 * an npm package, not an import of a module of src/, so it hides no edge of the
 * layering table.
 */
let promClient: PromClient | undefined;
function prom(): PromClient {
  return (promClient ??= createRequire(import.meta.url)('prom-client') as PromClient);
}

/** What the registry reads besides the counters: the exports and gates of the moment. */
export interface MetricSources {
  exports(): readonly Export[];
  gates(): readonly GateInfo[];
  /** Open NBD sessions per listener label. */
  openConnections(): ReadonlyMap<string, number>;
}

type Labels = Record<string, string>;
type Emit = (labels: Labels, value: number) => void;

/** A counter or gauge whose series are copied in at each scrape by `fill`. */
function copied(kind: 'counter' | 'gauge', registry: Registry, name: string, help: string, labelNames: readonly string[], fill: (emit: Emit) => void): void {
  const config = {
    name,
    help,
    labelNames: [...labelNames],
    registers: [registry],
    collect(this: Counter | Gauge) {
      this.reset();
      if (kind === 'counter') fill((l, v) => (this as Counter).inc(l, v));
      else fill((l, v) => (this as Gauge).set(l, v));
    },
  };
  if (kind === 'counter') new (prom().Counter)(config);
  else new (prom().Gauge)(config);
}

/** `le` as Prometheus writes it. */
const LE = [...LATENCY_BOUNDS_S.map((b) => String(b)), '+Inf'];

/**
 * A histogram read from bucket arrays. prom-client's Histogram can only be fed one
 * observation at a time, so this is a metric object of the shape the registry formats
 * (`get()` returning name, type and values), which a prom-client Registry accepts.
 */
function bucketHistogram(registry: Registry, metrics: ServerMetrics): void {
  const name = 'blockgate_request_duration_seconds';
  const help = 'NBD request latency, from the request header parsed to the reply queued, by command';
  const metric = {
    name,
    help,
    type: 'histogram',
    aggregator: 'sum',
    get() {
      const values: { metricName: string; labels: Labels; value: number }[] = [];
      for (const f of metrics.requestFigures()) {
        for (let c = 0; c < COMMANDS.length; c++) {
          let cum = 0;
          const labels = { export: f.exportName, listener: f.listener, command: COMMANDS[c]! };
          for (let b = 0; b < BUCKETS; b++) cum += f.latency[c * BUCKETS + b]!;
          if (cum === 0 && c > 1) continue;
          let running = 0;
          for (let b = 0; b < BUCKETS; b++) {
            running += f.latency[c * BUCKETS + b]!;
            values.push({ metricName: `${name}_bucket`, labels: { ...labels, le: LE[b]! }, value: running });
          }
          values.push({ metricName: `${name}_sum`, labels, value: f.latencySum[c]! });
          values.push({ metricName: `${name}_count`, labels, value: cum });
        }
      }
      return { name, help, type: 'histogram', aggregator: 'sum', values };
    },
  };
  registry.registerMetric(metric as unknown as Metric);
}

/** The registry of a server's metrics and the process metrics. */
export function createRegistry(metrics: ServerMetrics, sources: MetricSources): Registry {
  const r = new (prom().Registry)();
  prom().collectDefaultMetrics({ register: r });
  const figures = () => metrics.requestFigures();
  copied('counter', r, 'blockgate_requests_total', 'NBD requests answered, by command and result (ok or the NBD error sent)', ['export', 'listener', 'command', 'result'], (emit) => {
    for (const f of figures()) {
      for (let c = 0; c < COMMANDS.length; c++) {
        for (let s = 0; s < RESULTS.length; s++) {
          const v = f.requests[c * RESULTS.length + s]!;
          // Zero series only for the two commands every dashboard plots, so a quiet export still shows.
          if (v > 0 || (c <= 1 && s === 0)) emit({ export: f.exportName, listener: f.listener, command: COMMANDS[c]!, result: RESULTS[s]! }, v);
        }
      }
    }
  });
  copied('counter', r, 'blockgate_read_bytes_total', 'Bytes returned by successful NBD READs', ['export', 'listener'], (emit) => {
    for (const f of figures()) emit({ export: f.exportName, listener: f.listener }, f.bytesRead);
  });
  copied('counter', r, 'blockgate_written_bytes_total', 'Bytes taken by successful NBD WRITEs', ['export', 'listener'], (emit) => {
    for (const f of figures()) emit({ export: f.exportName, listener: f.listener }, f.bytesWritten);
  });
  copied('gauge', r, 'blockgate_requests_in_flight', 'NBD requests being served', ['export', 'listener'], (emit) => {
    for (const f of figures()) emit({ export: f.exportName, listener: f.listener }, f.inFlightRequests);
  });
  copied('gauge', r, 'blockgate_bytes_in_flight', 'Payload bytes of the NBD requests being served (what the in-flight budget counts)', ['export', 'listener'], (emit) => {
    for (const f of figures()) emit({ export: f.exportName, listener: f.listener }, f.inFlightBytes);
  });
  bucketHistogram(r, metrics);

  copied('gauge', r, 'blockgate_connections_open', 'NBD connections open, handshake or transmission', ['listener'], (emit) => {
    for (const [l, n] of sources.openConnections()) emit({ listener: l }, n);
  });
  copied('counter', r, 'blockgate_connections_total', 'NBD connections accepted (greeted)', ['listener'], (emit) => {
    for (const l of metrics.listeners()) emit({ listener: l.label }, l.opened);
  });
  copied('counter', r, 'blockgate_connections_refused_total', 'NBD connections closed before the greeting, by reason', ['listener', 'reason'], (emit) => {
    for (const l of metrics.listeners()) REFUSED_REASONS.forEach((reason, i) => emit({ listener: l.label, reason }, l.refused[i]!));
  });
  copied('counter', r, 'blockgate_handshakes_total', 'NBD handshakes by outcome and whether TLS was established', ['listener', 'result', 'tls'], (emit) => {
    for (const l of metrics.listeners()) {
      HANDSHAKE_RESULTS.forEach((result, i) => {
        for (const tls of [0, 1]) {
          const v = l.handshakes[i * 2 + tls]!;
          if (v > 0) emit({ listener: l.label, result, tls: tls ? 'yes' : 'no' }, v);
        }
      });
    }
  });

  const exports = () => {
    const list = sources.exports();
    // A scrape is also a look at the timeline's `recorded` events.
    metrics.noteRecorded(list);
    return list;
  };
  copied('gauge', r, 'blockgate_sessions', 'NBD sessions in transmission on the export', ['export'], (emit) => {
    for (const e of exports()) emit({ export: e.name }, e.sessionCount);
  });
  copied('counter', r, 'blockgate_errseq_recorded_total', "Write-back errors recorded in the export's ErrSeq (set() calls that changed the word)", ['export'], (emit) => {
    for (const e of exports()) emit({ export: e.name }, e.errseq.recorded);
  });
  copied('counter', r, 'blockgate_errseq_reported_total', 'Write-back errors reported to a session (a FLUSH reply or a failed FUA write), one per session told', ['export'], (emit) => {
    for (const e of exports()) emit({ export: e.name }, e.errseq.reported);
  });
  copied('gauge', r, 'blockgate_errseq_sessions_pending', 'Sessions whose next FLUSH reports a write-back error (peeked: looking consumes nothing)', ['export'], (emit) => {
    for (const e of exports()) emit({ export: e.name }, e.sessions().filter((s) => s.errorPending).length);
  });
  copied('gauge', r, 'blockgate_errseq_last_error', 'The Linux errno of the last write-back error recorded (0: none ever)', ['export'], (emit) => {
    for (const e of exports()) emit({ export: e.name }, e.errseq.peekError());
  });
  copied('gauge', r, 'blockgate_writeback_dirty_bytes', 'Bytes the write-back cache holds acknowledged and not yet written (with its per-request overhead)', ['export'], (emit) => {
    for (const e of exports()) for (const w of writebackLayers(e.device)) emit({ export: e.name }, w.dirtyBytes);
  });
  copied('counter', r, 'blockgate_writeback_failures_total', 'Write-back calls to the layer below that failed', ['export'], (emit) => {
    for (const e of exports()) for (const w of writebackLayers(e.device)) emit({ export: e.name }, w.failureCount);
  });

  copied('gauge', r, 'blockgate_gate_queued', 'Requests queued on a gate, not yet taken by a handler', ['gate'], (emit) => {
    for (const g of sources.gates()) emit({ gate: g.name }, g.queued);
  });
  copied('gauge', r, 'blockgate_gate_in_flight', 'Requests a handler has taken (START) and not answered (DONE)', ['gate'], (emit) => {
    for (const g of sources.gates()) emit({ gate: g.name }, g.inFlight);
  });
  copied('gauge', r, 'blockgate_gate_handlers_waiting', 'Handler START calls blocked waiting for a request', ['gate'], (emit) => {
    for (const g of sources.gates()) emit({ gate: g.name }, g.sleeping);
  });
  copied('gauge', r, 'blockgate_gate_opens', 'Open device-side handles of a gate (one per attached NBD session)', ['gate'], (emit) => {
    for (const g of sources.gates()) emit({ gate: g.name }, g.openCount);
  });
  copied('gauge', r, 'blockgate_uptime_seconds', 'Seconds since the server started', [], (emit) => emit({}, (Date.now() - metrics.startedAt) / 1000));
  return r;
}
