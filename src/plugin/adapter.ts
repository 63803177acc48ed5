/**
 * The adapter between a plugin and the device stack: it checks a plugin module's default
 * export (kind, API version, settings), turns it into a BackendFactory or FilterFactory
 * whose settings are validated by the plugin's valibot entries, and wraps what the
 * plugin opens so that
 *
 * - a backend plugin implements as little as `size` and `read`: the rest has safe
 *   defaults, and the capabilities follow from what it implements (capabilitiesOf);
 * - every request reaching the plugin is already checked: inside the device, aligned to
 *   its minimum block size, not on a closed device, not of length 0, not a write to a
 *   read-only device;
 * - nothing a plugin throws crashes the server: a BlockError passes through with its
 *   code, a Node system error keeps its errno code, anything else (a TypeError, a
 *   string) becomes EIO and is logged once per kind with its stack.
 */
import * as v from 'valibot';
import { BlockError, isBlockError, isErrnoCode, toBlockError } from '../errors/index.js';
import { FilterDevice } from '../device/filter.js';
import { DEFAULT_BLOCK_SIZE, MAX_IO_SIZE, closedError, readOnlyError, singleExtent } from '../device/defaults.js';
import { parseSettings, settingsSchema } from '../device/settings.js';
import { coerceSettingStrings } from '../device/settings-info.js';
import type { BackendFactory, FilterFactory, LayerDescription, StackContext } from '../device/stack.js';
import { EXTENT, REQ, type BlockDevice, type BlockSize, type Capabilities, type Extent } from '../device/types.js';
import { checkAlignment, validateRequest, type Operation } from '../device/validate.js';
import { PLUGIN_API_VERSION, type BackendPlugin, type FilterPlugin, type Plugin, type PluginBackendDevice } from './api.js';

/** Where the adapter reports a plugin's unexpected exceptions (a pino logger fits). */
export interface PluginLogger {
  error(fields: Record<string, unknown>, message: string): void;
}

/** The default logger: one line and the stack on stderr. */
export const stderrPluginLogger: PluginLogger = {
  error(fields, message) {
    const err = fields.err;
    const stack = err instanceof Error ? (err.stack ?? String(err)) : String(err);
    process.stderr.write(`blockgate: plugin ${String(fields.plugin)}: ${String(fields.op)}: ${message}\n${stack}\n`);
  },
};

export interface AdapterOptions {
  /** Where unexpected exceptions are logged (default: stderr). */
  readonly logger?: PluginLogger;
}

/** Kinds of unexpected exception remembered per plugin layer before the oldest is forgotten. */
const MAX_KINDS = 256;

/**
 * Maps what a plugin threw to a BlockError: BlockErrors (also of another copy of
 * blockgate, by brand) and Node system errors with a known errno keep their code;
 * anything else is EIO, logged the first time its kind (name and message) is seen.
 */
export class PluginErrors {
  readonly #name: string;
  readonly #logger: PluginLogger;
  readonly #seen = new Set<string>();

  constructor(name: string, logger: PluginLogger = stderrPluginLogger) {
    this.#name = name;
    this.#logger = logger;
  }

  map(op: string, thrown: unknown): BlockError {
    if (isBlockError(thrown)) return thrown;
    if (thrown instanceof Error && isErrnoCode((thrown as NodeJS.ErrnoException).code)) return toBlockError(thrown);
    const message = thrown instanceof Error ? thrown.message : String(thrown);
    const kind = thrown instanceof Error ? `${op}: ${thrown.name}: ${message}` : `${op}: ${typeof thrown}: ${message}`;
    if (!this.#seen.has(kind)) {
      if (this.#seen.size >= MAX_KINDS) this.#seen.delete(this.#seen.values().next().value!);
      this.#seen.add(kind);
      this.#logger.error(
        { plugin: this.#name, op, err: thrown },
        'unexpected exception in a plugin (a bug in the plugin); the request failed with EIO (logged once per kind)',
      );
    }
    return new BlockError('EIO', `${this.#name}: ${op}: ${message}`, { cause: thrown });
  }

  /** Runs `fn` (sync or async), mapping whatever it throws. */
  async call<T>(op: string, fn: () => T | Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      throw this.map(op, e);
    }
  }
}

