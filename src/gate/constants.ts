/**
 * Constants of the GEOM Gate model, named as in FreeBSD's sys/geom/gate/g_gate.h so the
 * in-process gate, the control socket and the ggate wire code speak one vocabulary
 * (see /work/shared/reference/ggate-and-errseq.md A.1).
 */
export const GATE = {
  /** G_GATE_VERSION: every control call carries it; a mismatch fails the call EINVAL. */
  VERSION: 3,
  /** G_GATE_MAX_QUEUE_SIZE: the cap applied to `maxcount` (0 still means unlimited). */
  MAX_QUEUE_SIZE: 4096,
  /** kern.geom.gate.maxunits default: the size of the unit table. */
  DEFAULT_MAX_UNITS: 256,
  /** G_GATE_UNIT_AUTO: create picks the lowest free unit. */
  UNIT_AUTO: -1,
  /** G_GATE_NAME_GIVEN: create uses `name` as the full provider name (a unit is still allocated). */
  NAME_GIVEN: -2,
  /**
   * G_GATE_INFOSIZE: size of the free-text info field including its NUL, so info holds
   * at most INFO_SIZE - 1 bytes of UTF-8 (ggatec stores "host:port path" there).
   */
  INFO_SIZE: 2048,
  /** NAME_MAX: size of the name fields including the NUL (names hold at most 254 bytes). */
  NAME_MAX: 255,
  /** G_GATE_PROVIDER_NAME: providers are named `ggate<unit>` unless a name is given. */
  PROVIDER_NAME: 'ggate',
  /**
   * The largest sector size accepted. FreeBSD has no such cap; ours is the largest
   * `BlockSize.minimum` the device model (and NBD's block-size negotiation) allows.
   */
  MAX_SECTOR_SIZE: 65536,
  /**
   * The largest timeout accepted, in seconds: `gctl_timeout` is a u_int, so larger
   * values could not come from a FreeBSD peer or the control socket either.
   */
  MAX_TIMEOUT: 0xffff_ffff,
} as const;

/** User flags of CREATE (G_GATE_FLAG_*). Other bits are ignored, as FreeBSD masks them. */
export const GATE_FLAG = {
  /** WRITE, DELETE and FLUSH fail EPERM before any handler sees them. */
  READONLY: 0x0001,
  /** READ fails EPERM before any handler sees it. */
  WRITEONLY: 0x0002,
  /** G_GATE_USERFLAGS: the mask of flags CREATE keeps. */
  USERFLAGS: 0x0003,
} as const;

/** The commands a handler receives from `start`. */
export type GateCommand = 'read' | 'write' | 'delete' | 'flush';

/**
 * The FreeBSD `bio_cmd` value of each handler command (sys/sys/bio.h), for code that
 * must put `gctl_cmd` on a wire or a control socket.
 */
export const BIO_CMD = {
  read: 0x01,
  write: 0x02,
  delete: 0x03,
  flush: 0x05,
} as const satisfies Record<GateCommand, number>;

/**
 * How often the timeout guard scans, as a fraction of the timeout: with timeout t the
 * guard runs every t / GUARD_CHECKS_PER_TIMEOUT, so a request fails between t and
 * 1.25 t after it was queued. (FreeBSD scans every t but with a fixed 5 s age, A.4 #12.)
 */
export const GUARD_CHECKS_PER_TIMEOUT = 4;

/** Upper bound of the guard period in ms, so very long timeouts still fire near t. */
export const GUARD_MAX_PERIOD_MS = 60_000;
