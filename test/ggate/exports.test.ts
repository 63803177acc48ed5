import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockError } from '../../src/errors/index.js';
import {
  accessAllowed,
  checkExport,
  ExportsError,
  formatIPv4,
  GGATED_EXPORTS,
  inetAton,
  maskFromBits,
  parseClientIPv4,
  parseExports,
  resolveExports,
  type ExportEntry,
  type HostLookup,
  type ResolvedExportEntry,
} from '../../src/ggate/exports.js';
import { GGATE_FLAG } from '../../src/ggate/protocol.js';

const { GGATE_FLAG_RDONLY: RDONLY, GGATE_FLAG_WRONLY: WRONLY, GGATE_FLAG_SEND: SEND } = GGATE_FLAG;
const RO = RDONLY | SEND;
const WO = WRONLY | SEND;
const RW = SEND;

/** Parses a file that has only literal addresses (resolution is then a no-op). */
async function load(text: string): Promise<ResolvedExportEntry[]> {
  return resolveExports(parseExports(text, 'gg.exports'), () => Promise.reject(new Error('no lookup expected')));
}

/** Asserts that parsing throws an EINVAL ExportsError at `line` whose reason matches. */
function rejects(text: string, line: number | undefined, reason: RegExp): void {
  assert.throws(
    () => parseExports(text, 'gg.exports'),
    (e: unknown) => {
      assert.ok(e instanceof ExportsError);
      assert.ok(e instanceof BlockError);
      assert.equal(e.code, 'EINVAL');
      assert.equal(e.line, line);
      assert.match(e.reason, reason);
      assert.ok(e.message.startsWith(line === undefined ? 'gg.exports: ' : `gg.exports:${line}: `), e.message);
      return true;
    },
  );
}

test('W6 a line has three fields: address[/bits], access, path', () => {
  const [e] = parseExports('192.168.0.0/24 RW /dev/ada0\n');
  assert.deepEqual(e, {
    line: 1,
    host: '192.168.0.0',
    address: 0xc0a8_0000,
    maskBits: 24,
    mask: 0xffff_ff00,
    access: 'rw',
    path: '/dev/ada0',
  } satisfies ExportEntry);
  const [f] = parseExports('10.0.0.5\t \tRO\t/tank/vol  ');
  assert.equal(f?.maskBits, 32, 'no /bits means a single host');
  assert.equal(f?.mask, 0xffff_ffff);
  assert.equal(f?.path, '/tank/vol', 'runs of spaces and tabs separate fields; no final newline is fine');
});

test('W6 comments, blank lines and leading blanks are skipped; line numbers count every line', () => {
  const text = ['# exports', '', '   ', '\t# indented comment', '  10.0.0.1 RW /a', '#10.0.0.2 RW /b', '10.0.0.3 RO /c', ''].join('\n');
  const entries = parseExports(text);
  assert.deepEqual(
    entries.map((e) => [e.line, formatIPv4(e.address ?? 0), e.path]),
    [
      [5, '10.0.0.1', '/a'],
      [7, '10.0.0.3', '/c'],
    ],
  );
});

test('W6 a # after the first field is not a comment', () => {
  rejects('10.0.0.1 RW /a # trailing comment\n', 1, /too many fields/);
});

test('W6 access keywords are case-insensitive and RD is RO', () => {
  const text = ['1.1.1.1 ro /a', '1.1.1.1 Rd /b', '1.1.1.1 RD /c', '1.1.1.1 wO /d', '1.1.1.1 rW /e', '1.1.1.1 RW /f'].join('\n');
  assert.deepEqual(
    parseExports(text).map((e) => e.access),
    ['ro', 'ro', 'ro', 'wo', 'rw', 'rw'],
  );
  rejects('1.1.1.1 RX /a', 1, /invalid access 'RX'/);
  rejects('1.1.1.1 read /a', 1, /invalid access/);
});

