/**
 * Test credentials for the TLS interop tests, made with GnuTLS's certtool and psktool
 * (Debian's gnutls-bin) in a temporary directory: once per process (the first call
 * makes them, later calls share the result), removed when the process exits.
 *
 * X.509:
 * - a CA, and a server certificate it signs for `localhost`, 127.0.0.1 and ::1, laid
 *   out as `blockgate serve --tls-certificates DIR` (and nbdkit, qemu-nbd) read it:
 *   server-cert.pem, server-key.pem, ca-cert.pem;
 * - client directories in the layout libnbd's `tls-certificates=DIR` and qemu's
 *   `tls-creds-x509,endpoint=client,dir=DIR` read (ca-cert.pem, client-cert.pem,
 *   client-key.pem), each trusting the server's CA: alice (CN=alice, signed by the CA),
 *   mallory (CN=mallory, signed by a second CA the server does not know), expired
 *   (CN=expired, signed by the CA, valid only in 2020), forgedAlice (CN=alice, but
 *   signed by the second CA: a subject rule must not be satisfied by it), and caOnly
 *   (no client certificate at all).
 *
 * PSK (psktool's `identity:hexkey` format):
 * - server: alice and carol, the file the server is given;
 * - alice, carol: each client's own line; wrongAlice: alice with another key; bob: an
 *   identity the server does not know;
 * - qemuAlice: a directory holding alice's line as keys.psk, which qemu's
 *   `tls-creds-psk,dir=DIR` wants.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { runOk } from './run.js';

/** Days the certificates that should be valid are valid for. */
const VALID_DAYS = 30;
/** RSA key size: fast to generate, accepted by every TLS stack here. */
const RSA_BITS = 2048;
/** Bound on one certtool or psktool run. */
const TOOL_TIMEOUT_MS = 30_000;

export interface ClientDirs {
  /** CN=alice, signed by the server's CA. */
  readonly alice: string;
  /** CN=mallory, signed by the other CA. */
  readonly mallory: string;
  /** CN=expired, signed by the server's CA, expired since 2020. */
  readonly expired: string;
  /** CN=alice, signed by the other CA. */
  readonly forgedAlice: string;
  /** The server's CA only, no client certificate. */
  readonly caOnly: string;
}

export interface PskFiles {
  /** alice and carol: the server's file. */
  readonly server: string;
  readonly alice: string;
  readonly carol: string;
  /** alice with a key that is not hers. */
  readonly wrongAlice: string;
  /** bob, unknown to the server. */
  readonly bob: string;
  /** A directory whose keys.psk holds alice's line (qemu's tls-creds-psk dir=). */
  readonly qemuAlice: string;
}

export interface Pki {
  /** The temporary directory everything is in. */
  readonly root: string;
  /** server-cert.pem, server-key.pem and ca-cert.pem for `serve --tls-certificates`. */
  readonly serverDir: string;
  readonly clients: ClientDirs;
  readonly psk: PskFiles;
}

let made: Promise<Pki> | null = null;

/** The test credentials, made on the first call (cached for the process, removed at exit). */
export function pki(): Promise<Pki> {
  return (made ??= makePki());
}

function certtool(args: string[]): Promise<unknown> {
  return runOk('certtool', args, { timeoutMs: TOOL_TIMEOUT_MS });
}

