/**
 * Interop, libnbd's nbdsh: the handshake as a real client sees it. Every option libnbd
 * 1.14 can send (GO, INFO, LIST, LIST_META_CONTEXT, SET_META_CONTEXT, STRUCTURED_REPLY,
 * STARTTLS, ABORT, and EXPORT_NAME from a plain-newstyle client), the transmission
 * flags of every backend, export names and descriptions.
 *
 * Each test runs one nbdsh script (Python); the script stores what it saw in `out`,
 * which is printed as JSON and checked here.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PY_ERRNO_OF, nbdshOut } from '../helpers/nbdsh-script.js';
import { startServer, type CaptiveServer } from '../helpers/server.js';

/** Python run before each script: the shared helpers of this file's scripts. */
const PRELUDE = `
import json, os
URI = os.environ['uri']
out = {}
server_msgs = []
def _debug(ctx, msg):
    if 'server message: ' in msg:
        server_msgs.append(msg.split('server message: ', 1)[1])
h.set_debug_callback(_debug)
h.set_debug(True)
${PY_ERRNO_OF}
def flags():
    return {
        'size': h.get_size(),
        'read_only': h.is_read_only(),
        'flush': h.can_flush(),
        'fua': h.can_fua(),
        'trim': h.can_trim(),
        'zero': h.can_zero(),
        'fast_zero': h.can_fast_zero(),
        'cache': h.can_cache(),
        'df': h.can_df(),
        'multi_conn': h.can_multi_conn(),
        'rotational': h.is_rotational(),
        'block': [h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED), h.get_block_size(nbd.SIZE_MAXIMUM)],
    }
`;

/** Runs a script against `uri` and returns its `out` dictionary. */
async function py(uri: string, body: string): Promise<Record<string, unknown>> {
  return nbdshOut(PRELUDE + body, uri);
}

const MiB = 1024 * 1024;
/** The block sizes every built-in backend advertises: byte-addressable, 4 KiB preferred, 32 MiB payloads. */
const BLOCK = [1, 4096, 32 * MiB];
const UNICODE_NAME = 'disk one/é';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-interop-hs-'));
let srv: CaptiveServer;

