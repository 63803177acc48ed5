/**
 * The client's side of the fixed-newstyle handshake, as a dialogue over a connected
 * socket: the greeting, STARTTLS (X.509 or PSK), extended headers or structured
 * replies, SET_META_CONTEXT, then GO with the block-size and description requests. The
 * fallbacks a client of old servers needs are here too: a server without GO gets
 * EXPORT_NAME, one without extended headers gets structured replies, one without those
 * gets simple replies. Also LIST (with INFO for each export), for `blockgate info --list`.
 *
 * Every length the server sends is checked before anything is allocated for it
 * (MAX_OPTION_REPLY_LENGTH), and every error reply becomes a BlockError with the
 * server's own message.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import type { Socket } from 'node:net';
import { BlockError, type ErrnoCode } from '../errors/index.js';
import { StreamReader } from '../io/stream-reader.js';
import { MODE, NBD_CLIENT_FLAG, NBD_HS_FLAG, NBD_INFO, NBD_MAGIC, NBD_OPT, NBD_REP, NBD_SIZE, optionName, type Mode } from './constants.js';
import { encodeInfoRequest, encodeMetaContextRequest, encodeOption } from './codec.js';
import { parsePskFile, PSK_CIPHERS_TLS12, TLS13_SUITES } from './tls.js';

/** The largest option reply payload accepted (names and descriptions are at most 4 KiB each in practice). */
export const MAX_OPTION_REPLY_LENGTH = 64 * 1024;
/** The most replies one option may produce (LIST entries, META_CONTEXT ids) before the client gives up. */
export const MAX_OPTION_REPLIES = 100_000;
/** The most payload bytes the replies to one option may add up to (each is at most MAX_OPTION_REPLY_LENGTH). */
export const MAX_OPTION_REPLY_TOTAL = 16 * 1024 * 1024;
/** The oldstyle greeting's second magic (this client speaks newstyle only). */
const OLDSTYLE_MAGIC = 0x00420281861253n;

/** How the client authenticates under TLS (libnbd's URI parameters). */
export interface ClientTls {
  /** A psktool file; the key of `username` is used. */
  readonly pskFile?: string | undefined;
  /** PSK identity; default: the local user name, as libnbd. */
  readonly username?: string | undefined;
  /** A directory with ca-cert.pem (to check the server) and optionally client-cert.pem and client-key.pem. */
  readonly certificates?: string | undefined;
  /** Check the server's certificate (default true). */
  readonly verifyPeer?: boolean | undefined;
  /** The name the server's certificate must carry; default: the host connected to. */
  readonly hostname?: string | undefined;
}

export interface ClientHandshakeOptions {
  readonly exportName: string;
  /** null: no TLS (the handshake fails if the server requires it). */
  readonly tls: ClientTls | null;
  /** The host connected to, for certificate checks (undefined on unix sockets). */
  readonly host?: string | undefined;
  /** Ask for extended headers (default true), else structured replies (default true). */
  readonly extendedHeaders?: boolean | undefined;
  readonly structuredReplies?: boolean | undefined;
  /** Metadata contexts to select (default: base:allocation). */
  readonly metaContexts?: readonly string[] | undefined;
}

/** What the handshake agreed. */
export interface NegotiatedExport {
  readonly name: string;
  readonly description: string;
  readonly size: number;
  /** Transmission flags (NBD_FLAG_*). */
  readonly flags: number;
  /** The server's block sizes, or null if it sent none. */
  readonly blockSize: { readonly minimum: number; readonly preferred: number; readonly maximum: number } | null;
  readonly mode: Mode;
  /** Selected metadata contexts: name to id. */
  readonly contexts: ReadonlyMap<string, number>;
  /** The TLS protocol and suite, or null in clear. */
  readonly tls: { readonly protocol: string; readonly cipher: string } | null;
}

/** One entry of NBD_OPT_LIST. */
export interface ListedExport {
  readonly name: string;
  readonly description: string;
}

interface OptionReply {
  readonly option: number;
  readonly type: number;
  readonly data: Buffer;
}

const REP_NAMES: Record<number, string> = Object.fromEntries(Object.entries(NBD_REP).map(([k, v]) => [v, k]));

