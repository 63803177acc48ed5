// One test per statement ES1..ES15 of reference C.1 (/work/shared/reference/ggate-and-errseq.md),
// plus input validation and describe(). ES9..ES12 are written as watcher (connection)
// scenarios at the ErrSeq level: a "connection" is a cursor taken with sample() at open,
// and a "FLUSH" is checkAndAdvance on it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setImmediate as tick } from 'node:timers/promises';
import { linuxErrno } from '../../src/errors/index.js';
import { ERRSEQ, ErrSeq } from '../../src/errseq/index.js';

const EIO = linuxErrno('EIO');
const ENOSPC = linuxErrno('ENOSPC');

/** A connection: owns one cursor, taken when it opens. */
class Conn {
  cursor: number;
  constructor(readonly es: ErrSeq) {
    this.cursor = es.sample();
  }
  /** FLUSH: read, advance and store the cursor in one synchronous step. */
  flush(): number {
    const r = this.es.checkAndAdvance(this.cursor);
    this.cursor = r.cursor;
    return r.error;
  }
}

test('ES1 a new ErrSeq holds 0, samples as 0 and checks clean', () => {
  const es = new ErrSeq();
  assert.equal(es.value, 0);
  assert.equal(es.sample(), 0);
  assert.equal(es.check(0), 0);
  assert.equal(es.checkStrict(0), 0);
  assert.deepEqual(es.checkAndAdvance(0), { error: 0, cursor: 0 });
  assert.equal(es.value, 0, 'nothing to consume, so SEEN stays clear');
});

test('ES2 set rejects 0 and errors above MAX_ERRNO without changing the value', () => {
  const es = new ErrSeq();
  for (const bad of [0, 4096, ERRSEQ.MAX_ERRNO + 1, -EIO, 1.5, Number.NaN, Infinity]) {
    assert.throws(() => es.set(bad), RangeError, `set(${bad})`);
    assert.equal(es.value, 0, `set(${bad}) left the word alone`);
  }
  es.set(4095);
  assert.equal(es.value, 0x00000fff, 'the upper bound MAX_ERRNO is accepted');
  es.set(1);
  assert.equal(es.value, 0x00000001, 'the lower bound 1 is accepted');
  assert.throws(() => es.set(4096), RangeError);
  assert.throws(() => es.set(0), RangeError);
  assert.equal(es.value, 0x00000001, 'rejections leave a recorded error untouched');
});

test('ES3 set(EIO) on 0 gives 0x00000005: counter unchanged, SEEN clear', () => {
  const es = new ErrSeq();
  es.set(EIO);
  assert.equal(es.value, 0x00000005);
  assert.equal(es.value, EIO, 'the low bits hold the positive errno (mainline stores -err of a negative err)');
  assert.equal(es.counter, 0);
  assert.equal(es.seen, false);
  assert.equal(es.peekError(), EIO);
});

test('ES4 the same error again on an unseen value leaves the word bit-identical', () => {
  const es = new ErrSeq();
  es.set(EIO);
  const first = es.value;
  assert.equal(es.set(EIO), first, 'set returns the word before it, which it left as it was');
  assert.equal(es.value, first);
  assert.equal(es.counter, 0);
  // Also with a non-zero counter: bump once, then repeat the error unseen.
  es.checkAndAdvance(0);
  es.set(EIO);
  const bumped = es.value;
  assert.equal(bumped, (ERRSEQ.CTR_INC | EIO) >>> 0);
  es.set(EIO);
  assert.equal(es.value, bumped);
});

test('ES5 set(ENOSPC) on an unseen EIO value replaces the low 12 bits only', () => {
  const es = new ErrSeq();
  es.set(EIO);
  es.checkAndAdvance(0);
  es.set(EIO); // unseen EIO with counter 1
  const before = es.value;
  es.set(ENOSPC);
  assert.equal(es.value, ((before & ~ERRSEQ.MAX_ERRNO) | ENOSPC) >>> 0);
  assert.equal(es.counter, 1);
  assert.equal(es.seen, false);
  assert.equal(es.peekError(), ENOSPC);
});

