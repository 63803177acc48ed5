import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { BlockError } from '../../../src/errors/index.js';
import {
  CONTROL,
  CONTROL_OP,
  ControlFrameError,
  decodeReply,
  decodeReplyHeader,
  decodeRequest,
  decodeRequestHeader,
  encodeEmptyReply,
  encodeErrorReply,
  encodeJsonReply,
  encodeRequest,
  encodeStartReply,
  type ControlRequestInput,
  type RequestHeader,
} from '../../../src/gate/control/protocol.js';
import { ControlFrameStream } from '../../../src/gate/control/frames.js';

const hex = (chunks: Buffer[]): string => Buffer.concat(chunks).toString('hex');

/** Decodes one whole request frame. */
function roundTrip(chunks: Buffer[]) {
  const all = Buffer.concat(chunks);
  const h = decodeRequestHeader(all);
  return decodeRequest(h, all.subarray(CONTROL.REQUEST_HEADER_SIZE));
}

function reply(chunks: Buffer[]) {
  const all = Buffer.concat(chunks);
  const h = decodeReplyHeader(all);
  return decodeReply(h, all.subarray(CONTROL.REPLY_HEADER_SIZE));
}

describe('control protocol: byte vectors', () => {
  test('START request: magic "bgC1", version, op 4, call id, body length 8, unit, buffer length', () => {
    const chunks = encodeRequest({ op: 'start', version: 3, callId: 7, unit: 0, length: 4096 });
    assert.equal(hex(chunks), '62674331' + '0003' + '0004' + '00000007' + '00000008' + '00000000' + '00001000');
    assert.deepEqual(roundTrip(chunks), { op: 'start', version: 3, callId: 7, unit: 0, length: 4096 });
  });

  test('DONE request: unit, Linux errno, u64 seq, then the data as its own chunk', () => {
    const data = Buffer.from('abc');
    const chunks = encodeRequest({ op: 'done', version: 3, callId: 1, unit: 1, seq: 2 ** 32 + 5, errno: 11, data });
    assert.equal(chunks.length, 3);
    assert.equal(chunks[2], data, 'the payload is not copied');
    assert.equal(
      hex(chunks),
      '62674331000300050000000100000013' + '00000001' + '0000000b' + '0000000100000005' + '616263',
    );
    const r = roundTrip(chunks);
    assert.equal(r.op, 'done');
    if (r.op !== 'done') return;
    assert.equal(r.seq, 2 ** 32 + 5);
    assert.equal(r.errno, 11);
    assert.deepEqual(r.data, data);
  });

  test('DESTROY and CANCEL: fixed fields then an optional name', () => {
    const d = encodeRequest({ op: 'destroy', version: 3, callId: 2, unit: -2, force: true, name: 'disk' });
    assert.equal(hex(d), '6267433100030002000000020000000c' + 'fffffffe' + '00000001' + '6469736b');
    assert.deepEqual(roundTrip(d), { op: 'destroy', version: 3, callId: 2, unit: -2, force: true, name: 'disk' });
    const c = encodeRequest({ op: 'cancel', version: 3, callId: 3, unit: 4, seq: 0 });
    assert.equal(hex(c), '62674331000300030000000300000010' + '00000004' + '00000000' + '0000000000000000');
    assert.deepEqual(roundTrip(c), { op: 'cancel', version: 3, callId: 3, unit: 4, seq: 0, name: undefined });
  });

  test('CREATE: a JSON body; LIST and STATUS: empty bodies; ABORT: the target call id', () => {
    const c = encodeRequest({ op: 'create', version: 3, callId: 4, body: { mediasize: 1024, sectorsize: 512 } });
    assert.deepEqual(roundTrip(c), { op: 'create', version: 3, callId: 4, body: { mediasize: 1024, sectorsize: 512 } });
    assert.equal(hex(encodeRequest({ op: 'list', version: 3, callId: 5 })), '62674331000300100000000500000000');
    assert.equal(hex(encodeRequest({ op: 'status', version: 3, callId: 6 })), '62674331000300110000000600000000');
    const a = encodeRequest({ op: 'abort', version: 3, callId: 8, target: 7 });
    assert.equal(hex(a), '62674331000300120000000800000004' + '00000007');
  });

  test('START reply with a WRITE: the instance result, then the payload', () => {
    const data = Buffer.from('deadbeef', 'hex');
    const chunks = encodeStartReply(9, { error: 0, seq: 3, cmd: 'write', offset: 1024, length: 4, data });
    assert.equal(
      hex(chunks),
      '62675231' + '0003' + '0004' + '00000009' + '00000000' + '00000024' +
        '00000000' + '00000002' + '0000000000000003' + '0000000000000400' + '0000000000000004' + 'deadbeef',
    );
    const r = reply(chunks);
    assert.equal(r.kind, 'start');
    if (r.kind !== 'start') return;
    assert.deepEqual(r.result, { error: 0, seq: 3, cmd: 'write', offset: 1024, length: 4, data });
  });

  test('START reply ECANCELED and ENOMEM+length are successful calls (status 0) with the gate condition in the body', () => {
    const c = encodeStartReply(1, { error: 'ECANCELED' });
    assert.equal(hex(c), '626752310003000400000001' + '00000000' + '00000020' + '0000007d' + '00'.repeat(28));
    assert.deepEqual(reply(c), { version: 3, op: CONTROL_OP.START, callId: 1, kind: 'start', result: { error: 'ECANCELED' } });
    const m = encodeStartReply(2, { error: 'ENOMEM', length: 131072 });
    assert.equal(hex(m), '626752310003000400000002' + '00000000' + '00000020' + '0000000c' + '00'.repeat(20) + '0000000000020000');
    assert.deepEqual(reply(m), {
      version: 3,
      op: CONTROL_OP.START,
      callId: 2,
      kind: 'start',
      result: { error: 'ENOMEM', length: 131072 },
    });
    const rd = reply(encodeStartReply(3, { error: 0, seq: 1, cmd: 'read', offset: 0, length: 512 }));
    assert.deepEqual(rd.kind === 'start' && rd.result, { error: 0, seq: 1, cmd: 'read', offset: 0, length: 512 });
  });

  test('a failed call: the status carries the errno, the body the message', () => {
    const e = encodeErrorReply(CONTROL_OP.START, 5, new BlockError('ENXIO', 'no gate unit 9'));
    assert.equal(hex(e), '62675231000300040000000500000006' + '0000000e' + Buffer.from('no gate unit 9').toString('hex'));
    assert.deepEqual(reply(e), { version: 3, op: CONTROL_OP.START, callId: 5, kind: 'error', status: 6, message: 'no gate unit 9' });
    assert.deepEqual(reply(encodeEmptyReply(CONTROL_OP.DONE, 6)), { version: 3, op: CONTROL_OP.DONE, callId: 6, kind: 'empty' });
    assert.deepEqual(reply(encodeJsonReply(CONTROL_OP.CREATE, 7, { unit: 0, name: 'ggate0' })), {
      version: 3,
      op: CONTROL_OP.CREATE,
      callId: 7,
      kind: 'json',
      body: { unit: 0, name: 'ggate0' },
    });
  });

  test('long error messages are cut at MAX_MESSAGE bytes on a character boundary', () => {
    const e = encodeErrorReply(CONTROL_OP.LIST, 1, new BlockError('EIO', 'é'.repeat(CONTROL.MAX_MESSAGE)));
    const r = reply(e);
    assert.equal(r.kind, 'error');
    if (r.kind !== 'error') return;
    assert.ok(Buffer.byteLength(r.message) <= CONTROL.MAX_MESSAGE);
    assert.match(r.message, /^é+$/);
  });

  test('an unknown op is decoded as such (the server answers EOPNOTSUPP), not a framing error', () => {
    const b = Buffer.from('62674331000300630000000100000002abcd', 'hex');
    const h = decodeRequestHeader(b);
    assert.deepEqual(decodeRequest(h, b.subarray(16)), { version: 3, callId: 1, op: 'unknown', code: 0x63 });
  });
});

