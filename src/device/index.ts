export * from './types.js';
export * from './validate.js';
export * from './filter.js';
export * from './size.js';
export * from './stack.js';
export * from './settings.js';
export * from './defaults.js';
export * from './settings-info.js';
