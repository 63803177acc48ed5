/**
 * What `serve` adds for observability: the server's metrics (src/metrics, on unless
 * `--no-metrics`), which `blockgate status` shows as live counts, and with `--http
 * [HOST:]PORT` (or the config key `http`) an HTTP listener with /metrics (Prometheus),
 * /healthz, /readyz, /api/status, /api/events (Server-Sent Events) and the status page
 * at /. docs/OBSERVABILITY.md.
 */
import type { Logger } from 'pino';
import { InvalidArgumentError } from 'commander';
import { toBlockError } from '../errors/index.js';
import { GateRegistry } from '../gate/gate-registry.js';
import { GateService, type LiveFigures, type StatusReport } from '../gate/control/gates.js';
import type { ControlHandle } from '../gate/control/server.js';
import type { NbdServer } from '../nbd/server.js';
import type { NbdMetricsSink } from '../nbd/metrics.js';
import type { Export } from '../export/export.js';
import { HttpServer, httpUrl, json, parseHttpAddress, text, type HttpAddress, type HttpReply } from '../http/index.js';
import { STATUS_PAGE_CSP, statusPage } from '../http/page.js';
import { ServerMetrics, Sampler, createRegistry, type ErrseqEvent, type Sample } from '../metrics/index.js';

/** commander's parser of `--http`: one clear line on a bad address. */
export function parseHttpOption(value: string): HttpAddress {
  try {
    return parseHttpAddress(value);
  } catch (e) {
    throw new InvalidArgumentError(toBlockError(e).message);
  }
}

/** What /api/status and each event-stream snapshot hold. */
export interface ApiStatus extends StatusReport {
  readonly uptimeSeconds: number;
  readonly listeners: readonly string[];
  readonly timeline: readonly ErrseqEvent[];
  /** The latest one-second sample (rates and latency percentiles per export), null before the first. */
  readonly sample: Sample | null;
}

export interface ObservabilityOptions {
  /** Count requests and connections (default true; `--no-metrics` turns it off for the last few per cent of speed). */
  readonly metrics: boolean;
  /** Where the HTTP listener listens; none by default. */
  readonly http?: HttpAddress | undefined;
  readonly logger: Logger;
}

export interface ServedParts {
  readonly server: NbdServer;
  readonly control: ControlHandle | undefined;
}

export class Observability {
  readonly #metrics: ServerMetrics | undefined;
  readonly #http: HttpAddress | undefined;
  readonly #log: Logger;
  #server: HttpServer | null = null;
  #sampler: Sampler | null = null;
  #parts: ServedParts | null = null;
  /** The exports served when listening started: /readyz wants each still there. */
  #initial: readonly Export[] = [];
  #gatesForStatus: GateService | null = null;

  constructor(opts: ObservabilityOptions) {
    this.#metrics = opts.metrics || opts.http !== undefined ? new ServerMetrics() : undefined;
    this.#http = opts.http;
    this.#log = opts.logger;
  }

  /** The NBD server's sink, undefined with metrics off. */
  get sink(): NbdMetricsSink | undefined {
    return this.#metrics;
  }

  /** The live figures for status, undefined with metrics off. */
  get live(): LiveFigures | undefined {
    const m = this.#metrics;
    return m ? (e) => m.liveStats(e) : undefined;
  }

  /** Starts the HTTP listener, if asked for, once the NBD server listens. Returns its address. */
  async start(parts: ServedParts): Promise<HttpAddress | undefined> {
    this.#parts = parts;
    this.#initial = parts.server.listExports();
    const metrics = this.#metrics;
    if (this.#http === undefined || metrics === undefined) return undefined;
    const { server, control } = parts;
    const registry = createRegistry(metrics, {
      exports: () => server.listExports(),
      gates: () => control?.gates.list() ?? [],
      openConnections: () => openByListener(server),
    });
    const sampler = new Sampler(metrics, () => server.listExports());
    const http = new HttpServer({
      routes: {
        '/': () => ({ status: 200, type: 'text/html; charset=utf-8', body: statusPage(), headers: { 'content-security-policy': STATUS_PAGE_CSP } }),
        // Browsers ask for it; an empty answer keeps their consoles quiet.
        '/favicon.ico': () => ({ status: 204, type: 'image/x-icon', body: '' }),
        '/metrics': async () => ({ status: 200, type: registry.contentType, body: await registry.metrics() }),
        '/healthz': () => text('ok\n'),
        '/readyz': () => this.#ready(),
        '/api/status': () => json(this.#status()),
      },
      events: { path: '/api/events', initial: () => ({ event: 'hello', data: { history: sampler.history(), status: this.#status() } }) },
      onError: (err) => this.#log.error({ err }, 'http: request failed'),
    });
    sampler.onSample((s) => http.publish('sample', { sample: s, status: this.#status(s) }));
    const bound = await http.listen(this.#http);
    sampler.start();
    this.#server = http;
    this.#sampler = sampler;
    this.#log.info({ http: httpUrl(bound) }, 'http listening (metrics, status page)');
    return bound;
  }

  /** /readyz: 200 once listening, with every export of the start still served; 503 with the reasons otherwise. */
  #ready(): HttpReply {
    const parts = this.#parts;
    const why: string[] = [];
    if (parts === null) why.push('not started');
    else {
      if (parts.server.shuttingDown) why.push('shutting down');
      if (parts.server.listenerLabels.length === 0) why.push('not listening');
      for (const e of this.#initial) if (parts.server.findExport(e.name) !== e) why.push(`export '${e.name}' is not served`);
    }
    return why.length === 0 ? text('ready\n') : text(`not ready: ${why.join('; ')}\n`, 503);
  }

  #status(sample: Sample | null = this.#sampler?.history().at(-1) ?? null): ApiStatus {
    const parts = this.#parts!;
    const gates = parts.control?.gates ?? (this.#gatesForStatus ??= new GateService(new GateRegistry(), parts.server, this.live));
    const metrics = this.#metrics;
    if (metrics) metrics.noteRecorded(parts.server.listExports());
    return {
      ...gates.status(),
      uptimeSeconds: metrics ? (Date.now() - metrics.startedAt) / 1000 : 0,
      listeners: parts.server.listenerLabels,
      timeline: metrics?.timeline() ?? [],
      sample,
    };
  }

  async close(): Promise<void> {
    this.#sampler?.stop();
    await this.#server?.close();
  }
}

/** Open NBD sessions per listener. */
function openByListener(server: NbdServer): Map<string, number> {
  const out = new Map<string, number>(server.listenerLabels.map((l) => [l, 0]));
  for (const s of server.sessions()) out.set(s.listener, (out.get(s.listener) ?? 0) + 1);
  return out;
}

