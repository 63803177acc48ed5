export * from './export.js';
export * from './limits.js';
export * from './nbd-server.js';
export * from './nbd-session.js';
export * from './ggated.js';
