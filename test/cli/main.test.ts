/**
 * The `blockgate` command loads only the subcommand it runs (src/cli/main.ts): the others
 * are stand-ins that must read, in the top-level help, exactly as the real commands would,
 * and running one subcommand must load none of the other subcommand modules.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import { serveCommand } from '../../src/cli/serve.js';
import { ggatedCommand } from '../../src/cli/ggated.js';
import { ggatelCommand } from '../../src/cli/ggatel.js';
import { ggatecCommand } from '../../src/cli/ggatec.js';
import { statusCommand } from '../../src/cli/status.js';
import { infoCommand } from '../../src/cli/info.js';
import { mapCommand } from '../../src/cli/map.js';
import { copyCommand } from '../../src/cli/copy.js';
import { pluginsCommand } from '../../src/cli/plugins.js';
import { rbdCommand } from '../../src/cli/rbd.js';
import { s3Command } from '../../src/cli/s3.js';
import { runOk } from '../helpers/run.js';

const CLI_DIR = path.resolve(import.meta.dirname, '../../src/cli');
const MAIN = path.join(CLI_DIR, 'main.ts');
const SUBCOMMAND_MODULES = ['serve', 'ggated', 'ggatel', 'ggatec', 'status', 'info', 'map', 'copy', 's3', 'plugins'];

/** The program as it was before lazy loading: every real subcommand added up front. */
function eagerProgram(): Command {
  const program = new Command().name('blockgate');
  for (const make of [serveCommand, ggatedCommand, ggatelCommand, ggatecCommand, statusCommand, infoCommand, mapCommand, copyCommand, rbdCommand, s3Command, pluginsCommand]) {
    program.addCommand(make());
  }
  return program;
}

/** The "Commands:" section of a help text, wrapping undone (the width of a pipe and of helpInformation() differ). */
function commandsSection(help: string): string {
  const start = help.indexOf('\nCommands:\n');
  assert.ok(start >= 0, `no Commands section in:\n${help}`);
  return help.slice(start).replace(/\s+/g, ' ').trim();
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-main-test-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

/**
 * A module-resolution hook (node:module register, chained after tsx's) that appends every
 * URL the program resolves to a file, so a test can see which modules a command loaded.
 */
const RECORDER = `
import fs from 'node:fs';
let file;
export function initialize(data) { file = data.file; }
export async function resolve(specifier, context, next) {
  const r = await next(specifier, context);
  fs.appendFileSync(file, r.url + '\\n');
  return r;
}`;

/** Runs the CLI from the sources and returns the subcommand modules (by name) it loaded. */
async function loadedSubcommandModules(args: readonly string[]): Promise<{ loaded: string[]; stdout: string }> {
  const log = path.join(tmp, `loaded-${args.join('-').replace(/[^\w-]/g, '_')}.txt`);
  const register = path.join(tmp, 'register.mjs');
  fs.writeFileSync(
    register,
    `import { register } from 'node:module';\nregister(${JSON.stringify(`data:text/javascript,${encodeURIComponent(RECORDER)}`)}, { data: { file: ${JSON.stringify(log)} } });\n`,
  );
  const r = await runOk(process.execPath, ['--import', 'tsx', '--import', register, MAIN, ...args]);
  const urls = fs.readFileSync(log, 'utf8').split('\n').filter(Boolean);
  const loaded = SUBCOMMAND_MODULES.filter((m) => urls.some((u) => u.startsWith('file://') && path.resolve(new URL(u).pathname) === path.join(CLI_DIR, `${m}.ts`)));
  return { loaded, stdout: r.stdout };
}

describe('blockgate loads only the subcommand it runs', () => {
  test('the top-level help lists every subcommand as the real commands would (names, arguments, [options], summaries)', async () => {
    const { stdout } = await runOk(process.execPath, ['--import', 'tsx', MAIN, '--help']);
    assert.equal(commandsSection(stdout), commandsSection(eagerProgram().helpInformation()));
  });

  test('blockgate SUBCOMMAND --help and blockgate help SUBCOMMAND show the real command\'s full help', async () => {
    const eager = eagerProgram();
    for (const name of ['serve', 'ggatel']) {
      const expected = eager.commands.find((c) => c.name() === name)!.helpInformation().replace(/\s+/g, ' ');
      for (const args of [[name, '--help'], ['help', name]]) {
        const { stdout } = await runOk(process.execPath, ['--import', 'tsx', MAIN, ...args]);
        assert.equal(stdout.replace(/\s+/g, ' '), expected, `blockgate ${args.join(' ')}`);
      }
    }
  });

  test('blockgate --help loads no subcommand module', async () => {
    const { loaded, stdout } = await loadedSubcommandModules(['--help']);
    assert.match(stdout, /serve \[options\] \[export\.\.\.\]/);
    assert.deepEqual(loaded, []);
  });

  test('blockgate serve --run loads serve and no other subcommand module', async () => {
    const { loaded } = await loadedSubcommandModules(['serve', '--run', 'true', 'memory:1M']);
    assert.deepEqual(loaded, ['serve']);
  });

  test('blockgate plugins loads plugins and no other subcommand module', async () => {
    const { loaded, stdout } = await loadedSubcommandModules(['plugins']);
    assert.match(stdout, /memory/);
    assert.deepEqual(loaded, ['plugins']);
  });
});