async function makePki(): Promise<Pki> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-pki-'));
  process.on('exit', () => fs.rmSync(root, { recursive: true, force: true }));
  const work = path.join(root, 'work');
  fs.mkdirSync(work);
  const f = (name: string): string => path.join(work, name);

  const key = (name: string) => certtool(['--generate-privkey', '--key-type=rsa', `--bits=${RSA_BITS}`, '--outfile', f(name)]);
  const template = (name: string, lines: string[]): string => {
    fs.writeFileSync(f(name), `${lines.join('\n')}\n`);
    return f(name);
  };
  const selfSigned = async (name: string, cn: string): Promise<void> => {
    await key(`${name}-key.pem`);
    const t = template(`${name}.info`, [`cn = "${cn}"`, 'ca', 'cert_signing_key', `expiration_days = ${VALID_DAYS}`]);
    await certtool(['--generate-self-signed', '--load-privkey', f(`${name}-key.pem`), '--template', t, '--outfile', f(`${name}-cert.pem`)]);
  };
  const signed = async (name: string, ca: string, lines: string[]): Promise<void> => {
    await key(`${name}-key.pem`);
    const t = template(`${name}.info`, lines);
    await certtool([
      '--generate-certificate',
      '--load-privkey',
      f(`${name}-key.pem`),
      '--load-ca-certificate',
      f(`${ca}-cert.pem`),
      '--load-ca-privkey',
      f(`${ca}-key.pem`),
      '--template',
      t,
      '--outfile',
      f(`${name}-cert.pem`),
    ]);
  };
  const client = (cn: string, validity: string[]): string[] => [`cn = "${cn}"`, 'tls_www_client', 'signing_key', 'encryption_key', ...validity];
  const valid = [`expiration_days = ${VALID_DAYS}`];

  await Promise.all([selfSigned('ca', 'blockgate test CA'), selfSigned('ca2', 'blockgate other test CA')]);
  await Promise.all([
    signed('server', 'ca', [
      'cn = "localhost"',
      'dns_name = "localhost"',
      'ip_address = "127.0.0.1"',
      'ip_address = "::1"',
      'tls_www_server',
      'signing_key',
      'encryption_key',
      ...valid,
    ]),
    signed('alice', 'ca', client('alice', valid)),
    signed('mallory', 'ca2', client('mallory', valid)),
    signed('forgedAlice', 'ca2', client('alice', valid)),
    signed('expired', 'ca', client('expired', ['activation_date = "2020-01-01 00:00:00 UTC"', 'expiration_date = "2020-12-31 00:00:00 UTC"'])),
  ]);

  const dir = (name: string, files: Record<string, string>): string => {
    const d = path.join(root, name);
    fs.mkdirSync(d, { mode: 0o700 });
    for (const [to, from] of Object.entries(files)) fs.copyFileSync(f(from), path.join(d, to));
    return d;
  };
  const serverDir = dir('server', { 'ca-cert.pem': 'ca-cert.pem', 'server-cert.pem': 'server-cert.pem', 'server-key.pem': 'server-key.pem' });
  const clientDir = (name: string) =>
    dir(`client-${name}`, { 'ca-cert.pem': 'ca-cert.pem', 'client-cert.pem': `${name}-cert.pem`, 'client-key.pem': `${name}-key.pem` });
  const clients: ClientDirs = {
    alice: clientDir('alice'),
    mallory: clientDir('mallory'),
    expired: clientDir('expired'),
    forgedAlice: clientDir('forgedAlice'),
    caOnly: dir('client-ca-only', { 'ca-cert.pem': 'ca-cert.pem' }),
  };

  const pskDir = path.join(root, 'psk');
  fs.mkdirSync(pskDir, { mode: 0o700 });
  const p = (name: string): string => path.join(pskDir, name);
  const psktool = (user: string, file: string) => runOk('psktool', ['-u', user, '-p', file], { timeoutMs: TOOL_TIMEOUT_MS });
  await psktool('alice', p('alice.psk'));
  await psktool('carol', p('carol.psk'));
  await psktool('alice', p('wrong-alice.psk'));
  await psktool('bob', p('bob.psk'));
  const alice = fs.readFileSync(p('alice.psk'), 'utf8');
  const carol = fs.readFileSync(p('carol.psk'), 'utf8');
  if (alice === fs.readFileSync(p('wrong-alice.psk'), 'utf8')) throw new Error('psktool made the same key twice');
  fs.writeFileSync(p('server.psk'), alice + carol, { mode: 0o600 });
  const qemuAlice = path.join(root, 'qemu-psk-alice');
  fs.mkdirSync(qemuAlice, { mode: 0o700 });
  fs.writeFileSync(path.join(qemuAlice, 'keys.psk'), alice, { mode: 0o600 });

  return {
    root,
    serverDir,
    clients,
    psk: {
      server: p('server.psk'),
      alice: p('alice.psk'),
      carol: p('carol.psk'),
      wrongAlice: p('wrong-alice.psk'),
      bob: p('bob.psk'),
      qemuAlice,
    },
  };
}
