/**
 * Conformance, through a real client: one test per MUST of the NBD specification
 * (docs/reference nbd.md section 1) that libnbd can observe. The test names quote the
 * requirement. Requirements only checkable with hand-made bytes (unknown options and
 * client flags, malformed requests, extended headers) are tested at the byte level in
 * test/server/, not here.
 *
 * libnbd's debug log names the reply path it took for every reply (simple or
 * structured), which is how the framing MUSTs are checked without a packet capture.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PY_ERRNO_OF, PY_FILE_BYTES, PY_PATTERN, nbdshOut } from '../helpers/nbdsh-script.js';
import { startServer, type CaptiveServer } from '../helpers/server.js';

const MiB = 1024 * 1024;
/** The memory backend's allocation page: sparse reads and extents have this granularity. */
const PAGE = 64 * 1024;
/** The largest payload the server advertises (NBD_INFO_BLOCK_SIZE maximum). */
const MAX_PAYLOAD = 32 * MiB;

const PRELUDE = `
import json, os, random, struct
out = {}
server_msgs = []
replies = []
def _debug(ctx, msg):
    if 'server message: ' in msg:
        server_msgs.append(msg.split('server message: ', 1)[1])
    if msg.startswith('transition: REPLY.CHECK_SIMPLE_OR_STRUCTURED_REPLY -> '):
        replies.append(msg.split(' -> ')[1].split('.')[1])
def handle(name, sr=True, meta=True, debug=True):
    g = nbd.NBD()
    if debug:
        g.set_debug_callback(_debug)
        g.set_debug(True)
    if not sr:
        g.set_request_structured_replies(False)
    if meta:
        g.add_meta_context('base:allocation')
    g.connect_uri(URIS[name])
    return g
${PY_ERRNO_OF}
${PY_PATTERN}
def chunks(g, n, off, flags=0):
    got = []
    def cb(buf, offset, status, err):
        got.append([offset, len(buf), 'data' if status == nbd.READ_DATA else 'hole' if status == nbd.READ_HOLE else status, bytes(buf)])
        return 0
    g.pread_structured(n, off, cb, flags)
    return got
def extents(g, off, n, flags=0):
    got = []
    def cb(meta, offset, entries, err):
        got.extend([entries[i], entries[i + 1]] for i in range(0, len(entries), 2))
        return 0
    g.block_status(n, off, cb, flags)
    return got
${PY_FILE_BYTES}
`;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-interop-must-'));
const FILE_PATH = path.join(tmp, 'disk.img');
const NAMES = ['mem', 'mem2', 'file', 'null', 'pattern', 'ro', 'filtered'] as const;
let srv: CaptiveServer;

