/**
 * Option haggling as a state machine without a socket: the session feeds it the client
 * flags, then each option with its data, and gets back the bytes to send and what to do
 * next. What the haggling has agreed (reply mode, base:allocation selection) lives here
 * until transmission starts; framing, limits on option count and size, and the
 * handshake timeout stay with the session, which owns the socket.
 */
import type { BlockDevice } from '../device/index.js';
import type { Export } from '../export/export.js';
import type { TlsMode } from './tls.js';
import {
  BASE_ALLOCATION,
  MODE,
  NBD_CLIENT_FLAG,
  NBD_FLAG,
  NBD_INFO,
  NBD_OPT,
  NBD_REP,
  optionName,
  type Mode,
} from './constants.js';
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
  isDecodeError,
} from './codec.js';

/** The metadata context id of base:allocation (any non-zero id works; one context exists). */
export const BASE_ALLOCATION_ID = 1;

/** The LIST_META_CONTEXT query that selects every context of the base: namespace. */
const BASE_NAMESPACE = 'base:';

/** What the handshake needs from its server. */
export interface HandshakeHost {
  /** The largest payload this server accepts (ServerLimits.maxPayload), the block size maximum's bound. */
  readonly maxPayload: number;
  /** True once the server is shutting down. */
  readonly shuttingDown: boolean;
  /** The export for a name ('' = the default export), or undefined. */
  findExport(name: string): Export | undefined;
  /** Every export, for NBD_OPT_LIST. */
  listExports(): readonly Export[];
  /** The listener's TLS policy. */
  readonly tlsMode: TlsMode;
  /**
   * Whether this client may open `exp` now: 'ok'; 'tls' if only over TLS and TLS is not
   * on yet; 'denied' if its address or TLS identity is not allowed for the export.
   */
  access(exp: Export): ExportAccess;
}

/** See {@link HandshakeHost.access}. */
export type ExportAccess = 'ok' | 'tls' | 'denied';

/** What the session does after an option (or the client flags). */
export type HandshakeOutcome =
  /** Read the next option. */
  | { readonly kind: 'continue' }
  /** The handshake is over: serve `export` with these transmission flags and reply mode. */
  | {
      readonly kind: 'transmission';
      readonly export: Export;
      readonly flags: number;
      readonly mode: Mode;
      /** True if base:allocation was selected for this export. */
      readonly metaSelected: boolean;
    }
  /** Close without a further word (the spec's hard disconnect); `reason` is for the log, null for none. */
  | { readonly kind: 'hangUp'; readonly reason: string | null }
  /** NBD_OPT_ABORT: the replies (its ACK) are sent, then the connection ends. */
  | { readonly kind: 'abort' }
  /**
   * NBD_OPT_STARTTLS accepted: the ACK is sent in clear, then the TLS handshake runs on
   * the same socket, then {@link Handshake.tlsEstablished} and the options begin again.
   */
  | { readonly kind: 'startTls' };

/** The bytes to send, in order, then the outcome. */
export interface HandshakeStep {
  readonly replies: readonly Buffer[];
  readonly outcome: HandshakeOutcome;
  /** A refusal worth a log line (TLS required, not allowed), or null. */
  readonly refused: string | null;
}

const CONTINUE: HandshakeOutcome = { kind: 'continue' };
const KNOWN_CLIENT_FLAGS = NBD_CLIENT_FLAG.NBD_FLAG_C_FIXED_NEWSTYLE | NBD_CLIENT_FLAG.NBD_FLAG_C_NO_ZEROES;

export class Handshake {
  readonly #host: HandshakeHost;
  #noZeroes = false;
  /** True once STARTTLS has succeeded. */
  #tls = false;
  #mode: Mode = MODE.SIMPLE;
  /** The export name base:allocation was selected for, or null if none. */
  #metaExport: string | null = null;
  /** Replies of the option being handled. */
  #out: Buffer[] = [];
  /** Why the option being handled was refused by policy, for the log. */
  #refused: string | null = null;

  constructor(host: HandshakeHost) {
    this.#host = host;
  }

  /** The reply mode agreed so far. */
  get mode(): Mode {
    return this.#mode;
  }

