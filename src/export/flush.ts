/**
 * The FLUSH rule every protocol's session follows, so an NBD client and a ggate client
 * of the same export hear of a write-back error the same way: the backend's own flush
 * error, else any write-back error recorded on the export since the session's cursor
 * (errseq). A backend flush failure is also recorded, so every other session hears of it
 * once, at its own next FLUSH; the cursor advances in both cases (Linux syncfs:
 * `ret ? ret : ret2`).
 */
import { BlockError, codeFromLinux, toBlockError } from '../errors/index.js';
import type { BlockDevice } from '../device/index.js';
import type { Export } from './export.js';

/** What a flush reports, and the session's cursor to keep from now on. */
export interface FlushResult {
  readonly error: BlockError | null;
  readonly cursor: number;
}

/**
 * Flushes `device` (the export's device, or the stack a session actually writes to)
 * and applies the errseq rule for a session whose write-back cursor is `cursor`.
 */
export async function flushExport(exp: Export, device: BlockDevice, cursor: number): Promise<FlushResult> {
  let backendError: BlockError | null = null;
  try {
    await device.flush(0);
  } catch (e) {
    backendError = toBlockError(e);
    exp.errseq.set(backendError.errno);
  }
  const seen = exp.errseq.checkAndAdvance(cursor);
  if (backendError) return { error: backendError, cursor: seen.cursor };
  if (seen.error !== 0) {
    const code = codeFromLinux(seen.error) ?? 'EIO';
    const error = new BlockError(code, `a write-back error (${code}) happened since this connection's last flush; data may have been lost`);
    return { error, cursor: seen.cursor };
  }
  return { error: null, cursor: seen.cursor };
}
