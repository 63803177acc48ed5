/**
 * The NBD server: listeners (TCP, IPv4 and IPv6, and unix sockets), the export table,
 * and graceful shutdown. Each accepted connection becomes an {@link NbdSession}.
 */
import net from 'node:net';
import fs from 'node:fs';
import pino, { type Logger } from 'pino';
import { BlockError } from '../errors/index.js';
import { claimSocketPath } from '../io/listen.js';
import type { Export, ExportTable } from '../export/export.js';
import { RequestErrorLog } from '../export/error-log.js';
import { DEFAULT_LIMITS, InFlightBudget, validateLimits, type ServerLimits } from './limits.js';
import { NbdSession, type SessionHost } from './session.js';
import { AddressRules, type AddressRuleSpec } from '../io/address-rules.js';
import { peerCredentials, peerCredentialsUnavailable } from '../io/peer-cred.js';
import { unixSocketPath } from '../io/socket-activation.js';
import { ExportPolicy, type Client, type ExportPolicySpec } from './access.js';
import type { ExportAccess } from './handshake.js';
import { TLS_OFF, type ServerTls } from './tls.js';
import { BufferPool } from '../io/buffer-pool.js';
import { closeListeners, drainSessions } from '../io/drain.js';
import type { NbdMetricsSink } from './metrics.js';

/** Where to listen. */
export type ListenAddress = { readonly host: string; readonly port: number } | { readonly path: string };
/**
 * Where to listen, or an inherited listening socket (systemd socket activation,
 * src/io/socket-activation.ts): its file descriptor. The socket stays its owner's: a
 * unix socket's file is not removed at close.
 */
export type ListenTarget = ListenAddress | { readonly fd: number };

/** How one listener treats its clients. */
export interface ListenerOptions {
  /** TLS policy and credentials (src/nbd/tls.ts loadTls). Default: off. */
  readonly tls?: ServerTls;
  /** Who may connect, checked at accept time before the greeting. Default: everyone. */
  readonly rules?: AddressRuleSpec;
}

export interface NbdServerOptions {
  /** The exports; names must be unique. */
  readonly exports: readonly Export[];
  /** The export a client gets when it asks for the name ''. Default: the first export. */
  readonly defaultExport?: string;
  /** Logger (pino). Default: silent. */
  readonly logger?: Logger;
  /** Limits; missing keys take {@link DEFAULT_LIMITS}. */
  readonly limits?: Partial<ServerLimits>;
  /** Access rules per export name (TLS only, addresses, TLS identities). Default: none. */
  readonly access?: Readonly<Record<string, ExportPolicySpec>>;
  /** The observer of connections and requests (src/metrics). Default: none, and no call is made. */
  readonly metrics?: NbdMetricsSink;
}

/** A listener's settings as its accept callback uses them. */
interface Listener {
  readonly tls: ServerTls;
  readonly rules: AddressRules | null;
  /** Read unix peers' uids (some rule names a uid). */
  readonly readUids: boolean;
  /** How metrics and status name it: `tcp:HOST:PORT`, `unix:PATH` or `fd:N`. */
  readonly label: string;
}

/** How metrics and status name a listener. */
export function listenerLabel(addr: ListenAddress): string {
  return 'path' in addr ? `unix:${addr.path}` : `tcp:${addr.host.includes(':') ? `[${addr.host}]` : addr.host}:${addr.port}`;
}

export class NbdServer implements SessionHost, ExportTable {
  readonly limits: ServerLimits;
  readonly logger: Logger;
  readonly pool = new BufferPool();
  readonly budget: InFlightBudget;
  readonly errorLog = new RequestErrorLog();
  readonly metrics: NbdMetricsSink | null;
  readonly #labels: string[] = [];
  readonly #exports = new Map<string, Export>();
  readonly #policies = new Map<string, ExportPolicy>();
  readonly #defaultName: string;
  readonly #servers: net.Server[] = [];
  readonly #sessions = new Set<NbdSession>();
  readonly #unixPaths: string[] = [];
  #shuttingDown = false;
  #drained: (() => void) | null = null;
  #closing: Promise<void> | null = null;

