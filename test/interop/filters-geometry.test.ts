/**
 * Interop, the geometry filters (offset, partition, truncate, blocksize) through
 * `blockgate serve --config FILE` and real clients:
 * - partition: GPT and MBR (primary and logical) images written by sfdisk over random
 *   bytes, each partition read by `qemu-img convert` and `nbdcopy` and compared with the
 *   bytes sfdisk says it holds; qemu-io writes into a writable partition land there and
 *   nowhere else in the image file;
 * - offset: a window of the image compared with its slice;
 * - truncate: `nbdinfo --size` shows the new size, the bytes past the old end read as
 *   zeroes, and rounding up to 4 KiB;
 * - nbdkit (1.32) serving the same images through its own filter of the same name and
 *   settings is byte-for-byte and size-for-size the same as blockgate (qemu-img compare -s);
 * - blocksize: qemu-io's 512-byte (and odd) writes through a blocksize filter with a
 *   4096-byte minblock. No built-in backend can be given a minimum block size, so here
 *   the filter does its read-modify-write in 4 KiB blocks over a memory backend (which
 *   would accept anything); that the device below only ever sees aligned requests is
 *   checked in test/filters/blocksize.test.ts with a device that insists on 4096.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { runOk, type RunResult } from '../helpers/run.js';
import { ChildSet } from '../helpers/children.js';
import { nbdUri } from '../../src/cli/serve.js';

const MiB = 1024 * 1024;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-interop-geometry-'));
const children = new ChildSet();
const socket = path.join(tmp, 'nbd.sock');
const uri = (name: string) => nbdUri({ path: socket }, name);

interface Part {
  node: string;
  start: number;
  size: number;
}

/** Random bytes with a table written over them by sfdisk; returns sfdisk's listing of it. */
async function sfdiskImage(file: string, size: number, script: string): Promise<Part[]> {
  fs.writeFileSync(file, randomBytes(size));
  await runOk('sfdisk', ['-q', '--no-reread', '--wipe', 'never', file], { input: script });
  const j = JSON.parse((await runOk('sfdisk', ['-J', file])).stdout) as { partitiontable: { partitions: Part[] } };
  return j.partitiontable.partitions;
}

const GPT = path.join(tmp, 'gpt.img');
const GPT_RW = path.join(tmp, 'gpt-rw.img');
const MBR = path.join(tmp, 'mbr.img');
const SMALL = path.join(tmp, 'small.img');
const SMALL_SIZE = MiB + 123;
let gptParts: Part[];
let mbrParts: Part[];
let gptBytes: Buffer;
let gptRwBefore: Buffer;
let mbrBytes: Buffer;
let smallBytes: Buffer;

/** The bytes of partition `n` as sfdisk lists it. */
function slice(bytes: Buffer, parts: Part[], n: number): Buffer {
  const p = parts.find((q) => Number(/(\d+)$/.exec(q.node)?.[1]) === n);
  assert.ok(p, `sfdisk lists partition ${n}`);
  return bytes.subarray(p.start * 512, (p.start + p.size) * 512);
}

