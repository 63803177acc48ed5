import type { BlockDevice } from '../device/index.js';
import { BlockError } from '../errors/index.js';
import { ErrSeq } from '../errseq/index.js';

/**
 * The ErrSeq each device stack was built with, keyed by the stack's top device. The
 * layers record background failures in their StackContext's ErrSeq and sessions read the
 * Export's, so the two must be the same object; remembering it here lets
 * `new Export({ name, device })` find it instead of silently making a fresh one that
 * nobody writes to. A WeakMap, so a device that is dropped takes its entry with it.
 */
const stackErrseqs = new WeakMap<BlockDevice, ErrSeq>();

/**
 * Records that `device` (the top of a stack) was built with `errseq` (its
 * StackContext's). Called by whatever builds stacks (createStack). Recording a different
 * ErrSeq for the same device is refused: one of the two would never be read.
 */
export function recordStackErrseq(device: BlockDevice, errseq: ErrSeq): void {
  const known = stackErrseqs.get(device);
  if (known !== undefined && known !== errseq) {
    throw new BlockError('EINVAL', 'this device stack was already recorded with a different ErrSeq');
  }
  stackErrseqs.set(device, errseq);
}

/** The ErrSeq the stack topped by `device` was built with, if it was recorded. */
export function stackErrseqOf(device: BlockDevice): ErrSeq | undefined {
  return stackErrseqs.get(device);
}

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
  /**
   * The write-back error sequence the device stack was built with (see StackContext).
   * Default: the one recorded for `device` by createStack, else a new one (a device whose
   * layers record no background failures). Passing a different one than the recorded
   * one is an EINVAL error, since the stack's failures would never reach the sessions.
   */
  readonly errseq?: ErrSeq;
}

/** What `blockgate status` shows of a session, obtained without consuming anything. */
export interface SessionStatus {
  readonly id: number;
  readonly peer: string;
  /** How the session is secured, e.g. `TLSv1.3 TLS_AES_128_GCM_SHA256 psk=alice`; null in clear. */
  readonly security: string | null;
  /** True if this session's next FLUSH would report a write-back error. */
  readonly errorPending: boolean;
  /** What it negotiated and moved, for a session that counts them (NBD). */
  readonly figures?: SessionFigures;
}

/** What a session in transmission negotiated and moved (status, the status page). */
export interface SessionFigures {
  /** The reply mode: simple, structured or extended. */
  readonly replies: string;
  /** The transmission flags' names, as the log shows them. */
  readonly flags: string;
  readonly requests: number;
  /** Bytes of successful READs and WRITEs. */
  readonly bytesRead: number;
  readonly bytesWritten: number;
  readonly inFlight: number;
}

/** A session as the export sees it: its cursor can be peeked at, never advanced from outside. */
export interface ExportSession {
  readonly id: number;
  readonly peer: string;
  readonly cursor: number;
  /** See {@link SessionStatus.security}; absent for a protocol without encryption. */
  readonly security?: string | null;
  /** See {@link SessionStatus.figures}; absent for a session that does not count. */
  figures?(): SessionFigures | null;
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
    const recorded = stackErrseqOf(opts.device);
    if (opts.errseq !== undefined && recorded !== undefined && opts.errseq !== recorded) {
      throw new BlockError(
        'EINVAL',
        `export '${opts.name}': errseq is not the ErrSeq its device stack was built with, so the stack's write-back errors would never be reported`,
      );
    }
    this.errseq = opts.errseq ?? recorded ?? new ErrSeq();
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
    return [...this.#sessions].map((s) => {
      const figures = s.figures?.() ?? null;
      return {
        id: s.id,
        peer: s.peer,
        security: s.security ?? null,
        errorPending: this.errseq.check(s.cursor) !== 0,
        ...(figures !== null ? { figures } : {}),
      };
    });
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
