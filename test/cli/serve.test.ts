/**
 * `blockgate serve` as a user runs it: a child process started from the sources, real
 * clients against it, the process stopped by PID.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run, runOk } from '../helpers/run.js';
import { configFromFlags } from '../../src/cli/serve.js';
import { parseConfig, parseExportSpec } from '../../src/cli/config.js';

const MAIN = path.resolve(import.meta.dirname, '../../src/cli/main.ts');
const CLI = [process.execPath, '--import', 'tsx', MAIN];
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-cli-'));
const children = new Set<ChildProcess>();
after(() => {
  for (const c of children) c.kill('SIGKILL');
  fs.rmSync(tmp, { recursive: true, force: true });
});

function blockgate(args: string[], timeoutMs = 60_000) {
  return run(CLI[0]!, [...CLI.slice(1), ...args], { timeoutMs });
}

/** Starts a server in the background and resolves with its printed URI. */
function startServe(args: string[]): Promise<{ child: ChildProcess; uri: string; stderr: () => string }> {
  const child = spawn(CLI[0]!, [...CLI.slice(1), 'serve', '--print-uri', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  child.on('exit', () => children.delete(child));
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no URI printed; stderr: ${err}`)), 30_000);
    child.stdout!.once('data', (b: Buffer) => {
      clearTimeout(t);
      resolve({ child, uri: b.toString().trim(), stderr: () => err });
    });
    child.on('exit', (code) => reject(new Error(`serve exited ${code}: ${err}`)));
  });
}

function exited(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) resolve(child.exitCode);
    else child.on('exit', (code) => resolve(code));
  });
}

describe('blockgate CLI', () => {
  test('--help prints usage with the serve command', async () => {
    const r = await blockgate(['--help']);
    assert.equal(r.code, 0);
    assert.match(r.stdout, /Usage: blockgate/);
    assert.match(r.stdout, /serve/);
    const s = await blockgate(['serve', '--help']);
    assert.match(s.stdout, /--run <command>/);
    assert.match(s.stdout, /--config <file>/);
  });

  test('serve with no export serves a 1 GiB memory disk (captive --run, exit status passed through)', async () => {
    const r = await blockgate(['serve', '--run', 'nbdinfo --json "$uri"; exit 3']);
    assert.equal(r.code, 3, r.stderr);
    const info = JSON.parse(r.stdout) as { exports: { 'export-size': number; 'can_trim': boolean; contexts: string[] }[]; protocol: string };
    assert.equal(info.exports[0]!['export-size'], 2 ** 30);
    assert.ok(info.exports[0]!.contexts.includes('base:allocation'));
    assert.equal(info.exports[0]!.can_trim, true);
  });

  test('short forms name exports and pick backends; -r serves read-only', async () => {
    const file = path.join(tmp, 'disk.img');
    fs.writeFileSync(file, Buffer.alloc(1 << 20, 7));
    const r = await blockgate(['serve', '-r', file, 'mem=memory:4M', '--run', 'nbdinfo --list --json "$uri"']);
    assert.equal(r.code, 0, r.stderr);
    const info = JSON.parse(r.stdout) as { exports: { 'export-name': string; 'export-size': number; 'is_read_only': boolean }[] };
    const byName = new Map(info.exports.map((e) => [e['export-name'], e]));
    assert.equal(byName.get('')?.['export-size'], 1 << 20);
    assert.equal(byName.get('mem')?.['export-size'], 4 << 20);
    assert.equal(byName.get('')?.is_read_only, true);
  });

  test('serve -r opens a file backend read-only: a chmod 0444 file is served with its fd O_RDONLY', async () => {
    const file = path.join(tmp, 'ro.img');
    fs.writeFileSync(file, Buffer.alloc(1 << 20, 3));
    fs.chmodSync(file, 0o444);
    const { child, uri } = await startServe(['-p', '0', '--no-control', '-r', file]);
    try {
      const r = await runOk('nbdsh', ['-u', uri, '-c', 'print(h.is_read_only(), h.pread(4, 0) == bytes([3] * 4))']);
      assert.equal(r.stdout.trim(), 'True True');
      // Root may open a 0444 file for writing, so look at how the server opened it.
      const fdDir = `/proc/${child.pid}/fd`;
      const fd = fs.readdirSync(fdDir).find((n) => {
        try {
          return fs.readlinkSync(path.join(fdDir, n)) === file;
        } catch {
          return false;
        }
      });
      assert.ok(fd, 'the server holds the file open');
      const flags = /^flags:\s+(\d+)$/m.exec(fs.readFileSync(`/proc/${child.pid}/fdinfo/${fd}`, 'utf8'))?.[1];
      assert.ok(flags, 'fdinfo has the open flags');
      // The access mode is the low two bits (Linux O_ACCMODE; Node's fs.constants lacks it).
      assert.equal(parseInt(flags, 8) & 0o3, fs.constants.O_RDONLY, `fdinfo flags ${flags}`);
    } finally {
      child.kill('SIGTERM');
      await exited(child);
    }
  });

  test('TCP on an OS-chosen port with --print-uri; SIGTERM shuts down cleanly', async () => {
    const { child, uri } = await startServe(['-p', '0', 'memory:8M']);
    assert.match(uri, /^nbd:\/\/127\.0\.0\.1:\d+\/$/);
    const r = await runOk('nbdsh', ['-u', uri, '-c', 'print(h.get_size())']);
    assert.equal(r.stdout.trim(), String(8 << 20));
    child.kill('SIGTERM');
    assert.equal(await exited(child), 0);
  });

  test('SIGHUP shuts serve down gracefully like SIGTERM: exit 0, not death by the signal (129)', async () => {
    const file = path.join(tmp, 'hup.img');
    fs.writeFileSync(file, Buffer.alloc(1 << 20));
    const cfg = path.join(tmp, 'hup.json');
    fs.writeFileSync(
      cfg,
      JSON.stringify({
        listen: [{ host: '127.0.0.1', port: 0 }],
        exports: [{ name: '', backend: { type: 'file', path: file }, filters: [{ type: 'writeback', maxDirty: '8M' }] }],
      }),
    );
    const { child } = await startServe(['--config', cfg, '--no-control']);
    // Reaching this point means the server listens; it may not exit until signalled.
    const code = exited(child);
    child.kill('SIGHUP');
    assert.equal(await code, 0, 'SIGHUP is not fatal (it used to exit 129 by signal)');
    assert.equal(child.signalCode, null);
  });

  test('SIGHUP writes back what a client wrote but never flushed before serve exits', async () => {
    const file = path.join(tmp, 'hup2.img');
    fs.writeFileSync(file, Buffer.alloc(1 << 20));
    const cfg = path.join(tmp, 'hup2.json');
    fs.writeFileSync(
      cfg,
      JSON.stringify({
        listen: [{ host: '127.0.0.1', port: 0 }],
        exports: [{ name: '', backend: { type: 'file', path: file }, filters: [{ type: 'writeback', maxDirty: '8M' }] }],
      }),
    );
    const { child, uri } = await startServe(['--config', cfg, '--no-control']);
    await runOk('nbdsh', ['-u', uri, '-c', "h.pwrite(b'hup!' * 1024, 4096)"]);
    const code = exited(child);
    child.kill('SIGHUP');
    assert.equal(await code, 0);
    assert.equal(fs.readFileSync(file).subarray(4096, 8192).toString(), 'hup!'.repeat(1024));
  });

  test('IPv6 loopback listener', async () => {
    const { child, uri } = await startServe(['-a', '::1', '-p', '0', 'memory:1M']);
    assert.match(uri, /^nbd:\/\/\[::1\]:\d+\/$/);
    const r = await runOk('nbdinfo', ['--size', uri]);
    assert.equal(r.stdout.trim(), String(1 << 20));
    child.kill('SIGINT');
    assert.equal(await exited(child), 0);
  });

  test('a config file serves several exports with filters and a default export', async () => {
    const cfg = path.join(tmp, 'serve.json');
    fs.writeFileSync(
      cfg,
      JSON.stringify({
        defaultExport: 'b',
        exports: [
          { name: 'a', backend: { type: 'memory', size: '2M' } },
          { name: 'b', description: 'the pattern', backend: { type: 'pattern', size: '3M' }, filters: [{ type: 'readonly' }] },
        ],
      }),
    );
    const r = await blockgate(['serve', '--config', cfg, '--run', 'nbdinfo --json "$uri"']);
    assert.equal(r.code, 0, r.stderr);
    const info = JSON.parse(r.stdout) as { exports: { 'export-name': string; 'export-size': number; description: string }[] };
    assert.equal(info.exports[0]!['export-size'], 3 << 20);
    assert.equal(info.exports[0]!.description, 'the pattern');
  });

  test('--config refuses -p, -a, -U, -r, -D and -e with a one-line error instead of ignoring them', async () => {
    const cfg = path.join(tmp, 'conflict.json');
    fs.writeFileSync(cfg, JSON.stringify({ exports: [{ name: 'a', backend: { type: 'memory', size: '1M' } }] }));
    const flags = [['-p', '10999'], ['-a', '::1'], ['-U', path.join(tmp, 'x.sock')], ['-r'], ['-D', 'text'], ['-e', 'a']];
    const results = await Promise.all(flags.map((f) => blockgate(['serve', '--config', cfg, ...f, '--run', 'true'])));
    results.forEach((r, i) => {
      assert.equal(r.code, 1, `${flags[i]![0]}: ${r.stderr}`);
      assert.match(r.stderr, /^error: option '-c, --config <file>' cannot be used with option '.*'\n$/, flags[i]![0]);
      assert.ok(r.stderr.includes(`'${flags[i]![0]}, `), `the message names ${flags[i]![0]}: ${r.stderr}`);
    });
  });

  test('bad config keys are named in the error', async () => {
    const cfg = path.join(tmp, 'bad.json');
    fs.writeFileSync(cfg, JSON.stringify({ exports: [{ name: 'a', backend: { type: 'memory', size: '1M' }, readonly: true }] }));
    const r = await blockgate(['serve', '--config', cfg]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /exports\[0\]\.readonly/);
    const r2 = await blockgate(['serve', 'memory:lots']);
    assert.equal(r2.code, 1);
    assert.match(r2.stderr, /memory: size/);
  });
});

