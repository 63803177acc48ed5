/**
 * systemd's socket-activation protocol (sd_listen_fds(3)), as systemd and libnbd's
 * captive `[ server ... ]` syntax speak it: the parent opens the listening sockets and
 * passes them as file descriptors 3, 4, ... with LISTEN_FDS (how many), LISTEN_PID (the
 * process they are meant for, so that a grandchild that inherits the environment does
 * not take them too) and optionally LISTEN_FDNAMES (colon-separated names).
 */
import fs from 'node:fs';
import { BlockError } from '../errors/index.js';

/** The first passed descriptor (SD_LISTEN_FDS_START). */
export const LISTEN_FDS_START = 3;
/** Most descriptors taken from LISTEN_FDS; a larger count is refused as a mistake. */
export const MAX_LISTEN_FDS = 64;

export interface ActivatedSocket {
  readonly fd: number;
  /** Its name from LISTEN_FDNAMES, or 'unknown' (systemd's default name) when none was given. */
  readonly name: string;
}

/**
 * The sockets passed to this process, or null when none were (LISTEN_PID absent or
 * naming another process). The variables are removed from `env` once read, as
 * sd_listen_fds(1) does when asked, so that children started later (a --run command, a
 * plugin's helper) do not believe the sockets are theirs. Throws EINVAL for a
 * malformed LISTEN_FDS.
 */
export function takeActivatedSockets(env: NodeJS.ProcessEnv = process.env, pid: number = process.pid): ActivatedSocket[] | null {
  const listenPid = env.LISTEN_PID;
  const listenFds = env.LISTEN_FDS;
  if (listenPid === undefined || listenFds === undefined) return null;
  if (!/^\d+$/.test(listenPid) || Number(listenPid) !== pid) return null;
  const names = env.LISTEN_FDNAMES?.split(':') ?? [];
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (!/^\d+$/.test(listenFds)) throw new BlockError('EINVAL', `LISTEN_FDS=${listenFds}: not a count of descriptors`);
  const n = Number(listenFds);
  if (n < 1 || n > MAX_LISTEN_FDS) {
    throw new BlockError('EINVAL', `LISTEN_FDS=${listenFds}: expected 1 to ${MAX_LISTEN_FDS} descriptors`);
  }
  return Array.from({ length: n }, (_, i) => ({ fd: LISTEN_FDS_START + i, name: names[i] || 'unknown' }));
}

/** Where Linux lists unix sockets with their inodes and bound paths. */
const PROC_NET_UNIX = '/proc/net/unix';

/**
 * The path a unix socket descriptor is bound to, for logs and URIs: Node cannot tell
 * it for an inherited descriptor (server.address() is null for a pipe taken with
 * `{ fd }`), so it is looked up by the socket's inode in /proc/net/unix. Abstract
 * names come back with a leading '@'. Null where that cannot be read (not Linux, no
 * /proc) or the socket is unnamed.
 */
export function unixSocketPath(fd: number): string | null {
  try {
    const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/self/fd/${fd}`));
    if (!m) return null;
    for (const line of fs.readFileSync(PROC_NET_UNIX, 'latin1').split('\n')) {
      const cols = line.trim().split(/\s+/);
      // Num RefCount Protocol Flags Type St Inode [Path]
      if (cols[6] === m[1] && cols[7] !== undefined) return cols[7];
    }
  } catch {
    // Not Linux, or no /proc: the caller says the socket is unnamed.
  }
  return null;
}
