/**
 * NBD URIs (the NBD project's doc/uri.md): a parser that accepts what libnbd's
 * `nbd_connect_uri` accepts, and a formatter for the inverse. Pure functions: no I/O, no
 * name resolution, nothing read from the files a URI names.
 *
 *     nbd[s]://[user@][host][:port][/export][?query][#fragment]
 *     nbd[s]+unix://[user@][/export]?socket=PATH[&query]
 *
 * What libnbd does was checked against libnbd 1.14.2 (its `nbd_connect_uri`, driven from
 * the Python binding as nbdsh does, against nbdkit servers on TCP and unix sockets, and
 * `nbd_get_uri` for how it prints URIs back). We do the same in these cases:
 *
 * - Schemes are `nbd`, `nbds`, `nbd+unix`, `nbds+unix`, compared case-sensitively (libnbd
 *   refuses `NBD://`). The URI must go on with `://` (libnbd refuses `nbd+unix:?socket=`).
 * - Characters RFC 3986 does not allow (space, non-ASCII, `"<>\^`{|}`, `[` `]` outside
 *   an IPv6 literal) and `%` not followed by two hex digits are refused, as libxml2 does
 *   for libnbd: they must be percent-encoded.
 * - The export name is the path without its first `/`, percent-decoded, with no
 *   dot-segment or `//` normalisation: `nbd://h//abs` is `/abs`, `nbd://h/a/../b` is
 *   `a/../b`, `%2F` is `/`. No path (or `/` alone) is the empty name.
 * - No host means `localhost`. The port defaults to 10809; leading zeros are fine
 *   (`:010811`); an empty port (`host:/`) and a non-numeric one are refused.
 * - IPv6 literals need brackets (`nbd://::1:10811/` is refused) and are kept without
 *   them; a zone (`[fe80::1%25lo]`, RFC 6874) is decoded to `fe80::1%lo`. Host names are
 *   percent-decoded and kept in their case.
 * - The userinfo, percent-decoded and whole (a `:` in it stays: `alice:pw` is the user
 *   name `alice:pw`), is the TLS user name, for unix URIs too (`nbds+unix://alice@/...`),
 *   and is kept on non-TLS schemes as well.
 * - For unix URIs a host and port in the authority are ignored (after the same syntax
 *   checks); `socket` is required, and `socket` on a TCP scheme is refused.
 * - Query parameters are split the way libnbd splits them: at the next `&`, or, when no
 *   `&` is left, at the first `;` (so `a=1;b=2&c=3` is `a` = `1;b=2` and `c` = `3`).
 *   Empty parts and `=value` parts are skipped; a name without `=` has the value ''.
 *   Names and values are percent-decoded; `+` is a plus, not a space. Names are
 *   case-sensitive. When a parameter is repeated the last one wins.
 * - Unknown query parameters (`foo=`, `x-foo=`, `TLS-PSK-FILE=`) are ignored.
 * - `tls-psk-file` and `tls-certificates` are taken (last one wins) on any scheme: on a
 *   non-TLS scheme libnbd keeps them (its `nbd_get_uri` prints them back) but does not
 *   turn TLS on, and neither do we: `tls` is false, the fields are set.
 * - The fragment is ignored.
 *
 * Where we deliberately differ from libnbd 1.14.2:
 *
 * - `nbd+vsock` and `nbds+vsock` are refused (libnbd connects over AF_VSOCK): Node has no
 *   AF_VSOCK sockets.
 * - Port 0 is refused (libnbd takes it as "no port", 10809) and so is a port above
 *   65535 (libnbd hands it on to getaddrinfo, which fails or wraps it).
 * - `nbd://:10811/` is localhost port 10811 (libxml2 drops the port when the host is
 *   empty, and libnbd connects to localhost:10809).
 * - An empty userinfo (`nbd://@host/`) means no user name (libxml2 mis-parses
 *   `nbd://@:10811/` into the user name `@:10811/`).
 * - The contents of an IPv6 literal are checked (libnbd passes `[zz]` on to getaddrinfo);
 *   IPvFuture literals (`[v1.x]`) are refused.
 * - Decoded strings must be UTF-8 (libnbd takes `%FF` as a raw byte; NBD export names
 *   are UTF-8) and must not contain NUL (libnbd cuts a C string there, so `/%00x` is the
 *   export '' for it), except that a `socket` may begin with one NUL: a Linux abstract
 *   socket, which doc/uri.md allows (`socket=%00/abstract`) and libnbd does not support.
 * - Empty values are refused for `socket` (libnbd tries to connect to '' and gets
 *   ECONNREFUSED), `tls-psk-file`, `tls-certificates` and `tls-hostname`.
 * - libnbd 1.14.2 ignores `tls-verify-peer`, `tls-hostname` and `tls-type` (any value,
 *   any scheme, not printed back by `nbd_get_uri`); we parse them as doc/uri.md defines
 *   them. `tls-verify-peer` takes the boolean words nbdkit takes (`1 true t yes y on`,
 *   `0 false f no n off`, any case; doc/uri.md names `0` and `1`); `tls-type` takes
 *   `anon`, `x509` or `psk`. Other values are refused. Like the other tls-* parameters
 *   they are kept on non-TLS schemes too.
 * - libnbd refuses `tls-psk-file` and `tls-certificates` unless the handle allows local
 *   files (`nbd_set_uri_allow_local_file`): that is a caller's policy, not syntax, so we
 *   return them and leave that choice to the caller, who also supplies the default user
 *   name for PSK (libnbd takes the login name) when `tlsUsername` is absent.
 *
 * The formatter writes the shortest URI that parses back to the same value: no `:10809`,
 * no `tls-verify-peer` unless false, `[...]` around IPv6 hosts, and percent-encoding for
 * every character that would otherwise change the meaning (`%`, `?`, `#`, `:` in paths;
 * `&`, `;`, `=`, `+` in query values) or is not allowed raw (spaces, non-ASCII). A value
 * that cannot be written (port 0, an empty host or socket, a NUL in a name, a host with
 * `:` that is not an IPv6 address) is refused with EINVAL.
 */
