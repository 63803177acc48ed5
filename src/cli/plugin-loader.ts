/**
 * Loads plugin modules by path: the one dynamic import of blockgate (test/layering.test.ts
 * allows it here only). A module is imported once per resolved path; a relative path is
 * resolved against the current directory (config files' plugin paths are made absolute
 * against the file's directory first, src/cli/serve.ts). A `.ts` plugin needs a loader
 * the user runs node with (`node --import tsx`); blockgate brings none.
 */
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Logger } from 'pino';
import type { BackendFactory, FilterFactory } from '../device/index.js';
import { pluginBackend, pluginFilter, type PluginLogger, type PluginModuleLoader } from '../plugin/adapter.js';

const loaded = new Map<string, Promise<unknown>>();

/** Imports the module at `file` (once per resolved path). */
export const loadPluginModule: PluginModuleLoader = (file: string) => {
  const url = pathToFileURL(path.resolve(file)).href;
  let mod = loaded.get(url);
  if (!mod) {
    mod = import(url);
    loaded.set(url, mod);
    mod.catch(() => loaded.delete(url));
  }
  return mod;
};

/** A pino logger as the adapter's logger of unexpected plugin exceptions. */
function pluginLogger(log: Logger | undefined): PluginLogger | undefined {
  return log ? { error: (fields, message) => log.error(fields, message) } : undefined;
}

/** The `plugin` backend and filter of `blockgate serve`, logging to `log` (default: stderr). */
export function pluginLayers(log?: Logger): { backends: Record<string, BackendFactory>; filters: Record<string, FilterFactory> } {
  const logger = pluginLogger(log);
  const opts = logger ? { logger } : {};
  return {
    backends: { plugin: pluginBackend(loadPluginModule, opts) },
    filters: { plugin: pluginFilter(loadPluginModule, opts) },
  };
}
