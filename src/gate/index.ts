export * from './constants.js';
export * from './clock.js';
export * from './gate-registry.js';
export * from './gate-device.js';
export type { GateStartRequest, GateStartCanceled, GateStartNoMem, GateStartResult } from './gate-unit.js';
