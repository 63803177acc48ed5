/**
 * NbdClient against the in-process NbdServer: every operation in the three reply modes
 * (extended, structured, simple) over unix sockets and TCP; out-of-order completion;
 * the in-flight count and byte budget (measured at the device) and their FIFO order;
 * request splitting; block status; server errors; local checks; AbortSignal; close();
 * multi-conn; LIST; TLS (PSK and X.509); and a model-based property.
 *
 * Every wait is bounded (bounded(), until()), every server and client closed in finally.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import fc from 'fast-check';
import { MemoryDevice } from '../../src/backends/memory.js';
import { FilterDevice, type BlockDevice, type BlockSize, type Capabilities, type Extent } from '../../src/device/index.js';
import { BlockError } from '../../src/errors/index.js';
import { Export } from '../../src/export/index.js';
import { ErrorFilter } from '../../src/filters/error.js';
import { NbdServer, type ServerLimits } from '../../src/nbd/index.js';
import { NbdClient, type NbdClientOptions } from '../../src/nbd/client.js';
import { NBD_FLAG, NBD_STATE } from '../../src/nbd/constants.js';
import { loadTls, type ServerTls } from '../../src/nbd/tls.js';
import { pki } from '../helpers/pki.js';
import { pattern } from './helpers.js';

/** Bound on any single wait in these tests. */
const WAIT_MS = 10_000;

function bounded<T>(p: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: not settled within ${ms} ms`)), ms)));
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

async function until(cond: () => boolean, what: string, ms = WAIT_MS): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

const isBlockError =
  (code: string, message?: RegExp) =>
  (e: unknown): boolean => {
    assert.ok(e instanceof BlockError, `expected a BlockError, got ${String(e)}`);
    assert.equal(e.code, code, `code of: ${e.message}`);
    if (message) assert.match(e.message, message);
    return true;
  };

type Op = 'read' | 'write' | 'flush' | 'trim' | 'zero' | 'extents' | 'cache';

/**
 * A filter that records what reaches the device: every call in order, the requests and
 * payload bytes inside it at once (and the most ever), and makes calls wait `delay`
 * milliseconds (by operation and offset), so replies can be made to come out of order.
 */
class Probe extends FilterDevice {
  delay: (op: Op, offset: number, length: number) => number = () => 0;
  readonly log: { op: Op; offset: number; length: number }[] = [];
  active = 0;
  maxActive = 0;
  activeBytes = 0;
  maxActiveBytes = 0;
  completed = 0;
  readonly #blockSize: BlockSize | undefined;
  readonly #caps: Partial<Capabilities>;

  constructor(next: BlockDevice, o: { blockSize?: BlockSize; caps?: Partial<Capabilities> } = {}) {
    super(next);
    this.#blockSize = o.blockSize;
    this.#caps = o.caps ?? {};
  }
  override get blockSize(): BlockSize {
    return this.#blockSize ?? super.blockSize;
  }
  override get capabilities(): Capabilities {
    return { ...super.capabilities, ...this.#caps };
  }
  calls(op?: Op): number {
    return op === undefined ? this.log.length : this.log.filter((l) => l.op === op).length;
  }
  resetStats(): void {
    this.log.length = 0;
    this.maxActive = 0;
    this.maxActiveBytes = 0;
    this.completed = 0;
  }

  async #run<T>(op: Op, offset: number, length: number, bytes: number, fn: () => Promise<T>): Promise<T> {
    this.log.push({ op, offset, length });
    this.active++;
    this.activeBytes += bytes;
    this.maxActive = Math.max(this.maxActive, this.active);
    this.maxActiveBytes = Math.max(this.maxActiveBytes, this.activeBytes);
    try {
      const ms = this.delay(op, offset, length);
      if (ms > 0) await sleep(ms);
      return await fn();
    } finally {
      this.active--;
      this.activeBytes -= bytes;
      this.completed++;
    }
  }
  override read(buf: Buffer, offset: number, flags: number): Promise<void> {
    return this.#run('read', offset, buf.length, buf.length, () => super.read(buf, offset, flags));
  }
  override write(data: Buffer, offset: number, flags: number): Promise<void> {
    return this.#run('write', offset, data.length, data.length, () => super.write(data, offset, flags));
  }
  override flush(flags: number): Promise<void> {
    return this.#run('flush', 0, 0, 0, () => super.flush(flags));
  }
  override trim(offset: number, length: number, flags: number): Promise<void> {
    return this.#run('trim', offset, length, 0, () => super.trim(offset, length, flags));
  }
  override zero(offset: number, length: number, flags: number): Promise<void> {
    return this.#run('zero', offset, length, 0, () => super.zero(offset, length, flags));
  }
  override extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    return this.#run('extents', offset, length, 0, () => super.extents(offset, length, flags));
  }
  override cache(offset: number, length: number, flags: number): Promise<void> {
    return this.#run('cache', offset, length, 0, () => super.cache(offset, length, flags));
  }
}

interface Served {
  readonly server: NbdServer;
  /** A URI for export `name` (unix or TCP as served); `query` is appended. */
  uri(name: string, query?: string, scheme?: { tls?: boolean; user?: string }): string;
  readonly host?: string;
  readonly port?: number;
  close(): Promise<void>;
}

/** Serves `exports` on a private unix socket, or (tcp) on 127.0.0.1 with a port the OS picks. */
async function serve(exports: Export[], o: { limits?: Partial<ServerLimits>; tls?: ServerTls; tcp?: boolean } = {}): Promise<Served> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-client-test-'));
  const server = new NbdServer({ exports, ...(o.limits ? { limits: o.limits } : {}) });
  const listen = o.tls ? { tls: o.tls } : {};
  const close = async () => {
    await server.close(2000);
    await Promise.all(exports.map((e) => e.device.close().catch(() => undefined)));
    fs.rmSync(dir, { recursive: true, force: true });
  };
  if (o.tcp) {
    const a = (await server.listen({ host: '127.0.0.1', port: 0 }, listen)) as { host: string; port: number };
    return {
      server,
      host: a.host,
      port: a.port,
      uri: (name, query, s) => `${s?.tls ? 'nbds' : 'nbd'}://${s?.user ? `${s.user}@` : ''}127.0.0.1:${a.port}/${encodeURIComponent(name)}${query ? `?${query}` : ''}`,
      close,
    };
  }
  const socket = path.join(dir, 'nbd.sock');
  await server.listen({ path: socket }, listen);
  return {
    server,
    uri: (name, query, s) =>
      `${s?.tls ? 'nbds+unix' : 'nbd+unix'}://${s?.user ? `${s.user}@` : ''}/${encodeURIComponent(name)}?socket=${encodeURIComponent(socket)}${query ? `&${query}` : ''}`,
    close,
  };
}

