/**
 * A double-ended queue on a growable ring buffer: the gate's pending queue takes new
 * requests at the back and requeued ones (EAGAIN, cancel) at the front, both in O(1);
 * an array's unshift would be O(n) on an unlimited queue.
 */
export class Deque<T> {
  #buf: (T | undefined)[] = new Array<T | undefined>(16);
  #head = 0;
  #size = 0;

  get size(): number {
    return this.#size;
  }

  peekFront(): T | undefined {
    return this.#size === 0 ? undefined : this.#buf[this.#head];
  }

  pushBack(item: T): void {
    this.#grow();
    this.#buf[(this.#head + this.#size) % this.#buf.length] = item;
    this.#size++;
  }

  pushFront(item: T): void {
    this.#grow();
    this.#head = (this.#head - 1 + this.#buf.length) % this.#buf.length;
    this.#buf[this.#head] = item;
    this.#size++;
  }

  popFront(): T | undefined {
    if (this.#size === 0) return undefined;
    const item = this.#buf[this.#head];
    this.#buf[this.#head] = undefined;
    this.#head = (this.#head + 1) % this.#buf.length;
    this.#size--;
    return item;
  }

  /** Removes every item and returns them front to back. */
  drain(): T[] {
    const out = [...this];
    this.#buf = new Array<T | undefined>(16);
    this.#head = 0;
    this.#size = 0;
    return out;
  }

  /** Removes every item without returning them (no array is built). */
  clear(): void {
    this.#buf = new Array<T | undefined>(16);
    this.#head = 0;
    this.#size = 0;
  }

  /** Keeps only the items for which `keep` is true, in order; returns the removed ones. */
  filter(keep: (item: T) => boolean): T[] {
    const removed: T[] = [];
    const kept: T[] = [];
    for (const item of this) (keep(item) ? kept : removed).push(item);
    if (removed.length > 0) {
      this.drain();
      for (const item of kept) this.pushBack(item);
    }
    return removed;
  }

  *[Symbol.iterator](): IterableIterator<T> {
    for (let i = 0; i < this.#size; i++) yield this.#buf[(this.#head + i) % this.#buf.length] as T;
  }

  #grow(): void {
    if (this.#size < this.#buf.length) return;
    const items = [...this];
    this.#buf = new Array<T | undefined>(this.#buf.length * 2);
    for (let i = 0; i < items.length; i++) this.#buf[i] = items[i];
    this.#head = 0;
  }
}
