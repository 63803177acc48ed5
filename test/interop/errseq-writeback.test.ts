/**
 * Interop, write-back error reporting with a real client: the reference's ES9-ES13 and
 * FL1-FL5, each as a named scenario, run by libnbd's nbdsh against a captive server.
 *
 * Each scenario is ONE nbdsh script holding several nbd.Handle() connections to the
 * same export, so their order is the script's order. Failures are injected with error
 * filters whose trigger files the script creates and removes.
 *
 * Making a *background* failure deterministic: the writeback filter runs with
 * `maxDirty: 4096`, so a second 4 KiB write is acknowledged only once the first one's
 * write-back has finished, and a failed write-back is recorded in the export's ErrSeq
 * before its room is freed. "Write A under the trigger, then write B" therefore means
 * "A's write-back has failed and is recorded, and nobody has been told yet". Whatever
 * B's own write-back does afterwards records the same error again on an unseen word,
 * which changes nothing (ES4).
 *
 * The script prints one line per observation ("h1 flush EIO", "h2 flush OK"), and the
 * test compares the whole transcript.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PY_FLUSH } from '../helpers/nbdsh-script.js';
import { nbdsh, run, type RunResult } from '../helpers/run.js';
import { startServer, type CaptiveServer, type TestExport } from '../helpers/server.js';
import type { LayerDescription } from '../../src/device/stack.js';
import type { Export } from '../../src/export/index.js';

const SIZE = '64M';
const SIZE_BYTES = 64 * 2 ** 20;
/** Upper bound of one scripted scenario, and of each wait for a sync point. */
const SCENARIO_TIMEOUT_MS = 60_000;

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-errseq-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));
let serial = 0;

/** A fresh path in the test directory (trigger files, backing files, sync files). */
function fresh(name: string): string {
  return path.join(dir, `${name}-${++serial}`);
}

/** Python literal for a path. */
const py = (s: string): string => JSON.stringify(s);

/** Python run before each script: connections, flush reporting, trigger files, sync points. */
const PRELUDE = `
import os, time
uri = os.environ['uri']
def conn():
    c = nbd.NBD()
    c.connect_uri(uri)
    return c
${PY_FLUSH}
def pwrite(name, c, data, off, flags=0):
    try:
        c.pwrite(data, off, flags)
    except nbd.Error as e:
        print(name, 'write', e.errno)
def pread(name, c, n, off):
    try:
        return c.pread(n, off)
    except nbd.Error as e:
        print(name, 'read', e.errno)
        return None
def touch(p):
    open(p, 'w').close()
def rm(p):
    os.remove(p)
def sync(ready, go):
    touch(ready)
    deadline = time.time() + ${SCENARIO_TIMEOUT_MS / 1000}
    while not os.path.exists(go):
        if time.time() > deadline:
            raise Exception('sync point timed out: ' + go)
        time.sleep(0.005)
A = b'\\x01' * 4096
B = b'\\x02' * 4096
C = b'\\x03' * 4096
D = b'\\x04' * 4096
`;

/** Runs a scenario script (the prelude first) and returns its transcript lines. */
async function scenario(uri: string, script: string): Promise<string[]> {
  const r = await nbdsh(PRELUDE + script, uri, SCENARIO_TIMEOUT_MS);
  return transcript(r);
}

function transcript(r: RunResult): string[] {
  return r.stdout.split('\n').filter((l) => l.length > 0);
}

type BackendKind = 'memory' | 'file';

function backend(kind: BackendKind): LayerDescription & { path?: string } {
  return kind === 'memory' ? { type: 'memory', size: SIZE } : { type: 'file', path: fresh('disk'), size: SIZE, create: true };
}

/** Starts a server with one default export, runs `fn`, always closes the server. */
async function withServer(exp: Omit<TestExport, 'name'>, fn: (s: CaptiveServer) => Promise<void>): Promise<void> {
  const s = await startServer([{ name: '', ...exp }]);
  try {
    await fn(s);
  } finally {
    await s.close();
  }
}

/** The usual stack: a small write-back cache over an error filter that fails write-back while `trigger` exists. */
function writebackStack(kind: BackendKind, trigger: string, extra: Record<string, unknown> = {}): Omit<TestExport, 'name'> {
  return {
    backend: backend(kind),
    filters: [
      { type: 'writeback', maxDirty: 4096, ...extra },
      { type: 'error', ops: ['writeback'], file: trigger },
    ],
  };
}

/** Script lines that leave an unseen background write-back failure behind (see the module comment). */
function backgroundFailure(trigger: string, writer = 'h1'): string {
  return `
touch(${py(trigger)})
pwrite('${writer}', ${writer}, A, 0)
pwrite('${writer}', ${writer}, B, 4096)
rm(${py(trigger)})
`;
}

