/**
 * The `s3` backend (device.ts), its settings (settings.ts), the S3 requests (client.ts)
 * and the writer's lease (lease.ts). The AWS SDK is loaded only when an s3 export opens.
 */
import type { LayerDescription, StackContext } from '../../device/stack.js';
import { S3Device, type S3DeviceEvent } from './device.js';
import { resolveS3Settings } from './settings.js';

export * from './device.js';
export * from './settings.js';
export { S3_MAX_INFLIGHT, S3_MAX_ATTEMPTS, S3Store, loadS3Sdk } from './client.js';
export { S3_LEASE_TTL_MS, S3_LEASE_RENEW_MS, S3_LEASE_MARGIN_MS } from './lease.js';

/**
 * Backend factory: `{ type: 's3', bucket, prefix?, endpoint?, region?, accessKeyId?,
 * secretAccessKey?, forcePathStyle?, chunkSize?, size?, readonly?, requestTimeout? }`.
 * The stack's `readOnly` (a readonly filter above, or an export served read-only) opens
 * it as a reader: no lease.
 */
export function s3BackendWith(onEvent?: (e: S3DeviceEvent, where: string) => void) {
  return async (desc: LayerDescription, ctx: StackContext): Promise<S3Device> => {
    const o = resolveS3Settings(desc);
    const where = `s3://${o.bucket}/${o.prefix}`;
    return await S3Device.open({
      ...o,
      readonly: o.readonly || ctx.readOnly === true,
      errseq: ctx.errseq,
      ...(onEvent ? { onEvent: (e: S3DeviceEvent) => onEvent(e, where) } : {}),
    });
  };
}

/** The factory without event logging. */
export const s3Backend = s3BackendWith();