test('ES6 set on a SEEN value clears SEEN and adds 0x2000; the counter wraps after 2^19 bumps', () => {
  const es = new ErrSeq();
  es.set(EIO);
  let cursor = es.checkAndAdvance(0).cursor;
  assert.equal(es.value, 0x00001005);
  es.set(EIO);
  assert.equal(es.value, 0x00002005, 'SEEN cleared, counter + 1');

  const bumps = 2 ** ERRSEQ.CTR_BITS;
  assert.equal(bumps, 524288);
  const firstCursor = cursor; // 0x1005, counter 0
  // One bump has happened above; do the rest, consuming before each set so it bumps.
  for (let i = 1; i < bumps; i++) {
    const r = es.checkAndAdvance(cursor);
    assert.equal(r.error, EIO);
    cursor = r.cursor;
    assert.equal(es.seen, true);
    es.set(EIO);
    if (i === bumps - 1) {
      assert.equal(es.value, 0x00000005, 'after 2^19 bumps the counter is back at 0');
    } else {
      assert.equal(es.counter, i + 1);
    }
  }
  assert.equal(es.counter, 0);
  assert.equal(es.seen, false);
  assert.notEqual(es.value, 0, 'a set word never returns to 0 (error bits stay non-zero)');
  assert.ok(Number.isInteger(es.value) && es.value >= 0 && es.value <= ERRSEQ.WORD_MAX, 'still a uint32');
  // The word just below the wrap: counter all ones, SEEN set.
  assert.equal(cursor, 0xfffff005);
  // Right after the wrapping set() the word (0x00000005) differs from a cursor exactly
  // 2^19 consumed errors old (0x00001005) in SEEN only. Mainline's errseq_check compares
  // all 32 bits and returns -EIO; check() reports the error too, since a SEEN cursor and
  // an unseen word with the same counter are reachable only through a wrap.
  assert.equal(es.checkStrict(firstCursor), EIO, 'mainline reports the wrapped error');
  assert.equal(es.check(firstCursor), EIO, 'so does check()');
  // ...and so does the previous cursor.
  assert.equal(es.check(cursor), EIO);
  // Mainline's documented collision (1 in 512k) comes one step later: once another
  // watcher consumes the wrapped error, the word is 0x00001005 again, bit-identical to the
  // old cursor, and neither comparison can see the 2^19 errors in between.
  assert.equal(es.checkAndAdvance(cursor).error, EIO);
  assert.equal(es.value, firstCursor);
  assert.equal(es.checkStrict(firstCursor), 0);
  assert.equal(es.check(firstCursor), 0);
});

test('set returns the word as it was before the call, like errseq_set in lib/errseq.c', () => {
  const es = new ErrSeq();
  assert.equal(es.set(EIO), 0, 'first error: the word was 0');
  assert.equal(es.set(EIO), 0x00000005, 'same error unseen: no change, the old word');
  assert.equal(es.set(ENOSPC), 0x00000005, 'overwrite in place: the old EIO word');
  es.checkAndAdvance(0);
  assert.equal(es.set(EIO), 0x0000101c, 'after a FLUSH consumed ENOSPC: the old word has SEEN');
  assert.equal(es.value, 0x00002005);
});

test('check reports an error to a SEEN cursor when the word wrapped to it minus SEEN, like mainline', () => {
  // The state right after exactly 2^19 consumed errors (see ES6), built directly.
  const cursor = 0x00001005;
  const es = new ErrSeq(0x00000005);
  assert.equal(es.checkStrict(cursor), EIO, "mainline's errseq_check returns -EIO here");
  assert.equal(es.check(cursor), EIO);
  assert.deepEqual(es.checkAndAdvance(cursor), { error: EIO, cursor: 0x00001005 });
});

test('ES7 sample is 0 while SEEN is clear and the exact word once SEEN is set', () => {
  const es = new ErrSeq();
  assert.equal(es.sample(), 0);
  es.set(EIO);
  assert.equal(es.sample(), 0, 'unseen: a new watcher must still be told');
  es.checkAndAdvance(0);
  assert.equal(es.sample(), 0x00001005);
  es.set(ENOSPC);
  assert.equal(es.sample(), 0);
  es.checkAndAdvance(0x00001005);
  assert.equal(es.sample(), es.value);
  assert.equal(es.sample(), (ERRSEQ.CTR_INC | ERRSEQ.SEEN | ENOSPC) >>> 0);
});

test('ES8 checkAndAdvance: equal cursor changes nothing; a different one marks SEEN and advances', () => {
  const es = new ErrSeq();
  es.set(EIO);
  es.checkAndAdvance(0);
  const cursor = es.sample();
  const word = es.value;
  assert.deepEqual(es.checkAndAdvance(cursor), { error: 0, cursor });
  assert.equal(es.value, word);

  es.set(ENOSPC);
  const current = es.value;
  assert.equal(es.seen, false);
  const r = es.checkAndAdvance(cursor);
  assert.equal(r.error, ENOSPC);
  assert.equal(r.cursor, (current | ERRSEQ.SEEN) >>> 0);
  assert.equal(es.value, r.cursor, 'the shared word gained SEEN');
  assert.equal(es.seen, true);
  assert.deepEqual(es.checkAndAdvance(r.cursor), { error: 0, cursor: r.cursor }, 'an immediate second call is clean');

  // A cursor that is already SEEN-marked for the current value does not rewrite the word.
  const again = es.checkAndAdvance(r.cursor);
  assert.equal(again.cursor, r.cursor);
  assert.equal(es.value, r.cursor);
});

