/**
 * `blockgate status` shows the server's own live counts (no stats filter needed): the
 * bytes nbdcopy moved, per operation with errors and p50/p99; each session's reply
 * mode and bytes while it is attached; `--watch --count N` prints N frames with the
 * rates between them (JSON: one object a line); `serve --no-metrics` counts nothing.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ChildSet, blockgateOk } from '../helpers/children.js';
import { run, runOk } from '../helpers/run.js';

const MiB = 1024 * 1024;
const N = 2 * MiB;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-status-live-'));
const NBD = path.join(tmp, 'nbd.sock');
const CTL = path.join(tmp, 'ctl.sock');
const children = new ChildSet();
/** Polls of the sync files the nbdsh script and the test exchange, 50 ms apart. */
const SYNC_POLLS = 600;

interface LiveJson {
  ops: Record<string, { count: number; bytes: number; errors: number; p50Us: number | null; p99Us: number | null }>;
}
interface StatusExport {
  name: string;
  live?: LiveJson;
  sessions: { id: number; figures?: { replies: string; bytesWritten: number; requests: number } }[];
}

before(async () => {
  const server = children.blockgate(['serve', '--print-uri', '--control', CTL, '-U', NBD, `disk=memory:${N}`]);
  await server.waitFor(/nbd\+unix/);
});

after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

async function status(): Promise<StatusExport[]> {
  return (JSON.parse((await blockgateOk(['status', '--json', '--control', CTL])).stdout) as { exports: StatusExport[] }).exports;
}

async function untilExists(file: string): Promise<void> {
  for (let i = 0; i < SYNC_POLLS && !fs.existsSync(file); i++) await new Promise((r) => setTimeout(r, 50));
  assert.ok(fs.existsSync(file), `${file} never appeared`);
}

test('status --json has the live counts of what nbdcopy moved, and the text form says them', async () => {
  const data = path.join(tmp, 'data.img');
  fs.writeFileSync(data, Buffer.alloc(N, 0x3c));
  await runOk('nbdcopy', ['--no-extents', data, `nbd+unix:///disk?socket=${NBD}`]);
  const [disk] = await status();
  const w = disk!.live!.ops.write!;
  assert.equal(w.bytes, N);
  assert.ok(w.count > 0);
  assert.equal(w.errors, 0);
  assert.equal(typeof w.p50Us, 'number');
  assert.ok(w.p99Us! >= w.p50Us!);
  const text = (await blockgateOk(['status', '--control', CTL])).stdout;
  assert.match(text, /live counts over [\d.]+ s:\n\s+write: \d+ ops, 2MiB, 0 errors, p50 \d+ µs, p99 \d+ µs/);
});

test('an attached session shows its reply mode, requests and bytes written', async () => {
  const ready = path.join(tmp, 'ready');
  const go = path.join(tmp, 'go');
  const script = `
import os, time
h.connect_uri(${JSON.stringify(`nbd+unix:///disk?socket=${NBD}`)})
h.pwrite(b'z' * 65536, 0)
open(${JSON.stringify(ready)}, 'w').close()
for i in range(${SYNC_POLLS}):
    if os.path.exists(${JSON.stringify(go)}): break
    time.sleep(0.05)
`;
  const client = run('nbdsh', ['-c', script]);
  try {
    await untilExists(ready);
    const [disk] = await status();
    assert.equal(disk!.sessions.length, 1);
    const f = disk!.sessions[0]!.figures!;
    assert.equal(f.bytesWritten, 65536);
    assert.equal(f.requests, 1);
    assert.match(f.replies, /^(structured|extended)$/);
  } finally {
    fs.writeFileSync(go, '');
    assert.equal((await client).code, 0);
  }
});

test('status --watch --count 2 prints two frames, the second with the rates since the first', async () => {
  const r = await blockgateOk(['status', '--control', CTL, '--watch', '--interval', '0.2', '--count', '2']);
  const frames = r.stdout.split(/^(?=\d{4}-\d\d-\d\dT)/m).filter((f) => f.trim() !== '');
  assert.equal(frames.length, 2, r.stdout);
  assert.doesNotMatch(frames[0]!, /rates over/);
  assert.match(frames[1]!, /rates over [\d.]+ s: \d+ IOPS, read .*\/s, write .*\/s/);
  const j = await blockgateOk(['status', '--control', CTL, '--watch', '--json', '--interval', '0.2', '--count', '2']);
  const lines = j.stdout.trim().split('\n');
  assert.equal(lines.length, 2);
  for (const l of lines) assert.equal((JSON.parse(l) as { exports: StatusExport[] }).exports[0]!.live!.ops.write!.bytes, N + 65536);
});

test('serve --no-metrics counts nothing: status has no live counts', async () => {
  const ctl = path.join(tmp, 'ctl2.sock');
  const server = children.blockgate(['serve', '--print-uri', '--no-metrics', '--control', ctl, '-U', path.join(tmp, 'nbd2.sock'), 'memory:1M']);
  await server.waitFor(/nbd\+unix/);
  const st = JSON.parse((await blockgateOk(['status', '--json', '--control', ctl])).stdout) as { exports: StatusExport[] };
  assert.equal(st.exports[0]!.live, undefined);
  server.proc.kill('SIGTERM');
  assert.equal(await server.exited(), 0);
});
