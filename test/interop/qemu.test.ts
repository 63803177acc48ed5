/**
 * Interop, QEMU's NBD client (qemu 7.2): qemu-img info/map/convert/compare and qemu-io
 * reads, writes, discards and write-zeroes with patterns checked. qemu-io exits 0 on a
 * pattern mismatch in some versions, so its output is also searched for the failure
 * message. The pattern backend is also compared with nbdkit's pattern plugin, the data
 * it is defined to match.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run, runOk, type RunResult } from '../helpers/run.js';
import { startServer, type CaptiveServer } from '../helpers/server.js';
import { seededBytes } from '../helpers/data.js';

const MiB = 1024 * 1024;
/** The convert round trip: big enough that qemu-img runs many requests in parallel. */
const BIG = 256 * MiB;
/** The memory backend's allocation page, the granularity of its map. */
const PAGE = 64 * 1024;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-interop-qemu-'));
let srv: CaptiveServer;

before(async () => {
  srv = await startServer([
    { name: 'big', backend: { type: 'memory', size: BIG } },
    { name: 'io', backend: { type: 'memory', size: 16 * MiB }, description: 'qemu-io scratch' },
    { name: 'file', backend: { type: 'file', path: path.join(tmp, 'backing.img'), size: 8 * MiB, create: true } },
    { name: 'pattern', backend: { type: 'pattern', size: 16 * MiB } },
    { name: 'ro', backend: { type: 'memory', size: MiB }, readOnly: true },
    { name: 'map', backend: { type: 'memory', size: 4 * MiB } },
  ]);
});
after(async () => {
  await srv.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** Runs qemu-io with the given commands; fails on a non-zero exit or any pattern mismatch. */
async function qemuIo(uri: string, cmds: string[], extra: string[] = []): Promise<RunResult> {
  const r = await runOk('qemu-io', ['-f', 'raw', ...extra, uri, ...cmds.flatMap((c) => ['-c', c])]);
  assert.doesNotMatch(r.stdout + r.stderr, /Pattern verification failed|failed:/, r.stdout + r.stderr);
  return r;
}

describe('qemu-img', () => {
  test('info: raw format and the virtual size, human and JSON', async () => {
    const human = await runOk('qemu-img', ['info', srv.uri('io')]);
    assert.match(human.stdout, /^file format: raw$/m);
    assert.match(human.stdout, /^virtual size: 16 MiB \(16777216 bytes\)$/m);
    const j = JSON.parse((await runOk('qemu-img', ['info', '--output=json', srv.uri('pattern')])).stdout) as Record<string, unknown>;
    assert.equal(j.format, 'raw');
    assert.equal(j['virtual-size'], 16 * MiB);
  });

  test('convert a 256 MiB seeded file into a memory export and back out; compare says identical', async () => {
    const src = path.join(tmp, 'random.img');
    const data = seededBytes(0x0dd5eed, BIG);
    // A few zero runs so that qemu-img's zero detection (write-zeroes) is exercised too.
    data.fill(0, 10 * MiB, 14 * MiB);
    data.fill(0, BIG - 3 * MiB - 4096, BIG - MiB);
    fs.writeFileSync(src, data);
    await runOk('qemu-img', ['convert', '-n', '-W', '-m', '16', '-f', 'raw', '-O', 'raw', src, srv.uri('big')]);
    const cmp = await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, srv.uri('big')]);
    assert.match(cmp.stdout, /Images are identical/);
    const back = path.join(tmp, 'back.img');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', srv.uri('big'), back]);
    const cmp2 = await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, back]);
    assert.match(cmp2.stdout, /Images are identical/);
    assert.ok(fs.readFileSync(back).equals(data), 'the file converted back is byte-identical');
    fs.rmSync(src);
    fs.rmSync(back);
  });

  test('compare sees a difference, and where', async () => {
    const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', srv.uri('pattern'), srv.uri('io')]);
    assert.equal(r.code, 1);
    assert.match(r.stdout, /Content mismatch at offset \d+!/);
  });

  test('the pattern backend equals nbdkit\'s pattern plugin, byte for byte', async () => {
    const r = await runOk('nbdkit', [
      '-U',
      '-',
      'pattern',
      `size=${16 * MiB}`,
      '--run',
      `qemu-img compare -f raw -F raw "$uri" '${srv.uri('pattern')}'`,
    ]);
    assert.match(r.stdout, /Images are identical/);
  });

  test('map: data and zero ranges of a memory export written at known places', async () => {
    await qemuIo(srv.uri('map'), [
      `write -P 0x11 0 ${PAGE}`,
      `write -P 0x22 ${MiB + 512} 4096`,
      `write -P 0x44 ${2 * MiB} ${PAGE}`,
      `write -z ${2 * MiB} ${PAGE}`, // zeroed (NO_HOLE): reads zero, no allocation needed
      `write -P 0x33 ${3 * MiB} ${PAGE}`,
      `discard ${3 * MiB} ${PAGE}`,
    ]);
    const m = JSON.parse((await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', srv.uri('map')])).stdout) as {
      start: number;
      length: number;
      data: boolean;
      zero: boolean;
    }[];
    assert.deepEqual(
      m.map((e) => [e.start, e.length, e.data, e.zero]),
      [
        [0, PAGE, true, false],
        [PAGE, MiB - PAGE, false, true],
        [MiB, PAGE, true, false],
        [MiB + PAGE, 3 * MiB - PAGE, false, true],
      ],
    );
  });
});

