export * from './readonly.js';
export * from './registry.js';
