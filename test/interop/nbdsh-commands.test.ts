/**
 * Interop, libnbd's nbdsh: every transmission command and its flags, with and without
 * structured replies, and the error replies of bad requests (libnbd's client-side
 * checks turned off with set_strict_mode(0) so that the server sees them).
 *
 * Data is deterministic: Python's random.Random with a fixed seed, and the offset
 * pattern of the pattern backend. Each test runs one nbdsh script that asserts on the
 * data itself and stores what it saw in `out` for the checks here.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PY_ERRNO_OF, PY_FILE_BYTES, PY_PATTERN, nbdshOut } from '../helpers/nbdsh-script.js';
import { startServer, type CaptiveServer } from '../helpers/server.js';

const MiB = 1024 * 1024;
const MEM_SIZE = 64 * MiB;
const FILE_SIZE = 8 * MiB;
const SMALL_SIZE = 4 * MiB;
/** The memory backend's allocation page: block status granularity of the memory export. */
const PAGE = 64 * 1024;

/** Python run before each script: connection and checking helpers. */
const PRELUDE = `
import hashlib, json, os, random, struct
out = {}
server_msgs = []
def _debug(ctx, msg):
    if 'server message: ' in msg:
        server_msgs.append(msg.split('server message: ', 1)[1])
h.set_debug_callback(_debug)
h.set_debug(True)
def connect(name, meta=True):
    if not SR:
        h.set_request_structured_replies(False)
    if meta:
        h.add_meta_context('base:allocation')
    h.connect_uri(URIS[name])
${PY_ERRNO_OF}
${PY_PATTERN}
def extents(off, n, flags=0):
    got = []
    def cb(meta, offset, entries, err):
        assert meta == 'base:allocation', meta
        got.extend([entries[i], entries[i + 1]] for i in range(0, len(entries), 2))
        return 0
    h.block_status(n, off, cb, flags)
    return got
${PY_FILE_BYTES}
`;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-interop-cmd-'));
const FILE_PATH = path.join(tmp, 'disk.img');
let srv: CaptiveServer;

