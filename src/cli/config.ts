/**
 * The `blockgate serve` configuration: the `--config` file format (JSON), the short
 * export forms of the command line, and the one function that validates both and names
 * the bad key.
 *
 * File format (see docs/CONFIG.md):
 *
 *   {
 *     "listen": [{ "host": "127.0.0.1", "port": 10809 }, { "path": "/run/blockgate.sock" }],
 *     "defaultExport": "disk",
 *     "logLevel": "info",
 *     "exports": [
 *       { "name": "disk", "description": "scratch disk", "readOnly": false,
 *         "backend": { "type": "file", "path": "disk.img" },
 *         "filters": [{ "type": "readonly" }] }
 *     ]
 *   }
 */
import * as v from 'valibot';
import { BlockError } from '../errors/index.js';
import type { LayerDescription } from '../device/index.js';

/** Default TCP port (IANA's NBD port). */
export const DEFAULT_PORT = 10809;
/** Default listen host: loopback only, so a fresh server is not exposed to the network. */
export const DEFAULT_HOST = '127.0.0.1';
/** The export served when none is given: a 1 GiB memory disk, named ''. */
export const DEFAULT_EXPORT_SPEC = 'memory:1G';

const Layer = v.looseObject({ type: v.pipe(v.string(), v.minLength(1)) });

const ExportSchema = v.strictObject({
  name: v.pipe(v.string(), v.maxLength(4096)),
  description: v.optional(v.string()),
  readOnly: v.optional(v.boolean()),
  backend: Layer,
  filters: v.optional(v.array(Layer)),
});

const ListenSchema = v.union([
  v.strictObject({ host: v.string(), port: v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(65535)) }),
  v.strictObject({ path: v.pipe(v.string(), v.minLength(1)) }),
]);

const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

export const ConfigSchema = v.strictObject({
  listen: v.optional(v.array(ListenSchema)),
  defaultExport: v.optional(v.string()),
  logLevel: v.optional(v.picklist(LEVELS)),
  exports: v.pipe(v.array(ExportSchema), v.minLength(1)),
});

export type ExportConfig = v.InferOutput<typeof ExportSchema>;
export type ServeConfig = v.InferOutput<typeof ConfigSchema>;
export type LogLevel = (typeof LEVELS)[number];
export const LOG_LEVELS: readonly string[] = LEVELS;

/**
 * Validates a parsed config object. Throws BlockError EINVAL whose message names the
 * first bad key as a path, e.g. `exports[0].backend.type: Invalid type: Expected string`.
 */
export function parseConfig(raw: unknown, source = 'config'): ServeConfig {
  const r = v.safeParse(ConfigSchema, raw);
  if (r.success) {
    const names = new Set<string>();
    r.output.exports.forEach((e, i) => {
      if (names.has(e.name)) throw new BlockError('EINVAL', `${source}: exports[${i}].name: duplicate export name '${e.name}'`);
      names.add(e.name);
    });
    if (r.output.defaultExport !== undefined && !names.has(r.output.defaultExport)) {
      throw new BlockError('EINVAL', `${source}: defaultExport: no export named '${r.output.defaultExport}'`);
    }
    return r.output;
  }
  const issue = r.issues[0];
  const path = issue.path?.map((p) => (typeof p.key === 'number' ? `[${p.key}]` : `.${String(p.key)}`)).join('') ?? '';
  throw new BlockError('EINVAL', `${source}: ${path.replace(/^\./, '') || '(top level)'}: ${issue.message}`);
}

/**
 * Parses one short export form of the command line:
 * - `PATH` (an existing file or block device): a file export;
 * - `TYPE:ARG` with TYPE memory|null|pattern (ARG = size) or file (ARG = path);
 * - `NAME=` followed by either form, to name the export (else it is named '').
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
  const m = /^(memory|null|pattern|file):(.*)$/.exec(rest);
  let backend: LayerDescription;
  if (!m || m[1] === 'file') backend = { type: 'file', path: m ? m[2]! : rest, ...(readOnly ? { readonly: true } : {}) };
  else backend = { type: m[1]!, size: m[2]! };
  return { name, backend, readOnly };
}
