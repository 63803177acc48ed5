/**
 * The S3 requests the `s3` backend makes, over `@aws-sdk/client-s3`, and what their
 * failures become (BlockErrors naming the operation, bucket and key).
 *
 * The SDK is loaded with createRequire the first time an s3 export opens, never at
 * start-up: it is a large package (about 100 ms to load here), and `serve memory:1G`
 * must not pay for it. The types are imported as types only (erased at build time).
 *
 * Connections: one keep-alive http(s).Agent per export with Nagle's algorithm off on
 * every socket. With Nagle on, a small request (a 4 KiB ranged GET) waits for the
 * server's delayed ACK: 21 ops/s against radosgw here, 239 ops/s with TCP_NODELAY
 * (docs/S3.md). The agent allows S3_MAX_INFLIGHT sockets, the same bound as the
 * requests this module lets run at once, so a request never waits for a socket.
 */
import type http from 'node:http';
import type net from 'node:net';
import { createRequire } from 'node:module';
import type * as S3 from '@aws-sdk/client-s3';
import { BlockError, isBlockError, type ErrnoCode } from '../../errors/index.js';
import { Deque } from '../../io/deque.js';
import type { S3Options } from './settings.js';

/**
 * S3 requests of one export in flight at once: 32. Matches the queue depth of the
 * random-I/O bench and the concurrency at which radosgw's throughput stopped growing
 * here; more only queues inside radosgw.
 */
export const S3_MAX_INFLIGHT = 32;

/**
 * Attempts per request (the SDK's retry strategy: first try plus retries with backoff on
 * throttling, 5xx and network errors). 3, the SDK's default, bounds a request that keeps
 * failing to about 3 x the request timeout.
 */
export const S3_MAX_ATTEMPTS = 3;

/** Requests in flight of the lease's own store: 2 (a renewal, and a read of the lease beside it). */
export const S3_LEASE_INFLIGHT = 2;

/** Keep-alive sockets idle longer than this are closed by the agent: 30 s. */
export const S3_SOCKET_IDLE_MS = 30_000;

/**
 * A keep-alive agent whose sockets have Nagle's algorithm off (see the module comment).
 * node:http and node:https are required here, when an s3 export opens, not at import:
 * `serve` imports every backend module, and those two cost start-up time to no other.
 */
function noDelayAgent(tls: boolean, options: http.AgentOptions): http.Agent {
  const { Agent } = createRequire(import.meta.url)(tls ? 'node:https' : 'node:http') as typeof http;
  class NoDelayAgent extends Agent {
    override createConnection(opts: net.NetConnectOpts, cb?: (err: Error | null, socket: net.Socket) => void): net.Socket {
      // @ts-expect-error createConnection is on the Agent prototype but missing from @types/node's class.
      const socket = super.createConnection(opts, cb) as net.Socket;
      socket.setNoDelay(true);
      return socket;
    }
  }
  return new NoDelayAgent(options);
}

let sdk: typeof S3 | undefined;

/** The SDK, loaded on first use. */
export function loadS3Sdk(): typeof S3 {
  sdk ??= createRequire(import.meta.url)('@aws-sdk/client-s3') as typeof S3;
  return sdk;
}

