/** The default registry: every built-in backend and filter, by the name a stack uses. */
import { BACKENDS } from '../backends/index.js';
import {
  buildStack,
  type FilterFactory,
  type StackContext,
  type StackDescription,
  type StackRegistry,
} from '../device/stack.js';
import type { BlockDevice } from '../device/types.js';
import { cowFilter } from './cow.js';
import { errorFilter } from './error.js';
import { readonlyFilter } from './readonly.js';
import { writebackFilter } from './writeback.js';

/** Filter factories by the `type` a layer description names. */
export const FILTERS: ReadonlyMap<string, FilterFactory> = new Map<string, FilterFactory>([
  ['readonly', readonlyFilter],
  ['writeback', writebackFilter],
  ['error', errorFilter],
  ['cow', cowFilter],
]);

/** The built-in backends and filters. */
export const defaultRegistry: StackRegistry = Object.freeze({ backends: BACKENDS, filters: FILTERS });

/** Builds a device stack from plain data with the built-in backends and filters. */
export function createStack(desc: StackDescription, ctx?: StackContext): Promise<BlockDevice> {
  return buildStack(desc, defaultRegistry, ctx);
}
