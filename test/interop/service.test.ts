/**
 * `serve` and `ggated` as services: socket activation (libnbd's captive `[ ... ]`
 * syntax and systemd-socket-activate), captive --run like nbdkit's, pid files written
 * once listening, --exit-with-parent, readiness on NOTIFY_SOCKET, and the log formats.
 * Every process is a real one started from the sources and killed by PID in `after`.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { BLOCKGATE_CLI, ChildSet, blockgateRun } from '../helpers/children.js';
import { run, runOk } from '../helpers/run.js';
import { freePort } from '../helpers/ports.js';

const children = new ChildSet();
/** Servers whose parent the tests kill on purpose (so not in `children`). */
const orphans: number[] = [];
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-service-'));
after(() => {
  children.killAll();
  for (const pid of orphans) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Already gone, as it should be.
    }
  }
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** The command line libnbd or systemd runs: node with the sources, as `blockgate`. */
const SERVER = [process.execPath, ...BLOCKGATE_CLI];
/** Bound on the polls below (a count, not a time). */
const POLLS = 600;
const POLL_MS = 50;

async function until<T>(what: string, probe: () => T | null | undefined): Promise<T> {
  for (let i = 0; i < POLLS; i++) {
    const v = probe();
    if (v !== null && v !== undefined) return v;
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
  throw new Error(`gave up waiting for ${what}`);
}


/** The pid file's text once it exists (a server writes it when listening). */
function pidFileText(file: string): Promise<string> {
  return until(`the pid file ${path.basename(file)}`, () => (fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : null));
}

/** The JSON log lines of a stderr text, skipping anything else. */
function logLines(stderr: string): Record<string, unknown>[] {
  return stderr
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

describe('socket activation', () => {
  test('nbdinfo -- [ blockgate serve memory:1G ] prints the export at once', async () => {
    const r = await runOk('nbdinfo', ['--json', '--', '[', ...SERVER, 'serve', '--no-control', 'memory:1G', ']']);
    const info = JSON.parse(r.stdout) as { exports: { 'export-size': number; can_flush: boolean }[] };
    assert.equal(info.exports[0]!['export-size'], 1 << 30);
    assert.equal(info.exports[0]!.can_flush, true);
    // The server said which socket it was given and that it was ready.
    const lines = logLines(r.stderr);
    const listening = lines.find((l) => l.msg === 'listening');
    assert.equal(listening?.fd, 3);
    assert.match(String(listening?.uri), /^nbd\+unix:\/\/\/\?socket=/);
    assert.ok(lines.some((l) => l.msg === 'ready'));
  });

  test('nbdsh connects with connect_systemd_socket_activation and reads what it wrote', async () => {
    // Debian 12's nbdsh has no `[ ... ]` argument; its handle method is the same protocol.
    const argv = JSON.stringify([...SERVER, 'serve', '--no-control', '-l', 'warn', 'memory:1M']);
    const script = [
      `h.connect_systemd_socket_activation(${argv})`,
      "h.pwrite(b'activated' * 8, 4096)",
      'h.flush()',
      "assert h.pread(72, 4096) == b'activated' * 8",
      'print(h.get_size())',
    ].join('\n');
    const r = await runOk('nbdsh', ['-c', script]);
    assert.equal(r.stdout.trim(), String(1 << 20));
  });

  test('systemd-socket-activate hands a named TCP socket; clients connect before serve has started', async () => {
    const port = await freePort();
    const act = children.start('systemd-socket-activate', ['-l', `127.0.0.1:${port}`, '--fdname=nbd', ...SERVER, 'serve', '--no-control', '--log-format', 'json', 'memory:2M']);
    await act.waitFor(/Listening on/, 'stderr');
    // The first connection starts the server; the socket already queues it.
    const r = await runOk('nbdinfo', ['--size', `nbd://127.0.0.1:${port}`]);
    assert.equal(r.stdout.trim(), String(2 << 20));
    const listening = logLines(act.stderr()).find((l) => l.msg === 'listening');
    assert.equal(listening?.fdName, 'nbd');
    assert.equal(listening?.uri, `nbd://127.0.0.1:${port}/`);
    act.proc.kill('SIGTERM');
    await act.exited();
  });

  test('socket activation refuses flags that say where to listen', async () => {
    const port = await freePort();
    const act = children.start('systemd-socket-activate', ['-l', `127.0.0.1:${port}`, ...SERVER, 'serve', '--no-control', '-p', '10999', 'memory:1M']);
    await act.waitFor(/Listening on/, 'stderr');
    const r = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${port}`]);
    assert.notEqual(r.code, 0);
    await act.waitFor(/socket activation \(LISTEN_FDS\) gives the listening sockets; do not combine it with -p\/--port/, 'stderr');
    act.proc.kill('SIGTERM');
    await act.exited();
  });
});

describe('captive --run', () => {
  const show = 'printf "%s|%s|%s|%s|%s|%s\\n" "$uri" "$nbd" "$exportname" "$port" "$unixsocket" "${tls-unset}"';

  test('sets the variables nbdkit-captive(1) names, on a private socket by default', async () => {
    const r = await blockgateRun(['serve', '--run', show, 'disk=memory:1M']);
    assert.equal(r.code, 0, r.stderr);
    const [uri, nbd, exportname, port, unixsocket, tls] = r.stdout.trim().split('|');
    assert.match(uri!, /^nbd\+unix:\/\/\/disk\?socket=/);
    assert.equal(nbd, uri);
    assert.equal(exportname, 'disk');
    assert.equal(port, '');
    assert.ok(unixsocket!.endsWith('/nbd.sock'));
    assert.equal(tls, 'unset');
    // Only warnings are logged while the command runs: its output stays its own.
    assert.equal(logLines(r.stderr).length, 0, r.stderr);
  });

  test('honours -p: the command gets a TCP URI and $port', async () => {
    const port = await freePort();
    const r = await blockgateRun(['serve', '-p', String(port), '--run', `${show}; nbdinfo --size "$uri"`, 'memory:3M']);
    assert.equal(r.code, 0, r.stderr);
    const [first, size] = r.stdout.trim().split('\n');
    const [uri, , exportname, p, unixsocket] = first!.split('|');
    assert.equal(uri, `nbd://127.0.0.1:${port}/`);
    assert.equal(exportname, '');
    assert.equal(p, String(port));
    assert.equal(unixsocket, '');
    assert.equal(size, String(3 << 20));
  });

  test('honours -U: the command gets that socket', async () => {
    const sock = path.join(tmp, 'captive.sock');
    const r = await blockgateRun(['serve', '-U', sock, '--run', `${show}; nbdinfo --size "$uri"`, 'memory:1M']);
    assert.equal(r.code, 0, r.stderr);
    const [first, size] = r.stdout.trim().split('\n');
    assert.equal(first!.split('|')[4], sock);
    assert.equal(size, String(1 << 20));
    // Removed at exit, like the private one.
    assert.equal(fs.existsSync(sock), false);
  });

  test('refuses -U together with -p', async () => {
    const r = await blockgateRun(['serve', '-U', path.join(tmp, 'x.sock'), '-p', '10999', '--run', 'true']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /--run serves on --unix or on TCP \(--address\/--port\), not both/);
  });

  test('exit status is the command\'s, or 128 + the signal that killed it, as nbdkit', async () => {
    assert.equal((await blockgateRun(['serve', '--run', 'exit 7'])).code, 7);
    const killed = await blockgateRun(['serve', '--run', 'kill -TERM $$']);
    assert.equal(killed.code, 128 + os.constants.signals.SIGTERM);
    // The one thing logged: why the status is what it is.
    assert.match(killed.stderr, /killed by a signal/);
    assert.equal((await blockgateRun(['serve', '--run', 'no-such-command-here 2>/dev/null'])).code, 127);
  });

  test('-v shows the debug lines (the handshake\'s options) with the decoded flags', async () => {
    const r = await blockgateRun(['serve', '-v', '--log-format', 'json', '--run', 'nbdinfo --size "$uri" >/dev/null', 'memory:1M']);
    assert.equal(r.code, 0, r.stderr);
    const lines = logLines(r.stderr);
    assert.ok(lines.some((l) => l.level === 20), 'no debug line');
    const tx = lines.find((l) => l.msg === 'transmission');
    assert.equal(tx?.replies, 'structured');
    assert.match(String(tx?.flags), /^HAS_FLAGS\|SEND_FLUSH\|/);
    assert.equal(tx?.peer, 'unix');
    assert.ok(lines.some((l) => l.msg === 'closed' && l.export === ''));
  });
});

describe('service basics', () => {
  test('serve writes the pid file only once it listens, and removes it at exit', async () => {
    const sock = path.join(tmp, 'pid.sock');
    const pidfile = path.join(tmp, 'serve.pid');
    const srv = children.blockgate(['serve', '--no-control', '-U', sock, '-P', pidfile, 'memory:1M']);
    const pid = await pidFileText(pidfile);
    assert.equal(pid, `${srv.proc.pid}\n`);
    // Whoever waited for the file can connect at once.
    const r = await runOk('nbdinfo', ['--size', `nbd+unix:///?socket=${sock}`]);
    assert.equal(r.stdout.trim(), String(1 << 20));
    srv.proc.kill('SIGTERM');
    assert.equal(await srv.exited(), 0);
    assert.equal(fs.existsSync(pidfile), false);
  });

  test('ggated writes its -F pid file only once it listens', async () => {
    const pidfile = path.join(tmp, 'ggated.pid');
    const disk = path.join(tmp, 'ggated.img');
    fs.writeFileSync(disk, Buffer.alloc(1 << 20));
    const exportsFile = path.join(tmp, 'ggated.exports');
    fs.writeFileSync(exportsFile, `127.0.0.1 RW ${disk}\n`);
    const port = await freePort();
    const g = children.blockgate(['ggated', '-a', '127.0.0.1', '-p', String(port), '-F', pidfile, '--log-format', 'json', exportsFile]);
    await pidFileText(pidfile);
    // Listening by then: a TCP connect succeeds at once.
    await new Promise<void>((resolve, reject) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        resolve();
      });
      s.once('error', reject);
    });
    assert.ok(logLines(g.stderr()).some((l) => l.msg === 'ready'));
    g.proc.kill('SIGTERM');
    assert.equal(await g.exited(), 0);
    assert.equal(fs.existsSync(pidfile), false);
  });

  test('--exit-with-parent: serve shuts down gracefully when its parent dies', async () => {
    const pidfile = path.join(tmp, 'orphan.pid');
    const sock = path.join(tmp, 'orphan.sock');
    // A shell parent that starts serve in the background and then waits forever.
    const cmd = [...SERVER, 'serve', '--no-control', '--exit-with-parent', '-U', sock, '-P', pidfile, 'memory:1M'].map((a) => `'${a}'`).join(' ');
    const parent = children.start('/bin/sh', ['-c', `${cmd} 2>${path.join(tmp, 'orphan.log')} & wait`]);
    const pid = Number(await pidFileText(pidfile));
    // Not a child of this process: killed by PID in `after` should the test fail.
    orphans.push(pid);
    parent.proc.kill('SIGKILL');
    await parent.exited();
    // Gone by itself, gracefully: the pid file and the socket are removed.
    await until('serve to exit', () => (fs.existsSync(pidfile) ? null : true));
    await until('the process to end', () => {
      try {
        process.kill(pid, 0);
        return null;
      } catch {
        return true;
      }
    });
    assert.equal(fs.existsSync(sock), false);
    assert.match(fs.readFileSync(path.join(tmp, 'orphan.log'), 'utf8'), /parent process exited, shutting down/);
  });

  test('readiness: READY=1 and MAINPID reach NOTIFY_SOCKET once serve listens', async () => {
    const notify = path.join(tmp, 'notify.sock');
    // A service manager's end: Debian's python3 receives one datagram and prints it.
    const receiver = children.start('/usr/bin/python3', [
      '-c',
      [
        'import socket, sys',
        's = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)',
        `s.bind(${JSON.stringify(notify)})`,
        "print('bound', flush=True)",
        's.settimeout(60)',
        'print(s.recv(4096).decode(), end="", flush=True)',
      ].join('\n'),
    ]);
    await receiver.waitFor(/bound/);
    const sock = path.join(tmp, 'notify-nbd.sock');
    const srv = children.start(process.execPath, [...BLOCKGATE_CLI, 'serve', '--no-control', '-U', sock, 'memory:1M'], { NOTIFY_SOCKET: notify });
    const got = await receiver.waitFor(/READY=1\nMAINPID=(\d+)\n/);
    assert.equal(Number(got[1]), srv.proc.pid);
    // Ready means listening.
    await runOk('nbdinfo', ['--size', `nbd+unix:///?socket=${sock}`]);
    // And it is said on stderr too, for those without a service manager.
    assert.ok(logLines(srv.stderr()).some((l) => l.msg === 'ready'));
    srv.proc.kill('SIGTERM');
    assert.equal(await srv.exited(), 0);
  });

  test('readiness on an abstract NOTIFY_SOCKET (@name), as systemd uses', async () => {
    const name = `blockgate-test-${process.pid}`;
    const receiver = children.start('/usr/bin/python3', [
      '-c',
      [
        'import socket',
        's = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)',
        `s.bind(${JSON.stringify('\0' + name)})`,
        "print('bound', flush=True)",
        's.settimeout(60)',
        'print(s.recv(4096).decode(), end="", flush=True)',
      ].join('\n'),
    ]);
    await receiver.waitFor(/bound/);
    const r = await run(process.execPath, [...BLOCKGATE_CLI, 'serve', '--no-control', '--run', 'true', 'memory:1M'], { env: { NOTIFY_SOCKET: `@${name}` } });
    assert.equal(r.code, 0, r.stderr);
    // --run is not a service: it notifies nobody (the receiver is still waiting).
    assert.equal(receiver.stdout(), 'bound\n');
    const sock = path.join(tmp, 'abstract-nbd.sock');
    const srv = children.start(process.execPath, [...BLOCKGATE_CLI, 'serve', '--no-control', '-U', sock, 'memory:1M'], { NOTIFY_SOCKET: `@${name}` });
    const got = await receiver.waitFor(/READY=1\nMAINPID=(\d+)\n/);
    assert.equal(Number(got[1]), srv.proc.pid);
    srv.proc.kill('SIGTERM');
    assert.equal(await srv.exited(), 0);
  });

  test('a busy --http port stops serve with the reason, leaving no socket behind', async () => {
    const sock = path.join(tmp, 'busy-http.sock');
    const holder = net.createServer();
    await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
    try {
      const port = (holder.address() as net.AddressInfo).port;
      const r = await blockgateRun(['serve', '--no-control', '-U', sock, '--http', `127.0.0.1:${port}`, 'memory:1M']);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /blockgate serve: listen EADDRINUSE/);
      assert.equal(fs.existsSync(sock), false);
    } finally {
      await new Promise((resolve) => holder.close(resolve));
    }
  });

  test('log formats: json lines by default off a terminal, readable lines with --log-format pretty, to a file with --log-file', async () => {
    const json = await blockgateRun(['serve', '--no-control', '-l', 'info', '--run', 'true', 'memory:1M']);
    assert.ok(logLines(json.stderr).some((l) => l.msg === 'listening'), json.stderr);
    const pretty = await blockgateRun(['serve', '--no-control', '-l', 'info', '--log-format', 'pretty', '--run', 'true', 'memory:1M']);
    assert.equal(logLines(pretty.stderr).length, 0);
    // One readable line per event: time, level, message, then the fields.
    assert.match(pretty.stderr, /^\[\d\d:\d\d:\d\d\.\d{3}\] INFO: listening \{"uri":"nbd\+unix:/m);
    const file = path.join(tmp, 'serve.log');
    const toFile = await blockgateRun(['serve', '--no-control', '-l', 'info', '--log-file', file, '--run', 'true', 'memory:1M']);
    assert.equal(toFile.stderr, '');
    assert.ok(logLines(fs.readFileSync(file, 'utf8')).some((l) => l.msg === 'listening'));
  });
});