import { BlockError } from '../errors/index.js';

/** Where an NBD URI says to connect. */
export type NbdTransport =
  | { readonly kind: 'tcp'; readonly host: string; readonly port: number }
  | { readonly kind: 'unix'; readonly path: string };

/** An NBD URI, parsed. Optional fields are absent (not `undefined`) when the URI has none. */
export interface NbdUri {
  /** `nbds` / `nbds+unix`: TLS is required. */
  readonly tls: boolean;
  /** TCP host (IPv6 literals without brackets, `localhost` when the URI has none) and port (10809 by default), or the unix socket. */
  readonly transport: NbdTransport;
  /** The path after its first `/`, percent-decoded; '' when there is none. */
  readonly exportName: string;
  /** The userinfo before `@`: the TLS (PSK) user name. */
  readonly tlsUsername?: string;
  /** `?tls-psk-file=` */
  readonly tlsPskFile?: string;
  /** `?tls-certificates=` */
  readonly tlsCertificates?: string;
  /** `?tls-verify-peer=`; true unless the URI says otherwise. */
  readonly tlsVerifyPeer: boolean;
  /** `?tls-hostname=` */
  readonly tlsHostname?: string;
  /** `?tls-type=` */
  readonly tlsType?: 'anon' | 'x509' | 'psk';
}

/** The NBD port assigned by IANA. */
export const NBD_DEFAULT_PORT = 10809;

const SCHEMES: Readonly<Record<string, { tls: boolean; unix: boolean }>> = {
  nbd: { tls: false, unix: false },
  nbds: { tls: true, unix: false },
  'nbd+unix': { tls: false, unix: true },
  'nbds+unix': { tls: true, unix: true },
};

const TLS_TYPES = ['anon', 'x509', 'psk'] as const;
const TRUE_WORDS = new Set(['1', 'true', 't', 'yes', 'y', 'on']);
const FALSE_WORDS = new Set(['0', 'false', 'f', 'no', 'n', 'off']);

