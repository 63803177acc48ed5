/**
 * The log filter: one line per request to a log file (after nbdkit's log filter).
 *
 * A line is written when the request completes:
 *
 *     2026-12-03 13:50:37.187585 Read id=1 offset=0x0 count=0x200 flags=0 return=0 (Success) elapsed_us=9
 *     2026-12-03 13:50:37.188109 Zero id=4 offset=0x0 count=0x1000 flags=NO_HOLE|FUA return=-1 (EIO) elapsed_us=31
 *     2026-12-03 13:50:37.188068 Flush id=3 flags=0 return=0 (Success) elapsed_us=2
 *
 * The timestamp (UTC, microseconds) is when the request arrived, `id` counts requests of
 * this filter from 1 in arrival order, offset and count are hexadecimal as in nbdkit,
 * `flags` names the request flags (`0` for none, unknown bits in hex), `return` is 0
 * (Success) or -1 with the errno code, and `elapsed_us` the time the layers below took.
 * Lines appear in completion order; ids give the arrival order.
 *
 * nbdkit logs a call line and a return line per request, and numbers requests per
 * connection (`connection=N`); the device stack has no connections, so here ids are per
 * export (per filter instance) and one line carries both halves.
 *
 * Lines go through a buffered asynchronous file stream, so a request never waits for a
 * write to the disk. Logging is best effort: if the disk falls behind by more than
 * {@link MAX_PENDING_BYTES}, lines are dropped and a `Dropped lines=N` line says how many;
 * a write error stops the log (requests go on) and is reported by close().
 */
import * as fs from 'node:fs';
import { once } from 'node:events';
import { FilterDevice } from '../device/filter.js';
import { REQ, type BlockDevice, type Extent } from '../device/types.js';
import type { LayerDescription } from '../device/stack.js';
import { BlockError, isBlockError, toBlockError } from '../errors/index.js';
import { booleanSetting, parseSettings, settingsSchema, pathSetting } from '../device/index.js';
import { systemFilterClock, type FilterClock } from './delay.js';
import { REQ_WRITEBACK } from './writeback.js';

/** Bytes of log lines that may wait for the disk before lines are dropped: 16 MiB. */
export const MAX_PENDING_BYTES = 16 * 2 ** 20;

/** Where log lines go. */
export interface LogSink {
  write(line: string): void;
  /** Flushes what is buffered and closes; rejects with the first write error, if any. */
  close(): Promise<void>;
}

/** `YYYY-MM-DD HH:MM:SS.uuuuuu` (UTC) of a wall-clock time in ms since the epoch. */
export function formatTimestamp(ms: number): string {
  const totalUs = Math.floor(ms * 1000);
  const secs = Math.floor(totalUs / 1e6);
  const iso = new Date(secs * 1000).toISOString();
  return `${iso.slice(0, 10)} ${iso.slice(11, 19)}.${String(totalUs - secs * 1e6).padStart(6, '0')}`;
}

const FLAG_NAMES: readonly (readonly [number, string])[] = [
  [REQ.FUA, 'FUA'],
  [REQ.NO_HOLE, 'NO_HOLE'],
  [REQ.REQ_ONE, 'REQ_ONE'],
  [REQ.FAST_ZERO, 'FAST_ZERO'],
  [REQ_WRITEBACK, 'WRITEBACK'],
];

/** Request flags by name joined with `|` (`0` for none; unknown bits as one hex number). */
export function flagNames(flags: number): string {
  if (flags === 0) return '0';
  const names: string[] = [];
  let rest = flags;
  for (const [bit, name] of FLAG_NAMES) {
    if ((flags & bit) !== 0) {
      names.push(name);
      rest &= ~bit;
    }
  }
  if (rest !== 0) names.push(`0x${rest.toString(16)}`);
  return names.join('|');
}

/** A log file written through a buffered write stream (see the module comment). */
export class LogFile implements LogSink {
  readonly path: string;
  readonly #stream: fs.WriteStream;
  readonly #wallClock: () => number;
  #error: Error | undefined;
  #closed = false;
  #dropped = 0;

  private constructor(path: string, stream: fs.WriteStream, wallClock: () => number) {
    this.path = path;
    this.#stream = stream;
    this.#wallClock = wallClock;
    stream.on('error', (e: Error) => {
      this.#error ??= e;
    });
  }

  /** Opens (creates) `path` for appending, or truncates it when `append` is false. */
  static async open(path: string, append = true, wallClock: () => number = wallNow): Promise<LogFile> {
    const stream = fs.createWriteStream(path, { flags: append ? 'a' : 'w' });
    try {
      await once(stream, 'open');
    } catch (e) {
      throw new BlockError(toBlockError(e).code, `log: logfile: cannot open ${path}: ${(e as Error).message}`, { cause: e });
    }
    return new LogFile(path, stream, wallClock);
  }

  /** Lines dropped because the disk fell behind, not yet reported in the file. */
  get dropped(): number {
    return this.#dropped;
  }

