/**
 * Interop, NBD over TLS (STARTTLS) with real clients: `blockgate serve` children on
 * 127.0.0.1, ::1 and a unix socket (port 0, the port read from --print-uri), and
 * libnbd's nbdinfo, nbdcopy and nbdsh, qemu-img, and nbdkit's nbd plugin as a client
 * (nbdkit relays a TLS upstream to a clear unix socket). Credentials come from
 * test/helpers/pki.ts (certtool, psktool).
 *
 * Covered: PSK (the README's `serve --tls require --tls-psk keys.psk disk.img` with a
 * file export) and X.509 (with and without --tls-verify-peer, TCP and unix); data
 * copied in and out and compared byte for byte (nbdcopy, qemu-img convert); what
 * libnbd reports as negotiated after STARTTLS; TLS 1.2 forced from the client side
 * (GnuTLS's system priority file for libnbd, qemu's tls-creds priority=); and the
 * failures: no TLS against --tls require, wrong PSK key, unknown identity, client
 * certificates from another CA / expired / missing, garbage or a hang-up instead of a
 * ClientHello, listener allow/deny rules (IPv4 and IPv6), TLS-only exports hidden from
 * clear --list, per-export PSK identities and certificate subjects. Every failure checks
 * that the client fails cleanly, that the server logs a line naming the peer, and that a
 * later good client still works. The server logs the TLS protocol and suite of each
 * session ('TLS established'); the tests print them as diagnostics (docs/SECURITY.md).
 *
 * libnbd 1.14 has no extended headers (no get_extended_headers_negotiated), so
 * NBD_OPT_EXTENDED_HEADERS after STARTTLS is checked with a Node TLS client.
 *
 * Every server runs with `-l debug` (the per-session 'option' and 'closed' lines are how
 * a test sees that a refused session is gone); every wait is bounded; every child still
 * alive is killed by PID in `after`.
 */
import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { run, runOk, type RunResult } from '../helpers/run.js';
import { ChildSet, type Child } from '../helpers/children.js';
import { pki, type Pki } from '../helpers/pki.js';
import { seededBytes } from '../helpers/data.js';
import { assertSameBytes } from '../helpers/assertions.js';
import { ByteSocket } from '../helpers/byte-socket.js';
import { NBD_CLIENT_FLAG, NBD_OPT, NBD_REP, NBD_SIZE } from '../../src/nbd/constants.js';
import { decodeOptionReplyHeader, encodeInfoRequest, encodeOption } from '../../src/nbd/codec.js';

const MiB = 1024 * 1024;
/** Bound of one test. */
const TEST = { timeout: 120_000 };
/** How many times a log line is looked for, and the pause between looks (a bound by count). */
const LOG_POLLS = 200;
const LOG_POLL_MS = 50;
/** Bound on a raw client's reads and connects. */
const RAW_MS = 10_000;
/** How much the copy tests move. */
const COPY_SIZE = 8 * MiB;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-interop-tls-'));
const children = new ChildSet();
let creds: Pki;

before(async () => {
  creds = await pki();
});
after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------
// Servers and their logs

interface LogLine {
  readonly msg: string;
  readonly level: number;
  readonly session?: number;
  readonly peer?: string;
  readonly [key: string]: unknown;
}

interface Served {
  readonly child: Child;
  /** What --print-uri printed (the default export). */
  readonly uri: string;
  /** The TCP port (0 on a unix socket). */
  readonly port: number;
}

/** Starts `blockgate serve --no-control --print-uri -l debug ARGS`; resolves once it printed its URI. */
async function serve(args: readonly string[]): Promise<Served> {
  const child = children.blockgate(['serve', '--no-control', '--print-uri', '-l', 'debug', ...args]);
  const [uri] = await child.waitFor(/^nbds?(\+unix)?:\/\/\S+$/m);
  const port = /^nbds?:\/\/(?:\[[^\]]+\]|[^/:]+):(\d+)\//.exec(uri);
  return { child, uri, port: port ? Number(port[1]) : 0 };
}

/** SIGTERM by PID; the server must exit 0 (it survived everything the test did). */
async function stop(s: Served | undefined): Promise<void> {
  if (!s || s.child.proc.exitCode !== null) return;
  s.child.proc.kill('SIGTERM');
  assert.equal(await s.child.exited(), 0, `serve exited badly; stderr: ${s.child.stderr()}`);
}

function logLines(s: Served): LogLine[] {
  return s.child
    .stderr()
    .split('\n')
    .filter((l) => l.startsWith('{') && l.endsWith('}'))
    .map((l) => JSON.parse(l) as LogLine);
}

/** The number of log lines so far: pass it to logLine to look only at what came after. */
function mark(s: Served): number {
  return logLines(s).length;
}

/** Waits (bounded by a count) for a log line after `from` that satisfies `pred`. */
async function logLine(s: Served, from: number, pred: (l: LogLine) => boolean, what: string): Promise<LogLine> {
  for (let i = 0; i < LOG_POLLS; i++) {
    const found = logLines(s).slice(from).find(pred);
    if (found) return found;
    if (s.child.proc.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, LOG_POLL_MS));
  }
  throw new Error(`no log line: ${what}; log since the mark:\n${logLines(s).slice(from).map((l) => JSON.stringify(l)).join('\n')}`);
}

const IPV4_PEER = /^127\.0\.0\.1:\d+$/;

/**
 * After a refused client: a line of the refusal naming the peer (`pred` picks it), the
 * session's 'closed' line (nothing of it is left), and the server still running.
 */