/** The errno a refused option maps to, for callers that branch on it. */
function optionErrorCode(type: number): ErrnoCode {
  switch (type) {
    case NBD_REP.NBD_REP_ERR_UNSUP:
      return 'EOPNOTSUPP';
    case NBD_REP.NBD_REP_ERR_POLICY:
    case NBD_REP.NBD_REP_ERR_TLS_REQD:
      return 'EPERM';
    case NBD_REP.NBD_REP_ERR_UNKNOWN:
      return 'ENOENT';
    case NBD_REP.NBD_REP_ERR_SHUTDOWN:
      return 'ESHUTDOWN';
    case NBD_REP.NBD_REP_ERR_TOO_BIG:
      return 'EFBIG';
    default:
      return 'EINVAL';
  }
}

/** An option's error reply as a BlockError: `server refused NBD_OPT_GO: no export named 'x' (NBD_REP_ERR_UNKNOWN)`. */
export class OptionRefused extends BlockError {
  /** The NBD_REP_ERR_* value. */
  readonly reply: number;
  constructor(option: number, reply: number, message: string) {
    const name = REP_NAMES[reply] ?? `0x${reply.toString(16)}`;
    const hint = reply === NBD_REP.NBD_REP_ERR_TLS_REQD ? ' (use an nbds:// URI)' : '';
    super(optionErrorCode(reply), `server refused ${optionName(option)}: ${message || 'no message'} (${name})${hint}`);
    this.reply = reply;
  }
}

const isError = (type: number) => (type & 0x80000000) !== 0;

/**
 * A handshake in progress over `socket`. `run` negotiates and resolves with the
 * (possibly TLS) socket, the bytes already read past the handshake, and what was agreed.
 */
export class ClientHandshake {
  #socket: Socket;
  #reader: StreamReader;
  #noZeroes = false;
  #fixed = false;
  /** Why fail() was called (the caller's timeout or abort), so a TLS handshake it cuts reports that, not a close. */
  #failure: Error | null = null;

  constructor(socket: Socket) {
    this.#socket = socket;
    this.#reader = new StreamReader(socket);
  }

  /** Fails the handshake (the caller's timeout): every pending read rejects with `error`. */
  fail(error: Error): void {
    this.#failure ??= error;
    this.#reader.fail(error);
    this.#socket.destroy();
  }