before(async () => {
  srv = await startServer([
    { name: 'mem', backend: { type: 'memory', size: MEM_SIZE } },
    { name: 'file', backend: { type: 'file', path: FILE_PATH, size: FILE_SIZE, create: true } },
    { name: 'null', backend: { type: 'null', size: SMALL_SIZE } },
    { name: 'pattern', backend: { type: 'pattern', size: SMALL_SIZE } },
    { name: 'ro', backend: { type: 'memory', size: SMALL_SIZE }, readOnly: true },
    { name: 'filtered', backend: { type: 'memory', size: SMALL_SIZE }, filters: [{ type: 'readonly' }] },
  ]);
});
after(async () => {
  await srv.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** Runs a script with structured replies on or off; returns its `out`. */
async function py(sr: boolean, body: string): Promise<Record<string, unknown>> {
  const uris = Object.fromEntries(['mem', 'file', 'null', 'pattern', 'ro', 'filtered'].map((n) => [n, srv.uri(n)]));
  const head = `SR = ${sr ? 'True' : 'False'}\nURIS = ${JSON.stringify(uris)}\nFILE_PATH = ${JSON.stringify(FILE_PATH)}\n`;
  return nbdshOut(head + PRELUDE + body, srv.uri('mem'));
}

for (const sr of [true, false]) {
  describe(`nbdsh: commands, structured replies ${sr ? 'on' : 'off'}`, () => {
    test('pwrite/pread of seeded data at unaligned offsets and sizes, up to the 32 MiB maximum payload', async () => {
      const out = await py(
        sr,
        `
connect('mem')
rng = random.Random(${sr ? 1 : 2})
# Disjoint ranges inside [0, 34 MiB) and the last byte; other tests use [40 MiB, 64 MiB - 1).
cases = [(0, 1), (1, 4094), (4095, 4097), (65535, 131073), (${MEM_SIZE} - 1, 1), (1048576 + 7, 32 * 1048576)]
written = []
for off, n in cases:
    data = rng.randbytes(n)
    h.pwrite(data, off)
    written.append((off, data))
ok = []
for off, data in written:
    ok.append(h.pread(len(data), off) == data)
out['ok'] = ok
out['sr'] = h.get_structured_replies_negotiated()
`,
      );
      assert.deepEqual(out.ok, [true, true, true, true, true, true]);
      assert.equal(out.sr, sr);
    });

    test('FUA writes and zeroes are in the file when acknowledged; FLUSH covers plain writes', async () => {
      const out = await py(
        sr,
        `
connect('file')
rng = random.Random(${sr ? 3 : 4})
a = rng.randbytes(10000)
h.pwrite(a, 12345, nbd.CMD_FLAG_FUA)
out['fua_write'] = file_bytes(FILE_PATH, 12345, len(a)) == a
h.zero(4096, 12345 + 100, nbd.CMD_FLAG_FUA)
out['fua_zero'] = file_bytes(FILE_PATH, 12345, len(a)) == a[:100] + bytes(4096) + a[4196:]
b = rng.randbytes(70000)
h.pwrite(b, 1048576 + 3)
h.flush()
out['flush'] = file_bytes(FILE_PATH, 1048576 + 3, len(b)) == b
out['readback'] = h.pread(len(b), 1048576 + 3) == b
`,
      );
      assert.deepEqual(out, { fua_write: true, fua_zero: true, flush: true, readback: true });
    });

    test('TRIM: succeeds, leaves the data around it intact; on memory whole pages read back zero', async () => {
      const out = await py(
        sr,
        `
connect('mem')
base = 40 * 1048576
data = random.Random(5).randbytes(4 * ${PAGE})
h.pwrite(data, base)
h.trim(2 * ${PAGE}, base + ${PAGE})
got = h.pread(len(data), base)
out['head'] = got[:${PAGE}] == data[:${PAGE}]
out['tail'] = got[3 * ${PAGE}:] == data[3 * ${PAGE}:]
out['trimmed_zero'] = got[${PAGE}:3 * ${PAGE}] == bytes(2 * ${PAGE})
h.trim(100, base + 5, nbd.CMD_FLAG_FUA)
`,
      );
      assert.deepEqual(out, { head: true, tail: true, trimmed_zero: true });
    });

    test('WRITE_ZEROES plain, NO_HOLE, FAST_ZERO and FUA all read back zero; neighbours intact', async () => {
      const out = await py(
        sr,
        `
connect('mem')
base = 44 * 1048576
data = random.Random(6).randbytes(8 * ${PAGE})
res = {}
for name, off, n, fl in [('plain', 100, 5000, 0),
                         ('no_hole', ${PAGE}, ${PAGE}, nbd.CMD_FLAG_NO_HOLE),
                         ('fast', 2 * ${PAGE}, 2 * ${PAGE}, nbd.CMD_FLAG_FAST_ZERO),
                         ('fua', 4 * ${PAGE} + 1, ${PAGE}, nbd.CMD_FLAG_FUA),
                         ('all', 6 * ${PAGE}, ${PAGE}, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)]:
    h.pwrite(data, base)
    h.zero(n, base + off, fl)
    got = h.pread(len(data), base)
    res[name] = got == data[:off] + bytes(n) + data[off + n:]
out['res'] = res
if SR:
    # Whole pages zeroed read as a hole of zeroes, with or without NO_HOLE: the memory
    # backend needs no allocation to promise zeroes (a NO_HOLE request cannot claim RAM).
    h.pwrite(data, base)
    h.zero(2 * ${PAGE}, base, 0)
    h.zero(2 * ${PAGE}, base + 2 * ${PAGE}, nbd.CMD_FLAG_NO_HOLE)
    out['extents'] = extents(base, 4 * ${PAGE})
`,
      );
      assert.deepEqual(out.res, { plain: true, no_hole: true, fast: true, fua: true, all: true });
      if (sr) {
        assert.deepEqual(out.extents, [[4 * PAGE, 3]]);
      }
    });

    test('FAST_ZERO where it is not advertised (file backend) is refused, and no data changes', async () => {
      const out = await py(
        sr,
        `
connect('file')
out['can_fast_zero'] = h.can_fast_zero()
data = random.Random(7).randbytes(8192)
h.pwrite(data, 4 * 1048576)
h.set_strict_mode(0)
out['err'] = errno_of(lambda: h.zero(8192, 4 * 1048576, nbd.CMD_FLAG_FAST_ZERO))
out['intact'] = h.pread(8192, 4 * 1048576) == data
`,
      );
      assert.deepEqual(out, { can_fast_zero: false, err: 'EINVAL', intact: true });
    });

    test('CACHE succeeds (with FUA too where FUA is advertised) and changes nothing', async () => {
      const out = await py(
        sr,
        `
connect('pattern')
h.cache(1048576, 12345)
out['data'] = h.pread(4096, 12345) == pattern(12345, 4096)
g = nbd.NBD()
g.connect_uri(URIS['mem'])
g.pwrite(b'cached', 52 * 1048576)
g.set_strict_mode(0)
g.cache(100, 52 * 1048576 - 50, nbd.CMD_FLAG_FUA)
out['mem'] = g.pread(6, 52 * 1048576).decode()
`,
      );
      assert.deepEqual(out, { data: true, mem: 'cached' });
    });

    test('FLUSH on every export that advertises it, including read-only ones', async () => {
      const out = await py(
        sr,
        `
res = {}
for name in ['mem', 'file', 'null', 'ro', 'filtered', 'pattern']:
    g = nbd.NBD()
    if not SR:
        g.set_request_structured_replies(False)
    g.connect_uri(URIS[name])
    if g.can_flush():
        g.flush()
        res[name] = 'flushed'
    else:
        res[name] = 'no flush'
    g.shutdown()
out['res'] = res
`,
      );
      assert.deepEqual(out.res, {
        mem: 'flushed',
        file: 'flushed',
        null: 'flushed',
        ro: 'flushed',
        filtered: 'flushed',
        pattern: 'no flush',
      });
    });

    test('the pattern and null backends read what they define; null swallows writes', async () => {
      const out = await py(
        sr,
        `
connect('pattern')
res = {}
for off, n in [(0, 8), (3, 61), (4095, 70001), (${SMALL_SIZE} - 13, 13)]:
    res['%d+%d' % (off, n)] = h.pread(n, off) == pattern(off, n)
out['pattern'] = res
g = nbd.NBD()
if not SR:
    g.set_request_structured_replies(False)
g.connect_uri(URIS['null'])
g.pwrite(b'\\xff' * 100000, 1000)
g.zero(5000, 0, nbd.CMD_FLAG_NO_HOLE)
g.trim(5000, 0)
out['null'] = g.pread(200000, 0) == bytes(200000)
`,
      );
      assert.deepEqual(out.pattern, { '0+8': true, '3+61': true, '4095+70001': true, [`${SMALL_SIZE - 13}+13`]: true });
      assert.equal(out.null, true);
    });

    test('shutdown (NBD_CMD_DISC) closes the connection cleanly', async () => {
      const out = await py(
        sr,
        `
connect('mem')
h.pwrite(b'bye', 0)
h.shutdown()
out['closed'] = h.aio_is_closed()
out['dead'] = h.aio_is_dead()
g = nbd.NBD()
g.connect_uri(URIS['mem'])
out['persisted'] = g.pread(3, 0).decode()
`,
      );
      assert.deepEqual(out, { closed: true, dead: false, persisted: 'bye' });
    });

    test('requests past the end: EINVAL for read, trim, cache, block status; ENOSPC for write and zero', async () => {
      const out = await py(
        sr,
        `
connect('mem')
h.set_strict_mode(0)
end = h.get_size()
tail = h.pread(5, end - 5)
res = {}
res['read'] = errno_of(lambda: h.pread(10, end - 5))
res['read_beyond'] = errno_of(lambda: h.pread(1, end))
res['write'] = errno_of(lambda: h.pwrite(b'x' * 10, end - 5))
res['trim'] = errno_of(lambda: h.trim(10, end - 5))
res['zero'] = errno_of(lambda: h.zero(10, end - 5))
res['cache'] = errno_of(lambda: h.cache(10, end - 5))
if SR:
    res['block_status'] = errno_of(lambda: extents(end, 1))
out['res'] = res
out['msgs'] = server_msgs
# The connection survives every one of them, and nothing was written.
out['tail'] = h.pread(5, end - 5) == tail
`,
      );
      const want: Record<string, string> = {
        read: 'EINVAL',
        read_beyond: 'EINVAL',
        write: 'ENOSPC',
        trim: 'EINVAL',
        zero: 'ENOSPC',
        cache: 'EINVAL',
      };
      if (sr) want.block_status = 'EINVAL';
      assert.deepEqual(out.res, want);
      assert.equal(out.tail, true);
      const msgs = out.msgs as string[];
      if (sr) {
        // Each error reply carries the server's message (structured ERROR chunks).
        assert.equal(msgs.length, Object.keys(want).length, JSON.stringify(msgs));
        for (const m of msgs) assert.match(m, /NBD_CMD_\w+: /);
      } else {
        assert.deepEqual(msgs, []); // simple replies have no room for a message
      }
    });

    test('read-only exports: WRITE, TRIM and WRITE_ZEROES get EPERM, data unchanged', async () => {
      const out = await py(
        sr,
        `
res = {}
for name in ['ro', 'filtered', 'pattern']:
    g = nbd.NBD()
    if not SR:
        g.set_request_structured_replies(False)
    g.connect_uri(URIS[name])
    g.set_strict_mode(0)
    before = g.pread(4096, 0)
    res[name] = [g.is_read_only(),
                 errno_of(lambda: g.pwrite(b'x' * 4096, 0)),
                 errno_of(lambda: g.pwrite(b'x', 0, nbd.CMD_FLAG_FUA)),
                 errno_of(lambda: g.trim(4096, 0)),
                 errno_of(lambda: g.zero(4096, 0)),
                 g.pread(4096, 0) == before]
    g.shutdown()
out['res'] = res
connect('ro')
h.set_strict_mode(0)
errno_of(lambda: h.pwrite(b'x', 0))
out['msgs'] = server_msgs
`,
      );
      // FUA is not advertised on a read-only export, so that flag alone is already invalid.
      const row = [true, 'EPERM', 'EINVAL', 'EPERM', 'EPERM', true];
      assert.deepEqual(out.res, { ro: row, filtered: row, pattern: row });
      if (sr) assert.deepEqual(out.msgs, ['the export is read-only']);
    });

    test('unknown flags and flags a command does not take get EINVAL; FUA is accepted on every command', async () => {
      const out = await py(
        sr,
        `
connect('mem')
h.set_strict_mode(0)
h.pwrite(b'flags!', 0)
res = {}
res['read_unknown'] = errno_of(lambda: h.pread(6, 0, 0x8000))
res['read_no_hole'] = errno_of(lambda: h.pread(6, 0, nbd.CMD_FLAG_NO_HOLE))
res['write_req_one'] = errno_of(lambda: h.pwrite(b'zzzzzz', 0, nbd.CMD_FLAG_REQ_ONE))
res['write_df'] = errno_of(lambda: h.pwrite(b'zzzzzz', 0, nbd.CMD_FLAG_DF))
res['trim_no_hole'] = errno_of(lambda: h.trim(6, 0, nbd.CMD_FLAG_NO_HOLE))
res['cache_unknown'] = errno_of(lambda: h.cache(6, 0, 0x40))
res['flush_unknown'] = errno_of(lambda: h.flush(0x100))
res['zero_df'] = errno_of(lambda: h.zero(6, 0, nbd.CMD_FLAG_DF))
res['read_fua'] = errno_of(lambda: h.pread(6, 0, nbd.CMD_FLAG_FUA))
res['cache_fua'] = errno_of(lambda: h.cache(6, 0, nbd.CMD_FLAG_FUA))
res['flush_fua'] = errno_of(lambda: h.flush(nbd.CMD_FLAG_FUA))
if SR:
    res['bs_fua'] = errno_of(lambda: extents(0, 6, nbd.CMD_FLAG_FUA))
    res['bs_df'] = errno_of(lambda: extents(0, 6, nbd.CMD_FLAG_DF))
out['res'] = res
out['intact'] = h.pread(6, 0).decode()
`,
      );
      const want: Record<string, string | null> = {
        read_unknown: 'EINVAL',
        read_no_hole: 'EINVAL',
        write_req_one: 'EINVAL',
        write_df: 'EINVAL',
        trim_no_hole: 'EINVAL',
        cache_unknown: 'EINVAL',
        flush_unknown: 'EINVAL',
        zero_df: 'EINVAL',
        read_fua: null,
        cache_fua: null,
        flush_fua: null,
      };
      if (sr) Object.assign(want, { bs_fua: null, bs_df: 'EINVAL' });
      assert.deepEqual(out.res, want);
      assert.equal(out.intact, 'flags!');
    });

    test('BLOCK_STATUS without a selected metadata context gets EINVAL; the session goes on', async () => {
      const out = await py(
        sr,
        `
connect('mem', meta=False)
h.set_strict_mode(0)
out['can'] = h.can_meta_context('base:allocation')
out['err'] = errno_of(lambda: h.block_status(4096, 0, lambda *a: 0))
out['msgs'] = server_msgs
h.pwrite(b'alive', 0)
out['alive'] = h.pread(5, 0).decode()
`,
      );
      assert.equal(out.can, false);
      assert.equal(out.err, 'EINVAL');
      assert.equal(out.alive, 'alive');
      if (sr) assert.deepEqual(out.msgs, ['no metadata context was selected (SET_META_CONTEXT)']);
    });

    if (sr) {
      test('BLOCK_STATUS base:allocation: data and holes where they were written, REQ_ONE gives one extent', async () => {
        const out = await py(
          true,
          `
connect('mem')
base = 48 * 1048576
h.pwrite(b'\\x01' * 100, base + ${PAGE} + 5)
h.pwrite(b'\\x02' * (2 * ${PAGE}), base + 3 * ${PAGE})
out['all'] = extents(base, 8 * ${PAGE})
out['one'] = extents(base, 8 * ${PAGE}, nbd.CMD_FLAG_REQ_ONE)
out['one_in_data'] = extents(base + 3 * ${PAGE} + 10, 8 * ${PAGE}, nbd.CMD_FLAG_REQ_ONE)
out['short'] = extents(base + ${PAGE} + 1, 10, nbd.CMD_FLAG_REQ_ONE)
h.set_strict_mode(0)
g = nbd.NBD()
g.add_meta_context('base:allocation')
g.connect_uri(URIS['pattern'])
got = []
g.block_status(${SMALL_SIZE}, 0, lambda m, o, e, err: got.extend(e) or 0)
out['pattern'] = got
`,
        );
        assert.deepEqual(out.all, [
          [PAGE, 3],
          [PAGE, 0],
          [PAGE, 3],
          [2 * PAGE, 0],
          [3 * PAGE, 3],
        ]);
        assert.deepEqual(out.one, [[PAGE, 3]]);
        assert.deepEqual(out.one_in_data, [[2 * PAGE - 10, 0]]);
        assert.deepEqual(out.short, [[10, 0]]);
        // No allocation information: one data extent over the whole request.
        assert.deepEqual(out.pattern, [SMALL_SIZE, 0]);
      });
    }
  });
}
