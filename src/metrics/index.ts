export * from './histogram.js';
export * from './figures.js';
export * from './server-metrics.js';
export * from './registry.js';
export * from './sampler.js';
