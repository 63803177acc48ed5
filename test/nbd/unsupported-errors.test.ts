/**
 * Over a real socket: a command the backend cannot do is answered with NBD_EINVAL, not
 * NBD_ENOTSUP, which the spec keeps for WRITE_ZEROES with FAST_ZERO (see nbdErrno).
 */
import { after, before, test } from 'node:test';
import { MemoryDevice } from '../../src/backends/memory.js';
import { FilterDevice, type Capabilities } from '../../src/device/index.js';
import { BlockError, NBD_ERROR } from '../../src/errors/index.js';
import { Export } from '../../src/export/index.js';
import { NBD_CMD, NBD_CMD_FLAG } from '../../src/nbd/constants.js';
import { connect, expectError, expectOk, serveExports, type DirectServer, type Mode } from './helpers.js';

const SIZE = 1 << 20;
const BLOCK = 4096;

/** Advertises trim and fast zeroes, then fails every trim and zero as unsupported (a backend that found out late). */
class UnsupportedDevice extends FilterDevice {
  override get capabilities(): Capabilities {
    return { ...this.next.capabilities, trim: true, zero: true, fastZero: true };
  }
  override async trim(): Promise<void> {
    throw new BlockError('EOPNOTSUPP', 'trim is not supported here');
  }
  override async zero(): Promise<void> {
    throw new BlockError('EOPNOTSUPP', 'fast zero is not supported here');
  }
}

let srv: DirectServer;

before(async () => {
  srv = await serveExports([new Export({ name: 'd', device: new UnsupportedDevice(new MemoryDevice({ size: SIZE })) })]);
});

after(() => srv.close());

for (const mode of ['simple', 'structured', 'extended'] as const satisfies readonly Mode[]) {
  test(`${mode}: a TRIM failing with EOPNOTSUPP is answered with NBD_EINVAL (22); a FAST_ZERO one with NBD_ENOTSUP (95)`, async () => {
    const c = await connect(srv.socket, mode, 'd');
    const ext = mode === 'extended';
    c.request(0, NBD_CMD.NBD_CMD_TRIM, 1n, 0, BLOCK, ext);
    await expectError(c, 1n, NBD_ERROR.NBD_EINVAL);
    c.request(NBD_CMD_FLAG.NBD_CMD_FLAG_FAST_ZERO, NBD_CMD.NBD_CMD_WRITE_ZEROES, 2n, 0, BLOCK, ext);
    await expectError(c, 2n, NBD_ERROR.NBD_ENOTSUP);
    c.request(0, NBD_CMD.NBD_CMD_WRITE_ZEROES, 3n, 0, BLOCK, ext);
    await expectError(c, 3n, NBD_ERROR.NBD_EINVAL);
    c.request(0, NBD_CMD.NBD_CMD_FLUSH, 4n, 0, 0, ext);
    await expectOk(c, 4n);
    c.close();
  });
}