  constructor(opts: NbdServerOptions) {
    this.limits = validateLimits({ ...DEFAULT_LIMITS, ...opts.limits });
    this.logger = opts.logger ?? pino({ level: 'silent' });
    this.budget = new InFlightBudget(this.limits.maxServerInFlightBytes);
    this.metrics = opts.metrics ?? null;
    for (const e of opts.exports) {
      if (this.#exports.has(e.name)) throw new BlockError('EINVAL', `duplicate export name '${e.name}'`);
      this.#exports.set(e.name, e);
    }
    const first = opts.exports[0];
    if (!first) throw new BlockError('EINVAL', 'at least one export is needed');
    for (const [name, spec] of Object.entries(opts.access ?? {})) {
      if (!this.#exports.has(name)) throw new BlockError('EINVAL', `access rules for '${name}', which is not an export`);
      this.#policies.set(name, new ExportPolicy(spec, `exports '${name}'`));
    }
    this.#defaultName = opts.defaultExport ?? first.name;
    if (!this.#exports.has(this.#defaultName)) {
      throw new BlockError('EINVAL', `default export '${this.#defaultName}' does not exist`);
    }
  }

  get shuttingDown(): boolean {
    return this.#shuttingDown;
  }

  findExport(name: string): Export | undefined {
    return this.#exports.get(name) ?? (name === '' ? this.#exports.get(this.#defaultName) : undefined);
  }

  listExports(): readonly Export[] {
    return [...this.#exports.values()];
  }

  access(exp: Export, client: Client): ExportAccess {
    return this.#policies.get(exp.name)?.access(client) ?? 'ok';
  }

  /**
   * Adds an export while the server runs (a gate appearing as `ggate<unit>`). New
   * handshakes see it at once. EEXIST if the name is taken.
   */
  addExport(exp: Export): void {
    if (this.#exports.has(exp.name)) throw new BlockError('EEXIST', `an export named '${exp.name}' exists`);
    this.#exports.set(exp.name, exp);
  }

  /**
   * Removes an export so no new client can select it. With sessions attached it fails
   * EBUSY unless `force`; forced, those sessions stay connected to the Export object and
   * their requests get whatever its device answers (a destroyed gate: EIO). ENOENT if
   * there is no such export. Its device is not closed here.
   */
  removeExport(name: string, opts: { readonly force?: boolean } = {}): Export {
    const exp = this.#exports.get(name);
    if (!exp) throw new BlockError('ENOENT', `no export named '${name}'`);
    if (exp.sessionCount > 0 && opts.force !== true) {
      throw new BlockError('EBUSY', `export '${name}' has ${exp.sessionCount} session(s) attached`);
    }
    this.#exports.delete(name);
    return exp;
  }

  /** The listeners' labels ({@link listenerLabel}), in the order they started listening. */
  get listenerLabels(): readonly string[] {
    return this.#labels;
  }

  /** Open sessions, for status. */
  sessions(): readonly NbdSession[] {
    return [...this.#sessions];
  }

  /** Open sessions. */
  get sessionCount(): number {
    return this.#sessions.size;
  }

  /** Payload bytes in flight over all sessions (what maxServerInFlightBytes bounds). */
  get inFlightBytes(): number {
    return this.budget.used;
  }

  sessionClosed(session: NbdSession): void {
    this.#sessions.delete(session);
    if (this.#sessions.size === 0 && this.#drained) this.#drained();
  }

  /**
   * Starts listening; resolves with the bound address (port chosen by the OS if 0).
   * Throws EINVAL for bad rules, or uid rules where unix peers' credentials cannot be read.
   */
  async listen(addr: ListenTarget, opts: ListenerOptions = {}): Promise<ListenAddress> {
    const rules = opts.rules ? new AddressRules(opts.rules, 'listener') : null;
    const tls = opts.tls ?? TLS_OFF;
    const wantsUids = (rules?.usesUids ?? false) || [...this.#policies.values()].some((p) => p.usesUids);
    // An inherited socket's family is known only once Node has taken it (below); no
    // connection is accepted before then, since accepting waits for the event loop.
    const listener: { -readonly [K in keyof Listener]: Listener[K] } = { tls, rules: rules && !rules.empty ? rules : null, readUids: false, label: 'fd' in addr ? `fd:${addr.fd}` : listenerLabel(addr) };
    const checkUids = (unix: boolean): void => {
      listener.readUids = unix && wantsUids;
      if (!listener.readUids) return;
      const why = peerCredentialsUnavailable();
      if (why !== null) throw new BlockError('EINVAL', `uid rules need the unix peer's credentials, which cannot be read here: ${why}`);
    };
    if (!('fd' in addr)) checkUids('path' in addr);
    // Paused, so that a session can switch the socket to lent receive buffers before the first read.
    const server = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.#accept(socket, listener));
    server.on('error', (err) => this.logger.error({ err }, 'listener error'));
    // A live server's path is refused (EBUSY), a stale socket file replaced (src/io/listen.ts).
    if ('path' in addr) await claimSocketPath(addr.path);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      if ('fd' in addr) server.listen({ fd: addr.fd }, () => resolve());
      else if ('path' in addr) server.listen(addr.path, () => resolve());
      else server.listen({ host: addr.host, port: addr.port, ipv6Only: addr.host.includes(':') }, () => resolve());
    });
    this.#servers.push(server);
    const bound = server.address();
    // Node knows a TCP socket's address whatever its origin; a pipe taken with { fd } has none (null).
    const inheritedUnix = 'fd' in addr && (bound === null || typeof bound === 'string');
    if ('fd' in addr) {
      try {
        checkUids(inheritedUnix);
      } catch (e) {
        server.close();
        throw e;
      }
    }
    if ('path' in addr) {
      this.#unixPaths.push(addr.path);
      this.#labels.push(listener.label);
      return addr;
    }
    // A pipe taken with { fd } has no address Node can tell (null): named through /proc,
    // or unnamed when /proc cannot tell; the listener serves all the same.
    const result: ListenAddress =
      typeof bound === 'string'
        ? { path: bound }
        : bound === null
          ? { path: 'fd' in addr ? (unixSocketPath(addr.fd) ?? `(descriptor ${addr.fd})`) : '' }
          : { host: bound.address, port: bound.port };
    // The port the OS chose (port 0) is known only now.
    if (!('fd' in addr)) listener.label = listenerLabel(result);
    this.#labels.push(listener.label);
    return result;
  }

  #accept(socket: net.Socket, listener: Listener): void {
    if (this.#shuttingDown) {
      this.metrics?.connectionRefused(listener.label, 'shutdown');
      socket.destroy();
      return;
    }
    const uid = listener.readUids ? peerCredentials(socket)?.uid : undefined;
    if (listener.rules && !listener.rules.admits({ address: socket.remoteAddress, uid })) {
      // Refused before the greeting: a clean close, as for too many connections.
      const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : `unix uid ${uid ?? 'unknown'}`;
      this.logger.info({ peer }, "connection refused by the listener's address rules");
      this.metrics?.connectionRefused(listener.label, 'rules');
      socket.destroy();
      return;
    }
    if (this.#sessions.size >= this.limits.maxConnections) {
      // Refused by closing before the greeting. NBD has no way to refuse a connection
      // before it, and the alternative (greet, then answer the first option with an
      // error) means reading the peer's flags and option for a connection we want to
      // cost nothing; NBD_REP_ERR_SHUTDOWN would also claim a shutdown that is not
      // happening. Clients report a connection closed during the handshake and may retry.
      const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
      this.logger.info({ peer, maxConnections: this.limits.maxConnections }, 'connection refused: too many connections');
      this.metrics?.connectionRefused(listener.label, 'limit');
      socket.destroy();
      return;
    }
    let session: NbdSession;
    try {
      session = new NbdSession(socket, this, { tls: listener.tls, uid, listener: listener.label });
    } catch (err) {
      // A connection that cannot be set up is dropped; the server goes on serving the others.
      this.logger.error({ err }, 'could not start a session');
      socket.destroy();
      return;
    }
    this.#sessions.add(session);
  }

  /**
   * Graceful shutdown: stop accepting; sessions in the handshake are closed, sessions in
   * transmission finish their in-flight requests (new ones get ESHUTDOWN) and close. After
   * `graceMs` the remaining connections are cut. Exports' devices are not closed here.
   */
  close(graceMs = 10_000): Promise<void> {
    // One shutdown however many callers ask: a second call waits for the same one.
    return (this.#closing ??= this.#close(graceMs));
  }

  async #close(graceMs: number): Promise<void> {
    if (!this.#shuttingDown) {
      this.#shuttingDown = true;
      for (const s of this.#servers) s.close();
      for (const p of this.#unixPaths) fs.rmSync(p, { force: true });
    }
    if (this.#sessions.size > 0) {
      const drained = new Promise<void>((resolve) => (this.#drained = resolve));
      await drainSessions(this.#sessions, graceMs, drained);
    }
    await closeListeners(this.#servers);
  }
}
