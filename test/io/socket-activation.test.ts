import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LISTEN_FDS_START, MAX_LISTEN_FDS, takeActivatedSockets, unixSocketPath } from '../../src/io/socket-activation.js';

describe('takeActivatedSockets (sd_listen_fds)', () => {
  test('takes the descriptors from 3 with their LISTEN_FDNAMES and removes the variables', () => {
    const env: NodeJS.ProcessEnv = { LISTEN_PID: '42', LISTEN_FDS: '2', LISTEN_FDNAMES: 'nbd:admin', OTHER: 'x' };
    assert.deepEqual(takeActivatedSockets(env, 42), [
      { fd: LISTEN_FDS_START, name: 'nbd' },
      { fd: LISTEN_FDS_START + 1, name: 'admin' },
    ]);
    assert.deepEqual(env, { OTHER: 'x' });
  });

  test("names are systemd's 'unknown' when LISTEN_FDNAMES is absent (libnbd sets none)", () => {
    assert.deepEqual(takeActivatedSockets({ LISTEN_PID: '7', LISTEN_FDS: '1' }, 7), [{ fd: 3, name: 'unknown' }]);
  });

  test('sockets meant for another process (LISTEN_PID of a parent) are not taken and the variables stay', () => {
    const env: NodeJS.ProcessEnv = { LISTEN_PID: '41', LISTEN_FDS: '1' };
    assert.equal(takeActivatedSockets(env, 42), null);
    assert.deepEqual(env, { LISTEN_PID: '41', LISTEN_FDS: '1' });
    assert.equal(takeActivatedSockets({ LISTEN_FDS: '1' }, 42), null);
    assert.equal(takeActivatedSockets({}, 42), null);
  });

  test('a malformed or out-of-range LISTEN_FDS is refused with EINVAL', () => {
    for (const bad of ['', 'two', '-1', '0', String(MAX_LISTEN_FDS + 1), '1e3']) {
      assert.throws(() => takeActivatedSockets({ LISTEN_PID: '5', LISTEN_FDS: bad }, 5), { code: 'EINVAL' }, bad);
    }
  });
});

describe('unixSocketPath', () => {
  test("finds a listening unix socket's path by its descriptor's inode", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-sa-'));
    const sock = path.join(dir, 's.sock');
    const srv = net.createServer();
    await new Promise<void>((resolve) => srv.listen(sock, resolve));
    try {
      const fd = (srv as unknown as { _handle: { fd: number } })._handle.fd;
      assert.equal(unixSocketPath(fd), sock);
      // A descriptor that is not a socket has no socket path.
      const file = fs.openSync(path.join(dir, 'plain'), 'w');
      try {
        assert.equal(unixSocketPath(file), null);
      } finally {
        fs.closeSync(file);
      }
    } finally {
      await new Promise((r) => srv.close(r));
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
