/**
 * An in-process `blockgate serve` for control-socket tests: a GateRegistry, an NBD
 * server with one memory export ('mem') on a private unix socket, the gate exports, and
 * the control socket, all in a temp directory removed by `close`.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createStack } from '../../../src/export/registry.js';
import { newStackContext } from '../../../src/device/index.js';
import { GateRegistry, ManualClock } from '../../../src/gate/index.js';
import { NbdServer } from '../../../src/nbd/index.js';
import { Export } from '../../../src/export/index.js';
import { GateService } from '../../../src/gate/control/gates.js';
import { ControlServer } from '../../../src/gate/control/server.js';
import { connectControl, type ControlClient } from '../../../src/gate/control/client.js';
import { RawClient } from '../../helpers/raw-client.js';

export interface ControlFixture {
  readonly dir: string;
  readonly registry: GateRegistry;
  readonly clock: ManualClock;
  readonly nbd: NbdServer;
  readonly gates: GateService;
  readonly control: ControlServer;
  readonly mem: Export;
  readonly ctlPath: string;
  readonly nbdPath: string;
  /** A new control client; closed by `close`. */
  connect(): Promise<ControlClient>;
  /** An NBD client past GO on an export, closed by `close`. */
  nbdClient(name: string, opts?: { structured?: boolean }): Promise<RawClient>;
  close(): Promise<void>;
}

export async function startControl(): Promise<ControlFixture> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-control-'));
  const clock = new ManualClock();
  const registry = new GateRegistry({ clock });
  const ctx = newStackContext();
  const mem = new Export({ name: 'mem', device: await createStack({ backend: { type: 'memory', size: '1M' } }, ctx), errseq: ctx.errseq });
  const nbd = new NbdServer({ exports: [mem] });
  const nbdPath = path.join(dir, 'nbd.sock');
  await nbd.listen({ path: nbdPath });
  const gates = new GateService(registry, nbd);
  const control = new ControlServer({ gates });
  // A subdirectory that does not exist yet: the server creates it 0700.
  const ctlPath = path.join(dir, 'run', 'ctl.sock');
  await control.listen(ctlPath);
  const clients: ControlClient[] = [];
  const raws: RawClient[] = [];
  return {
    dir,
    registry,
    clock,
    nbd,
    gates,
    control,
    mem,
    ctlPath,
    nbdPath,
    async connect() {
      const c = await connectControl(ctlPath);
      clients.push(c);
      return c;
    },
    async nbdClient(name, opts = {}) {
      const c = await RawClient.connect(nbdPath);
      raws.push(c);
      await c.handshake(name, opts);
      return c;
    },
    async close() {
      for (const r of raws) r.close();
      await Promise.all(clients.map((c) => c.close().catch(() => undefined)));
      await control.close();
      await gates.close();
      await nbd.close(1000);
      await mem.device.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Runs the event loop until `cond` holds; fails after `maxTurns` turns (never by time). */
export async function until(cond: () => boolean, what = 'condition', maxTurns = 20_000): Promise<void> {
  for (let i = 0; i < maxTurns; i++) {
    if (cond()) return;
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
  throw new Error(`${what} not reached`);
}