const MODES = [
  { name: 'extended', opts: {} as NbdClientOptions },
  { name: 'structured', opts: { extendedHeaders: false } as NbdClientOptions },
  { name: 'simple', opts: { extendedHeaders: false, structuredReplies: false } as NbdClientOptions },
] as const;

const KiB = 1024;
const PAGE = 64 * KiB;

/** The device's bytes, read below the Probe (so the read is not counted as a request). */
async function deviceBytes(dev: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await (dev instanceof Probe ? dev.next : dev).read(b, offset, 0);
  return b;
}

/** Runs `fn` with a client connected to a fresh 1 MiB memory export 'd' behind a Probe. */
async function withClient(
  fn: (c: NbdClient, dev: Probe, s: Served) => Promise<void>,
  o: { client?: NbdClientOptions; limits?: Partial<ServerLimits>; tcp?: boolean; size?: number; blockSize?: BlockSize; caps?: Partial<Capabilities> } = {},
): Promise<void> {
  const dev = new Probe(new MemoryDevice({ size: o.size ?? 1024 * KiB }), {
    ...(o.blockSize ? { blockSize: o.blockSize } : {}),
    ...(o.caps ? { caps: o.caps } : {}),
  });
  const s = await serve([new Export({ name: 'd', device: dev, description: 'test disk' })], {
    ...(o.limits ? { limits: o.limits } : {}),
    ...(o.tcp ? { tcp: true } : {}),
  });
  let c: NbdClient | null = null;
  try {
    c = await bounded(NbdClient.connect(s.uri('d'), o.client ?? {}), 'connect');
    await fn(c, dev, s);
  } finally {
    await bounded(c?.close() ?? Promise.resolve(), 'client close').catch(() => undefined);
    await s.close();
  }
}

// -----------------------------------------------------------------------------------
// Every operation, every mode, unix and TCP

for (const transport of ['unix', 'tcp'] as const) {
  for (const mode of MODES) {
    test(`${mode.name} mode over ${transport}: every operation round-trips and matches the device`, async () => {
      await withClient(
        async (c, dev) => {
          assert.equal(c.mode, mode.name);
          assert.equal(c.size, 1024 * KiB);
          assert.equal(c.exportName, 'd');
          assert.equal(c.connections, 1);
          assert.ok(c.canFlush && c.canTrim && c.canZero && c.canFua && c.canCache);
          assert.equal(c.readOnly, false);
          if (mode.name !== 'simple') {
            assert.equal(c.description, 'test disk');
            assert.deepEqual(c.contexts, ['base:allocation']);
            assert.ok(c.canBlockStatus());
          } else {
            assert.equal(c.canBlockStatus(), false);
            await assert.rejects(c.blockStatus(0, 4096), isBlockError('EOPNOTSUPP', /base:allocation/));
          }

          // pwrite (plain and FUA), pread back, and the device holds the same bytes.
          const a = pattern(100 * KiB, 3);
          await c.pwrite(a, 10_000);
          await c.pwrite(pattern(4 * KiB, 9), 300 * KiB, { fua: true });
          const back = Buffer.alloc(a.length);
          await c.pread(back, 10_000);
          assert.deepEqual(back, a);
          assert.deepEqual(await deviceBytes(dev, 10_000, a.length), a);
          assert.deepEqual(await deviceBytes(dev, 300 * KiB, 4 * KiB), pattern(4 * KiB, 9));
          // A read of unwritten space is zeroes (in structured modes it may come as OFFSET_HOLE).
          const hole = Buffer.alloc(200 * KiB, 0xee);
          await c.pread(hole, 512 * KiB);
          assert.ok(hole.every((x) => x === 0));
          await c.pread(Buffer.alloc(100), 0, { df: mode.name !== 'simple' });

          await c.flush();
          assert.equal(dev.calls('flush'), 1);

          // zero: a range inside written data reads back as zeroes, on the device too.
          await c.zero(20_000, 5_000);
          assert.ok((await deviceBytes(dev, 20_000, 5_000)).every((x) => x === 0));
          const z = Buffer.alloc(5_000, 1);
          await c.pread(z, 20_000);
          assert.ok(z.every((x) => x === 0));
          await c.zero(0, PAGE, { noHole: true, fua: true });
          assert.ok((await deviceBytes(dev, 0, PAGE)).every((x) => x === 0));

          // trim of whole pages frees them (the memory device then reads zeroes).
          await c.trim(PAGE, PAGE);
          assert.equal(dev.calls('trim'), 1);
          assert.ok((await deviceBytes(dev, PAGE, PAGE)).every((x) => x === 0));

          await c.cache(0, 128 * KiB);
          assert.equal(dev.calls('cache'), 1);

          if (mode.name !== 'simple') {
            const ext = await c.blockStatus(0, 1024 * KiB);
            assert.deepEqual(ext, await dev.extents(0, 1024 * KiB, 0));
          }
          // Whole device contents agree.
          const all = Buffer.alloc(c.size);
          await c.pread(all, 0);
          assert.deepEqual(all, await deviceBytes(dev, 0, c.size));
        },
        { client: mode.opts, tcp: transport === 'tcp' },
      );
    });
  }
}

