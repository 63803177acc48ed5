/**
 * Every listener follows one unix-socket policy (src/io/listen.ts): a path a live server
 * holds is refused with EBUSY, a stale socket file is replaced, a non-socket is left alone.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { NbdServer } from '../../src/nbd/index.js';
import { claimSocketPath } from '../../src/io/listen.js';
import { Export } from '../../src/export/index.js';
import { NullDevice } from '../../src/backends/index.js';

function nullExport(): Export {
  return new Export({ name: '', device: new NullDevice({ size: 4096 }) });
}

/** The first 8 bytes an NBD server sends on `sock` (its greeting's magic). */
function greetingMagic(sock: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = net.connect(sock);
    c.once('data', (d: Buffer) => {
      c.destroy();
      resolve(d.subarray(0, 8).toString('latin1'));
    });
    c.once('error', reject);
  });
}

function tempDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-listen-'));
}

test('a second NbdServer on a live server\'s socket path fails EBUSY and the first keeps its clients', async () => {
  const dir = tempDir();
  const sock = path.join(dir, 'nbd.sock');
  const first = new NbdServer({ exports: [nullExport()] });
  const second = new NbdServer({ exports: [nullExport()] });
  try {
    await first.listen({ path: sock });
    await assert.rejects(second.listen({ path: sock }), { code: 'EBUSY' });
    // The first server still answers on its path.
    assert.equal(await greetingMagic(sock), 'NBDMAGIC');
  } finally {
    await second.close(100);
    await first.close(100);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a stale socket file (its server gone) is replaced by a new NbdServer', async () => {
  const dir = tempDir();
  const sock = path.join(dir, 'nbd.sock');
  // A socket file nobody listens on: listen, move the file aside, close (net.Server.close
  // unlinks only the path it listened on, now absent), and move the file back.
  const orphan = net.createServer();
  await new Promise<void>((resolve) => orphan.listen(sock, resolve));
  fs.renameSync(sock, `${sock}.keep`);
  await new Promise<void>((resolve) => orphan.close(() => resolve()));
  fs.renameSync(`${sock}.keep`, sock);
  const server = new NbdServer({ exports: [nullExport()] });
  try {
    assert.ok(fs.lstatSync(sock).isSocket());
    await server.listen({ path: sock });
    assert.equal(await greetingMagic(sock), 'NBDMAGIC');
  } finally {
    await server.close(100);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a path that is not a socket is refused with EEXIST and left in place', async () => {
  const dir = tempDir();
  const file = path.join(dir, 'not-a-socket');
  fs.writeFileSync(file, 'data');
  try {
    await assert.rejects(claimSocketPath(file), { code: 'EEXIST' });
    assert.equal(fs.readFileSync(file, 'utf8'), 'data');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
