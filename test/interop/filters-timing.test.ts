/**
 * Interop, the timing and accounting filters (delay, rate, stats, log) with real clients
 * through `blockgate serve --config FILE`: one server child with an export per filter.
 *
 * - delay: `rdelay: 200ms` makes a pread, timed inside nbdsh around the call, take at
 *   least 150 ms (a lower bound only: a slow shared machine only makes it longer);
 * - rate: `rate: 4M` with a 512 KiB bucket makes nbdcopy of 8 MiB take at least 1.5 s
 *   (a lower bound only; the bucket alone lets through 0.5 MiB, the rest needs 1.875 s);
 * - stats: nbdcopy reads N bytes; at shutdown (SIGTERM, the server exits 0) the
 *   statsfile says read bytes == N;
 * - log: the log file has one Read line per pread nbdsh made, with its offset and count.
 *
 * Every wait is bounded (the helpers' timeouts); the server is killed by PID in `after`
 * if it is still alive; the temp directory is removed.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { runOk } from '../helpers/run.js';
import { ChildSet, type Child } from '../helpers/children.js';
import type { StatsSnapshot } from '../../src/filters/stats.js';

const MiB = 2 ** 20;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-filters-timing-'));
const SOCKET = path.join(tmp, 'nbd.sock');
const STATSFILE = path.join(tmp, 'stats.json');
const LOGFILE = path.join(tmp, 'requests.log');
const STATS_SIZE = 6 * MiB + 12345;
const RATE_SIZE = 8 * MiB;

const children = new ChildSet();
let server: Child;

const uri = (name: string) => `nbd+unix:///${name}?socket=${encodeURIComponent(SOCKET)}`;

before(async () => {
  const config = path.join(tmp, 'serve.json');
  fs.writeFileSync(
    config,
    JSON.stringify({
      listen: [{ path: SOCKET }],
      exports: [
        { name: 'delay', backend: { type: 'memory', size: '1M' }, filters: [{ type: 'delay', rdelay: '200ms' }] },
        { name: 'rate', backend: { type: 'pattern', size: RATE_SIZE }, filters: [{ type: 'rate', rate: '4M', burstiness: 0.125 }] },
        { name: 'stats', backend: { type: 'pattern', size: STATS_SIZE }, filters: [{ type: 'stats', statsfile: STATSFILE }] },
        { name: 'log', backend: { type: 'memory', size: '1M' }, filters: [{ type: 'log', logfile: LOGFILE }] },
      ],
    }),
  );
  server = children.blockgate(['serve', '--no-control', '--print-uri', '--config', config]);
  await server.waitFor(/^nbd\+unix:\/\/\S+$/m);
});

after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe('timing and accounting filters through blockgate serve --config', () => {
  test('delay: rdelay 200ms makes an nbdsh pread take at least 150 ms (lower bound only)', async () => {
    const script = ['import time', 't = time.monotonic()', 'h.pread(512, 0)', 'print("elapsed", time.monotonic() - t)'].join('\n');
    const r = await runOk('nbdsh', ['-u', uri('delay'), '-c', script]);
    const m = /^elapsed (\S+)$/m.exec(r.stdout);
    assert.ok(m, r.stdout);
    assert.ok(Number(m[1]) >= 0.15, `the pread took ${m[1]} s`);
  });

  test('rate: 4M (512 KiB bucket) makes nbdcopy of 8 MiB take at least 1.5 s (lower bound only)', async () => {
    const out = path.join(tmp, 'rate.img');
    const t0 = performance.now();
    await runOk('nbdcopy', ['--no-extents', uri('rate'), out]);
    const seconds = (performance.now() - t0) / 1000;
    assert.equal(fs.statSync(out).size, RATE_SIZE);
    assert.ok(seconds >= 1.5, `8 MiB took ${seconds} s`);
    fs.rmSync(out);
  });

  test('stats and log: traffic (nbdcopy of N bytes; nbdsh preads)', async () => {
    const out = path.join(tmp, 'stats.img');
    await runOk('nbdcopy', ['--no-extents', uri('stats'), out]);
    assert.equal(fs.statSync(out).size, STATS_SIZE);
    fs.rmSync(out);
    await runOk('nbdsh', ['-u', uri('log'), '-c', 'h.pread(512, 0)', '-c', 'h.pread(4096, 8192)', '-c', 'h.pwrite(b"x" * 512, 1024)', '-c', 'h.pread(1, 65535)']);
  });

  test('at shutdown (SIGTERM): the statsfile says read bytes == N; the log has one Read line per pread', async () => {
    server.proc.kill('SIGTERM');
    assert.equal(await server.exited(), 0, `serve exited badly; stderr: ${server.stderr()}`);

    const stats = JSON.parse(fs.readFileSync(STATSFILE, 'utf8')) as StatsSnapshot;
    assert.equal(stats.ops.read.bytes, STATS_SIZE);
    assert.equal(stats.ops.read.errors, 0);
    assert.ok(stats.ops.read.count >= 1);
    assert.equal(stats.ops.write.count, 0);
    assert.equal(stats.ops.read.histogram.reduce((a, b) => a + b, 0), stats.ops.read.count);

    const lines = fs.readFileSync(LOGFILE, 'utf8').trimEnd().split('\n');
    const reads = lines.filter((l) => / Read id=/.test(l));
    assert.deepEqual(
      reads.map((l) => /Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) flags=0 return=0 \(Success\) elapsed_us=\d+$/.exec(l)?.slice(1)),
      [
        ['0x0', '0x200'],
        ['0x2000', '0x1000'],
        ['0xffff', '0x1'],
      ],
      lines.join('\n'),
    );
    assert.equal(lines.filter((l) => / Write id=\d+ offset=0x400 count=0x200 /.test(l)).length, 1, lines.join('\n'));
  });
});
