/**
 * Interop, fio's nbd engine (libnbd underneath, many requests in flight): random writes
 * of mixed sizes with flushes, trims then writes, and several jobs (connections) at
 * once, each verified by fio reading everything back and checking its checksums.
 * Seeds are fixed so a failing run repeats.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { runOk } from '../helpers/run.js';
import { startServer, type CaptiveServer } from '../helpers/server.js';

const MiB = 1024 * 1024;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-interop-fio-'));
let srv: CaptiveServer;

before(async () => {
  srv = await startServer([
    { name: 'mem', backend: { type: 'memory', size: 64 * MiB } },
    { name: 'file', backend: { type: 'file', path: path.join(tmp, 'disk.img'), size: 32 * MiB, create: true } },
  ]);
});
after(async () => {
  await srv.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

interface FioIo {
  io_bytes: number;
  total_ios: number;
}
interface FioJob {
  jobname: string;
  error: number;
  read: FioIo;
  write: FioIo;
  trim: FioIo;
  sync: { total_ios: number };
}

/** Runs fio with JSON output and returns its jobs (fio prints a line before the JSON). */
async function fio(args: string[]): Promise<FioJob[]> {
  const r = await runOk('fio', ['--ioengine=nbd', '--verify_state_save=0', '--output-format=json', '--randrepeat=1', '--randseed=1234', ...args]);
  assert.doesNotMatch(r.stderr, /verify|bad magic|crc32c/i, r.stderr);
  const json = r.stdout.slice(r.stdout.indexOf('{'));
  return (JSON.parse(json) as { jobs: FioJob[] }).jobs;
}

describe('fio (nbd engine)', () => {
  for (const name of ['mem', 'file']) {
    test(`${name}: random writes of 4k/64k/1m with flushes, all verified (crc32c)`, async () => {
      const size = 32 * MiB;
      const [job] = await fio([
        '--name=randwrite',
        `--uri=${srv.uri(name)}`,
        '--rw=randwrite',
        '--bssplit=4k/50:64k/40:1m/10',
        `--size=${size}`,
        '--iodepth=32',
        '--fsync=32',
        '--verify=crc32c',
        '--verify_fatal=1',
      ]);
      assert.equal(job!.error, 0);
      assert.equal(job!.write.io_bytes, size);
      // The verification phase read every block back.
      assert.equal(job!.read.io_bytes, size);
      assert.ok(job!.sync.total_ios > 0, 'flushes were sent');
    });
  }

  test('trim then write, verified', async () => {
    const size = 16 * MiB;
    const [job] = await fio([
      '--name=trimwrite',
      `--uri=${srv.uri('mem')}`,
      '--rw=trimwrite',
      '--bs=64k',
      `--size=${size}`,
      '--iodepth=8',
      '--verify=crc32c',
      '--verify_fatal=1',
    ]);
    assert.equal(job!.error, 0);
    assert.equal(job!.trim.io_bytes, size);
    assert.equal(job!.write.io_bytes, size);
    assert.equal(job!.read.io_bytes, size);
  });

  test('four jobs on four connections to disjoint ranges of one export, verified', async () => {
    const jobs = await fio([
      '--name=multi',
      `--uri=${srv.uri('mem')}`,
      '--rw=randwrite',
      '--bs=16k',
      '--size=8M',
      '--numjobs=4',
      '--offset_increment=16M',
      '--iodepth=16',
      '--verify=md5',
      '--verify_fatal=1',
    ]);
    assert.equal(jobs.length, 4);
    for (const job of jobs) {
      assert.equal(job.error, 0);
      assert.equal(job.write.io_bytes, 8 * MiB);
      assert.equal(job.read.io_bytes, 8 * MiB);
    }
  });
});