test('W6 /bits is a netmask length 0..32', () => {
  const text = ['10.1.2.3/0 RW /a', '10.1.2.3/8 RW /b', '10.1.2.3/32 RW /c', '10.1.2.3/31 RW /d'].join('\n');
  assert.deepEqual(
    parseExports(text).map((e) => [e.maskBits, e.mask]),
    [
      [0, 0],
      [8, 0xff00_0000],
      [32, 0xffff_ffff],
      [31, 0xffff_fffe],
    ],
  );
  assert.equal(maskFromBits(24), 0xffff_ff00);
  rejects('10.0.0.0/33 RW /a', 1, /invalid IP mask value '33'/);
  rejects('10.0.0.0/ RW /a', 1, /invalid IP mask value ''/);
  rejects('10.0.0.0/x RW /a', 1, /invalid IP mask/);
  rejects('10.0.0.0/8abc RW /a', 1, /invalid IP mask/);
  rejects('10.0.0.0/-1 RW /a', 1, /invalid IP mask/);
});

test('W6 addresses are read as inet_addr(3) reads them', () => {
  assert.equal(inetAton('192.168.1.2'), 0xc0a8_0102);
  assert.equal(inetAton('10.1'), 0x0a00_0001, 'a.b: b fills 24 bits');
  assert.equal(inetAton('10.1.2'), 0x0a01_0002, 'a.b.c: c fills 16 bits');
  assert.equal(inetAton('167772161'), 0x0a00_0001, 'a single number is the whole address');
  assert.equal(inetAton('0x0A000001'), 0x0a00_0001, 'hex');
  assert.equal(inetAton('012.0.0.1'), 0x0a00_0001, 'a leading 0 is octal');
  assert.equal(inetAton('0.0.0.0'), 0);
  assert.equal(inetAton('4294967297'), 1, 'one part is a 64-bit u_long truncated to 32 bits');
  assert.equal(inetAton('255.255.255.255'), 0xffff_ffff);
  for (const bad of ['', '08.0.0.1', '256.0.0.1', '1.2.3.256', '1.2.3.4.5', '1..2', 'a.b.c.d', '1.2.3.4x', '0x', '1.0x', '10.0.0.1/8']) {
    assert.equal(inetAton(bad), null, bad);
  }
  // What inet_addr rejects is a host name for ggated.
  const [e] = parseExports('08.0.0.1 RW /a');
  assert.equal(e?.address, null);
});

test('W6 255.255.255.255 is refused (inet_addr cannot tell it from an error)', () => {
  rejects('255.255.255.255 RW /a', 1, /INADDR_NONE/);
  rejects('0xffffffff/0 RW /a', 1, /INADDR_NONE/);
});

test('W6 host names are kept by the parser and resolved by resolveExports', async () => {
  const entries = parseExports(['gate.example/24 RW /a', '10.0.0.9 RO /b', 'gate.example RO /c', 'other.example WO /d'].join('\n'));
  assert.equal(entries[0]?.host, 'gate.example');
  assert.equal(entries[0]?.address, null);
  const asked: string[] = [];
  const lookup: HostLookup = (name) => {
    asked.push(name);
    return Promise.resolve(name === 'gate.example' ? '192.0.2.7' : '::ffff:198.51.100.1');
  };
  const resolved = await resolveExports(entries, lookup);
  assert.deepEqual(asked.sort(), ['gate.example', 'other.example'], 'each name once, literals never');
  assert.deepEqual(
    resolved.map((e) => formatIPv4(e.address)),
    ['192.0.2.7', '10.0.0.9', '192.0.2.7', '198.51.100.1'],
  );
  assert.equal(resolved[0]?.maskBits, 24);
});

