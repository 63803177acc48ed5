/**
 * The plugin adapter: a plugin implementing as little as size and read gets safe
 * defaults, capabilities follow from what it implements, requests reach it checked,
 * settings are validated naming the key, API versions are checked, and errors are mapped.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BlockError,
  EXTENT,
  PLUGIN_API_VERSION,
  PluginDevice,
  PluginErrors,
  REQ,
  capabilitiesOf,
  defineBackend,
  defineFilter,
  pluginOf,
  sizeSetting,
  v,
  type PluginLogger,
} from '../../src/plugin/index.js';
import { openPlugin, runContract } from '../../src/testing/index.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import ramdisk from './fixtures/ramdisk.js';
import xor from './fixtures/upper.js';

const SIZE = 2 ** 20 + 3;

/** Records what the adapter logs. */
function recorder(): PluginLogger & { lines: { fields: Record<string, unknown>; message: string }[] } {
  const lines: { fields: Record<string, unknown>; message: string }[] = [];
  return { lines, error: (fields, message) => lines.push({ fields, message }) };
}

/** The smallest plugin: size and read. Records the calls it gets. */
class Minimal extends PluginDevice {
  readonly calls: string[] = [];
  constructor(readonly size: number) {
    super();
  }
  read(buf: Buffer, offset: number): void {
    this.calls.push(`read ${offset}+${buf.length}`);
    buf.fill(0x5a);
  }
}

const minimal = (dev: Minimal) => defineBackend({ name: 'minimal', open: () => dev });

runContract('plugin (ramdisk fixture)', async () => ({ dev: await openPlugin(ramdisk, { size: SIZE }), cleanup: async () => undefined }), {
  initial: (_o, n) => Buffer.alloc(n),
});
runContract('plugin (size and read only)', async () => ({ dev: await openPlugin(minimal(new Minimal(SIZE))), cleanup: async () => undefined }), {
  initial: (_o, n) => Buffer.alloc(n, 0x5a),
});

