/**
 * The base class of a backend plugin's device. A plugin extends it and implements
 * `size` and `read`; every other method is optional, and what it implements decides
 * what the device offers (docs/PLUGINS.md, "Capabilities and defaults"):
 *
 *   class MyDisk extends PluginDevice {
 *     readonly size = 1 << 20;
 *     read(buf, offset) { buf.fill(0); }
 *   }
 *
 * It has no behaviour of its own on purpose: the adapter (adapter.ts) looks at which
 * methods exist, so the base class must not define any of them. The optional members
 * (write, flush, trim, zero, extents, cache, close, durableWrites, blockSize, fastZero,
 * multiConn, description) are those of PluginBackendDevice; they are not declared here,
 * so that a subclass implements them without `override` (under noImplicitOverride), and
 * `open`'s return type checks their types.
 */
import type { PluginBackendDevice } from './api.js';

export abstract class PluginDevice implements PluginBackendDevice {
  /** Size in bytes. */
  abstract readonly size: number;
  /** Fills `buf` with the `buf.length` bytes at `offset` (already checked to be inside the device). */
  abstract read(buf: Buffer, offset: number, flags: number): Promise<void> | void;
}