/**
 * Runs a scenario against the usual write-back stack (writebackStack) with a fresh
 * trigger file, which `script` gets to arm and disarm; returns the transcript.
 */
async function writebackScenario(kind: BackendKind, script: (trigger: string) => string): Promise<string[]> {
  const trigger = fresh('trigger');
  let out: string[] = [];
  await withServer(writebackStack(kind, trigger), async (s) => {
    out = await scenario(s.uri(), script(trigger));
  });
  return out;
}

/** Polls for a file the script creates (bounded; a missing file fails the test, it never hangs). */
async function waitFor(file: string): Promise<void> {
  const deadline = Date.now() + SCENARIO_TIMEOUT_MS;
  while (!fs.existsSync(file)) {
    if (Date.now() > deadline) throw new Error(`the script never reached ${file}`);
    await new Promise<void>((resolve) => setTimeout(resolve, 5));
  }
}

/** Per-session errorPending in session (connection) order. */
function pending(exp: Export): boolean[] {
  return exp
    .sessions()
    .sort((a, b) => a.id - b.id)
    .map((s) => s.errorPending);
}

for (const kind of ['memory', 'file'] as const) {
  describe(`errseq scenarios over the ${kind} backend`, () => {
    test('ES9 two sessions open before a background write-back failure each get EIO on their next FLUSH, once', async () => {
      const out = await writebackScenario(
        kind,
        (trigger) => `
h1 = conn()
h2 = conn()
${backgroundFailure(trigger)}
flush('h1', h1)
flush('h2', h2)
flush('h1', h1)
flush('h2', h2)
`,
      );
      assert.deepEqual(out, ['h1 flush EIO', 'h2 flush EIO', 'h1 flush OK', 'h2 flush OK']);
    });

    test('ES10 a session opened after an unseen error sees it at its first FLUSH', async () => {
      const out = await writebackScenario(
        kind,
        (trigger) => `
h1 = conn()
${backgroundFailure(trigger)}
h2 = conn()
flush('h2', h2)
flush('h2', h2)
flush('h1', h1)
flush('h1', h1)
`,
      );
      assert.deepEqual(out, ['h2 flush EIO', 'h2 flush OK', 'h1 flush EIO', 'h1 flush OK']);
    });

    test('ES11 a session opened after the error was reported to another session does not see it', async () => {
      const out = await writebackScenario(
        kind,
        (trigger) => `
h1 = conn()
${backgroundFailure(trigger)}
flush('h1', h1)
h2 = conn()
flush('h2', h2)
flush('h1', h1)
`,
      );
      assert.deepEqual(out, ['h1 flush EIO', 'h2 flush OK', 'h1 flush OK']);
    });

    test('ES12 only the latest error is reported: EIO then ENOSPC before any FLUSH gives ENOSPC, once', () => {
      const eio = fresh('eio');
      const enospc = fresh('enospc');
      const exp: Omit<TestExport, 'name'> = {
        backend: backend(kind),
        filters: [
          { type: 'writeback', maxDirty: 4096 },
          { type: 'error', ops: ['writeback'], error: 'EIO', file: eio },
          { type: 'error', ops: ['writeback'], error: 'ENOSPC', file: enospc },
        ],
      };
      return withServer(exp, async (s) => {
        const out = await scenario(
          s.uri(),
          `
h1 = conn()
h2 = conn()
touch(${py(eio)})
pwrite('h1', h1, A, 0)
pwrite('h1', h1, B, 4096)
rm(${py(eio)})
touch(${py(enospc)})
pwrite('h1', h1, C, 8192)
pwrite('h1', h1, D, 12288)
rm(${py(enospc)})
flush('h1', h1)
flush('h2', h2)
flush('h1', h1)
flush('h2', h2)
`,
        );
        assert.deepEqual(out, ['h1 flush ENOSPC', 'h2 flush ENOSPC', 'h1 flush OK', 'h2 flush OK']);
        assert.equal(s.exports[0]!.errseq.describe().errorName, 'ENOSPC');
      });
    });

    test('FL1 a background write-back failure nobody waits for is recorded in the export ErrSeq', () => {
      const trigger = fresh('trigger');
      return withServer(writebackStack(kind, trigger), async (s) => {
        const out = await scenario(s.uri(), `h1 = conn()\n${backgroundFailure(trigger)}\nprint('done')\n`);
        assert.deepEqual(out, ['done'], 'both writes were acknowledged');
        const state = s.exports[0]!.errseq.describe();
        assert.equal(state.errorName, 'EIO');
        assert.equal(state.seen, false, 'recorded, and not yet reported to anyone');
      });
    });

    test("FL3 'drop': after a reported failure the next FLUSH succeeds and the data stays lost (no retry resurrects it)", () => {
      const trigger = fresh('trigger');
      const exp = writebackStack(kind, trigger);
      return withServer(exp, async (s) => {
        const out = await scenario(
          s.uri(),
          `
h1 = conn()
${backgroundFailure(trigger)}
flush('h1', h1)
flush('h1', h1)
print('h1 read A', 'lost' if pread('h1', h1, 4096, 0) == bytes(4096) else 'present')
print('h1 read B', 'lost' if pread('h1', h1, 4096, 4096) == bytes(4096) else 'present')
`,
        );
        // B was written after the trigger was removed or failed with it: either way A is gone.
        assert.deepEqual(out.slice(0, 3), ['h1 flush EIO', 'h1 flush OK', 'h1 read A lost']);
        if (kind === 'file') {
          const file = (exp.backend as unknown as { path: string }).path;
          assert.deepEqual(fs.readFileSync(file).subarray(0, 4096), Buffer.alloc(4096));
        }
      });
    });

    test("FL3 'keep': failed data stays dirty, every FLUSH fails while write-back fails, and the retry makes it durable", () => {
      const trigger = fresh('trigger');
      const exp = writebackStack(kind, trigger, { onError: 'keep', maxDirty: '1M' });
      return withServer(exp, async (s) => {
        const out = await scenario(
          s.uri(),
          `
h1 = conn()
h2 = conn()
touch(${py(trigger)})
pwrite('h1', h1, A, 0)
flush('h1', h1)
flush('h1', h1)
print('h1 read A', 'present' if pread('h1', h1, 4096, 0) == A else 'lost')
rm(${py(trigger)})
flush('h1', h1)
flush('h2', h2)
flush('h2', h2)
`,
        );
        assert.deepEqual(out, ['h1 flush EIO', 'h1 flush EIO', 'h1 read A present', 'h1 flush OK', 'h2 flush EIO', 'h2 flush OK']);
        if (kind === 'file') {
          const file = (exp.backend as unknown as { path: string }).path;
          assert.deepEqual(fs.readFileSync(file).subarray(0, 4096), Buffer.alloc(4096, 1));
        }
      });
    });
  });
}

