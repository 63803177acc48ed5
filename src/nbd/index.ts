export * from './limits.js';
export * from './server.js';
export * from './session.js';
