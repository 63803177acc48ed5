/**
 * Fixed-newstyle handshake edge cases, byte by byte: what the server must close on,
 * what it must answer with an error while negotiation goes on, and the limits that bound
 * what a peer can make it hold (option length, option count, handshake time).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BASE_ALLOCATION,
  NBD_CLIENT_FLAG,
  NBD_CMD,
  NBD_FLAG,
  NBD_INFO,
  NBD_OPT,
  NBD_REP,
  NBD_SIZE,
} from '../../src/nbd/constants.js';
import { encodeGreeting, encodeInfoRequest, encodeMetaContextRequest, encodeOption, readU64 } from '../../src/nbd/codec.js';
import { NBD_ERROR } from '../../src/errors/index.js';
import { RawClient } from '../helpers/raw-client.js';
import { startServer, type CaptiveServer } from '../helpers/server.js';
import { expectOk } from './helpers.js';

const O = NBD_OPT;
const R = NBD_REP;
const FIXED = NBD_CLIENT_FLAG.NBD_FLAG_C_FIXED_NEWSTYLE;
const NO_ZEROES = NBD_CLIENT_FLAG.NBD_FLAG_C_NO_ZEROES;

const MAX_OPTION_LENGTH = 1024;
const MAX_OPTIONS = 20;
const DISK_SIZE = 1024 * 1024;

let srv: CaptiveServer;

before(async () => {
  srv = await startServer(
    [
      { name: 'disk', description: 'the test disk', backend: { type: 'memory', size: DISK_SIZE } },
      { name: 'other', backend: { type: 'memory', size: 4096 } },
    ],
    { maxOptionLength: MAX_OPTION_LENGTH, maxOptions: MAX_OPTIONS },
  );
});
after(() => srv.close());

async function greeted(flags: number = FIXED | NO_ZEROES): Promise<RawClient> {
  const c = await RawClient.connect(srv.socket);
  await c.greet(flags);
  return c;
}

/** The reply types of one option, in order. */
async function types(c: RawClient, opt: number, data?: Buffer): Promise<number[]> {
  return (await c.option(opt, data)).map((r) => r.type);
}

/** GO for `name` must succeed and a FLUSH must work afterwards: negotiation really continued. */
async function goAndFlush(c: RawClient, name = 'disk'): Promise<void> {
  await c.expectAck(O.NBD_OPT_GO, encodeInfoRequest(name, []));
  c.request(0, NBD_CMD.NBD_CMD_FLUSH, 77n, 0, 0);
  await expectOk(c, 77n);
  c.close();
}

