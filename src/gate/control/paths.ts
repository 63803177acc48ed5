/**
 * Where the control socket lives by default. Apart from protocol.ts because it reads
 * the process's environment and uid, and the codec does no I/O.
 */
import os from 'node:os';
import path from 'node:path';

/**
 * The default control socket path: `$XDG_RUNTIME_DIR/blockgate/ctl.sock` when that
 * variable is set (a per-user 0700 directory on systemd hosts), else
 * `<tmpdir>/blockgate-<uid>/ctl.sock` (the server creates the directory with mode 0700).
 */
export function defaultControlPath(env: NodeJS.ProcessEnv = process.env, uid: number = process.getuid?.() ?? 0): string {
  const xdg = env.XDG_RUNTIME_DIR;
  if (xdg !== undefined && xdg !== '' && path.isAbsolute(xdg)) return path.join(xdg, 'blockgate', 'ctl.sock');
  return path.join(os.tmpdir(), `blockgate-${uid}`, 'ctl.sock');
}