const fn = (x: unknown): boolean => typeof x === 'function';

/**
 * The capabilities of a backend plugin's device, from what it implements (the table in
 * docs/PLUGINS.md): writable if it has `write`; flush if it has `flush` or says its
 * writes are durable; FUA for every writable device (a flush after the write, or nothing
 * when writes are durable); zero for every writable device (written as zeroes when it
 * has no `zero`); fast zero only if it has `zero` and says `fastZero`; trim, extents and
 * cache if it has them; multi-conn only if it says so.
 */
export function capabilitiesOf(impl: PluginBackendDevice): Capabilities {
  const write = fn(impl.write);
  return Object.freeze({
    write,
    flush: fn(impl.flush) || (write && impl.durableWrites === true),
    fua: write,
    trim: write && fn(impl.trim),
    zero: write,
    fastZero: write && fn(impl.zero) && impl.fastZero === true,
    extents: fn(impl.extents),
    cache: fn(impl.cache),
    multiConn: impl.multiConn === true,
  });
}

const isPow2 = (n: number) => Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;

function blockSizeOf(name: string, given: Partial<BlockSize> | undefined): BlockSize {
  const minimum = given?.minimum ?? DEFAULT_BLOCK_SIZE.minimum;
  const preferred = given?.preferred ?? Math.max(DEFAULT_BLOCK_SIZE.preferred, minimum);
  const maximum = given?.maximum ?? DEFAULT_BLOCK_SIZE.maximum;
  if (!isPow2(minimum) || minimum > 65536) throw new BlockError('EINVAL', `${name}: blockSize.minimum ${minimum} must be a power of two from 1 to 65536`);
  if (!isPow2(preferred) || preferred < Math.max(minimum, 512)) {
    throw new BlockError('EINVAL', `${name}: blockSize.preferred ${preferred} must be a power of two of at least max(minimum, 512)`);
  }
  if (!Number.isSafeInteger(maximum) || maximum < preferred || maximum > MAX_IO_SIZE) {
    throw new BlockError('EINVAL', `${name}: blockSize.maximum ${maximum} must be from preferred (${preferred}) to ${MAX_IO_SIZE}`);
  }
  return Object.freeze({ minimum, preferred, maximum });
}

/** The largest buffer of zeroes written at once when a plugin has `write` but no `zero`. */
const ZERO_CHUNK = 1024 * 1024;

/** A backend plugin's device as the stack sees it: checked requests, defaults, mapped errors. */
export class PluginBackendAdapter implements BlockDevice {
  readonly capabilities: Capabilities;
  readonly blockSize: BlockSize;
  readonly nonBlocking = false;
  readonly description: string;
  readonly #impl: PluginBackendDevice;
  readonly #errors: PluginErrors;
  readonly #durable: boolean;
  #closed = false;

  constructor(impl: PluginBackendDevice, name: string, errors: PluginErrors = new PluginErrors(name)) {
    if (typeof impl !== 'object' || impl === null || !fn(impl.read)) {
      throw new BlockError('EINVAL', `${name}: open() must return a device with a read() method (extend PluginDevice from 'blockgate/plugin')`);
    }
    const size = impl.size;
    if (!Number.isSafeInteger(size) || size < 0) throw new BlockError('EINVAL', `${name}: size must be a whole number of bytes, got ${String(size)}`);
    if (fn(impl.write) && !fn(impl.flush) && impl.durableWrites !== true) {
      throw new BlockError(
        'EINVAL',
        `${name}: the device has write() but no flush() and does not declare durableWrites: set durableWrites = true if a write is durable when it returns, else implement flush()`,
      );
    }
    this.#impl = impl;
    this.#errors = errors;
    this.#durable = impl.durableWrites === true;
    this.capabilities = capabilitiesOf(impl);
    this.blockSize = blockSizeOf(name, impl.blockSize);
    this.description = typeof impl.description === 'string' && impl.description !== '' ? impl.description : `plugin ${name}`;
  }

  get size(): number {
    return this.#impl.size;
  }

