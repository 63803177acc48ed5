/**
 * The s3 backend against a real radosgw (one throw-away Ceph cluster for this file):
 * the backend contract, chunk boundaries, read-modify-write, sparse reads and block
 * status, trim deleting objects (seen with ListObjectsV2), the write-back error of a
 * failed PUT reaching every session's FLUSH once, and the single-writer lease.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { ListObjectsV2Command, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { startCephCluster, type CephCluster } from '../helpers/ceph.js';
import { runContract } from './contract.js';
import { ErrSeq } from '../../src/errseq/index.js';
import { EXTENT, REQ, newStackContext, type LayerDescription } from '../../src/device/index.js';
import { createStack } from '../../src/export/registry.js';
import { Export, flushExport } from '../../src/export/index.js';
import { S3Device, S3Store, S3_WRITEBACK_DELAY_MS, chunkKey, parseS3Url, resolveS3Settings, s3Backend } from '../../src/backends/index.js';
import { isBlockError } from '../../src/errors/index.js';

let cluster: CephCluster;
let raw: S3Client;
let serial = 0;
const BUCKET = 'unit';
const CHUNK = 64 * 1024;

/** A fresh prefix per device, so the tests never see each other's objects. */
const fresh = (): string => `t${process.pid}-${++serial}`;

function desc(prefix: string, more: Record<string, unknown> = {}): LayerDescription {
  return {
    type: 's3',
    bucket: BUCKET,
    prefix,
    endpoint: cluster.s3.endpoint,
    accessKeyId: cluster.s3.accessKeyId,
    secretAccessKey: cluster.s3.secretAccessKey,
    size: 1024 * 1024,
    chunkSize: CHUNK,
    ...more,
  };
}

async function open(prefix: string, more: Record<string, unknown> = {}, errseq = new ErrSeq()): Promise<S3Device> {
  return await S3Device.open({ ...resolveS3Settings(desc(prefix, more)), errseq });
}

async function keys(prefix: string): Promise<string[]> {
  const out = await raw.send(new ListObjectsV2Command({ Bucket: BUCKET, Prefix: `${prefix}/` }));
  return (out.Contents ?? []).map((o) => o.Key!).sort();
}

async function readAt(dev: S3Device, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length, 0xa5);
  await dev.read(b, offset, 0);
  return b;
}

/** radosgw's PID, from the cluster's pid file. */
function rgwPid(): number {
  const runDir = path.join(cluster.dir, 'run');
  const f = fs.readdirSync(runDir).find((n) => n.includes('rgw') && n.endsWith('.pid'));
  assert.ok(f, `no radosgw pid file in ${runDir}`);
  return Number(fs.readFileSync(path.join(runDir, f), 'utf8').trim());
}

before(async () => {
  cluster = await startCephCluster();
  raw = new S3Client({
    endpoint: cluster.s3.endpoint,
    region: 'us-east-1',
    forcePathStyle: true,
    credentials: { accessKeyId: cluster.s3.accessKeyId, secretAccessKey: cluster.s3.secretAccessKey },
  });
  // The bucket comes into being with the first export opened with a size.
  await (await open(fresh())).close();
});

after(async () => {
  raw?.destroy();
  await cluster?.stop();
});