test('W6 a name that does not resolve fails the file at its first line', async () => {
  const entries = parseExports(['10.0.0.1 RW /a', 'bad.example RW /b', 'v6.example RW /c', 'bad.example RO /d'].join('\n'), 'f');
  const lookup: HostLookup = (name) =>
    name === 'v6.example' ? Promise.resolve('2001:db8::1') : Promise.reject(new Error('ENOTFOUND'));
  await assert.rejects(resolveExports(entries, lookup, 'f'), (e: unknown) => {
    assert.ok(e instanceof ExportsError);
    assert.equal(e.code, 'EINVAL');
    assert.equal(e.line, 2);
    assert.match(e.message, /^f:2: invalid IP\/host name 'bad.example': ENOTFOUND/);
    return true;
  });
  await assert.rejects(resolveExports(entries.slice(2, 3), lookup, 'f'), /f:3: .*not an IPv4 address/);
  await assert.rejects(
    resolveExports(parseExports('bcast.example RW /a'), () => Promise.resolve('255.255.255.255')),
    /INADDR_NONE/,
  );
});

test('W6 entries are tried in reverse file order: the last matching line decides', async () => {
  const exports = await load(['10.0.0.0/8 RO /disk', '10.1.0.0/16 RW /disk'].join('\n'));
  const r = checkExport(exports, '10.1.2.3', '/disk', RW);
  assert.ok(r.ok);
  assert.equal(r.entry.line, 2);
  // The other way round, the /8 line is the last one and wins.
  const swapped = await load(['10.1.0.0/16 RW /disk', '10.0.0.0/8 RO /disk'].join('\n'));
  const s = checkExport(swapped, '10.1.2.3', '/disk', RO);
  assert.ok(s.ok);
  assert.equal(s.entry.line, 2);
});

test('W6 an access mismatch is EPERM without trying earlier lines', async () => {
  const exports = await load(['10.0.0.0/8 RW /disk', '10.0.0.1 RO /disk'].join('\n'));
  const r = checkExport(exports, '10.0.0.1', '/disk', RW);
  assert.equal(r.ok, false);
  assert.ok(!r.ok);
  assert.equal(r.code, 'EPERM');
  assert.equal(r.entry?.line, 2);
  assert.match(r.reason, /rw access requested, but \/disk \(10\.0\.0\.1\/32\) is exported ro/);
  // Another client of the /8 is not affected by the host line.
  assert.ok(checkExport(exports, '10.0.0.2', '/disk', RW).ok);
});

test('W6 address or path mismatches move on to earlier lines; no match is EPERM', async () => {
  const exports = await load(['10.0.0.0/8 RW /a', '10.0.0.1 RW /b', '192.168.0.0/16 RW /a'].join('\n'));
  const r = checkExport(exports, '10.0.0.1', '/a', RW);
  assert.ok(r.ok);
  assert.equal(r.entry.line, 1);
  const none = checkExport(exports, '172.16.0.1', '/a', RW);
  assert.ok(!none.ok);
  assert.equal(none.code, 'EPERM');
  assert.equal(none.entry, undefined);
  assert.match(none.reason, /unauthorized connection from 172\.16\.0\.1/);
  assert.equal(checkExport(exports, '10.0.0.1', '/a/', RW).ok, false, 'paths compare exactly');
  assert.equal(checkExport(exports, '10.0.0.1', '/A', RW).ok, false);
});

test('W6 the network is address & mask, so host bits in the file do not matter', async () => {
  const exports = await load('10.9.9.9/8 RO /a');
  assert.ok(checkExport(exports, '10.200.1.1', '/a', RO).ok);
  assert.equal(checkExport(exports, '11.0.0.1', '/a', RO).ok, false);
  const all = await load('1.2.3.4/0 RO /a');
  assert.ok(checkExport(all, '203.0.113.9', '/a', RO).ok, '/0 matches every client');
});

