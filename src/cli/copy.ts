/**
 * `blockgate copy SRC DST`: nbdcopy's job. SRC and DST are each an NBD URI, a file or
 * block device, or `-` (stdin, stdout); DST may also be `null:` (discard). The engine is
 * src/nbd/copy.ts; this module parses options, opens the two sides (the source first,
 * so a source that cannot be opened leaves the destination untouched), shows progress,
 * and prints the checksum and the statistics. Errors are one line,
 * `blockgate copy: source: MESSAGE (ERRNO)` or `... destination: ...`, and exit 1.
 */
import fs from 'node:fs';
import { Command, InvalidArgumentError } from 'commander';
import cliProgress from 'cli-progress';
import { BlockError, toBlockError } from '../errors/index.js';
import { parseSize } from '../device/index.js';
import {
  COPY_DEFAULTS,
  CopyError,
  MAX_REQUEST_SIZE,
  copyImage,
  copyWorkers,
  isNbdUri,
  openCopyDestination,
  openCopySource,
  type CopyDestination,
  type CopyResult,
  type CopySource,
  type OpenedEndpoint,
} from '../nbd/copy.js';

interface CopyFlags {
  connections: number;
  requests: number;
  requestSize: number;
  destinationIsZero?: boolean;
  flush?: boolean;
  extents: boolean;
  detectZeroes: boolean;
  progress?: boolean;
  progressFd?: number;
  checksum?: string | boolean;
  verbose?: boolean;
}

function intOption(min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n < min || n > max) throw new InvalidArgumentError(`expected an integer from ${min} to ${max}`);
    return n;
  };
}

function sizeOption(v: string): number {
  let n: number;
  try {
    n = parseSize(v);
  } catch (e) {
    throw new InvalidArgumentError(toBlockError(e).message);
  }
  if (n < 512 || n > MAX_REQUEST_SIZE) throw new InvalidArgumentError(`expected a size from 512 to 32M`);
  return n;
}

/** Progress on stderr: a bar on a terminal, else `N/100` lines (nbdcopy's --progress=FD format) as the percentage grows. */
class Progress {
  readonly #bar: cliProgress.SingleBar | null = null;
  readonly #fd: number | null = null;
  #last = -1;
  #done = 0;
  #total: number | null = null;
  #timer: NodeJS.Timeout | null = null;

