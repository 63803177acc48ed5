/** The built-in filters and the name each is registered under. */
import type { FilterFactory } from '../device/stack.js';
import { cowFilter } from './cow.js';
import { errorFilter } from './error.js';
import { readonlyFilter } from './readonly.js';
import { writebackFilter } from './writeback.js';

export * from './readonly.js';
export * from './writeback.js';
export * from './error.js';
export * from './cow.js';

/** Filter factories by the `type` a layer description names. */
export const FILTERS: ReadonlyMap<string, FilterFactory> = new Map<string, FilterFactory>([
  ['readonly', readonlyFilter],
  ['writeback', writebackFilter],
  ['error', errorFilter],
  ['cow', cowFilter],
]);
