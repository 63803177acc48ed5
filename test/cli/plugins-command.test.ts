/**
 * `blockgate plugins`: the listing is generated from the layers' schemas, so every
 * registered backend and filter must have its schema registered beside it
 * (src/backends/index.ts BACKEND_SETTINGS, src/filters/settings-registry.ts), and what it
 * says is what the schema says.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Command } from 'commander';
import { builtinLayers, formatLayers, pluginLayer, pluginsCommand } from '../../src/cli/plugins.js';
import { serveRegistry } from '../../src/cli/registry.js';
import { describeSettings } from '../../src/device/index.js';
import { sizeSetting, v } from '../../src/plugin/index.js';

const FIXTURES = path.resolve(import.meta.dirname, '../plugin/fixtures');

test('every backend and filter of serve is listed with its settings described', () => {
  const list = builtinLayers();
  assert.deepEqual(list.filter((l) => l.kind === 'backend').map((l) => l.name), [...serveRegistry.backends.keys()]);
  assert.deepEqual(list.filter((l) => l.kind === 'filter').map((l) => l.name), [...serveRegistry.filters.keys()]);
  assert.deepEqual(list.filter((l) => !l.settings).map((l) => `${l.kind} ${l.name}`), [], 'a layer without a registered schema');
  const nul = list.find((l) => l.name === 'null')!;
  assert.deepEqual(nul.settings, [
    { key: 'size', type: 'size', required: false, default: 0 },
    { key: 'readonly', type: 'boolean', required: false },
  ]);
  const file = list.find((l) => l.name === 'file')!;
  assert.deepEqual(file.settings!.find((s) => s.key === 'io'), { key: 'io', type: '"auto" | "inline" | "thread-pool"', required: false });
  assert.match(formatLayers(list), /^Backends:\n {2}memory\n {4}size: size, required\n/);
  assert.match(formatLayers(list), /\n {2}readonly\n {4}\(no settings\)\n/);
});

test('types, defaults and docs come from the schema', () => {
  const s = describeSettings({
    size: sizeSetting,
    fill: v.optional(v.pipe(v.number(), v.description('the byte every read returns')), 0),
    mode: v.picklist(['a', 'b']),
    names: v.optional(v.array(v.string())),
  }, []);
  assert.deepEqual(s, [
    { key: 'size', type: 'size', required: true },
    { key: 'fill', type: 'number', required: false, default: 0, doc: 'the byte every read returns' },
    { key: 'mode', type: '"a" | "b"', required: true },
    { key: 'names', type: 'list of string', required: false },
  ]);
});

test('a plugin module given by path is listed with its own settings', async () => {
  const l = await pluginLayer(path.join(FIXTURES, 'ramdisk.ts'));
  assert.equal(l.kind, 'backend');
  assert.equal(l.name, 'ramdisk');
  assert.deepEqual(l.settings!.map((s) => s.key), ['size', 'fill']);
  await assert.rejects(pluginLayer(path.join(FIXTURES, 'future.js')), { message: /plugin API version 2 is not supported/ });
});

test('the command prints JSON with --json', async () => {
  const out: string[] = [];
  const write = process.stdout.write.bind(process.stdout);
  process.stdout.write = ((chunk: string) => (out.push(chunk), true)) as typeof process.stdout.write;
  try {
    await new Command().addCommand(pluginsCommand()).parseAsync(['plugins', '--json'], { from: 'user' });
  } finally {
    process.stdout.write = write;
  }
  const parsed = JSON.parse(out.join('')) as { pluginApiVersion: number; layers: { name: string }[] };
  assert.equal(parsed.pluginApiVersion, 1);
  assert.ok(parsed.layers.some((l) => l.name === 'writeback'));
});