  /** True once TLS is on. */
  get tls(): boolean {
    return this.#tls;
  }

  /**
   * The TLS handshake after STARTTLS succeeded: the spec has the server forget what was
   * negotiated in clear (reply mode, metadata contexts), since a man in the middle may
   * have chosen it. The client flags stay: they were sent once, before any option.
   */
  tlsEstablished(): void {
    this.#tls = true;
    this.#mode = MODE.SIMPLE;
    this.#metaExport = null;
  }

  /** The client flags that open the haggling: continue, or hang up on unknown ones. */
  clientFlags(flags: number): HandshakeOutcome {
    if ((flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
      // Spec: the server MUST close on unknown client flags. A client without
      // C_FIXED_NEWSTYLE speaks plain newstyle (it SHOULD set it, but need not) and is
      // served: it will send EXPORT_NAME, and hanging up on it would be a hard
      // disconnect the spec does not allow.
      return { kind: 'hangUp', reason: `unknown client flags 0x${flags.toString(16)}, closing` };
    }
    this.#noZeroes = (flags & NBD_CLIENT_FLAG.NBD_FLAG_C_NO_ZEROES) !== 0;
    return CONTINUE;
  }

  /** An option whose data was longer than the server accepts (and was skipped). */
  optionTooLong(option: number): HandshakeStep {
    this.#out = [];
    this.#reply(option, NBD_REP.NBD_REP_ERR_TOO_BIG, 'option data too long');
    return this.#step(CONTINUE);
  }

  /** One option and its data. */
  option(option: number, data: Buffer): HandshakeStep {
    this.#out = [];
    return this.#step(this.#option(option, data));
  }

  #step(outcome: HandshakeOutcome): HandshakeStep {
    const replies = this.#out;
    const refused = this.#refused;
    this.#out = [];
    this.#refused = null;
    return { replies, outcome, refused };
  }

