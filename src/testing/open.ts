/**
 * Opening a plugin the way `blockgate serve` does, for a plugin author's tests: the
 * settings validated by the plugin's schema, the device wrapped by the adapter (defaults,
 * checked requests, mapped errors), so that what the contract suite tests is what a
 * client will get.
 */
import { newStackContext, type StackContext } from '../device/stack.js';
import type { BlockDevice } from '../device/types.js';
import { backendFactoryOf, filterFactoryOf, pluginOf, type AdapterOptions } from '../plugin/adapter.js';
import type { BackendPlugin, FilterPlugin } from '../plugin/api.js';
import { BlockError } from '../errors/index.js';

/** The parts of an open a test may set: the logger of unexpected exceptions, and the stack context. */
export interface OpenOptions extends AdapterOptions {
  readonly ctx?: StackContext;
}

/**
 * Opens a backend plugin (its definition, or its module namespace) with
 * `settings`, as a BlockDevice. A filter plugin needs `next`, the device it wraps.
 */
export async function openPlugin(
  plugin: BackendPlugin | FilterPlugin | { default: unknown },
  settings: Record<string, unknown> = {},
  next?: BlockDevice,
  opts: OpenOptions = {},
): Promise<BlockDevice> {
  const p = 'default' in plugin ? pluginOf(plugin, 'plugin') : pluginOf({ default: plugin }, 'plugin');
  const desc = { ...settings, type: p.name };
  const ctx = opts.ctx ?? newStackContext();
  if (p.kind === 'backend') return await backendFactoryOf(p, opts)(desc, ctx);
  if (!next) throw new BlockError('EINVAL', `${p.name}: a filter plugin needs the device it wraps (openPlugin(plugin, settings, next))`);
  return await filterFactoryOf(p, opts)(next, desc, ctx);
}