  /** Resolves when every line written so far has reached the file (or the log has failed). */
  async drained(): Promise<void> {
    if (this.#stream.writableLength > 0 && this.#error === undefined) await once(this.#stream, 'drain').catch(() => undefined);
  }

  write(line: string): void {
    if (this.#closed || this.#error !== undefined) return;
    if (this.#stream.writableLength > MAX_PENDING_BYTES) {
      this.#dropped++;
      return;
    }
    if (this.#dropped > 0) {
      this.#stream.write(`${formatTimestamp(this.#wallClock())} Dropped lines=${this.#dropped}\n`);
      this.#dropped = 0;
    }
    this.#stream.write(line);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#error === undefined) {
      const closed = once(this.#stream, 'close').catch(() => undefined);
      this.#stream.end();
      await closed;
    } else {
      this.#stream.destroy();
    }
    if (this.#error !== undefined) {
      const e = toBlockError(this.#error);
      throw new BlockError(e.code, `log: logfile ${this.path}: ${e.message}`, { cause: this.#error });
    }
  }
}

/** Wall-clock ms since the epoch with sub-millisecond precision. */
function wallNow(): number {
  return performance.timeOrigin + performance.now();
}

/** Options of a log filter beyond its sink. */
export interface LogOptions {
  /** Measures elapsed_us. @default systemFilterClock */
  readonly clock?: FilterClock;
  /** Wall-clock ms since the epoch, for timestamps. @default performance.timeOrigin + performance.now() */
  readonly wallClock?: () => number;
}

type LogOp = 'Read' | 'Write' | 'Zero' | 'Trim' | 'Flush' | 'Extents' | 'Cache';

/** Logs every request that passes through to `next` (see the module comment). */
export class LogFilter extends FilterDevice {
  readonly #sink: LogSink;
  readonly #clock: FilterClock;
  readonly #wallClock: () => number;
  #lastId = 0;

  constructor(next: BlockDevice, sink: LogSink, options: LogOptions = {}) {
    super(next);
    this.#sink = sink;
    this.#clock = options.clock ?? systemFilterClock;
    this.#wallClock = options.wallClock ?? wallNow;
  }

  override get description(): string {
    return `${this.next.description} (log)`;
  }

  async #logged<T>(op: LogOp, offset: number | null, length: number, flags: number, fn: () => Promise<T>): Promise<T> {
    const id = ++this.#lastId;
    const wall = this.#wallClock();
    const start = this.#clock.now();
    let result = 'return=0 (Success)';
    try {
      return await fn();
    } catch (e) {
      result = `return=-1 (${isBlockError(e) ? e.code : toBlockError(e).code})`;
      throw e;
    } finally {
      const us = Math.round((this.#clock.now() - start) * 1000);
      const range = offset === null ? '' : ` offset=0x${offset.toString(16)} count=0x${length.toString(16)}`;
      this.#sink.write(`${formatTimestamp(wall)} ${op} id=${id}${range} flags=${flagNames(flags)} ${result} elapsed_us=${us}\n`);
    }
  }

  override read(buf: Buffer, offset: number, flags: number): Promise<void> {
    return this.#logged('Read', offset, buf.length, flags, () => this.next.read(buf, offset, flags));
  }
  override write(data: Buffer, offset: number, flags: number): Promise<void> {
    return this.#logged('Write', offset, data.length, flags, () => this.next.write(data, offset, flags));
  }
  override zero(offset: number, length: number, flags: number): Promise<void> {
    return this.#logged('Zero', offset, length, flags, () => this.next.zero(offset, length, flags));
  }
  override trim(offset: number, length: number, flags: number): Promise<void> {
    return this.#logged('Trim', offset, length, flags, () => this.next.trim(offset, length, flags));
  }
  override flush(flags: number): Promise<void> {
    return this.#logged('Flush', null, 0, flags, () => this.next.flush(flags));
  }
  override extents(offset: number, length: number, flags: number): Promise<Extent[]> {
    return this.#logged('Extents', offset, length, flags, () => this.next.extents(offset, length, flags));
  }
  override cache(offset: number, length: number, flags: number): Promise<void> {
    return this.#logged('Cache', offset, length, flags, () => this.next.cache(offset, length, flags));
  }

  /** Closes the layer below, then the log (flushing it); both are attempted. */
  override async close(): Promise<void> {
    try {
      await this.next.close();
    } finally {
      await this.#sink.close();
    }
  }
}

/** The settings schema (listed by `blockgate plugins`). */
export const logSettings = settingsSchema({
  logfile: pathSetting,
  logappend: booleanSetting,
});

/** Filter factory: `{ type: 'log', logfile, logappend? }` (logappend default true: append). */
export async function logFilter(next: BlockDevice, desc: LayerDescription): Promise<LogFilter> {
  const s = parseSettings('log', logSettings, desc);
  return new LogFilter(next, await LogFile.open(s.logfile, s.logappend ?? true));
}
