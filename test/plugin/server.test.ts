/**
 * A plugin's errors never crash a real server: a plugin whose read throws a TypeError
 * gives the client EIO (logged once with its stack) and the server goes on serving the
 * same connection and new ones; a BlockError reaches the client with its errno. The
 * plugin is loaded by path, as `blockgate serve ./buggy.ts` does.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { NbdServer } from '../../src/nbd/index.js';
import { NbdClient } from '../../src/nbd/client.js';
import { buildExports, nbdUri } from '../../src/cli/serve.js';
import { serveRegistry } from '../../src/cli/registry.js';
import { pluginLayers } from '../../src/cli/plugin-loader.js';
import { extendRegistry } from '../../src/export/registry.js';

const FIXTURES = path.join(import.meta.dirname, 'fixtures');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-plugin-server-'));
const socket = path.join(dir, 'nbd.sock');
const lines: Record<string, unknown>[] = [];
const sink = new Writable({
  write(chunk: Buffer, _enc, done) {
    for (const l of chunk.toString().split('\n')) if (l.trim() !== '') lines.push(JSON.parse(l) as Record<string, unknown>);
    done();
  },
});
const log = pino({ level: 'info' }, sink);
let server: NbdServer;
let exports: Awaited<ReturnType<typeof buildExports>>;

before(async () => {
  const registry = extendRegistry(serveRegistry, pluginLayers(log));
  exports = await buildExports(
    {
      exports: [
        { name: 'buggy', backend: { type: 'plugin', path: path.join(FIXTURES, 'buggy.ts') } },
        { name: 'ram', backend: { type: 'plugin', path: path.join(FIXTURES, 'ramdisk.ts'), size: '1M', fill: '9' } },
      ],
    },
    'test',
    registry,
  );
  server = new NbdServer({ exports, logger: log });
  await server.listen({ path: socket });
});
after(async () => {
  await server.close(2000);
  await Promise.all(exports.map((e) => e.device.close().catch(() => undefined)));
  fs.rmSync(dir, { recursive: true, force: true });
});

test('a TypeError in a plugin is EIO for the client, logged once with its stack; the server keeps serving', async () => {
  const c = await NbdClient.connect(nbdUri({ path: socket }, 'buggy'));
  try {
    for (let i = 0; i < 3; i++) {
      await assert.rejects(c.pread(Buffer.alloc(512), 0), (e: NodeJS.ErrnoException) => e.code === 'EIO');
    }
    await assert.rejects(c.pread(Buffer.alloc(512), 4096), (e: NodeJS.ErrnoException) => e.code === 'ENOSPC');
    const buf = Buffer.alloc(512);
    await c.pread(buf, 8192);
    assert.deepEqual(buf, Buffer.alloc(512, 0x42), 'the same connection still works');
  } finally {
    await c.close();
  }
  const again = await NbdClient.connect(nbdUri({ path: socket }, 'ram'));
  try {
    const buf = Buffer.alloc(4);
    await again.pread(buf, 100);
    assert.deepEqual(buf, Buffer.alloc(4, 9), 'a new connection to another plugin export works');
  } finally {
    await again.close();
  }
  const bugs = lines.filter((l) => l.plugin === 'buggy');
  assert.equal(bugs.length, 1, `one log line for three identical failures: ${JSON.stringify(lines)}`);
  assert.equal(bugs[0]!.level, 50);
  assert.match(String((bugs[0]!.err as { stack?: string }).stack), /TypeError[\s\S]*buggy\.ts/);
});

test('a plugin of another API version is refused when the export is built, with the path and the versions', async () => {
  await assert.rejects(
    buildExports({ exports: [{ name: 'f', backend: { type: 'plugin', path: path.join(FIXTURES, 'future.js') } }] }, 'cfg.json'),
    { code: 'EINVAL', message: /^cfg\.json: exports\[0\]\.backend: .*future\.js: plugin API version 2 is not supported: this blockgate implements plugin API version 1; upgrade blockgate$/ },
  );
  await assert.rejects(
    buildExports({ exports: [{ name: 'f', backend: { type: 'plugin', path: path.join(FIXTURES, 'upper.ts') } }] }, 'cfg.json'),
    { message: /upper\.ts: is a filter plugin, not a backend/ },
  );
  await assert.rejects(
    buildExports({ exports: [{ name: 'f', backend: { type: 'plugin', path: path.join(dir, 'missing.js') } }] }, 'cfg.json'),
    { message: /missing\.js: cannot load: / },
  );
  await assert.rejects(buildExports({ exports: [{ name: 'f', backend: { type: 'plugin' } }] }, 'cfg.json'), {
    message: /exports\[0\]\.backend: plugin: path: required setting is missing/,
  });
});