describe('s3 backend', () => {
  runContract('s3', async () => ({ dev: await open(fresh()), cleanup: async () => undefined }), { initial: (_o, n) => Buffer.alloc(n) });

  test('s3://BUCKET/PREFIX?query parses into settings, and bad keys are named', () => {
    assert.deepEqual(parseS3Url('s3://b/disks/one?endpoint=http://127.0.0.1:1&size=1G&readonly=true'), {
      type: 's3',
      bucket: 'b',
      prefix: 'disks/one',
      endpoint: 'http://127.0.0.1:1',
      size: '1G',
      readonly: true,
    });
    assert.throws(() => parseS3Url('s3://b/p?secretAccessKey=x'), /unknown s3 URL parameter 'secretAccessKey'/);
    assert.throws(() => resolveS3Settings({ type: 's3', bucket: 'b', chunkSize: '3000' }), /chunkSize: 3000 is not a power of two/);
    assert.throws(() => resolveS3Settings({ type: 's3', bucket: 'b', colour: 1 }), /s3: colour: unknown setting/);
  });

  test('writes across chunk boundaries read back, from the images and after they are uploaded', async () => {
    const dev = await open(fresh());
    try {
      const data = randomBytes(3 * CHUNK + 1000);
      const at = CHUNK - 500;
      await dev.write(data, at, 0);
      assert.deepEqual(await readAt(dev, at, data.length), data, 'read back before FLUSH');
      await dev.flush(0);
      assert.deepEqual(await readAt(dev, at, data.length), data, 'read back after FLUSH');
      const again = await open(dev.where.split('/').pop()!, { readonly: true });
      assert.deepEqual(await readAt(again, at, data.length), data, 'another opener reads it from S3');
      assert.deepEqual(await readAt(again, 0, at), Buffer.alloc(at), 'bytes before it are zero');
      await again.close();
    } finally {
      await dev.close();
    }
  });

  test('a partial write into an uploaded chunk keeps the rest of the chunk (read-modify-write)', async () => {
    const prefix = fresh();
    const dev = await open(prefix);
    const base = randomBytes(CHUNK);
    await dev.write(base, CHUNK, 0);
    await dev.close();
    const dev2 = await open(prefix);
    try {
      const patch = randomBytes(100);
      await dev2.write(patch, CHUNK + 1000, 0);
      await dev2.write(patch, CHUNK + 5000, 0);
      await dev2.flush(0);
      const want = Buffer.from(base);
      patch.copy(want, 1000);
      patch.copy(want, 5000);
      const reader = await open(prefix, { readonly: true });
      assert.deepEqual(await readAt(reader, CHUNK, CHUNK), want);
      await reader.close();
    } finally {
      await dev2.close();
    }
  });

  test('overlapping partial writes to one chunk in flight together all land, the last one winning', async () => {
    const prefix = fresh();
    const dev = await open(prefix);
    await dev.write(Buffer.alloc(CHUNK, 1), 0, 0);
    await dev.close();
    const dev2 = await open(prefix);
    const writes: Promise<void>[] = [];
    const want = Buffer.alloc(CHUNK, 1);
    for (let i = 0; i < 50; i++) {
      const piece = Buffer.alloc(512, i + 2);
      writes.push(dev2.write(piece, i * 300, 0));
      piece.copy(want, i * 300);
    }
    await Promise.all(writes);
    await dev2.close();
    const reader = await open(prefix, { readonly: true });
    assert.deepEqual(await readAt(reader, 0, CHUNK), want);
    await reader.close();
  });

  test('chunks never written read as zeroes and have no object', async () => {
    const prefix = fresh();
    const dev = await open(prefix);
    try {
      assert.deepEqual(await readAt(dev, 5 * CHUNK + 7, 2 * CHUNK), Buffer.alloc(2 * CHUNK));
      await dev.flush(0);
      assert.deepEqual(await keys(prefix), [`${prefix}/lease`, `${prefix}/meta.json`]);
    } finally {
      await dev.close();
    }
  });

  test('trim and zero of whole chunks delete their objects; parts of chunks are zeroed in place', async () => {
    const prefix = fresh();
    const dev = await open(prefix);
    try {
      await dev.write(randomBytes(4 * CHUNK), 0, 0);
      await dev.flush(0);
      assert.deepEqual((await keys(prefix)).filter((k) => k.includes('/chunk/')), [0, 1, 2, 3].map((i) => chunkKey(prefix, i)));
      await dev.trim(CHUNK - 10, CHUNK + 20, 0); // covers chunk 1 whole only
      await dev.zero(2 * CHUNK, CHUNK + 100, 0); // chunk 2 whole, 100 bytes of chunk 3
      await dev.flush(0);
      assert.deepEqual((await keys(prefix)).filter((k) => k.includes('/chunk/')), [chunkKey(prefix, 0), chunkKey(prefix, 3)]);
      assert.deepEqual(await readAt(dev, CHUNK, 2 * CHUNK + 100), Buffer.alloc(2 * CHUNK + 100));
    } finally {
      await dev.close();
    }
  });

  test('block status reports holes for chunks without objects, for the writer and a reader', async () => {
    const prefix = fresh();
    const dev = await open(prefix);
    try {
      await dev.write(Buffer.alloc(10, 7), 2 * CHUNK + 5, 0);
      await dev.write(Buffer.alloc(CHUNK, 7), 3 * CHUNK, 0);
      const expected = [
        { offset: 0, length: 2 * CHUNK, flags: EXTENT.HOLE | EXTENT.ZERO },
        { offset: 2 * CHUNK, length: 2 * CHUNK, flags: 0 },
        { offset: 4 * CHUNK, length: 1024 * 1024 - 4 * CHUNK, flags: EXTENT.HOLE | EXTENT.ZERO },
      ];
      assert.deepEqual(await dev.extents(0, 1024 * 1024, 0), expected, 'before upload');
      await dev.flush(0);
      assert.deepEqual(await dev.extents(0, 1024 * 1024, 0), expected, 'after upload');
      assert.deepEqual(await dev.extents(0, 1024 * 1024, REQ.REQ_ONE), [expected[0]]);
      const reader = await open(prefix, { readonly: true });
      assert.deepEqual(await reader.extents(0, 1024 * 1024, 0), expected, 'a reader, from its listing');
      await reader.close();
    } finally {
      await dev.close();
    }
  });

  test('a chunk written in sequential pieces is PUT once, when they cover it', async () => {
    const prefix = fresh();
    const dev = await open(prefix);
    const puts: string[] = [];
    const put = S3Store.prototype.put;
    // Counts the real PUTs (each still goes to radosgw).
    S3Store.prototype.put = function (this: S3Store, key: string, ...rest: Parameters<typeof put> extends [string, ...infer R] ? R : never) {
      puts.push(key);
      return put.call(this, key, ...rest);
    };
    try {
      const data = randomBytes(4 * CHUNK);
      const piece = CHUNK / 4;
      await Promise.all(Array.from({ length: 16 }, (_, i) => dev.write(data.subarray(i * piece, (i + 1) * piece), i * piece, 0)));
      await dev.flush(0);
      assert.deepEqual(puts.sort(), [0, 1, 2, 3].map((i) => chunkKey(prefix, i)));
      assert.deepEqual(await readAt(dev, 0, 4 * CHUNK), data);
    } finally {
      S3Store.prototype.put = put;
      await dev.close();
    }
  });

  test('a partly written chunk is uploaded after the write-back delay without a FLUSH', async () => {
    const prefix = fresh();
    const dev = await open(prefix);
    try {
      await dev.write(Buffer.alloc(100, 9), 10, 0);
      const deadline = Date.now() + S3_WRITEBACK_DELAY_MS + 20_000;
      while (!(await keys(prefix)).includes(chunkKey(prefix, 0))) {
        assert.ok(Date.now() < deadline, 'the chunk was never uploaded');
        await new Promise((r) => setTimeout(r, 100));
      }
    } finally {
      await dev.close();
    }
  });

  test('a second writer is refused with an error naming the holder and expiry; readers are allowed', async () => {
    const prefix = fresh();
    const writer = await open(prefix);
    try {
      await assert.rejects(open(prefix), (e: unknown) => {
        assert.ok(isBlockError(e) && e.code === 'EBUSY', String(e));
        assert.match(e.message, new RegExp(`s3://${BUCKET}/${prefix} is being written by [^ ]+:${process.pid} \\(lease ${prefix}/lease valid until \\d{4}-\\d\\d-\\d\\dT`));
        return true;
      });
      const readers = await Promise.all([open(prefix, { readonly: true }), open(prefix, { readonly: true })]);
      for (const r of readers) {
        assert.equal(r.capabilities.write, false);
        await assert.rejects(r.write(Buffer.alloc(1), 0, 0), (e: unknown) => isBlockError(e) && e.code === 'EPERM');
        await r.close();
      }
      // A stack with the readonly filter opens as a reader too.
      const stack = await createStack({ backend: desc(prefix), filters: [{ type: 'readonly' }] });
      await stack.close();
    } finally {
      await writer.close();
    }
  });

  test('radosgw 16 conditions, as lease.ts relies on them: If-None-Match creates once, If-Match wants the bare ETag', async () => {
    const key = `${fresh()}/probe`;
    const put = (cond: { IfNoneMatch?: string; IfMatch?: string }) =>
      raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: key, Body: 'x', ...cond })).then(
        (r) => r.ETag!,
        (e: { $metadata?: { httpStatusCode?: number } }) => e.$metadata?.httpStatusCode ?? 0,
      );
    const etag = await put({ IfNoneMatch: '*' });
    assert.equal(typeof etag, 'string');
    assert.equal(await put({ IfNoneMatch: '*' }), 412, 'If-None-Match: * on an existing key');
    assert.equal(await put({ IfMatch: etag as string }), 412, 'the quoted ETag S3 returned does not match on radosgw 16');
    assert.equal(typeof (await put({ IfMatch: (etag as string).replace(/"/g, '') })), 'string', 'the bare ETag does');
    assert.equal(await put({ IfMatch: '0123' }), 412, 'a wrong ETag');
  });

  test('closing a writer releases the lease: the next writer gets it at once', async () => {
    const prefix = fresh();
    const first = await open(prefix);
    await first.close();
    assert.ok(!(await keys(prefix)).includes(`${prefix}/lease`), 'lease object deleted');
    const second = await open(prefix);
    await second.close();
  });

  test('an expired lease is taken over; a lease object that is not blockgate\'s is refused', async () => {
    const prefix = fresh();
    await (await open(prefix)).close();
    const stale = { format: 'blockgate-s3-lease', holder: 'crashed-host:1', token: 'x', expires: Date.now() - 1000 };
    await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: `${prefix}/lease`, Body: JSON.stringify(stale) }));
    const dev = await open(prefix);
    await dev.close();
    await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: `${prefix}/lease`, Body: 'not json' }));
    await assert.rejects(open(prefix), /being written by an unknown holder/);
  });

  test('opening a missing export without a size names the create command', async () => {
    await assert.rejects(open(fresh(), { size: undefined }), /no export there .*blockgate s3 create/);
  });

  test('a size or chunk size that disagrees with meta.json is refused', async () => {
    const prefix = fresh();
    await (await open(prefix)).close();
    await assert.rejects(open(prefix, { size: 2 * 1024 * 1024 }), /size: the export is 1048576 bytes/);
    await assert.rejects(open(prefix, { chunkSize: 4 * CHUNK }), /chunkSize: the export has chunks of 65536 bytes/);
  });

  test('a failed PUT is reported once to the FLUSH of every session, and a later FLUSH uploads the data', async () => {
    const prefix = fresh();
    const ctx = newStackContext();
    const device = await createStack({ backend: desc(prefix, { requestTimeout: 1000 }) }, ctx);
    const exp = new Export({ name: 'x', device });
    const a = exp.errseq.sample();
    const b = exp.errseq.sample();
    const data = randomBytes(1000);
    await device.write(data, 100, 0); // acknowledged, in memory: a partial chunk waits
    const pid = rgwPid();
    process.kill(pid, 'SIGSTOP');
    let resumed = false;
    try {
      const fa = await flushExport(exp, device, a);
      assert.ok(fa.error, 'session A: the FLUSH reports the failed PUT');
      assert.equal(fa.error.code, 'ETIMEDOUT', fa.error.message);
      const fa2 = await flushExport(exp, device, fa.cursor);
      // The retry fails again: recorded again, so A hears of it again (the data is still not durable).
      assert.ok(fa2.error);
      process.kill(pid, 'SIGCONT');
      resumed = true;
      const fb = await flushExport(exp, device, b);
      assert.ok(fb.error, 'session B hears of it at its own first FLUSH');
      const fb2 = await flushExport(exp, device, fb.cursor);
      assert.equal(fb2.error, null, 'once');
      const fa3 = await flushExport(exp, device, fa2.cursor);
      assert.equal(fa3.error, null, 'S3 is back: the kept chunk was uploaded');
      const reader = await s3Backend(desc(prefix, { readonly: true }), newStackContext());
      assert.deepEqual(await readAt(reader, 100, 1000), data);
      await reader.close();
    } finally {
      if (!resumed) process.kill(pid, 'SIGCONT');
      await device.close();
    }
  });
});
