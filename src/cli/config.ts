/**
 * The `blockgate serve` configuration: the `--config` file format (JSON), the short
 * export forms of the command line, and the one function that validates both and names
 * the bad key.
 *
 * File format (see docs/CONFIG.md):
 *
 *   {
 *     "listen": [{ "host": "127.0.0.1", "port": 10809 }, { "path": "/run/blockgate.sock" },
 *                { "host": "::", "port": 10810, "tls": "require", "tlsPsk": "keys.psk", "allow": ["fd00::/8"] }],
 *     "defaultExport": "disk",
 *     "logLevel": "info",
 *     "exports": [
 *       { "name": "disk", "description": "scratch disk", "readOnly": false,
 *         "backend": { "type": "file", "path": "disk.img" },
 *         "filters": [{ "type": "readonly" }],
 *         "tls": "require", "pskIdentities": ["alice"] }
 *     ]
 *   }
 */
import fs from 'node:fs';
import path from 'node:path';
import { InvalidArgumentError } from 'commander';
import * as v from 'valibot';
import { BlockError } from '../errors/index.js';
import { parseOrThrow, type LayerDescription } from '../device/index.js';
import { parseS3Url } from '../backends/s3/settings.js';
import { AddressRules } from '../io/address-rules.js';
import { ExportPolicy } from '../nbd/access.js';
import { TLS_MODES } from '../nbd/tls.js';
import { parseHttpAddress } from '../http/address.js';
import { parseRbdSpec } from '../backends/rbd/index.js';

/** Default TCP port (IANA's NBD port). */
export const DEFAULT_PORT = 10809;
/** Default listen host: loopback only, so a fresh server is not exposed to the network. */
export const DEFAULT_HOST = '127.0.0.1';
/** The export served when none is given: a 1 GiB memory disk, named ''. */
export const DEFAULT_EXPORT_SPEC = 'memory:1G';

/** The largest TCP port number. */
const MAX_PORT = 65535;

/** What a value of each kind must be, in the words of the error a user sees. */
const str = (what: string) => v.string((i) => `expected ${what}, got ${i.received}`);
const bool = () => v.boolean((i) => `expected true or false, got ${i.received}`);

/**
 * An object with exactly these keys: a key not listed is reported as unknown with the
 * keys allowed (valibot alone says "Expected never"), a wrong type as what was expected.
 */
function keys<const E extends v.ObjectEntries>(what: string, entries: E) {
  const known = Object.keys(entries).join(', ');
  return v.strictObject(entries, (i) =>
    i.expected === 'never' ? `unknown key (known: ${known})` : `expected ${what}, got ${i.received}`,
  );
}

const Layer = v.looseObject(
  { type: v.pipe(str('a layer type string'), v.minLength(1, 'must not be empty')) },
  (i) => `expected a layer object such as { "type": "memory", "size": "1G" }, got ${i.received}`,
);

const strings = (what: string) => v.array(str(what), (i) => `expected a list of ${what}s, got ${i.received}`);

/** Who may connect: the same keys on a listener and on an export (src/io/address-rules.ts). */
const RULES = {
  allow: v.optional(strings('an address, CIDR range or uid:N string')),
  deny: v.optional(strings('an address, CIDR range or uid:N string')),
};

const ExportSchema = keys('an export object', {
  name: v.pipe(str('an export name string'), v.maxLength(4096, 'is longer than the 4096 bytes NBD allows')),
  description: v.optional(str('a description string')),
  readOnly: v.optional(bool()),
  backend: Layer,
  filters: v.optional(v.array(Layer, (i) => `expected a list of layers, got ${i.received}`)),
  /** 'require': only TLS clients see and may open it. */
  tls: v.optional(v.picklist(['require'], 'expected "require" (an export is TLS-only or follows its listener)')),
  ...RULES,
  pskIdentities: v.optional(strings('a PSK identity string')),
  subjects: v.optional(strings('a certificate subject string such as CN=alice')),
});

const Port = v.pipe(
  v.number((i) => `expected a port number, got ${i.received}`),
  v.integer('expected a whole port number'),
  v.minValue(0, `expected a port number from 0 to ${MAX_PORT}`),
  v.maxValue(MAX_PORT, `expected a port number from 0 to ${MAX_PORT}`),
);

/** A listener's TLS and address rules (docs/SECURITY.md). */
const LISTENER_SECURITY = {
  tls: v.optional(v.picklist(TLS_MODES, `expected one of ${TLS_MODES.join(', ')}`)),
  tlsCertificates: v.optional(str('a directory path')),
  tlsPsk: v.optional(str('a PSK file path')),
  tlsVerifyPeer: v.optional(bool()),
  ...RULES,
};

const ListenSchema = v.union(
  [
    keys('a TCP listener', { host: str('a host string'), port: Port, ...LISTENER_SECURITY }),
    keys('a unix listener', { path: v.pipe(str('a socket path'), v.minLength(1, 'must not be empty')), ...LISTENER_SECURITY }),
  ],
  (i) => `expected { "host": ..., "port": ... } or { "path": ... }, got ${i.received}`,
);

