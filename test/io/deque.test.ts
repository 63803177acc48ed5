import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { Deque } from '../../src/io/deque.js';

type Op = { op: 'pushBack' | 'pushFront'; v: number } | { op: 'popFront' } | { op: 'filter'; mod: number };

test('Deque behaves like an array used as a double-ended queue (property)', () => {
  const op: fc.Arbitrary<Op> = fc.oneof(
    fc.record({ op: fc.constant('pushBack' as const), v: fc.integer() }),
    fc.record({ op: fc.constant('pushFront' as const), v: fc.integer() }),
    fc.record({ op: fc.constant('popFront' as const) }),
    fc.record({ op: fc.constant('filter' as const), mod: fc.integer({ min: 2, max: 5 }) }),
  );
  fc.assert(
    fc.property(fc.array(op, { maxLength: 300 }), (ops) => {
      const d = new Deque<number>();
      const model: number[] = [];
      for (const o of ops) {
        switch (o.op) {
          case 'pushBack':
            d.pushBack(o.v);
            model.push(o.v);
            break;
          case 'pushFront':
            d.pushFront(o.v);
            model.unshift(o.v);
            break;
          case 'popFront':
            assert.equal(d.popFront(), model.shift());
            break;
          case 'filter': {
            const keep = (x: number): boolean => Math.abs(x) % o.mod !== 0;
            const removed = d.filter(keep);
            assert.deepEqual(
              removed,
              model.filter((x) => !keep(x)),
            );
            model.splice(0, model.length, ...model.filter(keep));
            break;
          }
        }
        assert.equal(d.size, model.length);
        assert.equal(d.peekFront(), model[0]);
      }
      assert.deepEqual([...d], model);
      assert.deepEqual(d.drain(), model);
      assert.equal(d.size, 0);
    }),
  );
});

test('Deque.clear empties it and it keeps working afterwards', () => {
  const d = new Deque<number>();
  for (let i = 0; i < 40; i++) d.pushBack(i);
  d.clear();
  assert.equal(d.size, 0);
  assert.equal(d.popFront(), undefined);
  d.pushFront(1);
  d.pushBack(2);
  assert.deepEqual([...d], [1, 2]);
});
