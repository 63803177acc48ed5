/**
 * The status page of `blockgate serve --http` in real headless Chromium (Debian's
 * `chromium`, driven by puppeteer-core): it renders the exports and the sessions of a
 * running server, its graphs take the one-second samples of the event stream while a
 * client writes, and its write-back error timeline shows a session being told while
 * another still has the error pending. A screenshot is saved in test-artifacts/.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import puppeteer, { type Browser, type Page } from 'puppeteer-core';
import { ChildSet } from '../helpers/children.js';
import { run, type RunResult } from '../helpers/run.js';

const CHROMIUM = '/usr/bin/chromium';
const ARTIFACTS = path.resolve(import.meta.dirname, '../../test-artifacts');
/** Upper bound of each wait for the page. */
const PAGE_WAIT_MS = 30_000;
/** Polls of the sync files the nbdsh scripts wait for, 50 ms apart. */
const SYNC_POLLS = 1200;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-obs-page-'));
const NBD = path.join(tmp, 'nbd.sock');
const children = new ChildSet();
let base = '';
let browser: Browser;
let page: Page;

const uri = (name: string): string => `nbd+unix:///${name}?socket=${NBD}`;
const py = (s: string): string => JSON.stringify(s);

/** Python: wait (bounded) until `file` exists. */
const waitFile = (file: string): string => `
for _ in range(${SYNC_POLLS}):
    if os.path.exists(${py(file)}): break
    time.sleep(0.05)
`;

async function untilExists(file: string): Promise<void> {
  for (let i = 0; i < SYNC_POLLS && !fs.existsSync(file); i++) await new Promise((r) => setTimeout(r, 50));
  assert.ok(fs.existsSync(file), `${file} never appeared`);
}

before(async () => {
  const config = path.join(tmp, 'serve.json');
  fs.writeFileSync(
    config,
    JSON.stringify({
      listen: [{ path: NBD }],
      http: '127.0.0.1:0',
      exports: [
        { name: 'disk', description: 'scratch disk', backend: { type: 'memory', size: '64M' } },
        { name: 'wb', backend: { type: 'memory', size: '1M' }, filters: [{ type: 'writeback', maxDirty: 4096 }, { type: 'error', ops: ['writeback'], error: 'EIO', count: 1 }] },
      ],
    }),
  );
  const server = children.blockgate(['serve', '--print-uri', '--no-control', '--log-format', 'json', '--config', config]);
  base = (await server.waitFor(/"http":"(http:\/\/[^"]+\/)"/, 'stderr'))[1]!;
  await server.waitFor(/nbd\+unix/);
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // As root (CI containers) Chromium refuses to start with its sandbox.
    args: [...(process.getuid?.() === 0 ? ['--no-sandbox'] : []), '--disable-gpu', '--disable-dev-shm-usage'],
  });
  page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 1000 });
  await page.goto(base, { timeout: PAGE_WAIT_MS });
  await page.waitForSelector('body[data-state=live]', { timeout: PAGE_WAIT_MS });
});

