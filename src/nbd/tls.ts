/**
 * TLS for NBD: the listener's policy, its credentials (X.509 in the directory layout
 * nbdkit and qemu use, and PSK files in GnuTLS psktool's format), and the upgrade of a
 * session's socket after NBD_OPT_STARTTLS.
 *
 * Node's `tls` module (OpenSSL) does the TLS. A `TLSSocket` wrapped around an existing
 * socket cannot read into lent buffers (Node passes `onread` only to sockets it creates
 * itself), so a session over TLS parses 'data' chunks: each a fresh buffer, which the
 * session's zero-copy write path may keep (docs/SECURITY.md has the measured cost).
 *
 * PSK: docs/SECURITY.md records which TLS versions and suites Node's PSK support
 * negotiates with libnbd's GnuTLS, as measured by test/interop/tls.test.ts.
 */
import fs from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import type { Socket } from 'node:net';
import { BlockError } from '../errors/index.js';

/** How a listener treats TLS: refused, the client's choice, or required before anything else. */
export type TlsMode = 'off' | 'on' | 'require';
export const TLS_MODES: readonly TlsMode[] = ['off', 'on', 'require'];

/** The files of an X.509 credentials directory (nbdkit's and qemu's names). */
export const TLS_FILES = {
  ca: 'ca-cert.pem',
  cert: 'server-cert.pem',
  key: 'server-key.pem',
  crl: 'ca-crl.pem',
} as const;

/** The largest PSK file read (a line per identity; thousands of identities fit). */
export const MAX_PSK_FILE_BYTES = 1024 * 1024;
/** The longest PSK identity accepted in a file (RFC 4279 allows 2^16 - 1 bytes; GnuTLS user names are short). */
export const MAX_PSK_IDENTITY_BYTES = 128;
/** Key lengths accepted, in bytes (psktool writes 32 by default). */
export const MIN_PSK_KEY_BYTES = 16;
export const MAX_PSK_KEY_BYTES = 64;

/**
 * Cipher suites offered with PSK in TLS 1.2 (OpenSSL names): ephemeral-key PSK first,
 * then plain PSK, as GnuTLS's NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK priority (libnbd's) lists them.
 */
export const PSK_CIPHERS_TLS12 = [
  'ECDHE-PSK-CHACHA20-POLY1305',
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
] as const;

/**
 * TLS 1.3 suites in the server's order of preference (honoured): AES-GCM first, which
 * runs on AES-NI (measured 1.0 GiB/s for AES-128-GCM and 0.86 GiB/s for ChaCha20 on one
 * core here); GnuTLS clients offer their external PSK with SHA-256, so only the SHA-256
 * suites (AES-128-GCM, ChaCha20) can carry a PSK.
 */
export const TLS13_SUITES = ['TLS_AES_128_GCM_SHA256', 'TLS_AES_256_GCM_SHA384', 'TLS_CHACHA20_POLY1305_SHA256'] as const;

/** What a listener needs to serve TLS. */
export interface TlsOptions {
  readonly mode: TlsMode;
  /** A directory with server-cert.pem and server-key.pem (and ca-cert.pem to check client certificates). */
  readonly certificates?: string | undefined;
  /** A psktool-format file of `identity:hexkey` lines. */
  readonly psk?: string | undefined;
  /** Require a client certificate signed by the directory's CA. */
  readonly verifyPeer?: boolean | undefined;
}

/** A listener's loaded TLS configuration. */
export interface ServerTls {
  readonly mode: TlsMode;
  /** Options for the server side of `new tls.TLSSocket`; null when mode is 'off'. */
  readonly socketOptions: tls.TLSSocketOptions | null;
  /** PSK identities and their keys (empty without a PSK file). */
  readonly pskKeys: ReadonlyMap<string, Buffer>;
  readonly verifyPeer: boolean;
}

/** What a session knows of its TLS peer once the handshake is done. */
export interface TlsPeer {
  /** 'TLSv1.3', 'TLSv1.2'. */
  readonly protocol: string;
  /** OpenSSL's name of the negotiated suite. */
  readonly cipher: string;
  /** The PSK identity the client authenticated with, if PSK. */
  readonly pskIdentity?: string | undefined;
  /** The client certificate's subject as `CN=...,O=...` (verified against the CA), if one was sent: for logs and status only. */
  readonly subject?: string | undefined;
  /**
   * The same subject as parsed fields (`CN` -> ['alice']): what access rules match
   * against. Never the string above, in which a `,` inside a value (a CN of
   * `mallory,CN=alice`) would read as a field of its own.
   */
  readonly subjectFields?: ReadonlyMap<string, readonly string[]> | undefined;
}