describe('greeting and client flags', () => {
  test('the greeting is NBDMAGIC, IHAVEOPT and FIXED_NEWSTYLE|NO_ZEROES, 18 bytes exactly', async () => {
    const c = await RawClient.connect(srv.socket);
    const g = await c.read(NBD_SIZE.GREETING);
    assert.deepEqual(g, Buffer.from('4e42444d41474943' + '49484156454f5054' + '0003', 'hex'));
    assert.deepEqual(g, encodeGreeting(0x0003));
    c.close();
  });

  test('unknown client flags close the connection', async () => {
    const c = await greeted(FIXED | NO_ZEROES | 0x4);
    assert.equal(await c.closedByServer(), true);
  });

  test('client flags without FIXED_NEWSTYLE (plain newstyle) are served: EXPORT_NAME works', async () => {
    for (const [flags, replyLength] of [[0, 134], [NO_ZEROES, 10]] as const) {
      const c = await greeted(flags);
      c.write(encodeOption(O.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
      const r = await c.read(replyLength);
      assert.equal(readU64(r, 0), DISK_SIZE);
      c.request(0, NBD_CMD.NBD_CMD_FLUSH, 3n, 0, 0);
      await expectOk(c, 3n);
      c.close();
    }
  });

  test('a bad option magic closes the connection', async () => {
    const c = await greeted();
    const opt = encodeOption(O.NBD_OPT_LIST);
    opt.writeUInt8(opt.readUInt8(0) ^ 0xff, 0);
    c.write(opt);
    assert.equal(await c.closedByServer(), true);
  });
});

describe('option errors that keep negotiation going', () => {
  test('an unknown option gets ERR_UNSUP, then GO works', async () => {
    const c = await greeted();
    assert.deepEqual(await types(c, 99, Buffer.from('whatever')), [R.NBD_REP_ERR_UNSUP]);
    assert.deepEqual(await types(c, O.NBD_OPT_PEEK_EXPORT), [R.NBD_REP_ERR_UNSUP]);
    await goAndFlush(c);
  });

  test('LIST lists every export with its description; LIST with data gets ERR_INVALID', async () => {
    const c = await greeted();
    assert.deepEqual(await types(c, O.NBD_OPT_LIST, Buffer.from('x')), [R.NBD_REP_ERR_INVALID]);
    const r = await c.option(O.NBD_OPT_LIST);
    assert.deepEqual(r.map((x) => x.type), [R.NBD_REP_SERVER, R.NBD_REP_SERVER, R.NBD_REP_ACK]);
    const servers = r.slice(0, 2).map((x) => {
      const n = x.data.readUInt32BE(0);
      return [x.data.subarray(4, 4 + n).toString(), x.data.subarray(4 + n).toString()];
    });
    assert.deepEqual(servers[0], ['disk', 'the test disk']);
    assert.equal(servers[1]![0], 'other');
    await goAndFlush(c);
  });

  test('INFO and GO with malformed data get ERR_INVALID', async () => {
    const c = await greeted();
    const good = encodeInfoRequest('disk', [NBD_INFO.NBD_INFO_NAME]);
    const malformed: [string, Buffer][] = [
      ['shorter than 6 bytes', Buffer.from([0, 0, 0])],
      ['name length past the end', (() => { const b = Buffer.from(good); b.writeUInt32BE(1000, 0); return b; })()],
      ['info count does not match', (() => { const b = Buffer.from(good); b.writeUInt16BE(5, 8); return b; })()],
      ['trailing byte', Buffer.concat([good, Buffer.from([0])])],
      ['name with a NUL byte', encodeInfoRequest('di\0sk', [])],
      ['name not UTF-8', Buffer.from([0, 0, 0, 2, 0xc3, 0x28, 0, 0])],
    ];
    for (const opt of [O.NBD_OPT_INFO, O.NBD_OPT_GO]) {
      for (const [what, data] of malformed) {
        assert.deepEqual(await types(c, opt, data), [R.NBD_REP_ERR_INVALID], `${opt}: ${what}`);
      }
    }
    await goAndFlush(c);
  });

  test('INFO answers EXPORT (size, flags), NAME, DESCRIPTION and BLOCK_SIZE, then ACK, staying in the handshake', async () => {
    const c = await greeted();
    const r = await c.expectAck(
      O.NBD_OPT_INFO,
      encodeInfoRequest('disk', [NBD_INFO.NBD_INFO_NAME, NBD_INFO.NBD_INFO_DESCRIPTION, NBD_INFO.NBD_INFO_BLOCK_SIZE]),
    );
    const infos = new Map(r.filter((x) => x.type === R.NBD_REP_INFO).map((x) => [x.data.readUInt16BE(0), x.data]));
    const exp = infos.get(NBD_INFO.NBD_INFO_EXPORT)!;
    assert.equal(exp.length, 12);
    assert.equal(readU64(exp, 2), DISK_SIZE);
    assert.ok(exp.readUInt16BE(10) & NBD_FLAG.NBD_FLAG_HAS_FLAGS);
    assert.equal(exp.readUInt16BE(10) & NBD_FLAG.NBD_FLAG_SEND_DF, 0, 'no DF without structured replies');
    assert.equal(infos.get(NBD_INFO.NBD_INFO_NAME)!.subarray(2).toString(), 'disk');
    assert.equal(infos.get(NBD_INFO.NBD_INFO_DESCRIPTION)!.subarray(2).toString(), 'the test disk');
    assert.equal(infos.get(NBD_INFO.NBD_INFO_BLOCK_SIZE)!.length, 14);
    await goAndFlush(c);
  });

  test('GO for an unknown export gets ERR_UNKNOWN', async () => {
    const c = await greeted();
    assert.deepEqual(await types(c, O.NBD_OPT_GO, encodeInfoRequest('nope', [])), [R.NBD_REP_ERR_UNKNOWN]);
    assert.deepEqual(await types(c, O.NBD_OPT_INFO, encodeInfoRequest('nope', [])), [R.NBD_REP_ERR_UNKNOWN]);
    await goAndFlush(c, 'other');
  });

  test('GO for the empty name selects the default export', async () => {
    const c = await greeted();
    const r = await c.expectAck(O.NBD_OPT_GO, encodeInfoRequest('', []));
    const exp = r.find((x) => x.type === R.NBD_REP_INFO && x.data.readUInt16BE(0) === NBD_INFO.NBD_INFO_EXPORT)!;
    assert.equal(readU64(exp.data, 2), DISK_SIZE);
    c.close();
  });

  test('STARTTLS gets ERR_POLICY (no TLS configured)', async () => {
    const c = await greeted();
    assert.deepEqual(await types(c, O.NBD_OPT_STARTTLS), [R.NBD_REP_ERR_POLICY]);
    await goAndFlush(c);
  });

  test('STRUCTURED_REPLY twice: ACK, then ERR_INVALID', async () => {
    const c = await greeted();
    assert.deepEqual(await types(c, O.NBD_OPT_STRUCTURED_REPLY), [R.NBD_REP_ACK]);
    assert.deepEqual(await types(c, O.NBD_OPT_STRUCTURED_REPLY), [R.NBD_REP_ERR_INVALID]);
    assert.deepEqual(await types(c, O.NBD_OPT_STRUCTURED_REPLY, Buffer.from('x')), [R.NBD_REP_ERR_INVALID]);
    await goAndFlush(c);
  });

  test('SET_META_CONTEXT and LIST_META_CONTEXT before STRUCTURED_REPLY get ERR_INVALID', async () => {
    const c = await greeted();
    const q = encodeMetaContextRequest('disk', [BASE_ALLOCATION]);
    assert.deepEqual(await types(c, O.NBD_OPT_SET_META_CONTEXT, q), [R.NBD_REP_ERR_INVALID]);
    assert.deepEqual(await types(c, O.NBD_OPT_LIST_META_CONTEXT, q), [R.NBD_REP_ERR_INVALID]);
    await goAndFlush(c);
  });
});

describe('metadata contexts', () => {
  /** Context names (and ids) of a LIST/SET reply that ended in ACK. */
  async function contexts(c: RawClient, opt: number, queries: string[], name = 'disk'): Promise<[number, string][]> {
    const r = await c.expectAck(opt, encodeMetaContextRequest(name, queries));
    return r.filter((x) => x.type === R.NBD_REP_META_CONTEXT).map((x) => [x.data.readUInt32BE(0), x.data.subarray(4).toString()]);
  }

  test('LIST_META_CONTEXT with no queries lists base:allocation', async () => {
    const c = await greeted();
    await c.expectAck(O.NBD_OPT_STRUCTURED_REPLY);
    assert.deepEqual(await contexts(c, O.NBD_OPT_LIST_META_CONTEXT, []), [[0, BASE_ALLOCATION]]);
    c.close();
  });

  test('LIST_META_CONTEXT with "base:" lists base:allocation; unknown namespaces and leaves are ignored', async () => {
    const c = await greeted();
    await c.expectAck(O.NBD_OPT_STRUCTURED_REPLY);
    assert.deepEqual(await contexts(c, O.NBD_OPT_LIST_META_CONTEXT, ['base:']), [[0, BASE_ALLOCATION]]);
    assert.deepEqual(await contexts(c, O.NBD_OPT_LIST_META_CONTEXT, ['x-foo:bar', 'qemu:dirty-bitmap:a', 'base:nothing']), []);
    assert.deepEqual(
      await contexts(c, O.NBD_OPT_LIST_META_CONTEXT, ['x-foo:bar', BASE_ALLOCATION]),
      [[0, BASE_ALLOCATION]],
    );
    c.close();
  });

  test('SET_META_CONTEXT selects base:allocation with a non-zero id and ignores "base:" and unknown names', async () => {
    const c = await greeted();
    await c.expectAck(O.NBD_OPT_STRUCTURED_REPLY);
    assert.deepEqual(await contexts(c, O.NBD_OPT_SET_META_CONTEXT, ['base:', 'x-foo:bar']), []);
    const set = await contexts(c, O.NBD_OPT_SET_META_CONTEXT, ['x-foo:bar', BASE_ALLOCATION]);
    assert.equal(set.length, 1);
    assert.equal(set[0]![1], BASE_ALLOCATION);
    assert.notEqual(set[0]![0], 0);
    c.close();
  });

  test('meta context options with malformed data get ERR_INVALID; an unknown export gets ERR_UNKNOWN', async () => {
    const c = await greeted();
    await c.expectAck(O.NBD_OPT_STRUCTURED_REPLY);
    const q = encodeMetaContextRequest('disk', [BASE_ALLOCATION]);
    const bad = Buffer.from(q);
    bad.writeUInt32BE(99, 8); // query count larger than the data holds
    for (const opt of [O.NBD_OPT_LIST_META_CONTEXT, O.NBD_OPT_SET_META_CONTEXT]) {
      assert.deepEqual(await types(c, opt, bad), [R.NBD_REP_ERR_INVALID]);
      assert.deepEqual(await types(c, opt, q.subarray(0, 5)), [R.NBD_REP_ERR_INVALID]);
      assert.deepEqual(await types(c, opt, encodeMetaContextRequest('nope', [BASE_ALLOCATION])), [R.NBD_REP_ERR_UNKNOWN]);
    }
    await goAndFlush(c);
  });
});

describe('handshake limits', () => {
  test('option data longer than maxOptionLength is skipped with ERR_TOO_BIG and negotiation continues', async () => {
    const c = await greeted();
    // Bytes that would parse as an option header if the server did not skip them.
    const data = Buffer.alloc(MAX_OPTION_LENGTH + 1);
    for (let i = 0; i + 16 <= data.length; i += 16) encodeOption(O.NBD_OPT_ABORT).copy(data, i);
    assert.deepEqual(await types(c, O.NBD_OPT_GO, data), [R.NBD_REP_ERR_TOO_BIG]);
    await goAndFlush(c);
  });

  test('option data of exactly maxOptionLength is read and answered', async () => {
    const c = await greeted();
    assert.deepEqual(await types(c, 99, Buffer.alloc(MAX_OPTION_LENGTH)), [R.NBD_REP_ERR_UNSUP]);
    await goAndFlush(c);
  });

  test('more than maxOptions options close the connection', async () => {
    const c = await greeted();
    for (let i = 0; i < MAX_OPTIONS; i++) assert.deepEqual(await types(c, 99), [R.NBD_REP_ERR_UNSUP]);
    c.write(encodeOption(99));
    assert.equal(await c.closedByServer(), true);
  });

  test('maxOptions counts every option: the last allowed one may still be GO', async () => {
    const c = await greeted();
    for (let i = 0; i < MAX_OPTIONS - 1; i++) await c.option(O.NBD_OPT_LIST);
    await goAndFlush(c);
  });

  test('a handshake not finished within handshakeTimeoutMs is closed; a finished one is not', async () => {
    const quick = await startServer([{ name: 'd', backend: { type: 'memory', size: 4096 } }], { handshakeTimeoutMs: 100 });
    try {
      const idle = await RawClient.connect(quick.socket);
      const done = await RawClient.connect(quick.socket);
      await done.handshake('d');
      await idle.greet();
      assert.equal(await idle.closedByServer(), true);
      // The finished handshake outlived the timeout and still serves.
      done.request(0, NBD_CMD.NBD_CMD_FLUSH, 1n, 0, 0);
      await expectOk(done, 1n);
      done.close();
    } finally {
      await quick.close();
    }
  });
});

describe('EXPORT_NAME and ABORT', () => {
  function exportName(name: string): Buffer {
    return encodeOption(O.NBD_OPT_EXPORT_NAME, Buffer.from(name));
  }

  test('EXPORT_NAME without NO_ZEROES: 134 bytes (size, flags, 124 zeroes), then transmission', async () => {
    const c = await greeted(FIXED);
    c.write(exportName('disk'));
    const r = await c.read(NBD_SIZE.EXPORT_NAME_REPLY + NBD_SIZE.EXPORT_NAME_ZEROES);
    assert.equal(readU64(r, 0), DISK_SIZE);
    assert.ok(r.readUInt16BE(8) & NBD_FLAG.NBD_FLAG_HAS_FLAGS);
    assert.ok(r.subarray(10).equals(Buffer.alloc(124)));
    c.request(0, NBD_CMD.NBD_CMD_FLUSH, 5n, 0, 0);
    await expectOk(c, 5n);
    c.close();
  });

  test('EXPORT_NAME with NO_ZEROES: 10 bytes, and the next bytes are the first reply', async () => {
    const c = await greeted(FIXED | NO_ZEROES);
    c.write(exportName('other'));
    const r = await c.read(NBD_SIZE.EXPORT_NAME_REPLY);
    assert.equal(readU64(r, 0), 4096);
    c.request(0, NBD_CMD.NBD_CMD_READ, 6n, 0, 16);
    const reply = await c.read(NBD_SIZE.SIMPLE_REPLY);
    assert.equal(reply.readUInt32BE(0), 0x67446698, 'simple reply magic right after the 10 bytes');
    assert.equal(reply.readUInt32BE(4), NBD_ERROR.NBD_SUCCESS);
    assert.equal(reply.readBigUInt64BE(8), 6n);
    c.close();
  });

  test('EXPORT_NAME of an unknown export closes the connection', async () => {
    const c = await greeted();
    c.write(exportName('nope'));
    assert.equal(await c.closedByServer(), true);
  });

  test('ABORT is acknowledged, then the server closes', async () => {
    const c = await greeted();
    assert.deepEqual(await types(c, O.NBD_OPT_ABORT), [R.NBD_REP_ACK]);
    assert.equal(await c.closedByServer(), true);
  });

  test('bytes after ABORT are ignored', async () => {
    const c = await greeted();
    c.write(Buffer.concat([encodeOption(O.NBD_OPT_ABORT), encodeOption(O.NBD_OPT_LIST)]));
    assert.deepEqual((await c.optionReplies(O.NBD_OPT_ABORT)).map((x) => x.type), [R.NBD_REP_ACK]);
    assert.equal(await c.closedByServer(), true);
  });
});
