/**
 * NBD URI parser and formatter (src/nbd/uri.ts). The expected results are what libnbd
 * 1.14.2's nbd_connect_uri did with the same URI (checked with its Python binding against
 * nbdkit), except where src/nbd/uri.ts's header says we differ: those tests say "differs".
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { isBlockError } from '../../src/errors/index.js';
import { formatNbdUri, parseNbdUri, type NbdUri } from '../../src/nbd/uri.js';

const tcp = (host: string, port = 10809) => ({ kind: 'tcp', host, port }) as const;
const unix = (path: string) => ({ kind: 'unix', path }) as const;
const plain = (transport: NbdUri['transport'], exportName = '', extra: Partial<NbdUri> = {}): NbdUri => ({
  tls: false,
  transport,
  exportName,
  tlsVerifyPeer: true,
  ...extra,
});

function rejects(uri: string, message: RegExp): void {
  assert.throws(
    () => parseNbdUri(uri),
    (e: unknown) => {
      assert.ok(isBlockError(e), `not a BlockError: ${String(e)}`);
      assert.equal(e.code, 'EINVAL');
      assert.match(e.message, message);
      return true;
    },
    uri,
  );
}

test('tcp: host, port, export name', () => {
  assert.deepEqual(parseNbdUri('nbd://example.com'), plain(tcp('example.com')));
  assert.deepEqual(parseNbdUri('nbd://example.com/'), plain(tcp('example.com')));
  assert.deepEqual(parseNbdUri('nbd://example.com:10810/disk'), plain(tcp('example.com', 10810), 'disk'));
  assert.deepEqual(parseNbdUri('nbd://127.0.0.1:10811/name'), plain(tcp('127.0.0.1', 10811), 'name'));
  assert.deepEqual(parseNbdUri('nbd://h:10811?x=1'), plain(tcp('h', 10811)), 'query without a path');
  assert.deepEqual(parseNbdUri('nbd://LocalHost/'), plain(tcp('LocalHost')), 'host case kept');
  assert.deepEqual(parseNbdUri('nbd://local%68ost/'), plain(tcp('localhost')), 'host percent-decoded');
  assert.deepEqual(parseNbdUri('nbd://local_host/'), plain(tcp('local_host')));
  assert.deepEqual(parseNbdUri('nbd://h:010811/'), plain(tcp('h', 10811)), 'leading zeros');
});

test('tcp: IPv6 literals are kept without brackets', () => {
  assert.deepEqual(parseNbdUri('nbd://[::1]:10810/'), plain(tcp('::1', 10810)));
  assert.deepEqual(parseNbdUri('nbd://[::1]/x'), plain(tcp('::1'), 'x'));
  assert.deepEqual(parseNbdUri('nbd://[::FFFF:127.0.0.1]:10811/'), plain(tcp('::FFFF:127.0.0.1', 10811)));
  assert.deepEqual(parseNbdUri('nbd://[fe80::1%25lo]:10811/'), plain(tcp('fe80::1%lo', 10811)), 'RFC 6874 zone');
  rejects('nbd://::1:10811/', /IPv6 address in brackets/);
  rejects('nbd://[::1/', /'\[' without '\]'/);
  rejects('nbd://[::1]x/', /after the IPv6 address/);
  rejects('nbd://[zz]:10811/', /not an IPv6 address/); // differs: libnbd hands "zz" to getaddrinfo
  rejects('nbd://[1:2:3:4:5:6:7:8:9]/', /not an IPv6 address/);
  rejects('nbd://[v1.x]/', /IPvFuture/); // differs: libnbd hands "v1.x" to getaddrinfo
  rejects('nbd://[fe80::1%25]/', /zone .* is empty/);
});

test('export names: leading slash stripped once, percent-decoded, never normalised', () => {
  assert.equal(parseNbdUri('nbd://h//abs').exportName, '/abs');
  assert.equal(parseNbdUri('nbd://h//').exportName, '/');
  assert.equal(parseNbdUri('nbd://h/hello%20world').exportName, 'hello world');
  assert.equal(parseNbdUri('nbd://h/a%2Fb').exportName, 'a/b');
  assert.equal(parseNbdUri('nbd://h/a/b').exportName, 'a/b');
  assert.equal(parseNbdUri('nbd://h/a//b').exportName, 'a//b');
  assert.equal(parseNbdUri('nbd://h/a/../b').exportName, 'a/../b');
  assert.equal(parseNbdUri('nbd://h/./x').exportName, './x');
  assert.equal(parseNbdUri('nbd://h/%2e%2e/x').exportName, '../x');
  assert.equal(parseNbdUri('nbd://h/%E2%82%AC').exportName, '€');
  assert.equal(parseNbdUri('nbd://h/%e2%82%ac').exportName, '€');
  assert.equal(parseNbdUri('nbd://h/a%23b%3Fc%25').exportName, 'a#b?c%');
  assert.equal(parseNbdUri("nbd://h/a;b,c=d!$&'()*+:@~-._").exportName, "a;b,c=d!$&'()*+:@~-._");
  assert.equal(parseNbdUri('nbd://h/a+b').exportName, 'a+b', "'+' is not a space");
  assert.equal(parseNbdUri('nbd://h/a#frag').exportName, 'a', 'fragment ignored');
  assert.equal(parseNbdUri('nbd://h#frag').exportName, '');
});

test('characters a URI may not hold raw are refused, as libxml2 does', () => {
  rejects('nbd://h/€', /'€' is not allowed in a URI; percent-encode/);
  rejects('nbd://h/a b', /U\+0020 is not allowed/);
  rejects('nbd://h/a\tb', /U\+0009 is not allowed/);
  for (const c of ['|', '\\', '"', '<', '>', '^', '`', '{', '}']) rejects(`nbd://h/a${c}b`, /is not allowed in a URI/);
  rejects('nbd://h/[x]', /'\[' is not allowed in the path/);
  rejects('nbd://h/?a=]', /'\]' is not allowed in the query/);
  rejects('nbd://local host/', /U\+0020 is not allowed/);
  rejects('nbd://h/%zz', /does not start a percent-escape/);
  rejects('nbd://h/%', /does not start a percent-escape/);
  rejects('nbd://h/?a=%', /does not start a percent-escape/);
  rejects('nbd://h/a#b#c', /'#' is not allowed in the fragment/);
});

test('decoded strings must be UTF-8 without NUL (differs: libnbd takes raw bytes and cuts at NUL)', () => {
  rejects('nbd://h/%FF', /export name is not valid UTF-8/);
  rejects('nbd://h/%C0%80', /not valid UTF-8/);
  rejects('nbd://h/%00x', /export name contains NUL/);
  rejects('nbd://al%00ice@h/', /user name contains NUL/);
  rejects('nbd+unix:///?socket=/a%00b', /NUL \(%00\) other than as its first character/);
  rejects('nbd+unix:///?socket=%00a%00', /other than as its first character/);
  rejects('nbd://h/?tls-hostname=a%00', /contains NUL/);
});

test('unix sockets: socket required, export name as for TCP, authority host ignored', () => {
  assert.deepEqual(parseNbdUri('nbd+unix:///name?socket=/tmp/nbd.sock'), plain(unix('/tmp/nbd.sock'), 'name'));
  assert.deepEqual(parseNbdUri('nbd+unix://?socket=/tmp/nbd.sock'), plain(unix('/tmp/nbd.sock')));
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=%2Ftmp%2Fnbd.sock'), plain(unix('/tmp/nbd.sock')));
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=rel.sock'), plain(unix('rel.sock')));
  assert.deepEqual(parseNbdUri('nbd+unix:////abs?socket=s'), plain(unix('s'), '/abs'));
  assert.deepEqual(parseNbdUri('nbd+unix://localhost:99/x?socket=s'), plain(unix('s'), 'x'));
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=/a+b.sock'), plain(unix('/a+b.sock')), "'+' is not a space");
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=/s?x=y'), plain(unix('/s?x=y')), "'?' in the query is data");
  assert.deepEqual(parseNbdUri('nbd+unix:///?sock%65t=s'), plain(unix('s')), 'names are percent-decoded');
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=%00/abstract'), plain(unix('\0/abstract')), 'differs: abstract socket');
  rejects('nbd+unix:///', /nbd\+unix needs the socket parameter/);
  rejects('nbds+unix:///x?tls-psk-file=k', /nbds\+unix needs the socket parameter/);
  rejects('nbd+unix:///?Socket=/s', /needs the socket parameter/); // names are case-sensitive
  rejects('nbd+unix:///x?socket=', /socket is empty/); // differs: libnbd connects to '' (ECONNREFUSED)
  rejects('nbd+unix:///?socket', /socket is empty/);
  rejects('nbd+unix:///?socket=/s&socket', /socket is empty/); // the last one wins, as in libnbd
  rejects('nbd+unix:?socket=/s', /must begin with 'nbd\+unix:\/\/'/);
  rejects('nbd+unix:/name?socket=/s', /must begin with 'nbd\+unix:\/\/'/);
  rejects('nbd+unix://h:x/?socket=/s', /port 'x' is not a decimal number/);
});

test('socket given for a TCP scheme is refused', () => {
  rejects('nbd://localhost/?socket=/s', /socket parameter is only for unix URIs \(did you mean nbd\+unix/);
  rejects('nbds://localhost/?socket=', /did you mean nbds\+unix/);
});

test('TLS schemes, user names and PSK files', () => {
  assert.deepEqual(parseNbdUri('nbds://example.com'), { ...plain(tcp('example.com')), tls: true });
  assert.deepEqual(parseNbdUri('nbds://alice@host/?tls-psk-file=keys.psk'), {
    ...plain(tcp('host')),
    tls: true,
    tlsUsername: 'alice',
    tlsPskFile: 'keys.psk',
  });
  assert.deepEqual(parseNbdUri('nbds+unix://alice@/?socket=/tmp/s&tls-psk-file=/k.psk'), {
    ...plain(unix('/tmp/s')),
    tls: true,
    tlsUsername: 'alice',
    tlsPskFile: '/k.psk',
  });
  // libnbd keeps the user of a unix URI whatever host and port stand beside it
  assert.equal(parseNbdUri('nbds+unix://alice@localhost:5/?socket=/s').tlsUsername, 'alice');
  assert.deepEqual(parseNbdUri('nbds+unix://alice@/?socket=/tmp/nbd.sock&tls-certificates=certs'), {
    ...plain(unix('/tmp/nbd.sock')),
    tls: true,
    tlsUsername: 'alice',
    tlsCertificates: 'certs',
  });
  assert.equal(parseNbdUri('nbd://al%69ce@h/').tlsUsername, 'alice');
  assert.equal(parseNbdUri('nbd://al%40ice@h/').tlsUsername, 'al@ice');
  assert.equal(parseNbdUri('nbd://alice:secret@h/').tlsUsername, 'alice:secret', 'userinfo kept whole');
  assert.deepEqual(parseNbdUri('nbd://alice@:10811/'), plain(tcp('localhost', 10811), '', { tlsUsername: 'alice' }));
  // differs: libxml2 makes the user name '@:10811/' of this one and drops the port
  assert.deepEqual(parseNbdUri('nbd://@:10811/'), plain(tcp('localhost', 10811)));
  assert.deepEqual(parseNbdUri('nbd://@h/'), plain(tcp('h')), 'empty userinfo is no user name');
  rejects('nbd://a@b@h/', /'@' is not allowed in the user name/);
});

test('tls-* parameters on a non-TLS scheme are kept, and TLS stays off (as libnbd)', () => {
  assert.deepEqual(parseNbdUri('nbd://h/?tls-psk-file=/k&tls-certificates=/c'), plain(tcp('h'), '', { tlsPskFile: '/k', tlsCertificates: '/c' }));
  assert.deepEqual(parseNbdUri('nbd+unix://alice@/?socket=/s&tls-psk-file=/k'), plain(unix('/s'), '', { tlsUsername: 'alice', tlsPskFile: '/k' }));
  assert.deepEqual(parseNbdUri('nbd://h/?tls-verify-peer=false&tls-hostname=srv&tls-type=x509'), plain(tcp('h'), '', { tlsVerifyPeer: false, tlsHostname: 'srv', tlsType: 'x509' }));
});

test('tls-verify-peer takes boolean words (differs: libnbd 1.14.2 ignores the parameter)', () => {
  for (const v of ['0', 'false', 'FALSE', 'f', 'no', 'n', 'off', 'Off']) assert.equal(parseNbdUri(`nbds://h/?tls-verify-peer=${v}`).tlsVerifyPeer, false, v);
  for (const v of ['1', 'true', 'True', 't', 'yes', 'y', 'on']) assert.equal(parseNbdUri(`nbds://h/?tls-verify-peer=${v}`).tlsVerifyPeer, true, v);
  assert.equal(parseNbdUri('nbds://h/').tlsVerifyPeer, true);
  assert.equal(parseNbdUri('nbds://h/?tls-verify-peer=0&tls-verify-peer=1').tlsVerifyPeer, true, 'last wins');
  rejects('nbds://h/?tls-verify-peer=banana', /tls-verify-peer=banana is not a boolean/);
  rejects('nbds://h/?tls-verify-peer', /tls-verify-peer= is not a boolean/);
});

test('tls-type and tls-hostname (differs: libnbd 1.14.2 ignores both)', () => {
  for (const t of ['anon', 'x509', 'psk'] as const) assert.equal(parseNbdUri(`nbds://h/?tls-type=${t}`).tlsType, t);
  rejects('nbds://h/?tls-type=banana', /tls-type=banana is not one of anon, x509, psk/);
  rejects('nbds://h/?tls-type=PSK', /tls-type=PSK/);
  assert.equal(parseNbdUri('nbds+unix:///?socket=/s&tls-hostname=server.example').tlsHostname, 'server.example');
  rejects('nbds://h/?tls-hostname=', /tls-hostname is empty/);
});

test('empty tls-psk-file / tls-certificates are refused (differs: libnbd sets an empty path)', () => {
  rejects('nbds://h/?tls-psk-file', /tls-psk-file is empty/);
  rejects('nbds://h/?tls-certificates=', /tls-certificates is empty/);
});

test('repeated parameters: the last one wins', () => {
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=/a&socket=/b').transport, unix('/b'));
  assert.equal(parseNbdUri('nbds://h/?tls-psk-file=/a&tls-psk-file=/b').tlsPskFile, '/b');
  assert.equal(parseNbdUri('nbds://h/?tls-certificates=/a&tls-certificates=/b').tlsCertificates, '/b');
  assert.equal(parseNbdUri('nbds://h/?tls-type=psk&tls-type=anon').tlsType, 'anon');
});

test('query splitting as libnbd: & first, ; only when no & is left; empty and =value parts skipped', () => {
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=/s;tls-psk-file=/k').transport, unix('/s'));
  assert.equal(parseNbdUri('nbd+unix:///?socket=/s;tls-psk-file=/k').tlsPskFile, '/k');
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=/s;x=1&y=2').transport, unix('/s;x=1'));
  assert.deepEqual(parseNbdUri('nbd+unix:///?x=1;socket=/s').transport, unix('/s'));
  assert.deepEqual(parseNbdUri('nbd+unix:///?x=1&socket=/s;y=2').transport, unix('/s'));
  assert.deepEqual(parseNbdUri('nbd+unix:///x?=foo&socket=/s').transport, unix('/s'));
  assert.deepEqual(parseNbdUri('nbd+unix:///?&&socket=/s&').transport, unix('/s'));
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=/a%26b%3Bc%3Dd').transport, unix('/a&b;c=d'));
  assert.deepEqual(parseNbdUri('nbd://h/?'), plain(tcp('h')));
});

test('unknown query parameters are ignored, as libnbd does', () => {
  assert.deepEqual(parseNbdUri('nbd://h/?foo=bar'), plain(tcp('h')));
  assert.deepEqual(parseNbdUri('nbd://h/?x-foo=bar&baz'), plain(tcp('h')));
  assert.deepEqual(parseNbdUri('nbd://h/?TLS-PSK-FILE=/k'), plain(tcp('h')), 'names are case-sensitive');
  rejects('nbd://h/?foo=%ff', /value of foo is not valid UTF-8/);
});

test('schemes: vsock and others refused with a clear message', () => {
  rejects('nbd+vsock:///', /nbd\+vsock \(AF_VSOCK\) is not supported/);
  rejects('nbds+vsock://2:10809/', /nbds\+vsock \(AF_VSOCK\) is not supported/);
  rejects('http://localhost/', /unknown scheme 'http' \(expected nbd, nbds, nbd\+unix or nbds\+unix\)/);
  rejects('NBD://localhost/', /unknown scheme 'NBD' \(schemes are case-sensitive: write nbd\)/);
  rejects('nbd+tcp://h/', /unknown scheme 'nbd\+tcp'/);
  rejects('localhost:10809', /unknown scheme 'localhost'/);
  rejects('/tmp/sock', /has no scheme/);
  rejects('', /has no scheme/);
  rejects('nbd:', /must begin with 'nbd:\/\/'/);
  rejects('nbd:/x', /must begin with 'nbd:\/\/'/);
  rejects('nbd:h', /must begin with 'nbd:\/\/'/);
});

test('ports: non-numeric, empty and out of range refused', () => {
  rejects('nbd://localhost:abc/', /port 'abc' is not a decimal number/);
  rejects('nbd://localhost:+10811/', /port '\+10811' is not a decimal number/);
  rejects('nbd://localhost:-1/', /not a decimal number/);
  rejects('nbd://localhost:/', /port after ':' is empty/);
  rejects('nbd://[::1]:/', /port after ':' is empty/);
  rejects('nbd://localhost:65536/', /port 65536 is out of range/); // differs: libnbd passes it to getaddrinfo
  rejects('nbd://localhost:70000/', /out of range/);
  rejects('nbd://localhost:99999999999999999999/', /out of range/);
  rejects('nbd://localhost:0/', /port 0 is out of range/); // differs: libnbd takes 0 as "no port" (10809)
  assert.deepEqual(parseNbdUri('nbd://h:65535/').transport, tcp('h', 65535));
  assert.deepEqual(parseNbdUri('nbd://h:1').transport, tcp('h', 1));
});

test('empty host defaults to localhost, as libnbd', () => {
  assert.deepEqual(parseNbdUri('nbd:///'), plain(tcp('localhost')));
  assert.deepEqual(parseNbdUri('nbd://'), plain(tcp('localhost')));
  assert.deepEqual(parseNbdUri('nbd:///name'), plain(tcp('localhost'), 'name'));
  assert.deepEqual(parseNbdUri('nbds://'), { ...plain(tcp('localhost')), tls: true });
  // differs: libnbd (libxml2) drops the port when the host is empty and uses 10809
  assert.deepEqual(parseNbdUri('nbd://:10811/'), plain(tcp('localhost', 10811)));
});

test('formatNbdUri: examples, and what libnbd reads back', () => {
  assert.equal(formatNbdUri(plain(tcp('example.com'))), 'nbd://example.com/');
  assert.equal(formatNbdUri(plain(tcp('example.com', 10810), 'disk')), 'nbd://example.com:10810/disk');
  assert.equal(formatNbdUri(plain(tcp('::1', 10810))), 'nbd://[::1]:10810/');
  assert.equal(formatNbdUri(plain(tcp('fe80::1%eth 0'))), 'nbd://[fe80::1%25eth%200]/');
  assert.equal(formatNbdUri(plain(tcp('h'), '/abs')), 'nbd://h//abs');
  assert.equal(formatNbdUri(plain(tcp('h'), 'a b/c?d#e%f:g€')), 'nbd://h/a%20b/c%3Fd%23e%25f%3Ag%E2%82%AC');
  assert.equal(formatNbdUri(plain(unix('/tmp/nbd.sock'), 'foo')), 'nbd+unix:///foo?socket=/tmp/nbd.sock');
  assert.equal(formatNbdUri(plain(unix('/a&b;c=d+e f'))), 'nbd+unix:///?socket=/a%26b%3Bc%3Dd%2Be%20f');
  assert.equal(formatNbdUri(plain(unix('\0/abstract'))), 'nbd+unix:///?socket=%00/abstract');
  assert.equal(
    formatNbdUri({ ...plain(unix('/s')), tls: true, tlsUsername: 'alice', tlsPskFile: '/k.psk' }),
    'nbds+unix://alice@/?socket=/s&tls-psk-file=/k.psk',
  );
  assert.equal(
    formatNbdUri({ ...plain(tcp('h')), tls: true, tlsUsername: 'a:b@c', tlsCertificates: '/c', tlsVerifyPeer: false, tlsHostname: 'srv', tlsType: 'x509' }),
    'nbds://a%3Ab%40c@h/?tls-certificates=/c&tls-verify-peer=false&tls-hostname=srv&tls-type=x509',
  );
});

test('formatNbdUri refuses values no URI can express', () => {
  const bad: Array<[NbdUri, RegExp]> = [
    [plain(tcp('')), /host is empty/],
    [plain(tcp('a:b')), /has ':' but is not an IPv6 address/],
    [plain(tcp('fe80::1%')), /zone .* is empty/],
    [plain(tcp('h', 0)), /port 0 is out of range/],
    [plain(tcp('h', 65536)), /out of range/],
    [plain(tcp('h', 1.5)), /out of range/],
    [plain(unix('')), /socket is empty/],
    [plain(unix('/a\0b')), /socket contains NUL/],
    [plain(tcp('h'), 'a\0'), /export name contains NUL/],
    [plain(tcp('h'), '\ud800'), /lone surrogate/],
    [plain(tcp('h'), '', { tlsUsername: '' }), /user name is empty/],
    [plain(tcp('h'), '', { tlsPskFile: '' }), /tls-psk-file is empty/],
    [plain(tcp('h'), '', { tlsType: 'rsa' as never }), /tls-type rsa/],
  ];
  for (const [u, message] of bad) {
    assert.throws(() => formatNbdUri(u), (e: unknown) => isBlockError(e) && e.code === 'EINVAL' && message.test(e.message), message.source);
  }
});

// ---- properties ----

const SPECIALS = ['/', '?', '#', '%', ' ', '&', ';', '=', '+', ':', '@', '[', ']', '€', '😀', 'é', '\u00a0', '%25', '%2F', '..', '\t', '\n'];
/** Strings heavy in the characters that need care, plus arbitrary unicode, without NUL. */
const text = fc
  .array(fc.oneof(fc.constantFrom(...SPECIALS), fc.string({ unit: 'grapheme', maxLength: 4 }), fc.string({ unit: 'binary', maxLength: 4 })), { maxLength: 8 })
  .map((parts) => parts.join('').replace(/\0/g, ''));
