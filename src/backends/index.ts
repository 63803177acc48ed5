/** The built-in backends and the name each is registered under. */
import type { BackendFactory } from '../device/stack.js';
import type { GenericSchema } from 'valibot';
import { fileBackend, fileSettings } from './file.js';
import { memoryBackend, memorySettings } from './memory.js';
import { nullBackend, nullSettings } from './null.js';
import { patternBackend, patternSettings } from './pattern.js';
import { rbdBackend, rbdSettings } from './rbd/index.js';
import { s3Backend, s3Settings } from './s3/index.js';


export * from './memory.js';
export * from './file.js';
export * from './null.js';
export * from './pattern.js';
export * from './rbd/index.js';
export * from './s3/index.js';

/** Backend factories by the `type` a layer description names. */
export const BACKENDS: ReadonlyMap<string, BackendFactory> = new Map<string, BackendFactory>([
  ['memory', memoryBackend],
  ['file', fileBackend],
  ['null', nullBackend],
  ['pattern', patternBackend],
  ['rbd', rbdBackend],
  ['s3', s3Backend],
]);

/** Each backend's settings schema, by the same name (what `blockgate plugins` lists). */
export const BACKEND_SETTINGS: ReadonlyMap<string, GenericSchema> = new Map<string, GenericSchema>([
  ['memory', memorySettings],
  ['file', fileSettings],
  ['null', nullSettings],
  ['pattern', patternSettings],
  ['rbd', rbdSettings],
  ['s3', s3Settings],
]);
