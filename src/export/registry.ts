/**
 * The default registry: every built-in backend and filter, by the name a stack uses.
 * It sits above both folders (a filter such as cow that builds a stack of its own gets
 * the registry through its StackContext, never by importing this module).
 */
import { BACKENDS } from '../backends/index.js';
import { buildStack, newStackContext, type BackendFactory, type FilterFactory, type StackContext, type StackDescription, type StackRegistry } from '../device/stack.js';
import type { BlockDevice } from '../device/types.js';
import { FILTERS } from '../filters/index.js';
import { recordStackErrseq } from './export.js';

/** The built-in backends and filters. */
export const defaultRegistry: StackRegistry = Object.freeze({ backends: BACKENDS, filters: FILTERS });

/**
 * A registry with more backends and filters than `base` (a later name replaces an
 * earlier one): how layers from folders above this one (the `nbd` backend of
 * src/nbd, which speaks a protocol this folder may not import) join the built-ins.
 */
export function extendRegistry(
  base: StackRegistry,
  more: { readonly backends?: Readonly<Record<string, BackendFactory>>; readonly filters?: Readonly<Record<string, FilterFactory>> },
): StackRegistry {
  return Object.freeze({
    backends: new Map([...base.backends, ...Object.entries(more.backends ?? {})]),
    filters: new Map([...base.filters, ...Object.entries(more.filters ?? {})]),
  });
}

/** Builds a device stack from plain data with the built-in backends and filters (or `registry`'s). */
export async function createStack(desc: StackDescription, ctx: StackContext = newStackContext(), registry: StackRegistry = defaultRegistry): Promise<BlockDevice> {
  const device = await buildStack(desc, registry, ctx);
  recordStackErrseq(device, ctx.errseq);
  return device;
}