before(async () => {
  srv = await startServer([
    { name: 'mem', backend: { type: 'memory', size: 64 * MiB } },
    { name: 'mem2', backend: { type: 'memory', size: 16 * MiB } },
    { name: 'file', backend: { type: 'file', path: FILE_PATH, size: 16 * MiB, create: true } },
    { name: 'null', backend: { type: 'null', size: 16 * MiB } },
    { name: 'pattern', backend: { type: 'pattern', size: 16 * MiB } },
    { name: 'ro', backend: { type: 'memory', size: MiB }, readOnly: true },
    { name: 'filtered', backend: { type: 'file', path: FILE_PATH }, filters: [{ type: 'readonly' }] },
  ]);
});
after(async () => {
  await srv.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

async function py(body: string): Promise<Record<string, unknown>> {
  const uris = Object.fromEntries(NAMES.map((n) => [n, srv.uri(n)]));
  const head = `URIS = ${JSON.stringify(uris)}\nFILE_PATH = ${JSON.stringify(FILE_PATH)}\n`;
  return nbdshOut(head + PRELUDE + body, srv.uri('mem'));
}

describe('conformance (nbd.md section 1), seen by libnbd', () => {
  // ---- 1.2 handshake -------------------------------------------------------------

  test('MUST: a fixed-newstyle server sets NBD_FLAG_FIXED_NEWSTYLE (1.2)', async () => {
    const out = await py(`g = handle('mem')\nout['protocol'] = g.get_protocol()`);
    assert.equal(out.protocol, 'newstyle-fixed');
  });

  test('MUST: INFO and GO replies include NBD_INFO_EXPORT before the ACK (1.2, 1.3)', async () => {
    // libnbd fails INFO/GO that end without NBD_INFO_EXPORT; size and flags prove it came.
    const out = await py(`
g = nbd.NBD()
g.set_opt_mode(True)
g.connect_uri(URIS['mem'])
res = []
for name in ['mem', 'pattern', 'null']:
    g.set_export_name(name)
    g.opt_info()
    res.append([name, g.get_size(), g.is_read_only()])
out['res'] = res
`);
    assert.deepEqual(out.res, [
      ['mem', 64 * MiB, false],
      ['pattern', 16 * MiB, true],
      ['null', 16 * MiB, false],
    ]);
  });

  // ---- 1.3 options ---------------------------------------------------------------

  test('MUST: GO right after a successful INFO with the same parameters returns the same information (1.3)', async () => {
    const out = await py(`
def info(g):
    return [g.get_size(), g.is_read_only(), g.can_flush(), g.can_fua(), g.can_trim(), g.can_zero(),
            g.can_fast_zero(), g.can_cache(), g.can_df(), g.can_multi_conn(), g.is_rotational(),
            g.get_block_size(nbd.SIZE_MINIMUM), g.get_block_size(nbd.SIZE_PREFERRED),
            g.get_block_size(nbd.SIZE_MAXIMUM), g.get_canonical_export_name(), g.get_export_description()]
res = {}
for name in ['mem', 'file', 'pattern', 'ro', 'filtered']:
    g = nbd.NBD()
    g.set_opt_mode(True)
    g.set_full_info(True)
    g.connect_uri(URIS[name])
    g.opt_info()
    a = info(g)
    g.opt_go()
    res[name] = [a, info(g)]
    g.shutdown()
out['res'] = res
`);
    for (const [name, [info, go]] of Object.entries(out.res as Record<string, [unknown[], unknown[]]>)) {
      assert.deepEqual(go, info, name);
    }
  });

  test('MUST: NBD_OPT_ABORT is answered and the session ends in a soft disconnect (1.3, 1.11)', async () => {
    const out = await py(`
g = nbd.NBD()
g.set_opt_mode(True)
g.connect_uri(URIS['mem'])
g.opt_abort()
out['state'] = [g.aio_is_closed(), g.aio_is_dead()]
# The server is fine afterwards.
out['next'] = handle('mem').get_size()
`);
    assert.deepEqual(out.state, [true, false]);
    assert.equal(out.next, 64 * MiB);
  });

  test('MUST: after NBD_OPT_STRUCTURED_REPLY is acknowledged, READ never gets a simple reply, not even an error (1.3, 1.6)', async () => {
    const out = await py(`
g = handle('mem')
g.set_strict_mode(0)
g.pwrite(b'x' * 100000, 0)
replies.clear()
g.pread(100000, 0)                                    # data
g.pread(4 * ${PAGE}, 8 * ${PAGE})                     # all hole
g.pread(4096, 0, nbd.CMD_FLAG_DF)                     # DF
g.pread(0, 0)                                         # zero length
errs = [errno_of(lambda: g.pread(10, g.get_size())),  # out of range
        errno_of(lambda: g.pread(10, 0, 0x8000))]     # unknown flag
out['read_replies'] = replies[:]
out['errs'] = errs
replies.clear()
g.flush()
out['flush_replies'] = replies[:]
`);
    assert.deepEqual(out.read_replies, Array(6).fill('STRUCTURED_REPLY'));
    assert.deepEqual(out.errs, ['EINVAL', 'EINVAL']);
    // Other commands MAY still get simple replies; whichever is used, it is one reply.
    assert.equal((out.flush_replies as string[]).length, 1);
  });

  test('MUST: without structured replies the server uses only simple replies (1.5, transmission)', async () => {
    const out = await py(`
g = handle('mem', sr=False, meta=False)
g.set_strict_mode(0)
replies.clear()
g.pwrite(b'y' * 70000, 0)
g.pread(70000, 0)
g.pread(4 * ${PAGE}, 8 * ${PAGE})
g.flush()
g.zero(100, 0)
g.trim(${PAGE}, ${PAGE})
g.cache(10, 0)
errno_of(lambda: g.pread(10, g.get_size()))
errno_of(lambda: g.block_status(10, 0, lambda *a: 0))
out['replies'] = replies[:]
out['msgs'] = server_msgs
`);
    assert.deepEqual(out.replies, Array(9).fill('SIMPLE_REPLY'));
    assert.deepEqual(out.msgs, []);
  });

  test('MUST: LIST_META_CONTEXT with no queries lists every context (1.3)', async () => {
    const out = await py(`
g = nbd.NBD()
g.set_opt_mode(True)
g.connect_uri(URIS['mem'])
got = []
g.opt_list_meta_context(lambda c: got.append(c))
out['got'] = got
`);
    assert.deepEqual(out.got, ['base:allocation']);
  });

  test('MUST: "base:" is a wildcard for LIST_META_CONTEXT and is ignored by SET_META_CONTEXT (1.8)', async () => {
    const out = await py(`
g = nbd.NBD()
g.set_opt_mode(True)
g.add_meta_context('base:')
g.connect_uri(URIS['mem'])
got = []
g.opt_list_meta_context(lambda c: got.append(c))
out['list'] = got
g.opt_go()
out['set'] = g.can_meta_context('base:allocation')
`);
    assert.deepEqual(out.list, ['base:allocation']);
    assert.equal(out.set, false);
  });

  test('MUST: an unknown leaf in the base: namespace is ignored, not an error (1.8)', async () => {
    const out = await py(`
g = nbd.NBD()
g.set_opt_mode(True)
g.add_meta_context('base:no-such-leaf')
g.connect_uri(URIS['mem'])
got = []
out['count'] = g.opt_list_meta_context(lambda c: got.append(c))
g.add_meta_context('base:allocation')
g.opt_go()
out['set'] = g.can_meta_context('base:allocation')
out['extents'] = extents(g, 60 * 1048576, ${PAGE})
`);
    assert.equal(out.count, 0);
    assert.equal(out.set, true);
    assert.deepEqual(out.extents, [[PAGE, 3]]);
  });

  // ---- 1.4 transmission flags -------------------------------------------------------

  test('MUST: NBD_FLAG_HAS_FLAGS is set (libnbd ignores every other flag without it) (1.4)', async () => {
    const out = await py(`g = handle('mem')\nout['flags'] = [g.can_flush(), g.can_fua(), g.can_trim(), g.can_multi_conn()]`);
    assert.deepEqual(out.flags, [true, true, true, true]);
  });

  test('MUST: a READ_ONLY export errors every write, trim and zero, and nothing changes (1.4)', async () => {
    const out = await py(`
res = {}
for name in ['ro', 'filtered', 'pattern']:
    g = handle(name)
    g.set_strict_mode(0)
    before = g.pread(8192, 0)
    res[name] = [g.is_read_only(), errno_of(lambda: g.pwrite(b'w' * 8192, 0)), errno_of(lambda: g.trim(8192, 0)),
                 errno_of(lambda: g.zero(8192, 0)), g.pread(8192, 0) == before]
out['res'] = res
`);
    const row = [true, 'EPERM', 'EPERM', 'EPERM', true];
    assert.deepEqual(out.res, { ro: row, filtered: row, pattern: row });
  });

  test('MUST: NBD_FLAG_SEND_DF is clear without structured replies (1.4)', async () => {
    const out = await py(`
out['df'] = {name: [handle(name, sr=False, meta=False).can_df(), handle(name).can_df()] for name in ['mem', 'file', 'pattern', 'ro']}
`);
    assert.deepEqual(out.df, { mem: [false, true], file: [false, true], pattern: [false, true], ro: [false, true] });
  });

  test('MUST: NBD_FLAG_SEND_FAST_ZERO is clear when WRITE_ZEROES is not advertised (1.4)', async () => {
    const out = await py(`
res = {}
for name in ${JSON.stringify(NAMES)}:
    g = handle(name, debug=False)
    res[name] = [g.can_zero(), g.can_fast_zero()]
out['res'] = res
`);
    for (const [name, [zero, fast]] of Object.entries(out.res as Record<string, [boolean, boolean]>)) {
      assert.ok(zero || !fast, `${name}: FAST_ZERO advertised without WRITE_ZEROES`);
    }
    assert.deepEqual((out.res as Record<string, unknown>).ro, [false, false]);
  });

  test('MUST: with CAN_MULTI_CONN, FLUSH and FUA effects are visible on every connection when replied (1.4, 1.10)', async () => {
    const out = await py(`
res = {}
for name in ['mem', 'file']:
    a, b, c = handle(name), handle(name), handle(name)
    assert a.can_multi_conn()
    rng = random.Random(name)
    x = rng.randbytes(100000)
    a.pwrite(x, 3 * 1048576 + 1)
    a.flush()
    y = rng.randbytes(5000)
    b.pwrite(y, 5 * 1048576 + 3, nbd.CMD_FLAG_FUA)
    res[name] = [b.pread(len(x), 3 * 1048576 + 1) == x, c.pread(len(x), 3 * 1048576 + 1) == x,
                 a.pread(len(y), 5 * 1048576 + 3) == y, c.pread(len(y), 5 * 1048576 + 3) == y]
out['res'] = res
`);
    assert.deepEqual(out.res, { mem: [true, true, true, true], file: [true, true, true, true] });
  });

  test('MUST: with SEND_CACHE advertised, CACHE with an unknown flag is rejected (1.5)', async () => {
    const out = await py(`
g = handle('mem')
g.set_strict_mode(0)
out['can'] = g.can_cache()
out['ok'] = errno_of(lambda: g.cache(4096, 0))
out['bad'] = errno_of(lambda: g.cache(4096, 0, 0x400))
`);
    assert.deepEqual(out, { can: true, ok: null, bad: 'EINVAL' });
  });

  // ---- 1.5 transmission ---------------------------------------------------------------

  test('MUST: every reply echoes its request\'s cookie (many concurrent reads, each gets its own data) (1.5)', async () => {
    const out = await py(`
g = handle('file')
g.pwrite(pattern(0, 8 * 1048576), 0)
rng = random.Random(42)
reqs = []
order = []
for i in range(200):
    n = rng.choice([1, 512, 4096, 65536, 1048576, rng.randrange(1, 300000)])
    off = rng.randrange(0, 8 * 1048576 - n)
    buf = nbd.Buffer(n)
    cookie = g.aio_pread(buf, off, lambda err, i=i: order.append(i) or 0)
    reqs.append((cookie, buf, off, n))
while g.aio_in_flight() > 0:
    g.poll(-1)
out['ok'] = [g.aio_command_completed(c) and buf.to_bytearray() == pattern(off, n) for c, buf, off, n in reqs].count(True)
out['completed'] = len(order)
out['reordered'] = order != sorted(order)
`);
    assert.equal(out.ok, 200);
    assert.equal(out.completed, 200);
    // Whether replies came out of order depends on timing; the cookies made it safe either way.
    assert.equal(typeof out.reordered, 'boolean');
  });

  test('MUST: a failed WRITE gets an error, not success (1.5)', async () => {
    const out = await py(`
g = handle('mem')
g.set_strict_mode(0)
out['err'] = errno_of(lambda: g.pwrite(b'z' * 4096, g.get_size() - 100))
out['msgs'] = server_msgs
`);
    assert.equal(out.err, 'ENOSPC');
    assert.equal((out.msgs as string[]).length, 1);
  });

  test('MUST: on NBD_CMD_DISC the server finishes every outstanding request before closing (1.5)', async () => {
    const out = await py(`
g = handle('mem2')
cookies = [g.aio_pwrite(bytes([i + 1]) * 65536, i * 65536) for i in range(128)]
g.aio_disconnect(0)
while not (g.aio_is_closed() or g.aio_is_dead()):
    g.poll(-1)
out['state'] = [g.aio_is_closed(), g.aio_is_dead()]
out['completed'] = [g.aio_command_completed(c) for c in cookies].count(True)
r = handle('mem2')
out['landed'] = [r.pread(65536, i * 65536) == bytes([i + 1]) * 65536 for i in range(128)].count(True)
`);
    assert.deepEqual(out.state, [true, false]);
    assert.equal(out.completed, 128);
    assert.equal(out.landed, 128);
  });

  test('MUST: FLUSH is not acknowledged before the writes replied to are in the backing store (1.5, 1.10)', async () => {
    const out = await py(`
g = handle('file')
rng = random.Random(7)
writes = [(rng.randrange(0, 15 * 1048576), rng.randbytes(rng.randrange(1, 200000))) for _ in range(20)]
for off, data in writes:
    g.pwrite(data, off)
g.zero(65536, 15 * 1048576 + 5)
g.flush()
ok = []
expect = bytearray(file_bytes(FILE_PATH, 0, 16 * 1048576))
for off, data in writes:
    expect[off:off + len(data)] = data
out['zero'] = file_bytes(FILE_PATH, 15 * 1048576 + 5, 65536) == bytes(65536)
out['last_writer'] = g.pread(16 * 1048576 - 1, 0) == file_bytes(FILE_PATH, 0, 16 * 1048576 - 1)
out['writes'] = all(file_bytes(FILE_PATH, off, len(d)) == bytes(expect[off:off + len(d)]) for off, d in writes)
`);
    assert.deepEqual(out, { zero: true, last_writer: true, writes: true });
  });

  test('MUST: a FUA write or zero is not replied to before its data is in the backing store (1.10)', async () => {
    const out = await py(`
g = handle('file')
x = random.Random(8).randbytes(123457)
g.pwrite(x, 2 * 1048576 + 11, nbd.CMD_FLAG_FUA)
out['write'] = file_bytes(FILE_PATH, 2 * 1048576 + 11, len(x)) == x
g.zero(1000, 2 * 1048576 + 20, nbd.CMD_FLAG_FUA)
out['zero'] = file_bytes(FILE_PATH, 2 * 1048576 + 20, 1000) == bytes(1000)
`);
    assert.deepEqual(out, { write: true, zero: true });
  });

  test('MUST: WRITE_ZEROES reads back as zero, with or without NO_HOLE and FAST_ZERO (1.5)', async () => {
    const out = await py(`
res = {}
for name in ['mem', 'file', 'null']:
    g = handle(name)
    for fl in [0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO, nbd.CMD_FLAG_FUA]:
        if fl == nbd.CMD_FLAG_FAST_ZERO and not g.can_fast_zero():
            continue
        g.pwrite(b'\\x5a' * (3 * ${PAGE}), 7 * 1048576)
        g.zero(2 * ${PAGE} + 17, 7 * 1048576 + 100, fl)
        got = g.pread(3 * ${PAGE}, 7 * 1048576)
        res['%s/%d' % (name, fl)] = got[100:100 + 2 * ${PAGE} + 17] == bytes(2 * ${PAGE} + 17)
out['res'] = res
`);
    const res = out.res as Record<string, boolean>;
    assert.ok(Object.keys(res).length >= 10);
    for (const [k, v] of Object.entries(res)) assert.equal(v, true, k);
  });

  test('MUST: FUA is accepted on every command once SEND_FUA is advertised (1.5)', async () => {
    const out = await py(`
g = handle('mem')
g.set_strict_mode(0)
F = nbd.CMD_FLAG_FUA
out['res'] = [errno_of(lambda: g.pread(10, 0, F)), errno_of(lambda: g.pwrite(b'f', 0, F)),
              errno_of(lambda: g.flush(F)), errno_of(lambda: g.trim(${PAGE}, ${PAGE}, F)),
              errno_of(lambda: g.cache(10, 0, F)), errno_of(lambda: g.zero(10, 0, F)),
              errno_of(lambda: extents(g, 0, 10, F))]
`);
    assert.deepEqual(out.res, [null, null, null, null, null, null, null]);
  });

  // ---- 1.6 structured reply chunks -----------------------------------------------------

  test('MUST: a zero-length READ still ends with a chunk carrying NBD_REPLY_FLAG_DONE (1.6)', async () => {
    // libnbd waits for a DONE chunk; without one this read would never complete.
    const out = await py(`
g = handle('mem')
g.set_strict_mode(0)
replies.clear()
out['read'] = [g.pread(0, 0).hex(), g.pread(0, 1048576).hex()]
out['replies'] = replies[:]
`);
    assert.deepEqual(out.read, ['', '']);
    assert.deepEqual(out.replies, ['STRUCTURED_REPLY', 'STRUCTURED_REPLY']);
  });

  test('MUST: READ chunks stay inside the request, never overlap, and cover it all on success (1.6)', async () => {
    const out = await py(`
g = handle('mem')
base = 20 * 1048576
rng = random.Random(11)
expect = bytearray(8 * ${PAGE})
for off, n in [(${PAGE}, ${PAGE}), (3 * ${PAGE}, ${PAGE}), (5 * ${PAGE} + 100, 100)]:
    data = rng.randbytes(n)
    g.pwrite(data, base + off)
    expect[off:off + n] = data
res = []
for off, n in [(base, 8 * ${PAGE}), (base + 100, 8 * ${PAGE} - 300), (base + ${PAGE} - 1, 2 * ${PAGE} + 2), (base + 6 * ${PAGE}, 2 * ${PAGE})]:
    cs = sorted(chunks(g, n, off), key=lambda c: c[0])
    at = off
    ok = True
    for c_off, c_len, kind, data in cs:
        ok = ok and c_off == at and c_len > 0 and c_off + c_len <= off + n
        want = expect[c_off - base:c_off - base + c_len]
        ok = ok and (data == want if kind == 'data' else want == bytes(c_len))
        at = c_off + c_len
    res.append([ok and at == off + n, len(cs), sorted(set(c[2] for c in cs))])
out['res'] = res
`);
    const res = out.res as [boolean, number, string[]][];
    for (const [ok] of res) assert.equal(ok, true);
    // The first read spans data and holes: it did arrive in several chunks of both kinds.
    assert.ok(res[0]![1] > 1);
    assert.deepEqual(res[0]![2], ['data', 'hole']);
  });

  test('MUST: with NBD_CMD_FLAG_DF a READ has at most one content chunk; 64 KiB and more are served (1.6)', async () => {
    const out = await py(`
g = handle('mem')
base = 24 * 1048576
g.pwrite(b'\\x42' * 1000, base + 2 * ${PAGE})
res = []
for off, n in [(base, 65536), (base, 8 * ${PAGE}), (base + 5, 1048576), (base + 2 * ${PAGE}, 1000)]:
    cs = chunks(g, n, off, nbd.CMD_FLAG_DF)
    res.append([len(cs), cs[0][0] == off, cs[0][1] == n])
out['res'] = res
`);
    assert.deepEqual(out.res, Array(4).fill([1, true, true]));
  });

  // ---- 1.8 base:allocation -----------------------------------------------------------

  test('MUST: with REQ_ONE, BLOCK_STATUS returns exactly one extent, no longer than the request (1.8)', async () => {
    const out = await py(`
g = handle('mem')
base = 28 * 1048576
g.pwrite(b'\\x01' * (3 * ${PAGE}), base + 2 * ${PAGE})
res = []
for off, n in [(base, 10 * ${PAGE}), (base, 100), (base + 2 * ${PAGE} + 5, 10 * ${PAGE}), (base + 3 * ${PAGE}, 7)]:
    e = extents(g, off, n, nbd.CMD_FLAG_REQ_ONE)
    res.append([len(e), e[0][0] <= n])
g2 = handle('pattern')
e = extents(g2, 1000, 5000, nbd.CMD_FLAG_REQ_ONE)
res.append([len(e), e[0][0] <= 5000])
out['res'] = res
`);
    assert.deepEqual(out.res, Array(5).fill([1, true]));
  });

  test('MUST: BLOCK_STATUS descriptors have non-zero lengths, start at the offset, and reach the request end (1.8)', async () => {
    const out = await py(`
res = {}
for name in ['mem', 'file', 'null', 'pattern']:
    g = handle(name)
    base = 28 * 1048576 if name == 'mem' else 1048576
    e = extents(g, base + 3, 12 * ${PAGE})
    res[name] = [len(e) >= 1, all(l > 0 for l, f in e), sum(l for l, f in e) >= 12 * ${PAGE}, all(f & ~3 == 0 for l, f in e)]
out['res'] = res
`);
    for (const [name, row] of Object.entries(out.res as Record<string, boolean[]>)) {
      assert.deepEqual(row, [true, true, true, true], name);
    }
  });

  // ---- 1.9 sizes, 1.11 termination --------------------------------------------------------

  test('MUST: requests beyond the advertised maximum payload get a clean error, the session survives (1.9)', async () => {
    const out = await py(`
g = handle('mem')
g.set_strict_mode(0)
out['max'] = g.get_block_size(nbd.SIZE_MAXIMUM)
out['read'] = errno_of(lambda: g.pread(${MAX_PAYLOAD} + 4096, 0))
out['write'] = errno_of(lambda: g.pwrite(b'\\x07' * (${MAX_PAYLOAD} + 4096), 0))
out['written'] = g.pread(4096, ${MAX_PAYLOAD}) != b'\\x07' * 4096
out['at_max'] = errno_of(lambda: g.pread(${MAX_PAYLOAD}, 0))
# Payload-less requests may exceed it (SHOULD NOT disconnect).
out['zero_big'] = errno_of(lambda: g.zero(48 * 1048576, 0))
out['trim_big'] = errno_of(lambda: g.trim(48 * 1048576, 0))
out['alive'] = g.pread(4, 0).hex()
`);
    assert.equal(out.max, MAX_PAYLOAD);
    assert.ok(['EINVAL', 'EOVERFLOW'].includes(out.read as string), String(out.read));
    assert.ok(['EINVAL', 'EOVERFLOW'].includes(out.write as string), String(out.write));
    assert.equal(out.written, true);
    assert.equal(out.at_max, null);
    assert.equal(out.zero_big, null);
    assert.equal(out.trim_big, null);
    assert.equal(out.alive, '00000000');
  });

  test('MUST: failed options are answered with errors, never a hang-up; the client may go on (1.11)', async () => {
    const out = await py(`
g = nbd.NBD()
g.set_opt_mode(True)
g.set_tls(nbd.TLS_ALLOW)          # STARTTLS first: refused, negotiation goes on in clear
g.connect_uri(URIS['mem'])
errs = []
for name in ['nope', 'NOPE', 'mem/', ' mem', 'x' * 4000]:
    g.set_export_name(name)
    errs.append(errno_of(g.opt_info))
    errs.append(errno_of(g.opt_go))
out['errs'] = sorted(set(errs))
out['negotiating'] = g.aio_is_negotiating()
out['tls'] = g.get_tls_negotiated()
g.set_export_name('mem')
g.opt_go()
out['size'] = g.get_size()
`);
    assert.deepEqual(out.errs, ['ENOENT']);
    assert.equal(out.negotiating, true);
    assert.equal(out.tls, false);
    assert.equal(out.size, 64 * MiB);
  });

  test('MUST: errors in transmission are replies, never a disconnect (1.11)', async () => {
    const out = await py(`
g = handle('mem')
g.set_strict_mode(0)
end = g.get_size()
errs = [errno_of(f) for f in [lambda: g.pread(1, end), lambda: g.pwrite(b'a', end), lambda: g.trim(1, end),
                              lambda: g.zero(1, end), lambda: g.cache(1, end), lambda: extents(g, end, 1),
                              lambda: g.pread(1, 0, 0x4000), lambda: g.flush(0x2000)]]
out['errs'] = errs
out['alive'] = [g.aio_is_ready(), g.pread(1, 0).hex()]
`);
    assert.deepEqual(out.errs, ['EINVAL', 'ENOSPC', 'EINVAL', 'ENOSPC', 'EINVAL', 'EINVAL', 'EINVAL', 'EINVAL']);
    assert.deepEqual(out.alive, [true, '00']);
  });
});
