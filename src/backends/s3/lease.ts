/**
 * The single-writer lease of an s3 export: the object `PREFIX/lease`, holding who has
 * it, a random token and an expiry, taken with a conditional PUT and renewed while held.
 *
 * What radosgw 16.2.15 does with conditions (probed against the test cluster, pinned by
 * test/backends/s3.test.ts): PUT with `If-None-Match: *` fails 412 when the key exists
 * (atomic create); PUT with `If-Match: ETAG` works, but only with the ETag *without*
 * its quotes (the quoted form S3 returns always fails 412); DELETE ignores `If-Match`.
 * So:
 * - acquire: read the lease; a live one (not expired by our clock) is refused with an
 *   EBUSY naming its holder and expiry. A missing one is created with
 *   `If-None-Match: *`, an expired one replaced with `If-Match` on the ETag we read: of
 *   two gateways racing for it, exactly one PUT succeeds. The lease is then read back,
 *   and our token must be in it: on a server that ignores conditions this still catches
 *   a loser, except in the window between the other's PUT and our read (docs/S3.md).
 * - renew: every S3_LEASE_RENEW_MS, `If-Match` on our last ETag, quoted first and bare
 *   after a 412 whose HEAD shows the ETag unchanged (radosgw's form, remembered). A 412
 *   with a different ETag means someone replaced the lease: it is lost for good, and
 *   the device stops writing (every later write fails, the loss is recorded).
 * - release (close): the lease is deleted only while it is still ours and unexpired
 *   (then nobody else can have replaced it, since only expired leases are taken over),
 *   otherwise it is left to expire.
 *
 * Expiry is wall-clock time in the object (so another host can judge it), which assumes
 * the gateways' clocks agree to well within S3_LEASE_MARGIN_MS. The holder itself
 * judges its lease on a monotonic clock from the moment it sent the PUT that set it,
 * and stops starting writes S3_LEASE_MARGIN_MS before expiry, so that a PUT it started
 * in time has the margin to land before any other gateway may take over.
 */
import os from 'node:os';
import { randomUUID } from 'node:crypto';
import { BlockError, toBlockError } from '../../errors/index.js';
import { isPreconditionFailed, type S3Store } from './client.js';

/** A lease lasts 30 s from its last renewal. */
export const S3_LEASE_TTL_MS = 30_000;
/** The holder renews it every 10 s (so two renewals may fail before it is in danger). */
export const S3_LEASE_RENEW_MS = 10_000;
/** The holder stops starting writes when less than 10 s of its lease are left. */
export const S3_LEASE_MARGIN_MS = 10_000;
/** Attempts of acquire's read-then-PUT when another gateway changes the lease in between. */
export const S3_LEASE_ACQUIRE_ATTEMPTS = 3;

/** The lease object's contents. */
export interface LeaseRecord {
  readonly format: 'blockgate-s3-lease';
  /** Who holds it: `host:pid`, plus anything the opener named. */
  readonly holder: string;
  readonly token: string;
  /** Expiry, milliseconds since the epoch (the holder's clock). */
  readonly expires: number;
}

function parseRecord(text: string): LeaseRecord | null {
  try {
    const r = JSON.parse(text) as Partial<LeaseRecord>;
    if (r.format === 'blockgate-s3-lease' && typeof r.holder === 'string' && typeof r.token === 'string' && typeof r.expires === 'number') return r as LeaseRecord;
  } catch {
    // not ours, or torn: treated as a lease of unknown holder below
  }
  return null;
}

/** The error of a second writer. */
export function leaseHeldError(where: string, key: string, holder: string, expires: number): BlockError {
  return new BlockError(
    'EBUSY',
    `${where} is being written by ${holder} (lease ${key} valid until ${new Date(expires).toISOString()}); ` +
      'open it read-only (readonly: true or the readonly filter), or wait until that writer closes or its lease expires',
  );
}

export class S3Lease {
  readonly key: string;
  readonly holder: string;
  readonly #store: S3Store;
  readonly #where: string;
  readonly #token = randomUUID();
  readonly #onLost: (e: BlockError) => void;
  #etag: string;
  /** performance.now() until which we may start writes. */
  #writableUntil: number;
  #timer: NodeJS.Timeout | null = null;
  #lost: BlockError | null = null;
  #renewing: Promise<void> | null = null;
  /** The server wants If-Match ETags without quotes (radosgw 16). */
  #bareEtags = false;

  private constructor(store: S3Store, key: string, where: string, holder: string, etag: string, sentAt: number, onLost: (e: BlockError) => void) {
    this.#store = store;
    this.key = key;
    this.#where = where;
    this.holder = holder;
    this.#etag = etag;
    this.#writableUntil = sentAt + S3_LEASE_TTL_MS - S3_LEASE_MARGIN_MS;
    this.#onLost = onLost;
  }

