/**
 * nbdsh scripts that report back: the Python helpers the interop scripts share and a
 * runner that returns what a script stored in its `out` dictionary. A script prints
 * `out` as JSON on one RESULT line (EPILOGUE), so stray output from libnbd or Python
 * cannot be mistaken for it.
 */
import assert from 'node:assert/strict';
import { nbdsh } from './run.js';

/** Python: errno_of(f) calls f and returns the errno name of its nbd.Error ('error' if none), or None. */
export const PY_ERRNO_OF = `def errno_of(f):
    try:
        f()
    except nbd.Error as e:
        return e.errno or 'error'
    return None`;

/** Python: flush(name, c) flushes handle c and prints `NAME flush OK` or `NAME flush ERRNO` (a failed FLUSH is the expected outcome in the errseq scripts). */
export const PY_FLUSH = `def flush(name, c):
    try:
        c.flush()
        print(name, 'flush OK')
    except nbd.Error as e:
        print(name, 'flush', e.errno)`;

/** Python: pattern(off, n), the n bytes at off of the pattern backend (each 8-byte word holds its offset). Needs struct. */
export const PY_PATTERN = `def pattern(off, n):
    start = off - off % 8
    words = (off - start + n + 7) // 8
    b = b''.join(struct.pack('>Q', start + 8 * i) for i in range(words))
    return b[off - start:off - start + n]`;

/** Python: file_bytes(p, off, n), n bytes of file p at off. */
export const PY_FILE_BYTES = `def file_bytes(p, off, n):
    with open(p, 'rb') as f:
        f.seek(off)
        return f.read(n)`;

/** Python appended to every script: print `out` on the RESULT line. */
const EPILOGUE = `\nprint('RESULT ' + json.dumps(out))\n`;

/** Runs `script` (which imports json and fills `out`) in nbdsh with $uri set; returns `out`. */
export async function nbdshOut(script: string, uri: string): Promise<Record<string, unknown>> {
  const r = await nbdsh(script + EPILOGUE, uri);
  const line = r.stdout.split('\n').find((l) => l.startsWith('RESULT '));
  assert.ok(line, `no RESULT line; stdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return JSON.parse(line.slice('RESULT '.length)) as Record<string, unknown>;
}

/** How many writes streamWritesScript keeps in flight. */
const STREAM_IN_FLIGHT = 8;

/**
 * Python for nbdsh: n writes of bs bytes (block i holds eight-digit i repeated; see streamedBytes), up to
 * STREAM_IN_FLIGHT in flight, each completion checked (aio_command_completed raises on
 * an error reply); prints each index as it is submitted, then flushes, reads every block
 * back and prints VERIFIED.
 */
export function streamWritesScript(bs: number, n: number): string {
  return `
BS = ${bs}
N = ${n}
def data(i):
    return (b'%08d' % i) * (BS // 8)
pending = []
for i in range(N):
    while h.aio_in_flight() >= ${STREAM_IN_FLIGHT}:
        h.poll(-1)
        pending = [c for c in pending if not h.aio_command_completed(c)]
    pending.append(h.aio_pwrite(data(i), i * BS))
    print(i, flush=True)
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in pending:
    h.aio_command_completed(c)
h.flush()
for i in range(N):
    assert h.pread(BS, i * BS) == data(i), "block %d differs" % i
print("VERIFIED", flush=True)
`;
}

/** The whole device after streamWritesScript(bs, n): block i is its `data(i)`. */
export function streamedBytes(bs: number, n: number): Buffer {
  return Buffer.concat(Array.from({ length: n }, (_, i) => Buffer.from(String(i).padStart(8, '0').repeat(bs / 8))));
}
