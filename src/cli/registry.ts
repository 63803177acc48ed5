/**
 * The registry `blockgate serve` builds stacks with: the built-ins plus the `nbd`
 * backend, which lives in src/nbd (it speaks the protocol, and src/backends and
 * src/export may not import src/nbd), so it joins here, above both, and the `plugin`
 * backend and filter (a module loaded by path, src/cli/plugin-loader.ts).
 */
import type { Logger } from 'pino';
import { defaultRegistry, extendRegistry } from '../export/registry.js';
import type { StackRegistry } from '../device/index.js';
import type { GenericSchema } from 'valibot';
import { nbdBackend, nbdBackendWith, nbdSettings, type NbdDeviceEvent } from '../nbd/nbd-backend.js';
import { BACKEND_SETTINGS, s3BackendWith, type S3DeviceEvent } from '../backends/index.js';
import { FILTER_SETTINGS } from '../filters/index.js';
import { pluginLayers } from './plugin-loader.js';

/** Every built-in backend and filter, `nbd`, and `plugin`. */
export const serveRegistry: StackRegistry = withPlugins(extendRegistry(defaultRegistry, { backends: { nbd: nbdBackend } }));

/** The settings schemas of serveRegistry's built-in layers (`plugin` has the plugin's own). */
export const serveSettings: { readonly backends: ReadonlyMap<string, GenericSchema>; readonly filters: ReadonlyMap<string, GenericSchema> } = {
  backends: new Map([...BACKEND_SETTINGS, ['nbd', nbdSettings]]),
  filters: FILTER_SETTINGS,
};

function withPlugins(registry: StackRegistry, log?: Logger): StackRegistry {
  return extendRegistry(registry, pluginLayers(log));
}

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

/** Logs an s3 device's failed uploads (recorded for every session's next FLUSH) and a lost lease. */
export function logS3Event(log: Logger, e: S3DeviceEvent, where: string): void {
  if (e.kind === 'upload-failed') log.error({ export: where, chunk: e.chunk, reason: e.error.message }, 's3 backend: upload failed; the error is recorded for every session\'s next FLUSH and the chunk kept for a retry');
  else log.error({ export: where, reason: e.error.message }, 's3 backend: write lease lost; writes are refused');
}

/** {@link serveRegistry} whose nbd and s3 devices log to `log`. */
export function serveRegistryLogging(log: Logger): StackRegistry {
  return withPlugins(
    extendRegistry(defaultRegistry, {
      backends: { nbd: nbdBackendWith((e, remote) => logNbdEvent(log, e, remote)), s3: s3BackendWith((e, where) => logS3Event(log, e, where)) },
    }),
    log,
  );
}
