/**
 * The one unix-socket policy of every blockgate listener (NBD, the gate control socket):
 * a path a live server holds is refused (EBUSY), never taken over; a stale socket file
 * left by a killed server is replaced; a path that is not a socket is left alone (EEXIST).
 * Taking over a live server's path would silently cut it off from new clients while it
 * still believes it serves them.
 */
import fs from 'node:fs';
import net from 'node:net';
import { BlockError } from '../errors/index.js';

/**
 * Makes `socketPath` free for `listen`: removes a socket file nobody answers on; throws
 * BlockError EBUSY if a server answers there, EEXIST if the path is not a socket.
 */
export async function claimSocketPath(socketPath: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(socketPath);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new BlockError('EEXIST', `${socketPath} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const s = net.connect(socketPath);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (live) throw new BlockError('EBUSY', `a server is already listening on ${socketPath}`);
  fs.rmSync(socketPath, { force: true });
}
