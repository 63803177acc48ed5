/**
 * `blockgate serve --filter NAME[:key=value,...]` (repeatable, nbdkit-style) and
 * `--dump-config`.
 *
 * Order: as nbdkit's `--filter` (nbdkit-filter(3): client -> filter1 -> filter2 -> plugin),
 * the first `--filter` is the one nearest the client, which is also the order of a config
 * file's `filters` list (top first). So the options' values are the export's `filters` as
 * they are, in the order given.
 *
 * NAME is a built-in filter (`readonly`, `error`, ...) or a plugin module's path
 * (`./myfilter.js`, `/abs/f.mjs`, `../f.ts`), which becomes `{ type: 'plugin', path }`.
 * After a `:`, settings are `key=value` pairs separated by commas; a value runs to the
 * next comma (it may contain `=` and `:`, not `,`; a value with a comma needs --config).
 * Values are strings converted to what the filter's schema expects: `true`/`false` for
 * booleans, numbers for numbers, `a+b` for lists (`ops=read+write`); sizes stay strings
 * (`maxDirty=64M`). A plugin filter's values are converted the same way by the plugin's
 * own schema when it is loaded.
 */
import path from 'node:path';
import { InvalidArgumentError } from 'commander';
import { coerceSettingStrings, schemaEntries, type LayerDescription } from '../device/index.js';
import { isPluginPath, type ServeConfig } from './config.js';
import { serveRegistry, serveSettings } from './registry.js';

/** Parses `key=value,key=value` (the part after NAME:). */
export function parseSettingPairs(text: string, what: string): Record<string, string> {
  const out: Record<string, string> = {};
  if (text === '') return out;
  for (const pair of text.split(',')) {
    const eq = pair.indexOf('=');
    const key = eq > 0 ? pair.slice(0, eq) : '';
    if (!/^[A-Za-z_][\w.-]*$/.test(key)) throw new InvalidArgumentError(`${what}: expected key=value, got '${pair}'`);
    if (key === 'type' || key === 'path') throw new InvalidArgumentError(`${what}: '${key}' is not a setting`);
    if (key in out) throw new InvalidArgumentError(`${what}: '${key}' given twice`);
    out[key] = pair.slice(eq + 1);
  }
  return out;
}

/** One `--filter` value as a layer description (commander's argument parser: errors are one line). */
export function parseFilterOption(value: string): LayerDescription {
  const plugin = /^(.+?\.(?:m?js|cjs|m?ts|cts))(?::(.*))?$/s.exec(value);
  if (plugin && isPluginPath(plugin[1]!)) {
    return { type: 'plugin', path: path.resolve(plugin[1]!), ...parseSettingPairs(plugin[2] ?? '', `--filter ${value}`) };
  }
  const m = /^([A-Za-z][\w-]*)(?::(.*))?$/s.exec(value);
  if (!m) throw new InvalidArgumentError(`expected NAME[:key=value,...] or a plugin path such as ./myfilter.js, got '${value}'`);
  const name = m[1]!;
  if (!serveRegistry.filters.has(name)) {
    const known = [...serveRegistry.filters.keys()].filter((k) => k !== 'plugin');
    throw new InvalidArgumentError(`unknown filter '${name}' (known: ${known.join(', ')}; or a plugin module: ./myfilter.js)`);
  }
  const pairs = parseSettingPairs(m[2] ?? '', `--filter ${value}`);
  const schema = serveSettings.filters.get(name);
  return { type: name, ...(schema ? coerceSettingStrings(schemaEntries(schema), pairs) : pairs) };
}

/** Collects `--filter` values in the order given (the first is nearest the client). */
export function collectFilter(value: string, prev: LayerDescription[] | undefined): LayerDescription[] {
  return [...(prev ?? []), parseFilterOption(value)];
}

/**
 * The effective configuration as `--config` JSON: what serve would run, listeners
 * defaulted, every export with its backend and filters (top first).
 */
export function effectiveConfig(cfg: ServeConfig, defaultListen: NonNullable<ServeConfig['listen']>): ServeConfig {
  return { ...cfg, listen: cfg.listen && cfg.listen.length > 0 ? cfg.listen : defaultListen };
}
