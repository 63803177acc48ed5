/**
 * The README's library example must keep the write-back error guarantee: it builds a
 * stack with createStack and serves it with `new Export({ name, device })`, so the
 * Export has to report the errors the stack's layers record. The example is taken from
 * README.md itself (so the test follows the text), its stack is given the writeback and
 * error filters of docs/WRITEBACK-ERRORS.md and its port a free one, and two nbdsh
 * connections must each get EIO exactly once at FLUSH.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { PY_ERRNO_OF, nbdshOut } from './helpers/nbdsh-script.js';
import { freePort } from './helpers/ports.js';

const root = new URL('..', import.meta.url);

/** The ```ts block of the README's "## Library" section. */
async function libraryExample(): Promise<string> {
  const readme = await readFile(new URL('README.md', root), 'utf8');
  const m = /## Library\n+```ts\n([\s\S]*?)```/.exec(readme);
  assert.ok(m?.[1], 'README.md has a ```ts block under "## Library"');
  return m[1];
}

/** Replaces `from` in `code`, insisting it is there, so README drift fails loudly. */
function replaceOnce(code: string, from: string, to: string): string {
  assert.ok(code.includes(from), `the README example contains ${from}`);
  return code.replace(from, to);
}


const STACK = JSON.stringify({
  backend: { type: 'memory', size: '1G' },
  filters: [
    { type: 'writeback', maxDirty: '64M' },
    { type: 'error', ops: ['writeback'], error: 'EIO' },
  ],
});

const dir = await mkdtemp(join(new URL('.', import.meta.url).pathname, '.readme-'));
after(() => rm(dir, { recursive: true, force: true }));

// Without createStack recording its ErrSeq for the Export, the Export makes a fresh one
// and both FLUSHes succeed: the defect this test exists to catch.
test(
  'the README library example reports a background write-back EIO once to each connection at FLUSH',
  async () => {
  const port = await freePort();
  let code = await libraryExample();
  code = replaceOnce(code, "from 'blockgate'", `from ${JSON.stringify(pathToFileURL(new URL('src/index.ts', root).pathname).href)}`);
  code = replaceOnce(code, "{ backend: { type: 'memory', size: '1G' } }", STACK);
  code = replaceOnce(code, 'port: 10809', `port: ${port}`);
  code += '\nexport { server };\n';
  const file = join(dir, 'example.ts');
  await writeFile(file, code);
  const { server } = (await import(pathToFileURL(file).href)) as { server: { close(graceMs?: number): Promise<void> } };
  try {
    const out = await nbdshOut(
      `import json, os
${PY_ERRNO_OF}
h.connect_uri(os.environ['uri'])
h2 = nbd.NBD()
h2.connect_uri(os.environ['uri'])
out = {}
h.pwrite(b'x' * 4096, 0)  # acknowledged by the cache; its write-back will fail
out['a1'] = errno_of(h.flush)
out['a2'] = errno_of(h.flush)
out['b1'] = errno_of(h2.flush)
out['b2'] = errno_of(h2.flush)
`,
      `nbd://127.0.0.1:${port}/`,
    );
    assert.deepEqual(out, { a1: 'EIO', a2: null, b1: 'EIO', b2: null });
  } finally {
    await server.close(1000);
  }
  },
);