// -----------------------------------------------------------------------------------
// Concurrency: out of order, maxInFlight, maxInFlightBytes, FIFO

for (const mode of MODES) {
  test(`${mode.name}: many reads in flight complete out of order and each lands in its own buffer`, async () => {
    await withClient(
      async (c, dev) => {
        const N = 16;
        for (let i = 0; i < N; i++) await c.pwrite(pattern(4 * KiB, i + 1), i * 8 * KiB);
        // Later offsets answer sooner: the last read sent is the first done.
        dev.delay = (op, offset) => (op === 'read' ? 10 + (N - offset / (8 * KiB)) * 8 : 0);
        const bufs = Array.from({ length: N }, () => Buffer.alloc(4 * KiB, 0xaa));
        const order: number[] = [];
        await bounded(
          Promise.all(bufs.map((b, i) => c.pread(b, i * 8 * KiB).then(() => order.push(i)))),
          'reads',
        );
        for (let i = 0; i < N; i++) assert.deepEqual(bufs[i], pattern(4 * KiB, i + 1), `buffer ${i}`);
        assert.equal(dev.maxActive, N, 'all reads were at the device at once');
        assert.notDeepEqual(order, [...order].sort((x, y) => x - y), 'completion order differs from issue order');
        assert.equal(order[0], N - 1, 'the last read sent completed first');
      },
      { client: mode.opts },
    );
  });
}

test('maxInFlight is never exceeded at the device, and waiting calls are served in order (FIFO)', async () => {
  await withClient(
    async (c, dev) => {
      dev.delay = () => 3;
      const N = 40;
      const done: number[] = [];
      await bounded(Promise.all(Array.from({ length: N }, (_, i) => c.pread(Buffer.alloc(512), i * 512).then(() => done.push(i)))), 'reads');
      assert.equal(dev.maxActive, 3);
      // The device saw them in the order they were called.
      assert.deepEqual(
        dev.log.map((l) => l.offset / 512),
        Array.from({ length: N }, (_, i) => i),
      );
    },
    { client: { maxInFlight: 3 } },
  );
});

test('maxInFlightBytes is never exceeded at the device; a large call waiting is not overtaken by small ones', async () => {
  await withClient(
    async (c, dev) => {
      dev.delay = () => 5;
      const budget = 16 * KiB;
      // Sizes so the budget is often nearly full: a small call behind a big one must still wait.
      const sizes = [8, 8, 12, 1, 1, 16, 2, 4, 4, 8, 1, 12, 3, 3, 16, 1].map((k) => k * KiB);
      const calls: Promise<unknown>[] = [];
      let at = 0;
      const offsets: number[] = [];
      for (const [i, n] of sizes.entries()) {
        offsets.push(at);
        calls.push(i % 2 === 0 ? c.pread(Buffer.alloc(n), at) : c.pwrite(pattern(n, i), at));
        at += n;
      }
      await bounded(Promise.all(calls), 'calls');
      assert.ok(dev.maxActiveBytes <= budget, `at most ${budget} bytes at the device, saw ${dev.maxActiveBytes}`);
      assert.ok(dev.maxActive >= 2, 'requests did overlap');
      assert.deepEqual(
        dev.log.map((l) => l.offset),
        offsets,
        'FIFO: the device saw the calls in call order',
      );
    },
    { client: { maxInFlightBytes: 16 * KiB } },
  );
});

test('an aborted in-flight request keeps its slot until the server answers it (maxInFlight holds at the device)', async () => {
  await withClient(
    async (c, dev) => {
      dev.delay = (op, offset) => (op === 'read' && offset === 0 ? 300 : 0);
      const ac = new AbortController();
      const slow = c.pread(Buffer.alloc(4096), 0, { signal: ac.signal });
      await until(() => dev.active === 1, 'the slow read to reach the device');
      ac.abort();
      await assert.rejects(bounded(slow, 'aborted read'), isBlockError('ECANCELED'));
      // The next call waits for the aborted one's reply: never two at the device.
      await bounded(c.pread(Buffer.alloc(4096), 8192), 'next read');
      assert.equal(dev.maxActive, 1);
      assert.equal(dev.completed, 2);
    },
    { client: { maxInFlight: 1 } },
  );
});

