/**
 * Each built-in filter's settings schema, by the name FILTERS registers it under: what
 * `blockgate plugins` lists (and `--filter NAME:key=value` converts values with). A
 * filter in FILTERS without an entry here is listed as "settings not described";
 * test/cli/plugins-command.test.ts wants none.
 */
import type { GenericSchema } from 'valibot';
import { cowSettings } from './cow.js';
import { delaySettings } from './delay.js';
import { errorSettings } from './error.js';
import { logSettings } from './log.js';
import { rateSettings } from './rate.js';
import { readonlySettings } from './readonly.js';
import { statsSettings } from './stats.js';
import { writebackSettings } from './writeback.js';
import { offsetSettings } from './offset.js';
import { partitionSettings } from './partition.js';
import { truncateSettings } from './truncate.js';
import { blocksizeSettings } from './blocksize.js';

export const FILTER_SETTINGS: ReadonlyMap<string, GenericSchema> = new Map<string, GenericSchema>([
  ['readonly', readonlySettings],
  ['writeback', writebackSettings],
  ['error', errorSettings],
  ['cow', cowSettings],
  ['delay', delaySettings],
  ['rate', rateSettings],
  ['stats', statsSettings],
  ['log', logSettings],
  ['offset', offsetSettings],
  ['partition', partitionSettings],
  ['truncate', truncateSettings],
  ['blocksize', blocksizeSettings],
]);
