/**
 * Fuzzing the session state machine with fast-check: random bytes and mutated valid
 * messages, sent during the handshake and after a valid one (in each reply mode). The
 * properties: the server never throws (no uncaught exception or unhandled rejection),
 * never hangs (every connection closes soon after the client ends its side), keeps no
 * session behind, keeps serving new clients, and its memory stays bounded.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import fc from 'fast-check';
import { MemoryDevice } from '../../src/backends/memory.js';
import { Export } from '../../src/export/index.js';
import { BASE_ALLOCATION, NBD_CLIENT_FLAG, NBD_CMD, NBD_CMD_FLAG, NBD_OPT } from '../../src/nbd/constants.js';
import { encodeInfoRequest, encodeMetaContextRequest, encodeOption, encodeRequest } from '../../src/nbd/codec.js';
import { GatedDevice, connect, expectOk, readReply, serveExports, until, type DirectServer, type Mode } from './helpers.js';

/** How long one case may take from the client's end-of-stream to the server's close. */
const CASE_TIMEOUT_MS = 5000;
const DEVICE_SIZE = 2 ** 20;
const LIMITS = {
  maxOptionLength: 512,
  maxOptions: 32,
  handshakeTimeoutMs: 5000,
  maxPayload: 64 * 1024,
  maxDiscard: 256 * 1024,
  maxInFlightRequests: 16,
  maxInFlightBytes: 256 * 1024,
  // Low, so that fuzzed READs take the sparse (extents) path too.
  sparseReadMinimum: 4096,
};
/** Growth of the resident set over the whole fuzz run that would mean something is kept. */
const MAX_RSS_GROWTH = 256 * 2 ** 20;

let srv: DirectServer;
/** The fuzzed export's device, counting the calls that reached it (the fuzz must get that far). */
let disk: GatedDevice;
const uncaught: unknown[] = [];
const onUncaught = (e: unknown) => uncaught.push(e);
let rssBefore = 0;

before(async () => {
  process.on('uncaughtException', onUncaught);
  process.on('unhandledRejection', onUncaught);
  // Small devices: whatever the fuzzer writes, memory stays bounded by their sizes.
  disk = new GatedDevice(new MemoryDevice({ size: DEVICE_SIZE }));
  await disk.write(Buffer.alloc(4096, 0x5a), 8192, 0);
  srv = await serveExports(
    [
      new Export({ name: 'disk', device: disk }),
      new Export({ name: 'ro', device: new MemoryDevice({ size: DEVICE_SIZE }), readOnly: true }),
      // A bare backend: WRITE payloads take the gathered (writev) path.
      new Export({ name: 'mem', device: new MemoryDevice({ size: DEVICE_SIZE }) }),
    ],
    LIMITS,
  );
  rssBefore = process.memoryUsage().rss;
});

after(async () => {
  process.off('uncaughtException', onUncaught);
  process.off('unhandledRejection', onUncaught);
  await srv.close();
});

/**
 * Sends `bytes` on a fresh connection, ends the client's side and waits for the server to
 * close. Everything the server sends is read and dropped, so it never blocks on us.
 */
function runCase(bytes: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(srv.socket);
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`server did not close within ${CASE_TIMEOUT_MS} ms after ${bytes.length} bytes: ${bytes.toString('hex').slice(0, 400)}`));
    }, CASE_TIMEOUT_MS);
    sock.on('data', () => undefined);
    sock.on('error', () => undefined); // EPIPE/ECONNRESET when the server hangs up first
    sock.on('close', () => {
      clearTimeout(timer);
      resolve();
    });
    sock.on('connect', () => {
      sock.write(bytes);
      sock.end();
    });
  });
}

/** After a batch: no session left behind, no exception escaped, and a normal client is served. */
async function serverIsHealthy(): Promise<void> {
  await until(() => srv.server.sessionCount === 0, 'every fuzzed session to close');
  assert.deepEqual(uncaught, []);
  const c = await connect(srv.socket, 'structured', 'disk', true);
  c.request(0, NBD_CMD.NBD_CMD_FLUSH, 1n, 0, 0);
  await expectOk(c, 1n);
  c.close();
}

