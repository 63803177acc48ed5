/**
 * ErrSeq: Linux's `errseq_t` (mainline lib/errseq.c, include/linux/errseq.h), bit-exact.
 *
 * One ErrSeq per exported device plays `sb->s_wb_err` / `mapping->wb_err`: backend write or
 * flush failures are recorded with {@link ErrSeq.set} even when no client is waiting for
 * the request (write-back acknowledgements). Each client session owns a cursor (a plain
 * number, playing `file->f_wb_err`) taken with {@link ErrSeq.sample} when the session
 * opens, and FLUSH calls {@link ErrSeq.checkAndAdvance} with it (playing fsync/syncfs).
 * The result: every session open at the time of an error sees it exactly once; a session
 * opened after an error sees it only if nobody has reported it yet; only the latest error
 * is kept (reference C.1, B.3 "Guarantees").
 *
 * Layout of the 32-bit unsigned word (mainline; the only layout this module uses,
 * accepts or produces, so it is also the only one that may be persisted - ES14):
 *
 *   bits 31..13  counter (19 bits, 524288 values, wraps modulo 2^32 without error)
 *   bit  12      SEEN ("SF"): someone has consumed the current value, so the next
 *                error must bump the counter, and new samplers need not see it
 *   bits 11..0   the error: a positive Linux errno, 1..MAX_ERRNO (0 = none ever)
 *
 * The error bits: mainline stores `-err` where the kernel's `err` is negative (-EIO), so
 * the low 12 bits hold the positive errno itself (EIO = 5 gives 0x00000005, ES3). This
 * API takes and returns positive errnos throughout; the kernel's negative convention
 * exists only in the C code, not here.
 *
 * A word that was ever set never returns to 0 (the error bits stay non-zero), so 0 means
 * "no error ever". The counter only moves when SEEN was set, so an error that nobody has
 * looked at is overwritten in place. The counter wraps after 2^19 bumps, so a cursor
 * exactly k * 2^19 consumed errors old equals the word again once the wrapped error has
 * been consumed too, and then reports nothing (mainline's documented "1 in 512k" risk).
 * Right after the wrapping set(), before anyone consumes it, the word still differs
 * from such a cursor in SEEN, and both mainline and this module report the error.
 *
 * Deliberate differences from mainline, both about comparing a cursor with the word:
 * - {@link ErrSeq.check} and {@link ErrSeq.checkAndAdvance} ignore SEEN in one direction
 *   only: a word that equals the cursor plus SEEN holds nothing new (Wilcox 2020-12-19).
 *   Mainline compares all 32 bits, so a cursor copied raw with {@link ErrSeq.peek} while
 *   the error was unseen reports, after another watcher consumed that error, an error
 *   that did not happen. The opposite difference (cursor with SEEN, word without) is
 *   reachable only through a counter wrap, so it counts as new, as in mainline; the
 *   symmetric mask of the unmerged v2/v3 `errseq_same()` would report 0 there. For
 *   cursors produced by `sample()` / `checkAndAdvance()` (0, or with SEEN set) the
 *   comparison is therefore exactly mainline's; it only removes the phantom for raw
 *   copies. {@link ErrSeq.checkStrict} keeps mainline's comparison, to demonstrate the
 *   defect in tests.
 * - There is no v3 REPORTED/OBSERVED split (ES14). v3 needed OBSERVED because its
 *   `errseq_peek` wrote to the word; our {@link ErrSeq.peek} never writes, so it cannot
 *   stop a later sampler from seeing an unseen error, and it cannot make anyone see a
 *   phantom once comparisons ignore a SEEN the cursor lacks. The price of not writing: a snapshot taken by
 *   peek while an *unseen* error is present can miss a later error that leaves the word
 *   bit-identical (the same error again, or an A-B-A of error values, with nobody
 *   consuming in between, because the counter only moves after SEEN). A snapshot taken
 *   while the word is 0 or has SEEN set is exact: every later `set` changes the word.
 *   That is why a "volatile" observer must refuse to start on an unseen error (FL6,
 *   overlayfs' "Cannot mount volatile when upperdir has an unseen error").
 *
 * Concurrency (ES15): mainline uses cmpxchg loops because kernel callers race. Here the
 * word lives in one JS realm and every method is synchronous, so JavaScript's
 * run-to-completion rule serialises all updates of the word; no Atomics are needed. The
 * caller still owns each cursor and must read, advance and store it without an `await`
 * in between (one cursor per session), or the cursor can go backwards and an error be
 * reported twice - exactly the `file->f_lock` rule of mainline. Sharing the word across
 * worker_threads would need `Atomics.compareExchange` on a shared Uint32Array instead.
 */
import { codeFromLinux, type ErrnoCode } from '../errors/index.js';

