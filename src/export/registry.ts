/**
 * The default registry: every built-in backend and filter, by the name a stack uses.
 * It sits above both folders (a filter such as cow that builds a stack of its own gets
 * the registry through its StackContext, never by importing this module).
 */
import { BACKENDS } from '../backends/index.js';
import { buildStack, type StackContext, type StackDescription, type StackRegistry } from '../device/stack.js';
import type { BlockDevice } from '../device/types.js';
import { FILTERS } from '../filters/index.js';

/** The built-in backends and filters. */
export const defaultRegistry: StackRegistry = Object.freeze({ backends: BACKENDS, filters: FILTERS });

/** Builds a device stack from plain data with the built-in backends and filters. */
export function createStack(desc: StackDescription, ctx?: StackContext): Promise<BlockDevice> {
  return buildStack(desc, defaultRegistry, ctx);
}
