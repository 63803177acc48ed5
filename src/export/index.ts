export * from './export.js';
export * from './registry.js';