/** The TLS-off configuration. */
export const TLS_OFF: ServerTls = { mode: 'off', socketOptions: null, pskKeys: new Map(), verifyPeer: false };

/**
 * Parses a psktool file: `identity:hexkey` per line; blank lines and `#` comments are
 * skipped. Throws EINVAL naming the file and line.
 */
export function parsePskFile(text: string, source = 'PSK file'): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const lines = text.split('\n');
  lines.forEach((raw, i) => {
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '' || line.trimStart().startsWith('#')) return;
    const where = `${source} line ${i + 1}`;
    const colon = line.lastIndexOf(':');
    if (colon <= 0) throw new BlockError('EINVAL', `${where}: expected identity:hexkey`);
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1).trim();
    if (Buffer.byteLength(identity) > MAX_PSK_IDENTITY_BYTES) {
      throw new BlockError('EINVAL', `${where}: identity longer than ${MAX_PSK_IDENTITY_BYTES} bytes`);
    }
    if (!/^([0-9a-fA-F]{2})+$/.test(hex)) throw new BlockError('EINVAL', `${where}: the key is not an even number of hex digits`);
    const key = Buffer.from(hex, 'hex');
    if (key.length < MIN_PSK_KEY_BYTES || key.length > MAX_PSK_KEY_BYTES) {
      throw new BlockError('EINVAL', `${where}: a key of ${key.length} bytes (expected ${MIN_PSK_KEY_BYTES}..${MAX_PSK_KEY_BYTES}; psktool makes 32)`);
    }
    if (keys.has(identity)) throw new BlockError('EINVAL', `${where}: identity '${identity}' appears twice`);
    keys.set(identity, key);
  });
  if (keys.size === 0) throw new BlockError('EINVAL', `${source}: no identity:hexkey line`);
  return keys;
}

function readCredential(file: string, what: string, limit = MAX_PSK_FILE_BYTES): Buffer {
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new BlockError('EINVAL', `${what} ${file}: ${code === 'ENOENT' ? 'no such file' : `cannot read (${code})`}`, { cause: e });
  }
  if (!st.isFile()) throw new BlockError('EINVAL', `${what} ${file}: not a regular file`);
  if (st.size > limit) throw new BlockError('EINVAL', `${what} ${file}: larger than ${limit} bytes`);
  try {
    return fs.readFileSync(file);
  } catch (e) {
    throw new BlockError('EINVAL', `${what} ${file}: cannot read (${(e as NodeJS.ErrnoException).code})`, { cause: e });
  }
}

/**
 * Loads a listener's TLS credentials and checks that they fit the policy: 'on' and
 * 'require' need certificates or a PSK file. Throws EINVAL naming the missing or
 * unreadable file, or what OpenSSL said about its content.
 */
export function loadTls(opts: TlsOptions): ServerTls {
  const mode = opts.mode;
  if (mode === 'off') {
    if (opts.certificates !== undefined || opts.psk !== undefined || opts.verifyPeer) {
      throw new BlockError('EINVAL', 'TLS credentials were given with --tls off; use --tls on or --tls require');
    }
    return TLS_OFF;
  }
  if (opts.certificates === undefined && opts.psk === undefined) {
    throw new BlockError('EINVAL', `--tls ${mode} needs --tls-certificates DIR or --tls-psk FILE`);
  }
  if (opts.verifyPeer && opts.certificates === undefined) {
    throw new BlockError('EINVAL', '--tls-verify-peer checks client certificates against DIR/ca-cert.pem: give --tls-certificates DIR');
  }
  const o: tls.TLSSocketOptions & tls.SecureContextOptions = {
    isServer: true,
    minVersion: 'TLSv1.2',
    honorCipherOrder: true,
    ciphers: [...TLS13_SUITES, tls.DEFAULT_CIPHERS].join(':'),
  };
  if (opts.certificates !== undefined) {
    const dir = opts.certificates;
    const file = (name: string) => path.join(dir, name);
    const cert = readCredential(file(TLS_FILES.cert), 'server certificate');
    const key = readCredential(file(TLS_FILES.key), 'server key');
    const caPath = file(TLS_FILES.ca);
    const hasCa = fs.existsSync(caPath);
    if (opts.verifyPeer && !hasCa) throw new BlockError('EINVAL', `CA certificate ${caPath}: no such file (needed by --tls-verify-peer)`);
    const ca = hasCa ? readCredential(caPath, 'CA certificate') : undefined;
    const crlPath = file(TLS_FILES.crl);
    const crl = fs.existsSync(crlPath) ? readCredential(crlPath, 'CRL') : undefined;
    try {
      // Built here so that a bad PEM fails at start-up, not at the first client.
      tls.createSecureContext({ cert, key, ...(ca ? { ca } : {}), ...(crl ? { crl } : {}) });
    } catch (e) {
      throw new BlockError('EINVAL', `TLS certificates in ${dir}: ${(e as Error).message}`, { cause: e });
    }
    Object.assign(o, { cert, key, ...(ca ? { ca } : {}), ...(crl ? { crl } : {}) });
    if (opts.verifyPeer) Object.assign(o, { requestCert: true, rejectUnauthorized: true });
  }
  let pskKeys: Map<string, Buffer> = new Map();
  if (opts.psk !== undefined) {
    const text = readCredential(opts.psk, 'PSK file').toString('utf8');
    pskKeys = parsePskFile(text, opts.psk);
    const keys = pskKeys;
    const identities = pskIdentities;
    // Without certificates only PSK suites can work in TLS 1.2; with them, both kinds.
    const suites = [...TLS13_SUITES, ...PSK_CIPHERS_TLS12, ...(opts.certificates !== undefined ? [tls.DEFAULT_CIPHERS] : [])].join(':');
    Object.assign(o, {
      ciphers: suites,
      pskCallback: (socket: tls.TLSSocket, identity: string) => {
        const key = keys.get(identity);
        if (key) identities.set(socket, identity);
        return key ?? null;
      },
    });
  }
  return { mode, socketOptions: o, pskKeys, verifyPeer: opts.verifyPeer === true };
}

