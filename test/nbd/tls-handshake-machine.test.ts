/**
 * The option-haggling state machine's TLS rules without a socket: FORCEDTLS ('require'),
 * TLS refused ('off'), STARTTLS's own errors, what tlsEstablished() makes the server
 * forget, and per-export access ('tls' / 'denied') as LIST, INFO, GO, EXPORT_NAME and
 * the meta-context options see it.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/backends/memory.js';
import { Export } from '../../src/export/index.js';
import { BASE_ALLOCATION, MODE, NBD_CLIENT_FLAG, NBD_FLAG, NBD_OPT, NBD_REP } from '../../src/nbd/constants.js';
import { decodeOptionReplyHeader, encodeInfoRequest, encodeMetaContextRequest } from '../../src/nbd/codec.js';
import { Handshake, type ExportAccess, type HandshakeHost, type HandshakeStep } from '../../src/nbd/handshake.js';

const O = NBD_OPT;
const R = NBD_REP;
const SIZE = 1 << 20;
const OPTION_REPLY_HEADER = 20;
const none = Buffer.alloc(0);

const disk = new Export({ name: 'disk', description: 'a disk', device: new MemoryDevice({ size: SIZE }) });
const secret = new Export({ name: 'secret', device: new MemoryDevice({ size: SIZE }) });
const exports = [disk, secret];

function machine(over: Partial<HandshakeHost> = {}): Handshake {
  const hs = new Handshake({
    maxPayload: 1 << 22,
    shuttingDown: false,
    findExport: (name) => exports.find((e) => e.name === name) ?? (name === '' ? disk : undefined),
    listExports: () => exports,
    tlsMode: 'off',
    access: () => 'ok',
    ...over,
  });
  assert.equal(hs.clientFlags(NBD_CLIENT_FLAG.NBD_FLAG_C_FIXED_NEWSTYLE | NBD_CLIENT_FLAG.NBD_FLAG_C_NO_ZEROES).kind, 'continue');
  return hs;
}

/** A machine whose access() answers `secretAccess` for the export 'secret' and 'ok' for the others. */
function withSecret(secretAccess: ExportAccess, tlsMode: HandshakeHost['tlsMode'] = 'on'): Handshake {
  return machine({ tlsMode, access: (exp) => (exp.name === 'secret' ? secretAccess : 'ok') });
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

/** The export names of a LIST's SERVER replies. */
function listed(step: HandshakeStep): string[] {
  return replies(step)
    .filter((r) => r.type === R.NBD_REP_SERVER)
    .map((r) => r.data.subarray(4, 4 + r.data.readUInt32BE(0)).toString('utf8'));
}

/** Negotiates STARTTLS and reports the TLS handshake as done, as the session does. */
function startTls(hs: Handshake): void {
  const step = hs.option(O.NBD_OPT_STARTTLS, none);
  assert.deepEqual(types(step), [R.NBD_REP_ACK]);
  assert.equal(step.outcome.kind, 'startTls');
  hs.tlsEstablished();
}

/** Every option a client could send before TLS, with valid data, except ABORT, STARTTLS and EXPORT_NAME. */
const CLEAR_OPTIONS: readonly [string, number, Buffer][] = [
  ['LIST', O.NBD_OPT_LIST, none],
  ['INFO', O.NBD_OPT_INFO, encodeInfoRequest('disk', [])],
  ['GO', O.NBD_OPT_GO, encodeInfoRequest('disk', [])],
  ['STRUCTURED_REPLY', O.NBD_OPT_STRUCTURED_REPLY, none],
  ['EXTENDED_HEADERS', O.NBD_OPT_EXTENDED_HEADERS, none],
  ['LIST_META_CONTEXT', O.NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest('disk', [])],
  ['SET_META_CONTEXT', O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', [BASE_ALLOCATION])],
  ['PEEK_EXPORT (unsupported)', 4, none],
  ['unknown option 99', 99, Buffer.from('whatever')],
  ['unknown option 0x7fffffff', 0x7fffffff, none],
];

describe("FORCEDTLS ('require')", () => {
  for (const [name, opt, data] of CLEAR_OPTIONS) {
    test(`${name} before STARTTLS is ERR_TLS_REQD and the haggling goes on`, () => {
      const step = machine({ tlsMode: 'require' }).option(opt, data);
      assert.deepEqual(replies(step).map((r) => [r.option, r.type]), [[opt, R.NBD_REP_ERR_TLS_REQD]]);
      assert.equal(step.outcome.kind, 'continue');
    });
  }

  test('options refused before TLS change nothing: the mode stays simple and LIST lists nothing', () => {
    const hs = machine({ tlsMode: 'require' });
    hs.option(O.NBD_OPT_STRUCTURED_REPLY, none);
    hs.option(O.NBD_OPT_EXTENDED_HEADERS, none);
    assert.equal(hs.mode, MODE.SIMPLE);
    assert.deepEqual(listed(hs.option(O.NBD_OPT_LIST, none)), []);
  });

  test('EXPORT_NAME before STARTTLS hangs up without a reply', () => {
    const step = machine({ tlsMode: 'require' }).option(O.NBD_OPT_EXPORT_NAME, Buffer.from('disk'));
    assert.equal(step.replies.length, 0);
    assert.equal(step.outcome.kind, 'hangUp');
    assert.ok(step.outcome.kind === 'hangUp' && step.outcome.reason !== null && /STARTTLS/.test(step.outcome.reason));
  });

  test('ABORT before STARTTLS is ACKed and ends the connection', () => {
    const step = machine({ tlsMode: 'require' }).option(O.NBD_OPT_ABORT, none);
    assert.deepEqual(types(step), [R.NBD_REP_ACK]);
    assert.equal(step.outcome.kind, 'abort');
  });

  test('STARTTLS is ACKed with outcome startTls', () => {
    const hs = machine({ tlsMode: 'require' });
    const step = hs.option(O.NBD_OPT_STARTTLS, none);
    assert.deepEqual(replies(step).map((r) => [r.option, r.type, r.data.length]), [[O.NBD_OPT_STARTTLS, R.NBD_REP_ACK, 0]]);
    assert.equal(step.outcome.kind, 'startTls');
    assert.equal(hs.tls, false, 'TLS is on only once the session reports the TLS handshake done');
  });

  test('after tlsEstablished() LIST, INFO, STRUCTURED_REPLY, meta contexts and GO work', () => {
    const hs = machine({ tlsMode: 'require' });
    startTls(hs);
    assert.equal(hs.tls, true);
    assert.deepEqual(listed(hs.option(O.NBD_OPT_LIST, none)), ['disk', 'secret']);
    assert.equal(types(hs.option(O.NBD_OPT_INFO, encodeInfoRequest('disk', []))).at(-1), R.NBD_REP_ACK);
    assert.deepEqual(types(hs.option(O.NBD_OPT_STRUCTURED_REPLY, none)), [R.NBD_REP_ACK]);
    assert.deepEqual(types(hs.option(O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', [BASE_ALLOCATION]))), [
      R.NBD_REP_META_CONTEXT,
      R.NBD_REP_ACK,
    ]);
    const o = hs.option(O.NBD_OPT_GO, encodeInfoRequest('disk', [])).outcome;
    assert.ok(o.kind === 'transmission' && o.mode === MODE.STRUCTURED && o.metaSelected);
  });

  test('after tlsEstablished() EXPORT_NAME enters transmission', () => {
    const hs = machine({ tlsMode: 'require' });
    startTls(hs);
    const step = hs.option(O.NBD_OPT_EXPORT_NAME, Buffer.from('disk'));
    assert.equal(step.replies.length, 1);
    assert.equal(step.outcome.kind, 'transmission');
  });
});

describe("TLS refused ('off')", () => {
  test('STARTTLS is ERR_POLICY and the haggling goes on', () => {
    const hs = machine({ tlsMode: 'off' });
    const step = hs.option(O.NBD_OPT_STARTTLS, none);
    assert.deepEqual(types(step), [R.NBD_REP_ERR_POLICY]);
    assert.equal(step.outcome.kind, 'continue');
    assert.equal(hs.tls, false);
  });

  test('no option is ever answered ERR_TLS_REQD', () => {
    const hs = machine({ tlsMode: 'off' });
    for (const [, opt, data] of [...CLEAR_OPTIONS, ['STARTTLS', O.NBD_OPT_STARTTLS, none] as const]) {
      assert.ok(!types(hs.option(opt, data)).includes(R.NBD_REP_ERR_TLS_REQD), `option ${opt}`);
    }
  });
});

describe('STARTTLS errors', () => {
  for (const mode of ['on', 'require'] as const) {
    test(`STARTTLS with data is ERR_INVALID and does not start TLS ('${mode}')`, () => {
      const hs = machine({ tlsMode: mode });
      const step = hs.option(O.NBD_OPT_STARTTLS, Buffer.from('x'));
      assert.deepEqual(types(step), [R.NBD_REP_ERR_INVALID]);
      assert.equal(step.outcome.kind, 'continue');
      assert.equal(hs.option(O.NBD_OPT_STARTTLS, none).outcome.kind, 'startTls', 'a correct STARTTLS still works');
    });

    test(`STARTTLS after TLS is established is ERR_INVALID ('${mode}')`, () => {
      const hs = machine({ tlsMode: mode });
      startTls(hs);
      const step = hs.option(O.NBD_OPT_STARTTLS, none);
      assert.deepEqual(types(step), [R.NBD_REP_ERR_INVALID]);
      assert.equal(step.outcome.kind, 'continue');
    });
  }

  test("STARTTLS on 'on' is ACKed with outcome startTls", () => {
    const step = machine({ tlsMode: 'on' }).option(O.NBD_OPT_STARTTLS, none);
    assert.deepEqual(types(step), [R.NBD_REP_ACK]);
    assert.equal(step.outcome.kind, 'startTls');
  });
});

describe('tlsEstablished() forgets what was negotiated in clear', () => {
  test('structured replies and the base:allocation selection: GO after TLS is simple with nothing selected', () => {
    const hs = machine({ tlsMode: 'on' });
    assert.deepEqual(types(hs.option(O.NBD_OPT_STRUCTURED_REPLY, none)), [R.NBD_REP_ACK]);
    assert.deepEqual(types(hs.option(O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', [BASE_ALLOCATION]))), [
      R.NBD_REP_META_CONTEXT,
      R.NBD_REP_ACK,
    ]);
    startTls(hs);
    assert.equal(hs.mode, MODE.SIMPLE);
    const o = hs.option(O.NBD_OPT_GO, encodeInfoRequest('disk', [])).outcome;
    assert.equal(o.kind, 'transmission');
    if (o.kind !== 'transmission') return;
    assert.equal(o.mode, MODE.SIMPLE);
    assert.equal(o.metaSelected, false);
    assert.equal(o.flags & NBD_FLAG.NBD_FLAG_SEND_DF, 0, 'no DF without structured replies');
  });

  test('extended headers: after TLS the mode is simple, meta contexts need structured replies again, EXPORT_NAME is allowed', () => {
    const hs = machine({ tlsMode: 'on' });
    assert.deepEqual(types(hs.option(O.NBD_OPT_EXTENDED_HEADERS, none)), [R.NBD_REP_ACK]);
    startTls(hs);
    assert.equal(hs.mode, MODE.SIMPLE);
    assert.deepEqual(types(hs.option(O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', [BASE_ALLOCATION]))), [R.NBD_REP_ERR_INVALID]);
    assert.equal(hs.option(O.NBD_OPT_EXPORT_NAME, Buffer.from('disk')).outcome.kind, 'transmission');
  });

  test('extended headers can be negotiated afresh after TLS', () => {
    const hs = machine({ tlsMode: 'on' });
    hs.option(O.NBD_OPT_EXTENDED_HEADERS, none);
    startTls(hs);
    assert.deepEqual(types(hs.option(O.NBD_OPT_EXTENDED_HEADERS, none)), [R.NBD_REP_ACK]);
    const o = hs.option(O.NBD_OPT_GO, encodeInfoRequest('disk', [])).outcome;
    assert.ok(o.kind === 'transmission' && o.mode === MODE.EXTENDED);
  });

  test('a selection re-made after TLS holds', () => {
    const hs = machine({ tlsMode: 'on' });
    hs.option(O.NBD_OPT_STRUCTURED_REPLY, none);
    hs.option(O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', [BASE_ALLOCATION]));
    startTls(hs);
    hs.option(O.NBD_OPT_STRUCTURED_REPLY, none);
    hs.option(O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', [BASE_ALLOCATION]));
    const o = hs.option(O.NBD_OPT_GO, encodeInfoRequest('disk', [])).outcome;
    assert.ok(o.kind === 'transmission' && o.mode === MODE.STRUCTURED && o.metaSelected);
  });

  test('the client flags stay: EXPORT_NAME after TLS still omits the 124 zero bytes', () => {
    const hs = machine({ tlsMode: 'on' });
    startTls(hs);
    assert.equal(hs.option(O.NBD_OPT_EXPORT_NAME, Buffer.from('disk')).replies[0]!.length, 10);
  });
});

describe("an export access() calls TLS-only ('tls')", () => {
  test('LIST hides it and lists the others', () => {
    assert.deepEqual(listed(withSecret('tls').option(O.NBD_OPT_LIST, none)), ['disk']);
  });

  test('INFO and GO of it are ERR_TLS_REQD; GO of another export still works', () => {
    const hs = withSecret('tls');
    for (const opt of [O.NBD_OPT_INFO, O.NBD_OPT_GO]) {
      const step = hs.option(opt, encodeInfoRequest('secret', []));
      assert.deepEqual(replies(step).map((r) => [r.option, r.type]), [[opt, R.NBD_REP_ERR_TLS_REQD]]);
      assert.equal(step.outcome.kind, 'continue');
    }
    assert.equal(hs.option(O.NBD_OPT_GO, encodeInfoRequest('disk', [])).outcome.kind, 'transmission');
  });

  test('EXPORT_NAME of it hangs up without a reply', () => {
    const step = withSecret('tls').option(O.NBD_OPT_EXPORT_NAME, Buffer.from('secret'));
    assert.equal(step.replies.length, 0);
    assert.ok(step.outcome.kind === 'hangUp' && step.outcome.reason !== null && /TLS/.test(step.outcome.reason));
  });

  test('LIST_META_CONTEXT and SET_META_CONTEXT of it are ERR_POLICY, not ERR_TLS_REQD', () => {
    const hs = withSecret('tls');
    hs.option(O.NBD_OPT_STRUCTURED_REPLY, none);
    assert.deepEqual(types(hs.option(O.NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest('secret', []))), [R.NBD_REP_ERR_POLICY]);
    assert.deepEqual(types(hs.option(O.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('secret', [BASE_ALLOCATION]))), [R.NBD_REP_ERR_POLICY]);
  });

  test("on 'require' the listener's ERR_TLS_REQD comes first, even for an open export", () => {
    const hs = withSecret('tls', 'require');
    assert.deepEqual(types(hs.option(O.NBD_OPT_GO, encodeInfoRequest('disk', []))), [R.NBD_REP_ERR_TLS_REQD]);
  });
});

describe("an export access() refuses ('denied')", () => {
  test('LIST hides it', () => {
    assert.deepEqual(listed(withSecret('denied').option(O.NBD_OPT_LIST, none)), ['disk']);
  });

  test('INFO and GO of it are ERR_POLICY', () => {
    const hs = withSecret('denied');
    for (const opt of [O.NBD_OPT_INFO, O.NBD_OPT_GO]) {
      const step = hs.option(opt, encodeInfoRequest('secret', []));
      assert.deepEqual(replies(step).map((r) => [r.option, r.type]), [[opt, R.NBD_REP_ERR_POLICY]]);
      assert.equal(step.outcome.kind, 'continue');
    }
  });

  test('INFO and GO stay ERR_POLICY after TLS (the identity is not allowed)', () => {
    const hs = withSecret('denied');
    startTls(hs);
    assert.deepEqual(types(hs.option(O.NBD_OPT_GO, encodeInfoRequest('secret', []))), [R.NBD_REP_ERR_POLICY]);
    assert.deepEqual(listed(hs.option(O.NBD_OPT_LIST, none)), ['disk']);
  });

  test('EXPORT_NAME of it hangs up without a reply', () => {
    const step = withSecret('denied').option(O.NBD_OPT_EXPORT_NAME, Buffer.from('secret'));
    assert.equal(step.replies.length, 0);
    assert.equal(step.outcome.kind, 'hangUp');
  });

  test('an unknown export is still ERR_UNKNOWN, not ERR_POLICY', () => {
    assert.deepEqual(types(withSecret('denied').option(O.NBD_OPT_GO, encodeInfoRequest('nope', []))), [R.NBD_REP_ERR_UNKNOWN]);
  });
});

describe('access is asked each time', () => {
  test('an export that needs TLS opens once access() says ok after TLS', () => {
    let tlsOn = false;
    const hs = machine({ tlsMode: 'on', access: (exp) => (exp.name === 'secret' && !tlsOn ? 'tls' : 'ok') });
    assert.deepEqual(types(hs.option(O.NBD_OPT_GO, encodeInfoRequest('secret', []))), [R.NBD_REP_ERR_TLS_REQD]);
    hs.option(O.NBD_OPT_STARTTLS, none);
    tlsOn = true;
    hs.tlsEstablished();
    assert.deepEqual(listed(hs.option(O.NBD_OPT_LIST, none)), ['disk', 'secret']);
    const o = hs.option(O.NBD_OPT_GO, encodeInfoRequest('secret', [])).outcome;
    assert.ok(o.kind === 'transmission' && o.export === secret);
  });
});

describe('refusals for the log', () => {
  test('a TLS_REQD or POLICY refusal names the option and the reason; other replies carry none', () => {
    const forced = machine({ tlsMode: 'require' });
    assert.equal(forced.option(O.NBD_OPT_LIST, none).refused, 'NBD_OPT_LIST refused: TLS is required: send NBD_OPT_STARTTLS first');
    const denied = withSecret('denied');
    assert.equal(denied.option(O.NBD_OPT_GO, encodeInfoRequest('secret', [])).refused, "NBD_OPT_GO refused: export 'secret' is not allowed to this client");
    assert.equal(denied.option(O.NBD_OPT_LIST, none).refused, null);
    assert.equal(denied.option(O.NBD_OPT_GO, encodeInfoRequest('nope', [])).refused, null, 'an unknown export is not a policy refusal');
  });
});
