/**
 * The reply writers without a socket: what each mode sends for each kind of result, and
 * that pooled read buffers are handed back with the write that carries them.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { BufferPool } from '../../src/io/buffer-pool.js';
import { EXTENT } from '../../src/device/index.js';
import { MODE, NBD_CMD, NBD_REPLY_FLAG, NBD_REPLY_TYPE, type Mode } from '../../src/nbd/constants.js';
import { decodeExtendedRequest, decodeReplyHeader, encodeRequest, readU64, type RequestHeader } from '../../src/nbd/codec.js';
import { replyWriter, type ReplyWriter } from '../../src/nbd/replies.js';

const T = NBD_REPLY_TYPE;
const DONE = NBD_REPLY_FLAG.NBD_REPLY_FLAG_DONE;
const OFFSET = 8192;
const LENGTH = 4096;
const COOKIE = 7n;

interface Sent {
  readonly buf: Buffer;
  readonly release?: Buffer;
}

function writer(mode: Mode): { w: ReplyWriter; sent: Sent[]; pool: BufferPool } {
  const sent: Sent[] = [];
  const pool = new BufferPool();
  const w = replyWriter(mode, (buf, release) => sent.push(release ? { buf, release } : { buf }), pool);
  return { w, sent, pool };
}

function req(length = LENGTH): RequestHeader {
  return decodeExtendedRequest(encodeRequest(0, NBD_CMD.NBD_CMD_READ, COOKIE, OFFSET, length, true));
}

/** A read buffer as the runner makes it: header room in front of the data. */
function readBuffer(w: ReplyWriter, pool: BufferPool, data: Buffer) {
  const prefix = w.readHeaderSize;
  const owner = pool.get(prefix + data.length);
  const buf = owner.subarray(0, prefix + data.length);
  data.copy(buf, prefix);
  return { buf, owner, prefix };
}

describe('success without data', () => {
  test('simple and structured modes answer with a simple reply; extended with a NONE chunk marked DONE', () => {
    for (const [mode, kind] of [
      [MODE.SIMPLE, 'simple'],
      [MODE.STRUCTURED, 'simple'],
      [MODE.EXTENDED, 'extended'],
    ] as const) {
      const { w, sent } = writer(mode);
      w.done(req());
      assert.equal(sent.length, 1);
      const h = decodeReplyHeader(sent[0]!.buf);
      assert.equal(h.kind, kind, `mode ${mode}`);
      assert.equal(h.cookie, COOKIE);
      if (kind === 'extended') assert.deepEqual([h.type, h.flags, h.offset, h.length], [T.NBD_REPLY_TYPE_NONE, DONE, OFFSET, 0]);
    }
  });
});

describe('errors', () => {
  test('simple mode sends the errno in a simple reply and drops message and offset', () => {
    const { w, sent } = writer(MODE.SIMPLE);
    w.error(req(), 22, 'bad', OFFSET);
    assert.equal(sent.length, 1);
    assert.equal(decodeReplyHeader(sent[0]!.buf).error, 22);
  });

  test('chunked modes send ERROR, or ERROR_OFFSET when an offset is given, marked DONE with the message', () => {
    for (const mode of [MODE.STRUCTURED, MODE.EXTENDED]) {
      const { w, sent } = writer(mode);
      w.error(req(), 5, 'media error', undefined);
      w.error(req(), 5, 'media error', OFFSET + 512);
      const plain = decodeReplyHeader(sent[0]!.buf);
      assert.deepEqual([plain.type, plain.flags], [T.NBD_REPLY_TYPE_ERROR, DONE]);
      assert.equal(sent[1]!.buf.readUInt32BE(0), 5);
      assert.equal(sent[1]!.buf.subarray(6).toString(), 'media error');
      const withOffset = decodeReplyHeader(sent[2]!.buf);
      assert.equal(withOffset.type, T.NBD_REPLY_TYPE_ERROR_OFFSET);
      assert.equal(readU64(sent[3]!.buf, 6 + 'media error'.length), OFFSET + 512);
    }
  });
});