async function refusedAndGone(s: Served, from: number, pred: (l: LogLine) => boolean, what: string, peer = IPV4_PEER): Promise<LogLine> {
  const line = await logLine(s, from, pred, what);
  assert.match(String(line.peer), peer, `the refusal names the peer: ${JSON.stringify(line)}`);
  if (line.session !== undefined) {
    await logLine(s, from, (l) => l.session === line.session && l.msg === 'closed', `session ${line.session} closed`);
  }
  assert.equal(s.child.proc.exitCode, null, 'the server is still running');
  return line;
}

/** The 'TLS established' line of the next session after `from`. */
function established(s: Served, from: number): Promise<LogLine> {
  return logLine(s, from, (l) => l.msg === 'TLS established', 'TLS established');
}

/** Reports what a session negotiated (the measurements docs/SECURITY.md records). */
function report(t: TestContext, what: string, l: LogLine): void {
  t.diagnostic(`${what}: ${String(l.protocol)} ${String(l.cipher)}${l.pskIdentity ? ` identity=${String(l.pskIdentity)}` : ''}${l.subject ? ` subject=${String(l.subject)}` : ''}`);
}

/** A client run that must fail: non-zero exit and an error message; the message is reported. */
function failed(t: TestContext, r: RunResult, re: RegExp, what: string): void {
  assert.notEqual(r.code, 0, `${what}: the client must fail; stdout: ${r.stdout}`);
  assert.equal(r.signal, null, `${what}: the client exited on its own`);
  assert.match(r.stderr, re, what);
  t.diagnostic(`${what}: ${r.stderr.trim().split('\n').join(' | ')}`);
}

/**
 * The server's error messages of the options libnbd sent: its debug lines carry them
 * (nbdinfo itself only prints the errno it maps the reply to). Runs nbdinfo again with
 * LIBNBD_DEBUG=1, so that the message the failing run printed stays readable.
 */
async function serverMessages(args: string[]): Promise<string[]> {
  const r = await run('nbdinfo', args, { env: { LIBNBD_DEBUG: '1' } });
  assert.notEqual(r.code, 0);
  return [...r.stderr.matchAll(/server error message: (.*)$/gm)].map((m) => m[1]!);
}

/** A refusal of a client certificate in the log: today's 'TLS handshake failed', or a line naming the certificate. */
const CERT_REFUSAL = (l: LogLine): boolean => l.msg !== 'TLS established' && /TLS handshake failed|certificate|authori[sz]/i.test(l.msg);

/** A GnuTLS system priority file that disables TLS 1.3 for every program using GnuTLS (libnbd has no priority setting). */
function noTls13Env(): Record<string, string> {
  const f = path.join(tmp, 'gnutls-no-tls13.conf');
  if (!fs.existsSync(f)) fs.writeFileSync(f, '[overrides]\ndisabled-version = tls1.3\n');
  return { GNUTLS_SYSTEM_PRIORITY_FILE: f };
}

/** A `qemu-img --object` for PSK as alice (qemu reads DIR/keys.psk). */
function qemuPsk(priority?: string): string[] {
  return ['--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${creds.psk.qemuAlice},username=alice${priority ? `,priority=${priority}` : ''}`];
}
function qemuX509(dir: string, priority?: string): string[] {
  return ['--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${dir}${priority ? `,priority=${priority}` : ''}`];
}
/** qemu's `--image-opts` string for an NBD export on 127.0.0.1 through tls0. */
function qemuNbd(port: number, exportName = '', host = '127.0.0.1'): string {
  return `driver=raw,file.driver=nbd,file.host=${host},file.port=${port},file.export=${exportName},file.tls-creds=tls0`;
}

// ---------------------------------------------------------------------------------------
// Raw clients (node:net and node:tls) for what no real client does

const NBDMAGIC = Buffer.from('NBDMAGIC');

/** Connects over TCP, reads the greeting and sends fixed-newstyle client flags. */
async function rawGreet(port: number, host = '127.0.0.1', localAddress?: string): Promise<ByteSocket> {
  const s = await new Promise<net.Socket>((resolve, reject) => {
    const sock = net.connect({ port, host, ...(localAddress ? { localAddress } : {}) }, () => resolve(sock));
    sock.once('error', reject);
    sock.setTimeout(RAW_MS, () => sock.destroy(new Error('raw client timed out')));
  });
  const b = new ByteSocket(s);
  const greeting = await b.read(NBD_SIZE.GREETING, RAW_MS);
  assert.ok(greeting.subarray(0, 8).equals(NBDMAGIC), 'the greeting starts with NBDMAGIC');
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(NBD_CLIENT_FLAG.NBD_FLAG_C_FIXED_NEWSTYLE | NBD_CLIENT_FLAG.NBD_FLAG_C_NO_ZEROES);
  b.write(flags);
  return b;
}

/** Sends an option and reads replies up to the final one (ACK or an error). */
async function rawOption(b: ByteSocket, opt: number, data?: Buffer): Promise<{ type: number; data: Buffer }[]> {
  b.write(encodeOption(opt, data));
  const replies: { type: number; data: Buffer }[] = [];
  for (;;) {
    const h = decodeOptionReplyHeader(await b.read(NBD_SIZE.OPTION_REPLY_HEADER, RAW_MS));
    assert.ok(h.magicOk && h.option === opt, `a reply to option ${opt}`);
    replies.push({ type: h.type, data: await b.read(h.length, RAW_MS) });
    if (h.type === NBD_REP.NBD_REP_ACK || h.type >= 0x80000000) return replies;
  }
}

/** Greets, sends STARTTLS and reads its ACK (the clear part of a TLS session). */
async function rawStartTls(port: number): Promise<ByteSocket> {
  const b = await rawGreet(port);
  const r = await rawOption(b, NBD_OPT.NBD_OPT_STARTTLS);
  assert.deepEqual(r.map((x) => x.type), [NBD_REP.NBD_REP_ACK], 'STARTTLS is acknowledged');
  return b;
}

/** The peer string the server logs for a raw client's socket. */
function peerOf(b: ByteSocket): string {
  return `${b.socket.localAddress}:${b.socket.localPort}`;
}

/** After STARTTLS's ACK, runs a Node TLS client handshake on the same socket. */
function tlsOver(b: ByteSocket, opts: tls.ConnectionOptions): Promise<ByteSocket> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ socket: b.socket, servername: 'localhost', ...opts }, () => resolve(new ByteSocket(s)));
    s.once('error', reject);
    s.once('close', () => reject(new Error('closed during the TLS handshake')));
    s.setTimeout(RAW_MS, () => s.destroy(new Error('TLS client timed out')));
  });
}