const nonEmptyText = text.filter((s) => s !== '');

const host = fc.oneof(
  fc.domain(),
  fc.ipV4(),
  fc.ipV6(),
  fc.constant('localhost'),
  fc.tuple(fc.ipV6(), nonEmptyText).map(([a, z]) => `${a}%${z}`),
  nonEmptyText.filter((s) => !s.includes(':')),
);
const transport: fc.Arbitrary<NbdUri['transport']> = fc.oneof(
  fc.record({ kind: fc.constant('tcp' as const), host, port: fc.integer({ min: 1, max: 65535 }) }).map((t) => ({ ...t })),
  fc.record({ kind: fc.constant('unix' as const), path: fc.oneof(nonEmptyText, nonEmptyText.map((s) => `\0${s}`)) }).map((t) => ({ ...t })),
);
const nbdUri: fc.Arbitrary<NbdUri> = fc.record(
  {
    tls: fc.boolean(),
    transport,
    exportName: text,
    tlsUsername: nonEmptyText,
    tlsPskFile: nonEmptyText,
    tlsCertificates: nonEmptyText,
    tlsVerifyPeer: fc.boolean(),
    tlsHostname: nonEmptyText,
    tlsType: fc.constantFrom('anon' as const, 'x509' as const, 'psk' as const),
  },
  { requiredKeys: ['tls', 'transport', 'exportName', 'tlsVerifyPeer'] },
).map((u) => ({ ...u })); // fast-check's records have no prototype; parseNbdUri's do

