import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { REQ } from '../../src/device/types.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import { BlockError } from '../../src/errors/index.js';
import { FILTERS } from '../../src/filters/index.js';
import { ErrorFilter } from '../../src/filters/error.js';
import { DelayFilter, type FilterClock } from '../../src/filters/delay.js';
import { REQ_WRITEBACK } from '../../src/filters/writeback.js';
import { LogFile, LogFilter, MAX_PENDING_BYTES, flagNames, formatTimestamp, logFilter, type LogSink } from '../../src/filters/log.js';
import { runContract } from '../backends/contract.js';

const SIZE = 2 ** 20;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-log-test-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));
let n = 0;
const fresh = (name: string) => path.join(dir, `${n++}-${name}`);

/** A virtual clock whose sleep returns at once, having moved time by exactly the time slept. */
function instantClock(): FilterClock {
  let t = 0;
  return {
    now: () => t,
    sleep: async (ms) => {
      t += ms;
    },
  };
}

/** A sink that keeps lines in memory. */
class MemorySink implements LogSink {
  readonly lines: string[] = [];
  closed = false;
  write(line: string): void {
    this.lines.push(line);
  }
  async close(): Promise<void> {
    this.closed = true;
  }
}

/** One log line, parsed back. */
interface Line {
  ts: string;
  op: string;
  id: number;
  offset?: number;
  count?: number;
  flags: string;
  ret: number;
  code: string;
  us: number;
}

const LINE =
  /^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}) (Read|Write|Zero|Trim|Flush|Extents|Cache) id=(\d+)(?: offset=0x([0-9a-f]+) count=0x([0-9a-f]+))? flags=(\S+) return=(0|-1) \((\w+)\) elapsed_us=(\d+)$/;

function parse(text: string): Line[] {
  return text
    .trimEnd()
    .split('\n')
    .map((l) => {
      const m = LINE.exec(l);
      assert.ok(m, `unparsable log line: ${l}`);
      return {
        ts: m[1]!,
        op: m[2]!,
        id: Number(m[3]),
        ...(m[4] !== undefined ? { offset: parseInt(m[4], 16), count: parseInt(m[5]!, 16) } : {}),
        flags: m[6]!,
        ret: Number(m[7]),
        code: m[8]!,
        us: Number(m[9]),
      };
    });
}

runContract(
  'log filter (memory sink) over memory',
  async () => ({ dev: new LogFilter(new MemoryDevice({ size: SIZE }), new MemorySink()), cleanup: async () => undefined }),
  { initial: (_o, len) => Buffer.alloc(len) },
);

describe('log line parts', () => {
  test('timestamps: UTC, microseconds', () => {
    assert.equal(formatTimestamp(Date.UTC(2026, 11, 3, 13, 50, 37, 187) + 0.585), '2026-12-03 13:50:37.187585');
    assert.equal(formatTimestamp(Date.UTC(2000, 0, 1)), '2000-01-01 00:00:00.000000');
    assert.equal(formatTimestamp(Date.UTC(2000, 0, 1) - 0.001), '1999-12-31 23:59:59.999999');
  });

  test('flag names', () => {
    assert.equal(flagNames(0), '0');
    assert.equal(flagNames(REQ.FUA), 'FUA');
    assert.equal(flagNames(REQ.NO_HOLE | REQ.FUA), 'FUA|NO_HOLE');
    assert.equal(flagNames(REQ.REQ_ONE), 'REQ_ONE');
    assert.equal(flagNames(REQ.FAST_ZERO | REQ_WRITEBACK), 'FAST_ZERO|WRITEBACK');
    assert.equal(flagNames(0x100 | 0x4 | REQ.FUA), 'FUA|0x104');
  });
});