/** Bit layout constants, named as in lib/errseq.c. */
export const ERRSEQ = {
  /** Linux MAX_ERRNO: the largest errno, and (being 2^12 - 1) the mask of the error bits. */
  MAX_ERRNO: 0x0fff,
  /** ERRSEQ_SHIFT = ilog2(MAX_ERRNO + 1): the number of error bits. */
  SHIFT: 12,
  /** ERRSEQ_SEEN, bit 12: the current value has been consumed by some watcher. */
  SEEN: 0x1000,
  /** ERRSEQ_CTR_INC, bit 13: the lowest counter bit. */
  CTR_INC: 0x2000,
  /** Position of the counter's lowest bit (SHIFT + 1). */
  CTR_SHIFT: 13,
  /** Width of the counter (32 - CTR_SHIFT); it wraps after 2^CTR_BITS increments. */
  CTR_BITS: 19,
  /** The counter bits 31..13 as an unsigned mask. */
  CTR_MASK: 0xffffe000,
  /** Largest value of the 32-bit word. */
  WORD_MAX: 0xffffffff,
} as const;

/** What {@link ErrSeq.checkAndAdvance} returns. */
export interface CheckAndAdvanceResult {
  /** The positive errno reported to this watcher, or 0 when nothing happened since its cursor. */
  readonly error: number;
  /** The cursor to store for the next call (unchanged when `error` is 0). */
  readonly cursor: number;
}

/** A decoded word, for logs, health checks and metrics. */
export interface ErrSeqState {
  /** The positive errno in the error bits, 0 if none was ever recorded. */
  readonly error: number;
  /** The symbolic name of `error`, when the errno table knows it. */
  readonly errorName?: ErrnoCode;
  /** Whether the SEEN flag is set. */
  readonly seen: boolean;
  /** The counter (bits 31..13). */
  readonly counter: number;
  /** The raw 32-bit word. */
  readonly value: number;
}

function isUint32(x: unknown): x is number {
  return typeof x === 'number' && Number.isInteger(x) && x >= 0 && x <= ERRSEQ.WORD_MAX;
}

function assertCursor(cursor: number, what: string): void {
  if (!isUint32(cursor)) {
    throw new RangeError(`ErrSeq.${what}: cursor ${String(cursor)} is not an unsigned 32-bit integer`);
  }
}

/**
 * Whether the word `cur` holds nothing new for a watcher whose cursor is `since`: equal,
 * or `cur` is `since` plus SEEN (the cursor was copied raw by peek() while the error was
 * unseen and some other watcher has consumed it since - mainline's phantom).
 *
 * The opposite case, a cursor with SEEN and a word equal to it except that SEEN is clear,
 * counts as new, as in mainline. A word loses SEEN only through set(), and set() on a
 * SEEN word bumps the counter, so that state is reachable only after the counter went
 * round exactly k * 2^19 times since the cursor was taken: at least 2^19 errors really
 * happened. The symmetric mask of the v2/v3 `errseq_same()` reported 0 there (e.g. cursor
 * 0x00001005, word 0x00000005) where mainline reports -EIO; keeping SEEN significant in
 * this direction removes that false "no error" and makes the compare agree with
 * mainline's for every cursor that sample()/checkAndAdvance() can produce.
 */
function sameForCursor(cur: number, since: number): boolean {
  return cur === since || cur === (since | ERRSEQ.SEEN) >>> 0;
}

/**
 * One errseq word. The word is private; watchers hold cursors (plain numbers) obtained
 * from {@link sample} and {@link checkAndAdvance}. See the module comment for layout and
 * semantics.
 */
export class ErrSeq {
  #word: number;
  /**
   * Observers' figures, outside the word (which stays mainline's bit for bit): how many
   * set() calls changed it (new errors a watcher can be told of), and how many
   * checkAndAdvance() calls reported an error. Reading them consumes nothing.
   */
  #recorded = 0;
  #reported = 0;

  /**
   * @param initial a word in the mainline layout, e.g. one persisted from {@link value};
   *   defaults to 0 ("no error ever").
   */
  constructor(initial = 0) {
    if (!isUint32(initial)) {
      throw new RangeError(`ErrSeq: initial value ${String(initial)} is not an unsigned 32-bit integer`);
    }
    this.#word = initial >>> 0;
  }

