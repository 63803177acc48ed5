/** The backend contract now lives in src/testing (exported as `blockgate/testing`); re-exported for the backends' tests. */
export * from '../../src/testing/contract.js';
