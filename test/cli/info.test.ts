/**
 * `blockgate info` against nbdinfo for the same servers (blockgate serve with several
 * exports and a description, nbdkit with block sizes from its blocksize-policy filter,
 * a read-only nbdkit): the same size, flags, block sizes, contexts, names and URIs, in
 * text and in --json; --list against nbdinfo --list --json; --size; --can and --is exit
 * codes against nbdinfo's; --map as blockgate map; errors as one line, exit 1.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ChildSet, blockgateRun, type Child } from '../helpers/children.js';
import { run, runOk } from '../helpers/run.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-info-'));
const children = new ChildSet();
let n = 0;
const unixUri = (sock: string, name = '') => `nbd+unix:///${encodeURIComponent(name)}?socket=${sock}`;

after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

async function socketReady(sock: string, child: Child): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (fs.existsSync(sock)) return;
    if (child.proc.exitCode !== null) throw new Error(`server exited: ${child.stderr()}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`no socket ${sock}; stderr: ${child.stderr()}`);
}

async function nbdkit(args: string[]): Promise<string> {
  const sock = path.join(tmp, `${n++}.sock`);
  const filters = args.filter((a) => a.startsWith('--filter=') || a === '-r');
  const child = children.start('nbdkit', ['-f', '--exit-with-parent', '-U', sock, ...filters, ...args.filter((a) => !filters.includes(a))]);
  await socketReady(sock, child);
  return unixUri(sock);
}

async function info(args: string[]): Promise<string> {
  const r = await blockgateRun(['info', ...args]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stderr, '');
  return r.stdout;
}

const nbdinfo = async (args: string[]) => (await runOk('nbdinfo', args)).stdout;

/** `key: value` lines of the per-export block (tab-indented). */
function fields(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^\t(\w[\w-]*): (.*)$/.exec(line);
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

/** The keys nbdinfo --json has that we compare (all but `content`, which needs file(1)). */
type ExportJson = Record<string, unknown>;
function comparable(e: ExportJson): ExportJson {
  const { content: _content, ...rest } = e;
  return rest;
}

describe('blockgate info', () => {
  let bg: string;
  let bgSock: string;
  let kit: string;
  let ro: string;
  before(async () => {
    bgSock = path.join(tmp, 'bg.sock');
    const child = children.blockgate(['serve', '-U', bgSock, '--no-control', '--print-uri', '-l', 'warn', '-D', 'the main disk', 'disk=memory:64M', 'pat=pattern:1M', 'void=null:3M']);
    await child.waitFor(/nbd\+unix:\S+/);
    bg = unixUri(bgSock, 'disk');
    [kit, ro] = await Promise.all([
      nbdkit(['--filter=blocksize-policy', 'memory', '32M', 'blocksize-minimum=512', 'blocksize-preferred=4096', 'blocksize-maximum=1M']),
      nbdkit(['-r', 'sparse-random', '5M']),
    ]);
  });

  test('--json: the same values as nbdinfo --json', async () => {
    for (const uri of [bg, kit, ro]) {
      const ours = JSON.parse(await info(['--json', uri])) as { protocol: string; TLS: boolean; structured: boolean; exports: ExportJson[] };
      const theirs = JSON.parse(await nbdinfo(['--json', uri])) as typeof ours;
      assert.equal(ours.protocol, theirs.protocol);
      assert.equal(ours.TLS, theirs.TLS);
      assert.equal(ours.structured, theirs.structured);
      assert.equal(ours.exports.length, 1);
      assert.deepEqual(comparable(ours.exports[0]!), comparable(theirs.exports[0]!), uri);
    }
  });

  test('text: every field nbdinfo prints, with its value', async () => {
    for (const uri of [bg, kit, ro]) {
      const ours = await info([uri]);
      const theirs = await nbdinfo([uri]);
      const { content: _c, ...expected } = fields(theirs);
      assert.deepEqual(fields(ours), expected, uri);
      // The export line and the contexts list, as nbdinfo writes them.
      const block = (t: string) => t.split('\n').filter((l) => /^export=|^\t\t/.test(l));
      assert.deepEqual(block(ours), block(theirs));
      assert.match(ours, /^protocol: newstyle-fixed without TLS, using (structured packets|extended headers)\n/);
    }
    const text = await info([bg]);
    assert.match(text, /\tdescription: the main disk\n/);
    assert.match(text, /\texport-size: 67108864 \(64M\)\n/);
    assert.match(text, /\tblock_size_preferred: \d+\n/);
  });

  test('--list: the exports nbdinfo --list lists', async () => {
    const uri = unixUri(bgSock);
    type ListJson = { exports: ExportJson[] };
    const ours = JSON.parse(await info(['--list', '--json', uri])) as ListJson;
    const theirs = JSON.parse(await nbdinfo(['--list', '--json', uri])) as ListJson;
    assert.deepEqual(
      ours.exports.map(comparable),
      theirs.exports.map(comparable),
    );
    assert.deepEqual(
      ours.exports.map((e) => e['export-name']),
      ['disk', 'pat', 'void'],
    );
    const text = await info(['--list', uri]);
    assert.equal(text.match(/^export=/gm)?.length, 3);
    assert.match(text, /^export="void":\n(\t.*\n)*\texport-size: 3145728 \(3M\)\n/m);
  });

  test('--size, and --map as blockgate map', async () => {
    assert.equal(await info(['--size', kit]), '33554432\n');
    assert.equal(await info(['--size', ro]), `${5 * 1024 * 1024}\n`);
    const map = await blockgateRun(['map', ro]);
    assert.equal(await info(['--map', ro]), map.stdout);
    assert.equal(await info(['--map', '--json', ro]), (await blockgateRun(['map', '--json', ro])).stdout);
  });

  test('--can and --is: exit 0 or 2 as nbdinfo', async () => {
    // Both answers of several predicates, on a read-write and a read-only server.
    const cases: [string, string, string][] = [
      [bg, '--can', 'flush'],
      [bg, '--is', 'read-only'],
      [ro, '--is', 'read-only'],
      [ro, '--can', 'trim'],
      [ro, '--can', 'multi-conn'],
      [kit, '--can', 'fast-zero'],
    ];
    const codes = await Promise.all(
      cases.map(async ([uri, opt, what]) => {
        const [ours, theirs] = await Promise.all([blockgateRun(['info', opt, what, uri]), run('nbdinfo', [opt, what, uri])]);
        assert.equal(ours.stdout, '');
        return [`${opt} ${what} ${uri}`, ours.code, theirs.code] as const;
      }),
    );
    for (const [what, ours, theirs] of codes) assert.equal(ours, theirs, what);
    assert.deepEqual(new Set(codes.map((c) => c[2])), new Set([0, 2]), 'both answers were seen');
    const bad = await blockgateRun(['info', '--can', 'fly', bg]);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /^blockgate info: unknown --can option: fly/);
  });

  test('errors: one line, exit 1', async () => {
    const none = await blockgateRun(['info', unixUri(path.join(tmp, 'nothing.sock'))]);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /^blockgate info: [^\n]+\n$/);
    const unknown = await blockgateRun(['info', unixUri(bgSock, 'nosuch')]);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /^blockgate info: [^\n]*nosuch[^\n]*\n$/);
    const bad = await blockgateRun(['info', 'http://example.com/']);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /^blockgate info: [^\n]+\n$/);
  });
});