// -----------------------------------------------------------------------------------
// Splitting

for (const mode of MODES) {
  test(`${mode.name}: pread and pwrite larger than the server's maximum block size are split and correct`, async () => {
    const max = 64 * KiB;
    await withClient(
      async (c, dev) => {
        assert.equal(c.blockSize?.maximum, max);
        const data = pattern(300 * KiB + 123, 5);
        await c.pwrite(data, 1000);
        const writes = dev.log.filter((l) => l.op === 'write');
        assert.equal(writes.length, Math.ceil(data.length / max));
        assert.ok(writes.every((w) => w.length <= max));
        assert.deepEqual(await deviceBytes(dev, 1000, data.length), data);
        const back = Buffer.alloc(data.length);
        await c.pread(back, 1000);
        assert.deepEqual(back, data);
        const reads = dev.log.filter((l) => l.op === 'read');
        assert.equal(reads.length, Math.ceil(data.length / max));
        assert.ok(reads.every((r) => r.length <= max));
      },
      { client: mode.opts, blockSize: { minimum: 1, preferred: 4096, maximum: max } },
    );
  });
}

test('a split request stays within maxInFlightBytes', async () => {
  await withClient(
    async (c, dev) => {
      dev.delay = () => 2;
      const data = pattern(256 * KiB, 2);
      await c.pwrite(data, 0);
      const back = Buffer.alloc(data.length);
      await c.pread(back, 0);
      assert.deepEqual(back, data);
      assert.ok(dev.maxActiveBytes <= 32 * KiB, `saw ${dev.maxActiveBytes}`);
      assert.ok(dev.log.every((l) => l.length <= 32 * KiB));
    },
    { client: { maxInFlightBytes: 32 * KiB } },
  );
});

// -----------------------------------------------------------------------------------
// Block status

for (const mode of MODES.slice(0, 2)) {
  test(`${mode.name}: blockStatus matches the memory device's allocation, holes after trim and zero, and REQ_ONE`, async () => {
    await withClient(
      async (c, dev) => {
        const D = 0;
        const H = NBD_STATE.NBD_STATE_HOLE | NBD_STATE.NBD_STATE_ZERO;
        await c.pwrite(pattern(PAGE, 1), 0);
        await c.pwrite(pattern(2 * PAGE, 2), 4 * PAGE);
        const size = c.size;
        assert.deepEqual(await c.blockStatus(0, size), [
          { offset: 0, length: PAGE, flags: D },
          { offset: PAGE, length: 3 * PAGE, flags: H },
          { offset: 4 * PAGE, length: 2 * PAGE, flags: D },
          { offset: 6 * PAGE, length: size - 6 * PAGE, flags: H },
        ]);
        await c.trim(4 * PAGE, PAGE);
        await c.zero(0, PAGE);
        const after = await c.blockStatus(0, size);
        assert.deepEqual(after, [
          { offset: 0, length: 5 * PAGE, flags: H },
          { offset: 5 * PAGE, length: PAGE, flags: D },
          { offset: 6 * PAGE, length: size - 6 * PAGE, flags: H },
        ]);
        assert.deepEqual(after, await dev.extents(0, size, 0));
        // From an offset, clipped to the length asked.
        assert.deepEqual(await c.blockStatus(5 * PAGE + 100, 1000), [{ offset: 5 * PAGE + 100, length: 1000, flags: D }]);
        // REQ_ONE: one extent only.
        assert.deepEqual(await c.blockStatus(0, size, { reqOne: true }), [{ offset: 0, length: 5 * PAGE, flags: H }]);
        assert.deepEqual(await c.blockStatus(5 * PAGE, size - 5 * PAGE, { reqOne: true }), [{ offset: 5 * PAGE, length: PAGE, flags: D }]);
        assert.deepEqual(await c.blockStatus(0, 0), []);
        await assert.rejects(c.blockStatus(0, 10, { context: 'qemu:dirty-bitmap:x' }), isBlockError('EOPNOTSUPP'));
      },
      { client: mode.opts },
    );
  });
}

// -----------------------------------------------------------------------------------
// Errors from the server, and local checks

/** A device that says it can write but whose backend is read-only, so the server's writes get EPERM from below. */
class ClaimsWritable extends FilterDevice {
  override get capabilities(): Capabilities {
    return { ...super.capabilities, write: true, trim: true, zero: true, fua: true };
  }
}

