/**
 * The default registry: every built-in backend and filter, by the name a stack uses.
 * It sits above both folders (a filter such as cow that builds a stack of its own gets
 * the registry through its StackContext, never by importing this module).
 */
import { BACKENDS } from '../backends/index.js';
import { buildStack, newStackContext, type StackContext, type StackDescription, type StackRegistry } from '../device/stack.js';
import type { BlockDevice } from '../device/types.js';
import { FILTERS } from '../filters/index.js';
import { recordStackErrseq } from './export.js';

/** The built-in backends and filters. */
export const defaultRegistry: StackRegistry = Object.freeze({ backends: BACKENDS, filters: FILTERS });

/** Builds a device stack from plain data with the built-in backends and filters. */
export async function createStack(desc: StackDescription, ctx: StackContext = newStackContext()): Promise<BlockDevice> {
  const device = await buildStack(desc, defaultRegistry, ctx);
  recordStackErrseq(device, ctx.errseq);
  return device;
}
