/**
 * The ggated exports file (default /etc/gg.exports), parsed and matched the way FreeBSD's
 * ggated does it (sbin/ggate/ggated/ggated.c: exports_get, line_parse, exports_find,
 * exports_check), W6:
 *
 * - one export per line: `<ip-or-host>[/<maskbits>] <access> <path>`, fields separated
 *   by runs of spaces and tabs, exactly three fields;
 * - leading spaces and tabs are skipped; a line that is then empty or starts with `#` is
 *   ignored (a `#` later in a line is not a comment: it makes a fourth field);
 * - access is `RO` or `RD` (read-only), `WO` (write-only) or `RW`, case-insensitive;
 * - the address is what inet_addr(3) accepts (so `10.1` and `0x0a000001` too); anything
 *   else is a host name, resolved later by {@link resolveExports};
 * - `/bits` is a netmask length 0..32 (default 32); the entry's network is address & mask;
 * - the path is shorter than MAXPATHLEN (1024 bytes) and is compared exactly (strcmp);
 * - a file with no export is an error;
 * - ggated pushes each entry on the head of a list, so entries are tried in *reverse*
 *   file order: the last matching line decides. The first entry whose network and path
 *   match decides alone: if it does not allow the requested access the answer is EPERM,
 *   without looking at earlier lines. No match at all is EPERM too.
 *
 * FreeBSD exits on a bad line; here parsing throws an {@link ExportsError} (EINVAL) that
 * names the file, the line and the reason. Where FreeBSD's C parsing is accidental, this
 * parser is stricter and says so: the mask must be decimal digits only (strtoul would
 * accept `8abc` as 8 and wrap `4294967296` to 0); a carriage return or a NUL byte in a line
 * is an error (FreeBSD would keep the `\r` in the path, which then never matches, and
 * reports a NUL as a too-long line); a comment line longer than the line limit is still a
 * comment (fgets would split it and parse the rest as an export). Resolution failures
 * are reported by {@link resolveExports} rather than while parsing.
 */
import { BlockError } from '../errors/index.js';
import type { ErrnoCode } from '../errors/index.js';
import type { U64 } from './protocol.js';
import { requestedAccess, type GgateAccess } from './validate.js';

/** ggated's limits and defaults for the exports file. */
export const GGATED_EXPORTS = {
  /** Default exports file (GGATED_EXPORT_FILE). */
  GGATED_EXPORT_FILE: '/etc/gg.exports',
  /**
   * fgets buffer size (EXPORTS_LINE_SIZE). A line is read whole only if it and its
   * newline fit in 2047 bytes, so its text may be at most 2046 bytes.
   */
  EXPORTS_LINE_SIZE: 2048,
  /** A path must be shorter than MAXPATHLEN bytes. */
  MAXPATHLEN: 1024,
  /** Largest netmask length. */
  MAX_MASK_BITS: 32,
} as const;

/** Longest line text, in bytes, that fgets reads whole into EXPORTS_LINE_SIZE. */
const MAX_LINE_BYTES = GGATED_EXPORTS.EXPORTS_LINE_SIZE - 2;

/**
 * inet_addr(3) returns INADDR_NONE (255.255.255.255) both for errors and for that very
 * address, so ggated cannot accept it, however it is spelt or resolved.
 */
const INADDR_NONE = 0xffff_ffff;

/** One line of the exports file. */
export interface ExportEntry {
  /** 1-based line number in the file. */
  readonly line: number;
  /** The address or host name as written (before any `/`). */
  readonly host: string;
  /** The IPv4 address as a u32 (a.b.c.d = a<<24 | ...), or null for a host name not yet resolved. */
  readonly address: number | null;
  /** Netmask length, 0..32. */
  readonly maskBits: number;
  /** Netmask as a u32. */
  readonly mask: number;
  /** What the export allows. */
  readonly access: GgateAccess;
  /** The exported path, compared byte for byte with gc_path. */
  readonly path: string;
}

/** An entry whose address is known. */
export interface ResolvedExportEntry extends ExportEntry {
  readonly address: number;
}

