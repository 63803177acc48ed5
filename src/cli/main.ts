#!/usr/bin/env -S node --initial-old-space-size=128
/**
 * The `blockgate` command. Each subcommand lives in its own module under src/cli and is
 * registered here.
 */
import { Command } from 'commander';
import { createRequire } from 'node:module';
import { serveCommand } from './serve.js';
import { ggatedCommand } from './ggated.js';
import { ggatelCommand } from './ggatel.js';
import { ggatecCommand } from './ggatec.js';
import { statusCommand } from './status.js';
import { infoCommand } from './info.js';
import { mapCommand } from './map.js';
import { copyCommand } from './copy.js';
import { pluginsCommand } from './plugins.js';

/** The package version, found whether this runs from src/ (tsx) or dist/src/ (built). */
function packageVersion(): string {
  const require = createRequire(import.meta.url);
  for (const rel of ['../../package.json', '../../../package.json']) {
    try {
      const pkg = require(rel) as { name?: string; version?: string };
      if (pkg.name === 'blockgate' && pkg.version) return pkg.version;
    } catch {
      // not at this depth
    }
  }
  return 'unknown';
}

export function makeProgram(): Command {
  const program = new Command();
  program
    .name('blockgate')
    .description('Userland block-device gateway: NBD server, GEOM Gate tools, errseq write-back errors')
    .version(packageVersion())
    .showHelpAfterError();
  program.addCommand(serveCommand());
  program.addCommand(ggatedCommand());
  program.addCommand(ggatelCommand());
  program.addCommand(ggatecCommand());
  program.addCommand(statusCommand());
  program.addCommand(infoCommand());
  program.addCommand(mapCommand());
  program.addCommand(copyCommand());
  program.addCommand(pluginsCommand());
  return program;
}

await makeProgram().parseAsync(process.argv);
