export * from './readonly.js';
export * from './writeback.js';
export * from './error.js';
export * from './cow.js';
export * from './registry.js';
