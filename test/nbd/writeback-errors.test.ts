/**
 * Durability failures that reach one request must still reach every session: a FUA
 * write whose fdatasync fails (BlockError.writeback) is that request's error AND is
 * recorded in the export's ErrSeq, so other sessions see it at their next FLUSH while
 * the failing session is not told twice (the Linux fsync rule: each open file
 * description hears of each write-back error once).
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockError, NBD_ERROR } from '../../src/errors/index.js';
import { FilterDevice, REQ, type BlockDevice } from '../../src/device/index.js';
import { MemoryDevice } from '../../src/backends/memory.js';
import { Export } from '../../src/export/index.js';
import { NBD_CMD, NBD_CMD_FLAG } from '../../src/nbd/constants.js';
import { connect, expectError, expectOk, serveExports } from './helpers.js';

/** Fails FUA writes as a file whose fdatasync failed, while `failing` is set. */
class FailingSync extends FilterDevice {
  failing = false;
  constructor(next: BlockDevice) {
    super(next);
  }
  override async write(data: Buffer, offset: number, flags: number): Promise<void> {
    await this.next.write(data, offset, flags & ~REQ.FUA);
    if (this.failing && flags & REQ.FUA) throw new BlockError('EIO', 'write: fdatasync failed', { writeback: true });
  }
}

const dev = new FailingSync(new MemoryDevice({ size: 1 << 20 }));
const exp = new Export({ name: '', device: dev });
const srv = await serveExports([exp]);
after(() => srv.close());

test('a failed FUA sync is the writer’s error and every other session’s next FLUSH error, once', async () => {
  const a = await connect(srv.socket, 'structured');
  const b = await connect(srv.socket, 'simple');
  try {
    dev.failing = true;
    a.request(NBD_CMD_FLAG.NBD_CMD_FLAG_FUA, NBD_CMD.NBD_CMD_WRITE, 1n, 0, 4, false, Buffer.from('abcd'));
    const { message } = await expectError(a, 1n, NBD_ERROR.NBD_EIO);
    assert.match(message, /fdatasync/);
    dev.failing = false;
    // The writer already has the error: its FLUSH succeeds.
    a.request(0, NBD_CMD.NBD_CMD_FLUSH, 2n, 0, 0);
    await expectOk(a, 2n);
    // The other session hears of it at its next FLUSH, once.
    b.request(0, NBD_CMD.NBD_CMD_FLUSH, 3n, 0, 0);
    await expectError(b, 3n, NBD_ERROR.NBD_EIO);
    b.request(0, NBD_CMD.NBD_CMD_FLUSH, 4n, 0, 0);
    await expectOk(b, 4n);
  } finally {
    a.close();
    b.close();
  }
});

test('a session opened after the failure was reported does not see it; a plain write error is not recorded', async () => {
  const before = exp.errseq.value;
  const c = await connect(srv.socket, 'simple');
  try {
    c.request(0, NBD_CMD.NBD_CMD_FLUSH, 1n, 0, 0);
    await expectOk(c, 1n);
    // A write past the end is that request's own error, not a write-back error.
    c.request(0, NBD_CMD.NBD_CMD_WRITE, 2n, (1 << 20) - 2, 4, false, Buffer.from('wxyz'));
    await expectError(c, 2n, NBD_ERROR.NBD_ENOSPC);
    assert.equal(exp.errseq.value, before);
  } finally {
    c.close();
  }
});
