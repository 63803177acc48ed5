/**
 * The `s3` backend's settings: the valibot schema `blockgate plugins` lists, the
 * command-line form `s3://BUCKET/PREFIX[?key=value&...]`, and the resolution of what
 * the environment supplies (endpoint, region, credentials) the way the AWS tools read it.
 */
import * as v from 'valibot';
import { BlockError } from '../../errors/index.js';
import { parseSettings, settingsSchema, sizeSetting } from '../../device/index.js';
import type { LayerDescription } from '../../device/stack.js';

/**
 * Default chunk size of a new export: 1 MiB. One chunk is one object, so this is the
 * unit of a read-modify-write (a 4 KiB write into a chunk that is not in memory costs a
 * GET and a PUT of it) and of a PUT in a sequential copy; 1 MiB keeps the first cheap and
 * the second large enough that the per-request cost of S3 stays a small part of it.
 */
export const S3_DEFAULT_CHUNK_SIZE = 2 ** 20;
/** Smallest chunk size: 4 KiB (smaller chunks only multiply requests). */
export const S3_MIN_CHUNK_SIZE = 4096;
/** Largest chunk size: 64 MiB (a chunk is held whole in memory while it is written). */
export const S3_MAX_CHUNK_SIZE = 64 * 2 ** 20;
/** Region when neither the settings nor AWS_REGION / AWS_DEFAULT_REGION name one (RGW ignores it). */
export const S3_DEFAULT_REGION = 'us-east-1';

const text = (what: string) => v.pipe(v.string((issue) => `expected ${what}, got ${issue.received}`), v.minLength(1, 'must not be empty'));

/** The settings schema (listed by `blockgate plugins`). */
export const s3Settings = settingsSchema({
  bucket: v.pipe(text('a bucket name'), v.description('the bucket holding the export (created by `blockgate s3 create` if missing)')),
  prefix: v.optional(
    v.pipe(
      v.string((issue) => `expected a key prefix, got ${issue.received}`),
      v.description('key prefix of the export: PREFIX/meta.json, PREFIX/chunk/<hex index>, PREFIX/lease (default: none)'),
    ),
  ),
  endpoint: v.optional(v.pipe(v.string(), v.url('expected a URL such as http://127.0.0.1:7480'), v.description('S3 endpoint URL (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS)'))),
  region: v.optional(v.pipe(text('a region name'), v.description(`signing region (default: AWS_REGION, else ${S3_DEFAULT_REGION})`))),
  accessKeyId: v.optional(v.pipe(text('an access key id'), v.description('access key (default: AWS_ACCESS_KEY_ID, else the SDK\'s credential chain)'))),
  secretAccessKey: v.optional(v.pipe(text('a secret key'), v.description('secret key (default: AWS_SECRET_ACCESS_KEY)'))),
  forcePathStyle: v.optional(v.pipe(v.boolean(), v.description('path-style URLs (http://host/bucket/key); default true when an endpoint is given'))),
  chunkSize: v.optional(v.pipe(sizeSetting, v.description(`chunk (object) size of a new export, a power of two in 4K..64M (default 1M)`))),
  size: v.optional(v.pipe(sizeSetting, v.description('size of a new export; creates meta.json on first open if missing (an existing export must match)'))),
  readonly: v.optional(v.pipe(v.boolean((issue) => `expected true or false, got ${issue.received}`), v.description('open read-only: no lease is taken, any number of readers may share the export'))),
  requestTimeout: v.optional(
    v.pipe(v.number(), v.safeInteger(), v.minValue(100), v.maxValue(600_000), v.description('milliseconds one S3 request may take before it fails (default 10000)')),
  ),
});

/** The settings after validation and defaults, environment resolved. */
export interface S3Options {
  readonly bucket: string;
  /** Without a trailing '/'; '' for none. */
  readonly prefix: string;
  readonly endpoint: string | undefined;
  readonly region: string;
  readonly credentials: { readonly accessKeyId: string; readonly secretAccessKey: string } | undefined;
  readonly forcePathStyle: boolean;
  readonly chunkSize: number | undefined;
  readonly size: number | undefined;
  readonly readonly: boolean;
  readonly requestTimeoutMs: number;
}

