/**
 * Control frames off a byte stream, on the io FrameReader that ggated uses too: the
 * fixed header is read (from the chunk in place, or gathered into the reader's scratch
 * when a chunk boundary splits it), decoded, and only then is the body asked for, so
 * the body length is checked against maxRequestBody/maxReplyBody (by the header
 * decoder) before the reader may allocate it. A body that one chunk holds is a view of
 * that chunk; a split one is copied once into a buffer of its exact length. Nothing else
 * is copied, so a payload crosses the control hop with at most one userland copy.
 */
import { FrameReader } from '../../io/framer.js';
import { CONTROL, decodeReplyHeader, decodeRequestHeader, type ReplyHeader, type RequestHeader } from './protocol.js';

/** Called with each frame; the body is the callee's to keep. May pause the stream. */
export type FrameHandler<H> = (header: H, body: Buffer) => void;

export class ControlFrameStream<H extends { readonly bodyLength: number }> {
  readonly #reader: FrameReader;
  readonly #headerSize: number;
  readonly #decodeHeader: (b: Buffer, at: number) => H;
  readonly #onFrame: FrameHandler<H>;
  readonly #onError: (e: unknown) => void;

  /**
   * @param decodeHeader throws ControlFrameError on a bad header, a body over its limit included
   * @param onError called once, with what `decodeHeader` or `onFrame` threw; the stream is stopped by then
   */
  constructor(headerSize: number, decodeHeader: (b: Buffer, at: number) => H, onFrame: FrameHandler<H>, onError: (e: unknown) => void) {
    this.#reader = new FrameReader(headerSize);
    this.#headerSize = headerSize;
    this.#decodeHeader = decodeHeader;
    this.#onFrame = onFrame;
    this.#onError = onError;
    this.#expectHeader();
  }

  static requests(onFrame: FrameHandler<RequestHeader>, onError: (e: unknown) => void): ControlFrameStream<RequestHeader> {
    return new ControlFrameStream(CONTROL.REQUEST_HEADER_SIZE, decodeRequestHeader, onFrame, onError);
  }

  static replies(onFrame: FrameHandler<ReplyHeader>, onError: (e: unknown) => void): ControlFrameStream<ReplyHeader> {
    return new ControlFrameStream(CONTROL.REPLY_HEADER_SIZE, decodeReplyHeader, onFrame, onError);
  }

  /** Bytes received and not yet consumed (queued while paused). */
  get buffered(): number {
    return this.#reader.buffered;
  }

  /** True once a bad frame stopped the stream (or {@link stop} was called). */
  get stopped(): boolean {
    return this.#reader.stopped;
  }

  /** Feeds bytes from the socket; frames are delivered synchronously. */
  push(chunk: Buffer): void {
    this.#reader.push(chunk);
  }

  /** No frame is delivered until {@link resume}; bytes that arrive meanwhile are queued. */
  pause(): void {
    this.#reader.pause();
  }

  resume(): void {
    this.#reader.resume();
  }

  stop(): void {
    this.#reader.stop();
  }

  #expectHeader(): void {
    this.#reader.expectFixed(this.#headerSize, (b, off) => {
      let header: H;
      try {
        header = this.#decodeHeader(b, off);
      } catch (e) {
        this.#fail(e);
        return;
      }
      // bodyLength is within the op's limit here: this is all the reader may allocate.
      this.#reader.expectBody(header.bodyLength, (body) => {
        // The next header is expected first, so a handler that pauses leaves the stream
        // waiting for it rather than for nothing.
        this.#expectHeader();
        try {
          this.#onFrame(header, body);
        } catch (e) {
          this.#fail(e);
        }
      });
    });
  }

  #fail(e: unknown): void {
    this.#reader.stop();
    this.#onError(e);
  }
}
