/**
 * Gates as NBD exports: the gate calls of the control socket, on a GateRegistry, with
 * each gate reachable as the NBD export of its name (`ggate<unit>`, or the name given
 * at CREATE) for as long as it exists.
 *
 * The registry stays the one authority on gate semantics (errors, EBUSY, ENXIO, the two
 * channels); this module only keeps the NBD export table in step with it.
 */
import { BlockError, toBlockError } from '../../errors/index.js';
import { liveStatsOf, type BlockDevice, type BlockSize, type Capabilities, type Extent, type LiveStats } from '../../device/index.js';
import type {
  GateCreateArgs,
  GateDestroyArgs,
  GateDevice,
  GateInfo,
  GateModifyArgs,
  GateRegistry,
} from '../index.js';
import { Export, type ExportSession, type ExportTable, type SessionStatus } from '../../export/export.js';
import type { ErrSeqState } from '../../errseq/index.js';

/**
 * The block device of a gate export. Every NBD session attached to the export holds one
 * open of the gate (a GateDevice from `registry.open`), so the gate's open count is the
 * number of attached NBD clients, and an unforced DESTROY while a client is attached
 * fails EBUSY in the registry itself, as FreeBSD's does for an open provider.
 *
 * A destroyed gate fails requests ENXIO ("device not configured"); NBD has no such
 * value, so this adapter reports EIO, keeping the message. A session whose open failed
 * (the gate went away between the handshake's choice and its attach) gets EIO too.
 */
export class GateExportDevice implements BlockDevice {
  readonly unit: number;
  readonly name: string;
  /**
   * A handle opened once and closed at once, kept only for its live metadata getters:
   * `size` follows MODIFY, capabilities and block size are the gate's own. Holding it
   * closed keeps it out of the open count.
   */
  readonly #meta: GateDevice;
  readonly #registry: GateRegistry;
  /** Open handles, one per attached session; I/O goes through the first. */
  readonly #handles = new Map<ExportSession, GateDevice>();

  constructor(registry: GateRegistry, unit: number, name: string) {
    this.#registry = registry;
    this.unit = unit;
    this.name = name;
    this.#meta = registry.open(unit);
    void this.#meta.close();
  }

  get size(): number {
    return this.#meta.size;
  }
  get capabilities(): Capabilities {
    return this.#meta.capabilities;
  }
  get blockSize(): BlockSize {
    return this.#meta.blockSize;
  }
  get nonBlocking(): boolean {
    return false;
  }
  get description(): string {
    return this.#meta.description;
  }

  /** Opens the gate for a session. Never throws: a failed open leaves requests failing EIO. */
  acquire(session: ExportSession): void {
    if (this.#handles.has(session)) return;
    try {
      this.#handles.set(session, this.#registry.open(this.unit));
    } catch {
      // The gate is gone; #device() reports EIO.
    }
  }

  release(session: ExportSession): void {
    const h = this.#handles.get(session);
    if (h === undefined) return;
    this.#handles.delete(session);
    void h.close();
  }

  #device(): GateDevice {
    for (const h of this.#handles.values()) return h;
    throw new BlockError('EIO', `gate ${this.name} is not open (destroyed)`);
  }

  async #run<T>(fn: (d: GateDevice) => Promise<T>): Promise<T> {
    try {
      return await fn(this.#device());
    } catch (e) {
      const b = toBlockError(e);
      if (b.code === 'ENXIO') throw new BlockError('EIO', b.message, { cause: e, ...(b.offset !== undefined ? { offset: b.offset } : {}) });
      throw b;
    }
  }

  read(buf: Buffer, offset: number, flags: number): Promise<void> {
    return this.#run((d) => d.read(buf, offset, flags));
  }
  write(data: Buffer, offset: number, flags: number): Promise<void> {
    return this.#run((d) => d.write(data, offset, flags));
  }
  flush(flags: number): Promise<void> {
    return this.#run((d) => d.flush(flags));
  }
  trim(offset: number, length: number, flags: number): Promise<void> {
    return this.#run((d) => d.trim(offset, length, flags));
  }
  zero(offset: number, length: number, flags: number): Promise<void> {
    return this.#run((d) => d.zero(offset, length, flags));
  }
  extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    return this.#run((d) => d.extents(offset, length, flags));
  }
  cache(offset: number, length: number, flags: number): Promise<void> {
    return this.#run((d) => d.cache(offset, length, flags));
  }