/** A counting semaphore with FIFO waiters. */
class Slots {
  #free: number;
  readonly #waiters = new Deque<() => void>();
  constructor(n: number) {
    this.#free = n;
  }
  async take(): Promise<void> {
    if (this.#free > 0) {
      this.#free--;
      return;
    }
    await new Promise<void>((resolve) => this.#waiters.pushBack(resolve));
  }
  give(): void {
    const next = this.#waiters.popFront();
    if (next) next();
    else this.#free++;
  }
}

/** What an S3 error object carries that we look at. */
interface SdkError {
  readonly name?: string;
  readonly message?: string;
  readonly code?: string;
  readonly $metadata?: { readonly httpStatusCode?: number };
}

/** The HTTP status of an SDK error (undefined for network errors). */
export function httpStatus(e: unknown): number | undefined {
  return (e as SdkError | null)?.$metadata?.httpStatusCode;
}

/** True for "the key (or bucket) is not there". */
export function isNotFound(e: unknown): boolean {
  const err = e as SdkError | null;
  return err?.name === 'NoSuchKey' || err?.name === 'NotFound' || httpStatus(e) === 404;
}

/** True for "the bucket is not there" (thrown as the cause of an s3Error). */
export function isNoSuchBucket(e: unknown): boolean {
  const err = (e as { cause?: SdkError } | null)?.cause ?? (e as SdkError | null);
  return err?.name === 'NoSuchBucket';
}

/** True for a failed precondition (If-None-Match / If-Match). */
export function isPreconditionFailed(e: unknown): boolean {
  return (e as SdkError | null)?.name === 'PreconditionFailed' || httpStatus(e) === 412;
}

function errnoOf(e: unknown): ErrnoCode {
  const err = e as SdkError | null;
  const status = httpStatus(e);
  if (status === 403) return 'EACCES';
  if (status === 404) return 'ENOENT';
  if (err?.name === 'TimeoutError' || err?.code === 'ETIMEDOUT' || /timed? ?out/i.test(err?.message ?? '')) return 'ETIMEDOUT';
  if (err?.code === 'ECONNREFUSED') return 'ECONNREFUSED';
  return 'EIO';
}

/** An S3 failure as a BlockError: `s3 GET bucket/key: NoSuchBucket (404): message`. */
export function s3Error(op: string, bucket: string, key: string, e: unknown): BlockError {
  const err = e as SdkError | null;
  const status = httpStatus(e);
  const what = [err?.name ?? 'Error', status !== undefined ? `(${status})` : err?.code !== undefined ? `(${err.code})` : ''].filter(Boolean).join(' ');
  const detail = err?.message && err.message !== err.name && err.message !== 'UnknownError' ? `: ${err.message}` : '';
  return new BlockError(errnoOf(e), `s3 ${op} ${bucket}/${key}: ${what}${detail}`, { cause: e });
}

/**
 * One export's S3 connection: the client, the bound on requests in flight, and the
 * handful of operations the backend needs. Every method throws {@link s3Error}s except
 * where it says otherwise.
 */
export class S3Store {
  readonly bucket: string;
  readonly endpoint: string;
  readonly #client: S3.S3Client;
  readonly #sdk: typeof S3;
  readonly #agent: http.Agent;
  readonly #slots: Slots;

  /**
   * `maxInflight` bounds the requests in flight and the agent's sockets. The lease has a
   * store of its own (S3_LEASE_INFLIGHT): its renewal must never wait behind a queue of
   * data uploads, or a busy writer would lose its lease to its own traffic.
   */
  constructor(o: S3Options, maxInflight: number = S3_MAX_INFLIGHT) {
    this.#sdk = loadS3Sdk();
    this.#slots = new Slots(maxInflight);
    this.bucket = o.bucket;
    this.endpoint = o.endpoint ?? 'AWS';
    const agentOptions = { keepAlive: true, keepAliveMsecs: 1000, maxSockets: maxInflight, timeout: S3_SOCKET_IDLE_MS };
    const tls = o.endpoint === undefined || o.endpoint.startsWith('https:');
    this.#agent = noDelayAgent(tls, agentOptions);
    this.#client = new this.#sdk.S3Client({
      region: o.region,
      forcePathStyle: o.forcePathStyle,
      maxAttempts: S3_MAX_ATTEMPTS,
      ...(o.endpoint !== undefined ? { endpoint: o.endpoint } : {}),
      ...(o.credentials !== undefined ? { credentials: o.credentials } : {}),
      // Checksums on every request cost CPU on the data path and RGW 16 does not check
      // the newer algorithms; ask for them only where an operation requires one.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: {
        ...(tls ? { httpsAgent: this.#agent } : { httpAgent: this.#agent }),
        connectionTimeout: o.requestTimeoutMs,
        requestTimeout: o.requestTimeoutMs,
        throwOnRequestTimeout: true,
      },
    });
  }