// ---------------------------------------------------------------------------------------

describe('PSK: serve --tls require --tls-psk keys.psk disk.img (the README example)', () => {
  const DISK = path.join(tmp, 'disk.img');
  let srv: Served;
  let alice: string;
  before(async () => {
    fs.writeFileSync(DISK, Buffer.alloc(16 * MiB));
    srv = await serve(['-a', '127.0.0.1', '-p', '0', '--tls', 'require', '--tls-psk', creds.psk.server, DISK]);
    alice = `nbds://alice@127.0.0.1:${srv.port}/?tls-psk-file=${creds.psk.alice}`;
  });
  after(() => stop(srv));

  /** A good client after a failure: the server still serves. */
  const stillServes = async (): Promise<void> => {
    const r = await runOk('nbdinfo', ['--size', alice]);
    assert.equal(r.stdout.trim(), String(16 * MiB));
  };

  test('--print-uri says nbds:// with the key file (no identity: the file has two)', () => {
    assert.equal(srv.uri, `nbds://127.0.0.1:${srv.port}/?tls-psk-file=${encodeURIComponent(creds.psk.server)}`);
  });

  test('with a one-identity key file, the printed URI works as is with nbdinfo', TEST, async () => {
    const one = await serve(['-a', '127.0.0.1', '-p', '0', '--tls-psk', creds.psk.alice, 'memory:1M']);
    try {
      assert.equal(one.uri, `nbds://alice@127.0.0.1:${one.port}/?tls-psk-file=${encodeURIComponent(creds.psk.alice)}`);
      const r = await runOk('nbdinfo', ['--size', one.uri]);
      assert.equal(r.stdout.trim(), String(MiB));
    } finally {
      await stop(one);
    }
  });

  test('nbdinfo nbds://alice@127.0.0.1:PORT/?tls-psk-file=...: TLS, the file export; the log has identity, protocol and suite', TEST, async (t) => {
    const m = mark(srv);
    const r = await runOk('nbdinfo', [alice]);
    assert.match(r.stdout, /^protocol: newstyle-fixed with TLS, using structured packets$/m);
    assert.match(r.stdout, /^\texport-size: 16777216 \(16M\)$/m);
    assert.match(r.stdout, new RegExp(`^\\tdescription: file ${DISK.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} 16MiB$`, 'm'));
    const l = await established(srv, m);
    assert.equal(l.pskIdentity, 'alice');
    assert.match(String(l.peer), IPV4_PEER);
    assert.equal(l.subject, undefined);
    report(t, 'libnbd PSK, default priority', l);
    const j = JSON.parse((await runOk('nbdinfo', ['--json', alice])).stdout) as { TLS: boolean; structured: boolean };
    assert.equal(j.TLS, true);
    assert.equal(j.structured, true);
  });

  test('nbdcopy of 8 MiB of random data into the export and out again: byte for byte, also in the file', TEST, async () => {
    const src = path.join(tmp, 'psk-src.img');
    const out = path.join(tmp, 'psk-out.img');
    const data = seededBytes(0x9e1, COPY_SIZE);
    fs.writeFileSync(src, data);
    await runOk('nbdcopy', [src, alice]);
    await runOk('nbdcopy', [alice, out]);
    const back = fs.readFileSync(out);
    assert.equal(back.length, 16 * MiB);
    assertSameBytes(back.subarray(0, COPY_SIZE), data, 'nbdcopy out of the TLS export');
    assertSameBytes(fs.readFileSync(DISK).subarray(0, COPY_SIZE), data, 'the exported file after nbdcopy in');
  });

  test('nbdsh: TLS and structured replies negotiated after STARTTLS, by URI and by the API; no extended headers in libnbd 1.14', TEST, async (t) => {
    const r = await runOk('nbdsh', [
      '-c',
      [
        'import os',
        'h.set_uri_allow_local_file(True)',
        'h.connect_uri(os.environ["uri"])',
        'assert h.get_tls_negotiated()',
        'assert h.get_structured_replies_negotiated()',
        'assert h.get_protocol() == "newstyle-fixed"',
        'assert h.get_tls_username() == "alice"',
        'h.pwrite(b"\\x5a" * 65536, 12 * 1048576)',
        'h.flush()',
        'assert h.pread(65536, 12 * 1048576) == b"\\x5a" * 65536',
        'print("extended", hasattr(h, "get_extended_headers_negotiated"))',
        'h.shutdown()',
        'g = nbd.NBD()',
        'g.set_tls(nbd.TLS_REQUIRE)',
        'g.set_tls_psk_file(os.environ["psk"])',
        'g.set_tls_username("alice")',
        'g.connect_tcp("127.0.0.1", os.environ["port"])',
        'assert g.get_tls_negotiated() and g.get_structured_replies_negotiated()',
        'assert g.pread(65536, 12 * 1048576) == b"\\x5a" * 65536',
        'g.shutdown()',
        'print("nbdsh ok")',
      ].join('\n'),
    ], { env: { uri: alice, psk: creds.psk.alice, port: String(srv.port) } });
    assert.match(r.stdout, /nbdsh ok/);
    t.diagnostic(`libnbd 1.14 get_extended_headers_negotiated: ${/extended True/.test(r.stdout) ? 'present' : 'absent'}`);
    // nbdsh -u alone cannot open this URI: libnbd refuses tls-psk-file unless the program allows local files.
    const u = await run('nbdsh', ['-u', alice, '-c', 'assert h.get_tls_negotiated()']);
    failed(t, u, /local file access \(tls-psk-file\) is not allowed/, 'nbdsh -u with tls-psk-file (libnbd, not the server)');
  });

  test('qemu-img info (--image-opts and json:) and convert in and out with tls-creds-psk; compare says identical', TEST, async () => {
    const info = await runOk('qemu-img', ['info', ...qemuPsk(), '--image-opts', `driver=nbd,host=127.0.0.1,port=${srv.port},export=,tls-creds=tls0`]);
    assert.match(info.stdout, /^virtual size: 16 MiB \(16777216 bytes\)$/m);
    const json = `json:${JSON.stringify({ driver: 'raw', file: { driver: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: String(srv.port) }, 'tls-creds': 'tls0' } })}`;
    const j = await runOk('qemu-img', ['info', ...qemuPsk(), '--output=json', json]);
    assert.equal((JSON.parse(j.stdout) as Record<string, unknown>)['virtual-size'], 16 * MiB);

    const src = path.join(tmp, 'qemu-psk-src.img');
    const out = path.join(tmp, 'qemu-psk-out.img');
    const data = seededBytes(0x0e51, 16 * MiB);
    data.fill(0, 4 * MiB, 6 * MiB);
    fs.writeFileSync(src, data);
    await runOk('qemu-img', ['convert', '-n', ...qemuPsk(), '-f', 'raw', src, '--target-image-opts', qemuNbd(srv.port)]);
    await runOk('qemu-img', ['convert', ...qemuPsk(), '--image-opts', qemuNbd(srv.port), '-O', 'raw', out]);
    assertSameBytes(fs.readFileSync(out), data, 'qemu-img convert out of the TLS export');
    assertSameBytes(fs.readFileSync(DISK), data, 'the exported file after qemu-img convert in');
    const cmp = await runOk('qemu-img', ['compare', ...qemuPsk(), '--image-opts', `driver=raw,file.driver=file,file.filename=${src}`, qemuNbd(srv.port)]);
    assert.match(cmp.stdout, /Images are identical/);
  });

  test("nbdkit's nbd plugin as a TLS client (tls-psk, tls-username), read through with nbdinfo and nbdcopy", TEST, async (t) => {
    const sock = path.join(tmp, 'nbdkit-psk.sock');
    const m = mark(srv);
    const kit = children.start('nbdkit', [
      '-f', '-U', sock, 'nbd', 'hostname=127.0.0.1', `port=${srv.port}`, 'tls=require', `tls-psk=${creds.psk.alice}`, 'tls-username=alice',
    ]);
    try {
      await untilExists(sock, kit);
      const relay = `nbd+unix:///?socket=${sock}`;
      const info = await runOk('nbdinfo', [relay]);
      assert.match(info.stdout, /^\texport-size: 16777216 \(16M\)$/m);
      const out = path.join(tmp, 'nbdkit-psk-out.img');
      await runOk('nbdcopy', [relay, out]);
      assertSameBytes(fs.readFileSync(out), fs.readFileSync(DISK), 'nbdcopy through nbdkit');
      const l = await established(srv, m);
      assert.equal(l.pskIdentity, 'alice');
      report(t, 'nbdkit nbd plugin (libnbd) PSK', l);
    } finally {
      kit.proc.kill('SIGTERM');
      await kit.exited();
    }
  });

  test('TLS 1.2 forced from the client: libnbd with GnuTLS overrides, qemu with priority=NORMAL:-VERS-TLS1.3', TEST, async (t) => {
    let m = mark(srv);
    const r = await runOk('nbdinfo', [alice], { env: noTls13Env() });
    assert.match(r.stdout, /with TLS/);
    const l = await established(srv, m);
    assert.equal(l.protocol, 'TLSv1.2');
    report(t, 'libnbd PSK, TLS 1.3 disabled', l);
    m = mark(srv);
    await runOk('qemu-img', ['info', ...qemuPsk('NORMAL:-VERS-TLS1.3'), '--image-opts', qemuNbd(srv.port)]);
    const q = await established(srv, m);
    assert.equal(q.protocol, 'TLSv1.2');
    report(t, 'qemu PSK, NORMAL:-VERS-TLS1.3', q);
    m = mark(srv);
    await runOk('qemu-img', ['info', ...qemuPsk(), '--image-opts', qemuNbd(srv.port)]);
    report(t, 'qemu PSK, default priority', await established(srv, m));
  });

  test('refused: a client that does not ask for TLS (nbd://) gets TLS_REQD; nothing is served in clear', TEST, async (t) => {
    const m = mark(srv);
    const clear = [`nbd://127.0.0.1:${srv.port}/`];
    const r = await run('nbdinfo', clear);
    failed(t, r, /nbdinfo: nbd_opt_go: server replied with error to opt_go request: Operation not supported/, 'nbdinfo nbd:// against --tls require');
    assert.ok((await serverMessages(clear)).includes('TLS is required: send NBD_OPT_STARTTLS first'));
    // No line says "refused" at info level; the session's option lines (debug) name the peer.
    const go = await refusedAndGone(srv, m, (l) => l.msg === 'option' && l.option === 'NBD_OPT_GO', 'the NBD_OPT_GO of the clear client');
    assert.ok(!logLines(srv).slice(m).some((l) => l.session === go.session && l.msg === 'TLS established'));
    const q = await run('qemu-img', ['info', '--image-opts', `driver=nbd,host=127.0.0.1,port=${srv.port}`]);
    failed(t, q, /TLS negotiation required before option 7 \(go\)/, 'qemu-img without tls-creds');
    await stillServes();
  });

  test("refused: alice with a key that is not hers (the TLS handshake fails; the log names the peer and OpenSSL's reason)", TEST, async (t) => {
    const m = mark(srv);
    const r = await run('nbdinfo', [`nbds://alice@127.0.0.1:${srv.port}/?tls-psk-file=${creds.psk.wrongAlice}`]);
    failed(t, r, /gnutls_handshake: .*(alert|decrypt|error)/i, 'nbdinfo, wrong PSK key');
    const l = await refusedAndGone(srv, m, (x) => x.msg === 'TLS handshake failed, closing', 'TLS handshake failed');
    t.diagnostic(`server: ${String(l.code)}`);
    await stillServes();
  });

  test('refused: an identity the server does not know (bob)', TEST, async (t) => {
    const m = mark(srv);
    const r = await run('nbdinfo', [`nbds://bob@127.0.0.1:${srv.port}/?tls-psk-file=${creds.psk.bob}`]);
    failed(t, r, /gnutls_handshake: /, 'nbdinfo, unknown identity bob');
    const l = await refusedAndGone(srv, m, (x) => x.msg === 'TLS handshake failed, closing', 'TLS handshake failed');
    t.diagnostic(`server: ${String(l.code)}`);
    await stillServes();
  });

  test('raw client: STARTTLS, its ACK, then 200 bytes of garbage instead of a ClientHello: the server closes', TEST, async (t) => {
    const m = mark(srv);
    const b = await rawStartTls(srv.port);
    const peer = peerOf(b);
    b.write(Buffer.alloc(200, 0xa5));
    assert.equal(await b.closed(RAW_MS), true, 'the server closed the connection');
    const l = await refusedAndGone(srv, m, (x) => x.peer === peer && x.msg === 'TLS handshake failed, closing', `TLS handshake failed for ${peer}`, /./);
    t.diagnostic(`server on garbage: ${String(l.code)}`);
    b.destroy();
    await stillServes();
  });

  test('raw client: hangs up right after the ACK, and another mid ClientHello: no session is left', TEST, async () => {
    const m = mark(srv);
    const early = await rawStartTls(srv.port);
    const earlyPeer = peerOf(early);
    early.destroy();
    const mid = await rawStartTls(srv.port);
    const midPeer = peerOf(mid);
    // A TLS handshake record header announcing 512 bytes, and the first 10 of them.
    mid.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0, 0, 0, 0]));
    await new Promise((r) => setTimeout(r, 100));
    mid.destroy();
    for (const peer of [earlyPeer, midPeer]) {
      const opt = await logLine(srv, m, (l) => l.peer === peer && l.option === 'NBD_OPT_STARTTLS', `STARTTLS of ${peer}`);
      await logLine(srv, m, (l) => l.session === opt.session && l.msg === 'closed', `session of ${peer} closed`);
      assert.ok(!logLines(srv).slice(m).some((l) => l.session === opt.session && l.msg === 'TLS established'));
    }
    await stillServes();
  });
});

