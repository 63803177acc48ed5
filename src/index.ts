/** The library surface of blockgate: `import { ... } from 'blockgate'`. */
export * from './errors/index.js';
export * from './device/index.js';