for (const mode of MODES) {
  test(`${mode.name}: server error replies become BlockErrors with the server's errno${mode.name === 'simple' ? '' : ' and message'}`, async () => {
    const mem = new MemoryDevice({ size: 1024 * KiB });
    const nospc = new ErrorFilter(mem, { error: 'ENOSPC', ops: ['write'], offset: 512 * KiB, length: PAGE });
    const eio = new ErrorFilter(nospc, { error: 'EIO', ops: ['read', 'flush'], offset: 256 * KiB, length: PAGE });
    const ro = new ClaimsWritable(new MemoryDevice({ size: 64 * KiB, readonly: true }));
    const s = await serve([new Export({ name: 'e', device: eio }), new Export({ name: 'ro', device: ro })]);
    const clients: NbdClient[] = [];
    try {
      const c = await bounded(NbdClient.connect(s.uri('e'), mode.opts), 'connect');
      clients.push(c);
      const msg = (re: RegExp) => (mode.name === 'simple' ? undefined : re);
      await assert.rejects(c.pwrite(Buffer.alloc(4096, 1), 512 * KiB + 4096), isBlockError('ENOSPC', msg(/injected ENOSPC/)));
      await assert.rejects(c.pread(Buffer.alloc(4096), 256 * KiB), isBlockError('EIO', msg(/injected EIO/)));
      await assert.rejects(c.flush(), isBlockError('EIO', msg(/injected EIO/)));
      // A failed request leaves the connection usable.
      await c.pwrite(Buffer.alloc(4096, 2), 0);
      const b = Buffer.alloc(4096);
      await c.pread(b, 0);
      assert.ok(b.every((x) => x === 2));
      // Part of a split read failing fails the whole call.
      await assert.rejects(c.pread(Buffer.alloc(512 * KiB), 0), isBlockError('EIO'));

      const r = await bounded(NbdClient.connect(s.uri('ro'), mode.opts), 'connect ro');
      clients.push(r);
      assert.equal(r.readOnly, false);
      await assert.rejects(r.pwrite(Buffer.alloc(512), 0), isBlockError('EPERM', msg(/read-only/)));
      await assert.rejects(r.zero(0, 512), isBlockError('EPERM'));
    } finally {
      for (const c of clients) await bounded(c.close(), 'close').catch(() => undefined);
      await s.close();
    }
  });
}

test('a read-only export: pwrite, trim and zero fail EPERM locally, and nothing reaches the device', async () => {
  const dev = new Probe(new MemoryDevice({ size: 64 * KiB }));
  const s = await serve([new Export({ name: 'ro', device: dev, readOnly: true })]);
  let c: NbdClient | null = null;
  try {
    c = await bounded(NbdClient.connect(s.uri('ro')), 'connect');
    assert.equal(c.readOnly, true);
    assert.ok((c.flags & NBD_FLAG.NBD_FLAG_READ_ONLY) !== 0);
    await assert.rejects(c.pwrite(Buffer.alloc(512), 0), isBlockError('EPERM', /read-only/));
    await assert.rejects(c.trim(0, 512), isBlockError('EPERM', /read-only/));
    await assert.rejects(c.zero(0, 512), isBlockError('EPERM', /read-only/));
    await c.pread(Buffer.alloc(512), 0);
    assert.deepEqual(
      dev.log.map((l) => l.op),
      ['read'],
    );
  } finally {
    await bounded(c?.close() ?? Promise.resolve(), 'close').catch(() => undefined);
    await s.close();
  }
});

test('out-of-range offsets and lengths fail EINVAL locally, without a request', async () => {
  await withClient(async (c, dev) => {
    const size = c.size;
    await assert.rejects(c.pread(Buffer.alloc(2), size - 1), isBlockError('EINVAL', /past the end/));
    await assert.rejects(c.pwrite(Buffer.alloc(1), size), isBlockError('EINVAL', /past the end/));
    await assert.rejects(c.pread(Buffer.alloc(1), -1), isBlockError('EINVAL'));
    await assert.rejects(c.pread(Buffer.alloc(1), 1.5), isBlockError('EINVAL'));
    await assert.rejects(c.trim(0, size + 1), isBlockError('EINVAL'));
    await assert.rejects(c.zero(size, 1), isBlockError('EINVAL'));
    await assert.rejects(c.cache(Number.MAX_SAFE_INTEGER, 1), isBlockError('EINVAL'));
    await assert.rejects(c.blockStatus(size, 1), isBlockError('EINVAL'));
    await assert.rejects(c.trim(0, -5), isBlockError('EINVAL'));
    assert.equal(dev.calls(), 0);
    // The last byte is fine.
    await c.pread(Buffer.alloc(1), size - 1);
    assert.equal(dev.calls(), 1);
  });
});

test('connect options are validated (EINVAL)', async () => {
  for (const o of [{ connections: 0 }, { connections: 65 }, { maxInFlight: 0 }, { maxInFlightBytes: 100 }, { handshakeTimeoutMs: 0 }, { maxInFlight: 1.5 }]) {
    await assert.rejects(NbdClient.connect('nbd+unix:///?socket=/nonexistent', o), isBlockError('EINVAL', /NbdClient option/));
  }
});