describe('X.509 with --tls-verify-peer (config file; an export for subject CN=alice)', () => {
  let srv: Served;
  let uri: (dir: string, exportName?: string) => string;
  before(async () => {
    const cfg = path.join(tmp, 'x509.json');
    fs.writeFileSync(
      cfg,
      JSON.stringify({
        listen: [{ host: '127.0.0.1', port: 0, tls: 'require', tlsCertificates: creds.serverDir, tlsVerifyPeer: true }],
        exports: [
          { name: 'disk', backend: { type: 'memory', size: '16M' } },
          { name: 'alice-cert', backend: { type: 'memory', size: '1M' }, subjects: ['CN=alice'] },
        ],
      }),
    );
    srv = await serve(['--config', cfg]);
    uri = (dir, exportName = 'disk') => `nbds://127.0.0.1:${srv.port}/${exportName}?tls-certificates=${dir}`;
  });
  after(() => stop(srv));

  const stillServes = async (): Promise<void> => {
    assert.equal((await runOk('nbdinfo', ['--size', uri(creds.clients.alice)])).stdout.trim(), String(16 * MiB));
  };

  test("nbdinfo with tls-certificates=DIR (alice's certificate): TLS; the log has the verified subject", TEST, async (t) => {
    const m = mark(srv);
    const r = await runOk('nbdinfo', [uri(creds.clients.alice)]);
    assert.match(r.stdout, /^protocol: newstyle-fixed with TLS, using structured packets$/m);
    const l = await established(srv, m);
    assert.equal(l.subject, 'CN=alice');
    report(t, 'libnbd X.509 (client certificate), default priority', l);
    // The export for CN=alice opens, and is listed, for her.
    await runOk('nbdinfo', ['--size', uri(creds.clients.alice, 'alice-cert')]);
    const list = await runOk('nbdinfo', ['--list', uri(creds.clients.alice)]);
    assert.match(list.stdout, /^export="alice-cert":$/m);
  });

  test('nbdcopy of 8 MiB of random data in and out over X.509: byte for byte', TEST, async () => {
    const src = path.join(tmp, 'x509-src.img');
    const out = path.join(tmp, 'x509-out.img');
    const data = seededBytes(0x5095, COPY_SIZE);
    fs.writeFileSync(src, data);
    await runOk('nbdcopy', [src, uri(creds.clients.alice)]);
    await runOk('nbdcopy', [uri(creds.clients.alice), out]);
    assertSameBytes(fs.readFileSync(out).subarray(0, COPY_SIZE), data, 'nbdcopy out over X.509');
  });

  test('qemu-img convert in and out with tls-creds-x509 (client certificate), and nbdkit with tls-certificates', TEST, async (t) => {
    const src = path.join(tmp, 'qemu-x509-src.img');
    const out = path.join(tmp, 'qemu-x509-out.img');
    const data = seededBytes(0x9e3, 4 * MiB);
    fs.writeFileSync(src, data);
    const m = mark(srv);
    await runOk('qemu-img', ['convert', '-n', ...qemuX509(creds.clients.alice), '-f', 'raw', src, '--target-image-opts', qemuNbd(srv.port, 'disk')]);
    report(t, 'qemu X.509, default priority', await established(srv, m));
    await runOk('qemu-img', ['convert', ...qemuX509(creds.clients.alice), '--image-opts', qemuNbd(srv.port, 'disk'), '-O', 'raw', out]);
    assertSameBytes(fs.readFileSync(out).subarray(0, 4 * MiB), data, 'qemu-img convert out over X.509');

    const sock = path.join(tmp, 'nbdkit-x509.sock');
    const kit = children.start('nbdkit', [
      '-f', '-U', sock, 'nbd', 'hostname=localhost', `port=${srv.port}`, 'export=disk', 'tls=require', `tls-certificates=${creds.clients.alice}`,
    ]);
    try {
      await untilExists(sock, kit);
      const viaKit = path.join(tmp, 'nbdkit-x509-out.img');
      await runOk('nbdcopy', [`nbd+unix:///?socket=${sock}`, viaKit]);
      assertSameBytes(fs.readFileSync(viaKit).subarray(0, 4 * MiB), data, 'nbdcopy through nbdkit over X.509');
    } finally {
      kit.proc.kill('SIGTERM');
      await kit.exited();
    }
  });

  test('TLS 1.2 forced from the client over X.509: libnbd (GnuTLS overrides) and qemu (priority=)', TEST, async (t) => {
    let m = mark(srv);
    await runOk('nbdinfo', [uri(creds.clients.alice)], { env: noTls13Env() });
    const l = await established(srv, m);
    assert.equal(l.protocol, 'TLSv1.2');
    report(t, 'libnbd X.509, TLS 1.3 disabled', l);
    m = mark(srv);
    await runOk('qemu-img', ['info', ...qemuX509(creds.clients.alice, 'NORMAL:-VERS-TLS1.3'), '--image-opts', qemuNbd(srv.port, 'disk')]);
    const q = await established(srv, m);
    assert.equal(q.protocol, 'TLSv1.2');
    report(t, 'qemu X.509, NORMAL:-VERS-TLS1.3', q);
  });

  test('refused: a client certificate signed by another CA, and no client certificate at all', TEST, async (t) => {
    for (const [what, dir] of [
      ['certificate from the other CA', creds.clients.mallory],
      ['no client certificate', creds.clients.caOnly],
    ] as const) {
      const m = mark(srv);
      const r = await run('nbdinfo', [uri(dir)]);
      failed(t, r, /nbdinfo: nbd_connect_uri: gnutls_/, `nbdinfo, ${what}`);
      const l = await refusedAndGone(srv, m, (x) => x.msg === 'TLS handshake failed, closing', `TLS handshake failed (${what})`);
      t.diagnostic(`server (${what}): ${String(l.code)}`);
      await stillServes();
    }
  });

  // DEFECT: fails today. src/nbd/tls.ts upgradeToTls wraps the socket in `new
  // tls.TLSSocket(socket, { requestCert, rejectUnauthorized })`, but only tls.Server acts
  // on rejectUnauthorized (its 'secure' handler reads the verification result and
  // destroys the socket; it also sets `authorized`). A standalone TLSSocket lets OpenSSL
  // refuse a missing certificate (SSL_VERIFY_FAIL_IF_NO_PEER_CERT) but records any other
  // verification error without acting on it, and src/nbd/session.ts #onSecure does not
  // check, so an expired certificate, or one from a CA the server does not trust, is
  // accepted and its subject believed.
  test('refused: an expired client certificate signed by the right CA', TEST, async (t) => {
    const m = mark(srv);
    const r = await run('nbdinfo', [uri(creds.clients.expired)]);
    failed(t, r, /nbdinfo: /, 'nbdinfo, expired client certificate');
    await refusedAndGone(srv, m, CERT_REFUSAL, 'a refusal of the expired certificate');
    await stillServes();
  });

  // DEFECT: fails today, the same cause as above. GnuTLS clients do not send a
  // certificate the server's CA list does not name (so libnbd with the other CA's
  // certificate is refused, above), but a client that does (Node here) gets through with
  // a CN=alice certificate signed by a CA the server does not trust, and opens the export
  // reserved for subject CN=alice.
  test('refused: a CN=alice certificate from another CA sent anyway (Node TLS client) opens nothing', TEST, async () => {
    const m = mark(srv);
    const b = await rawStartTls(srv.port);
    const peer = peerOf(b);
    const dir = creds.clients.forgedAlice;
    let opened = false;
    try {
      const s = await tlsOver(b, {
        ca: fs.readFileSync(path.join(dir, 'ca-cert.pem')),
        cert: fs.readFileSync(path.join(dir, 'client-cert.pem')),
        key: fs.readFileSync(path.join(dir, 'client-key.pem')),
      });
      // In TLS 1.3 the server's verdict on the client certificate arrives after the client's handshake is done.
      const go = await rawOption(s, NBD_OPT.NBD_OPT_GO, encodeInfoRequest('alice-cert', [])).catch(() => []);
      opened = go.at(-1)?.type === NBD_REP.NBD_REP_ACK;
      s.destroy();
    } catch {
      // The handshake failed: what should happen.
    }
    b.destroy();
    assert.equal(opened, false, 'a certificate from an untrusted CA must not open the CN=alice export');
    await refusedAndGone(srv, m, (x) => x.peer === peer && CERT_REFUSAL(x), `a refusal of the certificate of ${peer}`, /./);
    await stillServes();
  });
});