/** Default time one S3 request may take (each attempt): 10 s. */
export const S3_DEFAULT_REQUEST_TIMEOUT_MS = 10_000;

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** Validates `desc` and fills in what the environment gives. */
export function resolveS3Settings(desc: LayerDescription, env: NodeJS.ProcessEnv = process.env): S3Options {
  const s = parseSettings('s3', s3Settings, desc);
  if (s.chunkSize !== undefined && (!isPowerOfTwo(s.chunkSize) || s.chunkSize < S3_MIN_CHUNK_SIZE || s.chunkSize > S3_MAX_CHUNK_SIZE)) {
    throw new BlockError('EINVAL', `s3: chunkSize: ${s.chunkSize} is not a power of two between ${S3_MIN_CHUNK_SIZE} and ${S3_MAX_CHUNK_SIZE}`);
  }
  const endpoint = s.endpoint ?? (env.AWS_ENDPOINT_URL_S3 || env.AWS_ENDPOINT_URL || undefined);
  const accessKeyId = s.accessKeyId ?? env.AWS_ACCESS_KEY_ID;
  const secretAccessKey = s.secretAccessKey ?? env.AWS_SECRET_ACCESS_KEY;
  if ((accessKeyId === undefined) !== (secretAccessKey === undefined)) {
    throw new BlockError('EINVAL', 's3: accessKeyId and secretAccessKey go together (settings or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)');
  }
  return {
    bucket: s.bucket,
    prefix: (s.prefix ?? '').replace(/^\/+|\/+$/g, ''),
    endpoint,
    region: s.region ?? (env.AWS_REGION || env.AWS_DEFAULT_REGION || S3_DEFAULT_REGION),
    credentials: accessKeyId !== undefined && secretAccessKey !== undefined ? { accessKeyId, secretAccessKey } : undefined,
    forcePathStyle: s.forcePathStyle ?? endpoint !== undefined,
    chunkSize: s.chunkSize,
    size: s.size,
    readonly: s.readonly ?? false,
    requestTimeoutMs: s.requestTimeout ?? S3_DEFAULT_REQUEST_TIMEOUT_MS,
  };
}

/** The settings keys a `s3://` URL's query may set (the rest need a config file). */
const URL_KEYS = new Set(['endpoint', 'region', 'forcePathStyle', 'chunkSize', 'size', 'readonly', 'requestTimeout']);

/**
 * Parses the command-line form `s3://BUCKET/PREFIX[?endpoint=URL&size=1G&...]` into a
 * layer description. Credentials are never taken from the URL (it shows in process
 * listings): they come from the environment or a config file.
 */
export function parseS3Url(url: string): LayerDescription {
  const m = /^s3:\/\/([^/?#]+)\/?([^?#]*)(?:\?([^#]*))?$/i.exec(url);
  if (!m) throw new BlockError('EINVAL', `'${url}': expected s3://BUCKET/PREFIX[?endpoint=URL&size=SIZE...]`);
  const desc: Record<string, unknown> = { type: 's3', bucket: decodeURIComponent(m[1]!), prefix: decodeURIComponent(m[2]!) };
  for (const [key, value] of new URLSearchParams(m[3] ?? '')) {
    if (!URL_KEYS.has(key)) {
      throw new BlockError('EINVAL', `'${url}': unknown s3 URL parameter '${key}' (known: ${[...URL_KEYS].join(', ')}; credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)`);
    }
    if (key === 'forcePathStyle' || key === 'readonly') {
      if (value !== 'true' && value !== 'false') throw new BlockError('EINVAL', `'${url}': ${key}: expected true or false, got '${value}'`);
      desc[key] = value === 'true';
    } else if (key === 'requestTimeout') {
      desc[key] = Number(value);
    } else {
      desc[key] = value;
    }
  }
  return desc as LayerDescription;
}

/** The key of an export's object `name` (`meta.json`, `lease`, `chunk/...`) under `prefix`. */
export function s3Key(prefix: string, name: string): string {
  return prefix === '' ? name : `${prefix}/${name}`;
}

/** Hex digits of a chunk index in its key: 16, so keys sort as indexes do (a ListObjectsV2 order). */
export const CHUNK_INDEX_DIGITS = 16;

/** The key of chunk `index`. */
export function chunkKey(prefix: string, index: number): string {
  return s3Key(prefix, `chunk/${index.toString(16).padStart(CHUNK_INDEX_DIGITS, '0')}`);
}
