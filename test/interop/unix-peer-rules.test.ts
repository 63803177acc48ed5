/**
 * uid rules on unix sockets: the server reads the connecting process's credentials
 * (SO_PEERCRED, src/io/peer-cred.ts) at accept time. Real nbdinfo processes connect,
 * as root and as uid 65534 (setpriv), to a listener and to an export with uid rules.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NbdServer } from '../../src/nbd/index.js';
import { Export } from '../../src/export/index.js';
import { MemoryDevice } from '../../src/backends/index.js';
import { capturingLogger } from '../nbd/helpers.js';
import { run } from '../helpers/run.js';

const NOBODY = 65534;
const isRoot = process.getuid?.() === 0;

function memoryExport(name: string): Export {
  return new Export({ name, device: new MemoryDevice({ size: 1 << 20 }) });
}

/** nbdinfo on `uri`, as root or (setpriv) as uid/gid 65534. */
function nbdinfo(args: readonly string[], asNobody: boolean) {
  if (!asNobody) return run('nbdinfo', args, { timeoutMs: 20_000 });
  return run('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', 'nbdinfo', ...args], { timeoutMs: 20_000 });
}

/** A socket in a directory every uid may enter, the socket itself open to all (the rules decide). */
async function openSocket(server: NbdServer, rules?: { allow?: string[]; deny?: string[] }): Promise<{ sock: string; dir: string }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-uid-'));
  fs.chmodSync(dir, 0o755);
  const sock = path.join(dir, 'nbd.sock');
  await server.listen({ path: sock }, rules ? { rules } : {});
  fs.chmodSync(sock, 0o777);
  return { sock, dir };
}

test('a unix listener allowing uid:0 admits root and closes on uid 65534 before the greeting, logging the uid', { skip: !isRoot && 'needs root to run a client as another uid' }, async () => {
  const { logger, lines } = capturingLogger();
  const server = new NbdServer({ exports: [memoryExport('')], logger });
  const { sock, dir } = await openSocket(server, { allow: ['uid:0'] });
  try {
    const uri = `nbd+unix:///?socket=${sock}`;
    const root = await nbdinfo(['--size', uri], false);
    assert.equal(root.code, 0, root.stderr);
    assert.equal(root.stdout.trim(), String(1 << 20));
    const nobody = await nbdinfo(['--size', uri], true);
    assert.notEqual(nobody.code, 0);
    assert.ok(
      lines().some((l) => l.msg === "connection refused by the listener's address rules" && l.peer === `unix uid ${NOBODY}`),
      'the refusal is logged with the uid',
    );
  } finally {
    await server.close(100);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('an export denying uid:65534 is hidden from that uid and refused with POLICY, other exports still open', { skip: !isRoot && 'needs root to run a client as another uid' }, async () => {
  const server = new NbdServer({
    exports: [memoryExport('public'), memoryExport('private')],
    access: { private: { deny: [`uid:${NOBODY}`] } },
  });
  const { sock, dir } = await openSocket(server);
  try {
    const list = await nbdinfo(['--list', '--json', `nbd+unix://?socket=${sock}`], true);
    assert.equal(list.code, 0, list.stderr);
    const names = (JSON.parse(list.stdout) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name']);
    assert.deepEqual(names, ['public']);
    const refused = await nbdinfo(['--size', `nbd+unix:///private?socket=${sock}`], true);
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /not allowed|permission|policy/i);
    const open = await nbdinfo(['--size', `nbd+unix:///public?socket=${sock}`], true);
    assert.equal(open.code, 0, open.stderr);
    const asRoot = await nbdinfo(['--size', `nbd+unix:///private?socket=${sock}`], false);
    assert.equal(asRoot.code, 0, asRoot.stderr);
  } finally {
    await server.close(100);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
