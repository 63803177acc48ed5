#!/usr/bin/env -S node --initial-old-space-size=128
/**
 * The `blockgate` command. Each subcommand lives in its own module under src/cli and is
 * loaded only when it is the one being run: loading them all took most of the start-up
 * time of `blockgate serve --run ...` (the NBD client, the copy engine, the GEOM Gate
 * tools and their dependencies are of no use to `serve`), see docs/PERFORMANCE.md.
 *
 * So the program is built in two steps. The subcommand named on the command line (or by
 * `help NAME`) is loaded and added as it is; every other one is added as a stand-in that
 * carries only its name, summary and argument list, which is all commander's top-level
 * help shows. test/cli/main.test.ts checks that the stand-ins read exactly as the real
 * commands would.
 */
import { Command, Option } from 'commander';
import { createRequire } from 'node:module';
import { PLUGIN_API_VERSION } from '../plugin/api.js';

/** A subcommand as the top-level help lists it, and how to load the real one. */
interface Subcommand {
  readonly name: string;
  /** The command's `.description()`, shown in the top-level help. */
  readonly summary: string;
  /** Its arguments as commander prints them (`<uri>`, `[export...]`), empty for none. */
  readonly args: string;
  /** Whether it has options of its own (commander then prints `[options]`). */
  readonly options: boolean;
  /**
   * Loads the module and builds the command. The specifiers are literal on purpose:
   * test/layering.test.ts counts them as edges (it allows literal dynamic imports of
   * sibling modules here only).
   */
  readonly load: () => Promise<Command>;
}

export const SUBCOMMANDS: readonly Subcommand[] = [
  {
    name: 'serve',
    summary: 'serve block devices over NBD (default: a 1 GiB memory disk on 127.0.0.1:10809)',
    args: '[export...]',
    options: true,
    load: async () => (await import('./serve.js')).serveCommand(),
  },
  {
    name: 'ggated',
    summary: 'GEOM Gate network server, wire-compatible with FreeBSD ggatec (see docs/GGATE.md)',
    args: '[exports-file]',
    options: true,
    load: async () => (await import('./ggated.js')).ggatedCommand(),
  },
  {
    name: 'ggatel',
    summary: 'serve a GEOM Gate device from a local file (FreeBSD ggatel)',
    args: '',
    options: false,
    load: async () => (await import('./ggatel.js')).ggatelCommand(),
  },
  {
    name: 'ggatec',
    summary: 'a GEOM Gate device served by a remote ggated (FreeBSD ggatec)',
    args: '',
    options: false,
    load: async () => (await import('./ggatec.js')).ggatecCommand(),
  },
  {
    name: 'status',
    summary: 'show exports (write-back error state, live counts, sessions with an error pending) and gates of a running server',
    args: '',
    options: true,
    load: async () => (await import('./status.js')).statusCommand(),
  },
  {
    name: 'info',
    summary: 'show information about an NBD export (as nbdinfo)',
    args: '<uri>',
    options: true,
    load: async () => (await import('./info.js')).infoCommand(),
  },
  {
    name: 'map',
    summary: 'print the extents (allocation map) of an NBD export, as nbdinfo --map',
    args: '<uri>',
    options: true,
    load: async () => (await import('./map.js')).mapCommand(),
  },
  {
    name: 'copy',
    summary: 'copy between NBD exports, files, block devices and stdin/stdout (as nbdcopy)',
    args: '<source> <destination>',
    options: true,
    load: async () => (await import('./copy.js')).copyCommand(),
  },
  {
    name: 'rbd',
    summary: 'create RBD images for the rbd backend (docs/CEPH.md)',
    args: '',
    options: false,
    load: async () => (await import('./rbd.js')).rbdCommand(),
  },
  {
    name: 's3',
    summary: 'manage s3 exports: chunk objects in an S3 bucket (see docs/S3.md)',
    args: '',
    options: false,
    load: async () => (await import('./s3.js')).s3Command(),
  },
  {
    name: 'plugins',
    summary: `list the built-in backends and filters with their settings (and plugin modules given by path; plugin API version ${PLUGIN_API_VERSION})`,
    args: '[path...]',
    options: true,
    load: async () => (await import('./plugins.js')).pluginsCommand(),
  },
];

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

/**
 * The subcommand the arguments ask for: the first operand, or the one after `help`. The
 * top-level program has no option that takes a value (only -h and -V), so the first
 * argument that is not an option is the subcommand's name, as commander reads it.
 */
export function requestedSubcommand(args: readonly string[]): string | undefined {
  const operands = args.filter((a) => !a.startsWith('-'));
  return operands[0] === 'help' ? operands[1] : operands[0];
}

/** A stand-in that the top-level help lists as it would the real command. */
function standIn(s: Subcommand): Command {
  const cmd = new Command(s.name).description(s.summary);
  if (s.args) cmd.arguments(s.args);
  // commander prints `[options]` after a subcommand's name when it has any option besides
  // its help; a hidden one reproduces that without showing up anywhere.
  if (s.options) cmd.addOption(new Option('--stand-in').hideHelp());
  return cmd;
}

/** The program, with the real command for the subcommand `args` name (arguments after `node main.js`). */
export async function makeProgram(args: readonly string[]): Promise<Command> {
  const program = new Command();
  program
    .name('blockgate')
    .description('Userland block-device gateway: NBD server, GEOM Gate tools, errseq write-back errors')
    .version(packageVersion())
    .showHelpAfterError();
  const wanted = requestedSubcommand(args);
  for (const s of SUBCOMMANDS) program.addCommand(s.name === wanted ? await s.load() : standIn(s));
  return program;
}

await (await makeProgram(process.argv.slice(2))).parseAsync(process.argv);
