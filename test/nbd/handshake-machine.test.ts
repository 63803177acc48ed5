/**
 * The option-haggling state machine without a socket: options in, option replies and
 * outcomes out.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/backends/memory.js';
import { Export } from '../../src/export/index.js';
import { BASE_ALLOCATION, MODE, NBD_CLIENT_FLAG, NBD_FLAG, NBD_INFO, NBD_OPT, NBD_REP } from '../../src/nbd/constants.js';
import { decodeOptionReplyHeader, encodeInfoRequest, encodeMetaContextRequest, readU64 } from '../../src/nbd/codec.js';
import { Handshake, type HandshakeHost, type HandshakeStep } from '../../src/nbd/handshake.js';

const O = NBD_OPT;
const R = NBD_REP;
const SIZE = 1 << 20;
const MAX_PAYLOAD = 1 << 22;
const OPTION_REPLY_HEADER = 20;
const EXPORT_NAME_REPLY = 10;
const EXPORT_NAME_ZEROES = 124;

const disk = new Export({ name: 'disk', description: 'a disk', device: new MemoryDevice({ size: SIZE }) });
const ro = new Export({ name: 'ro', device: new MemoryDevice({ size: SIZE }), readOnly: true });

function machine(over: Partial<HandshakeHost> = {}): Handshake {
  const exports = [disk, ro];
  const hs = new Handshake({
    maxPayload: MAX_PAYLOAD,
    shuttingDown: false,
    findExport: (name) => exports.find((e) => e.name === name),
    listExports: () => exports,
    tlsMode: 'off',
    access: () => 'ok',
    ...over,
  });
  assert.equal(hs.clientFlags(NBD_CLIENT_FLAG.NBD_FLAG_C_FIXED_NEWSTYLE | NBD_CLIENT_FLAG.NBD_FLAG_C_NO_ZEROES).kind, 'continue');
  return hs;
}

interface Rep {
  readonly option: number;
  readonly type: number;
  readonly data: Buffer;
}

function replies(step: HandshakeStep): Rep[] {
  return step.replies.map((b) => {
    const h = decodeOptionReplyHeader(b);
    assert.ok(h.magicOk);
    assert.equal(b.length, OPTION_REPLY_HEADER + h.length);
    return { option: h.option, type: h.type, data: b.subarray(OPTION_REPLY_HEADER) };
  });
}

function types(step: HandshakeStep): number[] {
  return replies(step).map((r) => r.type);
}

const none = Buffer.alloc(0);

describe('client flags', () => {
  test('unknown client flags hang up; plain newstyle (no FIXED_NEWSTYLE) is served', () => {
    const hs = new Handshake({ maxPayload: MAX_PAYLOAD, shuttingDown: false, findExport: () => undefined, listExports: () => [], tlsMode: 'off', access: () => 'ok' });
    assert.equal(hs.clientFlags(1 << 5).kind, 'hangUp');
    assert.equal(hs.clientFlags(0).kind, 'continue');
  });
});

describe('LIST', () => {
  test('LIST answers one SERVER reply per export, then ACK', () => {
    const step = machine().option(O.NBD_OPT_LIST, none);
    assert.deepEqual(types(step), [R.NBD_REP_SERVER, R.NBD_REP_SERVER, R.NBD_REP_ACK]);
    const first = replies(step)[0]!.data;
    assert.equal(first.subarray(4, 4 + first.readUInt32BE(0)).toString(), 'disk');
    assert.ok(replies(step).every((r) => r.option === O.NBD_OPT_LIST));
    assert.equal(step.outcome.kind, 'continue');
  });

  test('LIST with data is ERR_INVALID', () => {
    assert.deepEqual(types(machine().option(O.NBD_OPT_LIST, Buffer.from('x'))), [R.NBD_REP_ERR_INVALID]);
  });
});

describe('INFO and GO', () => {
  test('INFO sends EXPORT, the asked NAME and DESCRIPTION, BLOCK_SIZE, ACK and stays in the handshake', () => {
    const step = machine().option(O.NBD_OPT_INFO, encodeInfoRequest('disk', [NBD_INFO.NBD_INFO_NAME, NBD_INFO.NBD_INFO_DESCRIPTION]));
    assert.deepEqual(types(step), [R.NBD_REP_INFO, R.NBD_REP_INFO, R.NBD_REP_INFO, R.NBD_REP_INFO, R.NBD_REP_ACK]);
    const infos = replies(step).slice(0, 4).map((r) => r.data.readUInt16BE(0));
    assert.deepEqual(infos, [NBD_INFO.NBD_INFO_EXPORT, NBD_INFO.NBD_INFO_NAME, NBD_INFO.NBD_INFO_DESCRIPTION, NBD_INFO.NBD_INFO_BLOCK_SIZE]);
    assert.equal(readU64(replies(step)[0]!.data, 2), SIZE);
    assert.equal(step.outcome.kind, 'continue');
  });

  test('block sizes are sent unasked, the maximum capped by the server maximum payload', () => {
    const step = machine({ maxPayload: 65536 }).option(O.NBD_OPT_INFO, encodeInfoRequest('disk', []));
    const bs = replies(step).find((r) => r.data.readUInt16BE(0) === NBD_INFO.NBD_INFO_BLOCK_SIZE)!.data;
    const b = disk.device.blockSize;
    assert.deepEqual([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)], [b.minimum, b.preferred, Math.max(Math.min(b.maximum, 65536), b.preferred)]);
    assert.ok(b.maximum > 65536, 'the cap is what this test pins');
  });

  test('GO on a known export enters transmission with its flags; on an unknown one it is ERR_UNKNOWN', () => {
    const hs = machine();
    assert.deepEqual(types(hs.option(O.NBD_OPT_GO, encodeInfoRequest('nope', []))), [R.NBD_REP_ERR_UNKNOWN]);
    const step = hs.option(O.NBD_OPT_GO, encodeInfoRequest('ro', []));
    assert.equal(types(step).at(-1), R.NBD_REP_ACK);
    const o = step.outcome;
    assert.equal(o.kind, 'transmission');
    if (o.kind !== 'transmission') return;
    assert.equal(o.export, ro);
    assert.equal(o.mode, MODE.SIMPLE);
    assert.ok(o.flags & NBD_FLAG.NBD_FLAG_READ_ONLY);
    assert.equal(o.flags & NBD_FLAG.NBD_FLAG_SEND_DF, 0, 'DF needs structured replies');
    assert.equal(o.flags & NBD_FLAG.NBD_FLAG_SEND_TRIM, 0, 'no TRIM on a read-only export');
    assert.equal(replies(step)[0]!.data.readUInt16BE(10), o.flags, 'INFO_EXPORT carries the same flags');
  });

  test('a malformed INFO request is ERR_INVALID', () => {
    assert.deepEqual(types(machine().option(O.NBD_OPT_INFO, Buffer.from([0, 0]))), [R.NBD_REP_ERR_INVALID]);
  });

  test('EXPORT_NAME answers size and flags (with the 124 zero bytes unless NO_ZEROES) and enters transmission', () => {
    const step = machine().option(O.NBD_OPT_EXPORT_NAME, Buffer.from('disk'));
    assert.equal(step.replies.length, 1);
    assert.equal(step.replies[0]!.length, EXPORT_NAME_REPLY);
    assert.equal(step.outcome.kind, 'transmission');
    const zeroes = new Handshake({ maxPayload: MAX_PAYLOAD, shuttingDown: false, findExport: () => disk, listExports: () => [], tlsMode: 'off', access: () => 'ok' });
    zeroes.clientFlags(NBD_CLIENT_FLAG.NBD_FLAG_C_FIXED_NEWSTYLE);
    assert.equal(zeroes.option(O.NBD_OPT_EXPORT_NAME, Buffer.from('disk')).replies[0]!.length, EXPORT_NAME_REPLY + EXPORT_NAME_ZEROES);
  });

  test('EXPORT_NAME of an unknown export hangs up without a reply', () => {
    const step = machine().option(O.NBD_OPT_EXPORT_NAME, Buffer.from('nope'));
    assert.equal(step.replies.length, 0);
    assert.equal(step.outcome.kind, 'hangUp');
  });
});

describe('STRUCTURED_REPLY and EXTENDED_HEADERS order', () => {
  test('STRUCTURED_REPLY is ACKed once; a second one is ERR_INVALID', () => {
    const hs = machine();
    assert.deepEqual(types(hs.option(O.NBD_OPT_STRUCTURED_REPLY, none)), [R.NBD_REP_ACK]);
    assert.equal(hs.mode, MODE.STRUCTURED);
    assert.deepEqual(types(hs.option(O.NBD_OPT_STRUCTURED_REPLY, none)), [R.NBD_REP_ERR_INVALID]);
  });

  test('STRUCTURED_REPLY after EXTENDED_HEADERS is ERR_EXT_HEADER_REQD and the mode stays extended', () => {
    const hs = machine();
    assert.deepEqual(types(hs.option(O.NBD_OPT_EXTENDED_HEADERS, none)), [R.NBD_REP_ACK]);
    assert.deepEqual(types(hs.option(O.NBD_OPT_STRUCTURED_REPLY, none)), [R.NBD_REP_ERR_EXT_HEADER_REQD]);
    assert.equal(hs.mode, MODE.EXTENDED);
  });

  test('EXTENDED_HEADERS after STRUCTURED_REPLY upgrades; a second EXTENDED_HEADERS is ERR_INVALID', () => {
    const hs = machine();
    hs.option(O.NBD_OPT_STRUCTURED_REPLY, none);
    assert.deepEqual(types(hs.option(O.NBD_OPT_EXTENDED_HEADERS, none)), [R.NBD_REP_ACK]);
    assert.equal(hs.mode, MODE.EXTENDED);
    assert.deepEqual(types(hs.option(O.NBD_OPT_EXTENDED_HEADERS, none)), [R.NBD_REP_ERR_INVALID]);
  });

  test('either option with data is ERR_INVALID and changes nothing', () => {
    const hs = machine();
    assert.deepEqual(types(hs.option(O.NBD_OPT_STRUCTURED_REPLY, Buffer.from('x'))), [R.NBD_REP_ERR_INVALID]);
    assert.deepEqual(types(hs.option(O.NBD_OPT_EXTENDED_HEADERS, Buffer.from('x'))), [R.NBD_REP_ERR_INVALID]);
    assert.equal(hs.mode, MODE.SIMPLE);
  });

  test('EXPORT_NAME after EXTENDED_HEADERS closes without a reply', () => {
    const hs = machine();
    hs.option(O.NBD_OPT_EXTENDED_HEADERS, none);
    const step = hs.option(O.NBD_OPT_EXPORT_NAME, Buffer.from('disk'));
    assert.equal(step.replies.length, 0);
    assert.equal(step.outcome.kind, 'hangUp');
  });

  test('GO after EXTENDED_HEADERS enters transmission in extended mode with SEND_DF', () => {
    const hs = machine();
    hs.option(O.NBD_OPT_EXTENDED_HEADERS, none);
    const o = hs.option(O.NBD_OPT_GO, encodeInfoRequest('disk', [])).outcome;
    assert.ok(o.kind === 'transmission' && o.mode === MODE.EXTENDED && (o.flags & NBD_FLAG.NBD_FLAG_SEND_DF) !== 0);
  });
});

describe('SET_META_CONTEXT and LIST_META_CONTEXT', () => {
  test('meta contexts need structured replies first', () => {
    assert.deepEqual(types(machine().option(O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', [BASE_ALLOCATION]))), [R.NBD_REP_ERR_INVALID]);
  });

  test('SET base:allocation answers META_CONTEXT with a non-zero id, then ACK, and GO of that export selects it', () => {
    const hs = machine();
    hs.option(O.NBD_OPT_STRUCTURED_REPLY, none);
    const step = hs.option(O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', [BASE_ALLOCATION, 'qemu:dirty-bitmap:x']));
    assert.deepEqual(types(step), [R.NBD_REP_META_CONTEXT, R.NBD_REP_ACK]);
    const meta = replies(step)[0]!.data;
    assert.notEqual(meta.readUInt32BE(0), 0);
    assert.equal(meta.subarray(4).toString(), BASE_ALLOCATION);
    const o = hs.option(O.NBD_OPT_GO, encodeInfoRequest('disk', [])).outcome;
    assert.ok(o.kind === 'transmission' && o.metaSelected);
  });

  test('a selection made for another export is dropped at GO', () => {
    const hs = machine();
    hs.option(O.NBD_OPT_STRUCTURED_REPLY, none);
    hs.option(O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', [BASE_ALLOCATION]));
    const o = hs.option(O.NBD_OPT_GO, encodeInfoRequest('ro', [])).outcome;
    assert.ok(o.kind === 'transmission' && !o.metaSelected);
  });

  test('a later SET replaces the selection even when it selects nothing', () => {
    const hs = machine();
    hs.option(O.NBD_OPT_STRUCTURED_REPLY, none);
    hs.option(O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', [BASE_ALLOCATION]));
    assert.deepEqual(types(hs.option(O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', ['base:']))), [R.NBD_REP_ACK]);
    const o = hs.option(O.NBD_OPT_GO, encodeInfoRequest('disk', [])).outcome;
    assert.ok(o.kind === 'transmission' && !o.metaSelected);
  });

  test('LIST with no query or the base: namespace lists base:allocation with id 0 and selects nothing', () => {
    const hs = machine();
    hs.option(O.NBD_OPT_STRUCTURED_REPLY, none);
    for (const q of [[], ['base:']]) {
      const step = hs.option(O.NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest('disk', q));
      assert.deepEqual(types(step), [R.NBD_REP_META_CONTEXT, R.NBD_REP_ACK]);
      assert.equal(replies(step)[0]!.data.readUInt32BE(0), 0);
    }
    const o = hs.option(O.NBD_OPT_GO, encodeInfoRequest('disk', [])).outcome;
    assert.ok(o.kind === 'transmission' && !o.metaSelected);
  });

  test('SET on an unknown export is ERR_UNKNOWN', () => {
    const hs = machine();
    hs.option(O.NBD_OPT_STRUCTURED_REPLY, none);
    assert.deepEqual(types(hs.option(O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('nope', [BASE_ALLOCATION]))), [R.NBD_REP_ERR_UNKNOWN]);
  });
});

describe('other options', () => {
  test('an unknown option is ERR_UNSUP and the haggling goes on', () => {
    const step = machine().option(99, Buffer.from('whatever'));
    assert.deepEqual(replies(step).map((r) => [r.option, r.type]), [[99, R.NBD_REP_ERR_UNSUP]]);
    assert.equal(step.outcome.kind, 'continue');
  });

  test('STARTTLS is ERR_POLICY (no TLS configured)', () => {
    assert.deepEqual(types(machine().option(O.NBD_OPT_STARTTLS, none)), [R.NBD_REP_ERR_POLICY]);
  });

  test('ABORT is ACKed, then the connection ends', () => {
    const step = machine().option(O.NBD_OPT_ABORT, none);
    assert.deepEqual(types(step), [R.NBD_REP_ACK]);
    assert.equal(step.outcome.kind, 'abort');
  });

  test('an option too long to read is ERR_TOO_BIG', () => {
    assert.deepEqual(types(machine().optionTooLong(O.NBD_OPT_GO)), [R.NBD_REP_ERR_TOO_BIG]);
  });

  test('while shutting down options get ERR_SHUTDOWN, EXPORT_NAME hangs up, ABORT is still ACKed', () => {
    const hs = machine({ shuttingDown: true });
    assert.deepEqual(types(hs.option(O.NBD_OPT_LIST, none)), [R.NBD_REP_ERR_SHUTDOWN]);
    assert.equal(hs.option(O.NBD_OPT_EXPORT_NAME, Buffer.from('disk')).outcome.kind, 'hangUp');
    assert.equal(hs.option(O.NBD_OPT_ABORT, none).outcome.kind, 'abort');
  });
});