describe('log filter', () => {
  test('is registered as "log"; settings name the bad key', async () => {
    assert.equal(FILTERS.get('log'), logFilter);
    const mem = new MemoryDevice({ size: SIZE });
    const bad = async (settings: Record<string, unknown>, re: RegExp) =>
      assert.rejects(logFilter(mem, { type: 'log', ...settings }), (e: unknown) => e instanceof BlockError && re.test(e.message));
    await bad({}, /^log: logfile: required setting is missing/);
    await bad({ logfile: '' }, /^log: logfile: must not be empty/);
    await bad({ logfile: fresh('x'), logappend: 1 }, /^log: logappend: expected true or false/);
    await bad({ logfile: fresh('x'), logscript: 'echo' }, /^log: logscript: unknown setting/);
    await bad({ logfile: path.join(dir, 'no-such-dir', 'log') }, /^log: logfile: cannot open .*no-such-dir/);
  });

  test('one line per request, parsed back and matched to the requests, an injected error included', async () => {
    const file = fresh('requests.log');
    const mem = new MemoryDevice({ size: SIZE });
    // Writes at 512 KiB and above fail ENOSPC (the error filter under the log).
    const below = new ErrorFilter(mem, { error: 'ENOSPC', ops: ['write'], offset: 512 * 1024 });
    const dev = new LogFilter(below, await LogFile.open(file));
    await dev.read(Buffer.alloc(512), 0, 0);
    await dev.write(Buffer.alloc(4096), 0x2000, REQ.FUA);
    await assert.rejects(dev.write(Buffer.alloc(512), 0x80000, 0), { code: 'ENOSPC' });
    await dev.zero(0x10000, 0x1000, REQ.NO_HOLE | REQ.FAST_ZERO);
    await dev.trim(0x20000, 0x3000, 0);
    await dev.flush(0);
    await dev.extents(0, SIZE, REQ.REQ_ONE);
    await dev.cache(0x100, 0x200, 0);
    await Promise.all([dev.read(Buffer.alloc(1), 1, 0), dev.read(Buffer.alloc(2), 2, 0)]);
    await dev.close();
    const lines = parse(fs.readFileSync(file, 'utf8'));
    const brief = lines.map((l) => [l.id, l.op, l.offset, l.count, l.flags, l.ret, l.code]);
    assert.deepEqual(brief, [
      [1, 'Read', 0, 512, '0', 0, 'Success'],
      [2, 'Write', 0x2000, 4096, 'FUA', 0, 'Success'],
      [3, 'Write', 0x80000, 512, '0', -1, 'ENOSPC'],
      [4, 'Zero', 0x10000, 0x1000, 'NO_HOLE|FAST_ZERO', 0, 'Success'],
      [5, 'Trim', 0x20000, 0x3000, '0', 0, 'Success'],
      [6, 'Flush', undefined, undefined, '0', 0, 'Success'],
      [7, 'Extents', 0, SIZE, 'REQ_ONE', 0, 'Success'],
      [8, 'Cache', 0x100, 0x200, '0', 0, 'Success'],
      [9, 'Read', 1, 1, '0', 0, 'Success'],
      [10, 'Read', 2, 2, '0', 0, 'Success'],
    ]);
    const today = new Date().toISOString().slice(0, 10);
    const yesterday = new Date(Date.now() - 86_400_000).toISOString().slice(0, 10);
    for (const l of lines) assert.ok(l.ts.startsWith(today) || l.ts.startsWith(yesterday), l.ts);
    await assert.rejects(mem.read(Buffer.alloc(1), 0, 0), 'the device below is closed');
  });

  test('elapsed_us is the time the layers below took; the timestamp is when the request arrived (injected clocks)', async () => {
    const sink = new MemorySink();
    const clock = instantClock();
    let wall = Date.UTC(2026, 0, 2, 3, 4, 5, 6);
    const mem = new MemoryDevice({ size: SIZE });
    const dev = new LogFilter(new DelayFilter(mem, { delays: { read: 2.5, write: 0.004 }, clock }), sink, {
      clock,
      wallClock: () => wall++,
    });
    await dev.read(Buffer.alloc(8), 0, 0);
    await dev.write(Buffer.alloc(8), 0, 0);
    await dev.flush(0);
    const lines = parse(sink.lines.join(''));
    assert.deepEqual(
      lines.map((l) => [l.ts, l.us]),
      [
        ['2026-01-02 03:04:05.006000', 2500],
        ['2026-01-02 03:04:05.007000', 4],
        ['2026-01-02 03:04:05.008000', 0],
      ],
    );
    assert.equal(dev.description, 'memory 1MiB (delay: read 2.5ms, write 0.004ms) (log)');
    await dev.close();
    assert.equal(sink.closed, true);
  });

  test('logappend: appends by default, truncates with false', async () => {
    const file = fresh('append.log');
    fs.writeFileSync(file, 'earlier line\n');
    const a = await logFilter(new MemoryDevice({ size: SIZE }), { type: 'log', logfile: file });
    await a.flush(0);
    await a.close();
    const text = fs.readFileSync(file, 'utf8').split('\n');
    assert.equal(text[0], 'earlier line');
    assert.match(text[1]!, / Flush id=1 flags=0 return=0 \(Success\)/);
    const b = await logFilter(new MemoryDevice({ size: SIZE }), { type: 'log', logfile: file, logappend: false });
    await b.read(Buffer.alloc(1), 0, 0);
    await b.close();
    assert.deepEqual(parse(fs.readFileSync(file, 'utf8')).map((l) => l.op), ['Read']);
  });

  test('past the bound of pending bytes, lines are dropped, then counted in a Dropped line', async () => {
    const file = fresh('burst.log');
    const log = await LogFile.open(file);
    const line = `${'x'.repeat(1023)}\n`;
    const total = Math.ceil((MAX_PENDING_BYTES * 1.25) / line.length);
    // One synchronous burst: nothing reaches the disk meanwhile, so the pending bytes hit the bound.
    for (let i = 0; i < total; i++) log.write(line);
    const dropped = log.dropped;
    assert.ok(dropped > 0 && dropped < total, `${dropped} of ${total} dropped`);
    await log.drained();
    log.write('after\n');
    assert.equal(log.dropped, 0);
    await log.close();
    const text = fs.readFileSync(file, 'utf8').trimEnd().split('\n');
    assert.equal(text.length, total - dropped + 2);
    assert.ok(text.slice(0, total - dropped).every((l) => l === line.trimEnd()));
    assert.match(text.at(-2)!, new RegExp(`^\\d{4}-\\d\\d-\\d\\d \\S+ Dropped lines=${dropped}$`));
    assert.equal(text.at(-1), 'after');
  });

  test('a write error (ENOSPC on /dev/full) stops the log, not the requests; close reports it', async () => {
    const mem = new MemoryDevice({ size: SIZE });
    const dev = new LogFilter(mem, await LogFile.open('/dev/full'));
    for (let i = 0; i < 3; i++) {
      await dev.write(Buffer.alloc(512, i), 0, 0);
      await new Promise((r) => setImmediate(r));
    }
    await assert.rejects(dev.close(), (e: unknown) => e instanceof BlockError && e.code === 'ENOSPC' && /^log: logfile \/dev\/full: /.test(e.message));
    await assert.rejects(mem.read(Buffer.alloc(1), 0, 0), 'the device below was closed first');
  });

  test('a sink that fails at close: close still closes the device below first, then reports it', async () => {
    const sink: LogSink = {
      write: () => undefined,
      close: async () => {
        throw new BlockError('EIO', 'log: logfile x: disk gone');
      },
    };
    const mem = new MemoryDevice({ size: SIZE });
    const dev = new LogFilter(mem, sink);
    await dev.read(Buffer.alloc(1), 0, 0);
    await assert.rejects(dev.close(), /disk gone/);
    await assert.rejects(mem.read(Buffer.alloc(1), 0, 0), 'the device below was closed first');
  });
});
