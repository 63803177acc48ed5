import { BlockError, toBlockError } from '../errors/index.js';
import { ErrSeq } from '../errseq/index.js';
import type { BlockDevice } from './types.js';

/**
 * What every layer of one export's stack shares: the export's write-back error
 * sequence. A layer that fails where no client gets the failure as the reply to its own
 * request (a background write-back, say) records it here with `errseq.set`, and every
 * session of the export hears of it once, at its next FLUSH.
 */
export interface StackContext {
  readonly errseq: ErrSeq;
  /**
   * The registry the stack is being built with. `buildStack` sets it for every layer it
   * makes, so a layer that builds a stack of its own (cow's upper store) uses the same
   * backends and filters without importing a registry (which would import it back).
   */
  readonly registry?: StackRegistry;
  /**
   * Nothing will write through this stack: it has a `readonly` filter, or its export is
   * served read-only. `buildStack` sets it for the first case itself. A backend that
   * needs something only a writer needs (the s3 backend's single-writer lease) can then
   * open without it, so any number of such read-only stacks can share the storage.
   */
  readonly readOnly?: boolean;
}

/** A fresh context, for stacks built outside an export (tests, tools). */
export function newStackContext(): StackContext {
  return { errseq: new ErrSeq() };
}

/**
 * A plain description of one layer: its `type` (a registered backend or filter name)
 * and its own settings, e.g. `{ type: 'memory', size: '1G' }`.
 */
export interface LayerDescription {
  readonly type: string;
  readonly [key: string]: unknown;
}

/**
 * A device stack as plain data (what a config file holds): the backend at the bottom
 * and the filters above it, listed top (nearest the client) first.
 */
export interface StackDescription {
  readonly backend: LayerDescription;
  readonly filters?: readonly LayerDescription[];
}

/** Makes a backend from its description. Throws BlockError EINVAL naming bad settings. */
export type BackendFactory = (desc: LayerDescription, ctx: StackContext) => Promise<BlockDevice> | BlockDevice;
/** Makes a filter over `next` from its description. */
export type FilterFactory = (
  next: BlockDevice,
  desc: LayerDescription,
  ctx: StackContext,
) => Promise<BlockDevice> | BlockDevice;

/** The backends and filters a stack may name. */
export interface StackRegistry {
  readonly backends: ReadonlyMap<string, BackendFactory>;
  readonly filters: ReadonlyMap<string, FilterFactory>;
}

/**
 * A layer of a stack failed to build. The message is the layer's own (it names the layer
 * type and the bad key, e.g. "memory: size: ..."); `layer` says where in the description
 * the layer is (`backend` or `filters[1]`), so a caller holding the description's own
 * location (a config file's `exports[0]`) can name the whole key path.
 */
export class StackLayerError extends BlockError {
  readonly layer: string;
  constructor(layer: string, cause: BlockError) {
    super(cause.code, cause.message, { cause });
    this.layer = layer;
  }
}

function layerError(layer: string, e: unknown): BlockError {
  return new StackLayerError(layer, toBlockError(e));
}

/**
 * Builds a device stack: the backend first, then the filters from the bottom of the
 * list (nearest the backend) up. If a layer fails to build, the layers already built
 * are closed before the error is thrown.
 */
export async function buildStack(
  desc: StackDescription,
  registry: StackRegistry,
  ctx: StackContext = newStackContext(),
): Promise<BlockDevice> {
  const makeBackend = registry.backends.get(desc.backend.type);
  if (!makeBackend) {
    throw layerError(
      'backend',
      new BlockError('EINVAL', `unknown backend '${desc.backend.type}' (known: ${[...registry.backends.keys()].join(', ')})`),
    );
  }
  const readOnly = ctx.readOnly === true || (desc.filters ?? []).some((f) => f.type === 'readonly');
  const layerCtx: StackContext = { ...ctx, registry, ...(readOnly ? { readOnly } : {}) };
  let dev: BlockDevice;
  try {
    dev = await makeBackend(desc.backend, layerCtx);
  } catch (e) {
    throw layerError('backend', e);
  }
  const filters = desc.filters ?? [];
  try {
    for (let i = filters.length - 1; i >= 0; i--) {
      const f = filters[i]!;
      const makeFilter = registry.filters.get(f.type);
      if (!makeFilter) {
        throw layerError(
          `filters[${i}]`,
          new BlockError('EINVAL', `unknown filter '${f.type}' (known: ${[...registry.filters.keys()].join(', ')})`),
        );
      }
      try {
        dev = await makeFilter(dev, f, layerCtx);
      } catch (e) {
        throw layerError(`filters[${i}]`, e);
      }
    }
  } catch (e) {
    await dev.close().catch(() => undefined);
    throw e;
  }
  return dev;
}
