export * from './limits.js';
export * from './server.js';
export * from './session.js';
export * from './tls.js';
export * from './access.js';
export * from './metrics.js';