describe('X.509 without --tls-verify-peer, over a unix socket (nbds+unix://)', () => {
  let srv: Served;
  before(async () => {
    srv = await serve(['-U', path.join(tmp, 'x509.sock'), '--tls', 'require', '--tls-certificates', creds.serverDir, 'memory:16M']);
  });
  after(() => stop(srv));

  test('--print-uri says nbds+unix://; nbdinfo with only the CA, and with a client certificate (not asked for)', TEST, async (t) => {
    assert.match(srv.uri, /^nbds\+unix:\/\/\/\?socket=/);
    for (const dir of [creds.clients.caOnly, creds.clients.alice, creds.clients.mallory]) {
      const m = mark(srv);
      const r = await runOk('nbdinfo', [`${srv.uri}&tls-certificates=${dir}`]);
      assert.match(r.stdout, /^protocol: newstyle-fixed with TLS, using structured packets$/m);
      const l = await established(srv, m);
      assert.equal(l.peer, 'unix');
      assert.equal(l.subject, undefined, 'no client certificate is asked for without --tls-verify-peer');
      if (dir === creds.clients.caOnly) report(t, 'libnbd X.509 (no client certificate), unix socket', l);
    }
  });

  test('nbdsh over nbds+unix: TLS and structured replies negotiated, data round trip', TEST, async () => {
    const r = await runOk('nbdsh', [
      '-c',
      [
        'import os',
        'h.set_uri_allow_local_file(True)',
        'h.connect_uri(os.environ["uri"])',
        'assert h.get_tls_negotiated()',
        'assert h.get_structured_replies_negotiated()',
        'h.pwrite(b"\\xc3" * 4096, 1048576)',
        'assert h.pread(4096, 1048576) == b"\\xc3" * 4096',
        'print("nbdsh ok")',
      ].join('\n'),
    ], { env: { uri: `${srv.uri}&tls-certificates=${creds.clients.caOnly}` } });
    assert.match(r.stdout, /nbdsh ok/);
  });
});