after(async () => {
  await browser?.close();
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

test('the page renders every export with its stack description and size', async () => {
  await page.waitForSelector('[data-export=wb]', { timeout: PAGE_WAIT_MS });
  const heads = await page.$$eval('[data-export] h3', (hs) => hs.map((h) => h.textContent));
  assert.equal(heads.length, 2);
  assert.match(heads[0]!, /^disk — scratch disk$/);
  assert.match(heads[1]!, /^wb — memory 1MiB.*write-back/);
  const info = await page.$eval('[data-export=disk] .muted', (e) => e.textContent);
  assert.match(info!, /^64\.0 MiB, read-write, 0 session\(s\)/);
  assert.equal((await page.$$('[data-export] canvas')).length, 6, 'three graphs per export');
});

test('while a client writes, the graphs take live samples and the sessions table shows it with its bytes', async () => {
  const stop = path.join(tmp, 'stop-writer');
  // Writes 256 KiB at a time round the 64 MiB export until told to stop (bounded).
  const writer = run(
    'nbdsh',
    [
      '-c',
      `
import os, time
c = nbd.NBD()
c.connect_uri(${py(uri('disk'))})
buf = b'w' * 262144
for i in range(200000):
    if i % 16 == 0 and os.path.exists(${py(stop)}): break
    c.pwrite(buf, (i % 256) * 262144)
c.shutdown()
`,
    ],
    { timeoutMs: 120_000 },
  );
  try {
    const before = Number(await page.$eval('body', (b) => b.getAttribute('data-updates')));
    // Two samples taken while the writer runs, the last with bytes written. (Strings: this file has no DOM types.)
    const caption = "(document.querySelector('[data-export=disk] figcaption').textContent || '')";
    await page.waitForFunction(`Number(document.body.dataset.updates) >= ${before + 2} && /now /.test(${caption}) && !/now 0 B\\/s read, 0 B\\/s write/.test(${caption})`, { timeout: PAGE_WAIT_MS });
    const points = Number(await page.$eval('[data-export=disk] canvas[data-graph=throughput]', (c) => c.getAttribute('data-points')));
    assert.ok(points >= 2, `the throughput graph drew ${points} samples`);
    await page.waitForFunction(
      "[...document.querySelectorAll('#sessions tbody tr[data-session]')].some((r) => r.children[1].textContent === 'disk' && /^[\\d.]+ [KMGT]iB$/.test(r.children[8].textContent))",
      { timeout: PAGE_WAIT_MS },
    );
    const row = await page.$$eval('#sessions tbody tr[data-session]', (rs) => rs.map((r) => [...r.children].map((c) => c.textContent)));
    const disk = row.find((r) => r[1] === 'disk')!;
    assert.equal(disk[2], 'unix', 'the peer');
    assert.equal(disk[3], 'clear');
    assert.match(disk[4]!, /^(structured|extended)$/);
    assert.match(disk[5]!, /SEND_FLUSH/);
  } finally {
    fs.writeFileSync(stop, '');
    const r: RunResult = await writer;
    assert.equal(r.code, 0, r.stderr);
  }
});

test('the write-back error timeline shows the error recorded, one session told and the other still pending', async () => {
  const ready = path.join(tmp, 'errseq-ready');
  const go = path.join(tmp, 'errseq-go');
  const script = run(
    'nbdsh',
    [
      '-c',
      `
import os, time
h1 = nbd.NBD()
h1.connect_uri(${py(uri('wb'))})
h2 = nbd.NBD()
h2.connect_uri(${py(uri('wb'))})
h1.pwrite(b'A' * 4096, 0)
h1.pwrite(b'B' * 4096, 4096)
try:
    h1.flush()
    print('h1 flush OK')
except nbd.Error as e:
    print('h1 flush', e.errno)
open(${py(ready)}, 'w').close()
${waitFile(go)}
`,
    ],
    { timeoutMs: 120_000 },
  );
  try {
    await untilExists(ready);
    await page.waitForSelector('#timeline li[data-kind=reported]', { timeout: PAGE_WAIT_MS });
    await page.waitForSelector('#timeline li[data-kind=recorded]', { timeout: PAGE_WAIT_MS });
    await page.waitForSelector('#timeline li[data-kind=pending]', { timeout: PAGE_WAIT_MS });
    const told = await page.$$eval('#timeline li[data-kind=reported]', (ls) => ls.map((l) => [l.getAttribute('data-session'), l.textContent]));
    assert.equal(told.length, 1);
    assert.match(told[0]![1]!, /told session \d+ \(unix\) of EIO on wb/);
    const pending = await page.$$eval('#timeline li[data-kind=pending]', (ls) => ls.map((l) => [l.getAttribute('data-session'), l.textContent]));
    assert.equal(pending.length, 1);
    assert.notEqual(pending[0]![0], told[0]![0], 'the pending session is the one not told');
    assert.match(pending[0]![1]!, /still pending: session \d+ \(unix\) on wb has EIO/);
    const states = await page.$$eval('#sessions tbody tr[data-session]', (rs) => Object.fromEntries(rs.map((r) => [r.getAttribute('data-session'), r.children[9]!.textContent])));
    assert.equal(states[told[0]![0]!], 'none');
    assert.equal(states[pending[0]![0]!], 'pending');
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: path.join(ARTIFACTS, 'observability-status-page.png'), fullPage: true });
  } finally {
    fs.writeFileSync(go, '');
    const r = await script;
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), 'h1 flush EIO');
  }
});
