/**
 * The plugin API: what a plugin module's default export is (docs/PLUGINS.md).
 *
 *   export default defineBackend({
 *     name: 'mydisk',
 *     settings: { size: sizeSetting },
 *     open: (s) => new MyDisk(s.size),
 *   });
 *
 * The export carries `apiVersion` (PLUGIN_API_VERSION of the blockgate it was written
 * for), so a later blockgate that changes this API refuses an old plugin with a clear
 * message instead of calling it wrongly.
 */
import type * as v from 'valibot';
import type { BlockDevice, BlockSize, Extent } from '../device/types.js';
import type { StackContext } from '../device/stack.js';

/**
 * The version of this API. A plugin's export says which version it was written for;
 * blockgate loads only plugins of the version(s) it implements.
 */
export const PLUGIN_API_VERSION = 1;

/** The settings of a plugin: valibot entries (`{ size: sizeSetting, name: v.string() }`). */
export type PluginSettings = v.ObjectEntries;

/** The parsed settings object of `entries`. */
export type SettingsOf<E extends PluginSettings> = v.InferOutput<v.StrictObjectSchema<E, undefined>>;

/** What a backend plugin's `open` returns: a PluginDevice, or any object of the same shape. */
export interface PluginBackendDevice {
  /** Size in bytes (a safe integer). Read per request, so it may change. */
  readonly size: number;
  /**
   * True if a write is durable when its promise resolves: flush is then a no-op and FUA
   * needs nothing. A plugin with `write` must either say so or implement `flush`.
   */
  readonly durableWrites?: boolean;
  /** Block-size constraints; each part defaults to minimum 1, preferred 4096, maximum 32 MiB. */
  readonly blockSize?: Partial<BlockSize>;
  /** A short description for logs (default: `plugin NAME`). */
  readonly description?: string;
  /** Every connection sees the same data and flush covers all of them (default false). */
  readonly multiConn?: boolean;
  /** `zero` with FAST_ZERO is fast (default false: such requests fail EOPNOTSUPP at once). */
  readonly fastZero?: boolean;

  read(buf: Buffer, offset: number, flags: number): Promise<void> | void;
  write?(data: Buffer, offset: number, flags: number): Promise<void> | void;
  flush?(flags: number): Promise<void> | void;
  trim?(offset: number, length: number, flags: number): Promise<void> | void;
  zero?(offset: number, length: number, flags: number): Promise<void> | void;
  extents?(offset: number, length: number, flags: number): Promise<Extent[]> | Extent[];
  cache?(offset: number, length: number, flags: number): Promise<void> | void;
  close?(): Promise<void> | void;
}

/** A backend plugin: the default export of its module. */
export interface BackendPlugin<E extends PluginSettings = PluginSettings> {
  readonly apiVersion: number;
  readonly kind: 'backend';
  /** The plugin's name, used in errors and descriptions (`mydisk: size: ...`). */
  readonly name: string;
  /** Its settings (the keys after `type` and `path`); default none. */
  readonly settings?: E;
  /** A line about what it does (`blockgate plugins PATH`). */
  readonly doc?: string;
  open(settings: SettingsOf<E>, ctx: StackContext): Promise<PluginBackendDevice> | PluginBackendDevice;
}

/** A filter plugin: the default export of its module. `open` wraps `next` (a PluginFilter, usually). */
export interface FilterPlugin<E extends PluginSettings = PluginSettings> {
  readonly apiVersion: number;
  readonly kind: 'filter';
  readonly name: string;
  readonly settings?: E;
  readonly doc?: string;
  open(next: BlockDevice, settings: SettingsOf<E>, ctx: StackContext): Promise<BlockDevice> | BlockDevice;
}

export type Plugin = BackendPlugin | FilterPlugin;

/** Declares a backend plugin (fills in `kind` and `apiVersion`). */
export function defineBackend<const E extends PluginSettings = Record<never, never>>(
  def: Omit<BackendPlugin<E>, 'apiVersion' | 'kind'>,
): BackendPlugin<E> {
  return Object.freeze({ ...def, kind: 'backend', apiVersion: PLUGIN_API_VERSION });
}

/** Declares a filter plugin (fills in `kind` and `apiVersion`). */
export function defineFilter<const E extends PluginSettings = Record<never, never>>(
  def: Omit<FilterPlugin<E>, 'apiVersion' | 'kind'>,
): FilterPlugin<E> {
  return Object.freeze({ ...def, kind: 'filter', apiVersion: PLUGIN_API_VERSION });
}

/** Declares either kind, by its `kind` field. */
export function definePlugin<const E extends PluginSettings = Record<never, never>>(
  def: Omit<BackendPlugin<E>, 'apiVersion'> | Omit<FilterPlugin<E>, 'apiVersion'>,
): BackendPlugin<E> | FilterPlugin<E> {
  return Object.freeze({ ...def, apiVersion: PLUGIN_API_VERSION }) as BackendPlugin<E> | FilterPlugin<E>;
}
