#!/usr/bin/env node
/**
 * The `blockgate` command. Each subcommand lives in its own module under src/cli and is
 * registered here.
 */
import { Command } from 'commander';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const pkg = require('../../../package.json') as { version: string };

export function makeProgram(): Command {
  const program = new Command();
  program
    .name('blockgate')
    .description('Userland block-device gateway: NBD server, GEOM Gate tools, errseq write-back errors')
    .version(pkg.version)
    .showHelpAfterError();
  return program;
}

await makeProgram().parseAsync(process.argv);
