/** The library surface of blockgate: `import { ... } from 'blockgate'`. */
export * from './errors/index.js';
export * from './errseq/index.js';
export * from './device/index.js';
export {
  MemoryDevice,
  memoryBackend,
  FileDevice,
  fileBackend,
  NullDevice,
  nullBackend,
  PatternDevice,
  patternBackend,
  patternByte,
  fillPattern,
  BACKENDS,
} from './backends/index.js';
export type { MemoryOptions, FileOptions, NullOptions, PatternOptions } from './backends/index.js';
export {
  ReadonlyFilter,
  readonlyFilter,
  WritebackFilter,
  writebackFilter,
  REQ_WRITEBACK,
  DEFAULT_MAX_DIRTY,
  ErrorFilter,
  errorFilter,
  CowFilter,
  cowFilter,
  COW_BLOCK_SIZE,
  FILTERS,
  defaultRegistry,
  createStack,
} from './filters/index.js';
export type { WritebackOptions, ErrorOptions, CowOptions } from './filters/index.js';
export * from './nbd/constants.js';
export { Export, NbdServer, NbdSession, DEFAULT_LIMITS } from './server/index.js';
export type { ExportOptions, ServerLimits, NbdServerOptions, ListenAddress, SessionStatus } from './server/index.js';
export * from './gate/index.js';
export * from './ggate/index.js';
export {
  serveGate,
  connectControl,
  ControlClient,
  DEFAULT_GATE_CONCURRENCY,
  DEFAULT_GATE_BUFFER_SIZE,
  MAX_GATE_CONCURRENCY,
} from './client/gate-handler.js';
export type { GateCalls, GateHandler, ServeGateOptions, ServeGateResult, ServeGateEvent, Versioned } from './client/gate-handler.js';
export {
  ControlServer,
  startControlServer,
  defaultControlPath,
  CONTROL_SOCKET_MODE,
  CONTROL_DIR_MODE,
  CONTROL_CLOSE_GRACE_MS,
} from './server/control-server.js';
export type { ControlServerOptions, ControlHandle, StartControlOptions } from './server/control-server.js';
export { GateService, GateExport, GateExportDevice } from './server/control-gates.js';
export type { StatusReport, ExportStatus } from './server/control-gates.js';
export { CONTROL, CONTROL_OP } from './server/control-protocol.js';
export { serveGgatec, connectGgatec, GGATEC } from './client/ggatec.js';
export type { GgatecOptions, GgatecResult, GgatecEvent, GgatecTarget } from './client/ggatec.js';