before(async () => {
  gptParts = await sfdiskImage(GPT, 16 * MiB, 'label: gpt\nstart=2048, size=8192, type=linux\nstart=12288, size=10240, type=swap\nstart=24576, size=77\n');
  await sfdiskImage(GPT_RW, 8 * MiB, 'label: gpt\nstart=2048, size=4096\n');
  mbrParts = await sfdiskImage(
    MBR,
    24 * MiB,
    'label: dos\nstart=2048, size=6000, type=83\nstart=10240, size=30000, type=5\nstart=12288, size=4000, type=83\nstart=20480, size=9000, type=c\n',
  );
  fs.writeFileSync(SMALL, randomBytes(SMALL_SIZE));
  gptBytes = fs.readFileSync(GPT);
  gptRwBefore = fs.readFileSync(GPT_RW);
  mbrBytes = fs.readFileSync(MBR);
  smallBytes = fs.readFileSync(SMALL);
  const ro = (p: string) => ({ type: 'file', path: p, readonly: true });
  const config = {
    listen: [{ path: socket }],
    exports: [
      { name: 'gpt1', backend: ro(GPT), filters: [{ type: 'partition', partition: 1 }] },
      { name: 'gpt2', backend: ro(GPT), filters: [{ type: 'partition', partition: 2 }] },
      { name: 'gpt3', backend: ro(GPT), filters: [{ type: 'partition', partition: 3 }] },
      { name: 'gptrw', backend: { type: 'file', path: GPT_RW }, filters: [{ type: 'partition', partition: 1 }] },
      { name: 'mbr1', backend: ro(MBR), filters: [{ type: 'partition', partition: 1 }] },
      { name: 'mbr5', backend: ro(MBR), filters: [{ type: 'partition', partition: 5 }] },
      { name: 'mbr6', backend: ro(MBR), filters: [{ type: 'partition', partition: 6 }] },
      { name: 'offset', backend: ro(GPT), filters: [{ type: 'offset', offset: '1M', range: '3M' }] },
      { name: 'offset-end', backend: ro(GPT), filters: [{ type: 'offset', offset: 15 * MiB + 4096 }] },
      { name: 'truncate', backend: ro(SMALL), filters: [{ type: 'truncate', size: '3M' }] },
      { name: 'truncate-small', backend: ro(SMALL), filters: [{ type: 'truncate', size: 1000 }] },
      { name: 'round-up', backend: ro(SMALL), filters: [{ type: 'truncate', roundUp: '4k' }] },
      { name: 'blocksize', backend: { type: 'memory', size: 4 * MiB }, filters: [{ type: 'blocksize', minblock: 4096 }] },
    ],
  };
  const cfg = path.join(tmp, 'serve.json');
  fs.writeFileSync(cfg, JSON.stringify(config));
  const server = children.blockgate(['serve', '--config', cfg, '--no-control', '--print-uri']);
  await server.waitFor(/nbd\+unix/);
});

after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** The whole export read by qemu-img convert into a file. */
async function viaQemuImg(name: string): Promise<Buffer> {
  const out = path.join(tmp, `${name}.qemu.raw`);
  await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri(name), out]);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