/** A bad exports file: EINVAL, with where and why. */
export class ExportsError extends BlockError {
  /** The file name given to the parser. */
  readonly file: string;
  /** 1-based line, or undefined when the file as a whole is wrong (no exports). */
  readonly line: number | undefined;
  /** The reason, without the location. */
  readonly reason: string;

  constructor(file: string, line: number | undefined, reason: string) {
    super('EINVAL', line === undefined ? `${file}: ${reason}` : `${file}:${line}: ${reason}`);
    this.file = file;
    this.line = line;
    this.reason = reason;
  }
}

// ---------------------------------------------------------------------------------
// Addresses

const U64_MASK = (1n << 64n) - 1n;

function isDigit(c: string | undefined): c is string {
  return c !== undefined && c >= '0' && c <= '9';
}

function hexValue(c: string | undefined): number | undefined {
  return c !== undefined && /^[0-9a-fA-F]$/.test(c) ? parseInt(c, 16) : undefined;
}

/** C isspace() in the "C" locale. */
function isSpace(c: string): boolean {
  return c === ' ' || c === '\t' || c === '\n' || c === '\v' || c === '\f' || c === '\r';
}

/**
 * FreeBSD's inet_aton(3) (lib/libc/inet/inet_addr.c), which inet_addr(3) and so ggated
 * use: 1 to 4 dot-separated parts, each decimal, octal (leading 0) or hex (0x); all
 * parts but the last must be at most 255, the last fills the remaining bytes; trailing
 * white space is allowed. Arithmetic is on a 64-bit u_long, truncated to 32 bits at the
 * end, as on amd64. Returns the address as a u32, or null if it is not one.
 */
export function inetAton(text: string): number | null {
  const parts: number[] = [];
  let i = 0;
  let val = 0n;
  let digit = false;
  for (;;) {
    if (!isDigit(text[i])) return null;
    val = 0n;
    let base = 10n;
    digit = false;
    if (text[i] === '0') {
      i++;
      if (text[i] === 'x' || text[i] === 'X') {
        base = 16n;
        i++;
      } else {
        base = 8n;
        digit = true;
      }
    }
    for (;;) {
      const c = text[i];
      if (isDigit(c)) {
        if (base === 8n && (c === '8' || c === '9')) return null;
        val = (val * base + BigInt(c.charCodeAt(0) - 48)) & U64_MASK;
        digit = true;
        i++;
        continue;
      }
      const h = base === 16n ? hexValue(c) : undefined;
      if (h === undefined) break;
      val = ((val << 4n) | BigInt(h)) & U64_MASK;
      digit = true;
      i++;
    }
    if (text[i] !== '.') break;
    if (parts.length >= 3 || val > 0xffn) return null;
    parts.push(Number(val));
    i++;
  }
  const rest = text[i];
  if (rest !== undefined && !isSpace(rest)) return null;
  if (!digit) return null;
  const limit = [0xffff_ffffn, 0xff_ffffn, 0xffffn, 0xffn][parts.length] ?? 0n;
  // One part: no range check in C (a u_long), the address is its low 32 bits.
  if (parts.length > 0 && val > limit) return null;
  let address = Number(val & 0xffff_ffffn);
  parts.forEach((p, k) => {
    address += p * 2 ** (24 - 8 * k);
  });
  return address >>> 0;
}

/** A u32 address as a.b.c.d. */
export function formatIPv4(address: number): string {
  return [address >>> 24, (address >>> 16) & 0xff, (address >>> 8) & 0xff, address & 0xff].join('.');
}

/** The u32 netmask of a prefix length (ggated's countmask). */
export function maskFromBits(bits: number): number {
  return bits === 0 ? 0 : (0xffff_ffff << (32 - bits)) >>> 0;
}

/**
 * A peer address as Node reports it: plain dotted-quad IPv4, or an IPv4-mapped IPv6
 * address `::ffff:a.b.c.d` (what a dual-stack socket reports for an IPv4 peer). Any other
 * IPv6 address is null: ggated serves IPv4 only.
 */