describe('qemu-io', () => {
  test('write -P / read -P, vectored and unaligned, plain and FUA', async () => {
    await qemuIo(srv.uri('io'), [
      'write -P 0xab 0 64k',
      'read -P 0xab 0 64k',
      'write -P 0xcd 1000 3000',
      'read -P 0xab 0 1000',
      'read -P 0xcd 1000 3000',
      'read -P 0xab 4000 61536',
      'writev -P 0x5a 1M 4k 8k 512',
      'readv -P 0x5a 1M 12800',
      'write -f -P 0x77 2M 128k',
      'read -P 0x77 2M 128k',
      'write -P 0x01 16777215 1',
      'read -P 0x01 16777215 1',
    ]);
  });

  test('a mismatching pattern is detected (the check above can fail)', async () => {
    const r = await run('qemu-io', ['-f', 'raw', srv.uri('io'), '-c', 'write -P 0x10 4M 4k', '-c', 'read -P 0x11 4M 4k']);
    assert.match(r.stdout + r.stderr, /Pattern verification failed at offset 4194304, 4096 bytes/);
  });

  test('discard and write-zeroes (with and without unmap, FUA) read back zero; neighbours intact', async () => {
    await qemuIo(srv.uri('io'), [
      'write -P 0xee 8M 1M',
      'discard 8M 64k',
      'read -P 0 8M 64k',
      'write -z 8448k 64k',
      'read -P 0 8448k 64k',
      'write -z -u 8512k 128k',
      'read -P 0 8512k 128k',
      'write -z -f 8640k 4k',
      'read -P 0 8640k 4k',
      'read -P 0xee 8644k 124k',
      'read -P 0xee 8576k 0',
    ]);
  });

  test('aio writes with a flush, then reads, in one session', async () => {
    await qemuIo(srv.uri('io'), [
      'aio_write -P 0x61 10M 64k',
      'aio_write -P 0x62 11M 64k',
      'aio_write -P 0x63 12M 64k',
      'aio_flush',
      'flush',
      'aio_read -P 0x61 10M 64k',
      'aio_read -P 0x62 11M 64k',
      'aio_read -P 0x63 12M 64k',
      'aio_flush',
    ]);
  });

  test('file export: what qemu-io writes is in the backing file after a flush', async () => {
    await qemuIo(srv.uri('file'), ['write -P 0x42 1M 256k', 'flush', 'write -z 1M 4k', 'flush']);
    const b = fs.readFileSync(path.join(tmp, 'backing.img'));
    assert.ok(b.subarray(MiB, MiB + 4096).equals(Buffer.alloc(4096)));
    assert.ok(b.subarray(MiB + 4096, MiB + 256 * 1024).equals(Buffer.alloc(252 * 1024, 0x42)));
  });

  test('read-only export: qemu-io opens it with -r, and refuses to open it writable', async () => {
    await qemuIo(srv.uri('ro'), ['read -P 0 0 64k'], ['-r']);
    const w = await run('qemu-io', ['-f', 'raw', '-r', srv.uri('ro'), '-c', 'write 0 4k']);
    assert.match(w.stdout + w.stderr, /read-only/);
    const rw = await run('qemu-io', ['-f', 'raw', srv.uri('ro'), '-c', 'read 0 4k']);
    assert.notEqual(rw.code, 0);
    assert.match(rw.stderr, /Permission denied|read-only/);
  });

  test('reads of the pattern export are the pattern (first and last words)', async () => {
    // qemu-io -P checks a single byte value, so check the pattern's words that are one repeated byte: offset 0.
    const r = await qemuIo(srv.uri('pattern'), ['read -P 0 0 8', `read -v ${16 * MiB - 16} 16`], ['-r']);
    // -v dumps the bytes: the last two words are the offsets 0xfffff0 and 0xfffff8.
    assert.match(r.stdout, /00fffff0: {2}00 00 00 00 00 ff ff f0 00 00 00 00 00 ff ff f8/);
  });
});
