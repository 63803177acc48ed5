/**
 * Transmission-phase edge cases with compact (28-byte) headers, in simple and in
 * structured reply mode: framing errors, request validation and its NBD error values,
 * out-of-order replies, pipelining, backpressure, DISC with requests in flight, sparse
 * structured reads. Devices the test controls (GatedDevice) make concurrency
 * deterministic: a request finishes when the test says so.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { MemoryDevice } from '../../src/backends/memory.js';
import { FilterDevice } from '../../src/device/index.js';
import { BlockError, NBD_ERROR } from '../../src/errors/index.js';
import { Export } from '../../src/export/index.js';
import {
  BASE_ALLOCATION,
  NBD_CMD,
  NBD_CMD_FLAG,
  NBD_OPT,
  NBD_REPLY_FLAG,
  NBD_REPLY_TYPE,
  NBD_SIZE,
  NBD_STATE,
} from '../../src/nbd/constants.js';
import { encodeInfoRequest, encodeMetaContextRequest, encodeRequest, readU64 } from '../../src/nbd/codec.js';
import { RawClient } from '../helpers/raw-client.js';
import {
  GatedDevice,
  assembleRead,
  connect,
  decodeErrorPayload,
  expectError,
  expectOk,
  pattern,
  readData,
  readReply,
  serveExports,
  until,
  type DirectServer,
  type Mode,
} from './helpers.js';

const C = NBD_CMD;
const F = NBD_CMD_FLAG;
const E = NBD_ERROR;
const T = NBD_REPLY_TYPE;
const DONE = NBD_REPLY_FLAG.NBD_REPLY_FLAG_DONE;

const DISK_SIZE = 8 * 2 ** 20;
/** The first 4 MiB of 'disk' hold pattern(DATA_SIZE); the rest is a hole except where sparse tests write. */
const DATA_SIZE = 4 * 2 ** 20;
const MAX_PAYLOAD = 2 ** 20;
const MAX_DISCARD = 4 * 2 ** 20;
/** Reads at or past this offset of 'failing' fail with EIO at FAIL_AT + 100. */
const FAIL_AT = 65536;

/** A device whose reads from FAIL_AT on fail with EIO, naming the failed offset. */
class FailingDevice extends FilterDevice {
  override async read(buf: Buffer, offset: number, flags: number): Promise<void> {
    if (offset + buf.length > FAIL_AT) throw new BlockError('EIO', 'simulated media error', { offset: FAIL_AT + 100 });
    return super.read(buf, offset, flags);
  }
}

let srv: DirectServer;
let gated: GatedDevice;
const data = pattern(DATA_SIZE, 5);

before(async () => {
  const disk = new MemoryDevice({ size: DISK_SIZE });
  await disk.write(data, 0, 0);
  gated = new GatedDevice(new MemoryDevice({ size: 2 ** 20 }));
  await gated.write(pattern(2 ** 20, 9), 0, 0);
  srv = await serveExports(
    [
      new Export({ name: 'disk', device: disk }),
      new Export({ name: 'ro', device: new MemoryDevice({ size: 2 ** 20 }), readOnly: true }),
      new Export({ name: 'gated', device: gated }),
      new Export({ name: 'failing', device: new FailingDevice(new MemoryDevice({ size: 2 ** 20 })) }),
    ],
    { maxPayload: MAX_PAYLOAD, maxDiscard: MAX_DISCARD },
  );
});
after(() => srv.close());

/** A FLUSH round trip: the connection is still in sync. */
async function stillInSync(c: RawClient, cookie = 999n): Promise<void> {
  c.request(0, C.NBD_CMD_FLUSH, cookie, 0, 0);
  await expectOk(c, cookie);
}

