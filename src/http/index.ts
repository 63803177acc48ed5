export * from './address.js';
export * from './server.js';