describe('plugin adapter: defaults and capabilities', () => {
  test('size + read only: read-only, flush a no-op, one data extent, trim/zero/cache refused or no-ops', async () => {
    const impl = new Minimal(SIZE);
    const dev = await openPlugin(minimal(impl));
    assert.deepEqual(dev.capabilities, {
      write: false, flush: false, fua: false, trim: false, zero: false, fastZero: false, extents: false, cache: false, multiConn: false,
    });
    assert.equal(dev.description, 'plugin minimal');
    assert.deepEqual(dev.blockSize, { minimum: 1, preferred: 4096, maximum: 32 * 2 ** 20 });
    await dev.flush(0);
    await dev.cache(0, 100, 0);
    assert.deepEqual(await dev.extents(10, 100, 0), [{ offset: 10, length: 100, flags: 0 }]);
    await assert.rejects(dev.write(Buffer.alloc(1), 0, 0), { code: 'EPERM' });
    await assert.rejects(dev.zero(0, 1, 0), { code: 'EPERM' });
    await assert.rejects(dev.trim(0, 1, 0), { code: 'EPERM' });
    assert.deepEqual(impl.calls, []);
  });

  test('requests reach the plugin checked: out of range, length 0 and after close never reach it', async () => {
    const impl = new Minimal(SIZE);
    const dev = await openPlugin(minimal(impl));
    await assert.rejects(dev.read(Buffer.alloc(10), SIZE - 5, 0), { code: 'EINVAL' });
    await assert.rejects(dev.read(Buffer.alloc(1), -1, 0), { code: 'EINVAL' });
    await dev.read(Buffer.alloc(0), SIZE, 0);
    await dev.read(Buffer.alloc(3), 7, 0);
    await dev.close();
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
    assert.deepEqual(impl.calls, ['read 7+3']);
  });

  test('capabilities follow from the methods: write + durableWrites, zero written as zeroes, FUA free', async () => {
    const writes: string[] = [];
    class W extends Minimal {
      readonly durableWrites = true;
      write(data: Buffer, offset: number, flags: number): void {
        writes.push(`write ${offset}+${data.length} ${flags} ${data.every((b) => b === 0) ? 'zeroes' : 'data'}`);
      }
    }
    const dev = await openPlugin(minimal(new W(4 * 2 ** 20)));
    assert.deepEqual(dev.capabilities, {
      write: true, flush: true, fua: true, trim: false, zero: true, fastZero: false, extents: false, cache: false, multiConn: false,
    });
    await dev.write(Buffer.alloc(5, 1), 10, REQ.FUA);
    await dev.zero(0, 2 * 2 ** 20 + 1, 0);
    await assert.rejects(dev.zero(0, 10, REQ.FAST_ZERO), { code: 'EOPNOTSUPP' });
    await dev.trim(0, 100, 0);
    await dev.flush(0);
    assert.deepEqual(writes, [
      `write 10+5 ${REQ.FUA} data`,
      'write 0+1048576 0 zeroes',
      'write 1048576+1048576 0 zeroes',
      'write 2097152+1 0 zeroes',
    ]);
  });

  test('with flush() and no durableWrites, FUA is a flush after the write', async () => {
    const log: string[] = [];
    const impl = {
      size: SIZE,
      read: (buf: Buffer) => void buf.fill(0),
      write: (_d: Buffer, offset: number) => void log.push(`write ${offset}`),
      flush: () => void log.push('flush'),
      zero: (offset: number) => void log.push(`zero ${offset}`),
      trim: (offset: number) => void log.push(`trim ${offset}`),
      extents: (offset: number, length: number) => [{ offset, length, flags: EXTENT.HOLE | EXTENT.ZERO }],
      cache: () => void log.push('cache'),
      fastZero: true,
      multiConn: true,
    };
    const dev = await openPlugin(defineBackend({ name: 'full', open: () => impl }));
    assert.deepEqual(dev.capabilities, {
      write: true, flush: true, fua: true, trim: true, zero: true, fastZero: true, extents: true, cache: true, multiConn: true,
    });
    await dev.write(Buffer.alloc(1), 3, REQ.FUA);
    await dev.write(Buffer.alloc(1), 4, 0);
    await dev.zero(5, 1, REQ.FAST_ZERO | REQ.FUA);
    await dev.trim(6, 1, 0);
    await dev.cache(0, 1, 0);
    assert.deepEqual(await dev.extents(0, 0, 0), [{ offset: 0, length: SIZE, flags: 3 }]);
    assert.deepEqual(log, ['write 3', 'flush', 'write 4', 'zero 5', 'flush', 'trim 6', 'cache']);
  });

  test('write without flush or durableWrites is refused at open, saying what to do', async () => {
    const impl = { size: SIZE, read: () => undefined, write: () => undefined };
    await assert.rejects(openPlugin(defineBackend({ name: 'w', open: () => impl })), {
      code: 'EINVAL',
      message: /w: .*no flush\(\).*durableWrites = true/,
    });
  });

  test('capabilitiesOf on plain objects; bad blockSize and size are refused', async () => {
    assert.equal(capabilitiesOf({ size: 1, read: () => undefined, zero: () => undefined, fastZero: true }).fastZero, false);
    await assert.rejects(openPlugin(defineBackend({ name: 'b', open: () => ({ size: SIZE, read: () => undefined, blockSize: { minimum: 3 } }) })), {
      message: /b: blockSize.minimum 3/,
    });
    await assert.rejects(openPlugin(defineBackend({ name: 's', open: () => ({ size: -1, read: () => undefined }) })), { message: /s: size must be/ });
    await assert.rejects(openPlugin(defineBackend({ name: 'r', open: () => ({ size: 1 }) as never })), { message: /r: open\(\) must return a device with a read\(\)/ });
  });

  test('a minimum block size is enforced before the plugin sees a request', async () => {
    const impl = new Minimal(SIZE - 3);
    Object.defineProperty(impl, 'blockSize', { value: { minimum: 512 } });
    const dev = await openPlugin(minimal(impl));
    assert.deepEqual(dev.blockSize, { minimum: 512, preferred: 4096, maximum: 32 * 2 ** 20 });
    await assert.rejects(dev.read(Buffer.alloc(100), 0, 0), { code: 'EINVAL' });
    await dev.read(Buffer.alloc(512), 512, 0);
    assert.deepEqual(impl.calls, ['read 512+512']);
  });

  test('a plugin\'s extents answer is checked and cut at the end of the device', async () => {
    let answer: unknown = [];
    const rec = recorder();
    const dev = await openPlugin(
      defineBackend({ name: 'ext', open: () => ({ size: 100, read: () => undefined, extents: () => answer as never }) }),
      {},
      undefined,
      { logger: rec },
    );
    answer = [{ offset: 0, length: 60, flags: 1 }, { offset: 60, length: 1000, flags: 0xff }];
    assert.deepEqual(await dev.extents(0, 100, 0), [{ offset: 0, length: 60, flags: 1 }, { offset: 60, length: 40, flags: 3 }]);
    answer = [{ offset: 5, length: 10, flags: 0 }];
    await assert.rejects(dev.extents(0, 10, 0), { code: 'EIO', message: /ext: extents: .*contiguous extent at 0/ });
    assert.equal(rec.lines.length, 1);
  });
});

