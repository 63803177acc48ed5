/**
 * `blockgate plugins [PATH...] [--json]`: every built-in backend and filter with each
 * setting's type, whether it is required, its default and its doc, read from the layers'
 * valibot schemas (src/device/settings-info.ts), so the listing cannot drift from what
 * the layers accept. With PATHs, the plugin modules at those paths are loaded and listed
 * the same way (their API version checked).
 */
import { Command } from 'commander';
import type { GenericSchema } from 'valibot';
import { describeSettings, type SettingInfo } from '../device/index.js';
import { pluginOf } from '../plugin/adapter.js';
import { PLUGIN_API_VERSION } from '../plugin/api.js';
import { loadPluginModule } from './plugin-loader.js';
import { serveRegistry, serveSettings } from './registry.js';

/** One layer of the listing. */
export interface LayerInfo {
  readonly kind: 'backend' | 'filter';
  readonly name: string;
  /** Set for a plugin module listed by path. */
  readonly path?: string;
  readonly doc?: string;
  /** Absent when the layer's schema is not registered (src/filters/settings-registry.ts). */
  readonly settings?: readonly SettingInfo[];
}

const PLUGIN_LAYER: readonly SettingInfo[] = [
  { key: 'path', type: 'string', required: true, doc: 'the plugin module (.js, .mjs; .ts with a loader); its own settings follow' },
];

function layers(kind: 'backend' | 'filter', names: Iterable<string>, schemas: ReadonlyMap<string, GenericSchema>): LayerInfo[] {
  return [...names].map((name) => {
    if (name === 'plugin') return { kind, name, doc: `a ${kind} plugin module (docs/PLUGINS.md)`, settings: PLUGIN_LAYER };
    const schema = schemas.get(name);
    return { kind, name, ...(schema ? { settings: describeSettings(schema) } : {}) };
  });
}

/** The built-in layers of `blockgate serve`, backends then filters, in registration order. */
export function builtinLayers(): LayerInfo[] {
  return [
    ...layers('backend', serveRegistry.backends.keys(), serveSettings.backends),
    ...layers('filter', serveRegistry.filters.keys(), serveSettings.filters),
  ];
}

/** A plugin module's entry in the listing (loads it). */
export async function pluginLayer(file: string): Promise<LayerInfo> {
  const p = pluginOf(await loadPluginModule(file), file);
  return { kind: p.kind, name: p.name, path: file, ...(p.doc ? { doc: p.doc } : {}), settings: describeSettings(p.settings ?? {}, []) };
}

function formatDefault(value: unknown): string {
  return typeof value === 'string' ? value : JSON.stringify(value);
}

/** The listing as text: one block per layer, one line per setting. */
export function formatLayers(list: readonly LayerInfo[]): string {
  const lines: string[] = [];
  for (const kind of ['backend', 'filter'] as const) {
    const of = list.filter((l) => l.kind === kind);
    if (of.length === 0) continue;
    lines.push(kind === 'backend' ? 'Backends:' : 'Filters:');
    for (const l of of) {
      lines.push(`  ${l.name}${l.path ? ` (${l.path})` : ''}${l.doc ? `: ${l.doc}` : ''}`);
      if (!l.settings) lines.push('    (settings not described)');
      else if (l.settings.length === 0) lines.push('    (no settings)');
      for (const s of l.settings ?? []) {
        const parts = [s.type, s.required ? 'required' : 'default' in s ? `default ${formatDefault(s.default)}` : 'optional'];
        lines.push(`    ${s.key}: ${parts.join(', ')}${s.doc ? `  ${s.doc}` : ''}`);
      }
    }
  }
  return `${lines.join('\n')}\n`;
}

export function pluginsCommand(): Command {
  return new Command('plugins')
    .description(`list the built-in backends and filters with their settings (and plugin modules given by path; plugin API version ${PLUGIN_API_VERSION})`)
    .argument('[path...]', 'plugin modules to list as well (./mydisk.js)')
    .option('--json', 'print JSON')
    .action(async (paths: string[], flags: { json?: boolean }) => {
      try {
        const list = [...builtinLayers(), ...(await Promise.all(paths.map(pluginLayer)))];
        process.stdout.write(flags.json ? `${JSON.stringify({ pluginApiVersion: PLUGIN_API_VERSION, layers: list }, null, 2)}\n` : formatLayers(list));
      } catch (e) {
        process.stderr.write(`blockgate plugins: ${(e as Error).message}\n`);
        process.exitCode = 1;
      }
    });
}
