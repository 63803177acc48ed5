/**
 * Shared pieces of the raw-socket server tests: a server over hand-built exports (so a
 * test can put its own device under a session), a device whose calls wait until the
 * test lets them go, and reply readers that understand all three reply forms.
 */
import fs from 'node:fs';
import { Writable } from 'node:stream';
import pino, { type Logger } from 'pino';
import os from 'node:os';
import path from 'node:path';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { FilterDevice, type BlockDevice, type Extent } from '../../src/device/index.js';
import { NbdServer, type ServerLimits } from '../../src/nbd/index.js';
import { Export } from '../../src/export/index.js';
import { NBD_REPLY_FLAG, NBD_REPLY_TYPE } from '../../src/nbd/constants.js';
import { readU64, type ReplyHeader } from '../../src/nbd/codec.js';
import { RAW_TIMEOUT_MS, RawClient } from '../helpers/raw-client.js';

export type Mode = 'simple' | 'structured' | 'extended';

export interface DirectServer {
  readonly server: NbdServer;
  readonly socket: string;
  close(): Promise<void>;
}

/** Serves ready-made exports on a private unix socket; `close` also closes their devices. */
export async function serveExports(exports: Export[], limits?: Partial<ServerLimits>, logger?: Logger): Promise<DirectServer> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-server-test-'));
  const socket = path.join(dir, 'nbd.sock');
  const server = new NbdServer({ exports, ...(limits ? { limits } : {}), ...(logger ? { logger } : {}) });
  await server.listen({ path: socket });
  return {
    server,
    socket,
    async close() {
      await server.close(2000);
      await Promise.all(exports.map((e) => e.device.close().catch(() => undefined)));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * A pino logger at `level` whose JSON lines are kept as they were written (`raw`) and
 * parsed (`lines`), for tests of what the server logs.
 */
export function capturingLogger(level = 'debug'): { logger: Logger; raw: string[]; lines: () => Record<string, unknown>[] } {
  const raw: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      raw.push(...chunk.toString('utf8').split('\n').filter((l) => l !== ''));
      done();
    },
  });
  return { logger: pino({ level }, sink), raw, lines: () => raw.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

/** Connects and negotiates GO in the given reply mode (with base:allocation if `meta`). */
export async function connect(socket: string, mode: Mode, name = '', meta = false): Promise<RawClient> {
  const c = await RawClient.connect(socket);
  await c.handshake(name, { structured: mode === 'structured', extended: mode === 'extended', meta });
  return c;
}

/** Deterministic non-zero test data. */
export function pattern(length: number, seed = 1): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = ((i * 31 + seed * 17) % 251) + 1;
  return b;
}

export interface Chunk {
  readonly h: ReplyHeader;
  readonly payload: Buffer;
}

/** Every reply piece of one request: a simple reply, or chunks up to the one marked DONE. */
export async function readReply(c: RawClient): Promise<Chunk[]> {
  const first = await c.reply();
  if (first.h.kind === 'simple' || first.h.flags & NBD_REPLY_FLAG.NBD_REPLY_FLAG_DONE) return [first];
  const chunks = [first];
  for (;;) {
    const next = await c.reply();
    if (next.h.cookie !== first.h.cookie) throw new Error('chunks of different requests interleaved');
    chunks.push(next);
    if (next.h.flags & NBD_REPLY_FLAG.NBD_REPLY_FLAG_DONE) return chunks;
  }
}

/** The fields of an ERROR / ERROR_OFFSET chunk payload. */
export interface ErrorPayload {
  readonly errno: number;
  readonly message: string;
  readonly offset?: number;
}

export function decodeErrorPayload(type: number, payload: Buffer): ErrorPayload {
  const errno = payload.readUInt32BE(0);
  const len = payload.readUInt16BE(4);
  const message = payload.subarray(6, 6 + len).toString('utf8');
  if (type === NBD_REPLY_TYPE.NBD_REPLY_TYPE_ERROR_OFFSET) {
    return { errno, message, offset: readU64(payload, 6 + len) };
  }
  if (payload.length !== 6 + len) throw new Error(`ERROR payload of ${payload.length} bytes for a ${len}-byte message`);
  return { errno, message };
}

/** Expects a successful reply without data (simple reply, or a NONE chunk) for `cookie`. */
export async function expectOk(c: RawClient, cookie: bigint): Promise<Chunk[]> {
  const r = await readReply(c);
  const last = r[r.length - 1]!;
  if (last.h.cookie !== cookie) throw new Error(`reply for cookie ${last.h.cookie}, expected ${cookie}`);
  if (last.h.kind === 'simple') {
    if (last.h.error !== 0) throw new Error(`request ${cookie} failed with error ${last.h.error}`);
  } else if (last.h.type !== NBD_REPLY_TYPE.NBD_REPLY_TYPE_NONE) {
    const detail = last.h.type & 0x8000 ? decodeErrorPayload(last.h.type, last.payload).message : '';
    throw new Error(`request ${cookie}: chunk type ${last.h.type} ${detail}`);
  }
  return r;
}

/**
 * Expects an error reply for `cookie` with NBD error `errno`: a simple reply, or one
 * ERROR chunk marked DONE. Returns the structured message ('' for simple replies).
 */