before(async () => {
  srv = await startServer([
    { name: 'mem', backend: { type: 'memory', size: 8 * MiB }, description: 'scratch disk' },
    { name: 'file', backend: { type: 'file', path: path.join(tmp, 'disk.img'), size: 4 * MiB, create: true } },
    { name: 'null', backend: { type: 'null', size: 4 * MiB } },
    { name: 'pattern', backend: { type: 'pattern', size: 4 * MiB } },
    { name: 'ro', backend: { type: 'memory', size: MiB }, readOnly: true },
    { name: 'filtered', backend: { type: 'memory', size: MiB }, filters: [{ type: 'readonly' }] },
    { name: UNICODE_NAME, backend: { type: 'null', size: 12345 }, description: 'ünïcode' },
  ]);
});
after(async () => {
  await srv.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** What a writable export with every capability advertises (memory, null). */
const FULL = {
  read_only: false,
  flush: true,
  fua: true,
  trim: true,
  zero: true,
  fast_zero: true,
  cache: true,
  df: true,
  multi_conn: true,
  rotational: false,
  block: BLOCK,
};
/** What a read-only export advertises: no write-side flags at all. */
const READ_ONLY = { ...FULL, read_only: true, fua: false, trim: false, zero: false, fast_zero: false };

describe('nbdsh: handshake', () => {
  test('every backend advertises the flags and block sizes of its capabilities', async () => {
    const expected: Record<string, Record<string, unknown>> = {
      mem: { ...FULL, size: 8 * MiB },
      // The file backend cannot zero faster than writing: no FAST_ZERO.
      file: { ...FULL, size: 4 * MiB, fast_zero: false },
      null: { ...FULL, size: 4 * MiB },
      // Pattern: read-only and nothing to flush.
      pattern: { ...READ_ONLY, size: 4 * MiB, flush: false },
      // Read-only by export policy or by filter: FLUSH stays (harmless), writes go.
      ro: { ...READ_ONLY, size: MiB },
      filtered: { ...READ_ONLY, size: MiB },
      [UNICODE_NAME]: { ...FULL, size: 12345 },
    };
    for (const [name, want] of Object.entries(expected)) {
      const out = await py(
        srv.uri(name),
        `
h.connect_uri(URI)
out['flags'] = flags()
out['protocol'] = h.get_protocol()
out['sr'] = h.get_structured_replies_negotiated()
`,
      );
      assert.deepEqual(out.flags, want, `export ${name}`);
      assert.equal(out.protocol, 'newstyle-fixed');
      assert.equal(out.sr, true);
    }
  });

  test('structured replies off: no DF, no meta context, simple replies, same flags otherwise', async () => {
    const out = await py(
      srv.uri('mem'),
      `
h.set_request_structured_replies(False)
h.add_meta_context('base:allocation')
h.connect_uri(URI)
out['sr'] = h.get_structured_replies_negotiated()
out['flags'] = flags()
out['meta'] = h.can_meta_context('base:allocation')
h.pwrite(b'simple', 4096)
out['read'] = h.pread(6, 4096).decode()
`,
    );
    assert.equal(out.sr, false);
    assert.deepEqual(out.flags, { ...FULL, size: 8 * MiB, df: false });
    assert.equal(out.meta, false);
    assert.equal(out.read, 'simple');
  });

  test('NBD_OPT_LIST names every export with its description, and negotiation goes on', async () => {
    const out = await py(
      srv.uri('mem'),
      `
h.set_opt_mode(True)
h.connect_uri(URI)
listed = []
out['count'] = h.opt_list(lambda name, desc: listed.append([name, desc]))
out['list'] = listed
h.opt_go()
out['size'] = h.get_size()
`,
    );
    assert.deepEqual(out.list, [
      ['mem', 'scratch disk'],
      ['file', `file ${path.join(tmp, 'disk.img')} 4MiB`],
      ['null', 'null 4MiB'],
      ['pattern', 'pattern 4MiB'],
      ['ro', 'memory 1MiB'],
      ['filtered', 'memory 1MiB (read-only)'],
      [UNICODE_NAME, 'ünïcode'],
    ]);
    assert.equal(out.count, 7);
    assert.equal(out.size, 8 * MiB);
  });

  test('NBD_OPT_INFO describes any export without leaving negotiation; GO then agrees', async () => {
    const out = await py(
      srv.uri('mem'),
      `
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(URI)
infos = {}
for name in ['pattern', 'ro', 'mem']:
    h.set_export_name(name)
    h.opt_info()
    infos[name] = [flags(), h.get_canonical_export_name(), h.get_export_description()]
out['infos'] = infos
out['negotiating'] = h.aio_is_negotiating()
h.set_export_name('pattern')
h.opt_go()
out['after_go'] = [flags(), h.get_canonical_export_name(), h.get_export_description()]
`,
    );
    const infos = out.infos as Record<string, [Record<string, unknown>, string, string]>;
    assert.deepEqual(infos.pattern, [{ ...READ_ONLY, size: 4 * MiB, flush: false }, 'pattern', 'pattern 4MiB']);
    assert.deepEqual(infos.ro, [{ ...READ_ONLY, size: MiB }, 'ro', 'memory 1MiB']);
    assert.deepEqual(infos.mem, [{ ...FULL, size: 8 * MiB }, 'mem', 'scratch disk']);
    assert.equal(out.negotiating, true);
    assert.deepEqual(out.after_go, infos.pattern);
  });

  test('NBD_OPT_INFO and NBD_OPT_GO on an unknown export fail, and the session goes on', async () => {
    const out = await py(
      srv.uri('mem'),
      `
h.set_opt_mode(True)
h.connect_uri(URI)
h.set_export_name('no-such-export')
out['info'] = errno_of(h.opt_info)
out['go'] = errno_of(h.opt_go)
out['go_again'] = errno_of(h.opt_go)
out['negotiating'] = h.aio_is_negotiating()
h.set_export_name('null')
h.opt_go()
out['size'] = h.get_size()
`,
    );
    // libnbd maps NBD_REP_ERR_UNKNOWN to ENOENT.
    assert.equal(out.info, 'ENOENT');
    assert.equal(out.go, 'ENOENT');
    assert.equal(out.go_again, 'ENOENT');
    assert.equal(out.negotiating, true);
    assert.equal(out.size, 4 * MiB);
  });

  test('connecting to an unknown export by URI fails cleanly', async () => {
    const out = await py(srv.uri('no-such-export'), `out['err'] = errno_of(lambda: h.connect_uri(URI))`);
    assert.equal(out.err, 'ENOENT');
  });

  test('export names and descriptions: canonical names, the default export, non-ASCII names', async () => {
    const cases: [string, string, string][] = [
      ['mem', 'mem', 'scratch disk'],
      ['', 'mem', 'scratch disk'], // '' is the default export: the first one
      [UNICODE_NAME, UNICODE_NAME, 'ünïcode'],
      ['filtered', 'filtered', 'memory 1MiB (read-only)'],
    ];
    for (const [asked, canonical, description] of cases) {
      const out = await py(
        srv.uri(asked),
        `
h.set_full_info(True)
h.connect_uri(URI)
out['asked'] = h.get_export_name()
out['canonical'] = h.get_canonical_export_name()
out['description'] = h.get_export_description()
`,
      );
      assert.deepEqual([out.asked, out.canonical, out.description], [asked, canonical, description], `export '${asked}'`);
    }
  });

  test('NBD_OPT_LIST_META_CONTEXT: all, the base: wildcard, exact and unknown queries', async () => {
    const out = await py(
      srv.uri('mem'),
      `
h.set_opt_mode(True)
h.connect_uri(URI)
res = []
for q in [[], ['base:'], ['base:allocation'], ['base:nonsense'], ['qemu:dirty-bitmap:x'], ['x-foo:bar', 'base:allocation']]:
    h.clear_meta_contexts()
    for c in q:
        h.add_meta_context(c)
    got = []
    n = h.opt_list_meta_context(lambda c: got.append(c))
    res.append([q, n, got])
out['res'] = res
h.clear_meta_contexts()
h.set_export_name('pattern')
got = []
h.opt_list_meta_context(lambda c: got.append(c))
out['pattern'] = got
`,
    );
    assert.deepEqual(out.res, [
      [[], 1, ['base:allocation']],
      [['base:'], 1, ['base:allocation']],
      [['base:allocation'], 1, ['base:allocation']],
      [['base:nonsense'], 0, []],
      [['qemu:dirty-bitmap:x'], 0, []],
      [['x-foo:bar', 'base:allocation'], 1, ['base:allocation']],
    ]);
    assert.deepEqual(out.pattern, ['base:allocation']);
  });

  test('NBD_OPT_SET_META_CONTEXT: base:allocation is selected by name only', async () => {
    const out = await py(
      srv.uri('mem'),
      `
res = {}
for q in [['base:allocation'], ['base:'], ['base:nonsense'], ['x-foo:bar', 'base:allocation'], []]:
    g = nbd.NBD()
    for c in q:
        g.add_meta_context(c)
    g.connect_uri(URI)
    res[','.join(q)] = g.can_meta_context('base:allocation')
    g.shutdown()
out['res'] = res
`,
    );
    assert.deepEqual(out.res, {
      'base:allocation': true,
      'base:': false,
      'base:nonsense': false,
      'x-foo:bar,base:allocation': true,
      '': false,
    });
  });

  test('plain newstyle client (no FIXED_NEWSTYLE): NBD_OPT_EXPORT_NAME, with and without zero padding', async () => {
    // libnbd uses NBD_OPT_EXPORT_NAME straight away when it may not send other options.
    for (const hsFlags of [0, 2]) {
      const out = await py(
        srv.uri('mem'),
        `
h.set_handshake_flags(${hsFlags})
h.connect_uri(URI)
out['protocol'] = h.get_protocol()
out['sr'] = h.get_structured_replies_negotiated()
out['flags'] = flags()
h.pwrite(b'export-name', 12345)
out['read'] = h.pread(11, 12345).decode()
h.flush()
`,
      );
      assert.equal(out.protocol, 'newstyle', `handshake flags ${hsFlags}`);
      assert.equal(out.sr, false);
      // EXPORT_NAME carries no block sizes: libnbd reports 0 for them.
      assert.deepEqual(out.flags, { ...FULL, size: 8 * MiB, df: false, block: [0, 0, 0] });
      assert.equal(out.read, 'export-name');
    }
  });

  test('NBD_OPT_EXPORT_NAME of an unknown export: the server hangs up (it cannot send an error)', async () => {
    const out = await py(
      srv.uri('no-such-export'),
      `
h.set_handshake_flags(0)
out['err'] = errno_of(lambda: h.connect_uri(URI))
out['closed'] = h.aio_is_closed() or h.aio_is_dead()
`,
    );
    assert.notEqual(out.err, null);
    assert.equal(out.closed, true);
  });

  test('NBD_OPT_STARTTLS is refused (no TLS configured): TLS allowed goes on in clear, TLS required fails', async () => {
    const out = await py(
      srv.uri('mem'),
      `
h.set_tls(nbd.TLS_ALLOW)
h.connect_uri(URI)
out['tls'] = h.get_tls_negotiated()
out['size'] = h.get_size()
g = nbd.NBD()
g.set_tls(nbd.TLS_REQUIRE)
out['required'] = errno_of(lambda: g.connect_uri(URI))
`,
    );
    assert.equal(out.tls, false);
    assert.equal(out.size, 8 * MiB);
    assert.equal(out.required, 'ENOTSUP');
  });

  test('NBD_OPT_ABORT ends negotiation with a clean close', async () => {
    const out = await py(
      srv.uri('mem'),
      `
h.set_opt_mode(True)
h.connect_uri(URI)
h.opt_abort()
out['closed'] = h.aio_is_closed()
out['dead'] = h.aio_is_dead()
`,
    );
    assert.equal(out.closed, true);
    assert.equal(out.dead, false);
  });
});
