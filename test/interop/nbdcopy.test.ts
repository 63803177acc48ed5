/**
 * Interop, libnbd's nbdcopy: round trips to and from every backend (memory, file, null,
 * pattern) with the bytes compared against data computed here (the offset pattern, or a
 * seeded PRNG), and copies between blockgate exports (two exports of one server, and
 * two servers), with several connections and requests in flight.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run, runOk } from '../helpers/run.js';
import { startServer, type CaptiveServer } from '../helpers/server.js';
import { seededBytes } from '../helpers/data.js';
import { fillPattern } from '../../src/backends/pattern.js';

const MiB = 1024 * 1024;
/** Size of every export and file here: big enough for many requests in flight, small enough to stay quick. */
const SIZE = 48 * MiB;

function patternBytes(offset: number, n: number): Buffer {
  const b = Buffer.alloc(n);
  fillPattern(b, offset);
  return b;
}

/** Asserts two buffers are equal, naming the first differing offset instead of dumping megabytes. */
function assertSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  if (actual.equals(expected)) return;
  let i = 0;
  while (actual[i] === expected[i]) i++;
  assert.fail(`${what}: first difference at byte ${i} (got ${actual[i]}, expected ${expected[i]})`);
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-interop-copy-'));
const BACKING = path.join(tmp, 'backing.img');
let a: CaptiveServer;
let b: CaptiveServer;

before(async () => {
  a = await startServer([
    { name: 'pattern', backend: { type: 'pattern', size: SIZE } },
    { name: 'mem', backend: { type: 'memory', size: SIZE } },
    { name: 'mem2', backend: { type: 'memory', size: SIZE } },
    { name: 'file', backend: { type: 'file', path: BACKING, size: SIZE, create: true } },
    { name: 'null', backend: { type: 'null', size: SIZE } },
    { name: 'small', backend: { type: 'memory', size: MiB } },
  ]);
  b = await startServer([{ name: 'other', backend: { type: 'memory', size: SIZE } }]);
});
after(async () => {
  await Promise.all([a.close(), b.close()]);
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** A fresh path in the temp directory. */
let n = 0;
const local = (name: string) => path.join(tmp, `${n++}-${name}`);

/** nbdcopy's extent map of an export, via nbdinfo --map --json. */
async function map(uri: string): Promise<[number, number, number][]> {
  const j = JSON.parse((await runOk('nbdinfo', ['--map', '--json', uri])).stdout) as { offset: number; length: number; type: number }[];
  return j.map((e) => [e.offset, e.length, e.type]);
}

describe('nbdcopy', () => {
  test('pattern -> memory export -> local file equals the pattern computed here', async () => {
    await runOk('nbdcopy', ['--flush', a.uri('pattern'), a.uri('mem')]);
    const out = local('from-mem.img');
    await runOk('nbdcopy', [a.uri('mem'), out]);
    assertSameBytes(fs.readFileSync(out), patternBytes(0, SIZE), 'pattern via memory');
  });

  test('local file (seeded data) -> file export: the backing file holds it, and it copies back out', async () => {
    const src = local('seeded.img');
    const data = seededBytes(0x5eed, SIZE);
    fs.writeFileSync(src, data);
    await runOk('nbdcopy', ['--flush', src, a.uri('file')]);
    assertSameBytes(fs.readFileSync(BACKING), data, 'backing file');
    const out = local('from-file.img');
    await runOk('nbdcopy', [a.uri('file'), out]);
    assertSameBytes(fs.readFileSync(out), data, 'file export read back');
  });

  test('null reads as zeroes and swallows a copy into it', async () => {
    const out = local('from-null.img');
    await runOk('nbdcopy', [a.uri('null'), out]);
    assertSameBytes(fs.readFileSync(out), Buffer.alloc(SIZE), 'null export');
    await runOk('nbdcopy', ['--flush', a.uri('pattern'), a.uri('null')]);
    const again = local('from-null-again.img');
    await runOk('nbdcopy', [a.uri('null'), again]);
    assertSameBytes(fs.readFileSync(again), Buffer.alloc(SIZE), 'null export after a write');
  });

  test('pattern -> file export: the backing file is the pattern', async () => {
    await runOk('nbdcopy', ['--flush', a.uri('pattern'), a.uri('file')]);
    assertSameBytes(fs.readFileSync(BACKING), patternBytes(0, SIZE), 'backing file');
  });

  test('between two exports of one server, and across two servers, sparseness kept', async () => {
    // A sparse source: seeded data in three places, holes between.
    const src = local('sparse.img');
    const data = Buffer.alloc(SIZE);
    const pieces: [number, number][] = [
      [0, MiB],
      [10 * MiB + 65536, 3 * MiB],
      [SIZE - 2 * MiB, 2 * MiB],
    ];
    for (const [off, len] of pieces) seededBytes(off, len).copy(data, off);
    fs.writeFileSync(src, data);
    // Start from non-zero destinations so that holes must be written as zeroes.
    await runOk('nbdcopy', [a.uri('pattern'), a.uri('mem2')]);
    await runOk('nbdcopy', [a.uri('pattern'), b.uri('other')]);

    await runOk('nbdcopy', ['--flush', src, a.uri('mem')]);
    await runOk('nbdcopy', ['--flush', a.uri('mem'), a.uri('mem2')]);
    await runOk('nbdcopy', ['--flush', a.uri('mem2'), b.uri('other')]);

    for (const [uri, what] of [
      [a.uri('mem2'), 'second export'],
      [b.uri('other'), 'second server'],
    ] as const) {
      const out = local('copy.img');
      await runOk('nbdcopy', [uri, out]);
      assertSameBytes(fs.readFileSync(out), data, what);
      fs.rmSync(out);
    }
    // nbdcopy zeroes the holes with WRITE_ZEROES (not writes of zeroes): the memory
    // export maps them as holes again.
    const want = await map(a.uri('mem'));
    assert.deepEqual(await map(a.uri('mem2')), want);
    assert.deepEqual(await map(b.uri('other')), want);
    assert.ok(want.some(([, , type]) => type === 3), 'the source has holes');
  });

  test('many connections and requests in flight, and the synchronous mode, copy the same bytes', async () => {
    const expected = patternBytes(0, SIZE);
    for (const opts of [
      ['--connections=4', '--requests=64', '--request-size=65536'],
      ['--connections=1', '--requests=1'],
      ['--synchronous'],
      ['--no-extents', '--request-size=33554432'],
    ]) {
      const out = local('opts.img');
      await runOk('nbdcopy', [...opts, '--flush', a.uri('pattern'), a.uri('mem2')]);
      await runOk('nbdcopy', [...opts, a.uri('mem2'), out]);
      assertSameBytes(fs.readFileSync(out), expected, opts.join(' '));
      fs.rmSync(out);
    }
  });

  test('a destination smaller than the source is refused before any copying', async () => {
    const r = await run('nbdcopy', [a.uri('pattern'), a.uri('small')]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /destination size is smaller than source size/);
  });

  test('a read-only export is seen as one: nbdcopy refuses to write to it', async () => {
    const r = await run('nbdcopy', [a.uri('mem'), a.uri('pattern')]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /the destination is read-only/);
  });
});