// ---------------------------------------------------------------------------------
// Arbitraries

const FLAGS_OK = NBD_CLIENT_FLAG.NBD_FLAG_C_FIXED_NEWSTYLE | NBD_CLIENT_FLAG.NBD_FLAG_C_NO_ZEROES;
const u32 = fc.integer({ min: 0, max: 0xffff_ffff });
const u16 = fc.integer({ min: 0, max: 0xffff });

function be32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

/**
 * Byte edits applied to an encoded message: overwrite some bytes, maybe cut it short.
 * Most messages stay intact, so that a sequence gets deep into the state machine
 * before a mutation derails it.
 */
const mutation = fc.record({
  edits: fc.oneof(
    { weight: 4, arbitrary: fc.constant<{ at: number; byte: number }[]>([]) },
    { weight: 1, arbitrary: fc.array(fc.record({ at: fc.nat(), byte: fc.integer({ min: 0, max: 255 }) }), { minLength: 1, maxLength: 3 }) },
  ),
  cut: fc.oneof({ weight: 20, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: fc.nat() }),
});

function mutate(b: Buffer, m: { edits: readonly { at: number; byte: number }[]; cut: number | null }): Buffer {
  if (b.length === 0) return b;
  const out = Buffer.from(b);
  for (const e of m.edits) out[e.at % out.length] = e.byte;
  return m.cut === null ? out : out.subarray(0, m.cut % (out.length + 1));
}

const exportName = fc.constantFrom('', 'disk', 'ro', 'mem', 'nope', 'é', 'x'.repeat(600));
const optionData = fc.oneof(
  fc.constant(Buffer.alloc(0)),
  fc.tuple(exportName, fc.array(u16.map((n) => n % 6), { maxLength: 4 })).map(([n, i]) => encodeInfoRequest(n, i)),
  fc
    .tuple(exportName, fc.array(fc.constantFrom(BASE_ALLOCATION, 'base:', 'x-a:b', '', 'qemu:dirty-bitmap:x'), { maxLength: 4 }))
    .map(([n, q]) => encodeMetaContextRequest(n, q)),
  fc.uint8Array({ maxLength: 700 }).map((a) => Buffer.from(a)),
);
const option = fc
  .record({ opt: fc.oneof(fc.integer({ min: 0, max: 12 }), u32), data: optionData, m: mutation })
  .map(({ opt, data, m }) => mutate(encodeOption(opt, data), m));
const clientFlags = fc.oneof(fc.constant(FLAGS_OK), fc.constant(NBD_CLIENT_FLAG.NBD_FLAG_C_FIXED_NEWSTYLE), u32);

const modeArb = fc.constantFrom<Mode>('simple', 'structured', 'extended');

/** Client flags and options that reach transmission on 'disk' in `mode` (sent without waiting for replies). */
function handshakeBytes(mode: Mode, name = 'disk'): Buffer {
  const parts = [be32(FLAGS_OK)];
  if (mode === 'structured') parts.push(encodeOption(NBD_OPT.NBD_OPT_STRUCTURED_REPLY));
  if (mode === 'extended') parts.push(encodeOption(NBD_OPT.NBD_OPT_EXTENDED_HEADERS));
  if (mode !== 'simple') {
    parts.push(encodeOption(NBD_OPT.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest(name, [BASE_ALLOCATION])));
  }
  parts.push(encodeOption(NBD_OPT.NBD_OPT_GO, encodeInfoRequest(name, [])));
  return Buffer.concat(parts);
}

const F = NBD_CMD_FLAG;
/**
 * u64 values where a number stops being the wire value: the last safe integer, 2^53
 * (whose successor rounds to it), 2^63, and 2^64 - 1 (which rounds to 2^64, beyond any
 * u64). Bigints, so they go out with all 64 bits.
 */