const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

export const ConfigSchema = keys('a configuration object', {
  listen: v.optional(v.array(ListenSchema, (i) => `expected a list of listeners, got ${i.received}`)),
  defaultExport: v.optional(str('an export name string')),
  logLevel: v.optional(v.picklist(LEVELS, `expected one of ${LEVELS.join(', ')}`)),
  /** `[HOST:]PORT` of the HTTP listener (metrics, status page), as --http. */
  http: v.optional(v.pipe(str('a [HOST:]PORT string'), v.check((x) => httpAddressError(x) === null, (i) => httpAddressError(String(i.input)) ?? 'bad address'))),
  /** false: count nothing, as --no-metrics. */
  metrics: v.optional(bool()),
  exports: v.pipe(
    v.array(ExportSchema, (i) => `expected a list of exports, got ${i.received}`),
    v.minLength(1, 'at least one export is needed'),
  ),
});

/** Why `text` is not an --http address, or null. */
function httpAddressError(text: string): string | null {
  try {
    parseHttpAddress(text);
    return null;
  } catch (e) {
    return (e as Error).message;
  }
}

/** Parses a TCP port from the command line (commander's argument parser: one clear line on error). */
export function parsePort(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || n > MAX_PORT) throw new InvalidArgumentError(`expected a port number from 0 to ${MAX_PORT}, got '${value}'`);
  return n;
}

export type ExportConfig = v.InferOutput<typeof ExportSchema>;
export type ServeConfig = v.InferOutput<typeof ConfigSchema>;
export type LogLevel = (typeof LEVELS)[number];
export const LOG_LEVELS: readonly string[] = LEVELS;

/**
 * Validates a parsed config object. Throws BlockError EINVAL whose message names the
 * first bad key as a path, e.g. `exports[0].backend.type: Invalid type: Expected string`.
 */
export function parseConfig(raw: unknown, source = 'config'): ServeConfig {
  const cfg = parseOrThrow(ConfigSchema, raw, source);
  const names = new Set<string>();
  cfg.exports.forEach((e, i) => {
    if (names.has(e.name)) throw new BlockError('EINVAL', `${source}: exports[${i}].name: duplicate export name '${e.name}'`);
    names.add(e.name);
  });
  // The rules are parsed once here so that a bad range is reported with its key path.
  cfg.listen?.forEach((l, i) => new AddressRules(l, `${source}: listen[${i}]`));
  cfg.exports.forEach((e, i) => new ExportPolicy(e, `${source}: exports[${i}]`));
  if (cfg.defaultExport !== undefined && !names.has(cfg.defaultExport)) {
    throw new BlockError('EINVAL', `${source}: defaultExport: no export named '${cfg.defaultExport}'`);
  }
  return cfg;
}

/** The backend types of the short `TYPE:ARG` export form. */
const SHORT_FORMS = ['memory:SIZE', 'null:SIZE', 'pattern:SIZE', 'file:PATH', 'rbd:POOL/IMAGE', 'nbd:URI', 'plugin:PATH', 's3://BUCKET/PREFIX'] as const;

/**
 * Whether an export or `--filter` argument names a plugin module: a path starting with
 * `./`, `../` or `/` and ending in `.js`, `.mjs`, `.cjs`, `.ts`, `.mts` or `.cts`.
 */
export function isPluginPath(spec: string): boolean {
  return /^(?:\.{1,2}\/|\/)/.test(spec) && /\.(?:m?js|cjs|m?ts|cts)$/.test(spec);
}

/** An argument that starts an export of its own (so it is never taken for a plugin's `key=value`). */
function isExportForm(value: string): boolean {
  return NBD_URI.test(value) || /^(?:memory|null|pattern|file|rbd|nbd|plugin):/i.test(value) || /^s3:\/\//i.test(value) || isPluginPath(value);
}

/**
 * Parses the export arguments of the command line: each as parseExportSpec, and after a
 * plugin export (`./mydisk.js`, `plugin:PATH`, either as `NAME=...`) the `key=value`
 * arguments that follow are its settings, as nbdkit's `plugin key=value`. A `key=value`
 * whose value is itself an export form (`disk=memory:1G`) starts the next export instead.
 */
export function parseExportSpecs(specs: readonly string[], readOnly = false): ExportConfig[] {
  const out: ExportConfig[] = [];
  for (let i = 0; i < specs.length; i++) {
    const e = parseExportSpec(specs[i]!, readOnly);
    if (e.backend.type !== 'plugin') {
      out.push(e);
      continue;
    }
    const settings: Record<string, string> = {};
    while (i + 1 < specs.length) {
      const m = /^([A-Za-z_][\w.-]*)=(.*)$/s.exec(specs[i + 1]!);
      if (!m || isExportForm(m[2]!)) break;
      if (m[1] === 'type' || m[1] === 'path') throw new BlockError('EINVAL', `export '${specs[i]}': '${m[1]}' is not a plugin setting`);
      settings[m[1]!] = m[2]!;
      i++;
    }
    out.push({ ...e, backend: { ...e.backend, ...settings } });
  }
  return out;
}