for (const mode of ['simple', 'structured'] as const satisfies readonly Mode[]) {
  describe(`${mode} replies`, () => {
    const open = (name = 'disk', meta = false) => connect(srv.socket, mode, name, meta);

    test('garbage after the handshake (bad request magic) closes the connection; others are still served', async () => {
      const bystander = await open();
      const c = await open();
      c.write(Buffer.alloc(NBD_SIZE.COMPACT_REQUEST, 0xff));
      assert.equal(await c.closedByServer(), true);
      await stillInSync(bystander);
      const fresh = await open();
      await stillInSync(fresh);
      bystander.close();
      fresh.close();
    });

    test('a truncated request header followed by close leaves the server serving', async () => {
      const c = await open();
      c.write(encodeRequest(0, C.NBD_CMD_READ, 1n, 0, 512).subarray(0, 13));
      c.close();
      const writer = await open();
      // A WRITE header without its payload, then close: the server is waiting for data.
      writer.write(encodeRequest(0, C.NBD_CMD_WRITE, 2n, 0, 4096));
      writer.write(Buffer.alloc(100));
      writer.close();
      await until(() => srv.server.sessionCount === 0, 'the closed sessions to go away');
      const fresh = await open();
      await stillInSync(fresh);
      fresh.close();
    });

    test('requests past the end: READ and TRIM get EINVAL, WRITE and WRITE_ZEROES get ENOSPC', async () => {
      const c = await open();
      c.request(0, C.NBD_CMD_READ, 1n, DISK_SIZE - 512, 1024);
      await expectError(c, 1n, E.NBD_EINVAL);
      c.request(0, C.NBD_CMD_TRIM, 2n, DISK_SIZE, 1);
      await expectError(c, 2n, E.NBD_EINVAL);
      // The payload of a refused WRITE is still consumed: the stream stays in sync.
      c.request(0, C.NBD_CMD_WRITE, 3n, DISK_SIZE - 100, 4096, false, Buffer.alloc(4096, 0x25));
      await expectError(c, 3n, E.NBD_ENOSPC);
      c.request(0, C.NBD_CMD_WRITE_ZEROES, 4n, DISK_SIZE - 100, 101);
      await expectError(c, 4n, E.NBD_ENOSPC);
      c.request(0, C.NBD_CMD_READ, 5n, 2 ** 52, 1);
      await expectError(c, 5n, E.NBD_EINVAL);
      await stillInSync(c);
      c.close();
    });

    test('a READ longer than maxPayload gets EINVAL', async () => {
      const c = await open();
      c.request(0, C.NBD_CMD_READ, 1n, 0, MAX_PAYLOAD + 1);
      await expectError(c, 1n, E.NBD_EINVAL);
      await stillInSync(c);
      c.close();
    });

    test('a WRITE longer than maxPayload: payload discarded, EINVAL, nothing written, connection usable', async () => {
      const c = await open();
      const len = MAX_PAYLOAD + 4096;
      // A payload made of valid request headers: if the server parsed them, replies would show.
      const payload = Buffer.alloc(len);
      for (let at = 0; at + 28 <= len; at += 28) encodeRequest(0, C.NBD_CMD_FLUSH, 0xbadn, 0, 0).copy(payload, at);
      c.request(0, C.NBD_CMD_WRITE, 1n, 0, len, false, payload);
      await expectError(c, 1n, E.NBD_EINVAL);
      c.request(0, C.NBD_CMD_READ, 2n, 0, 4096);
      assert.deepEqual(await readData(c, 2n, 0, 4096, mode), data.subarray(0, 4096), 'the first 4 KiB were not overwritten');
      c.close();
    });

    test('a WRITE beyond maxDiscard closes the connection', async () => {
      const c = await open();
      c.request(0, C.NBD_CMD_WRITE, 1n, 0, MAX_DISCARD + 1);
      assert.equal(await c.closedByServer(), true);
    });

    test('an unknown command gets EINVAL', async () => {
      const c = await open();
      c.request(0, 9, 1n, 0, 0);
      await expectError(c, 1n, E.NBD_EINVAL);
      c.request(0, C.NBD_CMD_RESIZE, 2n, 4096, 0);
      await expectError(c, 2n, E.NBD_EINVAL);
      c.request(0, 0xffff, 3n, 0, 0);
      await expectError(c, 3n, E.NBD_EINVAL);
      await stillInSync(c);
      c.close();
    });

    test('unknown flags, and flags not valid for the command, get EINVAL', async () => {
      const c = await open();
      c.request(0x8000, C.NBD_CMD_READ, 1n, 0, 512);
      await expectError(c, 1n, E.NBD_EINVAL);
      c.request(F.NBD_CMD_FLAG_NO_HOLE, C.NBD_CMD_FLUSH, 2n, 0, 0);
      await expectError(c, 2n, E.NBD_EINVAL);
      c.request(F.NBD_CMD_FLAG_REQ_ONE, C.NBD_CMD_WRITE, 3n, 0, 512, false, Buffer.alloc(512));
      await expectError(c, 3n, E.NBD_EINVAL);
      c.request(F.NBD_CMD_FLAG_PAYLOAD_LEN, C.NBD_CMD_TRIM, 4n, 0, 512);
      await expectError(c, 4n, E.NBD_EINVAL);
      await stillInSync(c);
      c.close();
    });

    test('FUA is accepted on every command once advertised (READ, FLUSH, TRIM, CACHE)', async () => {
      const c = await open();
      c.request(F.NBD_CMD_FLAG_FUA, C.NBD_CMD_READ, 1n, 0, 512);
      assert.deepEqual(await readData(c, 1n, 0, 512, mode), data.subarray(0, 512));
      c.request(F.NBD_CMD_FLAG_FUA, C.NBD_CMD_FLUSH, 2n, 0, 0);
      await expectOk(c, 2n);
      c.request(F.NBD_CMD_FLAG_FUA, C.NBD_CMD_TRIM, 3n, DISK_SIZE - 4096, 4096);
      await expectOk(c, 3n);
      c.request(F.NBD_CMD_FLAG_FUA, C.NBD_CMD_CACHE, 4n, 0, 4096);
      await expectOk(c, 4n);
      c.close();
    });

    test('FLUSH with a non-zero offset or length gets EINVAL', async () => {
      const c = await open();
      c.request(0, C.NBD_CMD_FLUSH, 1n, 512, 0);
      await expectError(c, 1n, E.NBD_EINVAL);
      c.request(0, C.NBD_CMD_FLUSH, 2n, 0, 512);
      await expectError(c, 2n, E.NBD_EINVAL);
      await stillInSync(c);
      c.close();
    });

    test('BLOCK_STATUS without a metadata context gets EINVAL', async () => {
      const c = await open();
      c.request(0, C.NBD_CMD_BLOCK_STATUS, 1n, 0, 4096);
      await expectError(c, 1n, E.NBD_EINVAL);
      await stillInSync(c);
      c.close();
    });

    test('writes to a read-only export get EPERM (WRITE, TRIM, WRITE_ZEROES); reads work', async () => {
      const c = await open('ro');
      c.request(0, C.NBD_CMD_WRITE, 1n, 0, 512, false, Buffer.alloc(512, 1));
      await expectError(c, 1n, E.NBD_EPERM);
      c.request(0, C.NBD_CMD_TRIM, 2n, 0, 512);
      await expectError(c, 2n, E.NBD_EPERM);
      c.request(0, C.NBD_CMD_WRITE_ZEROES, 3n, 0, 512);
      await expectError(c, 3n, E.NBD_EPERM);
      c.request(0, C.NBD_CMD_READ, 4n, 0, 512);
      assert.deepEqual(await readData(c, 4n, 0, 512, mode), Buffer.alloc(512));
      c.close();
    });

    test(mode === 'simple' ? 'a zero-length READ gets a simple reply without data' : 'a zero-length READ gets a NONE chunk, not a simple reply', async () => {
      const c = await open();
      c.request(0, C.NBD_CMD_READ, 1n, 4096, 0);
      const r = await readReply(c);
      assert.equal(r.length, 1);
      const { h, payload } = r[0]!;
      assert.equal(h.cookie, 1n);
      if (mode === 'simple') {
        assert.equal(h.kind, 'simple');
        assert.equal(h.error, 0);
      } else {
        assert.equal(h.kind, 'structured');
        assert.equal(h.type, T.NBD_REPLY_TYPE_NONE);
        assert.equal(h.flags, DONE);
        assert.equal(payload.length, 0);
      }
      await stillInSync(c);
      c.close();
    });

    test('zero-length WRITE, TRIM and WRITE_ZEROES succeed without disconnecting', async () => {
      const c = await open();
      c.request(0, C.NBD_CMD_WRITE, 1n, 100, 0);
      await expectOk(c, 1n);
      c.request(0, C.NBD_CMD_TRIM, 2n, 100, 0);
      await expectOk(c, 2n);
      c.request(0, C.NBD_CMD_WRITE_ZEROES, 3n, 100, 0);
      await expectOk(c, 3n);
      c.close();
    });

    test('a WRITE is read back; a WRITE_ZEROES reads back as zeroes', async () => {
      const c = await open();
      const at = DATA_SIZE + 3 * 2 ** 20;
      c.request(0, C.NBD_CMD_WRITE, 1n, at, 10000, false, pattern(10000, 77));
      await expectOk(c, 1n);
      c.request(0, C.NBD_CMD_READ, 2n, at, 10000);
      assert.deepEqual(await readData(c, 2n, at, 10000, mode), pattern(10000, 77));
      c.request(F.NBD_CMD_FLAG_NO_HOLE, C.NBD_CMD_WRITE_ZEROES, 3n, at + 1000, 5000);
      await expectOk(c, 3n);
      c.request(0, C.NBD_CMD_READ, 4n, at, 10000);
      const expected = pattern(10000, 77);
      expected.fill(0, 1000, 6000);
      assert.deepEqual(await readData(c, 4n, at, 10000, mode), expected);
      c.close();
    });

    for (const name of ['disk', 'gated']) {
      // 'disk' is a bare memory device (payload gathered as socket slices, writev); 'gated' a filter (one buffer).
      test(`requests split into tiny socket writes are reassembled exactly (${name})`, async () => {
        const c = await open(name);
        const at = name === 'disk' ? DATA_SIZE + 2 * 2 ** 20 : 512 * 1024;
        const payload = pattern(3000, 61);
        const bytes = Buffer.concat([
          encodeRequest(0, C.NBD_CMD_WRITE, 1n, at + 5, payload.length),
          payload,
          encodeRequest(0, C.NBD_CMD_READ, 2n, at, 3010),
        ]);
        for (let i = 0; i < bytes.length; i += 7) {
          await new Promise((resolve) => c.socket.write(bytes.subarray(i, i + 7), resolve));
          await new Promise((resolve) => setImmediate(resolve));
        }
        await expectOk(c, 1n);
        const got = await readData(c, 2n, at, 3010, mode);
        assert.deepEqual(got.subarray(5, 3005), payload);
        c.close();
      });
    }

    test('1000 pipelined 4 KiB READs are all answered once, with matching cookies and data', async () => {
      const c = await open();
      const N = 1000;
      const offsets = new Map<bigint, number>();
      const reqs: Buffer[] = [];
      for (let i = 0; i < N; i++) {
        const cookie = BigInt(i) * 0x1_0000_0001n + 7n;
        const off = ((i * 7919) % (DATA_SIZE / 4096 - 1)) * 4096 + (i % 13);
        offsets.set(cookie, off);
        reqs.push(encodeRequest(0, C.NBD_CMD_READ, cookie, off, 4096));
      }
      c.write(Buffer.concat(reqs));
      const seen = new Set<bigint>();
      for (let i = 0; i < N; i++) {
        let cookie: bigint;
        let got: Buffer;
        if (mode === 'simple') {
          const r = await c.reply();
          assert.equal(r.h.error, 0);
          cookie = r.h.cookie;
          got = await c.read(4096);
        } else {
          const r = await readReply(c);
          cookie = r[0]!.h.cookie;
          got = assembleRead(r, cookie, offsets.get(cookie)!, 4096);
        }
        assert.ok(offsets.has(cookie), `unknown cookie ${cookie}`);
        assert.ok(!seen.has(cookie), `cookie ${cookie} answered twice`);
        seen.add(cookie);
        const off = offsets.get(cookie)!;
        assert.ok(got.equals(data.subarray(off, off + 4096)), `data of cookie ${cookie}`);
      }
      assert.equal(seen.size, N);
      c.close();
    });

    test('replies may come out of order: a fast READ overtakes a slow one', async () => {
      const c = await open('gated');
      gated.hold((op, offset) => op === 'read' && offset === 0);
      try {
        c.request(0, C.NBD_CMD_READ, 1n, 0, 4096);
        await until(() => gated.waiting === 1, 'the slow READ to reach the device');
        c.request(0, C.NBD_CMD_READ, 2n, 8192, 4096);
        const first = await readData(c, 2n, 8192, 4096, mode);
        assert.deepEqual(first, pattern(2 ** 20, 9).subarray(8192, 12288));
        gated.release(Infinity, true);
        assert.deepEqual(await readData(c, 1n, 0, 4096, mode), pattern(2 ** 20, 9).subarray(0, 4096));
      } finally {
        gated.release(Infinity, true);
      }
      c.close();
    });

    test('DISC with requests in flight: they are all answered, then the server closes', async () => {
      const c = await open('gated');
      gated.hold((op) => op === 'read');
      try {
        for (let i = 1; i <= 3; i++) c.request(0, C.NBD_CMD_READ, BigInt(i), i * 4096, 4096);
        await until(() => gated.waiting === 3, 'three READs in the device');
        c.request(0, C.NBD_CMD_DISC, 4n, 0, 0);
        // Bytes after DISC are ignored.
        c.request(0, C.NBD_CMD_READ, 5n, 0, 4096);
        await sleep(20);
        gated.release(Infinity, true);
        const cookies = new Set<bigint>();
        for (let i = 0; i < 3; i++) {
          const r = await c.reply();
          cookies.add(r.h.cookie);
          if (mode === 'simple') await c.read(4096);
          else assert.equal(r.h.flags, DONE, 'one chunk per 4 KiB READ');
        }
        assert.deepEqual([...cookies].sort(), [1n, 2n, 3n]);
        assert.equal(await c.closedByServer(), true);
      } finally {
        gated.release(Infinity, true);
      }
    });
  });
}