test('ES9 two connections that sampled before an error each get it exactly once', () => {
  const es = new ErrSeq();
  const a = new Conn(es);
  const b = new Conn(es);
  es.set(EIO);
  assert.equal(a.flush(), EIO);
  assert.equal(a.flush(), 0);
  assert.equal(b.flush(), EIO, "a's flush did not consume b's error");
  assert.equal(b.flush(), 0);
  assert.equal(a.flush(), 0);
});

test('ES10 a connection opened after an unseen error sees it at its first FLUSH', () => {
  const es = new ErrSeq();
  es.set(EIO);
  const late = new Conn(es);
  assert.equal(late.cursor, 0);
  // Even if an older connection reports it first, the late one still gets it once.
  const early = new Conn(es);
  assert.equal(early.flush(), EIO);
  assert.equal(late.flush(), EIO);
  assert.equal(late.flush(), 0);
});

test('ES11 a connection opened after the error was reported does not see it', () => {
  const es = new ErrSeq();
  const a = new Conn(es);
  es.set(EIO);
  assert.equal(a.flush(), EIO);
  const b = new Conn(es);
  assert.equal(b.flush(), 0);
  // A later error is seen by both.
  es.set(ENOSPC);
  assert.equal(b.flush(), ENOSPC);
  assert.equal(a.flush(), ENOSPC);
});

test('ES12 only the latest error is reported: EIO then ENOSPC before a flush gives ENOSPC once', () => {
  const es = new ErrSeq();
  const a = new Conn(es);
  es.set(EIO);
  es.set(ENOSPC);
  assert.equal(a.flush(), ENOSPC);
  assert.equal(a.flush(), 0);
  // Also when the EIO had been seen by someone else in between.
  const b = new Conn(es);
  const c = new Conn(es);
  es.set(EIO);
  assert.equal(b.flush(), EIO);
  es.set(ENOSPC);
  assert.equal(c.flush(), ENOSPC);
  assert.equal(c.flush(), 0);
});

test('ES13 multi-watcher: peek plus a check that ignores SEEN gained since never consumes and never shows a phantom', () => {
  // (a) Mainline's defect: a raw copy of an unseen value, then another watcher consumes.
  const es = new ErrSeq();
  es.set(EIO);
  const snapshot = es.peek(); // 0x00000005, SEEN clear
  const consumer = new Conn(es);
  assert.equal(consumer.flush(), EIO); // word becomes 0x00001005
  assert.equal(es.checkStrict(snapshot), EIO, 'mainline errseq_check: phantom error, only SEEN moved');
  assert.equal(es.check(snapshot), 0, 'check: nothing happened since the snapshot');
  assert.deepEqual(es.checkAndAdvance(snapshot), { error: 0, cursor: snapshot }, 'nor is a phantom consumed');
  // A real later error is still reported through the snapshot.
  es.set(ENOSPC);
  assert.equal(es.check(snapshot), ENOSPC);
  assert.equal(es.checkStrict(snapshot), ENOSPC);

  // (b) Wilcox's literal sequence (seed thread): t1 samples after an unseen error, so its
  // cursor is 0 and it is *entitled* to the error; both comparisons agree there.
  const w = new ErrSeq();
  const t2 = w.sample();
  w.set(EIO);
  const t1 = w.sample();
  assert.equal(w.checkAndAdvance(t2).error, EIO);
  assert.equal(w.check(t1), EIO);
  assert.equal(w.checkStrict(t1), EIO);

  // (c) A peek never stops a later connection from seeing an unseen error.
  const p = new ErrSeq();
  p.set(EIO);
  for (let i = 0; i < 3; i++) {
    assert.equal(p.peek(), 0x00000005);
    assert.equal(p.peekError(), EIO);
    assert.equal(p.check(p.peek()), 0);
    assert.equal(p.describe().error, EIO);
    void p.value;
    void p.seen;
    void p.counter;
  }
  assert.equal(p.seen, false, 'observing never sets SEEN');
  const opener = new Conn(p);
  assert.equal(opener.flush(), EIO);
});

