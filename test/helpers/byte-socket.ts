/**
 * A byte-exact reader over a socket for protocol tests: it buffers whatever arrives and
 * hands out exactly the number of bytes asked for, so a test can parse a peer's replies
 * field by field and notice when the peer closes. Test-side only (Buffer.concat is fine
 * here). Used by the NBD RawClient and the ggated tests' ggatec-like client.
 */
import type net from 'node:net';

/** How long a test waits for bytes before failing (a hang is a test failure, not a stuck run). */
export const BYTE_TIMEOUT_MS = 10_000;

export class ByteSocket {
  readonly socket: net.Socket;
  #buf = Buffer.alloc(0);
  #ended = false;
  #waiter: (() => void) | null = null;

  constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (b: Buffer) => {
      this.#buf = Buffer.concat([this.#buf, b]);
      this.#waiter?.();
    });
    const end = () => {
      this.#ended = true;
      this.#waiter?.();
    };
    socket.on('end', end);
    socket.on('close', end);
    socket.on('error', end);
  }

  /** Bytes received and not yet read. */
  get available(): number {
    return this.#buf.length;
  }

  /** Waits for more bytes or the end of the connection; false once the deadline has passed. */
  async #wait(deadline: number): Promise<boolean> {
    const left = deadline - Date.now();
    if (left <= 0) return false;
    await new Promise<void>((resolve) => {
      const t = setTimeout(resolve, left);
      this.#waiter = () => {
        clearTimeout(t);
        resolve();
      };
    });
    this.#waiter = null;
    return true;
  }

  /** Reads exactly n bytes; rejects if the peer closes first or after timeoutMs. */
  async read(n: number, timeoutMs = BYTE_TIMEOUT_MS): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.#buf.length < n) {
      if (this.#ended) throw new Error(`connection closed with ${this.#buf.length} of ${n} bytes`);
      if (!(await this.#wait(deadline))) throw new Error(`timed out waiting for ${n} bytes (have ${this.#buf.length})`);
    }
    const out = this.#buf.subarray(0, n);
    this.#buf = this.#buf.subarray(n);
    return out;
  }

  /** Resolves true once the peer has closed the connection, false on timeout. */
  async closed(timeoutMs = BYTE_TIMEOUT_MS): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.#ended) if (!(await this.#wait(deadline))) return false;
    return true;
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }

  destroy(): void {
    this.socket.destroy();
  }
}
