/**
 * The rbd backend: an RBD image of a Ceph cluster, through librbd (docs/CEPH.md).
 *
 * This module only validates settings and builds the device: it imports ./device.js and
 * ./librbd.js, which load koffi and the Ceph libraries on the first open, never at import.
 */
import * as v from 'valibot';
import type { LayerDescription } from '../../device/stack.js';
import { booleanSetting, parseSettings, pathSetting, settingsSchema } from '../../device/settings.js';
import { RbdDevice } from './device.js';

export { RbdDevice, RadosClient, createImage, RBD_OSD_OP_TIMEOUT_S, RBD_CONNECT_TIMEOUT_S } from './device.js';
export { LIBRBD_PACKAGE } from './librbd.js';

/** Most seconds the `timeout` setting may be: one hour. */
export const RBD_TIMEOUT_MAX_S = 3600;

/** A pool or image name: what `rbd` accepts, without `/` or `@` (a snapshot) in it. */
const nameSetting = v.pipe(
  v.string((issue) => `expected a name, got ${issue.received}`),
  v.regex(/^[^/@\s]+$/, 'must be a non-empty name without "/", "@" or spaces'),
);

/** The settings schema (listed by `blockgate plugins`). */
export const rbdSettings = settingsSchema({
  pool: nameSetting,
  image: nameSetting,
  conf: v.optional(pathSetting),
  id: v.optional(v.pipe(v.string(), v.regex(/^[^\s.][^\s]*$/, 'expected a cephx user name without "client.", e.g. admin'))),
  keyring: v.optional(pathSetting),
  readonly: booleanSetting,
  cache: booleanSetting,
  timeout: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(RBD_TIMEOUT_MAX_S))),
  options: v.optional(v.record(v.string(), v.string())),
});

/**
 * Parses `rbd:POOL/IMAGE` (the command line's short form) into a layer description;
 * throws a message that shows the expected form.
 */
export function parseRbdSpec(arg: string): { pool: string; image: string } {
  const m = /^([^/@\s]+)\/([^/@\s]+)$/.exec(arg);
  if (!m) throw new Error(`rbd: expected POOL/IMAGE, e.g. rbd:rbd/disk1, got '${arg}'`);
  return { pool: m[1]!, image: m[2]! };
}

/** Backend factory: `{ type: 'rbd', pool, image, conf?, id?, keyring?, readonly?, cache?, timeout?, options? }`. */
export async function rbdBackend(desc: LayerDescription): Promise<RbdDevice> {
  const s = parseSettings('rbd', rbdSettings, desc);
  return await RbdDevice.open({
    pool: s.pool,
    image: s.image,
    ...(s.conf !== undefined ? { conf: s.conf } : {}),
    ...(s.id !== undefined ? { id: s.id } : {}),
    ...(s.keyring !== undefined ? { keyring: s.keyring } : {}),
    readonly: s.readonly ?? false,
    cache: s.cache ?? false,
    ...(s.timeout !== undefined ? { timeout: s.timeout } : {}),
    ...(s.options !== undefined ? { options: s.options } : {}),
  });
}