describe('config parsing', () => {
  test('parseExportSpec: paths, TYPE:ARG and NAME=', () => {
    assert.deepEqual(parseExportSpec('disk.img'), { name: '', backend: { type: 'file', path: 'disk.img' }, readOnly: false });
    assert.deepEqual(parseExportSpec('d=memory:4G'), { name: 'd', backend: { type: 'memory', size: '4G' }, readOnly: false });
    assert.deepEqual(parseExportSpec('x=file:/a=b'), { name: 'x', backend: { type: 'file', path: '/a=b' }, readOnly: false });
    assert.throws(() => parseExportSpec('x='), /nothing to serve/);
  });

  test('parseExportSpec: rbd:POOL/IMAGE, named and read-only; a malformed one says the form', () => {
    assert.deepEqual(parseExportSpec('rbd:rbd/disk1'), { name: '', backend: { type: 'rbd', pool: 'rbd', image: 'disk1' }, readOnly: false });
    assert.deepEqual(parseExportSpec('d=rbd:p/i', true), { name: 'd', backend: { type: 'rbd', pool: 'p', image: 'i', readonly: true }, readOnly: true });
    assert.throws(() => parseExportSpec('rbd:disk1'), /export 'rbd:disk1': rbd: expected POOL\/IMAGE, e\.g\. rbd:rbd\/disk1/);
    assert.throws(() => parseExportSpec('rbd:a/b/c'), /expected POOL\/IMAGE/);
    assert.throws(() => parseExportSpec('rbd:a/b@snap'), /expected POOL\/IMAGE/);
  });

  test('parseConfig names the bad key', () => {
    assert.throws(() => parseConfig({ exports: [] }, 'f'), /f: exports:/);
    assert.throws(() => parseConfig({ exports: [{ name: 'a', backend: { size: 1 } }] }, 'f'), /exports\[0\]\.backend\.type/);
    assert.throws(() => parseConfig({ exports: [{ name: 'a', backend: { type: 'memory' } }], listen: [{ host: 'x', port: 70000 }] }, 'f'), /listen\[0\]/);
    assert.throws(
      () => parseConfig({ exports: [{ name: 'a', backend: { type: 'null' } }, { name: 'a', backend: { type: 'null' } }] }, 'f'),
      /duplicate export name/,
    );
    assert.throws(() => parseConfig({ exports: [{ name: 'a', backend: { type: 'null' } }], defaultExport: 'z' }, 'f'), /defaultExport/);
  });

  test('-r puts readonly: true in the file backend description (and only there)', () => {
    const cfg = configFromFlags(['f.img', 'x=file:/y', 'm=memory:1M'], { address: ['127.0.0.1'], port: 0, logLevel: 'info', readOnly: true });
    assert.deepEqual(
      cfg.exports.map((e) => [e.backend, e.readOnly]),
      [
        [{ type: 'file', path: 'f.img', readonly: true }, true],
        [{ type: 'file', path: '/y', readonly: true }, true],
        [{ type: 'memory', size: '1M' }, true],
      ],
    );
    assert.deepEqual(parseExportSpec('f.img').backend, { type: 'file', path: 'f.img' });
  });

  test('flags: the default export and listeners', () => {
    const cfg = configFromFlags([], { address: ['127.0.0.1', '::1'], port: 10900, logLevel: 'info' });
    assert.deepEqual(cfg.exports, [{ name: '', backend: { type: 'memory', size: '1G' }, readOnly: false }]);
    assert.deepEqual(cfg.listen, [
      { host: '127.0.0.1', port: 10900 },
      { host: '::1', port: 10900 },
    ]);
  });
});