test('ES14 only the mainline layout: SEEN bit 12, counter from bit 13, no REPORTED/OBSERVED split', () => {
  assert.equal(ERRSEQ.MAX_ERRNO, 0x0fff);
  assert.equal(ERRSEQ.SHIFT, 12);
  assert.equal(ERRSEQ.SEEN, 1 << ERRSEQ.SHIFT);
  assert.equal(ERRSEQ.CTR_INC, 1 << (ERRSEQ.SHIFT + 1));
  assert.equal(ERRSEQ.CTR_MASK, ~(ERRSEQ.CTR_INC - 1) >>> 0);
  assert.equal(ERRSEQ.CTR_SHIFT + ERRSEQ.CTR_BITS, 32);

  // Bit 13 is the counter's lowest bit (v3 would have used it as OBSERVED).
  const es = new ErrSeq();
  es.set(EIO);
  es.checkAndAdvance(0);
  es.set(EIO);
  assert.equal(es.value, 0x00002005);
  assert.equal(es.counter, 1);

  // The word is the serialised form: a restored ErrSeq decodes and behaves the same.
  es.checkAndAdvance(0);
  es.set(ENOSPC);
  es.checkAndAdvance(0);
  const restored = new ErrSeq(es.value);
  assert.deepEqual(restored.describe(), es.describe());
  assert.deepEqual(restored.describe(), {
    error: ENOSPC,
    errorName: 'ENOSPC',
    seen: true,
    counter: 2,
    value: (2 * ERRSEQ.CTR_INC + ERRSEQ.SEEN + ENOSPC) >>> 0,
  });
  assert.equal(restored.sample(), es.sample());
  assert.equal(restored.set(EIO), es.set(EIO));
  for (const bad of [-1, 2 ** 32, 0.5, Number.NaN]) {
    assert.throws(() => new ErrSeq(bad), RangeError);
  }
});

test('ES15 cursors are caller-owned numbers; synchronous calls serialise on the event loop', async () => {
  const es = new ErrSeq();
  const conn = new Conn(es);
  const other = new Conn(es);
  es.set(EIO);
  const r = es.checkAndAdvance(conn.cursor);
  assert.equal(typeof r.cursor, 'number', 'not a Promise: the read-modify-write cannot be interleaved');
  es.set(ENOSPC);

  // Many concurrent FLUSHes on one connection, each doing read+advance+store in one
  // synchronous step after an await: the error is reported exactly once.
  conn.cursor = r.cursor;
  const results = await Promise.all(
    Array.from({ length: 16 }, async (_, i) => {
      for (let k = 0; k < i % 4; k++) await tick();
      return conn.flush();
    }),
  );
  assert.deepEqual(
    results.filter((e) => e !== 0),
    [ENOSPC],
  );
  assert.equal(other.flush(), ENOSPC, 'the other connection has its own cursor');

  // Why the cursor must be owned per session and not held across an await: two handlers
  // that read the cursor, await, then advance from the stale copy both report the error
  // (the cursor "goes backwards", mainline's file->f_lock rule).
  es.set(EIO);
  const stale = async (): Promise<number> => {
    const cursor = conn.cursor;
    await tick();
    const res = es.checkAndAdvance(cursor);
    conn.cursor = res.cursor;
    return res.error;
  };
  assert.deepEqual(await Promise.all([stale(), stale()]), [EIO, EIO]);
});

test('cursor arguments must be unsigned 32-bit integers', () => {
  const es = new ErrSeq();
  for (const bad of [-1, 2 ** 32, 1.5, Number.NaN]) {
    assert.throws(() => es.check(bad), RangeError);
    assert.throws(() => es.checkStrict(bad), RangeError);
    assert.throws(() => es.checkAndAdvance(bad), RangeError);
  }
  assert.equal(es.value, 0);
});

test('describe decodes the word and names known errors', () => {
  const es = new ErrSeq();
  assert.deepEqual(es.describe(), { error: 0, seen: false, counter: 0, value: 0 });
  es.set(EIO);
  assert.deepEqual(es.describe(), { error: EIO, errorName: 'EIO', seen: false, counter: 0, value: EIO });
  es.checkAndAdvance(0);
  es.set(4000); // a valid errno number the table has no name for
  const d = es.describe();
  assert.equal(d.error, 4000);
  assert.equal(d.errorName, undefined);
  assert.equal('errorName' in d, false);
  assert.equal(d.counter, 1);
  assert.equal(d.seen, false);
});