export function parseClientIPv4(address: string): number | null {
  const m = /^(?:::ffff:)?(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/i.exec(address);
  if (m === null) return null;
  let out = 0;
  for (let k = 1; k <= 4; k++) {
    const part = Number(m[k]);
    if (part > 255) return null;
    out = out * 256 + part;
  }
  return out;
}

// ---------------------------------------------------------------------------------
// Parsing

function parseAccess(word: string): GgateAccess | null {
  switch (word.toLowerCase()) {
    case 'ro':
    case 'rd':
      return 'ro';
    case 'wo':
      return 'wo';
    case 'rw':
      return 'rw';
    default:
      return null;
  }
}

function parseLine(text: string, line: number, file: string): ExportEntry {
  const fail: (reason: string) => never = (reason) => {
    throw new ExportsError(file, line, reason);
  };
  if (text.includes('\r')) fail('carriage return in line (CRLF line endings are not supported)');
  if (text.includes('\0')) fail('NUL byte in line');
  if (Buffer.byteLength(text, 'utf8') > MAX_LINE_BYTES) fail(`line too long (more than ${MAX_LINE_BYTES} bytes)`);

  const words = text.split(/[ \t]+/).filter((w) => w !== '');
  // FreeBSD reports per field as it goes, so a bad first field wins over a wrong count.
  const [first = '', accessWord, path] = words;

  const slash = first.indexOf('/');
  const host = slash === -1 ? first : first.slice(0, slash);
  if (host === '') fail('invalid IP/host name (empty)');
  const literal = inetAton(host);
  if (literal === INADDR_NONE) fail(`invalid IP/host name '${host}' (255.255.255.255 is INADDR_NONE)`);
  let maskBits: number = GGATED_EXPORTS.MAX_MASK_BITS;
  if (slash !== -1) {
    const bits = first.slice(slash + 1);
    if (!/^[0-9]+$/.test(bits) || Number(bits) > GGATED_EXPORTS.MAX_MASK_BITS) {
      fail(`invalid IP mask value '${bits}' (expected 0..${GGATED_EXPORTS.MAX_MASK_BITS})`);
    }
    maskBits = Number(bits);
  }
  // Not an inet_addr literal: a host name, left for resolveExports (ggated calls gethostbyname).
  const address = literal;

  if (accessWord === undefined) fail('too few fields (expected: host[/bits] RO|RD|WO|RW path)');
  const access = parseAccess(accessWord);
  if (access === null) fail(`invalid access '${accessWord}' (expected RO, RD, WO or RW)`);

  if (path === undefined) fail('too few fields (expected: host[/bits] RO|RD|WO|RW path)');
  if (Buffer.byteLength(path, 'utf8') >= GGATED_EXPORTS.MAXPATHLEN) {
    fail(`path too long (${GGATED_EXPORTS.MAXPATHLEN} bytes or more)`);
  }
  if (words.length > 3) fail('too many fields (expected: host[/bits] RO|RD|WO|RW path)');

  return { line, host, address, maskBits, mask: maskFromBits(maskBits), access, path };
}

/**
 * Parses the text of an exports file. Returns the entries in file order (matching walks
 * them from the end). Throws {@link ExportsError} on the first bad line, or if the file
 * exports nothing.
 */
export function parseExports(text: string, file = '<exports>'): ExportEntry[] {
  const lines = text.split('\n');
  // A final newline ends the last line; it does not start another one.
  if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
  const entries: ExportEntry[] = [];
  lines.forEach((raw, index) => {
    const body = raw.replace(/^[ \t]+/, '');
    if (body === '' || body.startsWith('#')) return;
    entries.push(parseLine(raw, index + 1, file));
  });
  if (entries.length === 0) throw new ExportsError(file, undefined, 'there are no objects to export');
  return entries;
}

/** Resolves a host name to one IPv4 address in dotted-quad form (e.g. dns.promises.lookup with family 4). */
export type HostLookup = (hostname: string) => Promise<string>;

/**
 * Resolves the host-name entries of a parsed file with `lookup` (each distinct name
 * once); literal addresses are kept. A name that does not resolve to an IPv4 address
 * (or resolves to 255.255.255.255) fails the whole file, like ggated's "Invalid IP/host
 * name at line N": the first such line in file order is reported.
 */
export async function resolveExports(
  entries: readonly ExportEntry[],
  lookup: HostLookup,
  file = '<exports>',
): Promise<ResolvedExportEntry[]> {
  const names = [...new Set(entries.filter((e) => e.address === null).map((e) => e.host))];
  const settled = await Promise.allSettled(names.map((name) => lookup(name)));
  const resolved = new Map<string, number | string>();
  names.forEach((name, k) => {
    const r = settled[k];
    if (r === undefined || r.status === 'rejected') {
      const reason: unknown = r?.status === 'rejected' ? r.reason : undefined;
      resolved.set(name, reason instanceof Error ? reason.message : String(reason));
      return;
    }
    const address = parseClientIPv4(r.value);
    if (address === null) resolved.set(name, `resolved to '${r.value}', not an IPv4 address`);
    else if (address === INADDR_NONE) resolved.set(name, 'resolved to 255.255.255.255 (INADDR_NONE)');
    else resolved.set(name, address);
  });
  return entries.map((e) => {
    if (e.address !== null) return { ...e, address: e.address };
    const r = resolved.get(e.host);
    if (typeof r !== 'number') throw new ExportsError(file, e.line, `invalid IP/host name '${e.host}': ${r ?? 'not resolved'}`);
    return { ...e, address: r };
  });
}

// ---------------------------------------------------------------------------------
// Matching

/** The result of {@link checkExport}. */
export type ExportCheck =
  | {
      readonly ok: true;
      /** The entry that decided. */
      readonly entry: ResolvedExportEntry;
      /** The mode to open the export with: the client's request (never wider than the entry). */
      readonly access: GgateAccess;
    }
  | {
      readonly ok: false;
      /** The errno for the sinit: EPERM. */
      readonly code: ErrnoCode;
      /** The entry that decided, if one matched address and path. */
      readonly entry: ResolvedExportEntry | undefined;
      /** For the log, as ggated words it. */
      readonly reason: string;
    };

/** Whether an export allows a requested mode (ggated's exports_check). */
export function accessAllowed(exported: GgateAccess, requested: GgateAccess): boolean {
  switch (requested) {
    case 'ro':
      return exported !== 'wo';
    case 'wo':
      return exported !== 'ro';
    case 'rw':
      return exported === 'rw';
  }
}

/**
 * Decides whether a client may open `path` with the access bits of its gc_flags
 * (RDONLY takes precedence over WRONLY, neither is read-write). `client` is the peer's
 * address as Node reports it; IPv4-mapped IPv6 addresses count as IPv4, other IPv6
 * addresses match nothing.
 */
export function checkExport(
  exports: readonly ResolvedExportEntry[],
  client: string,
  path: string,
  requestedFlags: U64,
): ExportCheck {
  const requested = requestedAccess(requestedFlags);
  const ip = parseClientIPv4(client);
  if (ip === null) return { ok: false, code: 'EPERM', entry: undefined, reason: `unauthorized connection from ${client} (not IPv4)` };
  for (let k = exports.length - 1; k >= 0; k--) {
    const entry = exports[k] as ResolvedExportEntry;
    if ((ip & entry.mask) >>> 0 !== (entry.address & entry.mask) >>> 0) continue;
    if (entry.path !== path) continue;
    if (!accessAllowed(entry.access, requested)) {
      return {
        ok: false,
        code: 'EPERM',
        entry,
        reason: `${requested} access requested, but ${entry.path} (${formatIPv4((entry.address & entry.mask) >>> 0)}/${entry.maskBits}) is exported ${entry.access}`,
      };
    }
    return { ok: true, entry, access: requested };
  }
  return { ok: false, code: 'EPERM', entry: undefined, reason: `unauthorized connection from ${formatIPv4(ip)}` };
}