describe('reads', () => {
  test('a whole read leaves as one buffer with its header in front, handed back to the pool with that write', () => {
    for (const mode of [MODE.SIMPLE, MODE.STRUCTURED, MODE.EXTENDED]) {
      const { w, sent, pool } = writer(mode);
      const data = Buffer.alloc(LENGTH, 0xab);
      const { buf, owner, prefix } = readBuffer(w, pool, data);
      w.read(req(), { buf, owner, prefix, zeroRuns: null });
      assert.equal(sent.length, 1);
      assert.equal(sent[0]!.buf, buf);
      assert.equal(sent[0]!.release, owner);
      const h = decodeReplyHeader(buf);
      if (mode !== MODE.SIMPLE) {
        assert.deepEqual([h.type, h.flags], [T.NBD_REPLY_TYPE_OFFSET_DATA, DONE]);
        assert.equal(readU64(buf, h.size), OFFSET);
      }
      assert.deepEqual(buf.subarray(prefix), data);
    }
  });

  test('device views go out behind one header, without copying', () => {
    const { w, sent } = writer(MODE.STRUCTURED);
    const views = [Buffer.alloc(1024, 1), Buffer.alloc(3072, 2)];
    w.views(req(), views);
    assert.equal(sent.length, 3);
    assert.equal(sent[0]!.buf.length, w.readHeaderSize);
    assert.equal(sent[1]!.buf, views[0]);
    assert.equal(sent[2]!.buf, views[1]);
  });

  test('a sparse read becomes data and hole chunks tiling the range, the last DONE, the buffer released after them', () => {
    const { w, sent, pool } = writer(MODE.EXTENDED);
    const { buf, owner, prefix } = readBuffer(w, pool, Buffer.alloc(LENGTH, 9));
    const zeroRuns = [{ offset: OFFSET + 1024, length: 1024, flags: EXTENT.ZERO }];
    w.read(req(), { buf, owner, prefix, zeroRuns });
    const headers = sent.filter((s) => s.buf.length === prefix || s.buf.length === 32).map((s) => decodeReplyHeader(s.buf));
    assert.deepEqual(
      headers.map((h) => [h.type, h.flags]),
      [
        [T.NBD_REPLY_TYPE_OFFSET_DATA, 0],
        [T.NBD_REPLY_TYPE_OFFSET_HOLE, 0],
        [T.NBD_REPLY_TYPE_OFFSET_DATA, DONE],
      ],
    );
    const last = sent[sent.length - 1]!;
    assert.equal(last.buf.length, 0);
    assert.equal(last.release, owner);
    assert.equal(sent.filter((s) => s.release).length, 1, 'released once');
  });

  test('a zero-length read in a chunked mode is a NONE chunk marked DONE, and the buffer goes back at once', () => {
    const { w, sent, pool } = writer(MODE.STRUCTURED);
    const { buf, owner, prefix } = readBuffer(w, pool, Buffer.alloc(0));
    w.read(req(0), { buf, owner, prefix, zeroRuns: null });
    assert.equal(sent.length, 1);
    const h = decodeReplyHeader(sent[0]!.buf);
    assert.deepEqual([h.kind, h.type, h.flags, h.length], ['structured', T.NBD_REPLY_TYPE_NONE, DONE, 0]);
  });

  test('only chunked modes may send holes', () => {
    assert.equal(writer(MODE.SIMPLE).w.sparse, false);
    assert.equal(writer(MODE.STRUCTURED).w.sparse, true);
    assert.equal(writer(MODE.EXTENDED).w.sparse, true);
  });
});

describe('block status', () => {
  test('structured mode sends BLOCK_STATUS with 8-byte descriptors; extended BLOCK_STATUS_EXT with 16-byte ones', () => {
    const descs = [{ length: 4096, flags: 0 }, { length: 8192, flags: 3 }];
    const s = writer(MODE.STRUCTURED);
    s.w.blockStatus(req(), descs);
    assert.equal(decodeReplyHeader(s.sent[0]!.buf).type, T.NBD_REPLY_TYPE_BLOCK_STATUS);
    assert.equal(s.sent[1]!.buf.length, 4 + descs.length * 8);
    const e = writer(MODE.EXTENDED);
    e.w.blockStatus(req(), descs);
    assert.equal(decodeReplyHeader(e.sent[0]!.buf).type, T.NBD_REPLY_TYPE_BLOCK_STATUS_EXT);
    assert.equal(e.sent[1]!.buf.length, 8 + descs.length * 16);
  });
});
