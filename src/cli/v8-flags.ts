/**
 * V8 flags the `blockgate` command runs with. They are on the shebang line of
 * src/cli/main.ts (`#!/usr/bin/env -S node ...`), because Node.js reads heap flags only
 * at start-up: `v8.setFlagsFromString` is too late for them and NODE_OPTIONS does not
 * accept them.
 *
 * `--initial-old-space-size=128` (MiB): V8 counts external memory allocated since the
 * last full collection (every socket read is a fresh 64 KiB ArrayBuffer on Node 20)
 * against the old generation's allocation limit. blockgate's JavaScript heap is about
 * 10 MiB, so that limit sits ~16 MiB above it and a stream of incoming writes started a
 * full mark-compact every ~30 ms: ~30 per GiB written into a memory export, half the
 * server's CPU (main thread plus V8's helper threads). With the old generation allowed
 * to start at 128 MiB, the same chunks are freed by cheap scavenges instead: 0-1
 * mark-compacts per 3 GiB, server CPU per GiB written halved, sequential writes about
 * 1.6x faster (docs/PERFORMANCE.md). It changes when V8 collects, not how much it may
 * use: peak RSS under the same copy was unchanged.
 */
export const V8_FLAGS: readonly string[] = ['--initial-old-space-size=128'];

/** The shebang line that starts the command with V8_FLAGS. */
export const SHEBANG = `#!/usr/bin/env -S node ${V8_FLAGS.join(' ')}`;

/** The V8_FLAGS missing from a process's `execArgv` (empty when it was started as the shebang says). */
export function missingV8Flags(execArgv: readonly string[] = process.execArgv): string[] {
  return V8_FLAGS.filter((f) => !execArgv.includes(f));
}