describe('control protocol: bad frames', () => {
  const frameError = (fn: () => unknown, re: RegExp): void => {
    assert.throws(fn, (e: unknown) => e instanceof ControlFrameError && re.test(e.message));
  };

  test('bad magic, oversized bodies, wrong fixed sizes', () => {
    frameError(() => decodeRequestHeader(Buffer.from('62674332000300040000000100000008', 'hex')), /bad request magic/);
    frameError(() => decodeRequestHeader(Buffer.from('62674331000300040000000100000009', 'hex')), /exceeds 8/);
    frameError(
      () => decodeRequestHeader(Buffer.from(`6267433100030005000000010${(CONTROL.DONE_FIXED_SIZE + CONTROL.MAX_DATA + 1).toString(16).padStart(7, '0')}`, 'hex')),
      /exceeds/,
    );
    frameError(() => decodeRequestHeader(Buffer.from('6267433100030000000000010fffffff', 'hex')), /exceeds/);
    const h = { version: 3, op: CONTROL_OP.START, callId: 1, bodyLength: 4 };
    frameError(() => decodeRequest(h, Buffer.alloc(4)), /expected 8/);
    frameError(() => decodeRequest({ ...h, op: CONTROL_OP.DONE, bodyLength: 8 }, Buffer.alloc(8)), /at least 16/);
    frameError(() => decodeReplyHeader(Buffer.from('62674331000300040000000100000000000000000', 'hex')), /bad reply magic/);
  });

  test('a u64 over 2^53 - 1, bad UTF-8, bad JSON, a bad force flag', () => {
    const done = Buffer.alloc(16);
    done.writeUInt32BE(0x0020_0000, 8);
    frameError(() => decodeRequest({ version: 3, op: CONTROL_OP.DONE, callId: 1, bodyLength: 16 }, done), /2\^53/);
    const name = Buffer.concat([Buffer.alloc(8), Buffer.from([0xff, 0xfe])]);
    frameError(() => decodeRequest({ version: 3, op: CONTROL_OP.DESTROY, callId: 1, bodyLength: 10 }, name), /UTF-8/);
    frameError(() => decodeRequest({ version: 3, op: CONTROL_OP.CREATE, callId: 1, bodyLength: 3 }, Buffer.from('{x:')), /not JSON/);
    const force = Buffer.alloc(8);
    force.writeUInt32BE(2, 4);
    frameError(() => decodeRequest({ version: 3, op: CONTROL_OP.DESTROY, callId: 1, bodyLength: 8 }, force), /force/);
  });

  test('START results that contradict themselves', () => {
    const h = { version: 3, op: CONTROL_OP.START, callId: 1, status: 0, bodyLength: 32 };
    const bad = Buffer.alloc(32);
    bad.writeInt32BE(5, 0); // EIO is not an instance result of START
    frameError(() => decodeReply(h, bad), /neither ECANCELED nor ENOMEM/);
    const cmd = Buffer.alloc(32);
    cmd.writeUInt32BE(9, 4);
    frameError(() => decodeReply(h, cmd), /unknown bio_cmd/);
    const short = Buffer.alloc(32);
    short.writeUInt32BE(2, 4); // WRITE of 8 bytes without its payload
    short.writeUInt32BE(8, 28);
    frameError(() => decodeReply(h, short), /carries 0 bytes/);
  });

  test('encoders refuse values the layout cannot carry', () => {
    const einval = (fn: () => unknown): void => {
      assert.throws(fn, (e: unknown) => e instanceof BlockError && e.code === 'EINVAL');
    };
    einval(() => encodeRequest({ op: 'destroy', version: 3, callId: 1, unit: 0, force: false, name: 'x'.repeat(CONTROL.MAX_NAME + 1) }));
    einval(() => encodeRequest({ op: 'cancel', version: 3, callId: 1, unit: 0, seq: -1 }));
    einval(() => encodeRequest({ op: 'start', version: 3, callId: 1, unit: 2 ** 31, length: 0 }));
    einval(() => encodeRequest({ op: 'start', version: 3, callId: 2 ** 32, unit: 0, length: 0 }));
  });
});

