import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { FrameReader } from '../../src/io/framer.js';

test('FrameReader.buffered counts the bytes received and not yet consumed, whatever the chunking (property)', () => {
  fc.assert(
    fc.property(
      fc.array(fc.integer({ min: 1, max: 50 }), { minLength: 1, maxLength: 40 }),
      fc.array(fc.integer({ min: 1, max: 7 }), { minLength: 1, maxLength: 60 }),
      fc.integer({ min: 0, max: 20 }),
      (chunkSizes, frameSizes, pauseAfter) => {
        const r = new FrameReader(8);
        let consumed = 0;
        let pushed = 0;
        let frames = 0;
        let i = 0;
        // Alternates fixed frames, bodies and skips so every mode moves the count.
        const next = (): void => {
          if (i >= frameSizes.length) return;
          const size = frameSizes[i]!;
          const kind = i++ % 3;
          const done = (): void => {
            consumed += size;
            if (++frames === pauseAfter) {
              r.pause();
              paused = true;
            }
            next();
          };
          if (kind === 0) r.expectFixed(size, done);
          else if (kind === 1) r.expectBody(size, done);
          else r.expectSkip(size, done);
        };
        // A running reader with an expectation takes every byte that arrives (a frame cut
        // short into its scratch or body buffer). Paused (right after a frame) or with
        // nothing more expected, it holds exactly what no finished frame took.
        let paused = false;
        const expectBuffered = (): void => assert.equal(r.buffered, paused || frames === frameSizes.length ? pushed - consumed : 0);
        next();
        for (const n of chunkSizes) {
          r.push(Buffer.alloc(n));
          pushed += n;
          expectBuffered();
        }
        r.resume();
        paused = false;
        expectBuffered();
        r.stop();
        assert.equal(r.buffered, 0);
      },
    ),
  );
});

test('FrameReader.buffered is zero after discard, and stays zero as bytes keep arriving', () => {
  const r = new FrameReader(4);
  r.push(Buffer.alloc(10));
  assert.equal(r.buffered, 10);
  r.discard();
  r.push(Buffer.alloc(10));
  assert.equal(r.buffered, 0);
});