/** An NBD URI given as an export on its own (`nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`). */
const NBD_URI = /^nbds?(?:\+unix)?:\/\//i;

/**
 * Parses one short export form of the command line:
 * - `PATH` (an existing file or block device): a file export;
 * - `TYPE:ARG` with TYPE memory|null|pattern (ARG = size) or file (ARG = path);
 * - `rbd:POOL/IMAGE`: an RBD image with librados's default conf and user (a config file
 *   can set `conf`, `id`, `keyring`); `-r` opens it read-only;
 * - `nbd:URI`, or an NBD URI on its own (`nbd://host:port/name`, `nbds://...`,
 *   `nbd+unix:///name?socket=PATH`, `nbds+unix://...`): re-export another server's
 *   export through the `nbd` backend, with its default settings (retries etc.; a config
 *   file can set them). The URI is checked when the backend is built;
 * - `./PATH.js` (a path starting `./`, `../` or `/`, ending .js, .mjs, .ts ...) or
 *   `plugin:PATH`: a backend plugin module (docs/PLUGINS.md), `{ type: 'plugin', path }`
 *   with the path made absolute; its settings are the `key=value` arguments after it
 *   (parseExportSpecs);
 * - `s3://BUCKET/PREFIX[?endpoint=URL&size=SIZE&...]`: an s3 export (docs/S3.md);
 *   credentials come from the environment;
 * - `NAME=` followed by any form, to name the export (else it is named '').
 *
 * `NAME=` is recognised only before the first ':', so a URI's own `?socket=...` is never
 * taken for a name.
 *
 * `readOnly` (serve -r) also opens a file backend read-only: a file the server may only
 * read (mode 0444, a read-only mount) must be servable, and a server that cannot write
 * the file cannot damage it by a defect either.
 */
export function parseExportSpec(spec: string, readOnly = false): ExportConfig {
  let name = '';
  let rest = spec;
  const eq = spec.indexOf('=');
  const colon = spec.indexOf(':');
  if (eq > 0 && (colon < 0 || eq < colon)) {
    name = spec.slice(0, eq);
    rest = spec.slice(eq + 1);
  }
  if (rest === '') throw new BlockError('EINVAL', `export '${spec}': nothing to serve after '='`);
  if (NBD_URI.test(rest) || /^nbd:/i.test(rest)) {
    const uri = NBD_URI.test(rest) ? rest : rest.slice(4);
    if (uri === '') throw new BlockError('EINVAL', `export '${spec}': nbd: needs a URI, e.g. nbd:nbd://127.0.0.1:10809/name`);
    return { name, backend: { type: 'nbd', uri, ...(readOnly ? { readonly: true } : {}) }, readOnly };
  }
  if (/^s3:\/\//i.test(rest)) {
    return { name, backend: { ...parseS3Url(rest), ...(readOnly ? { readonly: true } : {}) }, readOnly };
  }
  if (/^plugin:/i.test(rest) || isPluginPath(rest)) {
    const file = /^plugin:/i.test(rest) ? rest.slice(7) : rest;
    if (file === '') throw new BlockError('EINVAL', `export '${spec}': plugin: needs the path of a plugin module, e.g. plugin:./mydisk.js`);
    return { name, backend: { type: 'plugin', path: path.resolve(file) }, readOnly };
  }
  if (/^rbd:/i.test(rest)) {
    let target: { pool: string; image: string };
    try {
      target = parseRbdSpec(rest.slice(4));
    } catch (e) {
      throw new BlockError('EINVAL', `export '${spec}': ${(e as Error).message}`);
    }
    return { name, backend: { type: 'rbd', ...target, ...(readOnly ? { readonly: true } : {}) }, readOnly };
  }
  const m = /^(memory|null|pattern|file):(.*)$/.exec(rest);
  const typed = /^([A-Za-z][A-Za-z0-9-]*):/.exec(rest);
  if (!m && typed && !fs.existsSync(rest)) {
    // `ram:1G` is far more likely a mistyped backend than a file of that name.
    throw new BlockError(
      'EINVAL',
      `export '${spec}': unknown backend type '${typed[1]}' (known: ${SHORT_FORMS.join(', ')}; a file whose name has a colon: file:${rest})`,
    );
  }
  let backend: LayerDescription;
  if (!m || m[1] === 'file') backend = { type: 'file', path: m ? m[2]! : rest, ...(readOnly ? { readonly: true } : {}) };
  else backend = { type: m[1]!, size: m[2]! };
  return { name, backend, readOnly };
}