describe('control protocol: frame decoder', () => {
  const arbRequest: fc.Arbitrary<ControlRequestInput> = fc.oneof(
    fc.record({ op: fc.constant('start' as const), unit: fc.integer({ min: -2, max: 300 }), length: fc.nat() }),
    fc.record({
      op: fc.constant('done' as const),
      unit: fc.integer({ min: 0, max: 300 }),
      seq: fc.maxSafeNat(),
      errno: fc.constantFrom(0, 5, 11),
      data: fc.option(fc.uint8Array({ minLength: 1, maxLength: 700 }).map((a) => Buffer.from(a)), { nil: undefined }),
    }),
    fc.record({ op: fc.constant('cancel' as const), unit: fc.integer({ min: 0, max: 9 }), seq: fc.maxSafeNat() }),
    fc.record({ op: fc.constant('create' as const), body: fc.record({ mediasize: fc.nat(), info: fc.string() }) }),
    fc.record({ op: fc.constant('list' as const) }),
  ).map((r) => ({ ...r, version: 3, callId: 0 }) as ControlRequestInput);

  test('any split of a stream of frames decodes to the same requests', () => {
    fc.assert(
      fc.property(fc.array(arbRequest, { minLength: 1, maxLength: 12 }), fc.array(fc.integer({ min: 1, max: 97 }), { minLength: 1 }), (reqs, cuts) => {
        const stream = Buffer.concat(reqs.flatMap((r, i) => encodeRequest({ ...r, callId: i + 1 })));
        const got: ReturnType<typeof decodeRequest>[] = [];
        const frames = ControlFrameStream.requests(
          (h, body) => got.push(decodeRequest(h, body)),
          (e) => assert.fail(e as Error),
        );
        let pos = 0;
        for (let i = 0; pos < stream.length; i++) {
          const n = cuts[i % cuts.length]!;
          frames.push(stream.subarray(pos, pos + n));
          pos += n;
        }
        assert.equal(frames.buffered, 0);
        assert.equal(got.length, reqs.length);
        got.forEach((g, i) => {
          assert.equal(g.callId, i + 1);
          assert.equal(g.op, reqs[i]!.op);
          const want = reqs[i]!;
          if (want.op === 'done' && g.op === 'done') {
            assert.equal(g.seq, want.seq);
            assert.deepEqual(g.data, want.data);
          }
          if (want.op === 'create' && g.op === 'create') assert.equal(JSON.stringify(g.body), JSON.stringify(want.body));
        });
      }),
      { numRuns: 200 },
    );
  });

  test('an oversized header is refused before its body is buffered, and the stream stays stopped', () => {
    const h = Buffer.from('62674331000300040000000100100000', 'hex');
    const open = (): { frames: ControlFrameStream<RequestHeader>; errors: unknown[]; got: { n: number } } => {
      const errors: unknown[] = [];
      const got = { n: 0 };
      const frames = ControlFrameStream.requests(
        () => got.n++,
        (e) => errors.push(e),
      );
      return { frames, errors, got };
    };
    const a = open();
    a.frames.push(Buffer.concat([h, Buffer.alloc(100)]));
    assert.equal(a.errors.length, 1);
    assert.match((a.errors[0] as Error).message, /exceeds 8/);
    assert.equal(a.frames.buffered, 0);
    // A header split across chunks is refused as soon as it is whole.
    const b = open();
    b.frames.push(h.subarray(0, 10));
    assert.equal(b.errors.length, 0);
    b.frames.push(h.subarray(10));
    assert.ok(b.errors[0] instanceof ControlFrameError);
    assert.equal(b.frames.buffered, 0);
    assert.equal(b.frames.stopped, true);
    b.frames.push(Buffer.alloc(1));
    assert.equal(b.errors.length, 1, 'nothing more is parsed or reported');
    assert.equal(b.got.n, 0);
  });

  test('a frame whose handler throws stops the stream and reports the error once', () => {
    const stream = Buffer.concat([...encodeRequest({ op: 'list', version: 3, callId: 1 }), ...encodeRequest({ op: 'list', version: 3, callId: 2 })]);
    const errors: unknown[] = [];
    let got = 0;
    const frames = ControlFrameStream.requests(
      () => {
        got++;
        throw new ControlFrameError('no');
      },
      (e) => errors.push(e),
    );
    frames.push(stream);
    assert.equal(got, 1);
    assert.equal(errors.length, 1);
    assert.equal(frames.stopped, true);
  });

  test('a paused stream queues frames and delivers them on resume', () => {
    const stream = Buffer.concat([1, 2, 3].flatMap((callId) => encodeRequest({ op: 'list', version: 3, callId })));
    const got: number[] = [];
    const frames = ControlFrameStream.requests(
      (h) => {
        got.push(h.callId);
        if (h.callId === 1) frames.pause();
      },
      (e) => assert.fail(e as Error),
    );
    frames.push(stream);
    assert.deepEqual(got, [1]);
    assert.ok(frames.buffered > 0);
    frames.resume();
    assert.deepEqual(got, [1, 2, 3]);
    assert.equal(frames.buffered, 0);
  });
});