test('W6 access rules: RO needs not-WO, WO needs not-RO, RW needs RW; the client mode is granted', async () => {
  const cases: ['ro' | 'wo' | 'rw', number, boolean][] = [
    ['ro', RO, true],
    ['ro', WO, false],
    ['ro', RW, false],
    ['wo', RO, false],
    ['wo', WO, true],
    ['wo', RW, false],
    ['rw', RO, true],
    ['rw', WO, true],
    ['rw', RW, true],
  ];
  for (const [exported, flags, ok] of cases) {
    const exports = await load(`10.0.0.1 ${exported} /a`);
    const r = checkExport(exports, '10.0.0.1', '/a', flags);
    assert.equal(r.ok, ok, `${exported} export, flags ${flags}`);
    if (r.ok) assert.equal(r.access, flags === RO ? 'ro' : flags === WO ? 'wo' : 'rw');
    else assert.equal(r.code, 'EPERM');
  }
  assert.equal(accessAllowed('rw', 'ro'), true);
  // RDONLY wins over WRONLY, as in ggated.
  const ro = await load('10.0.0.1 RO /a');
  assert.ok(checkExport(ro, '10.0.0.1', '/a', RDONLY | WRONLY | SEND).ok);
  // gc_flags as a bigint (u64 above 2^53) work the same.
  assert.ok(checkExport(ro, '10.0.0.1', '/a', (1n << 60n) | BigInt(RO)).ok);
});

test('W6 clients are IPv4 only; IPv4-mapped IPv6 addresses count as IPv4', async () => {
  const exports = await load('10.0.0.1 RW /a');
  assert.ok(checkExport(exports, '::ffff:10.0.0.1', '/a', RW).ok);
  assert.ok(checkExport(exports, '::FFFF:10.0.0.1', '/a', RW).ok);
  const v6 = checkExport(exports, '2001:db8::1', '/a', RW);
  assert.ok(!v6.ok);
  assert.equal(v6.code, 'EPERM');
  assert.equal(checkExport(exports, '::1', '/a', RW).ok, false);
  assert.equal(parseClientIPv4('10.0.0.256'), null);
  assert.equal(parseClientIPv4('::ffff:7f00:1'), null);
  assert.equal(parseClientIPv4('127.0.0.1'), 0x7f00_0001);
});

test('W6 bad lines are rejected with their line number and reason', () => {
  rejects('# c\n10.0.0.1 RW', 2, /too few fields/);
  rejects('10.0.0.1', 1, /too few fields/);
  rejects('10.0.0.1 RW /a /b', 1, /too many fields/);
  rejects('/8 RW /a', 1, /invalid IP\/host name \(empty\)/);
  rejects('10.0.0.1 RW /a\r\n', 1, /carriage return/);
  rejects('10.0.0.1 RW /a\0', 1, /NUL/);
  // A bad first field is reported before a wrong field count, as ggated goes field by field.
  rejects('10.0.0.0/40', 1, /invalid IP mask/);
  rejects('10.0.0.0 XX', 1, /invalid access/);
});

test('W6 paths must be shorter than MAXPATHLEN and lines fit the fgets buffer', () => {
  assert.equal(GGATED_EXPORTS.MAXPATHLEN, 1024);
  assert.equal(GGATED_EXPORTS.EXPORTS_LINE_SIZE, 2048);
  const ok = `/${'p'.repeat(1022)}`;
  assert.equal(parseExports(`1.1.1.1 RW ${ok}`)[0]?.path, ok);
  rejects(`1.1.1.1 RW /${'p'.repeat(1023)}`, 1, /path too long/);
  // 2046 bytes of text is the longest line; blanks count.
  const pad = (n: number) => `1.1.1.1 RW /x${' '.repeat(n - 13)}`;
  assert.equal(pad(2046).length, 2046);
  assert.equal(parseExports(pad(2046)).length, 1);
  rejects(pad(2047), 1, /line too long/);
  // A long comment is still a comment.
  assert.equal(parseExports(`#${'c'.repeat(5000)}\n1.1.1.1 RW /x`).length, 1);
});

test('W6 a file with no exports is an error', () => {
  rejects('', undefined, /no objects to export/);
  rejects('# nothing\n\n   \n', undefined, /no objects to export/);
});
