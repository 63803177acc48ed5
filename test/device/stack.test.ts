import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BlockError } from '../../src/errors/index.js';
import { FilterDevice } from '../../src/device/filter.js';
import {
  buildStack,
  newStackContext,
  type BackendFactory,
  type FilterFactory,
  type StackContext,
  type StackRegistry,
} from '../../src/device/stack.js';
import type { BlockDevice } from '../../src/device/types.js';
import { BACKENDS, FileDevice, MemoryDevice } from '../../src/backends/index.js';
import { FILTERS, ReadonlyFilter } from '../../src/filters/index.js';
import { createStack, defaultRegistry } from '../../src/export/index.js';

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-stack-test-'));
after(() => fs.rmSync(root, { recursive: true, force: true }));

/** A filter that only names itself in the description, to see the stacking order. */
class TagFilter extends FilterDevice {
  readonly #tag: string;
  constructor(next: BlockDevice, tag: string) {
    super(next);
    this.#tag = tag;
  }
  override get description(): string {
    return `${this.#tag}(${this.next.description})`;
  }
}

/** The default registry, plus a `tag` filter, and recording every backend it builds. */
function recordingRegistry(built: BlockDevice[]): StackRegistry {
  const backends = new Map<string, BackendFactory>(
    [...BACKENDS].map(([name, make]) => [
      name,
      async (desc, ctx) => {
        const dev = await make(desc, ctx);
        built.push(dev);
        return dev;
      },
    ]),
  );
  const tag: FilterFactory = (next, desc) => new TagFilter(next, String(desc.name));
  const boom: FilterFactory = () => {
    throw new BlockError('EIO', 'boom');
  };
  return { backends, filters: new Map([...FILTERS, ['tag', tag], ['boom', boom]]) };
}