const U64_EDGES = [2n ** 53n - 1n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n] as const;
const u64Edge = fc.constantFrom(...U64_EDGES);
// Mostly plausible values, so that most requests pass validation and reach the device;
// the rest probe the edges (past the end, beyond maxPayload/maxDiscard, beyond 2^32, 2^53 and 2^64 - 1).
const offsetArb = fc.oneof(
  { weight: 8, arbitrary: fc.integer({ min: 0, max: DEVICE_SIZE - 1 }) },
  { weight: 1, arbitrary: fc.integer({ min: DEVICE_SIZE - 70_000, max: DEVICE_SIZE + 70_000 }) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }) },
  { weight: 1, arbitrary: u64Edge },
);
const lengthArb = fc.oneof(
  { weight: 2, arbitrary: fc.constant(0) },
  { weight: 8, arbitrary: fc.integer({ min: 1, max: 4096 }) },
  { weight: 3, arbitrary: fc.integer({ min: 4097, max: 80_000 }) },
  { weight: 1, arbitrary: fc.integer({ min: 80_001, max: 300_000 }) },
  { weight: 1, arbitrary: u32 },
  { weight: 1, arbitrary: u64Edge },
);
const requestArb = fc
  .record({
    type: fc.oneof(
      { weight: 20, arbitrary: fc.constantFrom(0, 1, 3, 4, 5, 6, 7) },
      { weight: 1, arbitrary: fc.constantFrom(NBD_CMD.NBD_CMD_DISC, NBD_CMD.NBD_CMD_RESIZE) },
      { weight: 1, arbitrary: u16 },
    ),
    flags: fc.oneof(
      { weight: 6, arbitrary: fc.constant(0) },
      { weight: 3, arbitrary: fc.constantFrom(F.NBD_CMD_FLAG_FUA, F.NBD_CMD_FLAG_DF, F.NBD_CMD_FLAG_REQ_ONE, F.NBD_CMD_FLAG_NO_HOLE | F.NBD_CMD_FLAG_FAST_ZERO) },
      { weight: 1, arbitrary: u16 },
    ),
    /** Extended headers: PAYLOAD_LEN as a client would set it (on WRITE only), or at random. */
    payloadLen: fc.oneof({ weight: 8, arbitrary: fc.constant('auto' as const) }, { weight: 1, arbitrary: fc.boolean() }),
    cookie: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
    offset: offsetArb,
    length: lengthArb,
    /** FLUSH and DISC with the zero offset and length they must have. */
    plausible: fc.boolean(),
    m: mutation,
  })
  .map((r) =>
    r.plausible && (r.type === NBD_CMD.NBD_CMD_FLUSH || r.type === NBD_CMD.NBD_CMD_DISC) ? { ...r, offset: 0, length: 0 } : r,
  );
type FuzzRequest = typeof requestArb extends fc.Arbitrary<infer V> ? V : never;

/** The most payload bytes one fuzzed request carries, so that a case stays small. */
const MAX_FUZZ_PAYLOAD = 100_000;

/** A request as a client in `mode` would encode it, payload included (capped so a case stays small). */
function encodeFuzzRequest(mode: Mode, r: FuzzRequest): Buffer {
  const ext = mode === 'extended';
  const payloadLen = r.payloadLen === 'auto' ? r.type === NBD_CMD.NBD_CMD_WRITE : r.payloadLen;
  const flags = ext && payloadLen ? r.flags | F.NBD_CMD_FLAG_PAYLOAD_LEN : r.flags;
  // A compact header has 32 length bits: the low ones of whatever was generated.
  const length = ext ? r.length : Number(BigInt.asUintN(32, BigInt(r.length)));
  const header = encodeRequest(flags, r.type, r.cookie, r.offset, length, ext);
  const hasPayload = ext ? (flags & F.NBD_CMD_FLAG_PAYLOAD_LEN) !== 0 : r.type === NBD_CMD.NBD_CMD_WRITE;
  const payload = hasPayload ? Buffer.alloc(Math.min(Number(length), MAX_FUZZ_PAYLOAD), 0x33) : Buffer.alloc(0);
  return mutate(Buffer.concat([header, payload]), r.m);
}

/**
 * Well-formed extended requests without a payload (so each is framed and must be
 * answered), their offsets and lengths drawn from the same arbitraries, edges included.
 */
