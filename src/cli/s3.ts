/**
 * `blockgate s3 create s3://BUCKET/PREFIX SIZE [--chunk-size SIZE]`: creates an s3
 * export (docs/S3.md): the bucket if it does not exist, then PREFIX/meta.json with the
 * size and chunk size, written with `If-None-Match: *` so that an existing export is
 * never overwritten (it is refused with EEXIST naming its size). Endpoint and region
 * come from the URL's query or the environment, credentials from AWS_ACCESS_KEY_ID /
 * AWS_SECRET_ACCESS_KEY, as for `blockgate serve s3://...`.
 */
import { Command } from 'commander';
import { BlockError, toBlockError } from '../errors/index.js';
import { formatSize, parseSize } from '../device/index.js';
import { S3Store, S3_DEFAULT_CHUNK_SIZE, createS3Meta, parseS3Url, resolveS3Settings } from '../backends/index.js';

/** Creates the export; resolves with the line to print. */
export async function s3Create(url: string, size: string, chunkSize?: string): Promise<string> {
  const desc = { ...parseS3Url(url), size, ...(chunkSize !== undefined ? { chunkSize } : {}) };
  const o = resolveS3Settings(desc);
  const where = `s3://${o.bucket}/${o.prefix}`;
  const store = new S3Store(o);
  try {
    const cs = o.chunkSize ?? S3_DEFAULT_CHUNK_SIZE;
    const { meta, created } = await createS3Meta(store, o.prefix, o.size!, cs, where);
    if (!created) {
      throw new BlockError('EEXIST', `${where} already exists (${formatSize(meta.size)} in chunks of ${formatSize(meta.chunkSize)}); nothing changed`);
    }
    return `created ${where}: ${formatSize(meta.size)} in chunks of ${formatSize(meta.chunkSize)} (${store.endpoint})`;
  } finally {
    store.close();
  }
}

export function s3Command(): Command {
  const cmd = new Command('s3').description('manage s3 exports: chunk objects in an S3 bucket (see docs/S3.md)');
  cmd
    .command('create')
    .description('create an s3 export (the bucket if missing, and PREFIX/meta.json); an existing one is refused')
    .argument('<url>', 's3://BUCKET/PREFIX[?endpoint=URL&region=R] (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)')
    .argument('<size>', 'virtual size, e.g. 10G', (v: string) => {
      parseSize(v);
      return v;
    })
    .option('--chunk-size <size>', `bytes per chunk object, a power of two from 4K to 64M (default ${formatSize(S3_DEFAULT_CHUNK_SIZE)})`)
    .action(async (url: string, size: string, flags: { chunkSize?: string }) => {
      try {
        process.stdout.write(`${await s3Create(url, size, flags.chunkSize)}\n`);
      } catch (e) {
        const b = toBlockError(e);
        process.stderr.write(`blockgate s3 create: ${b.message} (${b.code})\n`);
        process.exitCode = 1;
      }
    });
  return cmd;
}