  /** The greeting and client flags; then STARTTLS if asked. */
  async open(tlsOpts: ClientTls | null, host: string | undefined): Promise<void> {
    const g = await this.#reader.read(16);
    if (g.readBigUInt64BE(0) !== NBD_MAGIC.NBDMAGIC) throw new BlockError('EPROTO', 'not an NBD server (no NBDMAGIC greeting)');
    const second = g.readBigUInt64BE(8);
    if (second === OLDSTYLE_MAGIC) throw new BlockError('EPROTO', 'the server speaks the oldstyle protocol, which this client does not');
    if (second !== NBD_MAGIC.IHAVEOPT) throw new BlockError('EPROTO', 'unknown NBD greeting');
    const hs = (await this.#reader.read(2)).readUInt16BE(0);
    this.#fixed = (hs & NBD_HS_FLAG.NBD_FLAG_FIXED_NEWSTYLE) !== 0;
    this.#noZeroes = (hs & NBD_HS_FLAG.NBD_FLAG_NO_ZEROES) !== 0;
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE((this.#fixed ? NBD_CLIENT_FLAG.NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (this.#noZeroes ? NBD_CLIENT_FLAG.NBD_FLAG_C_NO_ZEROES : 0));
    this.#socket.write(flags);
    if (tlsOpts) {
      if (!this.#fixed) throw new BlockError('EPROTO', 'TLS was asked for, but the server does not speak fixed newstyle');
      await this.#startTls(tlsOpts, host);
    }
  }

  /** The socket the transmission phase uses (a TLSSocket after STARTTLS). */
  get socket(): Socket {
    return this.#socket;
  }

  /** TLS protocol and suite, once STARTTLS succeeded. */
  tlsInfo: { protocol: string; cipher: string } | null = null;

  async #startTls(o: ClientTls, host: string | undefined): Promise<void> {
    const replies = await this.#option(NBD_OPT.NBD_OPT_STARTTLS);
    const last = replies[replies.length - 1]!;
    if (last.type !== NBD_REP.NBD_REP_ACK) throw new BlockError('EPROTO', 'unexpected reply to STARTTLS');
    const rest = this.#reader.detach();
    if (rest.length > 0) throw new BlockError('EPROTO', 'the server sent data after STARTTLS before the TLS handshake');
    const raw = this.#socket;
    const opts = clientTlsOptions(o, host);
    const secure = tls.connect({ ...opts, socket: raw });
    this.#socket = secure;
    this.#reader = new StreamReader(secure);
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', () => resolve());
      secure.once('error', (e: Error) => reject(this.#failure ?? new BlockError('ECONNRESET', `TLS handshake failed: ${e.message}`, { cause: e })));
      secure.once('close', () => reject(this.#failure ?? new BlockError('ECONNRESET', 'the server closed the connection during the TLS handshake')));
    });
    this.tlsInfo = { protocol: secure.getProtocol() ?? 'unknown', cipher: secure.getCipher().name };
  }

  /** Sends an option and collects its replies up to the ACK (or the first error, which throws). */
  async #option(option: number, data?: Buffer, collect = true): Promise<OptionReply[]> {
    this.#socket.write(encodeOption(option, data));
    const out: OptionReply[] = [];
    let total = 0;
    for (;;) {
      const r = await this.#reply(option);
      if (isError(r.type)) throw new OptionRefused(option, r.type, r.data.toString('utf8'));
      total += r.data.length;
      if (total > MAX_OPTION_REPLY_TOTAL) throw new BlockError('EPROTO', `more than ${MAX_OPTION_REPLY_TOTAL} bytes of option replies to ${optionName(option)}`);
      if (collect || r.type === NBD_REP.NBD_REP_ACK) out.push(r);
      if (out.length > MAX_OPTION_REPLIES) throw new BlockError('EPROTO', `more than ${MAX_OPTION_REPLIES} replies to ${optionName(option)}`);
      if (r.type === NBD_REP.NBD_REP_ACK) return out;
    }
  }

  async #reply(option: number): Promise<OptionReply> {
    const h = await this.#reader.read(NBD_SIZE.OPTION_REPLY_HEADER);
    if (h.readBigUInt64BE(0) !== NBD_MAGIC.NBD_REP_MAGIC) throw new BlockError('EPROTO', 'bad option reply magic');
    const replyOption = h.readUInt32BE(8);
    const type = h.readUInt32BE(12);
    const length = h.readUInt32BE(16);
    if (replyOption !== option) throw new BlockError('EPROTO', `a reply for ${optionName(replyOption)} to ${optionName(option)}`);
    if (length > MAX_OPTION_REPLY_LENGTH) throw new BlockError('EPROTO', `an option reply of ${length} bytes (at most ${MAX_OPTION_REPLY_LENGTH} accepted)`);
    const data = length > 0 ? Buffer.from(await this.#reader.read(length)) : Buffer.alloc(0);
    return { option, type, data };
  }

  /** Negotiates the reply mode and metadata contexts, then GO (or EXPORT_NAME for an old server). */
  async go(o: ClientHandshakeOptions): Promise<{ negotiated: NegotiatedExport; rest: Buffer }> {
    if (!this.#fixed) return this.#exportName(o.exportName, MODE.SIMPLE, new Map());
    let mode: Mode = MODE.SIMPLE;
    if (o.extendedHeaders !== false && (await this.#tryAck(NBD_OPT.NBD_OPT_EXTENDED_HEADERS))) mode = MODE.EXTENDED;
    else if (o.structuredReplies !== false && (await this.#tryAck(NBD_OPT.NBD_OPT_STRUCTURED_REPLY))) mode = MODE.STRUCTURED;
    const contexts = new Map<string, number>();
    const wanted = o.metaContexts ?? ['base:allocation'];
    if (mode !== MODE.SIMPLE && wanted.length > 0) {
      try {
        const replies = await this.#option(NBD_OPT.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest(o.exportName, wanted));
        for (const r of replies) {
          if (r.type !== NBD_REP.NBD_REP_META_CONTEXT || r.data.length < 4) continue;
          contexts.set(r.data.subarray(4).toString('utf8'), r.data.readUInt32BE(0));
        }
      } catch (e) {
        // A server without metadata contexts serves the export all the same.
        if (!(e instanceof OptionRefused) || e.reply !== NBD_REP.NBD_REP_ERR_UNSUP) throw e;
      }
    }
    let replies: OptionReply[];
    try {
      replies = await this.#option(
        NBD_OPT.NBD_OPT_GO,
        encodeInfoRequest(o.exportName, [NBD_INFO.NBD_INFO_NAME, NBD_INFO.NBD_INFO_DESCRIPTION, NBD_INFO.NBD_INFO_BLOCK_SIZE]),
      );
    } catch (e) {
      if (e instanceof OptionRefused && e.reply === NBD_REP.NBD_REP_ERR_UNSUP && mode === MODE.SIMPLE) return this.#exportName(o.exportName, mode, contexts);
      throw e;
    }
    const info = parseInfos(replies, o.exportName);
    return { negotiated: { ...info, mode, contexts, tls: this.tlsInfo }, rest: this.#reader.detach() };
  }

  /** An option that is either ACKed (true) or refused as unsupported/invalid (false). */
  async #tryAck(option: number): Promise<boolean> {
    try {
      await this.#option(option);
      return true;
    } catch (e) {
      if (e instanceof OptionRefused && (e.reply === NBD_REP.NBD_REP_ERR_UNSUP || e.reply === NBD_REP.NBD_REP_ERR_INVALID || e.reply === NBD_REP.NBD_REP_ERR_POLICY)) return false;
      throw e;
    }
  }

  async #exportName(name: string, mode: Mode, contexts: Map<string, number>): Promise<{ negotiated: NegotiatedExport; rest: Buffer }> {
    this.#socket.write(encodeOption(NBD_OPT.NBD_OPT_EXPORT_NAME, Buffer.from(name, 'utf8')));
    const r = await this.#reader.read(NBD_SIZE.EXPORT_NAME_REPLY + (this.#noZeroes ? 0 : NBD_SIZE.EXPORT_NAME_ZEROES));
    const size = Number(r.readBigUInt64BE(0));
    if (!Number.isSafeInteger(size)) throw new BlockError('EOVERFLOW', `export '${name}' is larger than 2^53 - 1 bytes`);
    const flags = r.readUInt16BE(8);
    return {
      negotiated: { name, description: '', size, flags, blockSize: null, mode, contexts, tls: this.tlsInfo },
      rest: this.#reader.detach(),
    };
  }

  /** NBD_OPT_LIST, then INFO for each export (description, size); ends with ABORT. */
  async list(): Promise<(ListedExport & { size: number | null; flags: number | null })[]> {
    if (!this.#fixed) throw new BlockError('EOPNOTSUPP', 'the server does not speak fixed newstyle, so it cannot list exports');
    const replies = await this.#option(NBD_OPT.NBD_OPT_LIST);
    const listed: ListedExport[] = [];
    for (const r of replies) {
      if (r.type !== NBD_REP.NBD_REP_SERVER) continue;
      if (r.data.length < 4) throw new BlockError('EPROTO', 'a short NBD_REP_SERVER reply');
      const n = r.data.readUInt32BE(0);
      if (n > r.data.length - 4) throw new BlockError('EPROTO', 'an NBD_REP_SERVER name longer than its reply');
      listed.push({ name: r.data.subarray(4, 4 + n).toString('utf8'), description: r.data.subarray(4 + n).toString('utf8') });
    }
    const out: (ListedExport & { size: number | null; flags: number | null })[] = [];
    for (const e of listed) {
      try {
        const info = parseInfos(await this.#option(NBD_OPT.NBD_OPT_INFO, encodeInfoRequest(e.name, [NBD_INFO.NBD_INFO_DESCRIPTION])), e.name);
        out.push({ name: e.name, description: info.description || e.description, size: info.size, flags: info.flags });
      } catch (err) {
        if (!(err instanceof OptionRefused)) throw err;
        out.push({ ...e, size: null, flags: null });
      }
    }
    await this.abort();
    return out;
  }

  /** NBD_OPT_ABORT and close (the server's ACK is optional: waiting for it briefly is enough). */
  async abort(): Promise<void> {
    this.#socket.write(encodeOption(NBD_OPT.NBD_OPT_ABORT));
    this.#socket.end();
  }
}

function parseInfos(replies: readonly OptionReply[], name: string): Omit<NegotiatedExport, 'mode' | 'contexts' | 'tls'> {
  let size: number | null = null;
  let flags = 0;
  let description = '';
  let exportName = name;
  let blockSize: NegotiatedExport['blockSize'] = null;
  for (const r of replies) {
    if (r.type !== NBD_REP.NBD_REP_INFO || r.data.length < 2) continue;
    const d = r.data;
    switch (d.readUInt16BE(0)) {
      case NBD_INFO.NBD_INFO_EXPORT:
        if (d.length < 12) throw new BlockError('EPROTO', 'a short NBD_INFO_EXPORT');
        size = Number(d.readBigUInt64BE(2));
        flags = d.readUInt16BE(10);
        break;
      case NBD_INFO.NBD_INFO_NAME:
        exportName = d.subarray(2).toString('utf8');
        break;
      case NBD_INFO.NBD_INFO_DESCRIPTION:
        description = d.subarray(2).toString('utf8');
        break;
      case NBD_INFO.NBD_INFO_BLOCK_SIZE:
        if (d.length < 14) throw new BlockError('EPROTO', 'a short NBD_INFO_BLOCK_SIZE');
        blockSize = { minimum: d.readUInt32BE(2), preferred: d.readUInt32BE(6), maximum: d.readUInt32BE(10) };
        // The client splits requests by these: a zero or a minimum that is not a power of
        // two would make its request lengths garbage (NaN, sent as 0).
        if (!validBlockSize(blockSize)) {
          throw new BlockError('EPROTO', `a bad NBD_INFO_BLOCK_SIZE (minimum ${blockSize.minimum}, preferred ${blockSize.preferred}, maximum ${blockSize.maximum})`);
        }
        break;
    }
  }
  if (size === null) throw new BlockError('EPROTO', `the server sent no NBD_INFO_EXPORT for '${name}'`);
  if (!Number.isSafeInteger(size)) throw new BlockError('EOVERFLOW', `export '${name}' is larger than 2^53 - 1 bytes`);
  return { name: exportName, description, size, flags, blockSize };
}

const isPowerOfTwo = (n: number) => n > 0 && (n & (n - 1)) === 0;

/** The spec's rules that matter to the client: minimum a power of two up to 64 KiB, preferred a power of two at least the minimum, maximum at least the minimum. */
function validBlockSize(b: { minimum: number; preferred: number; maximum: number }): boolean {
  return isPowerOfTwo(b.minimum) && b.minimum <= 65536 && isPowerOfTwo(b.preferred) && b.preferred >= b.minimum && b.maximum >= b.minimum;
}

/** Node TLS client options for libnbd-style parameters: PSK from a psktool file, or X.509 from a directory. */
export function clientTlsOptions(o: ClientTls, host: string | undefined): tls.ConnectionOptions {
  const base: tls.ConnectionOptions = { minVersion: 'TLSv1.2' };
  if (o.pskFile !== undefined) {
    let text: string;
    try {
      text = fs.readFileSync(o.pskFile, 'utf8');
    } catch (e) {
      throw new BlockError('EINVAL', `PSK file ${o.pskFile}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
    }
    const keys = parsePskFile(text, o.pskFile);
    const identity = o.username ?? os.userInfo().username;
    const psk = keys.get(identity);
    if (!psk) throw new BlockError('EINVAL', `PSK file ${o.pskFile} has no key for '${identity}'`);
    return {
      ...base,
      ciphers: [...TLS13_SUITES, ...PSK_CIPHERS_TLS12].join(':'),
      pskCallback: () => ({ psk, identity }),
      // PSK authenticates the server: there is no certificate to check.
      checkServerIdentity: () => undefined,
    };
  }
  const verify = o.verifyPeer !== false;
  const out: tls.ConnectionOptions = { ...base, rejectUnauthorized: verify };
  const servername = o.hostname ?? host;
  // SNI takes host names only, not IP addresses.
  if (servername !== undefined && !/^[\d.]+$|:/.test(servername)) out.servername = servername;
  if (o.hostname !== undefined) out.checkServerIdentity = (_h, cert) => tls.checkServerIdentity(o.hostname!, cert);
  if (o.certificates !== undefined) {
    const file = (n: string) => path.join(o.certificates!, n);
    const read = (n: string, what: string) => {
      try {
        return fs.readFileSync(file(n));
      } catch (e) {
        throw new BlockError('EINVAL', `${what} ${file(n)}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
      }
    };
    if (fs.existsSync(file('ca-cert.pem'))) out.ca = read('ca-cert.pem', 'CA certificate');
    if (fs.existsSync(file('client-cert.pem'))) {
      out.cert = read('client-cert.pem', 'client certificate');
      out.key = read('client-key.pem', 'client key');
    }
  }
  return out;
}
