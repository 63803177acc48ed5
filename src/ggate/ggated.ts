/**
 * The GEOM Gate network server (FreeBSD's ggated), wire-compatible with ggatec.
 *
 * Each TCP connection goes through the handshake of sbin/ggate/ggated/ggated.c:
 *
 * 1. g_gate_version: wrong magic or version (or a connection that ends or stalls
 *    before 20 bytes) is closed without a reply; otherwise it is echoed with gv_error 0.
 * 2. g_gate_cinit: checked (validateCinit: NUL inside gc_path, UTF-8, nconn 2, exactly
 *    one direction bit, not both access bits), then matched against the exports
 *    (checkExport: IPv4 peers only, reverse file order, EPERM on a mismatch), then paired
 *    by gc_token, then the export is opened. A refusal is an sinit carrying only
 *    gs_error (FreeBSD errno numbers), then the connection is closed. On success the
 *    sinit carries the media size and sector size.
 * 3. Pairing: the first connection of a token waits for its partner at most
 *    HALF_OPEN_TIMEOUT_MS (10 s, ggated's connection_cleanups), then both are dropped.
 *    A second connection of the same direction for a waiting token is refused with
 *    EEXIST (FreeBSD returns EEXIST but its caller tests for -1, leaking the socket); a
 *    partner from another address is refused with EPERM, and one naming another path or
 *    access mode with EINVAL (FreeBSD checks neither). When both halves are there, a
 *    {@link GgateSession} serves them; ggated forks a child at this point.
 *
 * Differences from ggated, all on the side of robustness: requests are validated
 * instead of assert()ed, allocations are capped, nothing from the network can crash the
 * process, the handshake has a deadline (ggated relies on SO_RCVTIMEO, 8 s), half-open
 * pairs expire on a timer rather than at the next accept, and one process serves every
 * client (no fork), so clients of one path share one device stack and one ErrSeq.
 *
 * Over 500 lines: the handshake, the token pairing of two connections and the limits on
 * half-open pairs are one state machine (a pair is only whole once both halves passed
 * every step); the serving itself is in ggated-session.ts.
 */
import net from 'node:net';
import dns from 'node:dns';
import fs from 'node:fs';
import pino, { type Logger } from 'pino';
import { BlockError, toBlockError, type ErrnoCode } from '../errors/index.js';
import type { ErrSeq } from '../errseq/index.js';
import {
  GGATE,
  GGATE_SIZE,
  GGATE_TIMING,
  decodeCinit,
  decodeVersion,
  encodeSinit,
  encodeSinitFailure,
  encodeVersion,
  type GgateCinit,
} from './protocol.js';
import {
  MAX_REQUEST_LENGTH,
  cinitDirection,
  requestedAccess,
  validateCinit,
  validateVersion,
  type GgateAccess,
} from './validate.js';
import {
  checkExport,
  parseExports,
  resolveExports,
  type HostLookup,
  type ResolvedExportEntry,
} from './exports.js';
import { FrameReader } from '../io/framer.js';
import { closeListeners, drainSessions } from '../io/drain.js';
import { GgateExportTable, type GgateFileOpener, type GgateLease, type GgateStackSource } from './ggated-exports.js';
import { GgateSession, ggateGeometry, type GgateSessionHost, type GgateSide } from './ggated-session.js';

export { GgateExportTable, type GgateStackSource, type GgateDeviceSource, type GgateFileOpener, type GgateLease } from './ggated-exports.js';
export { GgateSession, ggateGeometry } from './ggated-session.js';
export { FrameReader } from '../io/framer.js';