describe('per-export rules (config file, listener --tls on with PSK and certificates)', () => {
  let srv: Served;
  const psk = (who: 'alice' | 'carol', exportName = ''): string =>
    `nbds://${who}@127.0.0.1:${srv.port}/${exportName}?tls-psk-file=${creds.psk[who]}`;
  const exportNames = (stdout: string): string[] => [...stdout.matchAll(/^export="(.*)":$/gm)].map((m) => m[1]!);
  before(async () => {
    const cfg = path.join(tmp, 'per-export.json');
    fs.writeFileSync(
      cfg,
      JSON.stringify({
        listen: [{ host: '127.0.0.1', port: 0, tls: 'on', tlsPsk: creds.psk.server, tlsCertificates: creds.serverDir }],
        exports: [
          { name: 'open', backend: { type: 'memory', size: '1M' } },
          { name: 'secret', backend: { type: 'memory', size: '2M' }, tls: 'require' },
          { name: 'alice-only', backend: { type: 'memory', size: '3M' }, pskIdentities: ['alice'] },
        ],
      }),
    );
    srv = await serve(['--config', cfg]);
  });
  after(() => stop(srv));

  test('--list in clear shows only the open export; over TLS alice sees all three, carol the two she may open', TEST, async () => {
    assert.deepEqual(exportNames((await runOk('nbdinfo', ['--list', `nbd://127.0.0.1:${srv.port}/`])).stdout), ['open']);
    assert.deepEqual(exportNames((await runOk('nbdinfo', ['--list', psk('alice')])).stdout), ['open', 'secret', 'alice-only']);
    assert.deepEqual(exportNames((await runOk('nbdinfo', ['--list', psk('carol')])).stdout), ['open', 'secret']);
    const x = await runOk('nbdinfo', ['--list', `nbds://127.0.0.1:${srv.port}/?tls-certificates=${creds.clients.caOnly}`]);
    assert.deepEqual(exportNames(x.stdout), ['open', 'secret']);
  });

  test('the TLS-only export refuses a clear client (TLS_REQD) and opens over TLS', TEST, async (t) => {
    const m = mark(srv);
    const clear = [`nbd://127.0.0.1:${srv.port}/secret`];
    const r = await run('nbdinfo', clear);
    failed(t, r, /nbd_opt_go: server replied with error to opt_go request: Operation not supported/, 'nbdinfo nbd:// of a TLS-only export');
    assert.ok((await serverMessages(clear)).includes("export 'secret' is served only over TLS"));
    await refusedAndGone(srv, m, (l) => l.msg === 'option' && l.option === 'NBD_OPT_GO', 'the clear NBD_OPT_GO');
    assert.equal((await runOk('nbdinfo', ['--size', psk('carol', 'secret')])).stdout.trim(), String(2 * MiB));
    assert.equal((await runOk('nbdinfo', ['--size', `nbd://127.0.0.1:${srv.port}/open`])).stdout.trim(), String(MiB));
  });

  test('pskIdentities: alice opens her export; carol, in the PSK file, is refused (POLICY)', TEST, async (t) => {
    assert.equal((await runOk('nbdinfo', ['--size', psk('alice', 'alice-only')])).stdout.trim(), String(3 * MiB));
    const m = mark(srv);
    const r = await run('nbdinfo', [psk('carol', 'alice-only')]);
    failed(t, r, /nbd_opt_go: server replied with error to opt_go request: Operation not supported/, 'nbdinfo as carol of an export for alice');
    const tlsLine = await established(srv, m);
    assert.equal(tlsLine.pskIdentity, 'carol');
    await refusedAndGone(srv, m, (l) => l.session === tlsLine.session && l.option === 'NBD_OPT_GO', "carol's NBD_OPT_GO");
    assert.ok((await serverMessages([psk('carol', 'alice-only')])).includes("export 'alice-only' is not allowed to this client"));
    assert.equal((await runOk('nbdinfo', ['--size', psk('alice', 'alice-only')])).stdout.trim(), String(3 * MiB));
  });

  test('Node TLS client: STARTTLS, then NBD_OPT_EXTENDED_HEADERS is acknowledged and GO enters extended transmission', TEST, async () => {
    const m = mark(srv);
    const b = await rawStartTls(srv.port);
    const peer = peerOf(b);
    const s = await tlsOver(b, { ca: fs.readFileSync(path.join(creds.serverDir, 'ca-cert.pem')) });
    assert.deepEqual((await rawOption(s, NBD_OPT.NBD_OPT_EXTENDED_HEADERS)).map((x) => x.type), [NBD_REP.NBD_REP_ACK]);
    const go = await rawOption(s, NBD_OPT.NBD_OPT_GO, encodeInfoRequest('secret', []));
    assert.equal(go.at(-1)?.type, NBD_REP.NBD_REP_ACK);
    const l = await logLine(srv, m, (x) => x.peer === peer && x.msg === 'transmission', `transmission of ${peer}`);
    assert.equal(l.export, 'secret');
    assert.equal(l.replies, 'extended');
    s.destroy();
    b.destroy();
  });
});