test('connecting to nothing fails cleanly', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-client-test-'));
  try {
    await assert.rejects(bounded(NbdClient.connect(`nbd+unix:///?socket=${dir}/none.sock`), 'connect'), (e: unknown) => {
      assert.ok(e instanceof BlockError);
      assert.match(e.message, /ENOENT/);
      return true;
    });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// -----------------------------------------------------------------------------------
// AbortSignal

test('AbortSignal: a queued call aborted before it is sent is never sent, and the queue moves on', async () => {
  await withClient(
    async (c, dev) => {
      dev.delay = (op, offset) => (op === 'read' && offset === 0 ? 150 : 0);
      const first = c.pread(Buffer.alloc(4096), 0);
      await until(() => dev.active === 1, 'the first read at the device');
      const ac = new AbortController();
      const queued = c.pwrite(Buffer.alloc(4096, 7), 8192, { signal: ac.signal });
      const after = c.pread(Buffer.alloc(4096), 16384);
      await sleep(10);
      ac.abort(new Error('changed my mind'));
      await assert.rejects(bounded(queued, 'queued'), isBlockError('ECANCELED', /waiting/));
      await bounded(Promise.all([first, after]), 'others');
      assert.equal(dev.calls('write'), 0, 'the aborted write was never sent');
      assert.deepEqual(
        dev.log.map((l) => l.offset),
        [0, 16384],
      );
      assert.ok((await deviceBytes(dev, 8192, 4096)).every((x) => x === 0));
      // An already-aborted signal: refused at once.
      await assert.rejects(c.pread(Buffer.alloc(1), 0, { signal: AbortSignal.abort() }), (e: unknown) => e instanceof Error);
      assert.equal(dev.calls(), 2);
    },
    { client: { maxInFlight: 1 } },
  );
});

test('AbortSignal: an aborted large waiter at the head of the queue lets the ones behind it go', async () => {
  await withClient(
    async (c, dev) => {
      dev.delay = (op, offset) => (op === 'read' && offset === 0 ? 400 : 0);
      const first = c.pread(Buffer.alloc(8 * KiB), 0);
      await until(() => dev.active === 1, 'the first read at the device');
      const ac = new AbortController();
      const big = c.pread(Buffer.alloc(16 * KiB), 64 * KiB, { signal: ac.signal });
      const small = c.pread(Buffer.alloc(4 * KiB), 128 * KiB);
      await sleep(10);
      ac.abort();
      await assert.rejects(bounded(big, 'big'), isBlockError('ECANCELED'));
      // The small one fits beside the slow read: it need not wait for it.
      await bounded(small, 'small', 300);
      assert.equal(dev.active, 1, 'the slow read is still at the device');
      await bounded(first, 'first');
    },
    { client: { maxInFlightBytes: 16 * KiB } },
  );
});

for (const mode of MODES) {
  test(`${mode.name}: an in-flight pread aborted rejects ECANCELED and its buffer is not written after the abort`, async () => {
    await withClient(
      async (c, dev) => {
        await c.pwrite(pattern(64 * KiB, 4), 0);
        dev.delay = (op, offset) => (op === 'read' && offset === 0 ? 200 : 0);
        const buf = Buffer.alloc(64 * KiB, 0xaa);
        const ac = new AbortController();
        const p = c.pread(buf, 0, { signal: ac.signal });
        await until(() => dev.active === 1, 'the read at the device');
        ac.abort();
        await assert.rejects(bounded(p, 'aborted read'), isBlockError('ECANCELED', /READ aborted/));
        const before = dev.completed;
        await until(() => dev.completed > before, 'the device to finish the read');
        // A request sent after the device finished: its reply follows the abandoned one's.
        const other = Buffer.alloc(4096);
        await c.pread(other, 0);
        assert.deepEqual(other, pattern(64 * KiB, 4).subarray(0, 4096));
        assert.ok(
          buf.every((x) => x === 0xaa),
          'the abandoned buffer was left alone',
        );
      },
      { client: mode.opts },
    );
  });
}

// -----------------------------------------------------------------------------------
// close()

test('close() waits for requests in flight, then disconnects (the server session ends); later calls fail ENOTCONN', async () => {
  await withClient(async (c, dev, s) => {
    await c.pwrite(pattern(4096, 8), 0);
    dev.delay = (op) => (op === 'read' ? 100 : 0);
    assert.equal(s.server.sessionCount, 1);
    const buf = Buffer.alloc(4096);
    const reading = c.pread(buf, 0);
    await until(() => dev.active === 1, 'the read at the device');
    const closing = c.close();
    assert.equal(c.close(), closing, 'one close');
    await assert.rejects(c.pread(Buffer.alloc(1), 0), isBlockError('ENOTCONN'));
    await bounded(reading, 'read in flight');
    assert.deepEqual(buf, pattern(4096, 8));
    await bounded(closing, 'close');
    await until(() => s.server.sessionCount === 0, 'the server session to end');
    await assert.rejects(c.pread(Buffer.alloc(1), 0), isBlockError('ENOTCONN'));
    await assert.rejects(c.flush(), isBlockError('ENOTCONN'));
    await assert.rejects(c.blockStatus(0, 1), isBlockError('ENOTCONN'));
  });
});

test('the server going away fails requests in flight with ECONNRESET and later ones too', async () => {
  await withClient(async (c, dev, s) => {
    dev.delay = () => 2000;
    const p = assert.rejects(bounded(c.pread(Buffer.alloc(4096), 0), 'read'), isBlockError('ECONNRESET', /closed the connection/));
    await until(() => dev.active === 1, 'the read at the device');
    await s.server.close(10);
    await p;
    await assert.rejects(c.pread(Buffer.alloc(1), 0), isBlockError('ECONNRESET'));
  });
});

// -----------------------------------------------------------------------------------
// Multi-conn

test('connections: 4 against a CAN_MULTI_CONN export opens 4 sessions and spreads requests', async () => {
  // One request at a time per server session: more than one at the device means more than one connection.
  await withClient(
    async (c, dev, s) => {
      assert.ok(c.canMultiConn);
      assert.equal(c.connections, 4);
      assert.equal(s.server.sessionCount, 4);
      dev.delay = () => 30;
      const bufs = Array.from({ length: 8 }, () => Buffer.alloc(4096));
      await bounded(Promise.all(bufs.map((b, i) => c.pread(b, i * 4096))), 'reads');
      assert.equal(dev.maxActive, 4, 'four requests at the device at once: one per connection');
      // A write on one connection, a flush, and a read on any other see it.
      await c.pwrite(pattern(8192, 6), 0);
      await c.flush();
      const back = Array.from({ length: 4 }, () => Buffer.alloc(8192));
      await Promise.all(back.map((b) => c.pread(b, 0)));
      for (const b of back) assert.deepEqual(b, pattern(8192, 6));
      await c.close();
      await until(() => s.server.sessionCount === 0, 'every session to end');
    },
    { client: { connections: 4 }, limits: { maxInFlightRequests: 1 } },
  );
});

test('connections: 4 against an export without CAN_MULTI_CONN stays at 1', async () => {
  await withClient(
    async (c, _dev, s) => {
      assert.equal(c.canMultiConn, false);
      assert.equal(c.connections, 1);
      assert.equal(s.server.sessionCount, 1);
    },
    { client: { connections: 4 }, caps: { multiConn: false } },
  );
});

test('when some of the extra connections fail, connect fails and closes the ones that opened', async () => {
  const dev = new MemoryDevice({ size: 64 * KiB });
  // Two connections allowed: the first and one extra open, the other two are refused.
  const s = await serve([new Export({ name: 'd', device: dev })], { limits: { maxConnections: 2 } });
  try {
    await assert.rejects(bounded(NbdClient.connect(s.uri('d'), { connections: 4 }), 'connect'), isBlockError('ECONNRESET'));
    await until(() => s.server.sessionCount === 0, 'no session left open by the failed connect');
  } finally {
    await s.close();
  }
});

// -----------------------------------------------------------------------------------
// LIST

test('NbdClient.list returns names, descriptions and sizes', async () => {
  const s = await serve([
    new Export({ name: 'alpha', device: new MemoryDevice({ size: 1024 * KiB }), description: 'the first' }),
    new Export({ name: 'beta', device: new MemoryDevice({ size: 4096 }), description: 'the second', readOnly: true }),
    new Export({ name: 'gamma x', device: new MemoryDevice({ size: 512 }) }),
  ]);
  try {
    const list = await bounded(NbdClient.list(s.uri('')), 'list');
    assert.deepEqual(
      list.map(({ name, description, size }) => ({ name, description, size })),
      [
        { name: 'alpha', description: 'the first', size: 1024 * KiB },
        { name: 'beta', description: 'the second', size: 4096 },
        // No description given: the server describes the device.
        { name: 'gamma x', description: new MemoryDevice({ size: 512 }).description, size: 512 },
      ],
    );
    assert.ok(((list[1]!.flags ?? 0) & NBD_FLAG.NBD_FLAG_READ_ONLY) !== 0);
    await until(() => s.server.sessionCount === 0, 'the LIST session to end');
  } finally {
    await s.close();
  }
});

// -----------------------------------------------------------------------------------
// TLS

test('TLS with PSK (nbds+unix, tls-psk-file): data round-trips, client.tls shows protocol and suite', async () => {
  const p = await pki();
  const dev = new MemoryDevice({ size: 256 * KiB });
  const s = await serve([new Export({ name: 'd', device: dev })], { tls: loadTls({ mode: 'require', psk: p.psk.server }) });
  let c: NbdClient | null = null;
  try {
    c = await bounded(NbdClient.connect(s.uri('d', `tls-psk-file=${encodeURIComponent(p.psk.alice)}`, { tls: true, user: 'alice' })), 'connect');
    assert.match(c.tls?.protocol ?? '', /^TLSv1\.[23]$/);
    assert.match(c.tls?.cipher ?? '', /\w/);
    assert.equal(c.mode, 'extended');
    const data = pattern(100 * KiB, 7);
    await c.pwrite(data, 1000);
    const back = Buffer.alloc(data.length);
    await c.pread(back, 1000);
    assert.deepEqual(back, data);
    assert.deepEqual(await deviceBytes(dev, 1000, data.length), data);
  } finally {
    await bounded(c?.close() ?? Promise.resolve(), 'close').catch(() => undefined);
    await s.close();
  }
});

test('TLS with X.509 (nbds://127.0.0.1 and localhost, tls-certificates): verified server certificate, data round-trips', async () => {
  const p = await pki();
  const dev = new MemoryDevice({ size: 256 * KiB });
  const s = await serve([new Export({ name: 'd', device: dev })], { tls: loadTls({ mode: 'require', certificates: p.serverDir }), tcp: true });
  const clients: NbdClient[] = [];
  try {
    const q = `tls-certificates=${encodeURIComponent(p.clients.caOnly)}`;
    for (const uri of [s.uri('d', q, { tls: true }), `nbds://localhost:${s.port}/d?${q}`]) {
      const c = await bounded(NbdClient.connect(uri), `connect ${uri}`);
      clients.push(c);
      assert.match(c.tls?.protocol ?? '', /^TLSv1\.[23]$/);
      assert.match(c.tls?.cipher ?? '', /\w/);
      await c.pwrite(pattern(8192, 3), 0);
      const back = Buffer.alloc(8192);
      await c.pread(back, 0);
      assert.deepEqual(back, pattern(8192, 3));
    }
    // Without the CA the server's certificate is not trusted.
    await assert.rejects(
      bounded(NbdClient.connect(s.uri('d', `tls-certificates=${encodeURIComponent(p.root)}`, { tls: true })), 'connect untrusted'),
      isBlockError('ECONNRESET', /TLS handshake failed/),
    );
    // A name the certificate does not carry.
    await assert.rejects(
      bounded(NbdClient.connect(s.uri('d', `${q}&tls-hostname=elsewhere.example`, { tls: true })), 'connect wrong name'),
      isBlockError('ECONNRESET', /TLS handshake failed/),
    );
  } finally {
    for (const c of clients) await bounded(c.close(), 'close').catch(() => undefined);
    await s.close();
  }
});

test('TLS: connecting in clear to a TLS-required server fails with an error naming TLS; a wrong PSK key fails cleanly', async () => {
  const p = await pki();
  const s = await serve([new Export({ name: 'd', device: new MemoryDevice({ size: 64 * KiB }) })], { tls: loadTls({ mode: 'require', psk: p.psk.server }) });
  try {
    await assert.rejects(bounded(NbdClient.connect(s.uri('d')), 'clear connect'), (e: unknown) => {
      assert.ok(e instanceof BlockError);
      assert.match(e.message, /TLS/);
      assert.match(e.message, /nbds:\/\//);
      return true;
    });
    await assert.rejects(
      bounded(NbdClient.connect(s.uri('d', `tls-psk-file=${encodeURIComponent(p.psk.wrongAlice)}`, { tls: true, user: 'alice' })), 'wrong key'),
      (e: unknown) => {
        assert.ok(e instanceof BlockError, String(e));
        assert.match(e.code, /ECONNRESET|EPROTO/);
        assert.match(e.message, /TLS|closed/);
        return true;
      },
    );
    // An identity the file does not have: refused before connecting.
    await assert.rejects(
      bounded(NbdClient.connect(s.uri('d', `tls-psk-file=${encodeURIComponent(p.psk.alice)}`, { tls: true, user: 'nobody' })), 'no identity'),
      isBlockError('EINVAL', /no key for 'nobody'/),
    );
    await until(() => s.server.sessionCount === 0, 'no session left behind');
  } finally {
    await s.close();
  }
});

// -----------------------------------------------------------------------------------
// Model-based property

test('property: random pwrite/pread/zero/trim sequences leave the export equal to a model buffer', async () => {
  const SIZE = 256 * KiB;
  const dev = new Probe(new MemoryDevice({ size: SIZE }), { blockSize: { minimum: 1, preferred: 4096, maximum: 16 * KiB } });
  const s = await serve([new Export({ name: 'd', device: dev })]);
  const clients = await Promise.all(MODES.map((m) => bounded(NbdClient.connect(s.uri('d'), { ...m.opts, maxInFlightBytes: 32 * KiB }), 'connect')));
  try {
    const range = fc.integer({ min: 0, max: SIZE - 1 }).chain((off) => fc.record({ off: fc.constant(off), len: fc.integer({ min: 0, max: Math.min(40 * KiB, SIZE - off) }) }));
    const op = fc.oneof(
      fc.record({ kind: fc.constant('pwrite' as const), r: range, seed: fc.integer({ min: 1, max: 200 }) }),
      fc.record({ kind: fc.constant('pread' as const), r: range }),
      fc.record({ kind: fc.constant('zero' as const), r: range }),
      fc.record({ kind: fc.constant('trim' as const), r: range }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 25 }), fc.integer({ min: 0, max: 2 }), async (ops, which) => {
        const c = clients[which]!;
        const model = Buffer.alloc(SIZE);
        await c.zero(0, SIZE);
        for (const o of ops) {
          const { off, len } = o.r;
          switch (o.kind) {
            case 'pwrite': {
              const d = pattern(len, o.seed);
              await c.pwrite(d, off);
              d.copy(model, off);
              break;
            }
            case 'pread': {
              const b = Buffer.alloc(len, 0xcc);
              await c.pread(b, off);
              assert.deepEqual(b, model.subarray(off, off + len));
              break;
            }
            case 'zero':
              await c.zero(off, len);
              model.fill(0, off, off + len);
              break;
            case 'trim': {
              // Trim is a hint: afterwards the range reads as zeroes or as it was; the model takes what is read.
              await c.trim(off, len);
              const b = Buffer.alloc(len);
              await c.pread(b, off);
              for (let i = 0; i < len; i++) assert.ok(b[i] === 0 || b[i] === model[off + i], `trimmed byte ${off + i}`);
              b.copy(model, off);
              break;
            }
          }
        }
        const all = Buffer.alloc(SIZE);
        await c.pread(all, 0);
        assert.ok(all.equals(model), 'client view equals the model');
        assert.ok((await deviceBytes(dev, 0, SIZE)).equals(model), 'device equals the model');
      }),
      { numRuns: 40 },
    );
  } finally {
    for (const c of clients) await bounded(c.close(), 'close').catch(() => undefined);
    await s.close();
  }
});

test('onLost is called once, with no request in flight, when the server goes away; error says why; close() calls nothing', async () => {
  const lost: BlockError[] = [];
  await withClient(
    async (c, _dev, s) => {
      assert.equal(c.error, null);
      await s.server.close(0);
      await until(() => lost.length === 1, 'onLost');
      assert.equal(lost[0]!.code, 'ECONNRESET');
      assert.equal(c.error, lost[0]);
    },
    { client: { onLost: (e) => lost.push(e) } },
  );
  assert.equal(lost.length, 1, 'called once');
  const quiet: BlockError[] = [];
  await withClient(async (c) => c.close(), { client: { onLost: (e) => quiet.push(e) } });
  assert.deepEqual(quiet, [], 'a deliberate close is not a loss');
});
