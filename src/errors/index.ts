export * from './errno.js';
export * from './block-error.js';