describe('simple replies only', () => {
  test('DF without structured replies gets EINVAL', async () => {
    const c = await connect(srv.socket, 'simple', 'disk');
    c.request(F.NBD_CMD_FLAG_DF, C.NBD_CMD_READ, 1n, 0, 512);
    await expectError(c, 1n, E.NBD_EINVAL);
    await stillInSync(c);
    c.close();
  });
});

describe('structured replies only', () => {
  test('error chunks carry a readable message', async () => {
    const c = await connect(srv.socket, 'structured', 'disk');
    c.request(0, C.NBD_CMD_READ, 1n, DISK_SIZE - 512, 1024);
    const r = await readReply(c);
    assert.equal(r.length, 1);
    const { h, payload } = r[0]!;
    assert.equal(h.type, T.NBD_REPLY_TYPE_ERROR);
    assert.equal(h.flags, DONE);
    const e = decodeErrorPayload(h.type, payload);
    assert.equal(e.errno, E.NBD_EINVAL);
    assert.match(e.message, /past the end/);
    assert.ok(Buffer.from(e.message, 'utf8').length <= 256);
    c.request(0x8000, C.NBD_CMD_READ, 2n, 0, 512);
    assert.match((await expectError(c, 2n, E.NBD_EINVAL)).message, /flags 0x8000/);
    c.close();
  });

  test('a device read failure with a known offset becomes an ERROR_OFFSET chunk naming that offset', async () => {
    const c = await connect(srv.socket, 'structured', 'failing');
    c.request(0, C.NBD_CMD_READ, 1n, FAIL_AT - 4096, 8192);
    const r = await readReply(c);
    assert.equal(r.length, 1);
    const { h, payload } = r[0]!;
    assert.equal(h.type, T.NBD_REPLY_TYPE_ERROR_OFFSET);
    assert.equal(h.flags, DONE);
    const e = decodeErrorPayload(h.type, payload);
    assert.equal(e.errno, E.NBD_EIO);
    assert.equal(e.offset, FAIL_AT + 100);
    assert.match(e.message, /simulated media error/);
    c.request(0, C.NBD_CMD_READ, 2n, 0, 4096);
    assert.deepEqual(await readData(c, 2n, 0, 4096, 'structured'), Buffer.alloc(4096), 'reads before FAIL_AT work');
    c.close();
  });

  test('a sparse READ returns OFFSET_DATA and OFFSET_HOLE chunks tiling the range; only the last is DONE', async () => {
    const c = await connect(srv.socket, 'structured', 'disk');
    const base = DATA_SIZE + 2 ** 20; // page-aligned region of holes
    const page = 64 * 1024;
    c.request(0, C.NBD_CMD_WRITE, 1n, base, page, false, pattern(page, 1));
    await expectOk(c, 1n);
    c.request(0, C.NBD_CMD_WRITE, 2n, base + 2 * page, page, false, pattern(page, 2));
    await expectOk(c, 2n);
    c.request(0, C.NBD_CMD_READ, 3n, base, 4 * page);
    const r = await readReply(c);
    assert.deepEqual(
      r.map((x) => [x.h.type, readU64(x.payload, 0) - base, x.h.flags]),
      [
        [T.NBD_REPLY_TYPE_OFFSET_DATA, 0, 0],
        [T.NBD_REPLY_TYPE_OFFSET_HOLE, page, 0],
        [T.NBD_REPLY_TYPE_OFFSET_DATA, 2 * page, 0],
        [T.NBD_REPLY_TYPE_OFFSET_HOLE, 3 * page, DONE],
      ],
    );
    const expected = Buffer.concat([pattern(page, 1), Buffer.alloc(page), pattern(page, 2), Buffer.alloc(page)]);
    assert.deepEqual(assembleRead(r, 3n, base, 4 * page), expected);

    // A READ that starts and ends inside data still tiles exactly.
    c.request(0, C.NBD_CMD_READ, 4n, base + 1000, 2 * page);
    assert.deepEqual(assembleRead(await readReply(c), 4n, base + 1000, 2 * page), expected.subarray(1000, 1000 + 2 * page));

    // DF: one OFFSET_DATA chunk for the whole range.
    c.request(F.NBD_CMD_FLAG_DF, C.NBD_CMD_READ, 5n, base, 4 * page);
    const df = await readReply(c);
    assert.equal(df.length, 1);
    assert.equal(df[0]!.h.type, T.NBD_REPLY_TYPE_OFFSET_DATA);
    assert.equal(df[0]!.h.flags, DONE);
    assert.equal(df[0]!.h.length, 8 + 4 * page);
    assert.equal(readU64(df[0]!.payload, 0), base);
    assert.deepEqual(df[0]!.payload.subarray(8), expected);
    c.close();
  });

  test('200 pipelined sparse READs over alternating data and holes all return exact data', async () => {
    const c = await connect(srv.socket, 'structured', 'disk');
    const page = 64 * 1024;
    const base = DATA_SIZE + 2 ** 21 + 2 ** 20; // 1 MiB of fresh holes
    const image = Buffer.alloc(2 ** 20);
    for (let p = 0; p < 16; p += 3) {
      const d = pattern(page, 100 + p);
      d.copy(image, p * page);
      c.request(0, C.NBD_CMD_WRITE, BigInt(p), base + p * page, page, false, d);
      await expectOk(c, BigInt(p));
    }
    const N = 200;
    const ranges = new Map<bigint, [number, number]>();
    const reqs: Buffer[] = [];
    for (let i = 0; i < N; i++) {
      const off = (i * 12_289) % (2 ** 20 - 3 * page);
      const len = page + ((i * 7919) % (2 * page));
      ranges.set(BigInt(1000 + i), [off, len]);
      reqs.push(encodeRequest(0, C.NBD_CMD_READ, BigInt(1000 + i), base + off, len));
    }
    c.write(Buffer.concat(reqs));
    let holes = 0;
    for (let i = 0; i < N; i++) {
      const r = await readReply(c);
      const cookie = r[0]!.h.cookie;
      const [off, len] = ranges.get(cookie)!;
      holes += r.filter((x) => x.h.type === T.NBD_REPLY_TYPE_OFFSET_HOLE).length;
      assert.ok(assembleRead(r, cookie, base + off, len).equals(image.subarray(off, off + len)), `data of READ ${cookie}`);
      ranges.delete(cookie);
    }
    assert.equal(ranges.size, 0);
    assert.ok(holes > N, 'the replies used OFFSET_HOLE chunks');
    c.close();
  });

  test('BLOCK_STATUS returns one BLOCK_STATUS chunk with 32-bit descriptors for the selected context', async () => {
    const c = await connect(srv.socket, 'structured', 'disk', true);
    const base = DATA_SIZE - 64 * 1024; // the last data page, then holes
    c.request(0, C.NBD_CMD_BLOCK_STATUS, 1n, base, 3 * 64 * 1024);
    const r = await readReply(c);
    assert.equal(r.length, 1);
    const { h, payload } = r[0]!;
    assert.equal(h.type, T.NBD_REPLY_TYPE_BLOCK_STATUS);
    assert.equal(h.flags, DONE);
    assert.notEqual(payload.readUInt32BE(0), 0);
    const descs = [];
    for (let at = 4; at < payload.length; at += 8) descs.push([payload.readUInt32BE(at), payload.readUInt32BE(at + 4)]);
    assert.deepEqual(descs, [
      [64 * 1024, 0],
      [2 * 64 * 1024, NBD_STATE.NBD_STATE_HOLE | NBD_STATE.NBD_STATE_ZERO],
    ]);
    c.request(0, C.NBD_CMD_BLOCK_STATUS, 2n, DISK_SIZE - 512, 1024);
    await expectError(c, 2n, E.NBD_EINVAL);
    c.close();
  });

  test('BLOCK_STATUS needs the context set on the same export: SET for another export then GO gets EINVAL', async () => {
    const c = await RawClient.connect(srv.socket);
    await c.greet();
    await c.expectAck(NBD_OPT.NBD_OPT_STRUCTURED_REPLY);
    await c.expectAck(NBD_OPT.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('ro', [BASE_ALLOCATION]));
    await c.expectAck(NBD_OPT.NBD_OPT_GO, encodeInfoRequest('disk', []));
    c.request(0, C.NBD_CMD_BLOCK_STATUS, 1n, 0, 4096);
    await expectError(c, 1n, E.NBD_EINVAL);
    c.close();
  });
});

