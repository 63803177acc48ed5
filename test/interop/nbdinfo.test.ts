/**
 * Interop, libnbd's nbdinfo: the plain report, --list of several exports with their
 * descriptions, --map of a memory export written at known places (data, and hole,zero
 * around it), --json (parsed and checked field by field), --size, --can and --is.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { run, runOk, nbdsh } from '../helpers/run.js';
import { startServer, type CaptiveServer } from '../helpers/server.js';

const MiB = 1024 * 1024;
const KiB = 1024;
/** The memory backend allocates (and maps) in 64 KiB pages. */
const PAGE = 64 * KiB;

let srv: CaptiveServer;

before(async () => {
  srv = await startServer([
    { name: 'disk', backend: { type: 'memory', size: 16 * MiB }, description: 'main disk' },
    { name: 'pattern', backend: { type: 'pattern', size: MiB } },
    { name: 'void', backend: { type: 'null', size: 2 * MiB }, description: 'the void' },
    { name: 'ro', backend: { type: 'memory', size: MiB }, readOnly: true, description: 'read only' },
    { name: 'map', backend: { type: 'memory', size: 4 * MiB } },
  ]);
  // Known layout for --map: pages written at 0, 1 MiB (a few bytes inside the page),
  // 2 MiB (two pages), a page written at 3 MiB and then zeroed with NO_HOLE (the memory
  // backend needs no allocation to promise zeroes, so it reads back as a hole of zeroes),
  // and a page written then trimmed at 3.5 MiB (a hole again).
  await nbdsh(
    `
import os
h.connect_uri(os.environ['uri'])
h.pwrite(b'\\xaa' * ${PAGE}, 0)
h.pwrite(b'\\xbb' * 4096, ${MiB} + 100)
h.pwrite(b'\\xcc' * ${2 * PAGE}, ${2 * MiB})
h.pwrite(b'\\xee' * ${PAGE}, ${3 * MiB})
h.zero(${PAGE}, ${3 * MiB}, nbd.CMD_FLAG_NO_HOLE)
h.pwrite(b'\\xdd' * ${PAGE}, ${3.5 * MiB})
h.trim(${PAGE}, ${3.5 * MiB})
h.flush()
`,
    srv.uri('map'),
  );
});
after(async () => {
  await srv.close();
});