/**
 * Wraps a session's socket in a server-side TLS socket. The handshake starts when the
 * peer's ClientHello arrives; 'secure' or 'error' follow.
 */
export function upgradeToTls(socket: Socket, config: ServerTls): tls.TLSSocket {
  if (config.socketOptions === null) throw new BlockError('EINVAL', 'TLS is off on this listener');
  return new tls.TLSSocket(socket, config.socketOptions);
}

/**
 * Why the client's certificate failed verification, or null if it passed; for sockets
 * of a listener with verifyPeer. Node checks the result of OpenSSL's verification only
 * for sockets a `tls.Server` accepted: on a TLSSocket built around an existing socket
 * (ours, after STARTTLS) OpenSSL refuses a client with no certificate, but an expired one
 * or one from another CA completes the handshake with the failure merely recorded. This
 * reads that record the way Node's own server does, through the undocumented
 * `_handle.verifyError()`; if it is not there (a future Node), every certificate is
 * refused (fail closed) rather than every one accepted.
 */
export function peerVerifyError(socket: tls.TLSSocket): string | null {
  const handle = (socket as unknown as { _handle?: { verifyError?: () => (Error & { code?: string }) | null } })._handle;
  if (!handle || typeof handle.verifyError !== 'function') return 'UNABLE_TO_CHECK_CERTIFICATE (this Node has no verifyError)';
  const e = handle.verifyError();
  return e ? (e.code ?? e.message) : null;
}

/** The PSK identity each TLS socket authenticated with (set by the PSK callback, which has no other way to tell). */
const pskIdentities = new WeakMap<tls.TLSSocket, string>();

/** What the session records of a finished handshake. */
export function describeTlsPeer(socket: tls.TLSSocket): TlsPeer {
  const pskIdentity = pskIdentities.get(socket);
  const cipher = socket.getCipher();
  const cert = socket.getPeerCertificate();
  const subject = cert && cert.subject ? formatSubject(cert.subject) : undefined;
  const subjectFields = cert && cert.subject ? subjectFieldsOf(cert.subject) : undefined;
  return {
    protocol: socket.getProtocol() ?? 'unknown',
    cipher: cipher.name,
    ...(pskIdentity !== undefined ? { pskIdentity } : {}),
    ...(subject ? { subject } : {}),
    ...(subjectFields ? { subjectFields } : {}),
  };
}

/** Node's parsed subject as a map of field name to values (a field may repeat). */
export function subjectFieldsOf(subject: Record<string, string | string[] | undefined>): Map<string, string[]> {
  const m = new Map<string, string[]>();
  for (const [k, v] of Object.entries(subject)) {
    if (v === undefined) continue;
    m.set(k, Array.isArray(v) ? [...v] : [v]);
  }
  return m;
}

/** `CN=alice,O=example` from Node's parsed subject (multi-valued fields joined with '+'). */
export function formatSubject(subject: Record<string, string | string[] | undefined>): string {
  return Object.entries(subject)
    .filter((e): e is [string, string | string[]] => e[1] !== undefined)
    .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join('+') : v}`)
    .join(',');
}