/** The whole export read by nbdcopy into a file. */
async function viaNbdcopy(name: string): Promise<Buffer> {
  const out = path.join(tmp, `${name}.nbdcopy.raw`);
  fs.writeFileSync(out, '');
  await runOk('nbdcopy', [uri(name), out]);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

async function size(name: string): Promise<number> {
  return Number((await runOk('nbdinfo', ['--size', uri(name)])).stdout.trim());
}

async function qemuIo(name: string, cmds: string[]): Promise<RunResult> {
  const r = await runOk('qemu-io', ['-f', 'raw', uri(name), ...cmds.flatMap((c) => ['-c', c])]);
  assert.doesNotMatch(r.stdout + r.stderr, /Pattern verification failed|failed:/, r.stdout + r.stderr);
  return r;
}

describe('partition filter, real clients', () => {
  for (const n of [1, 2, 3]) {
    test(`GPT partition ${n}: qemu-img convert and nbdcopy read exactly its bytes`, async () => {
      const expected = slice(gptBytes, gptParts, n);
      assert.equal(await size(`gpt${n}`), expected.length);
      assert.ok((await viaQemuImg(`gpt${n}`)).equals(expected), 'qemu-img convert');
      assert.ok((await viaNbdcopy(`gpt${n}`)).equals(expected), 'nbdcopy');
    });
  }

  for (const n of [1, 5, 6]) {
    test(`MBR partition ${n} (${n > 4 ? 'logical' : 'primary'}): qemu-img convert and nbdcopy read exactly its bytes`, async () => {
      const expected = slice(mbrBytes, mbrParts, n);
      assert.ok((await viaQemuImg(`mbr${n}`)).equals(expected), 'qemu-img convert');
      assert.ok((await viaNbdcopy(`mbr${n}`)).equals(expected), 'nbdcopy');
    });
  }

  test('qemu-io writes into a writable partition land inside it in the image file, nothing else changes', async () => {
    const start = 2048 * 512;
    const len = 4096 * 512;
    await qemuIo('gptrw', ['write -P 0x5c 0 64k', `write -P 0x6d ${len - 512} 512`, 'read -P 0x5c 0 64k', `read -P 0x6d ${len - 512} 512`]);
    await assert.rejects(runOk('qemu-io', ['-f', 'raw', uri('gptrw'), '-c', `write -P 1 ${len} 512`]), 'past the end of the partition is refused');
    const after = fs.readFileSync(GPT_RW);
    const expected = Buffer.from(gptRwBefore);
    expected.fill(0x5c, start, start + 65536);
    expected.fill(0x6d, start + len - 512, start + len);
    assert.ok(after.equals(expected), 'the image file changed exactly where the partition was written');
  });
});

describe('offset filter, real clients', () => {
  test('a 3 MiB window at 1 MiB reads as that slice of the image', async () => {
    assert.equal(await size('offset'), 3 * MiB);
    assert.ok((await viaNbdcopy('offset')).equals(gptBytes.subarray(MiB, 4 * MiB)), 'nbdcopy');
    assert.ok((await viaQemuImg('offset')).equals(gptBytes.subarray(MiB, 4 * MiB)), 'qemu-img convert');
  });

  test('without a range, from the offset to the end', async () => {
    assert.equal(await size('offset-end'), MiB - 4096);
    assert.ok((await viaNbdcopy('offset-end')).equals(gptBytes.subarray(15 * MiB + 4096)));
  });
});

describe('truncate filter, real clients', () => {
  test('extended to 3 MiB: nbdinfo --size says so, and past the old end it reads zeroes', async () => {
    assert.equal(await size('truncate'), 3 * MiB);
    const all = await viaNbdcopy('truncate');
    assert.equal(all.length, 3 * MiB);
    assert.ok(all.subarray(0, SMALL_SIZE).equals(smallBytes), 'the old bytes');
    assert.ok(all.subarray(SMALL_SIZE).equals(Buffer.alloc(3 * MiB - SMALL_SIZE)), 'zeroes past the old end');
    assert.ok((await viaQemuImg('truncate')).equals(all), 'qemu-img convert reads the same');
    // nbdinfo --map: the tail is a hole of zeroes.
    const map = (await runOk('nbdinfo', ['--map', uri('truncate')])).stdout;
    assert.match(map, new RegExp(`^\\s*${SMALL_SIZE}\\s+${3 * MiB - SMALL_SIZE}\\s+3\\s+hole,zero$`, 'm'), map);
  });

  test('truncated to 1000 bytes, and rounded up to 4 KiB', async () => {
    assert.equal(await size('truncate-small'), 1000);
    assert.ok((await viaNbdcopy('truncate-small')).equals(smallBytes.subarray(0, 1000)));
    const rounded = Math.ceil(SMALL_SIZE / 4096) * 4096;
    assert.equal(await size('round-up'), rounded);
    const all = await viaNbdcopy('round-up');
    assert.ok(all.equals(Buffer.concat([smallBytes, Buffer.alloc(rounded - SMALL_SIZE)])));
  });
});

describe('blocksize filter, real clients', () => {
  test('qemu-io 512-byte and odd writes over a 4096-byte minblock: data is right, neighbours kept', async () => {
    await qemuIo('blocksize', [
      'write -P 0x11 0 12k',
      'write -P 0xab 512 512',
      'write -P 0xcd 1536 1024',
      'write -P 0xef 4095 2',
      'write -z 6000 100',
      'read -P 0x11 0 512',
      'read -P 0xab 512 512',
      'read -P 0x11 1024 512',
      'read -P 0xcd 1536 1024',
      'read -P 0xef 4095 2',
      'read -P 0 6000 100',
    ]);
    const model = Buffer.alloc(4 * MiB);
    model.fill(0x11, 0, 12 * 1024);
    model.fill(0xab, 512, 1024);
    model.fill(0xcd, 1536, 2560);
    model.fill(0xef, 4095, 4097);
    model.fill(0, 6000, 6100);
    const all = await viaNbdcopy('blocksize');
    assert.ok(all.equals(model), 'the whole device matches the model');
    const info = (await runOk('nbdinfo', [uri('blocksize')])).stdout;
    assert.match(info, /^\tblock_size_minimum: 1$/m, info);
  });
});

describe('nbdkit agrees', () => {
  const cases: [string, string, string[]][] = [
    ['gpt1', GPT, ['--filter=partition', 'partition=1']],
    ['gpt3', GPT, ['--filter=partition', 'partition=3']],
    ['mbr5', MBR, ['--filter=partition', 'partition=5']],
    ['mbr6', MBR, ['--filter=partition', 'partition=6']],
    ['offset', GPT, ['--filter=offset', 'offset=1M', 'range=3M']],
    ['truncate', SMALL, ['--filter=truncate', 'truncate=3M']],
    ['round-up', SMALL, ['--filter=truncate', 'round-up=4k']],
  ];
  for (const [name, file, args] of cases) {
    test(`${name}: the same size and bytes as nbdkit ${args.join(' ')}`, async () => {
      const [filter, ...settings] = args;
      await runOk('nbdkit', ['-r', '-U', '-', filter!, 'file', file, ...settings, '--run', `qemu-img compare -s -f raw -F raw "$uri" '${uri(name)}'`]);
    });
  }
});