  /** Takes the lease or throws EBUSY naming the holder. */
  static async acquire(store: S3Store, key: string, where: string, onLost: (e: BlockError) => void): Promise<S3Lease> {
    const holder = `${os.hostname()}:${process.pid}`;
    for (let attempt = 1; ; attempt++) {
      const current = await store.getText(key);
      const record = current ? parseRecord(current.text) : null;
      if (current && (record === null || record.expires > Date.now())) {
        throw leaseHeldError(where, key, record?.holder ?? 'an unknown holder (the lease object is not blockgate\'s)', record?.expires ?? Date.now() + S3_LEASE_TTL_MS);
      }
      const lease = new S3Lease(store, key, where, holder, '', performance.now(), onLost);
      try {
        const sentAt = performance.now();
        const body = lease.#body();
        const etag = current
          ? await lease.#putIfMatch(body, current.etag)
          : await store.put(key, body, { ifNoneMatch: '*' });
        lease.#etag = etag;
        lease.#writableUntil = sentAt + S3_LEASE_TTL_MS - S3_LEASE_MARGIN_MS;
      } catch (e) {
        if (isPreconditionFailed((e as BlockError).cause) && attempt < S3_LEASE_ACQUIRE_ATTEMPTS) continue;
        if (isPreconditionFailed((e as BlockError).cause)) {
          const now = await store.getText(key);
          const r = now ? parseRecord(now.text) : null;
          throw leaseHeldError(where, key, r?.holder ?? 'another gateway', r?.expires ?? Date.now() + S3_LEASE_TTL_MS);
        }
        throw e;
      }
      // Read back: a server that ignored the condition would let the last PUT win.
      const back = await store.getText(key);
      const r = back ? parseRecord(back.text) : null;
      if (!r || r.token !== lease.#token) {
        throw leaseHeldError(where, key, r?.holder ?? 'another gateway', r?.expires ?? Date.now() + S3_LEASE_TTL_MS);
      }
      if (back) lease.#etag = back.etag;
      lease.#startRenewal();
      return lease;
    }
  }

  /** True while writes may be started (held, renewed, not within the margin of expiry). */
  get valid(): boolean {
    return this.#lost === null && performance.now() < this.#writableUntil;
  }

  /** Why writes may not be started now. */
  get invalidError(): BlockError {
    return (
      this.#lost ??
      new BlockError('EIO', `${this.#where}: the write lease ${this.key} could not be renewed in time (is S3 reachable?); writes are refused until it is`)
    );
  }

  #body(): string {
    const r: LeaseRecord = { format: 'blockgate-s3-lease', holder: this.holder, token: this.#token, expires: Date.now() + S3_LEASE_TTL_MS };
    return JSON.stringify(r);
  }

  /** PUT `body` if the lease's ETag is still `etag`, in the form the server accepts. */
  async #putIfMatch(body: string, etag: string): Promise<string> {
    const bare = etag.replace(/^"|"$/g, '');
    if (this.#bareEtags) return await this.#store.put(this.key, body, { ifMatch: bare });
    try {
      return await this.#store.put(this.key, body, { ifMatch: etag });
    } catch (e) {
      if (!isPreconditionFailed((e as BlockError).cause)) throw e;
      const now = await this.#store.head(this.key);
      if (now === null || now.replace(/^"|"$/g, '') !== bare) throw e;
      // The ETag did match: this server compares it without quotes.
      this.#bareEtags = true;
      return await this.#store.put(this.key, body, { ifMatch: bare });
    }
  }

  #startRenewal(): void {
    this.#timer = setInterval(() => {
      this.#renewing ??= this.renew().finally(() => (this.#renewing = null));
    }, S3_LEASE_RENEW_MS);
    this.#timer.unref();
  }

  /** Renews the lease now. A failure to reach S3 is retried at the next period; a replaced lease is lost. */
  async renew(): Promise<void> {
    if (this.#lost) return;
    const sentAt = performance.now();
    try {
      this.#etag = await this.#putIfMatch(this.#body(), this.#etag);
      this.#writableUntil = sentAt + S3_LEASE_TTL_MS - S3_LEASE_MARGIN_MS;
    } catch (e) {
      if (!isPreconditionFailed(toBlockError(e).cause)) return;
      const now = await this.#store.getText(this.key).catch(() => null);
      const r = now ? parseRecord(now.text) : null;
      this.#lost = new BlockError(
        'EIO',
        `${this.#where}: the write lease ${this.key} was taken over by ${r?.holder ?? 'another gateway'}; this gateway no longer writes`,
      );
      this.#stop();
      this.#onLost(this.#lost);
    }
  }

  #stop(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
  }

  /** Stops renewing; deletes the lease if it is still ours and unexpired (see the module comment). */
  async release(): Promise<void> {
    this.#stop();
    await this.#renewing;
    if (!this.valid) return;
    const etag = await this.#store.head(this.key);
    if (etag === null || etag.replace(/^"|"$/g, '') !== this.#etag.replace(/^"|"$/g, '')) return;
    await this.#store.delete(this.key);
    this.#lost = new BlockError('EBADF', `${this.#where}: the write lease was released`);
  }
}
