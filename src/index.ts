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
} from './filters/index.js';
export type { WritebackOptions, ErrorOptions, CowOptions } from './filters/index.js';
export * from './nbd/constants.js';
export { Export, defaultRegistry, createStack } from './export/index.js';
export type { ExportOptions, SessionStatus } from './export/index.js';
export { NbdServer, NbdSession, DEFAULT_LIMITS } from './nbd/index.js';
export type { ServerLimits, NbdServerOptions, ListenAddress, ListenerOptions } from './nbd/index.js';
export { loadTls, parsePskFile, TLS_MODES } from './nbd/tls.js';
export type { TlsMode, TlsOptions, ServerTls, TlsPeer } from './nbd/tls.js';
export type { ExportPolicySpec } from './nbd/access.js';
export type { AddressRuleSpec } from './io/address-rules.js';
export { NbdClient, CLIENT_DEFAULTS } from './nbd/client.js';
export type { NbdClientOptions, CallOptions, Extent as NbdExtent, ClientTls, NegotiatedExport } from './nbd/client.js';
export { NbdDevice, nbdBackend, nbdBackendWith, parseNbdSettings, NBD_BACKEND_DEFAULTS, MAX_NBD_RETRIES } from './nbd/nbd-backend.js';
export type { NbdDeviceOptions, NbdDeviceEvent } from './nbd/nbd-backend.js';
export { serveRegistry } from './cli/registry.js';
export { parseNbdUri, formatNbdUri } from './nbd/uri.js';
export {
  copyImage,
  openCopySource,
  openCopyDestination,
  nbdSource,
  nbdDestination,
  fileSource,
  fileDestination,
  nullDestination,
  streamSource,
  streamDestination,
  CopyError,
  COPY_DEFAULTS,
} from './nbd/copy.js';
export type { CopySource, CopyDestination, CopyOptions, CopyResult, CopySide } from './nbd/copy.js';
export type { NbdUri, NbdTransport } from './nbd/uri.js';
export * from './gate/index.js';
export * from './ggate/index.js';
export {
  serveGate,
  connectControl,
  ControlClient,
  DEFAULT_GATE_CONCURRENCY,
  DEFAULT_GATE_BUFFER_SIZE,
  MAX_GATE_CONCURRENCY,
} from './gate/handler.js';
export type { GateCalls, GateHandler, ServeGateOptions, ServeGateResult, ServeGateEvent, Versioned } from './gate/handler.js';
export {
  ControlServer,
  startControlServer,
  defaultControlPath,
  CONTROL_SOCKET_MODE,
  CONTROL_DIR_MODE,
  CONTROL_CLOSE_GRACE_MS,
} from './gate/control/server.js';
export type { ControlServerOptions, ControlHandle, StartControlOptions } from './gate/control/server.js';
export { GateService, GateExport, GateExportDevice } from './gate/control/gates.js';
export type { StatusReport, ExportStatus } from './gate/control/gates.js';
export { CONTROL, CONTROL_OP } from './gate/control/protocol.js';
export { serveGgatec, connectGgatec, GGATEC } from './ggate/ggatec.js';
export type { GgatecOptions, GgatecResult, GgatecEvent, GgatecTarget } from './ggate/ggatec.js';
