/**
 * The counters of one (export, listener) pair, kept in preallocated typed arrays indexed
 * by command and result slot, updated in place: a request costs a few array increments
 * and a bucket search, never an allocation. prom-client reads them at scrape time
 * (registry.ts); status and the status page sum them per export.
 */
import { NBD_ERROR } from '../errors/index.js';
import type { RequestSink } from '../nbd/metrics.js';
import { NBD_CMD } from '../nbd/constants.js';
import { BUCKETS, bucketOf } from './histogram.js';

/** Command slots: the NBD command values 0..7 (DISC has no reply and is never counted), then `other`. */
export const COMMANDS = ['read', 'write', 'disc', 'flush', 'trim', 'cache', 'write_zeroes', 'block_status', 'other'] as const;
const OTHER_COMMAND = COMMANDS.length - 1;

/** Result slots: `ok`, then the NBD error values by name, then `other` (a value outside the spec's list). */
export const RESULTS = ['ok', 'EPERM', 'EIO', 'ENOMEM', 'EINVAL', 'ENOSPC', 'EOVERFLOW', 'ENOTSUP', 'ESHUTDOWN', 'other'] as const;
const OTHER_RESULT = RESULTS.length - 1;

/** The result slot of each NBD wire error value below 128 (the spec's largest is 108), else `other`. */
const RESULT_SLOT = new Uint8Array(128).fill(OTHER_RESULT);
RESULT_SLOT[NBD_ERROR.NBD_SUCCESS] = 0;
RESULT_SLOT[NBD_ERROR.NBD_EPERM] = 1;
RESULT_SLOT[NBD_ERROR.NBD_EIO] = 2;
RESULT_SLOT[NBD_ERROR.NBD_ENOMEM] = 3;
RESULT_SLOT[NBD_ERROR.NBD_EINVAL] = 4;
RESULT_SLOT[NBD_ERROR.NBD_ENOSPC] = 5;
RESULT_SLOT[NBD_ERROR.NBD_EOVERFLOW] = 6;
RESULT_SLOT[NBD_ERROR.NBD_ENOTSUP] = 7;
RESULT_SLOT[NBD_ERROR.NBD_ESHUTDOWN] = 8;

export const commandSlot = (cmd: number): number => (cmd >= 0 && cmd < OTHER_COMMAND ? cmd : OTHER_COMMAND);
export const resultSlot = (errno: number): number => (errno >= 0 && errno < RESULT_SLOT.length ? RESULT_SLOT[errno]! : OTHER_RESULT);

/** The request figures of one export on one listener. */
export class RequestFigures implements RequestSink {
  readonly exportName: string;
  readonly listener: string;
  /** Requests by [command * RESULTS.length + result]. */
  readonly requests = new Float64Array(COMMANDS.length * RESULTS.length);
  /** Latency bucket counts by [command * BUCKETS + bucket]. */
  readonly latency = new Float64Array(COMMANDS.length * BUCKETS);
  /** Sum of latencies by command, seconds. */
  readonly latencySum = new Float64Array(COMMANDS.length);
  /** Bytes of successful READs and WRITEs. */
  bytesRead = 0;
  bytesWritten = 0;
  inFlightRequests = 0;
  inFlightBytes = 0;

  constructor(exportName: string, listener: string) {
    this.exportName = exportName;
    this.listener = listener;
  }

  begin(cost: number): void {
    this.inFlightRequests++;
    this.inFlightBytes += cost;
  }

  end(cmd: number, length: number, cost: number, errno: number, t0: number): void {
    const seconds = (performance.now() - t0) / 1000;
    this.inFlightRequests--;
    this.inFlightBytes -= cost;
    const c = commandSlot(cmd);
    this.requests[c * RESULTS.length + resultSlot(errno)]!++;
    this.latency[c * BUCKETS + bucketOf(seconds)]!++;
    this.latencySum[c]! += seconds;
    if (errno === 0) {
      if (cmd === NBD_CMD.NBD_CMD_READ) this.bytesRead += length;
      else if (cmd === NBD_CMD.NBD_CMD_WRITE) this.bytesWritten += length;
    }
  }
}

/** Connection figures of one listener. */
export class ListenerFigures {
  readonly label: string;
  opened = 0;
  closed = 0;
  /** Refused by reason: rules, limit, shutdown. */
  readonly refused = new Float64Array(3);
  /** Handshake outcomes by [result * 2 + tls]. */
  readonly handshakes = new Float64Array(4 * 2);

  constructor(label: string) {
    this.label = label;
  }
}

export const REFUSED_REASONS = ['rules', 'limit', 'shutdown'] as const;
export const HANDSHAKE_RESULTS = ['transmission', 'abort', 'timeout', 'failed'] as const;
