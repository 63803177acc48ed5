/** The built-in backends and the name each is registered under. */
import type { BackendFactory } from '../device/stack.js';
import { fileBackend } from './file.js';
import { memoryBackend } from './memory.js';
import { nullBackend } from './null.js';
import { patternBackend } from './pattern.js';


export * from './memory.js';
export * from './file.js';
export * from './null.js';
export * from './pattern.js';

/** Backend factories by the `type` a layer description names. */
export const BACKENDS: ReadonlyMap<string, BackendFactory> = new Map<string, BackendFactory>([
  ['memory', memoryBackend],
  ['file', fileBackend],
  ['null', nullBackend],
  ['pattern', patternBackend],
]);