/** Limits and timeouts of the ggate server; tests lower them. */
export interface GgatedLimits {
  /** Time from accept until the cinit is in, in ms; then the connection is closed (ggated: SO_RCVTIMEO). */
  readonly handshakeTimeoutMs: number;
  /** How long the first connection of a token waits for its partner, in ms (ggated: 10 s). */
  readonly halfOpenTimeoutMs: number;
  /** Largest gh_length accepted; larger requests get EINVAL (see MAX_REQUEST_LENGTH). */
  readonly maxRequestLength: number;
  /** Tokens waiting for their partner at once; beyond, a new client is refused with ENOMEM. */
  readonly maxHalfOpen: number;
  /**
   * Tokens one peer address may have waiting at once; beyond, that peer's new token is
   * refused with ENOMEM while other peers still get in. A legitimate ggatec has one.
   */
  readonly maxHalfOpenPerPeer: number;
  /** Requests queued per client before the server stops reading its requests. */
  readonly maxQueuedRequests: number;
  /** WRITE payload bytes queued per client before the server stops reading its requests. */
  readonly maxQueuedBytes: number;
  /** Sector size announced for devices with a smaller minimum block (ggated: 512 for files). */
  readonly sectorSize: number;
}

export const DEFAULT_GGATED_LIMITS: GgatedLimits = Object.freeze({
  // ggated's SO_RCVTIMEO: a client that has not sent its version and cinit by then is gone.
  handshakeTimeoutMs: GGATE_TIMING.SOCKET_TIMEOUT_MS,
  // ggated's connection_cleanups age.
  halfOpenTimeoutMs: GGATE_TIMING.HALF_OPEN_TIMEOUT_MS,
  // kern.maxphys, the largest bio a FreeBSD kernel issues by default.
  maxRequestLength: MAX_REQUEST_LENGTH,
  // ggated has no limit (a list that grows until malloc fails); 1024 pairs cost ~2 MiB.
  maxHalfOpen: 1024,
  // One ggatec opens one token at a time (a few while it reconnects); 16 leaves room for
  // several ggatec on one host, and keeps one flooding peer from taking all 1024.
  maxHalfOpenPerPeer: 16,
  // A ggatec queue is 1024 deep by default; 256 queued requests keep the disk busy.
  maxQueuedRequests: 256,
  // 32 full-size writes: bounded per client, enough to stream.
  maxQueuedBytes: 32 * MAX_REQUEST_LENGTH,
  // g_gate_sectorsize() of a regular file.
  sectorSize: 512,
});

export interface GgatedServerOptions {
  /** The exports (parsed and resolved; see {@link loadExportsFile}). */
  readonly exports: readonly ResolvedExportEntry[];
  /** The file {@link GgatedServer.reload} re-reads (the CLI's exports file). */
  readonly exportsFile?: string;
  /** Host-name resolution for reload (default: DNS, IPv4). */
  readonly lookup?: HostLookup;
  /** Paths served by blockgate stacks instead of files (see GgateExportTable). */
  readonly stacks?: ReadonlyMap<string, GgateStackSource> | Readonly<Record<string, GgateStackSource>>;
  /** How file paths are opened (default: the file backend). */
  readonly openFile?: GgateFileOpener;
  /** Logger (pino). Default: silent. */
  readonly logger?: Logger;
  /** Set TCP_NODELAY on every connection (ggated's default; `-n` turns it off). Default true. */
  readonly noDelay?: boolean;
  /** Limits; missing keys take {@link DEFAULT_GGATED_LIMITS}. */
  readonly limits?: Partial<GgatedLimits>;
}

/** Where the server listens (IPv4; ggated binds INADDR_ANY by default). */
export interface GgatedAddress {
  readonly host: string;
  readonly port: number;
}

/** What `status` shows of a connected client. */
export interface GgatedClientStatus {
  readonly id: number;
  readonly peer: string;
  readonly path: string;
  readonly access: GgateAccess;
  readonly token: number;
  /** Requests received and not yet answered. */
  readonly queued: number;
  /** This client's next FLUSH would report a write-back error (peeked, not consumed). */
  readonly errorPending: boolean;
}

/** DNS lookup of one IPv4 address, as ggated's gethostbyname does. */
export const lookupIPv4: HostLookup = async (hostname) => (await dns.promises.lookup(hostname, { family: 4 })).address;

