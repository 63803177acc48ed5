export * from './export.js';
export * from './registry.js';
export * from './flush.js';
export * from './error-log.js';