  constructor(flags: CopyFlags) {
    if (flags.progressFd !== undefined) this.#fd = flags.progressFd;
    else if (process.stderr.isTTY) {
      this.#bar = new cliProgress.SingleBar(
        { stream: process.stderr, format: ' {bar} {percentage}% | {value_h} of {total_h} | {duration_formatted} | ETA {eta_formatted}', hideCursor: true, fps: 10 },
        cliProgress.Presets.shades_classic,
      );
    } else this.#fd = 2;
  }

  start(total: number | null): void {
    this.#total = total;
    if (this.#bar) {
      this.#bar.start(total ?? 0, 0, { value_h: '0', total_h: total === null ? '?' : human(total) });
      this.#timer = setInterval(() => this.#bar!.update(this.#done, { value_h: human(this.#done) }), 100).unref();
    } else this.#line(0);
  }

  update(done: number, total: number | null): void {
    this.#done = done;
    this.#total = total;
    if (this.#fd !== null && total) this.#line(Math.floor((done * 100) / total));
  }

  #line(pct: number): void {
    if (pct <= this.#last || this.#fd === null) return;
    this.#last = pct;
    try {
      fs.writeSync(this.#fd, `${pct}/100\n`);
    } catch {
      // a closed progress descriptor must not fail the copy
    }
  }

  stop(ok: boolean): void {
    if (this.#timer) clearInterval(this.#timer);
    if (this.#bar) {
      if (ok) this.#bar.update(this.#total ?? this.#done, { value_h: human(this.#done) });
      this.#bar.stop();
    } else if (ok) this.#line(100);
  }
}

function human(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

/** The statistics line of --verbose. */
export function statsLine(r: CopyResult): string {
  const s = r.elapsedMs / 1000;
  const rate = s > 0 ? `${(r.size / s / 1e6).toFixed(1)} MB/s` : 'n/a';
  return (
    `copied ${r.size} bytes in ${s.toFixed(3)} s (${rate}): read ${r.bytesRead} bytes from the source, ` +
    `wrote ${r.bytesWritten}, zeroed ${r.bytesZeroed}, skipped ${r.bytesSkipped} (already zero); ` +
    `${r.extentRequests} block status requests`
  );
}

function describe(name: string, e: OpenedEndpoint<CopySource | CopyDestination>): string {
  const c = e.client;
  if (!c) return `${name}: ${e.type}${e.size !== null ? `, ${e.size} bytes` : ''}`;
  const contexts = c.contexts.length > 0 ? c.contexts.join(' ') : 'no metadata contexts';
  return `${name}: nbd, ${c.size} bytes, ${c.connections} connection${c.connections === 1 ? '' : 's'}${c.canMultiConn ? ' (multi-conn)' : ''}, ${c.mode} replies, ${contexts}`;
}

/** True if both name the same local file (a destination file is truncated on opening). */
function sameFile(a: string, b: string): boolean {
  if (a === '-' || b === '-' || isNbdUri(a) || isNbdUri(b)) return false;
  if (a === b) return true;
  try {
    const x = fs.statSync(a);
    const y = fs.statSync(b);
    return x.dev === y.dev && x.ino === y.ino;
  } catch {
    return false;
  }
}

async function runCopy(srcSpec: string, dstSpec: string, flags: CopyFlags): Promise<void> {
  const open = {
    connections: flags.connections,
    requests: flags.requests,
    requestSize: flags.requestSize,
    extents: flags.extents,
    destinationIsZero: flags.destinationIsZero ?? false,
  };
  const checksum = flags.checksum === true ? 'sha256' : flags.checksum || undefined;
  const src = await openCopySource(srcSpec, open);
  let dst: OpenedEndpoint<CopyDestination> | null = null;
  let progress: Progress | null = null;
  const ac = new AbortController();
  const onSignal = () => ac.abort();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    if (sameFile(srcSpec, dstSpec)) throw new CopyError('destination', new BlockError('EINVAL', `${dstSpec} is the source`));
    dst = await openCopyDestination(dstSpec, open);
    if (flags.verbose) process.stderr.write(`blockgate copy: ${describe('source', src)}; ${describe('destination', dst)}\n`);
    if (flags.progress || flags.progressFd !== undefined) {
      progress = new Progress(flags);
      progress.start(src.size);
    }
    const p = progress;
    const r = await copyImage(src.endpoint, dst.endpoint, {
      requests: copyWorkers(flags.requests, src, dst),
      requestSize: flags.requestSize,
      destinationIsZero: flags.destinationIsZero ?? false,
      detectZeroes: flags.detectZeroes,
      flush: flags.flush ?? false,
      ...(checksum ? { checksum } : {}),
      ...(p ? { onProgress: (d: number, t: number | null) => p.update(d, t) } : {}),
      signal: ac.signal,
    });
    progress?.stop(true);
    progress = null;
    if (r.checksum !== null) {
      // With the image on stdout, the checksum goes to stderr.
      const line = `${r.checksum}  ${srcSpec}\n`;
      if (dst.type === 'stream' && dstSpec === '-') process.stderr.write(line);
      else process.stdout.write(line);
    }
    if (flags.verbose) process.stderr.write(`blockgate copy: ${statsLine(r)}\n`);
  } finally {
    progress?.stop(false);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await Promise.all([src.close(), dst?.close()]);
  }
}

/**
 * `--checksum` takes its algorithm only as `--checksum=ALGO` (nbdcopy's style for
 * optional values): a bare `--checksum` becomes `--checksum=sha256` before commander
 * sees it, so it never swallows the SOURCE that follows.
 */
function bareChecksum(argv: string[]): string[] {
  const end = argv.indexOf('--');
  return argv.map((a, i) => (a === '--checksum' && (end < 0 || i < end) ? '--checksum=sha256' : a));
}

export function copyCommand(): Command {
  const cmd = new Command('copy');
  const parseOptions = cmd.parseOptions.bind(cmd);
  cmd.parseOptions = (argv: string[]) => parseOptions(bareChecksum(argv));
  return cmd
    .description('copy between NBD exports, files, block devices and stdin/stdout (as nbdcopy)')
    .argument('<source>', 'NBD URI, file, block device, or - (stdin)')
    .argument('<destination>', 'NBD URI, file, block device, - (stdout) or null: (discard)')
    .option('-C, --connections <n>', 'NBD connections per server, used only when the server advertises multi-conn', intOption(1, 64), COPY_DEFAULTS.connections)
    .option('-R, --requests <n>', 'requests in flight per NBD connection (nbdcopy -R)', intOption(1, 65536), COPY_DEFAULTS.requests)
    .option('--request-size <size>', 'largest read or write (512 to 32M)', sizeOption, COPY_DEFAULTS.requestSize)
    .option('--destination-is-zero', 'the destination already reads as zeroes: skip zero ranges entirely')
    .option('--target-is-zero', 'the same as --destination-is-zero (qemu-img spelling)')
    .option('--flush', 'flush the destination before exiting')
    .option('--no-extents', "ignore the source's extents: read everything")
    .option('--no-detect-zeroes', 'write blocks of zeroes that were read as data (no sparse detection)')
    .option('-p, --progress', 'show progress on stderr: a bar on a terminal, else N/100 lines')
    .option('--progress-fd <fd>', 'write progress as N/100 lines to this file descriptor', intOption(0, 1 << 20))
    .option('--checksum [algorithm]', 'print a checksum of the image copied, as sha256sum of the raw image would; --checksum=ALGO for another digest (default sha256)')
    .option('-v, --verbose', 'describe both sides, and print statistics (bytes read, written, zeroed, skipped)')
    .addHelpText(
      'after',
      `
Exit status: 0 when every byte was copied, 1 on any error (the message names the side).

Examples:
  blockgate copy nbd://example.com/disk disk.img
  blockgate copy disk.img nbd+unix:///?socket=/tmp/nbd.sock
  blockgate copy --checksum -p nbd://a/ nbd://b/
  blockgate copy nbd://example.com/ - | file -`,
    )
    .action(async (srcSpec: string, dstSpec: string, flags: CopyFlags & { targetIsZero?: boolean }) => {
      if (flags.targetIsZero) flags.destinationIsZero = true;
      try {
        await runCopy(srcSpec, dstSpec, flags);
      } catch (e) {
        const b = toBlockError(e);
        process.stderr.write(`blockgate copy: ${b.message} (${b.code})\n`);
        process.exitCode = 1;
      }
    });
}
