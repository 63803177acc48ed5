/**
 * `blockgate serve --filter NAME[:key=value,...]`: parsing (built-in filters with values
 * converted by their schemas, plugin paths), the order (the first --filter nearest the
 * client, as nbdkit), pinned by what a client sees, `--dump-config`, and the plugin
 * export forms (`./mydisk.js key=value ...`, `plugin:PATH`).
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { InvalidArgumentError } from 'commander';
import { run } from '../helpers/run.js';
import { parseFilterOption, parseSettingPairs } from '../../src/cli/filter-option.js';
import { parseExportSpecs } from '../../src/cli/config.js';
import { configFromFlags } from '../../src/cli/serve.js';
import { NbdClient } from '../../src/nbd/client.js';

const MAIN = path.resolve(import.meta.dirname, '../../src/cli/main.ts');
const CLI = ['--import', 'tsx', MAIN];
const FIXTURES = path.resolve(import.meta.dirname, '../plugin/fixtures');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-filter-option-'));
const children = new Set<ChildProcess>();
after(() => {
  for (const c of children) c.kill('SIGKILL');
  fs.rmSync(tmp, { recursive: true, force: true });
});

const blockgate = (args: string[]) => run(process.execPath, [...CLI, ...args], { timeoutMs: 30_000 });

/** `blockgate serve` on a private unix socket; resolves with the printed URI. */
function serve(args: string[]): Promise<{ child: ChildProcess; uri: string }> {
  const sock = path.join(tmp, `s${children.size}-${Date.now()}.sock`);
  const child = spawn(process.execPath, [...CLI, 'serve', '--print-uri', '--no-control', '-l', 'warn', '-U', sock, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  child.on('exit', () => children.delete(child));
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no URI printed; stderr: ${err}`)), 30_000);
    child.stdout!.once('data', (b: Buffer) => {
      clearTimeout(t);
      resolve({ child, uri: b.toString().trim() });
    });
    child.on('exit', (code) => {
      clearTimeout(t);
      reject(new Error(`serve exited ${code}: ${err}`));
    });
  });
}

function stop(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) return resolve();
    const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
    child.once('exit', () => {
      clearTimeout(t);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

describe('--filter parsing', () => {
  test('a built-in filter with settings converted by its schema', () => {
    assert.deepEqual(parseFilterOption('readonly'), { type: 'readonly' });
    assert.deepEqual(parseFilterOption('error:ops=read+write,rate=0.5,count=3,error=ENOSPC,file=/tmp/a=b:c'), {
      type: 'error',
      ops: ['read', 'write'],
      rate: 0.5,
      count: 3,
      error: 'ENOSPC',
      file: '/tmp/a=b:c',
    });
    assert.deepEqual(parseFilterOption('writeback:maxDirty=64M'), { type: 'writeback', maxDirty: '64M' });
    assert.deepEqual(parseFilterOption('delay:delay-fast-zero=false,rdelay=10ms'), { type: 'delay', 'delay-fast-zero': false, rdelay: '10ms' });
  });

  test('a plugin path becomes { type: plugin, path } with the path made absolute and values kept as strings', () => {
    assert.deepEqual(parseFilterOption('./f.js'), { type: 'plugin', path: path.resolve('f.js') });
    assert.deepEqual(parseFilterOption('../x/f.mjs:xor=3,name=a:b'), { type: 'plugin', path: path.resolve('../x/f.mjs'), xor: '3', name: 'a:b' });
    assert.deepEqual(parseFilterOption('/abs/f.ts'), { type: 'plugin', path: '/abs/f.ts' });
  });

  test('bad values are one-line argument errors', () => {
    assert.throws(() => parseFilterOption('nosuch'), (e) => e instanceof InvalidArgumentError && /unknown filter 'nosuch' \(known: readonly, .*; or a plugin module/.test(e.message));
    assert.throws(() => parseFilterOption('error:ops'), { message: /expected key=value, got 'ops'/ });
    assert.throws(() => parseFilterOption('error:rate=1,rate=0'), { message: /'rate' given twice/ });
    assert.throws(() => parseFilterOption('error:type=x'), { message: /'type' is not a setting/ });
    assert.throws(() => parseFilterOption(':x'), { message: /expected NAME\[:key=value,...\]/ });
    assert.deepEqual(parseSettingPairs('', 'x'), {});
  });

  test('the filters of the command line are every export\'s, in the order given (top first)', () => {
    const cfg = configFromFlags(['a=memory:1M', 'b=null:1M'], {
      port: 0,
      logLevel: 'info',
      filter: [parseFilterOption('readonly'), parseFilterOption('error:ops=read'), parseFilterOption('stats')],
    });
    for (const e of cfg.exports) assert.deepEqual(e.filters?.map((f) => f.type), ['readonly', 'error', 'stats']);
  });
});

describe('plugin export forms', () => {
  test('./mydisk.js key=value ... and plugin:PATH; key=value after a plugin are its settings until an export form', () => {
    const got = parseExportSpecs(['./d.js', 'size=1G', 'fill=7', 'disk=memory:1M', 'p=plugin:/x/y.mjs', 'a=b=c', 'memory:2M']);
    assert.deepEqual(got, [
      { name: '', backend: { type: 'plugin', path: path.resolve('d.js'), size: '1G', fill: '7' }, readOnly: false },
      { name: 'disk', backend: { type: 'memory', size: '1M' }, readOnly: false },
      { name: 'p', backend: { type: 'plugin', path: '/x/y.mjs', a: 'b=c' }, readOnly: false },
      { name: '', backend: { type: 'memory', size: '2M' }, readOnly: false },
    ]);
    assert.throws(() => parseExportSpecs(['plugin:']), { message: /plugin: needs the path/ });
    assert.throws(() => parseExportSpecs(['./d.js', 'path=/etc']), { message: /'path' is not a plugin setting/ });
  });
});

describe('blockgate serve --filter and --dump-config', () => {
  test('--dump-config prints the effective stack (filters in the order given) as config JSON that --config accepts', async () => {
    const r = await blockgate(['serve', '--dump-config', '-U', path.join(tmp, 'x.sock'), 'pattern:1M', '--filter', 'cow', '--filter', 'error:ops=write,count=1', '--filter', `${FIXTURES}/upper.ts:xor=1`]);
    assert.equal(r.code, 0, r.stderr);
    const cfg = JSON.parse(r.stdout) as { listen: unknown[]; exports: { backend: unknown; filters: { type: string }[] }[] };
    assert.deepEqual(cfg.listen, [{ path: path.join(tmp, 'x.sock') }]);
    assert.deepEqual(cfg.exports[0]!.backend, { type: 'pattern', size: '1M' });
    assert.deepEqual(cfg.exports[0]!.filters, [
      { type: 'cow' },
      { type: 'error', ops: ['write'], count: 1 },
      { type: 'plugin', path: `${FIXTURES}/upper.ts`, xor: '1' },
    ]);
    const file = path.join(tmp, 'dumped.json');
    fs.writeFileSync(file, r.stdout);
    const again = await blockgate(['serve', '--dump-config', '--config', file]);
    assert.equal(again.code, 0, again.stderr);
    // A round trip: no level was given, so none is added.
    assert.deepEqual(JSON.parse(again.stdout), cfg);
    const conflict = await blockgate(['serve', '--config', file, '--filter', 'readonly']);
    assert.notEqual(conflict.code, 0);
    assert.match(conflict.stderr, /--config <file>' cannot be used with option '--filter/);
  });

  test('the first --filter is nearest the client: readonly over cow is read-only, cow over readonly is writable', async () => {
    const data = Buffer.alloc(4096, 0xab);
    {
      const { child, uri } = await serve(['pattern:1M', '--filter', 'readonly', '--filter', 'cow']);
      const c = await NbdClient.connect(uri);
      try {
        await assert.rejects(c.pwrite(data, 0), (e: NodeJS.ErrnoException) => e.code === 'EPERM');
      } finally {
        await c.close();
        await stop(child);
      }
    }
    {
      const { child, uri } = await serve(['pattern:1M', '--filter', 'cow', '--filter', 'readonly']);
      const c = await NbdClient.connect(uri);
      try {
        await c.pwrite(data, 0);
        const back = Buffer.alloc(4096);
        await c.pread(back, 0);
        assert.deepEqual(back, data);
      } finally {
        await c.close();
        await stop(child);
      }
    }
  });

  test('a plugin backend with a plugin filter and a built-in filter, served: the client sees both', async () => {
    const { child, uri } = await serve([`${FIXTURES}/ramdisk.ts`, 'size=1M', 'fill=16', '--filter', `${FIXTURES}/upper.ts:xor=1`, '--filter', 'error:ops=write']);
    const c = await NbdClient.connect(uri);
    try {
      assert.equal(c.size, 2 ** 20);
      const buf = Buffer.alloc(8);
      await c.pread(buf, 0);
      assert.deepEqual(buf, Buffer.alloc(8, 17));
      await assert.rejects(c.pwrite(buf, 0), (e: NodeJS.ErrnoException) => e.code === 'EIO');
    } finally {
      await c.close();
      await stop(child);
    }
  });

  test('a bad --filter or plugin setting fails at startup naming it', async () => {
    const r = await blockgate(['serve', '--dump-config', 'memory:1M', '--filter', 'nosuch']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /option '--filter <name\[:key=value,...\]>' argument 'nosuch' is invalid\. unknown filter 'nosuch'/);
    const s = await blockgate(['serve', '--no-control', '-U', path.join(tmp, 'y.sock'), `${FIXTURES}/ramdisk.ts`, 'size=1M', 'fill=x']);
    assert.equal(s.code, 1);
    assert.match(s.stderr, /command line: exports\[0\]\.backend: ramdisk: fill: /);
  });
});
