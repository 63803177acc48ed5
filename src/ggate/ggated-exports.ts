/**
 * What ggated serves for a path named in a cinit: the export table of a GgatedServer.
 *
 * FreeBSD's ggated open(2)s the exported path for every connection, with the client's
 * access mode. blockgate serves device stacks instead, one per path, shared by every
 * client of that path, with one write-back ErrSeq per path (so a flush error reaches
 * every client of the path once, whichever connection it happened on):
 *
 * - a path given a stack in the table's `stacks` (from `blockgate ggated --config`, or a
 *   device passed by a library caller) is served by that stack. A stack given as a
 *   description is built on first use and kept until the table is closed (a memory
 *   disk keeps its data between clients); a device given as an object belongs to the
 *   caller and is never closed here. A client asking for write access to a stack that
 *   cannot write is refused with EROFS (what open(2) says for a read-only medium);
 * - any other path is a regular file or block device, opened with the file backend:
 *   read-only for read-only clients, read-write for the others (the file backend has no
 *   write-only mode; the session refuses READs on a write-only connection itself). Each
 *   mode is opened once and shared while clients use it, and closed when its last
 *   client leaves. Both modes of a path share the path's ErrSeq. An open failure is the
 *   sinit error, as in ggated (ENOENT, EACCES, EINVAL for a directory...).
 */
import type { Logger } from 'pino';
import { BlockError, toBlockError } from '../errors/index.js';
import type { BlockDevice, StackDescription } from '../device/index.js';
import { ErrSeq } from '../errseq/index.js';
import { createStack } from '../export/registry.js';
import type {
  GgateAccess,
} from './validate.js';
import { Export } from '../export/export.js';

/** A device object with, optionally, the ErrSeq its stack was built with. */
export interface GgateDeviceSource {
  readonly device: BlockDevice;
  readonly errseq?: ErrSeq;
}

/** What a path may be mapped to: a stack description (built by the table) or a device. */
export type GgateStackSource = StackDescription | GgateDeviceSource;

/** Opens a file path for ggated (default: the file backend). */
export type GgateFileOpener = (path: string, writable: boolean, errseq: ErrSeq) => Promise<BlockDevice>;

export interface GgateExportTableOptions {
  /** Paths served by blockgate stacks instead of files. */
  readonly stacks?: ReadonlyMap<string, GgateStackSource> | Readonly<Record<string, GgateStackSource>>;
  /** How file paths are opened; default: the file backend (a file stack from the default registry). */
  readonly openFile?: GgateFileOpener;
  readonly logger?: Logger;
}

/** A client's hold on an export; released exactly once when the client is gone. */
export interface GgateLease {
  readonly export: Export;
  release(): void;
}

interface FileSlot {
  refs: number;
  readonly ready: Promise<Export>;
}

function isDeviceSource(s: GgateStackSource): s is GgateDeviceSource {
  return 'device' in s && typeof (s as GgateDeviceSource).device === 'object';
}

const defaultOpenFile: GgateFileOpener = (path, writable, errseq) => createStack({ backend: { type: 'file', path, readonly: !writable } }, { errseq });

export class GgateExportTable {
  readonly #stacks = new Map<string, GgateStackSource>();
  readonly #built = new Map<string, Promise<Export>>();
  readonly #files = new Map<string, FileSlot>();
  readonly #errseqs = new Map<string, ErrSeq>();
  readonly #openFile: GgateFileOpener;
  readonly #log: Logger | undefined;
  #closed = false;

  constructor(opts: GgateExportTableOptions = {}) {
    const stacks = opts.stacks ?? {};
    const entries = stacks instanceof Map ? [...stacks.entries()] : Object.entries(stacks);
    for (const [path, source] of entries) {
      this.#stacks.set(path, source);
      if (isDeviceSource(source) && source.errseq) this.#errseqs.set(path, source.errseq);
    }
    this.#openFile = opts.openFile ?? defaultOpenFile;
    this.#log = opts.logger;
  }

  /** The write-back error sequence of a path (created on first use, kept for the table's life). */
  errseq(path: string): ErrSeq {
    let e = this.#errseqs.get(path);
    if (!e) {
      e = new ErrSeq();
      this.#errseqs.set(path, e);
    }
    return e;
  }

  /** True if `path` is served by a configured stack rather than a file. */
  hasStack(path: string): boolean {
    return this.#stacks.has(path);
  }

  /** File devices currently open (both modes counted), for status and tests. */
  get openFiles(): number {
    return this.#files.size;
  }

  /** Opens (or shares) the export of `path` for a client with `access`. Rejects with a BlockError. */
  async acquire(path: string, access: GgateAccess): Promise<GgateLease> {
    if (this.#closed) throw new BlockError('ESHUTDOWN', 'the server is shutting down');
    const writable = access !== 'ro';
    const source = this.#stacks.get(path);
    if (source !== undefined) {
      const exp = await this.#stack(path, source);
      if (writable && !exp.device.capabilities.write) {
        throw new BlockError('EROFS', `${path}: ${access} access requested, but the stack is read-only`);
      }
      return { export: exp, release: () => undefined };
    }
    const key = `${writable ? 'rw' : 'ro'}:${path}`;
    let slot = this.#files.get(key);
    if (!slot) {
      const ready = this.#openFile(path, writable, this.errseq(path)).then(
        (device) => new Export({ name: path, device, errseq: this.errseq(path) }),
      );
      slot = { refs: 0, ready };
      this.#files.set(key, slot);
    }
    const mine = slot;
    mine.refs++;
    let exp: Export;
    try {
      exp = await mine.ready;
    } catch (e) {
      mine.refs--;
      if (this.#files.get(key) === mine) this.#files.delete(key);
      throw toBlockError(e);
    }
    let released = false;
    return {
      export: exp,
      release: () => {
        if (released) return;
        released = true;
        if (--mine.refs > 0) return;
        if (this.#files.get(key) === mine) this.#files.delete(key);
        exp.device.close().catch((err: unknown) => this.#log?.error({ err, path }, 'closing the device failed'));
      },
    };
  }

  #stack(path: string, source: GgateStackSource): Promise<Export> {
    let p = this.#built.get(path);
    if (!p) {
      const errseq = this.errseq(path);
      p = isDeviceSource(source)
        ? Promise.resolve(new Export({ name: path, device: source.device, errseq }))
        : createStack(source, { errseq }).then((device) => new Export({ name: path, device, errseq }));
      this.#built.set(path, p);
      // A failed build is retried by the next client rather than cached.
      p.catch(() => {
        if (this.#built.get(path) === p) this.#built.delete(path);
      });
    }
    return p;
  }

  /**
   * Closes the stacks this table built and any file still open. Devices passed in as
   * objects stay open (they belong to the caller).
   */
  async close(): Promise<void> {
    this.#closed = true;
    const closing: Promise<void>[] = [];
    // A device that fails to close is logged, as in a lease's release; one that never
    // opened was already reported to the client that asked for it.
    const close = (path: string, ready: Promise<Export>): Promise<void> =>
      ready.then(
        (exp) => exp.device.close().catch((err: unknown) => this.#log?.error({ err, path }, 'closing the device failed')),
        () => undefined,
      );
    for (const [path, p] of this.#built) {
      const source = this.#stacks.get(path);
      if (source === undefined || isDeviceSource(source)) continue;
      closing.push(close(path, p));
    }
    for (const [key, slot] of this.#files) {
      closing.push(close(key.slice(key.indexOf(':') + 1), slot.ready));
    }
    this.#built.clear();
    this.#files.clear();
    await Promise.all(closing);
  }
}
