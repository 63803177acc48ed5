/**
 * What the log says when a request fails: an unexpected exception (a bug in a device) at
 * `error` with its stack, once per kind; an injected failure at `info`; an expected
 * device error at `debug`; the error text never under a second `msg` key; the peer in
 * every line of a connection.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import { FilterDevice } from '../../src/device/index.js';
import { MemoryDevice } from '../../src/backends/index.js';
import { ErrorFilter } from '../../src/filters/index.js';
import { BlockError } from '../../src/errors/index.js';
import { Export, RequestErrorLog, UNEXPECTED_LOG_INTERVAL_MS } from '../../src/export/index.js';
import { NBD_CMD } from '../../src/nbd/constants.js';
import { capturingLogger, connect, expectError, serveExports } from './helpers.js';

const EIO = 5;

/** A device whose read has a bug: it throws a TypeError. */
class BuggyDevice extends FilterDevice {
  override read(): Promise<void> {
    return Promise.reject(new TypeError("Cannot read properties of undefined (reading 'pages')"));
  }
}

/** A device whose read fails the ordinary way, as a disk does. */
class FailingDevice extends FilterDevice {
  override read(): Promise<void> {
    return Promise.reject(new BlockError('EIO', 'read: the disk said no'));
  }
}

interface LogLine {
  level: number;
  msg: string;
  [key: string]: unknown;
}

async function serveLogged(exports: Export[]) {
  const log = capturingLogger();
  const srv = await serveExports(exports, undefined, log.logger);
  return { socket: srv.socket, lines: () => log.lines() as LogLine[], raw: () => log.raw, close: () => srv.close() };
}

test('a device read that throws a TypeError: the client gets EIO, the log an error line with the stack, once for three requests', async () => {
  const s = await serveLogged([new Export({ name: '', device: new BuggyDevice(new MemoryDevice({ size: 65536 })) })]);
  try {
    const c = await connect(s.socket, 'structured');
    for (let i = 1n; i <= 3n; i++) {
      c.request(0, NBD_CMD.NBD_CMD_READ, i, 0, 512);
      await expectError(c, i, EIO);
    }
    c.close();
    const errors = s.lines().filter((l) => l.level === 50);
    assert.equal(errors.length, 1, JSON.stringify(s.lines()));
    const e = errors[0]!;
    assert.match(String((e.err as { stack: string }).stack), /TypeError: Cannot read properties of undefined/);
    assert.equal(e.cmd, 'NBD_CMD_READ');
    assert.equal(e.code, 'EIO');
    assert.equal(e.peer, 'unix');
    // One msg key per line: JSON.parse keeps the last of duplicates, so compare with the raw text.
    for (const raw of s.raw()) assert.equal(raw.match(/"msg":/g)?.length ?? 0, 1, raw);
  } finally {
    await s.close();
  }
});

test('an injected failure is logged at info, an expected device error at debug, both with the error text under reason', async () => {
  const injected = new ErrorFilter(new MemoryDevice({ size: 65536 }), { ops: ['read'], error: 'EIO' });
  const s = await serveLogged([
    new Export({ name: 'inj', device: injected }),
    new Export({ name: 'disk', device: new FailingDevice(new MemoryDevice({ size: 65536 })) }),
  ]);
  try {
    const a = await connect(s.socket, 'structured', 'inj');
    a.request(0, NBD_CMD.NBD_CMD_READ, 1n, 0, 512);
    await expectError(a, 1n, EIO);
    const b = await connect(s.socket, 'structured', 'disk');
    b.request(0, NBD_CMD.NBD_CMD_READ, 2n, 0, 512);
    await expectError(b, 2n, EIO);
    a.close();
    b.close();
    const failures = s.lines().filter((l) => l.code === 'EIO');
    assert.deepEqual(
      failures.map((l) => [l.level, l.export, l.reason]),
      [
        [30, 'inj', 'read: injected EIO (error filter)'],
        [20, 'disk', 'read: the disk said no'],
      ],
    );
  } finally {
    await s.close();
  }
});

test('the same kind of unexpected exception is logged again after the interval, with the count suppressed meanwhile', () => {
  let now = 0;
  const log = new RequestErrorLog(() => now);
  const seen: Record<string, unknown>[] = [];
  const fake = { error: (o: Record<string, unknown>) => seen.push(o), info() {}, debug() {} } as unknown as pino.Logger;
  const boom = new TypeError('x is not a function');
  const e = new BlockError('EIO', boom.message, { cause: boom });
  log.log(fake, boom, e, {});
  log.log(fake, boom, e, {});
  log.log(fake, boom, e, {});
  now += UNEXPECTED_LOG_INTERVAL_MS;
  log.log(fake, boom, e, {});
  assert.equal(seen.length, 2);
  assert.equal(seen[1]!.suppressed, 2);
});