/** `key: value` lines of nbdinfo's plain report (tab-indented under `export=`). */
function fields(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^\t(\w[\w-]*): (.*)$/.exec(line);
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

/** The map of `nbdinfo --map` as [offset, length, type, description] rows. */
function parseMap(text: string): [number, number, number, string][] {
  return text
    .trim()
    .split('\n')
    .map((l) => {
      const m = /^\s*(\d+)\s+(\d+)\s+(\d+)\s+(.+)$/.exec(l);
      assert.ok(m, `unexpected --map line: ${l}`);
      return [Number(m[1]), Number(m[2]), Number(m[3]), m[4]!.trim()] as [number, number, number, string];
    });
}

const EXPECTED_MAP: [number, number, number, string][] = [
  [0, PAGE, 0, 'data'],
  [PAGE, MiB - PAGE, 3, 'hole,zero'],
  [MiB, PAGE, 0, 'data'],
  [MiB + PAGE, MiB - PAGE, 3, 'hole,zero'],
  [2 * MiB, 2 * PAGE, 0, 'data'],
  [2 * MiB + 2 * PAGE, 2 * MiB - 2 * PAGE, 3, 'hole,zero'],
];

describe('nbdinfo', () => {
  test('plain report: protocol, size, description, contexts, flags and block sizes', async () => {
    const r = await runOk('nbdinfo', [srv.uri('disk')]);
    assert.match(r.stdout, /^protocol: newstyle-fixed without TLS, using structured packets$/m);
    assert.match(r.stdout, /^export="disk":$/m);
    assert.match(r.stdout, /^\t\tbase:allocation$/m);
    const f = fields(r.stdout);
    assert.equal(f.description, 'main disk');
    assert.equal(f['export-size'], `${16 * MiB} (16M)`);
    for (const k of ['can_cache', 'can_df', 'can_fast_zero', 'can_flush', 'can_fua', 'can_multi_conn', 'can_trim', 'can_zero']) {
      assert.equal(f[k], 'true', k);
    }
    assert.equal(f.is_read_only, 'false');
    assert.equal(f.is_rotational, 'false');
    assert.equal(f.block_size_minimum, '1');
    assert.equal(f.block_size_preferred, '4096');
    assert.equal(f.block_size_maximum, String(32 * MiB));
  });

  test('plain report of a read-only export: no write-side flags', async () => {
    const f = fields((await runOk('nbdinfo', [srv.uri('ro')])).stdout);
    assert.equal(f.is_read_only, 'true');
    for (const k of ['can_fua', 'can_trim', 'can_zero', 'can_fast_zero']) assert.equal(f[k], 'false', k);
    assert.equal(f.can_flush, 'true');
    assert.equal(f.description, 'read only');
  });

  test('--list shows every export with its description and size', async () => {
    const r = await runOk('nbdinfo', ['--list', srv.uri('disk')]);
    const blocks = r.stdout.split(/^export=/m).slice(1);
    const seen = blocks.map((b) => {
      const name = /^"(.*)":/.exec(b)![1]!;
      const f = fields(b);
      return [name, f.description, Number(f['export-size']!.split(' ')[0])];
    });
    assert.deepEqual(seen, [
      ['disk', 'main disk', 16 * MiB],
      ['pattern', 'pattern 1MiB', MiB],
      ['void', 'the void', 2 * MiB],
      ['ro', 'read only', MiB],
      ['map', 'memory 4MiB', 4 * MiB],
    ]);
  });

  test('--list --json parses, with one entry per export', async () => {
    const r = await runOk('nbdinfo', ['--list', '--json', srv.uri('disk')]);
    const j = JSON.parse(r.stdout) as { protocol: string; exports: Record<string, unknown>[] };
    assert.equal(j.protocol, 'newstyle-fixed');
    assert.deepEqual(
      j.exports.map((e) => [e['export-name'], e.description, e['export-size'], e.is_read_only]),
      [
        ['disk', 'main disk', 16 * MiB, false],
        ['pattern', 'pattern 1MiB', MiB, true],
        ['void', 'the void', 2 * MiB, false],
        ['ro', 'read only', MiB, true],
        ['map', 'memory 4MiB', 4 * MiB, false],
      ],
    );
  });

  test('--json: every field of one export', async () => {
    const r = await runOk('nbdinfo', ['--json', srv.uri('pattern')]);
    const j = JSON.parse(r.stdout) as Record<string, unknown> & { exports: Record<string, unknown>[] };
    assert.equal(j.protocol, 'newstyle-fixed');
    assert.equal(j.TLS, false);
    assert.equal(j.structured, true);
    assert.equal(j.exports.length, 1);
    const e = j.exports[0]!;
    assert.equal(e['export-name'], 'pattern');
    assert.equal(e.description, 'pattern 1MiB');
    assert.equal(e['export-size'], MiB);
    assert.deepEqual(e.contexts, ['base:allocation']);
    assert.equal(e.uri, srv.uri('pattern').replace(/socket=.*/, `socket=${srv.socket}`));
    assert.deepEqual(
      {
        is_rotational: e.is_rotational,
        is_read_only: e.is_read_only,
        can_cache: e.can_cache,
        can_df: e.can_df,
        can_fast_zero: e.can_fast_zero,
        can_flush: e.can_flush,
        can_fua: e.can_fua,
        can_multi_conn: e.can_multi_conn,
        can_trim: e.can_trim,
        can_zero: e.can_zero,
        block_size_minimum: e.block_size_minimum,
        block_size_preferred: e.block_size_preferred,
        block_size_maximum: e.block_size_maximum,
      },
      {
        is_rotational: false,
        is_read_only: true,
        can_cache: true,
        can_df: true,
        can_fast_zero: false,
        can_flush: false,
        can_fua: false,
        can_multi_conn: true,
        can_trim: false,
        can_zero: false,
        block_size_minimum: 1,
        block_size_preferred: 4096,
        block_size_maximum: 32 * MiB,
      },
    );
  });

  test('--map of a memory export: data where it was written, hole,zero elsewhere', async () => {
    const r = await runOk('nbdinfo', ['--map', srv.uri('map')]);
    assert.deepEqual(parseMap(r.stdout), EXPECTED_MAP);
  });

  test('--map --json agrees, and --map --totals adds up', async () => {
    const j = JSON.parse((await runOk('nbdinfo', ['--map', '--json', srv.uri('map')])).stdout) as {
      offset: number;
      length: number;
      type: number;
      description: string;
    }[];
    assert.deepEqual(
      j.map((e) => [e.offset, e.length, e.type, e.description]),
      EXPECTED_MAP,
    );
    // --totals rows: bytes, percentage, type, description.
    const totals = (await runOk('nbdinfo', ['--map', '--totals', srv.uri('map')])).stdout
      .trim()
      .split('\n')
      .map((l) => l.trim().split(/\s+/));
    const data = 4 * PAGE;
    // Percentages are compared as numbers: C's printf rounds 6.25 to 6.2, JavaScript's toFixed to 6.3.
    assert.deepEqual(
      totals.map((r) => [r[0], r[2], r[3]]),
      [
        [String(data), '0', 'data'],
        [String(4 * MiB - data), '3', 'hole,zero'],
      ],
    );
    const pct = totals.map((r) => Number(r[1]!.replace('%', '')));
    assert.ok(Math.abs(pct[0]! - (100 * data) / (4 * MiB)) <= 0.051, `data ${pct[0]}%`);
    assert.ok(Math.abs(pct[1]! - (100 * (4 * MiB - data)) / (4 * MiB)) <= 0.051, `holes ${pct[1]}%`);
  });

  test('--map of exports without allocation data: one data extent (pattern), all zero (null)', async () => {
    assert.deepEqual(parseMap((await runOk('nbdinfo', ['--map', srv.uri('pattern')])).stdout), [[0, MiB, 0, 'data']]);
    assert.deepEqual(parseMap((await runOk('nbdinfo', ['--map', srv.uri('void')])).stdout), [
      [0, 2 * MiB, 3, 'hole,zero'],
    ]);
  });

  test('--size, --can and --is answer with the exit status', async () => {
    assert.equal((await runOk('nbdinfo', ['--size', srv.uri('void')])).stdout.trim(), String(2 * MiB));
    const cases: [string[], string, number][] = [
      [['--can', 'connect'], 'disk', 0],
      [['--can', 'write'], 'disk', 0],
      [['--can', 'write'], 'ro', 2],
      [['--can', 'flush'], 'pattern', 2],
      [['--can', 'fast-zero'], 'disk', 0],
      [['--can', 'df'], 'disk', 0],
      [['--can', 'multi-conn'], 'disk', 0],
      [['--can', 'structured-reply'], 'disk', 0],
      [['--is', 'read-only'], 'ro', 0],
      [['--is', 'read-only'], 'disk', 2],
      [['--is', 'rotational'], 'disk', 2],
    ];
    for (const [args, name, code] of cases) {
      const r = await run('nbdinfo', [...args, srv.uri(name)]);
      assert.equal(r.code, code, `nbdinfo ${args.join(' ')} ${name}: ${r.stderr}`);
    }
  });

  test('an unknown export is reported as an error', async () => {
    const r = await run('nbdinfo', [srv.uri('no-such-export')]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /nbdinfo: /);
  });
});
