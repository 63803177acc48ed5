import { AssertionError } from 'node:assert';
import { BlockError } from '../errors/index.js';
import {
  MAX_DEVICE_SIZE,
  REQ,
  formatSize,
  type BlockDevice,
  type BlockSize,
  type Capabilities,
  type Extent,
  type Operation,
} from '../device/index.js';
import type { GateCommand } from './constants.js';
import type { GateUnit } from './gate-unit.js';

/**
 * The largest single request the gate advertises (BlockSize.maximum), like FreeBSD's
 * kern.maxphys: it bounds the buffer a handler has to grow to. Larger requests are not
 * split; a handler that receives one just grows its buffer further (ENOMEM from start).
 */
export const GATE_MAX_IO_SIZE = 1024 * 1024;

/** The preferred I/O size advertised (raised to the sector size if that is larger). */
export const GATE_PREFERRED_IO_SIZE = 4096;

/**
 * zero() is sent to the handler as WRITEs of zeroes of at most this many bytes each,
 * one after the other. A multiple of every accepted sector size (<= 64 KiB).
 *
 * Why not DELETE: BIO_DELETE is a hint with no promise about what the range reads
 * afterwards, the ggate wire protocol does not carry it (ggatec answers EOPNOTSUPP),
 * and ggatel writes a stale buffer over the range; none of that makes a range read as
 * zeroes. A WRITE of zeroes works with every handler. DELETE is used for trim() only.
 */
export const GATE_ZERO_CHUNK = GATE_MAX_IO_SIZE;

/**
 * The device side of one gate (/dev/ggate<unit>): every request enters the gate's queue
 * and settles when a handler answers it with DONE (or the guard or a destroy fails it).
 * Made by {@link GateRegistry.open}; `close()` releases the open count that makes an
 * unforced destroy fail EBUSY.
 *
 * Requests were validated once, at the protocol edge (validateRequest and
 * checkAlignment in the NBD session, validateGgateRequest in ggated), so this layer
 * only asserts what cannot change since: safe integers and sector alignment
 * (sectorsize is fixed). Access (a read-only gate's EPERM) is gate semantics, not
 * validation, and stays in GateUnit.submit. A failed assertion is a bug in the caller
 * (an AssertionError, never a client-facing errno) and the request does not reach the
 * queue. The range is not asserted against mediasize: a MODIFY may shrink the gate
 * between the edge's check and here, and such a request goes to the handler as
 * FreeBSD passes an in-flight bio to ggate after a resize.
 */
export class GateDevice implements BlockDevice {
  readonly #gate: GateUnit;
  readonly #capabilities: Capabilities;
  readonly #blockSize: BlockSize;
  #closed = false;

  /** Opens `gate`'s device side; fails ENXIO if it is being destroyed. */
  constructor(gate: GateUnit) {
    gate.open();
    this.#gate = gate;
    const writable = !gate.readonly;
    this.#capabilities = Object.freeze({
      write: writable,
      // A read-only gate refuses FLUSH with EPERM (FreeBSD), so it is not advertised.
      flush: writable,
      // Emulated: write, then flush.
      fua: writable,
      trim: writable,
      zero: writable,
      fastZero: false,
      extents: false,
      cache: false,
      // One queue serves every opener and a FLUSH goes to the same handlers as all writes.
      multiConn: true,
    });
    this.#blockSize = Object.freeze({
      minimum: gate.sectorsize,
      preferred: Math.max(gate.sectorsize, GATE_PREFERRED_IO_SIZE),
      maximum: Math.max(gate.sectorsize, GATE_MAX_IO_SIZE),
    });
  }

  /** The unit number of the gate. */
  get unit(): number {
    return this.#gate.unit;
  }
  /** The gate's current mediasize (follows MODIFY). */
  get size(): number {
    return this.#gate.mediasize;
  }
  get capabilities(): Capabilities {
    return this.#capabilities;
  }
  get blockSize(): BlockSize {
    return this.#blockSize;
  }
  get nonBlocking(): boolean {
    return false;
  }
  get description(): string {
    return `gate ${this.#gate.name} ${formatSize(this.#gate.mediasize)}`;
  }

  async read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    this.#check('read', offset, buf.length);
    if (buf.length === 0) return;
    await this.#gate.submit('read', offset, buf.length, undefined, buf);
  }

  async write(data: Buffer, offset: number, flags: number): Promise<void> {
    this.#check('write', offset, data.length);
    if (data.length > 0) await this.#gate.submit('write', offset, data.length, data);
    if ((flags & REQ.FUA) !== 0) await this.#submit('flush', 0, 0);
  }

  async flush(_flags: number): Promise<void> {
    if (this.#closed) throw closedError();
    await this.#submit('flush', 0, 0);
  }

  async trim(offset: number, length: number, flags: number): Promise<void> {
    this.#check('trim', offset, length);
    if (length > 0) await this.#submit('delete', offset, length);
    if ((flags & REQ.FUA) !== 0) await this.#submit('flush', 0, 0);
  }

  async zero(offset: number, length: number, flags: number): Promise<void> {
    this.#check('zero', offset, length);
    if ((flags & REQ.FAST_ZERO) !== 0) {
      throw new BlockError('EOPNOTSUPP', 'gate: zeroing is done by writing zeroes, which is not fast');
    }
    if (length > 0) {
      // One buffer per call: handlers must not modify payloads, and a fresh one per
      // zero() keeps a misbehaving handler from corrupting other callers' zeroes.
      const zeroes = Buffer.alloc(Math.min(length, GATE_ZERO_CHUNK));
      for (let done = 0; done < length; ) {
        const n = Math.min(zeroes.length, length - done);
        await this.#gate.submit('write', offset + done, n, n === zeroes.length ? zeroes : zeroes.subarray(0, n));
        done += n;
      }
    }
    if ((flags & REQ.FUA) !== 0) await this.#submit('flush', 0, 0);
  }

  async extents(offset: number, length: number, _flags: number): Promise<Extent[]> {
    this.#check('extents', offset, length);
    return [{ offset, length, flags: 0 }];
  }

  async cache(offset: number, length: number, _flags: number): Promise<void> {
    this.#check('cache', offset, length);
  }

  /** Releases this opener's hold on the gate. Requests already queued still complete. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#gate.close();
  }

  #submit(cmd: GateCommand, offset: number, length: number): Promise<void> {
    return this.#gate.submit(cmd, offset, length);
  }

  #check(op: Operation, offset: number, length: number): void {
    if (this.#closed) throw closedError();
    // One pass of integer arithmetic: the checks themselves were made at the edge.
    const sector = this.#blockSize.minimum;
    const valid =
      Number.isSafeInteger(offset) &&
      Number.isSafeInteger(length) &&
      offset >= 0 &&
      length >= 0 &&
      offset + length <= MAX_DEVICE_SIZE &&
      offset % sector === 0 &&
      length % sector === 0;
    if (!valid) invariantFailed(op, offset, length, sector);
  }
}

/** A request that skipped the edge's validation reached the gate: a bug, not a client error. */
function invariantFailed(op: Operation, offset: number, length: number, sector: number): never {
  throw new AssertionError({
    message: `gate ${op}: offset ${offset} length ${length} (sector ${sector}) was not validated at the protocol edge`,
  });
}

function closedError(): BlockError {
  return new BlockError('EBADF', 'gate device is closed');
}