describe('listener address rules', () => {
  test('--allow 127.0.0.2: nbdinfo from 127.0.0.1 is refused (logged with its address), a client bound to 127.0.0.2 is greeted', TEST, async (t) => {
    const srv = await serve(['-a', '127.0.0.1', '-p', '0', '--allow', '127.0.0.2', 'memory:1M']);
    try {
      const m = mark(srv);
      const r = await run('nbdinfo', [srv.uri]);
      failed(t, r, /server disconnected unexpectedly/, 'nbdinfo refused by --allow');
      await refusedAndGone(srv, m, (l) => l.msg === "connection refused by the listener's address rules", 'address refusal');
      const b = await rawGreet(srv.port, '127.0.0.1', '127.0.0.2');
      const peer = peerOf(b);
      assert.match(peer, /^127\.0\.0\.2:/);
      const reply = await rawOption(b, NBD_OPT.NBD_OPT_LIST);
      assert.equal(reply.at(-1)?.type, NBD_REP.NBD_REP_ACK, 'the admitted client can list');
      b.destroy();
      await logLine(srv, m, (l) => l.peer === peer && l.option === 'NBD_OPT_LIST', `the LIST of ${peer}`);
    } finally {
      await stop(srv);
    }
  });

  test('IPv6: -a ::1 --deny ::1 refuses; -a ::1 --allow ::1/128 admits (PSK over [::1])', TEST, async (t) => {
    const denied = await serve(['-a', '::1', '-p', '0', '--deny', '::1', 'memory:1M']);
    try {
      assert.match(denied.uri, /^nbd:\/\/\[::1\]:\d+\/$/);
      const m = mark(denied);
      const r = await run('nbdinfo', [denied.uri]);
      failed(t, r, /server disconnected unexpectedly/, 'nbdinfo refused by --deny ::1');
      await refusedAndGone(denied, m, (l) => l.msg === "connection refused by the listener's address rules", 'IPv6 refusal', /^::1:\d+$/);
    } finally {
      await stop(denied);
    }
    const allowed = await serve(['-a', '::1', '-p', '0', '--allow', '::1/128', '--tls', 'require', '--tls-psk', creds.psk.server, 'memory:1M']);
    try {
      const m = mark(allowed);
      const r = await runOk('nbdinfo', [`nbds://alice@[::1]:${allowed.port}/?tls-psk-file=${creds.psk.alice}`]);
      assert.match(r.stdout, /with TLS/);
      const l = await established(allowed, m);
      assert.match(String(l.peer), /^::1:\d+$/);
    } finally {
      await stop(allowed);
    }
  });
});

/** Waits (bounded by a count) for nbdkit's unix socket to appear. */
async function untilExists(sock: string, kit: Child): Promise<void> {
  for (let i = 0; i < LOG_POLLS; i++) {
    if (fs.existsSync(sock)) return;
    if (kit.proc.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, LOG_POLL_MS));
  }
  throw new Error(`nbdkit did not create ${sock} within ${(LOG_POLLS * LOG_POLL_MS) / 1000}s; stderr: ${kit.stderr()}`);
}
