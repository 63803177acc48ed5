/**
 * The registry `blockgate serve` builds stacks with: the built-ins plus the `nbd`
 * backend, which lives in src/nbd (it speaks the protocol, and src/backends and
 * src/export may not import src/nbd), so it joins here, above both.
 */
import type { Logger } from 'pino';
import { defaultRegistry, extendRegistry } from '../export/registry.js';
import type { StackRegistry } from '../device/index.js';
import { nbdBackend, nbdBackendWith, type NbdDeviceEvent } from '../nbd/nbd-backend.js';

/** Every built-in backend and filter, and `nbd`. */
export const serveRegistry: StackRegistry = extendRegistry(defaultRegistry, { backends: { nbd: nbdBackend } });

/** Logs an nbd device's losses (warn), reconnections (info) and the writes put at risk (error). */
export function logNbdEvent(log: Logger, e: NbdDeviceEvent, remote: string): void {
  switch (e.kind) {
    case 'lost':
      log.warn({ remote, reason: e.cause.message }, 'nbd backend: connection lost, reconnecting');
      break;
    case 'attempt-failed':
      log.info({ remote, attempt: e.attempt, reason: e.error.message }, 'nbd backend: reconnection attempt failed');
      break;
    case 'reconnected':
      log.info({ remote, attempt: e.attempt, unflushedWrites: e.unflushedWrites }, 'nbd backend: reconnected');
      break;
    case 'gave-up':
      log.error({ remote, reason: e.error.message }, 'nbd backend: reconnection failed; requests fail with EIO');
      break;
    case 'writes-at-risk':
      log.error({ remote, writes: e.writes, reason: e.message }, 'nbd backend: acknowledged writes may be lost; EIO recorded for every session\'s next FLUSH');
      break;
  }
}

/** {@link serveRegistry} whose nbd devices log to `log`. */
export function serveRegistryLogging(log: Logger): StackRegistry {
  return extendRegistry(defaultRegistry, { backends: { nbd: nbdBackendWith((e, remote) => logNbdEvent(log, e, remote)) } });
}