describe('buildStack with the real registry', () => {
  test('the default registry knows the built-in backends and filters', () => {
    assert.deepEqual([...defaultRegistry.backends.keys()].sort(), ['file', 'memory', 'null', 'pattern', 'rbd', 's3']);
    // Every filter of src/filters/index.ts, in its order, the first four as they have always been.
    assert.deepEqual([...defaultRegistry.filters.keys()], [...FILTERS.keys()]);
    assert.deepEqual([...FILTERS.keys()].slice(0, 4), ['readonly', 'writeback', 'error', 'cow']);
  });

  test('a backend alone', async () => {
    const dev = await createStack({ backend: { type: 'memory', size: '1M' } });
    assert.ok(dev instanceof MemoryDevice);
    assert.equal(dev.size, 2 ** 20);
    await dev.close();
  });

  test('memory under readonly: reads work, writes fail EPERM', async () => {
    const dev = await createStack({ backend: { type: 'memory', size: '1M' }, filters: [{ type: 'readonly' }] });
    assert.ok(dev instanceof ReadonlyFilter);
    assert.equal(dev.capabilities.write, false);
    const buf = Buffer.alloc(16, 1);
    await dev.read(buf, 0, 0);
    assert.deepEqual(buf, Buffer.alloc(16));
    await assert.rejects(dev.write(Buffer.alloc(16), 0, 0), { code: 'EPERM' });
    await dev.close();
  });

  test('a file backend from plain data', async () => {
    const file = path.join(root, 'a.img');
    const dev = await createStack({ backend: { type: 'file', path: file, create: true, size: '64K' } });
    assert.ok(dev instanceof FileDevice);
    await dev.write(Buffer.from('hello'), 10, 0);
    await dev.close();
    assert.equal(fs.readFileSync(file).subarray(10, 15).toString(), 'hello');
  });

  test('filters are listed top first and built bottom up', async () => {
    const registry = recordingRegistry([]);
    const dev = await buildStack(
      { backend: { type: 'null', size: 4096 }, filters: [{ type: 'tag', name: 'top' }, { type: 'tag', name: 'bottom' }] },
      registry,
    );
    assert.equal(dev.description, 'top(bottom(null 4KiB))');
  });

  test('an unknown backend is EINVAL listing the known names', async () => {
    await assert.rejects(createStack({ backend: { type: 'nope' } }), (e) => {
      return e instanceof BlockError && e.code === 'EINVAL' && /unknown backend 'nope' \(known: memory, file, null, pattern, rbd, s3\)/.test(e.message);
    });
  });

  test('backend settings errors come through unchanged', async () => {
    await assert.rejects(createStack({ backend: { type: 'memory', size: 'x' } }), { code: 'EINVAL', message: /^memory: size:/ });
  });

  test('an unknown filter is EINVAL listing the known names, and the backend is closed', async () => {
    const built: BlockDevice[] = [];
    await assert.rejects(
      buildStack({ backend: { type: 'memory', size: '1M' }, filters: [{ type: 'nope' }] }, recordingRegistry(built)),
      (e) => e instanceof BlockError && e.code === 'EINVAL' && e.message.includes(`unknown filter 'nope' (known: ${[...FILTERS.keys(), 'tag', 'boom'].join(', ')})`),
    );
    assert.equal(built.length, 1);
    await assert.rejects(built[0]!.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
  });

  test('a failing filter closes the backend and the error is passed on', async () => {
    const built: BlockDevice[] = [];
    await assert.rejects(
      buildStack({ backend: { type: 'memory', size: '1M' }, filters: [{ type: 'boom' }, { type: 'readonly' }] }, recordingRegistry(built)),
      { code: 'EIO', message: 'boom' },
    );
    assert.equal(built.length, 1);
    await assert.rejects(built[0]!.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
  });

  test('a filter with bad settings closes the backend too', async () => {
    const built: BlockDevice[] = [];
    await assert.rejects(
      buildStack({ backend: { type: 'pattern', size: '1M' }, filters: [{ type: 'readonly', extra: true }] }, recordingRegistry(built)),
      { code: 'EINVAL', message: /^readonly: extra: unknown setting/ },
    );
    await assert.rejects(built[0]!.read(Buffer.alloc(1), 0, 0), { code: 'EBADF' });
  });
});

describe('stack context', () => {
  test('every layer of a stack gets the same context, so they share the export errseq', async () => {
    const seen: StackContext[] = [];
    const registry: StackRegistry = {
      backends: new Map<string, BackendFactory>([
        [
          'memory',
          (desc, ctx) => {
            seen.push(ctx);
            return BACKENDS.get('memory')!(desc, ctx);
          },
        ],
      ]),
      filters: new Map<string, FilterFactory>([
        [
          'tag',
          (next, _desc, ctx) => {
            seen.push(ctx);
            return new FilterDevice(next);
          },
        ],
      ]),
    };
    const ctx = newStackContext();
    const dev = await buildStack({ backend: { type: 'memory', size: '1M' }, filters: [{ type: 'tag' }, { type: 'tag' }] }, registry, ctx);
    assert.equal(seen.length, 3);
    assert.ok(seen.every((c) => c === seen[0] && c.errseq === ctx.errseq));
    await dev.close();
  });

  test('the context says readOnly when a readonly filter is in the stack or the caller says so, and only then', async () => {
    const seen: (boolean | undefined)[] = [];
    const registry: StackRegistry = {
      backends: new Map<string, BackendFactory>([
        [
          'memory',
          (desc, ctx) => {
            seen.push(ctx.readOnly);
            return BACKENDS.get('memory')!(desc, ctx);
          },
        ],
      ]),
      filters: FILTERS,
    };
    const backend = { type: 'memory', size: '1M' };
    await (await buildStack({ backend, filters: [{ type: 'writeback' }] }, registry)).close();
    await (await buildStack({ backend, filters: [{ type: 'writeback' }, { type: 'readonly' }] }, registry)).close();
    await (await buildStack({ backend }, registry, { ...newStackContext(), readOnly: true })).close();
    assert.deepEqual(seen, [undefined, true, true]);
  });
});
