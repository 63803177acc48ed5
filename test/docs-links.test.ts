/**
 * The documentation stays inside the repository: README.md and docs/*.md are shipped in
 * the npm package, where nothing outside the repository exists.
 *
 * - Every Markdown link (inline `[text](target)`, image, or reference definition
 *   `[label]: target`) whose target is not a URL must be a relative path that stays inside
 *   the repository and names an existing file or directory (a `#fragment` is ignored).
 *   An absolute path or a `file:` URL fails.
 * - Every backticked relative path (an inline code span that is one path with a `/`)
 *   must not climb out of the repository, whether read from the repository root (as the
 *   docs cite `src/...`) or from the document's directory: so a backticked `../README.md`
 *   in docs/ fails too (ambiguous; write it as a link or as `README.md`). Backticked paths need not
 *   exist: the docs also quote other projects' paths (FreeBSD's `sbin/ggate/...`).
 *
 * Fenced code blocks are shell sessions and program output, not links, and are skipped.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

const INLINE_CODE = /(`+)([\s\S]*?[^`])\1(?!`)/g;
const INLINE_LINK = /!?\[(?:[^[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:"[^"]*"|'[^']*'|\([^)]*\)))?\s*\)/g;
const REFERENCE_DEF = /^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)/gm;
const URL_SCHEME = /^[a-z][a-z0-9+.-]*:/i;
const PATH_LIKE = /^(?:\.{1,2}|[\w@~+-][\w.@~+-]*)(?:\/[\w.@~+-]*)+$/;

/** The prose of a Markdown document: fenced code blocks replaced by empty lines. */
function prose(text: string): string {
  const out: string[] = [];
  let fence: string | undefined;
  for (const line of text.split('\n')) {
    const m = /^ {0,3}(`{3,}|~{3,})/.exec(line);
    if (fence === undefined && m) fence = m[1]![0]!.repeat(m[1]!.length);
    else if (fence !== undefined && m && m[1]!.startsWith(fence)) fence = undefined;
    else if (fence === undefined) { out.push(line); continue; }
    out.push('');
  }
  return out.join('\n');
}

function inside(root: string, p: string): boolean {
  const rel = path.relative(root, p);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

/**
 * The problems of one document, as "file: message" strings. `file` is the document's path
 * relative to `root`.
 */
export function linkProblems(root: string, file: string, text: string): string[] {
  const problems: string[] = [];
  const dir = path.dirname(path.join(root, file));
  const body = prose(text);

  for (const m of body.matchAll(INLINE_CODE)) {
    const code = m[2]!.trim();
    if (!PATH_LIKE.test(code)) continue;
    for (const base of [root, dir]) {
      if (!inside(root, path.resolve(base, code))) {
        problems.push(`${file}: backticked path \`${code}\` points outside the repository`);
        break;
      }
    }
  }

  const links = body.replace(INLINE_CODE, (s) => ' '.repeat(s.length));
  const targets = [...links.matchAll(INLINE_LINK), ...links.matchAll(REFERENCE_DEF)].map((m) => m[1]!.replace(/^<|>$/g, ''));
  for (const target of targets) {
    if (target.startsWith('#')) continue;
    if (URL_SCHEME.test(target)) {
      if (/^file:/i.test(target)) problems.push(`${file}: link ${target} is a file: URL`);
      continue;
    }
    let p = target.replace(/[#?].*$/, '');
    try { p = decodeURIComponent(p); } catch { /* keep it as written */ }
    if (path.isAbsolute(p)) {
      problems.push(`${file}: link ${target} is an absolute path`);
      continue;
    }
    const resolved = path.resolve(dir, p);
    if (!inside(root, resolved)) problems.push(`${file}: link ${target} points outside the repository`);
    else if (!fs.existsSync(resolved)) problems.push(`${file}: link ${target} names no file (${path.relative(root, resolved)})`);
  }
  return problems;
}

function documents(): string[] {
  const docs = fs.readdirSync(path.join(ROOT, 'docs')).filter((f) => f.endsWith('.md')).sort().map((f) => `docs/${f}`);
  return ['README.md', ...docs];
}

describe('the link checker', () => {
  const check = (text: string): string[] => linkProblems(ROOT, 'docs/X.md', text);

  test('accepts URLs, anchors, links to existing files and backticked paths inside the repository', () => {
    assert.deepEqual(check([
      'See [the spec](https://example.org/a/../b), [below](#below), [config](CONFIG.md#tls),',
      '[readme](../README.md), [sources](../src/) and ![x](<GGATE.md> "title").',
      '`src/ggate/ggated.ts`, `sbin/ggate/shared/ggate.h`, `docs/CONFIG.md`, `/etc/gg.exports`, `a | b`.',
      '[ref]: SECURITY.md',
      '```',
      '[not a link](../../outside.md) `../../outside.md`',
      '```',
    ].join('\n')), []);
  });

  test('rejects links and backticked paths that leave the repository, and links to missing files', () => {
    const problems = check([
      'Background: `../shared/reference/ggate-and-errseq.md` A.3.',
      'Also `../../etc/x`, [up](../../shared/x.md), [abs](/work/shared/x.md), [f](file:///etc/passwd),',
      '[missing](NOPE.md) and a reference:',
      '[r]: ../../r.md',
    ].join('\n'));
    assert.equal(problems.length, 7, problems.join('\n'));
    assert.match(problems[0]!, /`\.\.\/shared\/reference\/ggate-and-errseq\.md` points outside/);
    assert.match(problems[1]!, /`\.\.\/\.\.\/etc\/x` points outside/);
    assert.match(problems[2]!, /link \.\.\/\.\.\/shared\/x\.md points outside/);
    assert.match(problems[3]!, /is an absolute path/);
    assert.match(problems[4]!, /is a file: URL/);
    assert.match(problems[5]!, /NOPE\.md names no file/);
    assert.match(problems[6]!, /\.\.\/\.\.\/r\.md points outside/);
  });

  test('rejects a backticked path that only stays inside when read from the document directory', () => {
    assert.deepEqual(check('`../README.md`'), ['docs/X.md: backticked path `../README.md` points outside the repository']);
  });
});

describe('README.md and docs/*.md', () => {
  for (const file of documents()) {
    test(`${file}: every link and backticked path stays inside the repository`, () => {
      assert.deepEqual(linkProblems(ROOT, file, fs.readFileSync(path.join(ROOT, file), 'utf8')), []);
    });
  }
});
