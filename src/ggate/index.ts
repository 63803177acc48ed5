export * from './protocol.js';
export * from './validate.js';
export * from './exports.js';
export * from './ggated.js';
