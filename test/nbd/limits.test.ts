import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/backends/memory.js';
import { DEFAULT_LIMITS, MAX_PAYLOAD_LIMIT, NbdServer, validateLimits } from '../../src/nbd/index.js';
import { Export } from '../../src/export/index.js';

const exports = () => [new Export({ name: '', device: new MemoryDevice({ size: 1 << 20 }) })];

test('the default limits are valid', () => {
  assert.deepEqual(validateLimits({ ...DEFAULT_LIMITS }), DEFAULT_LIMITS);
});

test('a server refuses limits it could not honour, naming the key', () => {
  // Above 2^32 - 9 neither NBD_INFO_BLOCK_SIZE nor a compact structured READ reply can carry it.
  assert.throws(() => new NbdServer({ exports: exports(), limits: { maxPayload: MAX_PAYLOAD_LIMIT + 1 } }), {
    code: 'EINVAL',
    message: /limits\.maxPayload/,
  });
  assert.throws(() => new NbdServer({ exports: exports(), limits: { maxInFlightRequests: 0 } }), /limits\.maxInFlightRequests/);
  assert.throws(() => new NbdServer({ exports: exports(), limits: { maxOptions: -1 } }), /limits\.maxOptions/);
  assert.throws(() => new NbdServer({ exports: exports(), limits: { handshakeTimeoutMs: 1.5 } }), /limits\.handshakeTimeoutMs/);
  assert.throws(() => new NbdServer({ exports: exports(), limits: { maxConnections: 0 } }), /limits\.maxConnections/);
  assert.throws(() => new NbdServer({ exports: exports(), limits: { maxServerInFlightBytes: 0 } }), /limits\.maxServerInFlightBytes/);
  assert.doesNotThrow(() => new NbdServer({ exports: exports(), limits: { maxPayload: MAX_PAYLOAD_LIMIT } }));
});

test('the server-wide defaults: 100 connections and a 10 s handshake (as qemu), 8 sessions of in-flight bytes', () => {
  assert.equal(DEFAULT_LIMITS.maxConnections, 100);
  assert.equal(DEFAULT_LIMITS.handshakeTimeoutMs, 10_000);
  assert.equal(DEFAULT_LIMITS.maxServerInFlightBytes, 8 * DEFAULT_LIMITS.maxInFlightBytes);
});