describe('errseq scenarios: flush fan-out, FL2, FL4, FL5', () => {
  for (const kind of ['memory', 'file'] as const) {
    test(`fan-out (${kind}): a real backend flush failure reaches every session exactly once, not only the one that flushed`, () => {
      const trigger = fresh('trigger');
      return withServer({ backend: backend(kind), filters: [{ type: 'error', ops: ['flush'], file: trigger }] }, async (s) => {
        const out = await scenario(
          s.uri(),
          `
h1 = conn()
h2 = conn()
h3 = conn()
h1.pwrite(A, 0)
touch(${py(trigger)})
flush('h1', h1)
rm(${py(trigger)})
flush('h1', h1)
flush('h2', h2)
flush('h3', h3)
flush('h2', h2)
flush('h3', h3)
h4 = conn()
flush('h4', h4)
`,
        );
        assert.deepEqual(out, [
          'h1 flush EIO',
          'h1 flush OK',
          'h2 flush EIO',
          'h3 flush EIO',
          'h2 flush OK',
          'h3 flush OK',
          'h4 flush OK',
        ]);
      });
    });
  }

  test('FL2 FLUSH fails iff the backend flush fails or a write-back error is pending; the cursor advances either way', () => {
    const enospc = fresh('enospc');
    const flushFails = fresh('flush');
    const exp: Omit<TestExport, 'name'> = {
      backend: backend('memory'),
      filters: [
        { type: 'writeback', maxDirty: 4096 },
        { type: 'error', ops: ['writeback'], error: 'ENOSPC', file: enospc },
        { type: 'error', ops: ['flush'], error: 'EIO', file: flushFails },
      ],
    };
    return withServer(exp, async (s) => {
      const out = await scenario(
        s.uri(),
        `
h1 = conn()
h2 = conn()
flush('h1', h1)
touch(${py(enospc)})
pwrite('h1', h1, A, 0)
pwrite('h1', h1, B, 4096)
rm(${py(enospc)})
touch(${py(flushFails)})
flush('h1', h1)
rm(${py(flushFails)})
flush('h1', h1)
flush('h2', h2)
flush('h2', h2)
`,
      );
      assert.deepEqual(out, [
        'h1 flush OK', // nothing failed, nothing pending
        'h1 flush EIO', // the backend flush error wins over the pending ENOSPC ...
        'h1 flush OK', // ... and the cursor advanced past both
        'h2 flush EIO', // the latest error, recorded by the server from the failed flush
        'h2 flush OK',
      ]);
    });
  });

  test('FL4 a FLUSH on one session makes every write acknowledged before it, on any session, durable', () => {
    const file = fresh('disk');
    const exp: Omit<TestExport, 'name'> = {
      backend: { type: 'file', path: file, size: SIZE, create: true },
      filters: [{ type: 'writeback' }],
    };
    return withServer(exp, async (s) => {
      const out = await scenario(
        s.uri(),
        `
h1 = conn()
h2 = conn()
for i in range(64):
    h1.pwrite(bytes([i + 1]) * 4096, i * 8192)
h2.pwrite(D, 1 << 20)
flush('h2', h2)
with open(${py(file)}, 'rb') as f:
    data = f.read(2 << 20)
ok = all(data[i * 8192:i * 8192 + 4096] == bytes([i + 1]) * 4096 for i in range(64)) and data[1 << 20:(1 << 20) + 4096] == D
print('durable' if ok else 'missing')
h1.pwrite(C, 3 << 20, nbd.CMD_FLAG_FUA)
with open(${py(file)}, 'rb') as f:
    f.seek(3 << 20)
    print('fua durable' if f.read(4096) == C else 'fua missing')
`,
      );
      assert.deepEqual(out, ['h2 flush OK', 'durable', 'fua durable']);
    });
  });

  test('FL5 a short backend read (the file shrank under the server) is EIO, never success', () => {
    const file = fresh('disk');
    const exp: Omit<TestExport, 'name'> = {
      backend: { type: 'file', path: file, size: SIZE, create: true },
      filters: [{ type: 'writeback' }],
    };
    return withServer(exp, async (s) => {
      const out = await scenario(
        s.uri(),
        `
h1 = conn()
os.truncate(${py(file)}, 4096)
print('head', 'ok' if pread('h1', h1, 4096, 0) is not None else 'failed')
r = pread('h1', h1, 4096, 8192)
os.truncate(${py(file)}, ${SIZE_BYTES})
`,
      );
      assert.deepEqual(out, ['head ok', 'h1 read EIO']);
    });
  });
});

