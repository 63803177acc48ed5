/**
 * `blockgate/testing`: the contract suite every built-in backend runs, for plugin authors'
 * tests with node:test (docs/PLUGINS.md, "Testing"):
 *
 *   import { runContract } from 'blockgate/testing';
 *   runContract('mydisk', async () => ({ dev: await openPlugin(plugin, { size: '1M' }), cleanup: async () => {} }));
 */
export { runContract, checkExtents, MIN_CONTRACT_SIZE } from './contract.js';
export type { ContractOptions, DeviceUnderTest } from './contract.js';
export { openPlugin } from './open.js';
