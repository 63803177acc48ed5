import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BUCKETS, LATENCY_BOUNDS_S, bucketOf, quantile } from '../../src/metrics/histogram.js';
import { COMMANDS, RESULTS, RequestFigures, commandSlot, resultSlot } from '../../src/metrics/figures.js';
import { NBD_ERROR } from '../../src/errors/index.js';

test('bucket bounds run from 10 µs to 10 s, increasing, with a +Inf bucket after them', () => {
  assert.equal(LATENCY_BOUNDS_S[0], 0.00001);
  assert.equal(LATENCY_BOUNDS_S.at(-1), 10);
  for (let i = 1; i < LATENCY_BOUNDS_S.length; i++) assert.ok(LATENCY_BOUNDS_S[i]! > LATENCY_BOUNDS_S[i - 1]!);
  assert.equal(BUCKETS, LATENCY_BOUNDS_S.length + 1);
});

test("a latency falls in the first bucket whose bound is >= it (Prometheus's le), beyond 10 s in +Inf", () => {
  assert.equal(bucketOf(0), 0);
  assert.equal(bucketOf(0.00001), 0, 'on the bound: that bucket');
  assert.equal(bucketOf(0.0000101), 1);
  assert.equal(bucketOf(0.0003), LATENCY_BOUNDS_S.indexOf(0.0005));
  assert.equal(bucketOf(10), LATENCY_BOUNDS_S.length - 1);
  assert.equal(bucketOf(10.5), LATENCY_BOUNDS_S.length);
});

test('quantiles are the bound of the bucket the rank falls in; empty is null, +Inf is Infinity', () => {
  const h = new Float64Array(BUCKETS);
  assert.equal(quantile(h, 0.5), null);
  // 98 requests at <= 100 µs, 1 at <= 1 ms, 1 beyond 10 s.
  h[bucketOf(0.0001)] = 98;
  h[bucketOf(0.001)] = 1;
  h[BUCKETS - 1] = 1;
  assert.equal(quantile(h, 0.5), 0.0001);
  assert.equal(quantile(h, 0.98), 0.0001);
  assert.equal(quantile(h, 0.99), 0.001);
  assert.equal(quantile(h, 1), Infinity);
  assert.equal(quantile(h, 0), 0.0001, 'q = 0: the first observation');
});

test('a quantile reads the histogram at an offset, so one array holds one histogram per command', () => {
  const h = new Float64Array(BUCKETS * 2);
  h[BUCKETS + bucketOf(0.004)] = 3;
  assert.equal(quantile(h, 0.5, 0), null);
  assert.equal(quantile(h, 0.5, BUCKETS), 0.005);
});

test('slots: NBD commands by value, unknown ones as other; NBD errors by name, unlisted values as other', () => {
  assert.equal(COMMANDS[commandSlot(0)], 'read');
  assert.equal(COMMANDS[commandSlot(6)], 'write_zeroes');
  assert.equal(COMMANDS[commandSlot(7)], 'block_status');
  assert.equal(COMMANDS[commandSlot(8)], 'other');
  assert.equal(COMMANDS[commandSlot(0xffff)], 'other');
  assert.equal(RESULTS[resultSlot(0)], 'ok');
  for (const [name, value] of Object.entries(NBD_ERROR)) {
    if (value !== 0) assert.equal(RESULTS[resultSlot(value)], name.replace(/^NBD_/, ''));
  }
  assert.equal(RESULTS[resultSlot(3)], 'other');
  assert.equal(RESULTS[resultSlot(1000)], 'other');
});

test('request figures: in-flight rises and falls, bytes count only successful reads and writes', () => {
  const f = new RequestFigures('disk', 'unix:/x');
  const t0 = performance.now();
  f.begin(4096);
  f.begin(0);
  assert.equal(f.inFlightRequests, 2);
  assert.equal(f.inFlightBytes, 4096);
  f.end(1, 4096, 4096, 0, t0);
  f.end(0, 512, 0, NBD_ERROR.NBD_EIO, t0);
  assert.equal(f.inFlightRequests, 0);
  assert.equal(f.inFlightBytes, 0);
  assert.equal(f.bytesWritten, 4096);
  assert.equal(f.bytesRead, 0, 'a failed read moved no bytes');
  assert.equal(f.requests[1 * RESULTS.length + 0], 1);
  assert.equal(f.requests[0 * RESULTS.length + RESULTS.indexOf('EIO')], 1);
  let writeLatencies = 0;
  for (let b = 0; b < BUCKETS; b++) writeLatencies += f.latency[1 * BUCKETS + b]!;
  assert.equal(writeLatencies, 1);
});
