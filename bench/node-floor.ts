/**
 * The Node.js floor: the least an NBD server written for Node.js can do per request, as
 * a reference column in `npm run bench` (next to nbdkit null, its C counterpart).
 *
 * No device, no validation, no promises, no logging: fixed-newstyle handshake answering
 * only NBD_OPT_GO and NBD_OPT_EXPORT_NAME (anything else NBD_REP_ERR_UNSUP, so clients
 * fall back to simple replies), then simple replies, one socket write (or corked pair)
 * each: READ gets zeroes from one preallocated buffer, WRITE is answered once its payload
 * has been skipped, every other command succeeds, DISC closes. Whatever blockgate spends above this column is
 * its own; what this column spends above nbdkit null is the runtime's.
 *
 *   node --import tsx bench/node-floor.ts PORT SIZE
 *
 * A benchmark tool only: it trusts its client and is never part of blockgate.
 */
import net from 'node:net';

const port = Number(process.argv[2]);
const size = BigInt(process.argv[3] ?? 2 ** 30);
/** Largest READ answered (the benchmark's requests are 256 KiB at most). */
const MAX_READ = 32 * 1024 * 1024;
const zeroes = Buffer.alloc(MAX_READ);

const OPT_MAGIC = 0x3e889045565a9n;
const NBD_OPT_EXPORT_NAME = 1;
const NBD_OPT_GO = 7;
const NBD_REP_ACK = 1;
const NBD_REP_INFO = 3;
const NBD_REP_ERR_UNSUP = 0x80000001;
const FLAGS = 1 | 4 | 8; // HAS_FLAGS | SEND_FLUSH | SEND_FUA

function serve(s: net.Socket): void {
  s.setNoDelay(true);
  const greeting = Buffer.alloc(18);
  greeting.write('NBDMAGICIHAVEOPT');
  greeting.writeUInt16BE(3, 16); // FIXED_NEWSTYLE | NO_ZEROES
  s.write(greeting);
  // Parser state: bytes of the current header gathered in `head`, payload bytes to skip.
  const head = Buffer.alloc(28);
  let fill = 0;
  let phase: 'flags' | 'option' | 'request' = 'flags';
  let skip = 0;
  let option = 0;
  /** A WRITE's reply, sent once its payload has been read (a client may not expect it earlier). */
  let afterPayload: Buffer | null = null;

  const optionReply = (type: number, data: Buffer): void => {
    const h = Buffer.alloc(20 + data.length);
    h.writeBigUInt64BE(OPT_MAGIC, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(type, 12);
    h.writeUInt32BE(data.length, 16);
    data.copy(h, 20);
    s.write(h);
  };

  const onHeader = (): void => {
    if (phase === 'flags') {
      phase = 'option';
      return;
    }
    if (phase === 'option') {
      option = head.readUInt32BE(8);
      skip = head.readUInt32BE(12);
      if (option === NBD_OPT_GO || option === NBD_OPT_EXPORT_NAME) {
        const info = Buffer.alloc(12);
        info.writeBigUInt64BE(size, 2);
        info.writeUInt16BE(FLAGS, 10);
        if (option === NBD_OPT_GO) {
          optionReply(NBD_REP_INFO, info);
          optionReply(NBD_REP_ACK, Buffer.alloc(0));
        } else {
          s.write(info.subarray(2));
        }
        phase = 'request';
      } else {
        optionReply(NBD_REP_ERR_UNSUP, Buffer.alloc(0));
      }
      return;
    }
    const type = head.readUInt16BE(6);
    const length = head.readUInt32BE(24);
    if (type === 2) {
      s.end();
      return;
    }
    const isRead = type === 0 && length <= MAX_READ;
    const reply = Buffer.allocUnsafe(16);
    reply.writeUInt32BE(0x67446698, 0);
    reply.writeUInt32BE(0, 4);
    head.copy(reply, 8, 8, 16);
    if (isRead) {
      s.cork();
      s.write(reply);
      s.write(zeroes.subarray(0, length));
      s.uncork();
    } else if (type === 1 && length > 0) {
      skip = length;
      afterPayload = reply;
    } else {
      s.write(reply);
    }
  };

  s.on('data', (chunk: Buffer) => {
    let pos = 0;
    while (pos < chunk.length) {
      if (skip > 0) {
        const n = Math.min(skip, chunk.length - pos);
        skip -= n;
        pos += n;
        if (skip === 0 && afterPayload) {
          s.write(afterPayload);
          afterPayload = null;
        }
        continue;
      }
      const need = phase === 'flags' ? 4 : phase === 'option' ? 16 : 28;
      const n = Math.min(need - fill, chunk.length - pos);
      chunk.copy(head, fill, pos, pos + n);
      fill += n;
      pos += n;
      if (fill === need) {
        fill = 0;
        onHeader();
      }
    }
  });
  s.on('error', () => s.destroy());
}

net.createServer({ noDelay: true }, serve).listen(port, '127.0.0.1');
