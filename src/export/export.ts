import type { BlockDevice } from '../device/index.js';
import { ErrSeq } from '../errseq/index.js';

/** Settings of one export. */
export interface ExportOptions {
  /** The NBD export name ('' is allowed and means the default export). */
  readonly name: string;
  /** Human text shown by `nbdinfo` (NBD_INFO_DESCRIPTION) and LIST. */
  readonly description?: string;
  /** The device stack served. */
  readonly device: BlockDevice;
  /** Serve read-only even if the device can write. */
  readonly readOnly?: boolean;
  /** The write-back error sequence the device stack was built with (see StackContext); default: a new one. */
  readonly errseq?: ErrSeq;
}

/** What `blockgate status` shows of a session, obtained without consuming anything. */
export interface SessionStatus {
  readonly id: number;
  readonly peer: string;
  /** True if this session's next FLUSH would report a write-back error. */
  readonly errorPending: boolean;
}

/** A session as the export sees it: its cursor can be peeked at, never advanced from outside. */
export interface ExportSession {
  readonly id: number;
  readonly peer: string;
  readonly cursor: number;
}

/**
 * An export: a name, a device stack, an access policy, and the export's write-back
 * error sequence. Each session samples a cursor from `errseq` when its handshake
 * completes; failures that no client got as the direct reply to its own request are
 * recorded with `errseq.set` (see docs/ARCHITECTURE.md, "Write-back errors").
 */
export class Export {
  readonly name: string;
  readonly description: string;
  readonly device: BlockDevice;
  readonly readOnly: boolean;
  readonly errseq: ErrSeq;
  readonly #sessions = new Set<ExportSession>();

  constructor(opts: ExportOptions) {
    this.name = opts.name;
    this.description = opts.description ?? opts.device.description;
    this.device = opts.device;
    this.readOnly = opts.readOnly === true || !opts.device.capabilities.write;
    this.errseq = opts.errseq ?? new ErrSeq();
  }

  /** Called by a session when its handshake completes; returns the cursor to keep. */
  attach(session: ExportSession): void {
    this.#sessions.add(session);
  }

  detach(session: ExportSession): void {
    this.#sessions.delete(session);
  }

  get sessionCount(): number {
    return this.#sessions.size;
  }

  /** Per-session error state, by masked comparison: looking never changes what a client will see. */
  sessions(): SessionStatus[] {
    return [...this.#sessions].map((s) => ({
      id: s.id,
      peer: s.peer,
      errorPending: this.errseq.check(s.cursor) !== 0,
    }));
  }
}

/**
 * A set of exports by name that frontends serve from, and that can change while they
 * run. NbdServer is one; the gate control server publishes each gate into one as
 * `ggate<unit>` without knowing which protocol serves it.
 */
export interface ExportTable {
  /** The export for a name ('' = the default export), or undefined. */
  findExport(name: string): Export | undefined;
  listExports(): readonly Export[];
  /** Adds an export; EEXIST if the name is taken. */
  addExport(exp: Export): void;
  /** Removes an export; EBUSY with sessions attached unless `force`, ENOENT if there is none. */
  removeExport(name: string, opts?: { readonly force?: boolean }): Export;
}
