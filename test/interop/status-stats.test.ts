/**
 * `blockgate status` shows an export's live figures when its stack has a stats filter:
 * the bytes nbdcopy wrote and read are the bytes status reports, without stopping the
 * server, in the JSON and in the text form.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ChildSet, blockgateOk, statusJson } from '../helpers/children.js';
import { runOk } from '../helpers/run.js';

const MiB = 1024 * 1024;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-status-stats-'));
const CTL = path.join(tmp, 'ctl.sock');
const NBD = path.join(tmp, 'nbd.sock');
const children = new ChildSet();

after(() => {
  children.killAll();
  fs.rmSync(tmp, { recursive: true, force: true });
});

interface OpJson {
  count: number;
  bytes: number;
  errors: number;
}

test('status reports the stats filter figures of a running export: nbdcopy N bytes in and out, N bytes each way', async () => {
  const config = path.join(tmp, 'serve.json');
  fs.writeFileSync(
    config,
    JSON.stringify({
      listen: [{ path: NBD }],
      exports: [{ name: 'disk', backend: { type: 'memory', size: '16M' }, filters: [{ type: 'stats' }] }, { name: 'plain', backend: { type: 'memory', size: '1M' } }],
    }),
  );
  const server = children.blockgate(['serve', '--print-uri', '--control', CTL, '--config', config]);
  await server.waitFor(/nbd\+unix/);
  const data = path.join(tmp, 'data.img');
  const N = 3 * MiB;
  fs.writeFileSync(data, Buffer.alloc(N, 0x5a));
  const uri = `nbd+unix:///disk?socket=${NBD}`;
  // --no-extents and a dense source: every byte is a WRITE, then a READ.
  await runOk('nbdcopy', ['--no-extents', data, uri]);
  await runOk('nbdcopy', ['--no-extents', uri, path.join(tmp, 'back.img')]);
  const st = await statusJson(CTL);
  const disk = st.exports.find((e) => e.name === 'disk') as unknown as { stats?: { ops: Record<string, OpJson> } };
  assert.ok(disk.stats, 'the stats filter export has figures');
  assert.equal(disk.stats.ops.write!.bytes, N);
  assert.equal(disk.stats.ops.read!.bytes, 16 * MiB, 'nbdcopy reads the whole 16 MiB export');
  assert.equal(disk.stats.ops.write!.errors, 0);
  assert.equal((st.exports.find((e) => e.name === 'plain') as unknown as { stats?: unknown }).stats, undefined, 'no stats filter, no figures');
  const text = (await blockgateOk(['status', '--control', CTL])).stdout;
  assert.match(text, /write: \d+ ops, 3MiB, 0 errors, p50 \d+ µs, p99 \d+ µs/);
});
