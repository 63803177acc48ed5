// docs/GGATEC.md must describe what ggatec create does with a server's media size that
// is not whole sectors: the link refuses it with EINVAL (as FreeBSD's kernel refuses
// such a gate), it does not round it down. Only -s rounds, to whole -s sectors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { validateSinit } from '../../src/ggate/validate.js';
import { gateGeometry } from '../../src/cli/ggatec.js';

const DOC = fs.readFileSync(path.resolve(import.meta.dirname, '../../docs/GGATEC.md'), 'utf8').replace(/\s+/g, ' ');

test('ggatec refuses a server media size that is not whole sectors with EINVAL, and the docs say so', () => {
  assert.equal(validateSinit({ error: null, mediasize: 10_000, sectorsize: 512 }), 'EINVAL');
  assert.equal(validateSinit({ error: null, mediasize: 0, sectorsize: 512 }), 'EINVAL');
  assert.equal(validateSinit({ error: null, mediasize: 9728, sectorsize: 512 }), null);
  assert.doesNotMatch(DOC, /create rounds it down/);
  assert.match(DOC, /not a multiple of its own sector size is refused with EINVAL/);
});

test('ggatec -s rounds a whole-sector media size down to whole -s sectors, as the docs say', () => {
  assert.deepEqual(gateGeometry({ mediasize: 10 * 512, sectorsize: 512 }, 4096), { mediasize: 4096, sectorsize: 4096 });
  assert.match(DOC, /the media size is then rounded down to whole sectors/);
});