/** Reads, parses and resolves an exports file (throws ExportsError or a BlockError from the read). */
export async function loadExportsFile(file: string, lookup: HostLookup = lookupIPv4): Promise<ResolvedExportEntry[]> {
  let text: string;
  try {
    text = await fs.promises.readFile(file, 'utf8');
  } catch (e) {
    const b = toBlockError(e);
    throw new BlockError(b.code, `cannot open exports file (${file}): ${b.message}`, { cause: e });
  }
  return resolveExports(parseExports(text, file), lookup, file);
}

/** A connection before its pair is complete. */
interface Pending extends GgateSide {
  readonly id: number;
  readonly ip: string;
  state: 'version' | 'cinit' | 'opening' | 'waiting' | 'closed';
  dir: 'send' | 'recv' | null;
  pair: Pair | null;
  timer: NodeJS.Timeout | null;
}

/** The connections of one token while the pair is incomplete. */
interface Pair {
  readonly token: number;
  readonly ip: string;
  readonly path: string;
  readonly access: GgateAccess;
  send: Pending | null;
  recv: Pending | null;
  readonly lease: Promise<GgateLease>;
  readonly timer: NodeJS.Timeout;
  /** Expired, failed or handed over to a session: no longer in the table. */
  done: boolean;
}

let nextConnId = 1;

export class GgatedServer implements GgateSessionHost {
  readonly limits: GgatedLimits;
  readonly logger: Logger;
  readonly table: GgateExportTable;
  readonly #noDelay: boolean;
  readonly #exportsFile: string | undefined;
  readonly #lookup: HostLookup;
  #exports: readonly ResolvedExportEntry[];
  readonly #servers: net.Server[] = [];
  readonly #pending = new Set<Pending>();
  readonly #pairs = new Map<number, Pair>();
  /** Half-open pairs per peer address (entries removed at 0). */
  readonly #halfOpenByPeer = new Map<string, number>();
  readonly #sessions = new Set<GgateSession>();
  #shuttingDown = false;
  #drained: (() => void) | null = null;
  #closing: Promise<void> | null = null;

  constructor(opts: GgatedServerOptions) {
    this.limits = { ...DEFAULT_GGATED_LIMITS, ...opts.limits };
    this.logger = opts.logger ?? pino({ level: 'silent' });
    this.#noDelay = opts.noDelay ?? true;
    this.#exportsFile = opts.exportsFile;
    this.#lookup = opts.lookup ?? lookupIPv4;
    this.#exports = [...opts.exports];
    this.table = new GgateExportTable({
      ...(opts.stacks !== undefined ? { stacks: opts.stacks } : {}),
      ...(opts.openFile !== undefined ? { openFile: opts.openFile } : {}),
      logger: this.logger,
    });
  }

  /** The exports in force (file order). */
  get exports(): readonly ResolvedExportEntry[] {
    return this.#exports;
  }

  /** Replaces the exports; connections already admitted keep their access. */
  setExports(entries: readonly ResolvedExportEntry[]): void {
    this.#exports = [...entries];
    this.logger.info({ count: entries.length }, 'exporting %d object(s)', entries.length);
  }