describe('plugin adapter: errors', () => {
  test('a BlockError keeps its code, a system error its errno, anything else is EIO logged once with its stack', async () => {
    const rec = recorder();
    let thrown: unknown;
    const dev = await openPlugin(
      defineBackend({ name: 'thrower', open: () => ({ size: SIZE, read: () => { throw thrown; } }) }),
      {},
      undefined,
      { logger: rec },
    );
    thrown = new BlockError('ENOSPC', 'full');
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), { code: 'ENOSPC', message: 'full' });
    thrown = Object.assign(new Error('gone'), { code: 'ENOENT' });
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), { code: 'ENOENT' });
    assert.equal(rec.lines.length, 0);
    thrown = new TypeError("Cannot read properties of undefined (reading 'x')");
    for (let i = 0; i < 3; i++) await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), { code: 'EIO', message: /^thrower: read: Cannot read/ });
    thrown = 'a string';
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), { code: 'EIO', message: 'thrower: read: a string' });
    assert.equal(rec.lines.length, 2, 'once per kind');
    assert.equal(rec.lines[0]!.fields.plugin, 'thrower');
    assert.equal(rec.lines[0]!.fields.op, 'read');
    assert.match((rec.lines[0]!.fields.err as Error).stack!, /TypeError/);
  });

  test('a synchronous throw in a filter plugin is mapped the same way', async () => {
    const rec = recorder();
    const f = defineFilter({
      name: 'bad-filter',
      open: (next) => Object.assign(Object.create(next) as object, { read: () => { throw new RangeError('oops'); }, capabilities: next.capabilities }) as never,
    });
    const dev = await openPlugin(f, {}, new MemoryDevice({ size: SIZE }), { logger: rec });
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), { code: 'EIO', message: 'bad-filter: read: oops' });
    assert.equal(rec.lines.length, 1);
  });

  test('PluginErrors.call maps a rejected promise too', async () => {
    const errors = new PluginErrors('p', recorder());
    await assert.rejects(errors.call('flush', () => Promise.reject(new Error('x'))), { code: 'EIO', message: 'p: flush: x' });
  });

  test('an exception in open() names the plugin', async () => {
    const p = defineBackend({ name: 'o', open: () => { throw new Error('no disk'); } });
    await assert.rejects(openPlugin(p, {}, undefined, { logger: recorder() }), { code: 'EIO', message: /^o: open: no disk/ });
  });
});

describe('plugin adapter: settings and API version', () => {
  test('settings are validated by the plugin schema, errors naming the plugin and the key', async () => {
    await assert.rejects(openPlugin(ramdisk, {}), { code: 'EINVAL', message: /^ramdisk: size: required setting is missing/ });
    await assert.rejects(openPlugin(ramdisk, { size: 'huge' }), { code: 'EINVAL', message: /^ramdisk: size: / });
    await assert.rejects(openPlugin(ramdisk, { size: '1M', fill: 300 }), { code: 'EINVAL', message: /^ramdisk: fill: / });
    await assert.rejects(openPlugin(ramdisk, { size: '1M', colour: 'red' }), { code: 'EINVAL', message: /^ramdisk: colour: unknown setting \(known: type, size, fill\)/ });
  });

  test('command-line strings are converted to what the schema expects', async () => {
    const dev = await openPlugin(ramdisk, { size: '1M', fill: '7' });
    const buf = Buffer.alloc(4);
    await dev.read(buf, 0, 0);
    assert.deepEqual(buf, Buffer.alloc(4, 7));
    assert.equal(dev.size, 2 ** 20);
  });

  test('a filter plugin wraps the device below, with its settings', async () => {
    const mem = new MemoryDevice({ size: SIZE });
    await mem.write(Buffer.from([1, 2, 3]), 0, 0);
    const dev = await openPlugin(xor, { xor: '255' }, mem);
    const buf = Buffer.alloc(3);
    await dev.read(buf, 0, 0);
    assert.deepEqual([...buf], [254, 253, 252]);
    await assert.rejects(openPlugin(xor, {}, mem), { message: /^xor: xor: required setting is missing/ });
  });

  test('a module of another API version, without apiVersion or without a default export is refused clearly', () => {
    assert.equal(PLUGIN_API_VERSION, 1);
    assert.equal(ramdisk.apiVersion, PLUGIN_API_VERSION);
    assert.throws(() => pluginOf({ default: { ...ramdisk, apiVersion: 2 } }, './future.js'), {
      code: 'EINVAL',
      message: './future.js: plugin API version 2 is not supported: this blockgate implements plugin API version 1; upgrade blockgate',
    });
    assert.throws(() => pluginOf({ default: { ...ramdisk, apiVersion: 0 } }, 'old.js'), { message: /version 0 is not supported.*update the plugin/ });
    assert.throws(() => pluginOf({ default: { name: 'x', open() {} } }, 'x.js'), { message: /x.js: not a blockgate plugin: the default export has no apiVersion/ });
    assert.throws(() => pluginOf({ something: 1 }, 'y.js'), { message: /y.js: not a blockgate plugin: no default export/ });
    assert.throws(() => pluginOf({ default: { apiVersion: 1, kind: 'backend', name: 'z' } }, 'z.js'), { message: /z.js: plugin z has no open\(\)/ });
  });

  test('sizeSetting and v come from blockgate/plugin', () => {
    assert.equal(v.parse(v.object({ s: sizeSetting }), { s: '1K' }).s, 1024);
  });
});