describe('backpressure', () => {
  let bp: DirectServer;
  let dev: GatedDevice;
  const LIMIT = 4;
  const BYTES = 64 * 1024;

  before(async () => {
    dev = new GatedDevice(new MemoryDevice({ size: 2 ** 20 }));
    bp = await serveExports([new Export({ name: 'd', device: dev })], { maxInFlightRequests: LIMIT, maxInFlightBytes: BYTES });
  });
  after(() => bp.close());

  /**
   * Pipelines `n` READs of `len` bytes in one write while the device holds reads, and
   * checks that exactly `expectedConcurrency` reach the device until one is released.
   */
  async function pipelined(n: number, len: number, expectedConcurrency: number): Promise<void> {
    const c = await connect(bp.socket, 'simple', 'd');
    dev.maxActive = 0;
    dev.hold((op) => op === 'read');
    try {
      const reqs: Buffer[] = [];
      for (let i = 0; i < n; i++) reqs.push(encodeRequest(0, C.NBD_CMD_READ, BigInt(i), i * len, len));
      c.write(Buffer.concat(reqs));
      await until(() => dev.waiting === expectedConcurrency, `${expectedConcurrency} READs in the device`);
      // Let the server read whatever it would read: it must not start more.
      await sleep(50);
      assert.equal(dev.waiting, expectedConcurrency);
      let answered = 0;
      while (answered < n) {
        dev.release(1);
        const r = await c.reply();
        assert.equal(r.h.error, 0);
        await c.read(len);
        answered++;
        assert.ok(dev.active <= expectedConcurrency);
      }
      assert.equal(dev.maxActive, expectedConcurrency);
      await stillInSync(c);
    } finally {
      dev.release(Infinity, true);
    }
    c.close();
  }

  test('the server stops reading at maxInFlightRequests and resumes as requests finish', async () => {
    await pipelined(20, 512, LIMIT);
  });

  test('the server stops reading at maxInFlightBytes and resumes as requests finish', async () => {
    await pipelined(10, BYTES / 2, 2);
  });
});

