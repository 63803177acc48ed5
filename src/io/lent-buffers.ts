/**
 * Reads into buffers the caller lends, instead of a fresh allocation per read.
 *
 * Why: on Node 20 an accepted socket hands every read to 'data' as a new 64 KiB
 * ArrayBuffer (allocated, then shrunk to the bytes read). At 4 KiB queue depth 1 that is
 * an allocation, a reallocation and a Buffer object per request; under a stream of
 * writes it is external memory the garbage collector has to chase. Node's `onread`
 * socket option reads into a caller's buffer and calls back with the byte count, but
 * `net.createServer` ignores it for accepted sockets. So the accepted socket (created
 * paused, `pauseOnConnect`) gives its handle to a new Socket constructed with `onread`,
 * as Node's own server constructs accepted sockets from their handles, and the first
 * Socket is dropped without closing the handle.
 *
 * This uses one undocumented detail of Node's net module: the `_handle` property (stable
 * since Node 0.x, used the same way by Node's cluster module). When it is not there, or
 * the socket has already started reading, nothing is changed and the caller keeps the
 * original socket and its 'data' events.
 */
import net from 'node:net';

/** A function giving the buffer the next read goes into (called once at start and after every read). */
export type LendBuffer = () => Uint8Array;
/** Called with the bytes read into the lent buffer: `buf.subarray(0, n)` is valid until the callback returns. */
export type OnLentRead = (n: number, buf: Uint8Array) => void;

/**
 * A socket equivalent to `socket` whose reads go into buffers from `buffer`, or null if
 * this socket cannot be switched (then `socket` is untouched and still paused).
 */
export function lendReadBuffers(socket: net.Socket, buffer: LendBuffer, onRead: OnLentRead): net.Socket | null {
  const internal = socket as unknown as { _handle?: object | null };
  const handle = internal._handle;
  // Only a paused socket with nothing buffered can change hands without losing bytes.
  if (!handle || typeof handle !== 'object' || socket.destroyed || socket.readableFlowing === true || socket.readableLength > 0) {
    return null;
  }
  const options = { handle, onread: { buffer, callback: onRead }, readable: true, writable: true, allowHalfOpen: socket.allowHalfOpen };
  const lent = new net.Socket(options as net.SocketConstructorOpts);
  // The handle is the new socket's now: destroying the old one without it closes nothing
  // and releases the listener's connection count.
  internal._handle = null;
  socket.destroy();
  return lent;
}