describe('errseq scenarios: ES13 non-consuming observers', () => {
  /**
   * Three sessions, an unseen background failure, and three sync points at which the
   * test may look at Export.sessions() (masked check, never consumes) and the ErrSeq
   * (peek). Returns the transcript and what was seen at each sync point.
   */
  async function observed(look: boolean): Promise<{ out: string[]; seen: (boolean[] | null)[] }> {
    const trigger = fresh('trigger');
    const ready = fresh('ready');
    const go = fresh('go');
    const seen: (boolean[] | null)[] = [];
    let out: string[] = [];
    await withServer(writebackStack('memory', trigger), async (s) => {
      const exp = s.exports[0]!;
      const script = `
h1 = conn()
h2 = conn()
${backgroundFailure(trigger)}
sync(${py(ready + '1')}, ${py(go + '1')})
h3 = conn()
flush('h1', h1)
sync(${py(ready + '2')}, ${py(go + '2')})
flush('h2', h2)
flush('h3', h3)
flush('h1', h1)
sync(${py(ready + '3')}, ${py(go + '3')})
flush('h2', h2)
flush('h3', h3)
`;
      const child = run('nbdsh', ['-c', PRELUDE + script], { env: { uri: s.uri() }, timeoutMs: SCENARIO_TIMEOUT_MS });
      try {
        for (let i = 1; i <= 3; i++) {
          await waitFor(ready + i);
          if (look) {
            // Look twice: looking must be idempotent as well as harmless.
            const first = pending(exp);
            assert.deepEqual(pending(exp), first);
            seen.push(first);
            if (i === 1) assert.equal(exp.errseq.seen, false, 'looking did not consume the unseen error');
          } else {
            seen.push(null);
          }
          fs.writeFileSync(go + i, '');
        }
      } finally {
        // Let the script finish even if a check failed, so no client is left behind.
        for (let i = 1; i <= 3; i++) fs.writeFileSync(go + i, '');
      }
      const r = await child;
      assert.equal(r.code, 0, r.stderr);
      out = transcript(r);
    });
    return { out, seen };
  }

  test('ES13 Export.sessions() reports pending errors without consuming: the transcript is the same with and without it', async () => {
    const expected = ['h1 flush EIO', 'h2 flush EIO', 'h3 flush EIO', 'h1 flush OK', 'h2 flush OK', 'h3 flush OK'];
    const without = await observed(false);
    assert.deepEqual(without.out, expected);
    const withLooks = await observed(true);
    assert.deepEqual(withLooks.out, expected);
    assert.deepEqual(withLooks.seen, [
      [true, true], // h1, h2: both would be told
      [false, true, true], // h1 consumed it; no phantom for h1; h3 (opened after the look) still will be told
      [false, false, false],
    ]);
  });
});