describe('write-side backpressure', () => {
  /** Lets the paused client read again, and checks that every READ of `len` bytes is answered and ran once. */
  async function readAllReplies(c: RawClient, dev: GatedDevice, n: number, len: number): Promise<void> {
    c.socket.resume();
    for (let i = 0; i < n; i++) {
      const r = await c.reply();
      assert.equal(r.h.error, 0);
      await c.read(len);
    }
    assert.equal(dev.calls.get('read'), n);
  }

  test('a client that does not read its replies makes the server stop reading requests, until it reads again', async () => {
    const dev = new GatedDevice(new MemoryDevice({ size: 64 * 2 ** 20 }));
    const s = await serveExports([new Export({ name: 'd', device: dev })], { maxInFlightBytes: 2 ** 20 });
    try {
      const c = await connect(s.socket, 'simple', 'd');
      const N = 200;
      const LEN = 256 * 1024; // 50 MiB of replies in all
      c.socket.pause();
      const reqs: Buffer[] = [];
      for (let i = 0; i < N; i++) reqs.push(encodeRequest(0, C.NBD_CMD_READ, BigInt(i), (i % 64) * 2 ** 20, LEN));
      c.write(Buffer.concat(reqs));
      // Wait until the server stops starting reads.
      let last = -1;
      while ((dev.calls.get('read') ?? 0) !== last) {
        last = dev.calls.get('read') ?? 0;
        await sleep(100);
      }
      assert.ok(last < N / 4, `the server started ${last} of ${N} reads while the client read nothing`);
      await readAllReplies(c, dev, N, LEN);
      c.close();
    } finally {
      await s.close();
    }
  });

  test('the same when requests come one at a time, each answered before the next arrives (the last-in-flight reply path)', async () => {
    const dev = new GatedDevice(new MemoryDevice({ size: 64 * 2 ** 20 }));
    // Default limits: each READ finishes before the next arrives, so the in-flight budget never pauses input.
    const s = await serveExports([new Export({ name: 'd', device: dev })]);
    const c = await connect(s.socket, 'simple', 'd');
    try {
      const N = 120;
      const LEN = 2 ** 20; // 120 MiB of replies in all
      c.socket.pause();
      let sent = 0;
      // One request per write, and time for the server to answer it before the next.
      for (; sent < N; sent++) {
        c.write(encodeRequest(0, C.NBD_CMD_READ, BigInt(sent), (sent % 64) * 2 ** 20, LEN));
        await sleep(5);
        if ((dev.calls.get('read') ?? 0) < sent + 1) break;
      }
      await sleep(100);
      const started = dev.calls.get('read') ?? 0;
      assert.ok(started < N / 4, `the server started ${started} reads while the client read nothing`);
      for (sent++; sent < N; sent++) c.write(encodeRequest(0, C.NBD_CMD_READ, BigInt(sent), (sent % 64) * 2 ** 20, LEN));
      await readAllReplies(c, dev, N, LEN);
    } finally {
      // Also on failure: a paused client socket left open would keep the test process alive.
      c.socket.destroy();
      await s.close();
    }
  });
});