  /** Closes every session's handle (server shutdown). */
  async close(): Promise<void> {
    for (const s of [...this.#handles.keys()]) this.release(s);
  }
}

/** An export over a gate: attaching a session opens the gate for it, detaching closes it. */
export class GateExport extends Export {
  readonly gate: GateExportDevice;

  constructor(device: GateExportDevice, description?: string) {
    super({ name: device.name, device, ...(description !== undefined ? { description } : {}) });
    this.gate = device;
  }

  override attach(session: ExportSession): void {
    this.gate.acquire(session);
    super.attach(session);
  }

  override detach(session: ExportSession): void {
    super.detach(session);
    this.gate.release(session);
  }
}

/** One export in a status report. */
export interface ExportStatus {
  readonly name: string;
  readonly description: string;
  readonly size: number;
  readonly readOnly: boolean;
  /** The gate unit, for a gate export. */
  readonly gate?: number;
  /** The export's write-back error word, decoded (peeked: nothing is consumed). */
  readonly errseq: ErrSeqState;
  /** Per attached session: whether its next FLUSH would report a write-back error. */
  readonly sessions: SessionStatus[];
  /** Live per-operation figures, when the export's stack has a stats filter. */
  readonly stats?: LiveStats;
  /** The server's own live figures of the export (counted at the NBD edge; absent with metrics off). */
  readonly live?: LiveStats;
}

/** The server's live figures of an export (src/metrics), given to the gate service by `serve`. */
export type LiveFigures = (exp: Export) => LiveStats;

function liveStatsField(device: BlockDevice): { stats?: LiveStats } {
  const stats = liveStatsOf(device);
  return stats ? { stats } : {};
}

/** What STATUS returns (and `blockgate status` prints). */
export interface StatusReport {
  readonly exports: ExportStatus[];
  readonly gates: GateInfo[];
}

/**
 * The gate side of `blockgate serve`: the registry's calls, plus the NBD export of each
 * gate while it exists (when an export table such as an NbdServer is given). Gates created on the registry
 * directly, not through here, get no export.
 */
export class GateService {
  readonly registry: GateRegistry;
  readonly nbd: ExportTable | undefined;
  readonly #exports = new Map<number, GateExport>();
  readonly #live: LiveFigures | undefined;

  constructor(registry: GateRegistry, nbd?: ExportTable, live?: LiveFigures) {
    this.registry = registry;
    this.nbd = nbd;
    this.#live = live;
  }

  /** CREATE, then the export; if the export cannot be added (name taken) the gate is destroyed again. */
  async create(args: GateCreateArgs): Promise<{ unit: number; name: string }> {
    const unit = await this.registry.create(args);
    const info = this.registry.list().find((g) => g.unit === unit)!;
    if (this.nbd) {
      try {
        const exp = new GateExport(new GateExportDevice(this.registry, unit, info.name));
        this.nbd.addExport(exp);
        this.#exports.set(unit, exp);
      } catch (e) {
        await this.registry.destroy({ version: args.version, unit, force: true });
        const b = toBlockError(e);
        throw new BlockError(b.code, `gate ${info.name}: cannot export it over NBD: ${b.message}`, { cause: e });
      }
    }
    return { unit, name: info.name };
  }

  modify(args: GateModifyArgs): Promise<void> {
    return this.registry.modify(args);
  }

  /**
   * DESTROY. The registry decides (EBUSY while an NBD client has the gate open, unless
   * forced); then the export goes, and its sessions' later requests fail EIO.
   */
  async destroy(args: GateDestroyArgs): Promise<void> {
    const before = this.registry.list();
    await this.registry.destroy(args);
    const after = new Set(this.registry.list().map((g) => g.unit));
    for (const g of before) {
      if (after.has(g.unit)) continue;
      const exp = this.#exports.get(g.unit);
      if (exp === undefined) continue;
      this.#exports.delete(g.unit);
      if (this.nbd && this.nbd.findExport(exp.name) === exp) this.nbd.removeExport(exp.name, { force: true });
    }
  }

  list(): GateInfo[] {
    return this.registry.list();
  }

  /** Every export of the NBD server and every gate. Looking consumes nothing (masked errseq checks). */
  status(): StatusReport {
    const exports: ExportStatus[] = (this.nbd?.listExports() ?? []).map((e) => ({
      name: e.name,
      description: e.description,
      size: e.device.size,
      readOnly: e.readOnly,
      ...(e instanceof GateExport ? { gate: e.gate.unit } : {}),
      errseq: e.errseq.describe(),
      sessions: e.sessions(),
      ...liveStatsField(e.device),
      ...(this.#live ? { live: this.#live(e) } : {}),
    }));
    return { exports, gates: this.registry.list() };
  }

  /** Shutdown: force-destroys every gate and drops their exports. */
  async close(): Promise<void> {
    await this.registry.close();
    for (const [unit, exp] of this.#exports) {
      this.#exports.delete(unit);
      if (this.nbd && this.nbd.findExport(exp.name) === exp) this.nbd.removeExport(exp.name, { force: true });
      await exp.gate.close();
    }
  }
}