  /**
   * Runs one request in a slot. `guard` is called once the slot is taken, just before the
   * request is sent, and may throw to cancel it (the writer's lease check: a request
   * that waited in the queue is checked when it goes out, not when it was queued).
   */
  async #run<T>(op: string, key: string, f: () => Promise<T>, guard?: () => void): Promise<T> {
    await this.#slots.take();
    try {
      guard?.();
      return await f();
    } catch (e) {
      if (isBlockError(e)) throw e;
      throw s3Error(op, this.bucket, key, e);
    } finally {
      this.#slots.give();
    }
  }

  /**
   * Reads `buf.length` bytes of `key` from `start` into `buf` (a ranged GET unless
   * `whole`). Returns false if the key does not exist (buf untouched). An object shorter
   * than asked leaves the rest of buf as it was and returns the bytes read.
   */
  async getInto(key: string, start: number, buf: Buffer, whole = false): Promise<number | false> {
    return this.#run('GET', key, async () => {
      let out;
      try {
        out = await this.#client.send(
          new this.#sdk.GetObjectCommand({ Bucket: this.bucket, Key: key, ...(whole ? {} : { Range: `bytes=${start}-${start + buf.length - 1}` }) }),
        );
      } catch (e) {
        if (isNotFound(e) && (e as SdkError).name !== 'NoSuchBucket') return false;
        throw e;
      }
      let at = 0;
      for await (const piece of out.Body as AsyncIterable<Uint8Array>) {
        const n = Math.min(piece.length, buf.length - at);
        if (n > 0) buf.set(n === piece.length ? piece : piece.subarray(0, n), at);
        at += n;
      }
      return at;
    });
  }

  /** PUT `body` at `key`; conditions as S3's If-None-Match / If-Match. Returns the ETag. */
  async put(key: string, body: Buffer | string, cond: { ifNoneMatch?: '*'; ifMatch?: string } = {}, guard?: () => void): Promise<string> {
    return this.#run('PUT', key, async () => {
      const out = await this.#client.send(
        new this.#sdk.PutObjectCommand({
          Bucket: this.bucket,
          Key: key,
          Body: body,
          ContentLength: Buffer.byteLength(body),
          ...(cond.ifNoneMatch !== undefined ? { IfNoneMatch: cond.ifNoneMatch } : {}),
          ...(cond.ifMatch !== undefined ? { IfMatch: cond.ifMatch } : {}),
        }),
      );
      return out.ETag ?? '';
    }, guard);
  }

  /** DELETE `key` (S3 answers success for a key that is not there). */
  async delete(key: string, guard?: () => void): Promise<void> {
    await this.#run('DELETE', key, async () => {
      await this.#client.send(new this.#sdk.DeleteObjectCommand({ Bucket: this.bucket, Key: key }));
    }, guard);
  }

  /** The object's text and ETag, or null if it does not exist. */
  async getText(key: string): Promise<{ text: string; etag: string } | null> {
    return this.#run('GET', key, async () => {
      try {
        const out = await this.#client.send(new this.#sdk.GetObjectCommand({ Bucket: this.bucket, Key: key }));
        return { text: await out.Body!.transformToString(), etag: out.ETag ?? '' };
      } catch (e) {
        if (isNotFound(e) && (e as SdkError).name !== 'NoSuchBucket') return null;
        throw e;
      }
    });
  }

  /** The ETag of `key`, or null if it does not exist. */
  async head(key: string): Promise<string | null> {
    return this.#run('HEAD', key, async () => {
      try {
        return (await this.#client.send(new this.#sdk.HeadObjectCommand({ Bucket: this.bucket, Key: key }))).ETag ?? '';
      } catch (e) {
        if (isNotFound(e)) return null;
        throw e;
      }
    });
  }

  /** Calls `each` with every key under `prefix` (ListObjectsV2, page by page). */
  async list(prefix: string, each: (key: string, size: number) => void): Promise<void> {
    let token: string | undefined;
    do {
      const page = await this.#run('LIST', `${prefix}*`, () =>
        this.#client.send(new this.#sdk.ListObjectsV2Command({ Bucket: this.bucket, Prefix: prefix, ...(token ? { ContinuationToken: token } : {}) })),
      );
      for (const o of page.Contents ?? []) if (o.Key !== undefined) each(o.Key, o.Size ?? 0);
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token !== undefined);
  }

  /** Creates the bucket; an existing bucket of ours is fine. */
  async createBucket(): Promise<void> {
    await this.#run('CREATE-BUCKET', '', async () => {
      try {
        await this.#client.send(new this.#sdk.CreateBucketCommand({ Bucket: this.bucket }));
      } catch (e) {
        const name = (e as SdkError).name;
        if (name !== 'BucketAlreadyOwnedByYou') throw e;
      }
    });
  }

  /** Closes the client and its sockets. */
  close(): void {
    this.#client.destroy();
    this.#agent.destroy();
  }
}
