/**
 * A captive in-process NBD server for tests: exports built from plain descriptions,
 * listening on a private unix socket (no port races), closed by the test's `after`.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { StackDescription } from '../../src/device/index.js';
import { NbdServer, type ServerLimits } from '../../src/nbd/index.js';
import { type Export } from '../../src/export/index.js';
import { buildExports, nbdUri } from '../../src/cli/serve.js';

export interface TestExport extends StackDescription {
  readonly name: string;
  readonly readOnly?: boolean;
  readonly description?: string;
}

export interface CaptiveServer {
  readonly server: NbdServer;
  readonly exports: Export[];
  readonly socket: string;
  /** nbd+unix URI of an export ('' = default). */
  uri(name?: string): string;
  close(): Promise<void>;
}

export async function startServer(exports: TestExport[], limits?: Partial<ServerLimits>): Promise<CaptiveServer> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-test-'));
  const socket = path.join(dir, 'nbd.sock');
  const built = await buildExports({ exports });
  const server = new NbdServer({ exports: built, ...(limits ? { limits } : {}) });
  await server.listen({ path: socket });
  return {
    server,
    exports: built,
    socket,
    uri: (name = built[0]!.name) => nbdUri({ path: socket }, name),
    async close() {
      await server.close(2000);
      await Promise.all(built.map((e) => e.device.close().catch(() => undefined)));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
