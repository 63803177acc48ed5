import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { BlockError } from '../../src/errors/index.js';
import { REQ } from '../../src/device/types.js';
import { FileDevice, IOV_MAX, TMPFS_MAGIC, ZERO_CHUNK_SIZE, fileBackend } from '../../src/backends/file.js';
import { runContract } from './contract.js';

const SIZE = 3 * 2 ** 20 + 12345;
const root = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-file-test-'));
after(() => fs.rmSync(root, { recursive: true, force: true }));

let counter = 0;
/** A fresh path in the test directory (not yet created). */
const tempPath = () => path.join(root, `disk-${counter++}.img`);
const removeFile = (file: string) => async () => fs.rmSync(file, { force: true });

runContract(
  'file',
  async () => {
    const file = tempPath();
    return { dev: await fileBackend({ type: 'file', path: file, create: true, size: SIZE }), cleanup: removeFile(file) };
  },
  { initial: (_o, n) => Buffer.alloc(n) },
);

runContract(
  'file (inline I/O)',
  async () => {
    const file = tempPath();
    const dev = await fileBackend({ type: 'file', path: file, create: true, size: SIZE, io: 'inline' });
    assert.equal(dev.nonBlocking, true);
    return { dev, cleanup: removeFile(file) };
  },
  { initial: (_o, n) => Buffer.alloc(n) },
);

runContract(
  'file (readonly)',
  async () => {
    const file = tempPath();
    const content = Buffer.alloc(SIZE);
    content.fill(0x3c, 0, 100000);
    fs.writeFileSync(file, content);
    return { dev: await fileBackend({ type: 'file', path: file, readonly: true }), cleanup: removeFile(file) };
  },
  { initial: (o, n) => Buffer.from(Buffer.alloc(SIZE).fill(0x3c, 0, 100000).subarray(o, o + n)) },
);

async function readAt(dev: FileDevice, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await dev.read(buf, offset, 0);
  return buf;
}

