/**
 * The metrics of a running `blockgate serve --http`, checked against what real clients
 * did: nbdcopy's N bytes in and out move the byte counters by exactly N, an injected
 * ENOSPC shows under its errno, and a background write-back failure is counted as
 * recorded once and then as reported to each of two sessions exactly once (the
 * scrapes are made from inside the nbdsh script, between its steps, so each one sees
 * exactly the state the script has reached). A gate's handler and queue, and the bytes
 * written through it. Plus /healthz, /readyz, /api/status and the listener's refusals of
 * what it does not serve.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ChildSet, blockgateOk, type Child } from '../helpers/children.js';
import { PY_FLUSH } from '../helpers/nbdsh-script.js';
import { nbdsh, runOk } from '../helpers/run.js';
import { scrape, valueOf } from '../helpers/prometheus.js';

const MiB = 1024 * 1024;
const N = 4 * MiB;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-obs-metrics-'));
const NBD = path.join(tmp, 'nbd.sock');
const CTL = path.join(tmp, 'ctl.sock');
const children = new ChildSet();
let server: Child;
let base = '';

const uri = (name: string): string => `nbd+unix:///${name}?socket=${NBD}`;

before(async () => {
  const config = path.join(tmp, 'serve.json');
  fs.writeFileSync(
    config,
    JSON.stringify({
      // A second listener that admits nobody: its refusals are counted.
      listen: [{ path: NBD }, { host: '127.0.0.1', port: 0, deny: ['127.0.0.0/8'] }],
      http: '127.0.0.1:0',
      exports: [
        // Exactly N bytes: nbdcopy reads the whole export back, so both directions move N.
        { name: 'disk', backend: { type: 'memory', size: String(N) } },
        { name: 'bad', backend: { type: 'memory', size: '1M' }, filters: [{ type: 'error', error: 'ENOSPC', ops: ['write'] }] },
        // maxDirty 4096: a second 4 KiB write waits until the first one's write-back has
        // failed and been recorded (see test/interop/errseq-writeback.test.ts).
        { name: 'wb', backend: { type: 'memory', size: '1M' }, filters: [{ type: 'writeback', maxDirty: 4096 }, { type: 'error', ops: ['writeback'], error: 'EIO', count: 1 }] },
      ],
    }),
  );
  server = children.blockgate(['serve', '--print-uri', '--log-format', 'json', '--control', CTL, '--config', config]);
  const m = await server.waitFor(/"http":"(http:\/\/[^"]+)\/"/, 'stderr');
  base = m[1]!;
  await server.waitFor(/nbd\+unix/);
});

after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

test('nbdcopy of N bytes in and out moves the written and read byte counters by exactly N', async () => {
  const before = await scrape(`${base}/metrics`);
  const data = path.join(tmp, 'data.img');
  fs.writeFileSync(data, Buffer.alloc(N, 0xa5));
  // --no-extents and a dense source: every byte goes as a WRITE, and comes back as a READ.
  await runOk('nbdcopy', ['--no-extents', data, uri('disk')]);
  await runOk('nbdcopy', ['--no-extents', uri('disk'), path.join(tmp, 'back.img')]);
  const after = await scrape(`${base}/metrics`);
  const d = (name: string, labels: Record<string, string> = {}): number => valueOf(after, name, labels) - valueOf(before, name, labels);
  assert.equal(d('blockgate_written_bytes_total', { export: 'disk' }), N);
  assert.equal(d('blockgate_read_bytes_total', { export: 'disk' }), N);
  assert.ok(d('blockgate_requests_total', { export: 'disk', command: 'write', result: 'ok' }) > 0);
  assert.equal(valueOf(after, 'blockgate_requests_total', { export: 'disk', result: 'EIO' }), 0);
  // Every request that ended is in the latency histogram of its command, in the +Inf bucket too.
  assert.equal(
    valueOf(after, 'blockgate_request_duration_seconds_count', { export: 'disk', command: 'write' }),
    valueOf(after, 'blockgate_requests_total', { export: 'disk', command: 'write' }),
  );
  assert.equal(
    valueOf(after, 'blockgate_request_duration_seconds_bucket', { export: 'disk', command: 'write', le: '+Inf' }),
    valueOf(after, 'blockgate_request_duration_seconds_count', { export: 'disk', command: 'write' }),
  );
  assert.equal(after.types.get('blockgate_request_duration_seconds'), 'histogram');
  assert.equal(valueOf(after, 'blockgate_requests_in_flight', { export: 'disk' }), 0);
  assert.ok(d('blockgate_handshakes_total', { result: 'transmission', tls: 'no' }) >= 2, 'both nbdcopy runs got to transmission');
  assert.ok(d('blockgate_handshake_options_total', { option: 'go' }) >= 2, 'each connection sent NBD_OPT_GO');
  assert.ok(valueOf(after, 'process_resident_memory_bytes') > 0, 'process metrics are there');
  assert.equal(after.types.get('nodejs_eventloop_lag_p99_seconds'), 'gauge', "the event loop's delay is there");
});

test('an injected ENOSPC is counted under its errno, and nothing under ok', async () => {
  const out = await nbdsh(
    `
h.connect_uri(${JSON.stringify(uri('bad'))})
try:
    h.pwrite(b'x' * 4096, 0)
    print('write OK')
except nbd.Error as e:
    print('write', e.errno)
`,
    uri('bad'),
  );
  assert.equal(out.stdout.trim(), 'write ENOSPC');
  const m = await scrape(`${base}/metrics`);
  assert.equal(valueOf(m, 'blockgate_requests_total', { export: 'bad', command: 'write', result: 'ENOSPC' }), 1);
  assert.equal(m.types.get('blockgate_requests_total'), 'counter');
  assert.equal(valueOf(m, 'blockgate_requests_total', { export: 'bad', command: 'write', result: 'ok' }), 0);
  assert.equal(valueOf(m, 'blockgate_written_bytes_total', { export: 'bad' }), 0);
});

test('a write-back error is recorded once, then reported to each of two sessions exactly once', async () => {
  // Both sessions are attached before the failure, so each one is owed the error.
  const script = `
import urllib.request, re
def scrape(tag):
    text = urllib.request.urlopen(${JSON.stringify(`${base}/metrics`)}, timeout=10).read().decode()
    vals = []
    for name in ['blockgate_errseq_recorded_total', 'blockgate_errseq_reported_total', 'blockgate_errseq_sessions_pending', 'blockgate_writeback_failures_total']:
        m = re.search('^' + name + r'\\{export="wb"\\} (\\S+)$', text, re.M)
        vals.append(m.group(1) if m else 'missing')
    print(tag, *vals)
${PY_FLUSH}
h.connect_uri(${JSON.stringify(uri('wb'))})
h2 = nbd.NBD()
h2.connect_uri(${JSON.stringify(uri('wb'))})
scrape('start')
h.pwrite(b'A' * 4096, 0)
h.pwrite(b'B' * 4096, 4096)
scrape('failed')
flush('h1', h)
scrape('h1-told')
flush('h2', h2)
scrape('h2-told')
flush('h1', h)
flush('h2', h2)
scrape('end')
`;
  const out = await nbdsh(script, uri('wb'));
  assert.deepEqual(out.stdout.trim().split('\n'), [
    'start 0 0 0 0',
    'failed 1 0 2 1',
    'h1 flush EIO',
    'h1-told 1 1 1 1',
    'h2 flush EIO',
    'h2-told 1 2 0 1',
    'h1 flush OK',
    'h2 flush OK',
    'end 1 2 0 1',
  ]);
  const status = (await (await fetch(`${base}/api/status`)).json()) as { timeline: { export: string; kind: string; errno: number; session?: number }[] };
  const wb = status.timeline.filter((e) => e.export === 'wb');
  assert.equal(wb.filter((e) => e.kind === 'recorded').length, 1, JSON.stringify(wb));
  const told = wb.filter((e) => e.kind === 'reported');
  assert.equal(told.length, 2);
  assert.equal(new Set(told.map((e) => e.session)).size, 2, 'two different sessions were told');
  assert.ok(told.every((e) => e.errno === 5), 'EIO (5) each time');
});

test('a gate served by ggatel shows its waiting handler and queue, and its export counts the bytes written through it', async () => {
  const disk = path.join(tmp, 'gate.img');
  fs.writeFileSync(disk, Buffer.alloc(MiB));
  const handler = children.blockgate(['ggatel', 'create', '--control', CTL, disk]);
  const [name] = await handler.waitFor(/ggate\d+/);
  try {
    const data = path.join(tmp, 'gate-data.img');
    fs.writeFileSync(data, Buffer.alloc(MiB, 0x7e));
    await runOk('nbdcopy', ['--no-extents', data, uri(name)]);
    const m = await scrape(`${base}/metrics`);
    assert.equal(valueOf(m, 'blockgate_written_bytes_total', { export: name }), MiB);
    // Idle again: the handler waits in START, nothing is queued or in flight, no session holds it open.
    assert.ok(valueOf(m, 'blockgate_gate_handlers_waiting', { gate: name }) >= 1);
    assert.equal(valueOf(m, 'blockgate_gate_queued', { gate: name }), 0);
    assert.equal(valueOf(m, 'blockgate_gate_in_flight', { gate: name }), 0);
    assert.equal(valueOf(m, 'blockgate_gate_opens', { gate: name }), 0);
  } finally {
    await blockgateOk(['ggatel', 'destroy', '-u', name.replace('ggate', ''), '--control', CTL]);
    assert.equal(await handler.exited(), 0);
  }
});

test("a connection the listener's rules refuse is counted as refused, before any handshake", async () => {
  const st = (await (await fetch(`${base}/api/status`)).json()) as { listeners: string[] };
  const tcp = st.listeners.find((l) => l.startsWith('tcp:'))!;
  const port = Number(tcp.split(':').at(-1));
  const before = await scrape(`${base}/metrics`);
  // Closed before the greeting: the client sees the connection end with no byte.
  const got = await new Promise<number>((resolve, reject) => {
    let n = 0;
    const s = net.connect(port, '127.0.0.1');
    s.on('data', (b) => (n += b.length));
    s.on('close', () => resolve(n));
    s.on('error', reject);
  });
  assert.equal(got, 0);
  const after = await scrape(`${base}/metrics`);
  const d = (name: string, labels: Record<string, string>): number => valueOf(after, name, labels) - valueOf(before, name, labels);
  assert.equal(d('blockgate_connections_refused_total', { listener: tcp, reason: 'rules' }), 1);
  assert.equal(d('blockgate_connections_total', { listener: tcp }), 0, 'never greeted');
});

test('/healthz, /readyz and /api/status answer; other paths and methods are refused', async () => {
  const health = await fetch(`${base}/healthz`);
  assert.equal(health.status, 200);
  assert.equal(await health.text(), 'ok\n');
  const ready = await fetch(`${base}/readyz`);
  assert.equal(ready.status, 200);
  assert.equal(await ready.text(), 'ready\n');
  const api = await fetch(`${base}/api/status`);
  assert.equal(api.status, 200);
  assert.match(api.headers.get('content-type') ?? '', /^application\/json/);
  const st = (await api.json()) as { exports: { name: string; live?: { ops: Record<string, { bytes: number }> } }[]; listeners: string[] };
  assert.deepEqual(st.exports.map((e) => e.name), ['disk', 'bad', 'wb'], 'the gate export went with its gate');
  assert.equal(st.listeners.length, 2);
  assert.equal(st.listeners[0], `unix:${NBD}`);
  assert.match(st.listeners[1]!, /^tcp:127\.0\.0\.1:\d+$/);
  assert.equal(st.exports[0]!.live?.ops.write?.bytes, N);
  assert.equal((await fetch(`${base}/nope`)).status, 404);
  const post = await fetch(`${base}/metrics`, { method: 'POST', body: 'x' });
  assert.equal(post.status, 405);
});
