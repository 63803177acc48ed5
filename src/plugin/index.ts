/**
 * `blockgate/plugin`: everything a plugin author needs (docs/PLUGINS.md). A plugin
 * module's default export is `defineBackend({...})` or `defineFilter({...})`; a backend's
 * device extends PluginDevice, a filter extends PluginFilter (FilterDevice: every method
 * passes through to `next` unless overridden).
 */
import * as v from 'valibot';

export { v };
export { PLUGIN_API_VERSION, defineBackend, defineFilter, definePlugin } from './api.js';
export type { BackendPlugin, FilterPlugin, Plugin, PluginBackendDevice, PluginSettings, SettingsOf } from './api.js';
export { PluginDevice } from './device.js';
export { FilterDevice, FilterDevice as PluginFilter } from '../device/filter.js';
export { REQ, EXTENT, MAX_DEVICE_SIZE } from '../device/types.js';
export type { BlockDevice, BlockSize, Capabilities, Extent } from '../device/types.js';
export type { StackContext, LayerDescription } from '../device/stack.js';
export { sizeSetting, booleanSetting } from '../device/settings.js';
export { parseSize, formatSize } from '../device/size.js';
export { DEFAULT_BLOCK_SIZE, MAX_IO_SIZE, singleExtent, readOnlyCapabilities, readOnlyError } from '../device/defaults.js';
export { BlockError, isBlockError, toBlockError } from '../errors/index.js';
export type { ErrnoCode } from '../errors/index.js';
export {
  PluginBackendAdapter,
  PluginErrors,
  backendFactoryOf,
  capabilitiesOf,
  filterFactoryOf,
  pluginOf,
  stderrPluginLogger,
} from './adapter.js';
export type { AdapterOptions, PluginLogger } from './adapter.js';