  /**
   * Re-reads the exports file (SIGHUP in ggated). On a bad file the old exports stay in
   * force and the error is thrown (ggated would exit).
   */
  async reload(): Promise<void> {
    if (this.#exportsFile === undefined) throw new BlockError('EINVAL', 'this server was not given an exports file to reload');
    this.logger.info({ file: this.#exportsFile }, 'reading exports file');
    this.setExports(await loadExportsFile(this.#exportsFile, this.#lookup));
  }

  /** The write-back error sequence of an exported path. */
  errseq(path: string): ErrSeq {
    return this.table.errseq(path);
  }

  get shuttingDown(): boolean {
    return this.#shuttingDown;
  }

  /** Connected clients (complete pairs). */
  get sessionCount(): number {
    return this.#sessions.size;
  }

  /** Tokens waiting for their second connection. */
  get halfOpenCount(): number {
    return this.#pairs.size;
  }

  /** Connections still in the handshake or waiting for a partner. */
  get pendingCount(): number {
    return this.#pending.size;
  }

  /** The connected clients, without consuming any error. */
  clients(): GgatedClientStatus[] {
    return [...this.#sessions].map((s) => ({
      id: s.id,
      peer: s.peer,
      path: s.path,
      access: s.access,
      token: s.token,
      queued: s.queued,
      errorPending: this.table.errseq(s.path).check(s.cursor) !== 0,
    }));
  }

  sessionClosed(session: GgateSession): void {
    this.#sessions.delete(session);
    this.#checkDrained();
  }

  /** Starts listening; resolves with the bound address (the port chosen by the OS if 0). */
  async listen(addr: GgatedAddress = { host: '0.0.0.0', port: GGATE.G_GATE_PORT }): Promise<GgatedAddress> {
    const server = net.createServer({ noDelay: this.#noDelay, pauseOnConnect: false }, (socket) => this.#accept(socket));
    server.on('error', (err) => this.logger.error({ err }, 'listener error'));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host: addr.host, port: addr.port }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.#servers.push(server);
    const a = server.address() as net.AddressInfo;
    this.logger.info({ host: a.address, port: a.port }, 'listening on port %d', a.port);
    return { host: a.address, port: a.port };
  }

  /**
   * Graceful shutdown: stop accepting; connections in the handshake and half-open pairs
   * are closed; clients stop being read, get the replies to requests already received,
   * and are closed. After `graceMs` the rest is cut. Then the stacks the server built are
   * closed.
   */
  close(graceMs = 10_000): Promise<void> {
    // One shutdown however many callers ask: a second call waits for the same one.
    return (this.#closing ??= this.#close(graceMs));
  }

  async #close(graceMs: number): Promise<void> {
    if (!this.#shuttingDown) {
      this.#shuttingDown = true;
      for (const s of this.#servers) s.close();
      for (const p of [...this.#pending]) this.#drop(p, 'server shutting down');
      for (const pair of [...this.#pairs.values()]) this.#dropPair(pair, 'server shutting down');
    }
    if (this.#sessions.size > 0) {
      const drained = new Promise<void>((resolve) => (this.#drained = resolve));
      await drainSessions(this.#sessions, graceMs, drained);
    }
    await closeListeners(this.#servers);
    await this.table.close();
  }

  #checkDrained(): void {
    if (this.#sessions.size === 0 && this.#drained) {
      const d = this.#drained;
      this.#drained = null;
      d();
    }
  }

  // -------------------------------------------------------------------------------
  // Handshake

  #accept(socket: net.Socket): void {
    if (this.#shuttingDown) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(this.#noDelay);
    const reader = new FrameReader(GGATE_SIZE.CINIT_SIZE);
    const c: Pending = {
      id: nextConnId++,
      ip: socket.remoteAddress ?? '',
      socket,
      reader,
      state: 'version',
      dir: null,
      pair: null,
      timer: null,
      onEnd: () => this.#onPendingEnd(c),
      onClose: () => this.#onPendingClose(c),
    };
    this.#pending.add(c);
    const log = this.logger;
    socket.on('data', (chunk: Buffer) => reader.push(chunk));
    socket.on('end', () => c.onEnd());
    socket.on('close', () => c.onClose());
    socket.on('error', (err) => log.debug({ err, conn: c.id }, 'socket error'));
    log.info({ conn: c.id, from: c.ip }, 'connection from %s', c.ip);
    c.timer = setTimeout(() => {
      c.timer = null;
      if (c.state === 'version' || c.state === 'cinit') this.#drop(c, 'handshake timed out');
    }, this.limits.handshakeTimeoutMs);
    reader.expectFixed(GGATE_SIZE.VERSION_SIZE, (buf, off) => this.#onVersion(c, buf, off));
  }

  #onVersion(c: Pending, buf: Buffer, off: number): void {
    const d = decodeVersion(buf, off);
    if (!d.ok) return this.#drop(c, 'malformed version packet');
    const problem = validateVersion(d.value);
    if (problem !== null) {
      // ggated closes without a reply.
      return this.#drop(c, problem === 'magic' ? 'invalid magic field' : `version ${d.value.version} is not supported`);
    }
    c.socket.write(encodeVersion({ version: GGATE.GGATE_VERSION, error: null }));
    c.state = 'cinit';
    c.reader.expectFixed(GGATE_SIZE.CINIT_SIZE, (b, o) => this.#onCinit(c, b, o));
  }

  #onCinit(c: Pending, buf: Buffer, off: number): void {
    const d = decodeCinit(buf, off);
    if (!d.ok) return this.#drop(c, 'malformed initial packet');
    if (c.timer) clearTimeout(c.timer);
    c.timer = null;
    c.state = 'opening';
    // Nothing more is parsed until the pair is complete (the client waits for the sinit).
    c.reader.pause();
    c.socket.pause();
    this.#admit(c, d.value).catch((e: unknown) => {
      // A bug, not a client's doing: refuse this one connection, keep serving.
      this.logger.error({ err: e, conn: c.id }, 'handshake failed');
      this.#refuse(c, 'EIO', 'internal error');
    });
  }

  async #admit(c: Pending, cinit: GgateCinit): Promise<void> {
    const bad = validateCinit(cinit);
    if (bad !== null) return this.#refuse(c, bad, 'malformed initial packet');
    const dir = cinitDirection(cinit.flags)!;
    const access = requestedAccess(cinit.flags);
    const path = cinit.path;
    const check = checkExport(this.#exports, c.ip, path, cinit.flags);
    if (!check.ok) return this.#refuse(c, check.code, check.reason);
    c.dir = dir;

    let pair = this.#pairs.get(cinit.token);
    if (pair) {
      if (pair[dir] !== null) return this.#refuse(c, 'EEXIST', `${dir === 'send' ? 'send' : 'receive'} socket already exists for token ${cinit.token}`);
      if (pair.ip !== c.ip) return this.#refuse(c, 'EPERM', `token ${cinit.token} belongs to another client`);
      if (pair.path !== path || pair.access !== access) {
        return this.#refuse(c, 'EINVAL', `token ${cinit.token} was opened for ${pair.path} (${pair.access}), not ${path} (${access})`);
      }
    } else {
      if (this.#pairs.size >= this.limits.maxHalfOpen) return this.#refuse(c, 'ENOMEM', 'too many half-open connections');
      const mine = this.#halfOpenByPeer.get(c.ip) ?? 0;
      if (mine >= this.limits.maxHalfOpenPerPeer) {
        return this.#refuse(c, 'ENOMEM', `too many half-open connections from ${c.ip} (${mine})`);
      }
      this.#halfOpenByPeer.set(c.ip, mine + 1);
      const lease = this.table.acquire(path, access);
      // Each connection of the pair awaits it; this keeps an early failure from being unhandled.
      lease.catch(() => undefined);
      const token = cinit.token;
      const created: Pair = {
        token,
        ip: c.ip,
        path,
        access,
        send: null,
        recv: null,
        lease,
        timer: setTimeout(() => this.#dropPair(created, 'half-open connection timed out'), this.limits.halfOpenTimeoutMs),
        done: false,
      };
      pair = created;
      this.#pairs.set(token, pair);
    }
    pair[dir] = c;
    c.pair = pair;

    let lease: GgateLease;
    try {
      lease = await pair.lease;
    } catch (e) {
      const be = toBlockError(e);
      if (!pair.done) this.#retirePair(pair);
      return this.#refuse(c, be.code, `cannot open ${path}: ${be.message}`);
    }
    if (c.state === 'closed' || pair.done) return;

    const dev = lease.export.device;
    const g = ggateGeometry(dev.size, dev.blockSize.minimum, this.limits.sectorSize);
    c.socket.write(encodeSinit({ mediasize: g.mediasize, sectorsize: g.sectorsize, error: null }));
    c.state = 'waiting';
    this.logger.debug({ conn: c.id, token: pair.token, dir, path, access }, 'connection added');
    if (dir === 'send') {
      // The server never reads from its send connection; keep it flowing to see EOF.
      c.reader.discard();
      c.reader.resume();
      c.socket.resume();
    }
    if (pair.send?.state === 'waiting' && pair.recv?.state === 'waiting') this.#launch(pair, lease);
  }

  #launch(pair: Pair, lease: GgateLease): void {
    this.#retirePair(pair);
    const send = pair.send!;
    const recv = pair.recv!;
    this.#pending.delete(send);
    this.#pending.delete(recv);
    const session = new GgateSession(this, { send, recv, lease, access: pair.access, token: pair.token, path: pair.path });
    this.#sessions.add(session);
  }

  /** Takes a pair out of the table (its connections are handled by the caller). */
  #retirePair(pair: Pair): void {
    pair.done = true;
    clearTimeout(pair.timer);
    if (this.#pairs.get(pair.token) === pair) {
      this.#pairs.delete(pair.token);
      const n = (this.#halfOpenByPeer.get(pair.ip) ?? 1) - 1;
      if (n > 0) this.#halfOpenByPeer.set(pair.ip, n);
      else this.#halfOpenByPeer.delete(pair.ip);
    }
  }

  /** Drops a half-open pair: both connections closed, the export released. */
  #dropPair(pair: Pair, why: string): void {
    if (pair.done) return;
    this.#retirePair(pair);
    this.logger.info({ token: pair.token, from: pair.ip, path: pair.path }, `connection from %s [%s] removed: ${why}`, pair.ip, pair.path);
    for (const c of [pair.send, pair.recv]) if (c) this.#drop(c, why);
    pair.lease.then((l) => l.release(), () => undefined);
  }

  /** Sends an sinit carrying `code` and closes the connection (ggated's sendfail). */
  #refuse(c: Pending, code: ErrnoCode, why: string): void {
    if (c.state === 'closed') return;
    this.logger.info({ conn: c.id, from: c.ip, code }, `refused: ${why}`);
    if (!c.socket.destroyed && c.socket.writable) c.socket.end(encodeSinitFailure(code));
    c.socket.destroySoon();
    this.#closed(c);
  }

  /** Closes a connection without a reply. */
  #drop(c: Pending, why: string): void {
    if (c.state === 'closed') return;
    this.logger.info({ conn: c.id, from: c.ip }, `closing: ${why}`);
    c.socket.destroy();
    this.#closed(c);
  }

  #onPendingEnd(c: Pending): void {
    // A client that stops sending before its pair is complete cannot finish the handshake
    // (ggated: a short recv is a malformed packet). A waiting send connection ending means
    // the client closed it.
    if (c.state === 'opening') return;
    this.#drop(c, 'client closed the connection');
  }

  #onPendingClose(c: Pending): void {
    this.#closed(c);
  }

  /** Bookkeeping when a connection that is not (yet) part of a session goes away. */
  #closed(c: Pending): void {
    if (c.state === 'closed') return;
    c.state = 'closed';
    if (c.timer) clearTimeout(c.timer);
    c.timer = null;
    c.reader.stop();
    this.#pending.delete(c);
    const pair = c.pair;
    if (pair && !pair.done && c.dir !== null && pair[c.dir] === c) {
      pair[c.dir] = null;
      // Nobody left waiting on this token: release it now rather than at the timeout.
      if (pair.send === null && pair.recv === null) {
        this.#retirePair(pair);
        pair.lease.then((l) => l.release(), () => undefined);
      }
    }
  }
}
