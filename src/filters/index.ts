/** The built-in filters and the name each is registered under. */
import type { FilterFactory } from '../device/stack.js';
import { cowFilter } from './cow.js';
import { delayFilter } from './delay.js';
import { logFilter } from './log.js';
import { rateFilter } from './rate.js';
import { statsFilter } from './stats.js';
import { errorFilter } from './error.js';
import { readonlyFilter } from './readonly.js';
import { writebackFilter } from './writeback.js';
import { offsetFilter } from './offset.js';
import { partitionFilter } from './partition.js';
import { truncateFilter } from './truncate.js';
import { blocksizeFilter } from './blocksize.js';

export * from './readonly.js';
export * from './writeback.js';
export * from './error.js';
export * from './cow.js';
export * from './delay.js';
export * from './rate.js';
export * from './stats.js';
export * from './log.js';
export * from './offset.js';
export * from './partition.js';
export * from './partition-table.js';
export * from './truncate.js';
export * from './blocksize.js';

/** Filter factories by the `type` a layer description names. */
export const FILTERS: ReadonlyMap<string, FilterFactory> = new Map<string, FilterFactory>([
  ['readonly', readonlyFilter],
  ['writeback', writebackFilter],
  ['error', errorFilter],
  ['cow', cowFilter],
  ['delay', delayFilter],
  ['rate', rateFilter],
  ['stats', statsFilter],
  ['log', logFilter],
  ['offset', offsetFilter],
  ['partition', partitionFilter],
  ['truncate', truncateFilter],
  ['blocksize', blocksizeFilter],
]);

/** Each filter's settings schema (src/filters/settings-registry.ts). */
export { FILTER_SETTINGS } from './settings-registry.js';
