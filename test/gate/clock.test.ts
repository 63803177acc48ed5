import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ManualClock, systemClock } from '../../src/gate/index.js';

test('ManualClock fires periodic timers in time order with now() at each due time', () => {
  const clock = new ManualClock(1000);
  const seen: string[] = [];
  const a = clock.every(300, () => seen.push(`a@${clock.now()}`));
  clock.every(500, () => seen.push(`b@${clock.now()}`));
  clock.advance(999);
  assert.deepEqual(seen, ['a@1300', 'b@1500', 'a@1600', 'a@1900']);
  assert.equal(clock.now(), 1999);
  a.cancel();
  assert.equal(clock.activeTimers, 1);
  seen.length = 0;
  clock.advance(1000);
  assert.deepEqual(seen, ['b@2000', 'b@2500']);
  assert.throws(() => clock.every(0, () => undefined), RangeError);
});

test('systemClock timers can be cancelled and do not keep the process alive', () => {
  const t = systemClock.every(3_600_000, () => assert.fail('must not fire'));
  t.cancel();
  assert.ok(Math.abs(systemClock.now() - Date.now()) < 1000);
});