// RFC 3986 character classes.
const UNRESERVED = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~';
const SUB_DELIMS = "!$&'()*+,;=";
/** Every character a URI may hold raw. */
const URI_CHARS = new Set(UNRESERVED + SUB_DELIMS + ':/?#[]@%');
/** What each part may hold raw (besides percent-escapes). */
const USERINFO_RAW = new Set(UNRESERVED + SUB_DELIMS + ':');
const REGNAME_RAW = new Set(UNRESERVED + SUB_DELIMS);
const ZONE_RAW = new Set(UNRESERVED);
const PATH_RAW = new Set(UNRESERVED + SUB_DELIMS + ':@/');
const QUERY_RAW = new Set(UNRESERVED + SUB_DELIMS + ':@/?');
/** What the formatter leaves raw: a subset of the above that keeps every delimiter unambiguous. */
const USERINFO_SAFE = new Set(UNRESERVED + "!$'()*,;=");
const REGNAME_SAFE = REGNAME_RAW;
const ZONE_SAFE = ZONE_RAW;
const PATH_SAFE = new Set(UNRESERVED + SUB_DELIMS + '@/');
const QUERY_SAFE = new Set(UNRESERVED + "!$'()*,/:@");

function invalid(message: string): never {
  throw new BlockError('EINVAL', message);
}

function show(c: string): string {
  const cp = c.codePointAt(0)!;
  return cp < 0x20 || cp === 0x7f || c === ' ' ? `U+${cp.toString(16).toUpperCase().padStart(4, '0')}` : `'${c}'`;
}

/** Refuses raw characters outside `allowed` (percent-escapes were checked for the whole URI already). */
function checkPart(s: string, allowed: ReadonlySet<string>, what: string): void {
  for (const c of s) {
    if (c !== '%' && !allowed.has(c)) invalid(`NBD URI: ${show(c)} is not allowed in the ${what}; percent-encode it`);
  }
}

/** Percent-decodes a checked part; the result must be UTF-8 and, unless allowed, NUL-free. */
function decode(s: string, what: string, nul: 'none' | 'leading' = 'none'): string {
  let out: string;
  try {
    out = decodeURIComponent(s);
  } catch {
    invalid(`NBD URI: the ${what} is not valid UTF-8 once percent-decoded`);
  }
  const at = out.indexOf('\0');
  if (at >= 0 && !(nul === 'leading' && at === 0 && out.indexOf('\0', 1) < 0)) {
    invalid(`NBD URI: the ${what} contains NUL (%00)${nul === 'leading' ? ' other than as its first character (an abstract socket)' : ''}`);
  }
  return out;
}

