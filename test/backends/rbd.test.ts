/**
 * The rbd backend against a real single-node Ceph cluster (test/helpers/ceph.ts): the
 * backend contract, data that `rbd export` reads back, sizes, flush, discard, zeroes,
 * extents against `rbd diff`, a resize by another client noticed, settings and errors.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { REQ, EXTENT } from '../../src/device/types.js';
import { BACKEND_SETTINGS } from '../../src/backends/index.js';
import { RbdDevice, rbdBackend, parseRbdSpec } from '../../src/backends/rbd/index.js';
import { BlockError } from '../../src/errors/index.js';
import { loadLibrbd } from '../../src/backends/rbd/librbd.js';
import { startCephCluster, type CephCluster } from '../helpers/ceph.js';
import { seededBytes } from '../helpers/data.js';
import { assertSameBytes, rejectsWith } from '../helpers/assertions.js';
import { runContract } from './contract.js';

const MiB = 2 ** 20;
let ceph: CephCluster;
let images = 0;

before(async () => {
  ceph = await startCephCluster({ rgw: false });
});
after(async () => {
  await ceph?.stop();
});

/** Creates a fresh image with the rbd CLI and returns its name. */
async function freshImage(size: string): Promise<string> {
  const name = `img${images++}`;
  await ceph.cli('rbd', ['create', `${ceph.pool}/${name}`, '--size', size]);
  return name;
}

const open = (image: string, extra: Record<string, unknown> = {}): Promise<RbdDevice> =>
  rbdBackend({ type: 'rbd', pool: ceph.pool, image, conf: ceph.conf, keyring: ceph.keyring, ...extra });

runContract(
  'rbd',
  async () => {
    const image = await freshImage('8M');
    return { dev: await open(image), cleanup: async () => undefined };
  },
  { initial: (_o, n) => Buffer.alloc(n) },
);