  /**
   * errseq_set: records `err` (a positive Linux errno, 1..MAX_ERRNO), overwriting any
   * previous error. The counter is bumped only if the previous value had been seen;
   * setting the same error again on an unseen value changes nothing. Throws RangeError,
   * leaving the word unchanged, for 0 (it would erase an error), for values above
   * MAX_ERRNO, and for negative or non-integer values (mainline's `-EIO` convention is
   * not accepted, so a sign slip cannot record a different error).
   *
   * Returns the word as it was before this call, as mainline does: lib/errseq.c's
   * kernel-doc says "the latest value", but the code returns `cur`, which is what
   * cmpxchg found, i.e. the old word (and `old` on the no-change and WARN paths). It is
   * for debugging only: never use it as a cursor (use {@link sample}); compare it with
   * {@link value} to tell whether the call changed the word.
   */
  set(err: number): number {
    if (!Number.isInteger(err) || err < 1 || err > ERRSEQ.MAX_ERRNO) {
      throw new RangeError(`ErrSeq.set: error ${String(err)} is not an errno in 1..${ERRSEQ.MAX_ERRNO}`);
    }
    const old = this.#word;
    let next = ((old & ~(ERRSEQ.MAX_ERRNO | ERRSEQ.SEEN)) | err) >>> 0;
    // Only bump the counter if someone has looked at the old value; otherwise nobody
    // could tell the two errors apart, and overwriting in place loses nothing they need.
    if (old & ERRSEQ.SEEN) next = (next + ERRSEQ.CTR_INC) >>> 0;
    if (next !== old) this.#recorded++;
    this.#word = next;
    return old;
  }

  /**
   * errseq_sample: the cursor for a new watcher. 0 if the current error has not been
   * seen (so the new watcher will be told about it: "report at least once", Wilcox's
   * b4678df184b3), else the word itself (errors before now are not its business).
   */
  sample(): number {
    const cur = this.#word;
    return cur & ERRSEQ.SEEN ? cur : 0;
  }

  /**
   * errseq_check, except that a word equal to `since` plus SEEN counts as unchanged (see
   * the module comment): the positive errno of the latest error if
   * one happened since `since`, else 0. Never changes the word or the cursor, so it is
   * safe for observers that must not consume errors (health checks, volatile mode).
   */
  check(since: number): number {
    assertCursor(since, 'check');
    const cur = this.#word;
    return sameForCursor(cur, since) ? 0 : cur & ERRSEQ.MAX_ERRNO;
  }

  /**
   * Mainline errseq_check exactly: full 32-bit comparison. A cursor that differs from
   * the word only in SEEN reports a phantom error (the multi-watcher defect Wilcox
   * raised on 2020-12-19). Kept to document and test that behaviour; use {@link check}.
   */
  checkStrict(since: number): number {
    assertCursor(since, 'checkStrict');
    const cur = this.#word;
    return cur === since ? 0 : cur & ERRSEQ.MAX_ERRNO;
  }

  /**
   * errseq_check_and_advance: if an error happened since `cursor`, marks the word SEEN
   * (the error now counts as reported: new samplers will not see it, the next error
   * bumps the counter) and returns that error with the new cursor `word | SEEN`;
   * otherwise returns `{ error: 0, cursor }` and changes nothing.
   *
   * The comparison is {@link check}'s (mainline compares all 32 bits). The two agree for
   * cursors from sample()/checkAndAdvance(); a raw-copied cursor (from {@link peek})
   * behaves like check() instead of reporting and consuming a phantom. So `checkAndAdvance(c).error === check(c)` always holds.
   */
  checkAndAdvance(cursor: number): CheckAndAdvanceResult {
    assertCursor(cursor, 'checkAndAdvance');
    const cur = this.#word;
    if (sameForCursor(cur, cursor)) return { error: 0, cursor };
    const next = (cur | ERRSEQ.SEEN) >>> 0;
    this.#word = next;
    this.#reported++;
    return { error: next & ERRSEQ.MAX_ERRNO, cursor: next };
  }

  /**
   * The current word, without consuming anything (never sets SEEN): for health checks,
   * metrics and volatile snapshots (see the module comment for when a snapshot is exact).
   */
  peek(): number {
    return this.#word;
  }

  /** The positive errno in the error bits, 0 if no error was ever recorded. Never consumes. */
  peekError(): number {
    return this.#word & ERRSEQ.MAX_ERRNO;
  }

  /** How many set() calls changed the word: errors recorded that a watcher could be told of (metrics). */
  get recorded(): number {
    return this.#recorded;
  }

  /** How many checkAndAdvance() calls reported an error to their watcher (metrics). */
  get reported(): number {
    return this.#reported;
  }

  /** The raw 32-bit word (same as {@link peek}); the only serialisable form. */
  get value(): number {
    return this.#word;
  }

  /** Whether the current value has been consumed by some watcher. */
  get seen(): boolean {
    return (this.#word & ERRSEQ.SEEN) !== 0;
  }

  /** The counter, bits 31..13 (0..2^19-1). */
  get counter(): number {
    return this.#word >>> ERRSEQ.CTR_SHIFT;
  }

  /** The word decoded, without consuming anything. */
  describe(): ErrSeqState {
    const word = this.#word;
    const error = word & ERRSEQ.MAX_ERRNO;
    const errorName = error === 0 ? undefined : codeFromLinux(error);
    const state = { error, seen: (word & ERRSEQ.SEEN) !== 0, counter: word >>> ERRSEQ.CTR_SHIFT, value: word };
    return errorName === undefined ? state : { ...state, errorName };
  }
}