describe('file backend', () => {
  test('writes reach the file; flush (fdatasync) and FUA succeed', async () => {
    const file = tempPath();
    const dev = await FileDevice.open({ path: file, create: true, size: 1 << 20 });
    const data = randomBytes(5000);
    await dev.write(data, 777, REQ.FUA);
    await dev.flush(0);
    assert.deepEqual(fs.readFileSync(file).subarray(777, 5777), data);
    await dev.close();
  });

  test('a short read at end of file (file truncated under the device) is EIO with the offset', async () => {
    const file = tempPath();
    fs.writeFileSync(file, Buffer.alloc(1 << 20, 1));
    const dev = await FileDevice.open({ path: file });
    assert.equal(dev.size, 1 << 20);
    fs.truncateSync(file, 512 * 1024);
    await assert.rejects(
      dev.read(Buffer.alloc(8192), 512 * 1024 - 4096, 0),
      (e) => e instanceof BlockError && e.code === 'EIO' && e.offset === 512 * 1024,
    );
    await assert.rejects(dev.read(Buffer.alloc(10), 800000, 0), { code: 'EIO', offset: 800000 });
    // Reads before the new end still work.
    assert.deepEqual(await readAt(dev, 0, 4096), Buffer.alloc(4096, 1));
    await dev.close();
  });

  test('readonly opens read-only and rejects writes with EPERM', async () => {
    const file = tempPath();
    fs.writeFileSync(file, Buffer.alloc(65536, 9));
    const dev = await fileBackend({ type: 'file', path: file, readonly: true });
    assert.equal(dev.capabilities.write, false);
    assert.equal(dev.capabilities.fua, false);
    assert.match(dev.description, /read-only/);
    await assert.rejects(dev.write(Buffer.alloc(1), 0, 0), { code: 'EPERM' });
    await assert.rejects(dev.zero(0, 10, 0), { code: 'EPERM' });
    await assert.rejects(dev.trim(0, 10, 0), { code: 'EPERM' });
    assert.deepEqual(fs.readFileSync(file), Buffer.alloc(65536, 9));
    await dev.flush(0);
    await dev.close();
  });

  test('zero() over several chunks writes zeroes; FAST_ZERO fails EOPNOTSUPP and changes nothing', async () => {
    const file = tempPath();
    const length = 2 * ZERO_CHUNK_SIZE + 4321;
    fs.writeFileSync(file, Buffer.alloc(length + 2000, 0xff));
    const dev = await FileDevice.open({ path: file });
    assert.equal(dev.capabilities.fastZero, false);
    await assert.rejects(dev.zero(1000, length, REQ.FAST_ZERO), { code: 'EOPNOTSUPP' });
    assert.deepEqual(fs.readFileSync(file), Buffer.alloc(length + 2000, 0xff));
    await dev.zero(1000, length, REQ.FUA);
    const back = fs.readFileSync(file);
    assert.deepEqual(back.subarray(0, 1000), Buffer.alloc(1000, 0xff));
    assert.deepEqual(back.subarray(1000, 1000 + length), Buffer.alloc(length));
    assert.deepEqual(back.subarray(1000 + length), Buffer.alloc(1000, 0xff));
    await dev.close();
  });

  test('trim is a hint that keeps the data; extents report one data extent', async () => {
    const file = tempPath();
    fs.writeFileSync(file, Buffer.alloc(10000, 5));
    const dev = await FileDevice.open({ path: file });
    await dev.trim(0, 10000, 0);
    assert.deepEqual(await readAt(dev, 0, 10000), Buffer.alloc(10000, 5));
    assert.deepEqual(await dev.extents(100, 500, 0), [{ offset: 100, length: 500, flags: 0 }]);
    assert.deepEqual(await dev.extents(100, 0, 0), [{ offset: 100, length: 9900, flags: 0 }]);
    await dev.close();
  });

  test('create and size: creates, extends sparse, never truncates', async () => {
    const file = tempPath();
    const dev = await fileBackend({ type: 'file', path: file, create: true, size: '1M' });
    assert.equal(dev.size, 2 ** 20);
    assert.equal(fs.statSync(file).size, 2 ** 20);
    await dev.close();
    const bigger = await fileBackend({ type: 'file', path: file, size: '2M' });
    assert.equal(bigger.size, 2 ** 21);
    await bigger.close();
    await assert.rejects(fileBackend({ type: 'file', path: file, size: '1M' }), (e) => {
      return e instanceof BlockError && e.code === 'EINVAL' && /^file: size: .*smaller/.test(e.message);
    });
    assert.equal(fs.statSync(file).size, 2 ** 21);
    await assert.rejects(fileBackend({ type: 'file', path: file, size: '4M', readonly: true }), {
      code: 'EINVAL',
      message: /^file: size:/,
    });
  });

  test('bad settings and paths are reported with the key', async () => {
    await assert.rejects(fileBackend({ type: 'file' }), { code: 'EINVAL', message: /^file: path: required/ });
    await assert.rejects(fileBackend({ type: 'file', path: '' }), { code: 'EINVAL', message: /^file: path:/ });
    await assert.rejects(fileBackend({ type: 'file', path: 'x', size: 'big' }), { code: 'EINVAL', message: /^file: size:/ });
    await assert.rejects(fileBackend({ type: 'file', path: 'x', create: 1 }), { code: 'EINVAL', message: /^file: create:/ });
    await assert.rejects(fileBackend({ type: 'file', path: tempPath(), create: true, readonly: true }), {
      code: 'EINVAL',
      message: /^file: create:/,
    });
    await assert.rejects(fileBackend({ type: 'file', path: path.join(root, 'missing.img') }), {
      code: 'ENOENT',
      message: /^file: path: cannot open/,
    });
    await assert.rejects(fileBackend({ type: 'file', path: root, readonly: true }), { code: 'EINVAL', message: /not a regular file/ });
    await assert.rejects(fileBackend({ type: 'file', path: root }), { code: 'EISDIR' });
  });

  test('close waits for operations in flight, then calls fail EBADF', async () => {
    const file = tempPath();
    const dev = await FileDevice.open({ path: file, create: true, size: 8 * 2 ** 20 });
    const data = randomBytes(8 * 2 ** 20);
    const writing = dev.write(data, 0, 0);
    const closing = dev.close();
    await writing;
    await closing;
    assert.deepEqual(fs.readFileSync(file), data);
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
    await assert.rejects(dev.write(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
    await dev.close();
  });
});

describe('file: I/O mode', () => {
  test('auto picks inline I/O on tmpfs and the thread pool elsewhere', async () => {
    const onDisk = tempPath();
    const a = await fileBackend({ type: 'file', path: onDisk, create: true, size: 4096 });
    let tmpfs = false;
    try {
      tmpfs = (await fs.promises.statfs(root)).type === TMPFS_MAGIC;
    } catch {
      tmpfs = false;
    }
    assert.equal(a.nonBlocking, tmpfs);
    await a.close();
    if (fs.existsSync('/dev/shm') && (await fs.promises.statfs('/dev/shm')).type === TMPFS_MAGIC) {
      const shm = fs.mkdtempSync('/dev/shm/blockgate-file-test-');
      try {
        const b = await fileBackend({ type: 'file', path: path.join(shm, 'x.img'), create: true, size: 4096 });
        assert.equal(b.nonBlocking, true);
        await b.write(Buffer.from('inline'), 100, 0);
        const r = Buffer.alloc(6);
        await b.read(r, 100, 0);
        assert.equal(r.toString(), 'inline');
        await b.close();
        const c = await fileBackend({ type: 'file', path: path.join(shm, 'x.img'), io: 'thread-pool' });
        assert.equal(c.nonBlocking, false);
        await c.close();
      } finally {
        fs.rmSync(shm, { recursive: true, force: true });
      }
    }
  });

  test('a bad io setting is named', async () => {
    await assert.rejects(fileBackend({ type: 'file', path: tempPath(), io: 'fast' }), { code: 'EINVAL', message: /io/ });
  });
});

describe('file: gather writes (writev)', () => {
  for (const io of ['inline', 'thread-pool'] as const) {
    test(`writev stores the same bytes as write of the concatenation (${io}), also beyond IOV_MAX pieces`, async () => {
      const a = await fileBackend({ type: 'file', path: tempPath(), create: true, size: 1 << 20, io });
      const b = await fileBackend({ type: 'file', path: tempPath(), create: true, size: 1 << 20, io });
      try {
        const cases: Buffer[][] = [
          [randomBytes(10), randomBytes(70000), Buffer.alloc(0), randomBytes(3)],
          Array.from({ length: IOV_MAX + 300 }, (_, i) => Buffer.from([i & 0xff, (i >> 8) & 0xff])),
        ];
        let offset = 4097;
        for (const pieces of cases) {
          await a.writev(pieces, offset, REQ.FUA);
          await b.write(Buffer.concat(pieces), offset, 0);
          offset += 100000;
        }
        const ra = Buffer.alloc(1 << 20);
        const rb = Buffer.alloc(1 << 20);
        await a.read(ra, 0, 0);
        await b.read(rb, 0, 0);
        assert.ok(ra.equals(rb));
      } finally {
        await a.close();
        await b.close();
      }
    });
  }

  test('writev on a read-only file is EPERM', async () => {
    const file = tempPath();
    fs.writeFileSync(file, Buffer.alloc(4096));
    const dev = await fileBackend({ type: 'file', path: file, readonly: true });
    await assert.rejects(dev.writev([Buffer.alloc(1)], 0, 0), { code: 'EPERM' });
    await dev.close();
  });
});