test('property: parseNbdUri(formatNbdUri(u)) is u, and the URI holds only RFC 3986 characters', () => {
  fc.assert(
    fc.property(nbdUri, (u) => {
      const s = formatNbdUri(u);
      assert.match(s, /^[A-Za-z0-9\-._~!$&'()*+,;=:/?#[\]@%]*$/);
      assert.deepEqual(parseNbdUri(s), u);
      assert.equal(formatNbdUri(parseNbdUri(s)), s);
    }),
    { numRuns: 2000 },
  );
});

test('property: any string either parses or throws BlockError EINVAL', () => {
  const uriLike = fc
    .tuple(
      fc.constantFrom('nbd://', 'nbds://', 'nbd+unix://', 'nbds+unix://', 'nbd:', ''),
      fc.array(fc.oneof(fc.constantFrom('[', ']', '@', ':', '/', '?', '#', '%', '%2', '%00', '%ff', 'socket=', '&', ';', '=', 'tls-verify-peer=', 'tls-type='), fc.string({ maxLength: 3 })), { maxLength: 12 }),
    )
    .map(([s, parts]) => s + parts.join(''));
  fc.assert(
    fc.property(fc.oneof(uriLike, fc.string()), (s) => {
      try {
        const u = parseNbdUri(s);
        // whatever parses formats to a URI that parses to the same value
        assert.deepEqual(parseNbdUri(formatNbdUri(u)), u);
      } catch (e) {
        if (!(isBlockError(e) && e.code === 'EINVAL')) throw e;
      }
    }),
    { numRuns: 3000 },
  );
});