describe('rbd backend on a real cluster', () => {
  test('writes through the backend are the bytes `rbd export` reads, and the size is the image size', async () => {
    const image = await freshImage('16M');
    const dev = await open(image);
    try {
      assert.equal(dev.size, 16 * MiB);
      assert.match(dev.description, new RegExp(`^rbd ${ceph.pool}/${image} 16MiB`));
      const data = seededBytes(1, 16 * MiB);
      await Promise.all([0, 1, 2, 3].map((i) => dev.write(data.subarray(i * 4 * MiB, (i + 1) * 4 * MiB), i * 4 * MiB, 0)));
      await dev.flush(0);
      const out = path.join(ceph.dir, `${image}.raw`);
      await ceph.cli('rbd', ['export', `${ceph.pool}/${image}`, out]);
      assertSameBytes(fs.readFileSync(out), data, 'rbd export');
      fs.rmSync(out);
    } finally {
      await dev.close();
    }
  });

  test('an image written with `rbd import` reads back the same through the backend, unaligned too', async () => {
    const data = seededBytes(2, 5 * MiB + 777);
    const src = path.join(ceph.dir, 'import.raw');
    fs.writeFileSync(src, data);
    const image = `img${images++}`;
    await ceph.cli('rbd', ['import', src, `${ceph.pool}/${image}`]);
    fs.rmSync(src);
    const dev = await open(image);
    try {
      assert.equal(dev.size, data.length);
      const buf = Buffer.alloc(3 * MiB + 13);
      await dev.read(buf, 123_457, 0);
      assertSameBytes(buf, data.subarray(123_457, 123_457 + buf.length), 'unaligned read');
    } finally {
      await dev.close();
    }
  });

  test('extents report written ranges as data and the rest as holes, as `rbd diff` lists them', async () => {
    const image = await freshImage('64M');
    const dev = await open(image);
    try {
      await dev.write(Buffer.alloc(MiB, 1), 4 * MiB, 0);
      await dev.write(Buffer.alloc(64 * 1024, 2), 40 * MiB, REQ.FUA);
      const ext = await dev.extents(0, dev.size, 0);
      const data = ext.filter((e) => e.flags === 0).map((e) => [e.offset, e.length]);
      const diff = JSON.parse(await ceph.cli('rbd', ['diff', `${ceph.pool}/${image}`, '--format', 'json'])) as { offset: number; length: number; exists: string }[];
      assert.deepEqual(data, diff.filter((d) => d.exists === 'true').map((d) => [d.offset, d.length]));
      // librbd reports an object from its start to its end of data: 40 MiB starts an object.
      assert.deepEqual(data, [[4 * MiB, MiB], [40 * MiB, 64 * 1024]]);
      assert.ok(ext.filter((e) => e.flags !== 0).every((e) => e.flags === (EXTENT.HOLE | EXTENT.ZERO)));
      // Contiguous from the offset asked, to the end of the image.
      let pos = 0;
      for (const e of ext) {
        assert.equal(e.offset, pos);
        pos += e.length;
      }
      assert.equal(pos, dev.size);
      // A query from the middle of a data extent starts there and ends where it was asked to.
      const mid = await dev.extents(4 * MiB + 4096, 8192, 0);
      assert.deepEqual(mid, [{ offset: 4 * MiB + 4096, length: 8192, flags: 0 }]);
    } finally {
      await dev.close();
    }
  });

  test('zero() makes a range read as zeroes (with NO_HOLE too), and trim() of whole objects leaves a hole', async () => {
    const image = await freshImage('16M');
    const dev = await open(image);
    try {
      await dev.write(Buffer.alloc(12 * MiB, 0xee), 0, 0);
      await dev.zero(1000, 5000, 0);
      await dev.zero(MiB, 64 * 1024, REQ.NO_HOLE);
      await rejectsWith(dev.zero(0, 4096, REQ.NO_HOLE | REQ.FAST_ZERO), 'EOPNOTSUPP');
      const buf = Buffer.alloc(2 * MiB);
      await dev.read(buf, 0, 0);
      const want = Buffer.alloc(2 * MiB, 0xee);
      want.fill(0, 1000, 6000);
      want.fill(0, MiB, MiB + 64 * 1024);
      assertSameBytes(buf, want, 'after zero');
      // The image's objects are 4 MiB: trimming the second one whole removes it.
      await dev.trim(4 * MiB, 4 * MiB, 0);
      const ext = await dev.extents(4 * MiB, 4 * MiB, 0);
      assert.equal(ext[0]!.flags & EXTENT.HOLE, EXTENT.HOLE, JSON.stringify(ext));
      const back = Buffer.alloc(4 * MiB, 1);
      await dev.read(back, 4 * MiB, 0);
      assertSameBytes(back, Buffer.alloc(4 * MiB), 'a trimmed object reads as zeroes');
    } finally {
      await dev.close();
    }
  });

  test('a resize by another client is noticed at the next flush', async () => {
    const image = await freshImage('8M');
    const dev = await open(image);
    try {
      assert.equal(dev.size, 8 * MiB);
      await ceph.cli('rbd', ['resize', `${ceph.pool}/${image}`, '--size', '12M']);
      // The header watch tells librbd; the flush re-reads the size (bounded retries: the
      // notification is asynchronous).
      for (let i = 0; i < 50 && dev.size !== 12 * MiB; i++) {
        await dev.flush(0);
        if (dev.size !== 12 * MiB) await new Promise((r) => setTimeout(r, 100));
      }
      assert.equal(dev.size, 12 * MiB);
      await dev.write(Buffer.alloc(4096, 3), 11 * MiB, 0);
    } finally {
      await dev.close();
    }
  });

  test('many requests in flight at once all complete with their own data (QD 64, mixed sizes)', async () => {
    const image = await freshImage('32M');
    const dev = await open(image);
    try {
      const data = seededBytes(3, 32 * MiB);
      const pieces = Array.from({ length: 256 }, (_, i) => i);
      await Promise.all(pieces.map((i) => dev.write(data.subarray(i * 128 * 1024, (i + 1) * 128 * 1024), i * 128 * 1024, 0)));
      const bufs = pieces.map(() => Buffer.alloc(128 * 1024));
      await Promise.all(pieces.map((i) => dev.read(bufs[i]!, i * 128 * 1024, 0)));
      assertSameBytes(Buffer.concat(bufs), data, 'read back');
    } finally {
      await dev.close();
    }
  });

  test('a burst of 100 extents queries at once all answer the same map (queued, never refused)', async () => {
    const image = await freshImage('16M');
    const dev = await open(image);
    try {
      await dev.write(Buffer.alloc(4096, 1), 4 * MiB, 0);
      const maps = await Promise.all(Array.from({ length: 100 }, () => dev.extents(0, dev.size, 0)));
      for (const m of maps) assert.deepEqual(m, maps[0]);
      assert.deepEqual(maps[0]!.filter((e) => e.flags === 0).map((e) => e.offset), [4 * MiB]);
    } finally {
      await dev.close();
    }
  });

  test('read-only: writes, trims and zeroes fail EPERM and the capabilities say so', async () => {
    const image = await freshImage('4M');
    const dev = await open(image, { readonly: true });
    try {
      assert.equal(dev.capabilities.write, false);
      await rejectsWith(dev.write(Buffer.alloc(512), 0, 0), 'EPERM');
      await rejectsWith(dev.trim(0, 512, 0), 'EPERM');
      await rejectsWith(dev.zero(0, 512, 0), 'EPERM');
    } finally {
      await dev.close();
    }
  });

  test('readonly opens with a cephx user that may only read the pool (id and keyring settings), and reads what admin wrote', async () => {
    const image = await freshImage('4M');
    const admin = await open(image);
    await admin.write(Buffer.alloc(4096, 0x77), 8192, 0);
    await admin.close();
    const keyring = path.join(ceph.dir, 'client.reader.keyring');
    fs.writeFileSync(keyring, await ceph.cli('ceph', ['auth', 'get-or-create', 'client.reader', 'mon', 'profile rbd', 'osd', `profile rbd-read-only pool=${ceph.pool}`]));
    const dev = await rbdBackend({ type: 'rbd', pool: ceph.pool, image, conf: ceph.conf, id: 'reader', keyring, readonly: true });
    try {
      const buf = Buffer.alloc(4096);
      await dev.read(buf, 8192, 0);
      assertSameBytes(buf, Buffer.alloc(4096, 0x77), 'read by client.reader');
      await rejectsWith(dev.write(buf, 0, 0), 'EPERM');
    } finally {
      await dev.close();
    }
  });

  test('multi-conn is advertised with the rbd cache off (the default) and not with it on', async () => {
    const image = await freshImage('4M');
    const off = await open(image);
    const on = await open(image, { cache: true });
    try {
      assert.equal(off.capabilities.multiConn, true);
      assert.equal(on.capabilities.multiConn, false);
      assert.match(on.description, /rbd cache on/);
      // With the cache on a FUA write is flushed before it is acknowledged: another client sees it.
      await on.write(Buffer.alloc(4096, 0x5a), 0, REQ.FUA);
      const buf = Buffer.alloc(4096);
      await off.read(buf, 0, 0);
      assertSameBytes(buf, Buffer.alloc(4096, 0x5a), 'FUA write seen by the other client');
    } finally {
      await on.close();
      await off.close();
    }
  });

  test('a missing image fails ENOENT naming it and the create command; a missing pool fails ENOENT', async () => {
    await rejectsWith(open('no-such-image'), 'ENOENT', /no-such-image.*blockgate rbd create/);
    await rejectsWith(
      rbdBackend({ type: 'rbd', pool: 'no-such-pool', image: 'x', conf: ceph.conf }),
      'ENOENT',
      /pool 'no-such-pool'/,
    );
  });

  test('a bad setting is EINVAL naming the key, and rbd is listed with its settings', async () => {
    await rejectsWith(rbdBackend({ type: 'rbd', pool: 'rbd', image: 'a/b' }), 'EINVAL', /^rbd: image: /);
    await rejectsWith(rbdBackend({ type: 'rbd', pool: 'rbd' }), 'EINVAL', /^rbd: image: required/);
    await rejectsWith(rbdBackend({ type: 'rbd', pool: 'rbd', image: 'x', timeout: 0 }), 'EINVAL', /^rbd: timeout: /);
    await rejectsWith(rbdBackend({ type: 'rbd', pool: 'rbd', image: 'x', colour: 1 }), 'EINVAL', /^rbd: colour: unknown setting/);
    assert.ok(BACKEND_SETTINGS.has('rbd'));
    assert.deepEqual(parseRbdSpec('rbd/disk1'), { pool: 'rbd', image: 'disk1' });
    assert.throws(() => parseRbdSpec('disk1'), /expected POOL\/IMAGE/);
  });

  test('a librbd that cannot be loaded is ENOSYS naming the Debian package to install', () => {
    assert.throws(
      () => loadLibrbd({ rados: 'librados.so.2', rbd: 'librbd-not-installed.so.1' }),
      (e: unknown) => e instanceof BlockError && e.code === 'ENOSYS' && /install the Debian package librbd1/.test(e.message) && /librbd-not-installed/.test(e.message),
    );
  });

  test('a conf file that does not exist fails with its path in the message', async () => {
    await rejectsWith(
      rbdBackend({ type: 'rbd', pool: 'rbd', image: 'x', conf: path.join(ceph.dir, 'missing.conf') }),
      'ENOENT',
      /cannot read .*missing\.conf/,
    );
  });
});