  #check(op: Operation, offset: number, length: number): void {
    if (this.#closed) throw closedError(op, this.description);
    validateRequest(this, op, offset, length);
    checkAlignment(this, op, offset, length);
  }

  /** After a write, trim or zero with FUA: nothing if writes are durable, else a flush. */
  async #fua(flags: number): Promise<void> {
    if (flags & REQ.FUA && !this.#durable && this.#impl.flush) await this.#errors.call('flush', () => this.#impl.flush!(0));
  }

  async read(buf: Buffer, offset: number, flags: number): Promise<void> {
    this.#check('read', offset, buf.length);
    if (buf.length === 0) return;
    await this.#errors.call('read', () => this.#impl.read(buf, offset, flags));
  }

  async write(data: Buffer, offset: number, flags: number): Promise<void> {
    this.#check('write', offset, data.length);
    if (!this.#impl.write) throw readOnlyError('write', this.description);
    if (data.length === 0) return;
    await this.#errors.call('write', () => this.#impl.write!(data, offset, flags));
    await this.#fua(flags);
  }

  async flush(flags: number): Promise<void> {
    if (this.#closed) throw closedError('flush', this.description);
    if (this.#impl.flush) await this.#errors.call('flush', () => this.#impl.flush!(flags));
  }

  async trim(offset: number, length: number, flags: number): Promise<void> {
    this.#check('trim', offset, length);
    if (length === 0 || !this.#impl.trim) return;
    await this.#errors.call('trim', () => this.#impl.trim!(offset, length, flags));
    await this.#fua(flags);
  }

  async zero(offset: number, length: number, flags: number): Promise<void> {
    this.#check('zero', offset, length);
    if (flags & REQ.FAST_ZERO && !this.capabilities.fastZero) {
      throw new BlockError('EOPNOTSUPP', `zero: ${this.description} has no fast zero`);
    }
    if (length === 0) return;
    if (this.#impl.zero) {
      await this.#errors.call('zero', () => this.#impl.zero!(offset, length, flags));
    } else {
      // Fresh buffers: a plugin that (wrongly) keeps a write's buffer must not see it change.
      for (let pos = 0; pos < length; pos += ZERO_CHUNK) {
        const n = Math.min(ZERO_CHUNK, length - pos);
        await this.#errors.call('zero', () => this.#impl.write!(Buffer.alloc(n), offset + pos, flags & ~REQ.FUA));
      }
    }
    await this.#fua(flags);
  }

  async extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    this.#check('extents', offset, length);
    const size = this.size;
    if (!this.#impl.extents) return singleExtent(offset, length, size, 0);
    if (offset >= size) return [];
    const ask = length === 0 ? size - offset : length;
    const got = await this.#errors.call('extents', () => this.#impl.extents!(offset, ask, flags));
    try {
      return checkedExtents(got, offset, size);
    } catch (e) {
      throw this.#errors.map('extents', e);
    }
  }

  async cache(offset: number, length: number, flags: number): Promise<void> {
    this.#check('cache', offset, length);
    if (length === 0 || !this.#impl.cache) return;
    await this.#errors.call('cache', () => this.#impl.cache!(offset, length, flags));
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#impl.close) await this.#errors.call('close', () => this.#impl.close!());
  }
}

/** A plugin's extents answer, checked (a TypeError names what is wrong) and cut at the end of the device. */
function checkedExtents(got: unknown, offset: number, size: number): Extent[] {
  if (!Array.isArray(got) || got.length === 0) throw new TypeError('extents() must return a non-empty list of extents');
  const out: Extent[] = [];
  let pos = offset;
  for (const e of got as Extent[]) {
    if (pos >= size) break;
    if (typeof e !== 'object' || e === null || e.offset !== pos || !Number.isSafeInteger(e.length) || e.length <= 0) {
      throw new TypeError(`extents() returned ${JSON.stringify(e)} where a contiguous extent at ${pos} was expected`);
    }
    const flags = typeof e.flags === 'number' ? e.flags & (EXTENT.HOLE | EXTENT.ZERO) : 0;
    const length = Math.min(e.length, size - pos);
    out.push({ offset: pos, length, flags });
    pos += length;
  }
  return out;
}

/** A filter plugin's device, every call of which maps what the plugin throws. */
export class GuardedFilter extends FilterDevice {
  readonly #errors: PluginErrors;
  constructor(inner: BlockDevice, errors: PluginErrors) {
    super(inner);
    this.#errors = errors;
  }
  override read(buf: Buffer, offset: number, flags: number): Promise<void> {
    return this.#errors.call('read', () => this.next.read(buf, offset, flags));
  }
  override write(data: Buffer, offset: number, flags: number): Promise<void> {
    return this.#errors.call('write', () => this.next.write(data, offset, flags));
  }
  override flush(flags: number): Promise<void> {
    return this.#errors.call('flush', () => this.next.flush(flags));
  }
  override trim(offset: number, length: number, flags: number): Promise<void> {
    return this.#errors.call('trim', () => this.next.trim(offset, length, flags));
  }
  override zero(offset: number, length: number, flags: number): Promise<void> {
    return this.#errors.call('zero', () => this.next.zero(offset, length, flags));
  }
  override extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    return this.#errors.call('extents', () => this.next.extents(offset, length, flags));
  }
  override cache(offset: number, length: number, flags: number): Promise<void> {
    return this.#errors.call('cache', () => this.next.cache(offset, length, flags));
  }
  override close(): Promise<void> {
    return this.#errors.call('close', () => this.next.close());
  }
}

/**
 * Checks a plugin module (what a dynamic import gave) and returns its default export. `where`
 * names the module in errors (its path). Refuses, with a message saying what to do, a
 * module without a default export, one without `apiVersion`, and one of another API
 * version.
 */
export function pluginOf(mod: unknown, where: string): Plugin {
  const def = typeof mod === 'object' && mod !== null ? (mod as { default?: unknown }).default : undefined;
  if (typeof def !== 'object' || def === null) {
    throw new BlockError('EINVAL', `${where}: not a blockgate plugin: no default export (export default defineBackend({...}) or defineFilter({...}) from 'blockgate/plugin')`);
  }
  const p = def as Partial<Plugin> & Record<string, unknown>;
  if (p.apiVersion === undefined) {
    throw new BlockError('EINVAL', `${where}: not a blockgate plugin: the default export has no apiVersion (declare it with defineBackend or defineFilter from 'blockgate/plugin')`);
  }
  if (p.apiVersion !== PLUGIN_API_VERSION) {
    const advice = typeof p.apiVersion === 'number' && p.apiVersion > PLUGIN_API_VERSION ? 'upgrade blockgate' : 'update the plugin to this API (docs/PLUGINS.md)';
    throw new BlockError(
      'EINVAL',
      `${where}: plugin API version ${String(p.apiVersion)} is not supported: this blockgate implements plugin API version ${PLUGIN_API_VERSION}; ${advice}`,
    );
  }
  if (p.kind !== 'backend' && p.kind !== 'filter') throw new BlockError('EINVAL', `${where}: kind must be 'backend' or 'filter', got ${String(p.kind)}`);
  if (typeof p.name !== 'string' || p.name === '') throw new BlockError('EINVAL', `${where}: the plugin has no name`);
  if (!fn(p.open)) throw new BlockError('EINVAL', `${where}: plugin ${p.name} has no open() function`);
  if (p.settings !== undefined && (typeof p.settings !== 'object' || p.settings === null)) {
    throw new BlockError('EINVAL', `${where}: plugin ${p.name}: settings must be an object of valibot schemas`);
  }
  return p as Plugin;
}

/**
 * Parses a plugin layer's settings: `desc` minus `type` and the keys in `omit` (`path`
 * of a `{ type: 'plugin', path }` layer), command-line strings converted to what the
 * entries expect, validated by the entries (unknown keys refused), errors naming the
 * plugin and the key: `mydisk: size: ...`.
 */
function pluginSettings(plugin: Plugin, desc: LayerDescription, omit: readonly string[]): Record<string, unknown> {
  const entries = plugin.settings ?? {};
  const given: Record<string, unknown> = {};
  const strings: Record<string, string> = {};
  for (const [k, val] of Object.entries(desc)) {
    if (k === 'type' || omit.includes(k)) continue;
    if (typeof val === 'string') strings[k] = val;
    else given[k] = val;
  }
  const parsed = parseSettings(plugin.name, settingsSchema(entries), { type: desc.type, ...given, ...coerceSettingStrings(entries, strings) }) as Record<string, unknown>;
  const { type: _type, ...settings } = parsed;
  return settings;
}

async function opened<T>(plugin: Plugin, errors: PluginErrors, open: () => T | Promise<T>): Promise<T> {
  try {
    return await open();
  } catch (e) {
    const b = isBlockError(e) ? e : errors.map('open', e);
    throw b.message.startsWith(`${plugin.name}:`) ? b : new BlockError(b.code, `${plugin.name}: ${b.message}`, { cause: e });
  }
}

/** The BackendFactory of a backend plugin. `omit`: keys of the layer that are not the plugin's settings. */
export function backendFactoryOf(plugin: BackendPlugin, opts: AdapterOptions = {}, omit: readonly string[] = []): BackendFactory {
  return async (desc: LayerDescription, ctx: StackContext) => {
    const settings = pluginSettings(plugin, desc, omit);
    const errors = new PluginErrors(plugin.name, opts.logger);
    const impl = await opened(plugin, errors, () => plugin.open(settings as never, ctx));
    return new PluginBackendAdapter(impl, plugin.name, errors);
  };
}

/** The FilterFactory of a filter plugin. */
export function filterFactoryOf(plugin: FilterPlugin, opts: AdapterOptions = {}, omit: readonly string[] = []): FilterFactory {
  return async (next: BlockDevice, desc: LayerDescription, ctx: StackContext) => {
    const settings = pluginSettings(plugin, desc, omit);
    const errors = new PluginErrors(plugin.name, opts.logger);
    const dev = await opened(plugin, errors, () => plugin.open(next, settings as never, ctx));
    if (typeof dev !== 'object' || dev === null || !fn(dev.read) || typeof dev.capabilities !== 'object') {
      throw new BlockError('EINVAL', `${plugin.name}: open() must return a device (extend PluginFilter from 'blockgate/plugin')`);
    }
    return new GuardedFilter(dev, errors);
  };
}

/** Loads a plugin module by path (the CLI loader imports it). */
export type PluginModuleLoader = (path: string) => Promise<unknown>;

const PathSetting = v.pipe(v.string('expected a path string'), v.minLength(1, 'must not be empty'));

function pathOf(desc: LayerDescription): string {
  const r = v.safeParse(PathSetting, desc.path);
  if (!r.success) throw new BlockError('EINVAL', `plugin: path: ${desc.path === undefined ? 'required setting is missing (the plugin module to load)' : r.issues[0].message}`);
  return r.output;
}

async function loadKind<K extends Plugin['kind']>(load: PluginModuleLoader, path: string, kind: K): Promise<Extract<Plugin, { kind: K }>> {
  let mod: unknown;
  try {
    mod = await load(path);
  } catch (e) {
    throw new BlockError('EINVAL', `plugin: ${path}: cannot load: ${(e as Error).message ?? String(e)}`, { cause: e });
  }
  const p = pluginOf(mod, path);
  if (p.kind !== kind) throw new BlockError('EINVAL', `plugin: ${path}: is a ${p.kind} plugin, not a ${kind}`);
  return p as Extract<Plugin, { kind: K }>;
}

/** The `plugin` backend: `{ type: 'plugin', path, ...settings }`, the module loaded with `load`. */
export function pluginBackend(load: PluginModuleLoader, opts: AdapterOptions = {}): BackendFactory {
  return async (desc, ctx) => {
    const plugin = await loadKind(load, pathOf(desc), 'backend');
    return backendFactoryOf(plugin, opts, ['path'])(desc, ctx);
  };
}

/** The `plugin` filter: `{ type: 'plugin', path, ...settings }`. */
export function pluginFilter(load: PluginModuleLoader, opts: AdapterOptions = {}): FilterFactory {
  return async (next, desc, ctx) => {
    const plugin = await loadKind(load, pathOf(desc), 'filter');
    return filterFactoryOf(plugin, opts, ['path'])(next, desc, ctx);
  };
}
