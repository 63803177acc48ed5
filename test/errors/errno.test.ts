import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BlockError,
  ERRNO,
  codeFromFreebsd,
  codeFromLinux,
  freebsdErrno,
  fromNbdError,
  linuxErrno,
  NBD_ERROR,
  toBlockError,
  toNbdError,
  type ErrnoCode,
} from '../../src/errors/index.js';

test('the table gives Linux and FreeBSD values side by side', () => {
  assert.equal(linuxErrno('EAGAIN'), 11);
  assert.equal(freebsdErrno('EAGAIN'), 35);
  assert.equal(linuxErrno('EOPNOTSUPP'), 95);
  assert.equal(freebsdErrno('EOPNOTSUPP'), 45);
  assert.equal(linuxErrno('ECANCELED'), 125);
  assert.equal(freebsdErrno('ECANCELED'), 85);
  assert.equal(freebsdErrno('EOVERFLOW'), 84);
  assert.equal(freebsdErrno('ESHUTDOWN'), 58);
});

test('every code round-trips through both numbering schemes', () => {
  for (const code of Object.keys(ERRNO) as ErrnoCode[]) {
    assert.equal(codeFromLinux(linuxErrno(code)), code);
    assert.equal(codeFromFreebsd(freebsdErrno(code)), code);
  }
  assert.equal(codeFromLinux(4242), undefined);
});

test('NBD mapping follows the spec advice', () => {
  assert.equal(toNbdError('EIO'), NBD_ERROR.NBD_EIO);
  assert.equal(toNbdError('EDQUOT'), NBD_ERROR.NBD_ENOSPC);
  assert.equal(toNbdError('EFBIG'), NBD_ERROR.NBD_ENOSPC);
  assert.equal(toNbdError('EROFS'), NBD_ERROR.NBD_EPERM);
  assert.equal(toNbdError('EOPNOTSUPP'), NBD_ERROR.NBD_ENOTSUP);
  assert.equal(toNbdError('ECANCELED'), NBD_ERROR.NBD_EIO);
  assert.equal(toNbdError('ESHUTDOWN'), NBD_ERROR.NBD_ESHUTDOWN);
  assert.equal(fromNbdError(NBD_ERROR.NBD_ENOSPC), 'ENOSPC');
  // Clients treat unknown values as EINVAL.
  assert.equal(fromNbdError(9999), 'EINVAL');
});

test('toBlockError keeps system error codes and wraps the rest as EIO', () => {
  const sys = Object.assign(new Error('no space'), { code: 'ENOSPC' });
  const e1 = toBlockError(sys);
  assert.equal(e1.code, 'ENOSPC');
  assert.equal(e1.errno, 28);
  assert.equal(e1.cause, sys);
  const e2 = toBlockError(new TypeError('bug'));
  assert.equal(e2.code, 'EIO');
  const be = new BlockError('EPERM');
  assert.equal(toBlockError(be), be);
  assert.equal(be.message, 'Operation not permitted');
});