/** Percent-encodes `s` as UTF-8, leaving the characters of `safe` raw. */
function encode(s: string, safe: ReadonlySet<string>, what: string): string {
  let out = '';
  for (const c of s) {
    if (safe.has(c)) {
      out += c;
      continue;
    }
    try {
      out += encodeURIComponent(c).replace(/[!'()*]/g, (x) => `%${x.charCodeAt(0).toString(16).toUpperCase()}`);
    } catch {
      invalid(`NBD URI: the ${what} is not a well-formed string (lone surrogate)`);
    }
  }
  return out;
}

/** An IPv6 address (RFC 4291 text form, with an optional dotted IPv4 tail), without zone. */
function isIPv6(s: string): boolean {
  let head = s;
  let tailGroups = 0;
  const lastColon = s.lastIndexOf(':');
  if (lastColon >= 0 && s.indexOf('.', lastColon) > lastColon) {
    const v4 = s.slice(lastColon + 1).split('.');
    if (v4.length !== 4 || !v4.every((o) => /^(0|[1-9][0-9]{0,2})$/.test(o) && Number(o) <= 255)) return false;
    head = s.slice(0, lastColon + 1) + '0';
    tailGroups = 1;
  }
  const halves = head.split('::');
  if (halves.length > 2) return false;
  const groups = (h: string) => (h === '' ? [] : h.split(':'));
  const parts = halves.map(groups);
  if (!parts.every((p) => p.every((g) => /^[0-9A-Fa-f]{1,4}$/.test(g)))) return false;
  const count = parts.reduce((n, p) => n + p.length, 0) + tailGroups;
  return halves.length === 2 ? count <= 7 : count === 8;
}

/** `[...]` contents: an IPv6 address with an optional `%25zone`. */
function parseIpLiteral(inner: string): string {
  if (/^v/i.test(inner)) invalid(`NBD URI: IPvFuture address [${inner}] is not supported`);
  const z = inner.indexOf('%25');
  const addr = z < 0 ? inner : inner.slice(0, z);
  if (!isIPv6(addr)) invalid(`NBD URI: [${inner}] is not an IPv6 address`);
  if (z < 0) return addr;
  const zoneRaw = inner.slice(z + 3);
  if (zoneRaw === '') invalid(`NBD URI: the IPv6 zone in [${inner}] is empty`);
  checkPart(zoneRaw, ZONE_RAW, 'IPv6 zone');
  return `${addr}%${decode(zoneRaw, 'IPv6 zone')}`;
}

function parsePort(s: string): number {
  if (s === '') invalid('NBD URI: the port after \':\' is empty');
  if (!/^[0-9]+$/.test(s)) invalid(`NBD URI: port '${s}' is not a decimal number`);
  const port = Number(s);
  if (port < 1 || port > 65535) invalid(`NBD URI: port ${s} is out of range (1-65535)`);
  return port;
}

/** Query parameters split, skipped and decoded as libnbd does (see the header). */
function parseQuery(query: string): Array<[string, string]> {
  const params: Array<[string, string]> = [];
  let rest = query;
  while (rest !== '') {
    let end = rest.indexOf('&');
    if (end < 0) end = rest.indexOf(';');
    if (end < 0) end = rest.length;
    const part = rest.slice(0, end);
    rest = rest.slice(end + 1);
    if (part === '') continue;
    const eq = part.indexOf('=');
    if (eq === 0) continue;
    const name = decode(eq < 0 ? part : part.slice(0, eq), 'query parameter name');
    const value = eq < 0 ? '' : decode(part.slice(eq + 1), `value of ${name}`, name === 'socket' ? 'leading' : 'none');
    params.push([name, value]);
  }
  return params;
}

function parseBool(name: string, value: string): boolean {
  const v = value.toLowerCase();
  if (TRUE_WORDS.has(v)) return true;
  if (FALSE_WORDS.has(v)) return false;
  return invalid(`NBD URI: ${name}=${value} is not a boolean (use true or false, 1 or 0)`);
}

function nonEmpty(name: string, value: string): string {
  if (value === '') invalid(`NBD URI: ${name} is empty`);
  return value;
}

/**
 * Parses an NBD URI. Throws BlockError('EINVAL') naming what is wrong. The header of this
 * module lists what is accepted and where that differs from libnbd.
 */
export function parseNbdUri(uri: string): NbdUri {
  if (typeof uri !== 'string') invalid('NBD URI: not a string');
  const m = /^([A-Za-z][A-Za-z0-9+.-]*):/.exec(uri);
  if (!m) invalid(`NBD URI: '${uri}' has no scheme (expected nbd://, nbds://, nbd+unix:// or nbds+unix://)`);
  const scheme = m[1]!;
  if (/^nbds?\+vsock$/.test(scheme)) invalid(`NBD URI: ${scheme} (AF_VSOCK) is not supported; use nbd://, nbds://, nbd+unix:// or nbds+unix://`);
  const kind = Object.hasOwn(SCHEMES, scheme) ? SCHEMES[scheme] : undefined;
  if (!kind) {
    const lower = scheme.toLowerCase();
    const hint = Object.hasOwn(SCHEMES, lower) ? ` (schemes are case-sensitive: write ${lower})` : ' (expected nbd, nbds, nbd+unix or nbds+unix)';
    invalid(`NBD URI: unknown scheme '${scheme}'${hint}`);
  }
  for (const c of uri) {
    if (!URI_CHARS.has(c)) invalid(`NBD URI: ${show(c)} is not allowed in a URI; percent-encode it`);
  }
  const badEscape = /%(?![0-9A-Fa-f]{2})/.exec(uri);
  if (badEscape) invalid(`NBD URI: '%' at position ${badEscape.index} does not start a percent-escape (%XX); write %25 for '%'`);
  if (!uri.startsWith('://', scheme.length)) invalid(`NBD URI: must begin with '${scheme}://'`);

  let rest = uri.slice(scheme.length + 3);
  const hash = rest.indexOf('#');
  if (hash >= 0) {
    const fragment = rest.slice(hash + 1);
    checkPart(fragment, QUERY_RAW, 'fragment');
    rest = rest.slice(0, hash);
  }
  const qmark = rest.indexOf('?');
  const query = qmark < 0 ? '' : rest.slice(qmark + 1);
  if (qmark >= 0) rest = rest.slice(0, qmark);
  const slash = rest.indexOf('/');
  const authority = slash < 0 ? rest : rest.slice(0, slash);
  const path = slash < 0 ? '' : rest.slice(slash);
  checkPart(path, PATH_RAW, 'path (export name)');
  checkPart(query, QUERY_RAW, 'query');

  // Authority: [userinfo@]host[:port]
  let hostport = authority;
  let tlsUsername: string | undefined;
  const at = authority.lastIndexOf('@');
  if (at >= 0) {
    const userinfo = authority.slice(0, at);
    checkPart(userinfo, USERINFO_RAW, 'user name');
    const user = decode(userinfo, 'user name');
    if (user !== '') tlsUsername = user;
    hostport = authority.slice(at + 1);
  }
  let host: string;
  let portText: string | undefined;
  if (hostport.startsWith('[')) {
    const close = hostport.indexOf(']');
    if (close < 0) invalid(`NBD URI: '[' without ']' in '${hostport}'`);
    host = parseIpLiteral(hostport.slice(1, close));
    const after = hostport.slice(close + 1);
    if (after !== '') {
      if (!after.startsWith(':')) invalid(`NBD URI: unexpected '${after}' after the IPv6 address`);
      portText = after.slice(1);
    }
  } else {
    const colon = hostport.indexOf(':');
    const hostRaw = colon < 0 ? hostport : hostport.slice(0, colon);
    if (colon >= 0) portText = hostport.slice(colon + 1);
    if (portText?.includes(':')) invalid(`NBD URI: more than one ':' in '${hostport}' (write an IPv6 address in brackets: [::1])`);
    checkPart(hostRaw, REGNAME_RAW, 'host name');
    host = decode(hostRaw, 'host name');
  }
  const port = portText === undefined ? NBD_DEFAULT_PORT : parsePort(portText);

  const exportName = path === '' ? '' : decode(path.slice(1), 'export name');

  let socket: string | undefined;
  let tlsPskFile: string | undefined;
  let tlsCertificates: string | undefined;
  let tlsVerifyPeer = true;
  let tlsHostname: string | undefined;
  let tlsType: NbdUri['tlsType'];
  for (const [name, value] of parseQuery(query)) {
    switch (name) {
      case 'socket':
        socket = value;
        break;
      case 'tls-psk-file':
        tlsPskFile = value;
        break;
      case 'tls-certificates':
        tlsCertificates = value;
        break;
      case 'tls-verify-peer':
        tlsVerifyPeer = parseBool(name, value);
        break;
      case 'tls-hostname':
        tlsHostname = value;
        break;
      case 'tls-type':
        if (!(TLS_TYPES as readonly string[]).includes(value)) invalid(`NBD URI: tls-type=${value} is not one of ${TLS_TYPES.join(', ')}`);
        tlsType = value as NbdUri['tlsType'];
        break;
      default:
        break; // libnbd ignores parameters it does not know
    }
  }

  let transport: NbdTransport;
  if (kind.unix) {
    if (socket === undefined) invalid(`NBD URI: ${scheme} needs the socket parameter (${scheme}:///EXPORT?socket=PATH)`);
    transport = { kind: 'unix', path: nonEmpty('socket', socket) };
  } else {
    if (socket !== undefined) invalid(`NBD URI: the socket parameter is only for unix URIs (did you mean ${kind.tls ? 'nbds' : 'nbd'}+unix:///?socket=...?)`);
    transport = { kind: 'tcp', host: host === '' ? 'localhost' : host, port };
  }

  return {
    tls: kind.tls,
    transport,
    exportName,
    ...(tlsUsername !== undefined && { tlsUsername }),
    ...(tlsPskFile !== undefined && { tlsPskFile: nonEmpty('tls-psk-file', tlsPskFile) }),
    ...(tlsCertificates !== undefined && { tlsCertificates: nonEmpty('tls-certificates', tlsCertificates) }),
    tlsVerifyPeer,
    ...(tlsHostname !== undefined && { tlsHostname: nonEmpty('tls-hostname', tlsHostname) }),
    ...(tlsType !== undefined && { tlsType }),
  };
}

function formatHost(host: string): string {
  if (host === '') invalid('NBD URI: the host is empty');
  if (!host.includes(':')) return encode(host, REGNAME_SAFE, 'host name');
  const z = host.indexOf('%');
  const addr = z < 0 ? host : host.slice(0, z);
  if (!isIPv6(addr)) invalid(`NBD URI: host '${host}' has ':' but is not an IPv6 address`);
  if (z < 0) return `[${addr}]`;
  const zone = host.slice(z + 1);
  if (zone === '') invalid(`NBD URI: the IPv6 zone in '${host}' is empty`);
  if (zone.includes('\0')) invalid('NBD URI: the IPv6 zone contains NUL');
  return `[${addr}%25${encode(zone, ZONE_SAFE, 'IPv6 zone')}]`;
}

function checkString(value: unknown, what: string, nul: 'none' | 'leading' = 'none'): string {
  if (typeof value !== 'string') invalid(`NBD URI: the ${what} is not a string`);
  const at = value.indexOf('\0');
  if (at >= 0 && !(nul === 'leading' && at === 0 && value.indexOf('\0', 1) < 0)) invalid(`NBD URI: the ${what} contains NUL`);
  return value;
}

/**
 * Writes an NBD URI that {@link parseNbdUri} (and libnbd, for what it supports) reads back
 * as `u`. Throws BlockError('EINVAL') for a value no URI can express.
 */
export function formatNbdUri(u: NbdUri): string {
  const t = u.transport;
  const unix = t.kind === 'unix';
  let out = `${u.tls ? 'nbds' : 'nbd'}${unix ? '+unix' : ''}://`;
  if (u.tlsUsername !== undefined) {
    if (checkString(u.tlsUsername, 'user name') === '') invalid('NBD URI: the user name is empty');
    out += `${encode(u.tlsUsername, USERINFO_SAFE, 'user name')}@`;
  }
  if (t.kind === 'tcp') {
    out += formatHost(checkString(t.host, 'host name'));
    if (!Number.isInteger(t.port) || t.port < 1 || t.port > 65535) invalid(`NBD URI: port ${String(t.port)} is out of range (1-65535)`);
    if (t.port !== NBD_DEFAULT_PORT) out += `:${t.port}`;
  } else if (t.kind !== 'unix') {
    invalid(`NBD URI: unknown transport kind '${String((t as { kind: unknown }).kind)}'`);
  }
  out += `/${encode(checkString(u.exportName, 'export name'), PATH_SAFE, 'export name')}`;

  const query: string[] = [];
  const param = (name: string, value: string | undefined, nul: 'none' | 'leading' = 'none') => {
    if (value === undefined) return;
    if (checkString(value, name, nul) === '') invalid(`NBD URI: ${name} is empty`);
    query.push(`${name}=${encode(value, QUERY_SAFE, name)}`);
  };
  if (t.kind === 'unix') param('socket', t.path, 'leading');
  param('tls-certificates', u.tlsCertificates);
  param('tls-psk-file', u.tlsPskFile);
  if (u.tlsVerifyPeer === false) query.push('tls-verify-peer=false');
  param('tls-hostname', u.tlsHostname);
  if (u.tlsType !== undefined) {
    if (!(TLS_TYPES as readonly string[]).includes(u.tlsType)) invalid(`NBD URI: tls-type ${String(u.tlsType)} is not one of ${TLS_TYPES.join(', ')}`);
    query.push(`tls-type=${u.tlsType}`);
  }
  return query.length === 0 ? out : `${out}?${query.join('&')}`;
}