const answerableArb = fc.record({
  type: fc.constantFrom(
    NBD_CMD.NBD_CMD_READ,
    NBD_CMD.NBD_CMD_FLUSH,
    NBD_CMD.NBD_CMD_TRIM,
    NBD_CMD.NBD_CMD_CACHE,
    NBD_CMD.NBD_CMD_WRITE_ZEROES,
    NBD_CMD.NBD_CMD_BLOCK_STATUS,
  ),
  flags: fc.constantFrom(0, F.NBD_CMD_FLAG_FUA, F.NBD_CMD_FLAG_DF, F.NBD_CMD_FLAG_REQ_ONE),
  offset: offsetArb,
  length: lengthArb,
});

const RUNS = { raw: 1000, options: 1500, afterRaw: 1000, requests: 2500, answered: 300 };

describe('fuzz', () => {
  test('random bytes from the first byte of the handshake never break the server', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 1024 }), async (bytes) => runCase(Buffer.from(bytes))),
      { numRuns: RUNS.raw },
    );
    await serverIsHealthy();
  });

  test('mutated option sequences never break the server', async () => {
    await fc.assert(
      fc.asyncProperty(clientFlags, fc.array(option, { maxLength: 12 }), async (flags, opts) =>
        runCase(Buffer.concat([be32(flags), ...opts])),
      ),
      { numRuns: RUNS.options },
    );
    await serverIsHealthy();
  });

  test('random bytes after a valid handshake never break the server, in every reply mode', async () => {
    await fc.assert(
      fc.asyncProperty(modeArb, fc.constantFrom('disk', 'ro', 'mem'), fc.uint8Array({ maxLength: 1024 }), async (mode, name, bytes) =>
        runCase(Buffer.concat([handshakeBytes(mode, name), Buffer.from(bytes)])),
      ),
      { numRuns: RUNS.afterRaw },
    );
    await serverIsHealthy();
  });

  test('mutated request sequences after a valid handshake never break the server, in every reply mode', async () => {
    await fc.assert(
      fc.asyncProperty(modeArb, fc.constantFrom('disk', 'ro', 'mem'), fc.array(requestArb, { minLength: 1, maxLength: 12 }), async (mode, name, reqs) =>
        runCase(Buffer.concat([handshakeBytes(mode, name), ...reqs.map((r) => encodeFuzzRequest(mode, r))])),
      ),
      { numRuns: RUNS.requests },
    );
    await serverIsHealthy();
    // The generated requests got past framing and validation to the device, in numbers.
    for (const op of ['read', 'write', 'trim', 'zero', 'extents', 'flush'] as const) {
      assert.ok((disk.calls.get(op) ?? 0) >= 50, `${op}: ${disk.calls.get(op) ?? 0} calls reached the device`);
    }
  });

  test('extended requests at any offset and length, 2^64 - 1 included, are each answered and the connection stays up', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(answerableArb, { minLength: 1, maxLength: 8 }), async (reqs) => {
        const c = await connect(srv.socket, 'extended', 'disk', true);
        try {
          reqs.forEach((r, i) => c.write(encodeRequest(r.flags, r.type, BigInt(i + 1), r.offset, r.length, true)));
          // A FLUSH after them: answered only if the connection outlived every one of them.
          const last = BigInt(reqs.length + 1);
          c.request(0, NBD_CMD.NBD_CMD_FLUSH, last, 0, 0, true);
          const answered = new Set<bigint>();
          for (let i = 0; i <= reqs.length; i++) answered.add((await readReply(c))[0]!.h.cookie);
          assert.equal(answered.size, reqs.length + 1);
        } finally {
          c.close();
        }
      }),
      { numRuns: RUNS.answered },
    );
    await serverIsHealthy();
  });

  test('memory stays bounded over the whole run, and nothing escaped', () => {
    assert.deepEqual(uncaught, []);
    const growth = process.memoryUsage().rss - rssBefore;
    assert.ok(growth < MAX_RSS_GROWTH, `resident set grew by ${Math.round(growth / 2 ** 20)} MiB`);
  });
});