export async function expectError(c: RawClient, cookie: bigint, errno: number): Promise<{ message: string; h: ReplyHeader }> {
  const r = await readReply(c);
  if (r.length !== 1) throw new Error(`error reply in ${r.length} chunks`);
  const { h, payload } = r[0]!;
  if (h.cookie !== cookie) throw new Error(`reply for cookie ${h.cookie}, expected ${cookie}`);
  if (h.kind === 'simple') {
    if (h.error !== errno) throw new Error(`error ${h.error}, expected ${errno}`);
    return { message: '', h };
  }
  if (h.type !== NBD_REPLY_TYPE.NBD_REPLY_TYPE_ERROR && h.type !== NBD_REPLY_TYPE.NBD_REPLY_TYPE_ERROR_OFFSET) {
    throw new Error(`chunk type ${h.type}, expected an error chunk`);
  }
  const e = decodeErrorPayload(h.type, payload);
  if (e.errno !== errno) throw new Error(`error ${e.errno} (${e.message}), expected ${errno}`);
  return { message: e.message, h };
}

/** Data of a successful READ reply in any mode, checked to tile [offset, offset+length). */
export async function readData(c: RawClient, cookie: bigint, offset: number, length: number, mode: Mode): Promise<Buffer> {
  if (mode === 'simple') {
    const r = await c.reply();
    if (r.h.cookie !== cookie || r.h.error !== 0) throw new Error(`READ ${cookie}: error ${r.h.error}`);
    return Buffer.from(await c.read(length));
  }
  return assembleRead(await readReply(c), cookie, offset, length);
}

/** Puts OFFSET_DATA / OFFSET_HOLE chunks together, checking they tile the range exactly. */
export function assembleRead(chunks: Chunk[], cookie: bigint, offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  const pieces: { at: number; len: number }[] = [];
  for (const { h, payload } of chunks) {
    if (h.cookie !== cookie) throw new Error(`chunk for cookie ${h.cookie}, expected ${cookie}`);
    if (h.type === NBD_REPLY_TYPE.NBD_REPLY_TYPE_OFFSET_DATA) {
      const at = readU64(payload, 0);
      const data = payload.subarray(8);
      data.copy(out, at - offset);
      pieces.push({ at, len: data.length });
    } else if (h.type === NBD_REPLY_TYPE.NBD_REPLY_TYPE_OFFSET_HOLE) {
      const at = readU64(payload, 0);
      pieces.push({ at, len: payload.readUInt32BE(8) });
    } else if (h.type !== NBD_REPLY_TYPE.NBD_REPLY_TYPE_NONE) {
      throw new Error(`unexpected chunk type ${h.type} in a READ reply`);
    }
  }
  pieces.sort((a, b) => a.at - b.at);
  let at = offset;
  for (const p of pieces) {
    if (p.at !== at || p.len <= 0) throw new Error(`READ chunks do not tile the range: piece at ${p.at}, expected ${at}`);
    at += p.len;
  }
  if (at !== offset + length) throw new Error(`READ chunks end at ${at}, expected ${offset + length}`);
  return out;
}

/** Resolves when `cond` holds, checking once per event-loop turn; rejects after RAW_TIMEOUT_MS. */
export async function until(cond: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + RAW_TIMEOUT_MS;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await nextTurn();
  }
}

type Op = 'read' | 'write' | 'flush' | 'trim' | 'zero' | 'extents' | 'cache';

/**
 * A filter whose calls wait at a gate the test controls: calls matching the hold
 * predicate queue up until released. It also counts calls inside the device at once,
 * so tests can check how many requests the server lets run concurrently.
 */
export class GatedDevice extends FilterDevice {
  #hold: (op: Op, offset: number) => boolean = () => false;
  readonly #waiting: { op: Op; offset: number; go: () => void }[] = [];
  /** Calls currently inside the device (waiting at the gate or running). */
  active = 0;
  /** The most calls ever inside the device at once. */
  maxActive = 0;
  /** Calls that entered, by operation. */
  readonly calls = new Map<Op, number>();

  constructor(next: BlockDevice) {
    super(next);
  }

  /** Calls for which `pred` is true wait from now on until released. */
  hold(pred: (op: Op, offset: number) => boolean = () => true): void {
    this.#hold = pred;
  }

  /** Calls waiting at the gate. */
  get waiting(): number {
    return this.#waiting.length;
  }

  /** Releases the waiting calls (all, or the first `n`), and stops holding new ones if `open`. */
  release(n = Infinity, open = false): void {
    if (open) this.#hold = () => false;
    const go = this.#waiting.splice(0, Math.min(n, this.#waiting.length));
    for (const w of go) w.go();
  }

  async #gate<T>(op: Op, offset: number, run: () => Promise<T>): Promise<T> {
    this.active++;
    this.maxActive = Math.max(this.maxActive, this.active);
    this.calls.set(op, (this.calls.get(op) ?? 0) + 1);
    try {
      if (this.#hold(op, offset)) await new Promise<void>((go) => this.#waiting.push({ op, offset, go }));
      return await run();
    } finally {
      this.active--;
    }
  }

  override read(buf: Buffer, offset: number, flags: number): Promise<void> {
    return this.#gate('read', offset, () => super.read(buf, offset, flags));
  }
  override write(data: Buffer, offset: number, flags: number): Promise<void> {
    return this.#gate('write', offset, () => super.write(data, offset, flags));
  }
  override flush(flags: number): Promise<void> {
    return this.#gate('flush', 0, () => super.flush(flags));
  }
  override trim(offset: number, length: number, flags: number): Promise<void> {
    return this.#gate('trim', offset, () => super.trim(offset, length, flags));
  }
  override zero(offset: number, length: number, flags: number): Promise<void> {
    return this.#gate('zero', offset, () => super.zero(offset, length, flags));
  }
  override extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    return this.#gate('extents', offset, () => super.extents(offset, length, flags));
  }
  override cache(offset: number, length: number, flags: number): Promise<void> {
    return this.#gate('cache', offset, () => super.cache(offset, length, flags));
  }
}
