/**
 * A deliberately low-level NBD client for protocol tests: it sends exactly the bytes a
 * test asks for (valid or not) and reads replies byte-exactly, so tests can check what
 * a real client cannot provoke (extended headers, malformed options, garbage).
 */
import net from 'node:net';
import {
  NBD_CLIENT_FLAG,
  NBD_OPT,
  NBD_REP,
  NBD_SIZE,
} from '../../src/nbd/constants.js';
import {
  decodeOptionReplyHeader,
  decodeReplyHeader,
  encodeInfoRequest,
  encodeOption,
  encodeRequest,
  type ReplyHeader,
} from '../../src/nbd/codec.js';
import { BYTE_TIMEOUT_MS, ByteSocket } from './byte-socket.js';

/** How long a raw test waits for bytes before failing (a hang is a test failure, not a stuck run). */
export const RAW_TIMEOUT_MS = BYTE_TIMEOUT_MS;

export class RawClient extends ByteSocket {
  private constructor(socket: net.Socket) {
    super(socket);
  }

  static connect(path: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path, () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  /** Resolves true when the server has closed the connection, false on timeout. */
  closedByServer(timeoutMs = RAW_TIMEOUT_MS): Promise<boolean> {
    return this.closed(timeoutMs);
  }

  /** Reads the 18-byte greeting and sends client flags (fixed newstyle, no zeroes by default). */
  async greet(flags = NBD_CLIENT_FLAG.NBD_FLAG_C_FIXED_NEWSTYLE | NBD_CLIENT_FLAG.NBD_FLAG_C_NO_ZEROES): Promise<Buffer> {
    const g = await this.read(NBD_SIZE.GREETING);
    const f = Buffer.alloc(4);
    f.writeUInt32BE(flags, 0);
    this.write(f);
    return g;
  }

  /** Sends an option and collects replies until a final one (ACK or error). */
  async option(opt: number, data?: Buffer): Promise<{ type: number; data: Buffer }[]> {
    this.write(encodeOption(opt, data));
    return this.optionReplies(opt);
  }

  async optionReplies(opt: number): Promise<{ type: number; data: Buffer }[]> {
    const replies: { type: number; data: Buffer }[] = [];
    for (;;) {
      const h = decodeOptionReplyHeader(await this.read(NBD_SIZE.OPTION_REPLY_HEADER));
      if (!h.magicOk || h.option !== opt) throw new Error(`bad option reply header for option ${opt}`);
      const data = await this.read(h.length);
      replies.push({ type: h.type, data });
      if (h.type === NBD_REP.NBD_REP_ACK || h.type >= 0x80000000) return replies;
    }
  }

  /** Greets and negotiates GO for an export, with optional SR / extended headers first. */
  async handshake(name = '', opts: { structured?: boolean; extended?: boolean; meta?: boolean } = {}): Promise<void> {
    await this.greet();
    if (opts.extended) await this.expectAck(NBD_OPT.NBD_OPT_EXTENDED_HEADERS);
    else if (opts.structured) await this.expectAck(NBD_OPT.NBD_OPT_STRUCTURED_REPLY);
    if (opts.meta) {
      const { encodeMetaContextRequest } = await import('../../src/nbd/codec.js');
      await this.expectAck(NBD_OPT.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest(name, ['base:allocation']));
    }
    await this.expectAck(NBD_OPT.NBD_OPT_GO, encodeInfoRequest(name, []));
  }

  async expectAck(opt: number, data?: Buffer): Promise<{ type: number; data: Buffer }[]> {
    const r = await this.option(opt, data);
    const last = r[r.length - 1]!;
    if (last.type !== NBD_REP.NBD_REP_ACK) throw new Error(`option ${opt} failed: 0x${last.type.toString(16)} ${last.data.toString()}`);
    return r;
  }

  request(flags: number, type: number, cookie: bigint, offset: number, length: number, extended = false, payload?: Buffer): void {
    this.write(encodeRequest(flags, type, cookie, offset, length, extended));
    if (payload) this.write(payload);
  }

  /** Reads one reply header (any form) and its payload. */
  async reply(): Promise<{ h: ReplyHeader; payload: Buffer }> {
    const first = await this.read(4);
    const magic = first.readUInt32BE(0);
    const size = magic === 0x67446698 ? 16 : magic === 0x668e33ef ? 20 : magic === 0x6e8a278c ? 32 : 0;
    if (size === 0) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
    const rest = await this.read(size - 4);
    const h = decodeReplyHeader(Buffer.concat([first, rest]));
    const payload = h.kind === 'simple' ? Buffer.alloc(0) : await this.read(h.length);
    return { h, payload };
  }

  close(): void {
    this.destroy();
  }
}
