/**
 * `blockgate map` against nbdinfo --map for the same servers (nbdkit memory written at
 * known places, nbdkit sparse-random, nbdkit eval with adjacent extents of one type,
 * blockgate serve): the text (byte for byte), --json (parsed), --totals; adjacent extents
 * of one type are merged as nbdinfo merges them (--raw does not); an unknown context
 * exits 1 with one line.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ChildSet, blockgateRun, type Child } from '../helpers/children.js';
import { nbdsh, runOk } from '../helpers/run.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-map-'));
const children = new ChildSet();
let n = 0;
const unixUri = (sock: string) => `nbd+unix:///?socket=${sock}`;

after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

async function socketReady(sock: string, child: Child): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (fs.existsSync(sock)) return;
    if (child.proc.exitCode !== null) throw new Error(`server exited: ${child.stderr()}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`no socket ${sock}; stderr: ${child.stderr()}`);
}

async function nbdkit(args: string[]): Promise<string> {
  const sock = path.join(tmp, `${n++}.sock`);
  const child = children.start('nbdkit', ['-f', '--exit-with-parent', '-U', sock, ...args]);
  await socketReady(sock, child);
  return unixUri(sock);
}

async function serve(exports: string[]): Promise<string> {
  const sock = path.join(tmp, `${n++}.sock`);
  const child = children.blockgate(['serve', '-U', sock, '--no-control', '--print-uri', '-l', 'warn', ...exports]);
  await child.waitFor(/nbd\+unix:\S+/);
  return unixUri(sock);
}

async function map(args: string[]): Promise<string> {
  const r = await blockgateRun(['map', ...args]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stderr, '');
  return r.stdout;
}

const nbdinfo = async (args: string[]) => (await runOk('nbdinfo', args)).stdout;

/** A layout with data, hole,zero, and a range zeroed with NO_HOLE (zero but allocated, or a hole: the server decides). */
const LAYOUT = `
import os
h.connect_uri(os.environ['uri'])
h.pwrite(b'\\xaa' * ${64 * KiB}, 0)
h.pwrite(b'\\xbb' * 4096, ${MiB} + 100)
h.pwrite(b'\\xcc' * ${128 * KiB}, ${2 * MiB})
h.pwrite(b'\\xee' * ${64 * KiB}, ${3 * MiB})
h.zero(${64 * KiB}, ${3 * MiB}, nbd.CMD_FLAG_NO_HOLE)
h.pwrite(b'\\xdd' * ${64 * KiB}, ${40 * MiB})
h.trim(${64 * KiB}, ${40 * MiB})
h.flush()
`;

describe('blockgate map', () => {
  const servers: Record<string, string> = {};
  before(async () => {
    const [mem, sparse, eva, bg] = await Promise.all([
      nbdkit(['memory', '64M']),
      nbdkit(['sparse-random', '64M', 'seed=5', 'percent=30', 'runlength=65536']),
      nbdkit([
        'eval',
        'get_size=echo 1048576',
        'pread=dd if=/dev/zero count=$3 iflag=count_bytes 2>/dev/null',
        'can_extents=exit 0',
        'extents=echo 0 65536; echo 65536 65536; echo 131072 65536 hole,zero; echo 196608 65536 hole,zero; echo 262144 786432',
      ]),
      serve(['memory:64M']),
    ]);
    servers.mem = mem;
    servers.sparse = sparse;
    servers.eval = eva;
    servers.bg = bg;
    await Promise.all([nbdsh(LAYOUT, mem), nbdsh(LAYOUT, bg)]);
  });

  for (const name of ['mem', 'sparse', 'eval', 'bg']) {
    test(`${name}: text and --json as nbdinfo --map prints them${name === 'mem' || name === 'sparse' ? ', and --totals' : ''}`, async () => {
      const uri = servers[name]!;
      const same = async (ours: string[], theirs: string[], json: boolean) => {
        const [a, b] = await Promise.all([map([...ours, uri]), nbdinfo([...theirs, uri])]);
        if (json) assert.deepEqual(JSON.parse(a), JSON.parse(b));
        else assert.equal(a, b);
      };
      await same([], ['--map'], false);
      await same(['--json'], ['--map', '--json'], true);
      if (name === 'mem' || name === 'sparse') {
        await same(['--totals'], ['--map', '--totals'], false);
        await same(['--totals', '--json'], ['--map', '--totals', '--json'], true);
      }
    });
  }

  test('the known layout of the memory export', async () => {
    const rows = JSON.parse(await map(['--json', servers.mem!])) as { offset: number; length: number; type: number; description: string }[];
    // Covers the export, in order, with no gaps.
    let pos = 0;
    for (const r of rows) {
      assert.equal(r.offset, pos);
      pos += r.length;
    }
    assert.equal(pos, 64 * MiB);
    const at = (off: number) => rows.find((r) => r.offset <= off && off < r.offset + r.length)!;
    assert.equal(at(0).description, 'data');
    assert.equal(at(MiB + 100).description, 'data');
    assert.equal(at(10 * MiB).description, 'hole,zero');
    assert.equal(at(40 * MiB).description, 'hole,zero', 'trimmed');
    assert.equal(at(3 * MiB).type & 2, 2, 'zeroed reads as zero');
  });

  test('--raw: the extents as sent; merging adjacent ones of one type gives the default map', async () => {
    // nbdkit coalesces adjacent extents itself, so this checks the relation, not a split.
    for (const name of ['sparse']) {
      const uri = servers[name]!;
      const raw = JSON.parse(await map(['--raw', '--json', uri])) as { offset: number; length: number; type: number }[];
      const merged: { offset: number; length: number; type: number }[] = [];
      for (const e of raw) {
        const last = merged[merged.length - 1];
        if (last && last.type === e.type) last.length += e.length;
        else merged.push({ offset: e.offset, length: e.length, type: e.type });
      }
      const plain = (JSON.parse(await map(['--json', uri])) as { offset: number; length: number; type: number }[]).map(({ offset, length, type }) => ({ offset, length, type }));
      assert.deepEqual(merged, plain, name);
    }
  });

  test('an unknown metadata context: exit 1, one line', async () => {
    const r = await blockgateRun(['map', '--context', 'qemu:dirty-bitmap:nope', servers.mem!]);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, '');
    assert.equal(r.stderr, 'blockgate map: the server does not support metadata context "qemu:dirty-bitmap:nope" (EOPNOTSUPP)\n');
  });
});
