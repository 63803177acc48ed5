/**
 * TLS and access configuration without a connection: psktool files, loading X.509 and
 * PSK credentials (and the errors naming what is missing or wrong), per-export policies
 * (TLS-only, PSK identities, certificate subjects), and the config file's new keys.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BlockError } from '../../src/errors/index.js';
import { formatSubject, loadTls, subjectFieldsOf, parsePskFile, TLS_FILES, TLS_OFF, type TlsPeer } from '../../src/nbd/tls.js';
import { ExportPolicy } from '../../src/nbd/access.js';
import { parseConfig } from '../../src/cli/config.js';

const hex = (n: number) => crypto.randomBytes(n).toString('hex');

/** Asserts `fn` throws BlockError EINVAL whose message matches every pattern. */
function einval(fn: () => unknown, ...patterns: (RegExp | string)[]): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof BlockError, `a BlockError, got ${String(e)}`);
    assert.equal(e.code, 'EINVAL');
    for (const p of patterns) {
      if (typeof p === 'string') assert.ok(e.message.includes(p), `'${e.message}' should contain '${p}'`);
      else assert.match(e.message, p);
    }
    return true;
  });
}

describe('parsePskFile', () => {
  test('psktool lines give identity → key, with colons allowed in the identity', () => {
    const a = hex(32);
    const b = hex(16);
    const c = hex(64);
    const keys = parsePskFile(`alice:${a}\nbob:${b.toUpperCase()}\nhost:with:colons:${c}\n`);
    assert.deepEqual([...keys.keys()], ['alice', 'bob', 'host:with:colons']);
    assert.deepEqual(keys.get('alice'), Buffer.from(a, 'hex'));
    assert.deepEqual(keys.get('bob'), Buffer.from(b, 'hex'));
    assert.equal(keys.get('host:with:colons')!.length, 64);
  });

  test('comments, blank and whitespace-only lines are skipped', () => {
    const keys = parsePskFile(`# made by psktool\n\n   \nalice:${hex(32)}\n# bob:${hex(32)}\n`);
    assert.deepEqual([...keys.keys()], ['alice']);
  });

  test('CRLF line ends are accepted', () => {
    const a = hex(32);
    const keys = parsePskFile(`# comment\r\nalice:${a}\r\nbob:${hex(32)}\r\n`);
    assert.deepEqual([...keys.keys()], ['alice', 'bob']);
    assert.deepEqual(keys.get('alice'), Buffer.from(a, 'hex'));
  });

  const bad: [string, string, RegExp][] = [
    ['a line without a colon', `alice:${hex(32)}\n# c\njustaname\n`, /line 3: expected identity:hexkey/],
    ['an empty identity', `:${hex(32)}\n`, /line 1: expected identity:hexkey/],
    ['an odd number of hex digits', `\nalice:${hex(32)}f\n`, /line 2: the key is not an even number of hex digits/],
    ['non-hex digits', `alice:${'zz'.repeat(32)}\n`, /line 1: the key is not an even number of hex digits/],
    ['an empty key', 'alice:\n', /line 1: the key is not/],
    ['a 15-byte key', `alice:${hex(15)}\n`, /line 1: a key of 15 bytes \(expected 16\.\.64/],
    ['a 65-byte key', `# x\nalice:${hex(65)}\n`, /line 2: a key of 65 bytes/],
    ['a duplicate identity', `alice:${hex(32)}\nbob:${hex(32)}\nalice:${hex(32)}\n`, /line 3: identity 'alice' appears twice/],
    ['an identity over 128 bytes', `${'a'.repeat(129)}:${hex(32)}\n`, /line 1: identity longer than 128 bytes/],
  ];
  for (const [what, text, re] of bad) {
    test(`${what} throws EINVAL with the file and line number`, () => {
      einval(() => parsePskFile(text, 'keys.psk'), re, 'keys.psk line ');
    });
  }

  test('CRLF files report the right line number too', () => {
    einval(() => parsePskFile(`alice:${hex(32)}\r\nbob:abc\r\n`, 'f'), /f line 2:/);
  });

  test('a file with no key line throws EINVAL', () => {
    einval(() => parsePskFile('# only a comment\n\n', 'keys.psk'), 'keys.psk: no identity:hexkey line');
  });
});

describe('loadTls', () => {
  let dir: string;
  /** An X.509 directory with a self-signed server certificate and key (and the same certificate as CA). */
  let certs: string;
  let psk: string;
  const key = hex(32);

  function openssl(...args: string[]): void {
    execFileSync('openssl', args, { stdio: 'ignore', timeout: 20_000 });
  }

  /** A fresh directory holding the named files of `certs`. */
  function partial(name: string, files: string[]): string {
    const d = path.join(dir, name);
    fs.mkdirSync(d);
    for (const f of files) fs.copyFileSync(path.join(certs, f), path.join(d, f));
    return d;
  }

  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-tls-config-'));
    certs = path.join(dir, 'certs');
    fs.mkdirSync(certs);
    openssl(
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', path.join(certs, TLS_FILES.key), '-out', path.join(certs, TLS_FILES.cert),
      '-subj', '/CN=localhost', '-days', '2',
    );
    fs.copyFileSync(path.join(certs, TLS_FILES.cert), path.join(certs, TLS_FILES.ca));
    psk = path.join(dir, 'keys.psk');
    fs.writeFileSync(psk, `alice:${key}\n`);
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  test("'off' without credentials is TLS_OFF", () => {
    assert.equal(loadTls({ mode: 'off' }), TLS_OFF);
    assert.equal(TLS_OFF.socketOptions, null);
  });

  test("'off' with credentials throws EINVAL", () => {
    einval(() => loadTls({ mode: 'off', psk }), /--tls off/);
    einval(() => loadTls({ mode: 'off', certificates: certs }), /--tls off/);
  });

  for (const mode of ['on', 'require'] as const) {
    test(`'${mode}' without credentials throws EINVAL asking for them`, () => {
      einval(() => loadTls({ mode }), `--tls ${mode} needs --tls-certificates DIR or --tls-psk FILE`);
    });
  }

  test('a PSK file loads its keys and server-side options', () => {
    const t = loadTls({ mode: 'require', psk });
    assert.equal(t.mode, 'require');
    assert.deepEqual(t.pskKeys.get('alice'), Buffer.from(key, 'hex'));
    assert.ok(t.socketOptions !== null);
    assert.equal(t.socketOptions.isServer, true);
    assert.equal(typeof (t.socketOptions as { pskCallback?: unknown }).pskCallback, 'function');
    assert.equal(t.verifyPeer, false);
  });

  test('a certificate directory loads, with verifyPeer requesting client certificates', () => {
    const t = loadTls({ mode: 'on', certificates: certs, verifyPeer: true });
    assert.equal(t.mode, 'on');
    assert.equal(t.verifyPeer, true);
    assert.equal(t.pskKeys.size, 0);
    assert.ok(t.socketOptions !== null);
    assert.equal(t.socketOptions.requestCert, true);
    assert.equal(t.socketOptions.rejectUnauthorized, true);
  });

  test('a PSK file that is not there is named', () => {
    const missing = path.join(dir, 'nope.psk');
    einval(() => loadTls({ mode: 'on', psk: missing }), `PSK file ${missing}: no such file`);
  });

  test('a PSK file that is a directory is refused', () => {
    einval(() => loadTls({ mode: 'on', psk: dir }), `PSK file ${dir}: not a regular file`);
  });

  test('a bad line in a PSK file is named with the file and line', () => {
    const f = path.join(dir, 'bad.psk');
    fs.writeFileSync(f, `alice:${key}\nbob:12\n`);
    einval(() => loadTls({ mode: 'on', psk: f }), `${f} line 2`);
  });

  test('a missing server-cert.pem is named', () => {
    const d = partial('no-cert', [TLS_FILES.key]);
    einval(() => loadTls({ mode: 'on', certificates: d }), `server certificate ${path.join(d, 'server-cert.pem')}: no such file`);
  });

  test('a missing server-key.pem is named', () => {
    const d = partial('no-key', [TLS_FILES.cert]);
    einval(() => loadTls({ mode: 'on', certificates: d }), `server key ${path.join(d, 'server-key.pem')}: no such file`);
  });

  test('a missing ca-cert.pem is named when verifyPeer needs it, and not needed without', () => {
    const d = partial('no-ca', [TLS_FILES.cert, TLS_FILES.key]);
    einval(() => loadTls({ mode: 'on', certificates: d, verifyPeer: true }), `CA certificate ${path.join(d, 'ca-cert.pem')}: no such file`);
    assert.equal(loadTls({ mode: 'on', certificates: d }).verifyPeer, false);
  });

  test('verifyPeer without a certificate directory throws EINVAL', () => {
    einval(() => loadTls({ mode: 'on', psk, verifyPeer: true }), /--tls-verify-peer/, '--tls-certificates DIR');
  });

  test('a certificate directory that is not there names the file looked for in it', () => {
    const d = path.join(dir, 'not-there');
    einval(() => loadTls({ mode: 'require', certificates: d }), `${path.join(d, 'server-cert.pem')}: no such file`);
  });

  test('a garbage PEM is refused at load time, naming the directory', () => {
    const d = partial('garbage', [TLS_FILES.key]);
    fs.writeFileSync(path.join(d, TLS_FILES.cert), '-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n');
    einval(() => loadTls({ mode: 'on', certificates: d }), `TLS certificates in ${d}:`);
  });

  test('a key that does not belong to the certificate is refused at load time', () => {
    const d = partial('mismatch', [TLS_FILES.cert]);
    openssl('genpkey', '-algorithm', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-out', path.join(d, TLS_FILES.key));
    einval(() => loadTls({ mode: 'on', certificates: d }), `TLS certificates in ${d}:`);
  });
});

describe('ExportPolicy', () => {
  const psk = (pskIdentity: string): TlsPeer => ({ protocol: 'TLSv1.3', cipher: 'TLS_AES_128_GCM_SHA256', pskIdentity });
  /** A verified certificate's peer, from its parsed subject fields (as describeTlsPeer builds it). */
  const cert = (fields: Record<string, string | string[]>): TlsPeer => ({
    protocol: 'TLSv1.3',
    cipher: 'TLS_AES_128_GCM_SHA256',
    subject: formatSubject(fields),
    subjectFields: subjectFieldsOf(fields),
  });
  const clear = { address: '127.0.0.1', tls: null };

  test('no rules: everyone, in clear or not', () => {
    const p = new ExportPolicy({});
    assert.equal(p.tlsOnly, false);
    assert.equal(p.access(clear), 'ok');
    assert.equal(p.access({ tls: psk('x') }), 'ok');
  });

  test("tls 'require': 'tls' in clear, 'ok' over TLS whatever the identity", () => {
    const p = new ExportPolicy({ tls: 'require' });
    assert.equal(p.tlsOnly, true);
    assert.equal(p.access(clear), 'tls');
    assert.equal(p.access({ ...clear, tls: psk('anyone') }), 'ok');
    assert.equal(p.access({ ...clear, tls: cert({ CN: 'x' }) }), 'ok');
  });

  test("pskIdentities imply TLS and admit only the listed identities", () => {
    const p = new ExportPolicy({ pskIdentities: ['alice', 'carol'] });
    assert.equal(p.tlsOnly, true);
    assert.equal(p.access(clear), 'tls');
    assert.equal(p.access({ tls: psk('alice') }), 'ok');
    assert.equal(p.access({ tls: psk('carol') }), 'ok');
    assert.equal(p.access({ tls: psk('bob') }), 'denied');
    assert.equal(p.access({ tls: cert({ CN: 'alice' }) }), 'denied', 'a certificate is not a PSK identity');
  });

  test('a subject rule CN=alice matches C=US,O=test,CN=alice and not CN=bob', () => {
    const p = new ExportPolicy({ subjects: ['CN=alice'] });
    assert.equal(p.tlsOnly, true);
    assert.equal(p.access(clear), 'tls');
    assert.equal(p.access({ tls: cert({ C: 'US', O: 'test', CN: 'alice' }) }), 'ok');
    assert.equal(p.access({ tls: cert({ C: 'US', O: 'test', CN: 'bob' }) }), 'denied');
    assert.equal(p.access({ tls: cert({ C: 'US', O: 'test', CN: 'alice2' }) }), 'denied', 'parts match whole, not by prefix');
    assert.equal(p.access({ tls: psk('alice') }), 'denied', 'a PSK identity is not a subject');
  });

  test('a subject rule of several parts needs all of them, in any order', () => {
    const p = new ExportPolicy({ subjects: ['O=test, CN=alice'] });
    assert.equal(p.access({ tls: cert({ CN: 'alice', O: 'test', C: 'US' }) }), 'ok');
    assert.equal(p.access({ tls: cert({ C: 'US', O: 'other', CN: 'alice' }) }), 'denied');
  });

  test('formatSubject writes KEY=VALUE parts in order, multi-valued ones joined with +', () => {
    assert.equal(formatSubject({ C: 'US', O: 'test', CN: 'alice' }), 'C=US,O=test,CN=alice');
    assert.equal(formatSubject({ OU: ['a', 'b'], CN: 'x', L: undefined }), 'OU=a+b,CN=x');
  });

  test("a subject whose CN value contains ',CN=alice' does not match the rule CN=alice", () => {
    // Rules match the parsed fields: in the subject string a ',' inside a value would
    // read as a field boundary, so CN='mallory,CN=alice' would look like it had CN=alice.
    const p = new ExportPolicy({ subjects: ['CN=alice'] });
    assert.equal(p.access({ tls: cert({ C: 'US', O: 'test', CN: 'mallory,CN=alice' }) }), 'denied');
  });

  test('any one of several subject rules admits', () => {
    const p = new ExportPolicy({ subjects: ['CN=alice', 'O=ops'] });
    assert.equal(p.access({ tls: cert({ O: 'ops', CN: 'dave' }) }), 'ok');
    assert.equal(p.access({ tls: cert({ O: 'dev', CN: 'dave' }) }), 'denied');
  });

  test('pskIdentities and subjects together: either kind admits', () => {
    const p = new ExportPolicy({ pskIdentities: ['alice'], subjects: ['CN=bob'] });
    assert.equal(p.access({ tls: psk('alice') }), 'ok');
    assert.equal(p.access({ tls: cert({ O: 'x', CN: 'bob' }) }), 'ok');
    assert.equal(p.access({ tls: psk('bob') }), 'denied');
  });

  test('address rules are checked first: a refused address is denied even in clear', () => {
    const p = new ExportPolicy({ tls: 'require', allow: ['10.0.0.0/8'] });
    assert.equal(p.access(clear), 'denied');
    assert.equal(p.access({ address: '10.1.1.1', tls: null }), 'tls');
    assert.equal(p.access({ address: '10.1.1.1', tls: psk('x') }), 'ok');
  });

  test('uid rules make usesUids true', () => {
    assert.equal(new ExportPolicy({ allow: ['uid:1000'] }).usesUids, true);
    assert.equal(new ExportPolicy({ allow: ['10.0.0.0/8'] }).usesUids, false);
    assert.equal(new ExportPolicy({ allow: ['uid:1000'] }).access({ uid: 1000, tls: null }), 'ok');
    assert.equal(new ExportPolicy({ allow: ['uid:1000'] }).access({ uid: 0, tls: null }), 'denied');
  });

  const badSubjects = ['alice', 'CN', '=alice', 'CN=', ',', '1CN=alice', 'CN=alice,bob'];
  for (const s of badSubjects) {
    test(`a bad subject rule '${s}' throws EINVAL naming where and the index`, () => {
      einval(() => new ExportPolicy({ subjects: ['CN=ok', s] }, "exports 'disk'"), "exports 'disk'.subjects[1]", `'${s}'`);
    });
  }

  test('a bad address rule throws EINVAL naming where', () => {
    einval(() => new ExportPolicy({ deny: ['10.0.0.0/40'] }, "exports 'disk'"), "exports 'disk'.deny[0]");
  });
});

describe('parseConfig: TLS and access keys', () => {
  const backend = { type: 'memory', size: '1M' };

  test('a config with every new listener and export key parses', () => {
    const cfg = parseConfig({
      listen: [
        { host: '127.0.0.1', port: 10809, tls: 'on', tlsCertificates: '/etc/blockgate/tls', tlsVerifyPeer: true, allow: ['127.0.0.0/8', '::1'], deny: ['127.0.0.9'] },
        { host: '::', port: 10810, tls: 'require', tlsPsk: 'keys.psk', allow: ['fd00::/8'] },
        { path: '/run/blockgate.sock', tls: 'off', allow: ['uid:0', 'uid:1000'] },
      ],
      exports: [
        { name: 'disk', backend, tls: 'require', pskIdentities: ['alice'], subjects: ['O=test,CN=alice'], allow: ['10.0.0.0/8'], deny: ['10.0.0.1'] },
        { name: 'open', backend },
      ],
    });
    assert.equal(cfg.listen?.length, 3);
    const l0 = cfg.listen![0]!;
    assert.ok('host' in l0);
    assert.equal(l0.tls, 'on');
    assert.equal(l0.tlsVerifyPeer, true);
    assert.deepEqual(l0.allow, ['127.0.0.0/8', '::1']);
    const l1 = cfg.listen![1]!;
    assert.equal(l1.tlsPsk, 'keys.psk');
    assert.equal(cfg.exports[0]!.tls, 'require');
    assert.deepEqual(cfg.exports[0]!.pskIdentities, ['alice']);
    assert.deepEqual(cfg.exports[0]!.subjects, ['O=test,CN=alice']);
  });

  test('a bad listener tls value is refused, naming the listener', () => {
    einval(() => parseConfig({ listen: [{ host: '127.0.0.1', port: 1, tls: 'maybe' }], exports: [{ name: 'd', backend }] }), 'config: listen[0]');
  });

  test("an export tls other than 'require' is refused, naming exports[0].tls", () => {
    einval(() => parseConfig({ exports: [{ name: 'd', backend, tls: 'on' }] }), 'config: exports[0].tls:', '"require"');
  });

  test('a bad CIDR in listen[0].allow[0] is named in the message', () => {
    einval(
      () => parseConfig({ listen: [{ host: '127.0.0.1', port: 1, allow: ['10.0.0.0/33'] }], exports: [{ name: 'd', backend }] }),
      "config: listen[0].allow[0]: '10.0.0.0/33'",
    );
  });

  test('a bad rule in a later listener and list position is named', () => {
    einval(
      () => parseConfig({ listen: [{ path: '/a.sock' }, { path: '/b.sock', deny: ['uid:0', 'uid:x'] }], exports: [{ name: 'd', backend }] }),
      'config: listen[1].deny[1]',
    );
  });

  test('bad export rules are named with their key path', () => {
    einval(() => parseConfig({ exports: [{ name: 'd', backend }, { name: 'e', backend, subjects: ['alice'] }] }), 'config: exports[1].subjects[0]');
    einval(() => parseConfig({ exports: [{ name: 'd', backend, allow: ['::1/129'] }] }), 'config: exports[0].allow[0]');
    einval(() => parseConfig({ exports: [{ name: 'd', backend, pskIdentities: [1] }] }), 'config: exports[0].pskIdentities[0]');
  });
});
