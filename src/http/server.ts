/**
 * The HTTP listener of `blockgate serve --http`: a small node:http server with a fixed
 * set of GET routes (the caller provides what each returns) and one Server-Sent Events
 * stream that the caller publishes to. It knows no metric and no export: src/cli wires
 * it to src/metrics.
 *
 * Bounds: at most MAX_EVENT_CLIENTS streams at once (a page left open in many tabs must
 * not grow the server without limit), a stream whose client stops reading is cut once
 * MAX_EVENT_BACKLOG bytes wait for it, request headers must arrive within
 * HEADERS_TIMEOUT_MS, and request bodies are never read.
 */
import type http from 'node:http';
import { createRequire } from 'node:module';
import type { AddressInfo } from 'node:net';
import type { HttpAddress } from './address.js';

/** Event streams served at once; one more is answered 503. */
export const MAX_EVENT_CLIENTS = 16;
/** Bytes queued for one event-stream client before it is cut (a minute of snapshots of a large server). */
export const MAX_EVENT_BACKLOG = 4 * 1024 * 1024;
/** Time a client has to send its request headers. */
export const HEADERS_TIMEOUT_MS = 10_000;
/** Seconds between SSE comment lines that keep idle proxies from closing a stream. */
const KEEPALIVE_MS = 15_000;

/** A route's answer. */
export interface HttpReply {
  readonly status: number;
  readonly type: string;
  readonly body: string;
  /** Extra response headers. */
  readonly headers?: Readonly<Record<string, string>>;
}

export interface HttpRoutes {
  /** Exact paths of GET routes. */
  readonly [path: string]: () => HttpReply | Promise<HttpReply>;
}

export interface HttpServerOptions {
  readonly routes: HttpRoutes;
  /** The event-stream path (e.g. /api/events) and what a new client gets first. */
  readonly events?: { readonly path: string; readonly initial: () => { event: string; data: unknown } };
  /** Called with a route's unexpected failure (answered 500). */
  readonly onError?: (err: unknown) => void;
}

export const json = (body: unknown, status = 200): HttpReply => ({ status, type: 'application/json; charset=utf-8', body: `${JSON.stringify(body)}\n` });
export const text = (body: string, status = 200): HttpReply => ({ status, type: 'text/plain; charset=utf-8', body });

export class HttpServer {
  readonly #server: http.Server;
  readonly #routes: HttpRoutes;
  readonly #events: HttpServerOptions['events'];
  readonly #onError: (err: unknown) => void;
  readonly #clients = new Set<http.ServerResponse>();
  #keepalive: NodeJS.Timeout | null = null;

  constructor(opts: HttpServerOptions) {
    this.#routes = opts.routes;
    this.#events = opts.events;
    this.#onError = opts.onError ?? (() => undefined);
    // node:http is required here, not imported: `serve` without --http must not load it (start-up).
    const { createServer } = createRequire(import.meta.url)('node:http') as typeof http;
    this.#server = createServer({ headersTimeout: HEADERS_TIMEOUT_MS, requestTimeout: HEADERS_TIMEOUT_MS }, (req, res) => this.#handle(req, res));
  }

  /** Event-stream clients connected now. */
  get eventClients(): number {
    return this.#clients.size;
  }

  async listen(addr: HttpAddress): Promise<HttpAddress> {
    await new Promise<void>((resolve, reject) => {
      this.#server.once('error', reject);
      this.#server.listen({ host: addr.host, port: addr.port, ipv6Only: addr.host.includes(':') }, () => {
        this.#server.off('error', reject);
        resolve();
      });
    });
    this.#server.on('error', (err) => this.#onError(err));
    this.#keepalive = setInterval(() => this.#write(': keepalive\n\n'), KEEPALIVE_MS);
    this.#keepalive.unref();
    const a = this.#server.address() as AddressInfo;
    return { host: a.address, port: a.port };
  }

  /** Sends one event to every stream client; the data is serialised once. */
  publish(event: string, data: unknown): void {
    if (this.#clients.size === 0) return;
    this.#write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
  }

  #write(chunk: string): void {
    for (const res of this.#clients) {
      if (res.writableLength > MAX_EVENT_BACKLOG) {
        // It stopped reading: cut it rather than queue snapshots for it without end.
        res.destroy();
        this.#clients.delete(res);
        continue;
      }
      res.write(chunk);
    }
  }

  #handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const path = new URL(req.url ?? '/', 'http://localhost').pathname;
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      return this.#send(res, { status: 405, type: 'text/plain; charset=utf-8', body: 'only GET and HEAD\n' }, { allow: 'GET, HEAD' });
    }
    if (this.#events && path === this.#events.path) return this.#stream(res, this.#events.initial);
    const route = Object.hasOwn(this.#routes, path) ? this.#routes[path] : undefined;
    if (route === undefined) return this.#send(res, text('not found\n', 404));
    Promise.resolve()
      .then(route)
      .then(
        (reply) => this.#send(res, reply, {}, req.method === 'HEAD'),
        (err: unknown) => {
          this.#onError(err);
          this.#send(res, text('internal error\n', 500));
        },
      );
  }

  #send(res: http.ServerResponse, reply: HttpReply, headers: Record<string, string> = {}, head = false): void {
    res.writeHead(reply.status, {
      'content-type': reply.type,
      'cache-control': 'no-store',
      'x-content-type-options': 'nosniff',
      'content-length': Buffer.byteLength(reply.body),
      ...reply.headers,
      ...headers,
    });
    res.end(head ? undefined : reply.body);
  }

  #stream(res: http.ServerResponse, initial: () => { event: string; data: unknown }): void {
    if (this.#clients.size >= MAX_EVENT_CLIENTS) {
      return this.#send(res, text(`too many event streams (at most ${MAX_EVENT_CLIENTS})\n`, 503), { 'retry-after': '10' });
    }
    res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-store', connection: 'keep-alive' });
    const first = initial();
    // retry: how long a browser waits before reconnecting after the stream breaks.
    res.write(`retry: 2000\nevent: ${first.event}\ndata: ${JSON.stringify(first.data)}\n\n`);
    this.#clients.add(res);
    res.on('close', () => this.#clients.delete(res));
  }

  async close(): Promise<void> {
    if (this.#keepalive) clearInterval(this.#keepalive);
    for (const res of this.#clients) res.end();
    this.#clients.clear();
    this.#server.closeAllConnections();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}