  #reply(option: number, type: number, data?: Buffer | string): HandshakeOutcome {
    if ((type === NBD_REP.NBD_REP_ERR_TLS_REQD || type === NBD_REP.NBD_REP_ERR_POLICY) && typeof data === 'string') {
      this.#refused = `${optionName(option)} refused: ${data}`;
    }
    this.#out.push(encodeOptionReply(option, type, data));
    return CONTINUE;
  }

  #option(option: number, data: Buffer): HandshakeOutcome {
    const O = NBD_OPT;
    const R = NBD_REP;
    if (this.#host.shuttingDown && option !== O.NBD_OPT_ABORT) {
      if (option === O.NBD_OPT_EXPORT_NAME) return { kind: 'hangUp', reason: null };
      return this.#reply(option, R.NBD_REP_ERR_SHUTDOWN, 'server is shutting down');
    }
    if (!this.#tls && this.#host.tlsMode === 'require' && option !== O.NBD_OPT_ABORT && option !== O.NBD_OPT_STARTTLS) {
      // FORCEDTLS: nothing is told in clear, not even which options exist. EXPORT_NAME
      // cannot carry an error: the spec has the server close.
      if (option === O.NBD_OPT_EXPORT_NAME) return { kind: 'hangUp', reason: 'EXPORT_NAME before STARTTLS on a TLS-only listener, closing' };
      return this.#reply(option, R.NBD_REP_ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
    }
    switch (option) {
      case O.NBD_OPT_EXPORT_NAME: {
        if (this.#mode === MODE.EXTENDED) {
          // Forbidden once extended headers are on, and it cannot carry an error: hang up.
          return { kind: 'hangUp', reason: 'EXPORT_NAME after EXTENDED_HEADERS, closing' };
        }
        const name = data.toString('utf8');
        const exp = this.#host.findExport(name);
        if (!exp) return { kind: 'hangUp', reason: `EXPORT_NAME of an unknown export '${name}', closing` };
        const access = this.#host.access(exp);
        if (access !== 'ok') {
          const why = access === 'tls' ? 'needs TLS' : 'is not allowed to this client';
          return { kind: 'hangUp', reason: `EXPORT_NAME of export '${exp.name}', which ${why}, closing` };
        }
        const flags = this.#transmissionFlags(exp);
        this.#out.push(encodeExportNameReply(exp.device.size, flags, this.#noZeroes));
        return this.#transmission(exp, flags);
      }
      case O.NBD_OPT_ABORT:
        this.#reply(option, R.NBD_REP_ACK);
        return { kind: 'abort' };
      case O.NBD_OPT_LIST:
        if (data.length !== 0) return this.#reply(option, R.NBD_REP_ERR_INVALID, 'LIST takes no data');
        // Exports this client may not open are not listed (the spec lets a server hide TLS-only ones).
        for (const exp of this.#host.listExports()) {
          if (this.#host.access(exp) !== 'ok') continue;
          this.#reply(option, R.NBD_REP_SERVER, encodeRepServer(exp.name, exp.description));
        }
        return this.#reply(option, R.NBD_REP_ACK);
      case O.NBD_OPT_STARTTLS:
        if (data.length !== 0) return this.#reply(option, R.NBD_REP_ERR_INVALID, 'STARTTLS takes no data');
        if (this.#tls) return this.#reply(option, R.NBD_REP_ERR_INVALID, 'TLS is already negotiated');
        if (this.#host.tlsMode === 'off') return this.#reply(option, R.NBD_REP_ERR_POLICY, 'TLS is not configured on this server');
        this.#reply(option, R.NBD_REP_ACK);
        return { kind: 'startTls' };
      case O.NBD_OPT_INFO:
      case O.NBD_OPT_GO:
        return this.#infoOrGo(option, data);
      case O.NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.#reply(option, R.NBD_REP_ERR_INVALID, 'STRUCTURED_REPLY takes no data');
        if (this.#mode === MODE.EXTENDED) {
          // The spec's reply for a downgrade from extended headers, which take precedence.
          return this.#reply(option, R.NBD_REP_ERR_EXT_HEADER_REQD, 'extended headers are already negotiated');
        }
        if (this.#mode !== MODE.SIMPLE) {
          return this.#reply(option, R.NBD_REP_ERR_INVALID, 'structured replies are already negotiated');
        }
        this.#mode = MODE.STRUCTURED;
        return this.#reply(option, R.NBD_REP_ACK);
      case O.NBD_OPT_EXTENDED_HEADERS:
        if (data.length !== 0) return this.#reply(option, R.NBD_REP_ERR_INVALID, 'EXTENDED_HEADERS takes no data');
        if (this.#mode === MODE.EXTENDED) {
          return this.#reply(option, R.NBD_REP_ERR_INVALID, 'extended headers are already negotiated');
        }
        // The metadata context selection stays: the spec lets only a later SET_META_CONTEXT
        // (or STARTTLS) replace it, and base:allocation fits either descriptor format.
        this.#mode = MODE.EXTENDED;
        return this.#reply(option, R.NBD_REP_ACK);
      case O.NBD_OPT_LIST_META_CONTEXT:
      case O.NBD_OPT_SET_META_CONTEXT:
        return this.#metaContext(option, data);
      default:
        return this.#reply(option, R.NBD_REP_ERR_UNSUP, `${optionName(option)} is not supported`);
    }
  }

  #infoOrGo(option: number, data: Buffer): HandshakeOutcome {
    const R = NBD_REP;
    const req = decodeInfoRequest(data);
    if (isDecodeError(req)) return this.#reply(option, R.NBD_REP_ERR_INVALID, req.error);
    const exp = this.#host.findExport(req.name);
    if (!exp) return this.#reply(option, R.NBD_REP_ERR_UNKNOWN, `no export named '${req.name}'`);
    const access = this.#host.access(exp);
    if (access === 'tls') return this.#reply(option, R.NBD_REP_ERR_TLS_REQD, `export '${exp.name}' is served only over TLS`);
    if (access === 'denied') return this.#reply(option, R.NBD_REP_ERR_POLICY, `export '${exp.name}' is not allowed to this client`);
    const flags = this.#transmissionFlags(exp);
    const dev = exp.device;
    this.#reply(option, R.NBD_REP_INFO, encodeInfoExport(dev.size, flags));
    if (req.infos.includes(NBD_INFO.NBD_INFO_NAME)) {
      this.#reply(option, R.NBD_REP_INFO, encodeInfoString(NBD_INFO.NBD_INFO_NAME, exp.name));
    }
    if (req.infos.includes(NBD_INFO.NBD_INFO_DESCRIPTION) && exp.description !== '') {
      this.#reply(option, R.NBD_REP_INFO, encodeInfoString(NBD_INFO.NBD_INFO_DESCRIPTION, exp.description));
    }
    // Block sizes are always sent: clients that did not ask may ignore them.
    const bs = this.#blockSize(dev);
    this.#reply(option, R.NBD_REP_INFO, encodeInfoBlockSize(bs.minimum, bs.preferred, bs.maximum));
    this.#reply(option, R.NBD_REP_ACK);
    return option === NBD_OPT.NBD_OPT_GO ? this.#transmission(exp, flags) : CONTINUE;
  }

  #metaContext(option: number, data: Buffer): HandshakeOutcome {
    const R = NBD_REP;
    if (this.#mode === MODE.SIMPLE) {
      return this.#reply(option, R.NBD_REP_ERR_INVALID, 'negotiate structured replies first');
    }
    const set = option === NBD_OPT.NBD_OPT_SET_META_CONTEXT;
    if (set) this.#metaExport = null; // a SET replaces all earlier selections, even if it fails
    const req = decodeMetaContextRequest(data);
    if (isDecodeError(req)) return this.#reply(option, R.NBD_REP_ERR_INVALID, req.error);
    const exp = this.#host.findExport(req.name);
    if (!exp) return this.#reply(option, R.NBD_REP_ERR_UNKNOWN, `no export named '${req.name}'`);
    if (this.#host.access(exp) !== 'ok') {
      // Not TLS_REQD even for a TLS-only export: the spec keeps that for INFO, GO and EXPORT_NAME.
      return this.#reply(option, R.NBD_REP_ERR_POLICY, `export '${exp.name}' is not available to this client`);
    }
    // Which queries select base:allocation: for LIST, none (= all), "base:" (the namespace
    // wildcard) or the full name; for SET, only the full name. Unknown names are ignored.
    const selects = set
      ? req.queries.includes(BASE_ALLOCATION)
      : req.queries.length === 0 || req.queries.some((q) => q === BASE_ALLOCATION || q === BASE_NAMESPACE);
    if (selects) {
      this.#reply(option, R.NBD_REP_META_CONTEXT, encodeRepMetaContext(set ? BASE_ALLOCATION_ID : 0, BASE_ALLOCATION));
      if (set) this.#metaExport = exp.name;
    }
    return this.#reply(option, R.NBD_REP_ACK);
  }

  #blockSize(dev: BlockDevice): { minimum: number; preferred: number; maximum: number } {
    const b = dev.blockSize;
    const maximum = Math.max(Math.min(b.maximum, this.#host.maxPayload), b.preferred);
    return { minimum: b.minimum, preferred: b.preferred, maximum };
  }

  #transmissionFlags(exp: Export): number {
    const F = NBD_FLAG;
    const c = exp.device.capabilities;
    let f = F.NBD_FLAG_HAS_FLAGS | F.NBD_FLAG_SEND_CACHE;
    if (c.flush) f |= F.NBD_FLAG_SEND_FLUSH;
    if (exp.readOnly) {
      f |= F.NBD_FLAG_READ_ONLY;
    } else {
      if (c.fua) f |= F.NBD_FLAG_SEND_FUA;
      if (c.trim) f |= F.NBD_FLAG_SEND_TRIM;
      if (c.zero) {
        f |= F.NBD_FLAG_SEND_WRITE_ZEROES;
        if (c.fastZero) f |= F.NBD_FLAG_SEND_FAST_ZERO;
      }
    }
    if (this.#mode !== MODE.SIMPLE) f |= F.NBD_FLAG_SEND_DF;
    if (c.multiConn) f |= F.NBD_FLAG_CAN_MULTI_CONN;
    return f;
  }

  #transmission(exp: Export, flags: number): HandshakeOutcome {
    // A selection made for another export does not carry over to this one.
    return { kind: 'transmission', export: exp, flags, mode: this.#mode, metaSelected: this.#metaExport === exp.name };
  }
}
