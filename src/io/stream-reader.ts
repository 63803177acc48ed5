/**
 * Exactly-n-bytes reads from a stream, for the parts of a protocol that are a dialogue
 * (a client's handshake): `await read(n)` resolves with n bytes once they have arrived.
 * Not for hot paths: chunks are concatenated when a read spans them. A read larger than
 * the caller's limit must be refused by the caller before it asks: this class allocates
 * what it is asked for.
 */
import type { Duplex } from 'node:stream';
import { BlockError } from '../errors/index.js';

export class StreamReader {
  readonly #stream: Duplex;
  #chunks: Buffer[] = [];
  #have = 0;
  #ended: Error | null = null;
  /** Set by fail(): every read rejects from then on, even one the buffered bytes would satisfy. */
  #failed: Error | null = null;
  #waiter: { readonly n: number; readonly resolve: (b: Buffer) => void; readonly reject: (e: Error) => void } | null = null;

  readonly #onData = (b: Buffer): void => {
    this.#chunks.push(b);
    this.#have += b.length;
    this.#serve();
  };
  readonly #onEnd = (): void => this.#fail(new BlockError('ECONNRESET', 'the server closed the connection'));
  readonly #onError = (e: Error): void => this.#fail(new BlockError('ECONNRESET', `connection failed: ${e.message}`, { cause: e }));

  constructor(stream: Duplex) {
    this.#stream = stream;
    stream.on('data', this.#onData);
    stream.on('end', this.#onEnd);
    stream.on('close', this.#onEnd);
    stream.on('error', this.#onError);
  }

  /** Resolves with the next `n` bytes; rejects if the stream ends first (or already has). */
  read(n: number): Promise<Buffer> {
    if (this.#waiter) return Promise.reject(new BlockError('EINVAL', 'StreamReader: one read at a time'));
    if (this.#failed) return Promise.reject(this.#failed);
    return new Promise((resolve, reject) => {
      this.#waiter = { n, resolve, reject };
      this.#serve();
    });
  }

  /** Fails a pending read and every later one with `error` (a timeout, say). */
  fail(error: Error): void {
    this.#failed ??= error;
    this.#fail(error);
  }

  /**
   * Stops reading: removes its listeners and returns the bytes received but not read,
   * for whoever reads the stream next.
   */
  detach(): Buffer {
    const s = this.#stream;
    s.off('data', this.#onData);
    s.off('end', this.#onEnd);
    s.off('close', this.#onEnd);
    s.off('error', this.#onError);
    const rest = Buffer.concat(this.#chunks);
    this.#chunks = [];
    this.#have = 0;
    return rest;
  }

  #fail(e: Error): void {
    this.#ended ??= e;
    const w = this.#waiter;
    if (w && (this.#have < w.n || this.#failed)) {
      this.#waiter = null;
      w.reject(this.#ended);
    }
  }

  #serve(): void {
    const w = this.#waiter;
    if (!w) return;
    if (this.#have < w.n) {
      if (this.#ended) {
        this.#waiter = null;
        w.reject(this.#ended);
      }
      return;
    }
    this.#waiter = null;
    let out: Buffer;
    const first = this.#chunks[0]!;
    if (w.n === 0) {
      out = Buffer.alloc(0);
    } else if (first.length >= w.n) {
      out = first.subarray(0, w.n);
      if (first.length === w.n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(w.n);
    } else {
      const all = Buffer.concat(this.#chunks);
      out = all.subarray(0, w.n);
      this.#chunks = all.length > w.n ? [all.subarray(w.n)] : [];
    }
    this.#have -= w.n;
    w.resolve(out);
  }
}
