/**
 * Listener and export address rules: IPv4/IPv6 addresses and CIDR ranges, IPv4-mapped
 * IPv6 peers, deny over allow, uid rules for unix peers, the errors for bad rules, and
 * a property check of IPv4 prefix matching against a bit-mask reference.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { AddressRules } from '../../src/io/address-rules.js';
import { BlockError } from '../../src/errors/index.js';

function admits(spec: { allow?: string[]; deny?: string[] }, address: string): boolean {
  return new AddressRules(spec).admits({ address });
}

describe('IPv4', () => {
  test('a single address admits only itself', () => {
    assert.equal(admits({ allow: ['192.0.2.7'] }, '192.0.2.7'), true);
    assert.equal(admits({ allow: ['192.0.2.7'] }, '192.0.2.8'), false);
  });

  test('a CIDR range admits its members and nothing outside', () => {
    const allow = ['10.1.0.0/16'];
    assert.equal(admits({ allow }, '10.1.0.0'), true);
    assert.equal(admits({ allow }, '10.1.255.255'), true);
    assert.equal(admits({ allow }, '10.2.0.0'), false);
    assert.equal(admits({ allow }, '10.0.255.255'), false);
  });

  test('/0 admits every IPv4 address and /32 only one', () => {
    assert.equal(admits({ allow: ['0.0.0.0/0'] }, '203.0.113.9'), true);
    assert.equal(admits({ allow: ['198.51.100.1/32'] }, '198.51.100.1'), true);
    assert.equal(admits({ allow: ['198.51.100.1/32'] }, '198.51.100.0'), false);
  });

  test('an IPv4 rule does not admit an IPv6 peer', () => {
    assert.equal(admits({ allow: ['0.0.0.0/0'] }, '2001:db8::1'), false);
  });
});

describe('IPv6', () => {
  test('a single address admits only itself, however it is written', () => {
    assert.equal(admits({ allow: ['::1'] }, '::1'), true);
    assert.equal(admits({ allow: ['::1'] }, '0:0:0:0:0:0:0:1'), true);
    assert.equal(admits({ allow: ['::1'] }, '::2'), false);
  });

  test('a CIDR range admits its members and nothing outside', () => {
    const allow = ['fd00::/8'];
    assert.equal(admits({ allow }, 'fd12:3456::1'), true);
    assert.equal(admits({ allow }, 'fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff'), true);
    assert.equal(admits({ allow }, 'fe80::1'), false);
    assert.equal(admits({ allow: ['2001:db8:1::/48'] }, '2001:db8:1:ffff::1'), true);
    assert.equal(admits({ allow: ['2001:db8:1::/48'] }, '2001:db8:2::1'), false);
  });

  test('an IPv6 rule does not admit an unrelated IPv4 peer', () => {
    assert.equal(admits({ allow: ['fd00::/8'] }, '10.0.0.1'), false);
  });
});

describe('IPv4-mapped IPv6 peers (a dual-stack listener)', () => {
  test('::ffff:127.0.0.1 is admitted by 127.0.0.0/8 and refused by a deny of it', () => {
    assert.equal(admits({ allow: ['127.0.0.0/8'] }, '::ffff:127.0.0.1'), true);
    assert.equal(admits({ deny: ['127.0.0.0/8'] }, '::ffff:127.0.0.1'), false);
  });

  test('::ffff:10.0.0.1 is not admitted by 127.0.0.0/8', () => {
    assert.equal(admits({ allow: ['127.0.0.0/8'] }, '::ffff:10.0.0.1'), false);
  });

  test('::ffff:192.0.2.7 matches a single-address rule 192.0.2.7', () => {
    assert.equal(admits({ allow: ['192.0.2.7'] }, '::ffff:192.0.2.7'), true);
  });
});

describe('the decision', () => {
  test('deny wins over allow', () => {
    const spec = { allow: ['10.0.0.0/8'], deny: ['10.0.0.5'] };
    assert.equal(admits(spec, '10.0.0.5'), false);
    assert.equal(admits(spec, '10.0.0.6'), true);
  });

  test('with only deny rules, everyone else is admitted', () => {
    assert.equal(admits({ deny: ['10.0.0.0/8'] }, '192.0.2.1'), true);
    assert.equal(admits({ deny: ['10.0.0.0/8'] }, '10.9.9.9'), false);
  });

  test('with allow rules, a peer matching none is refused', () => {
    assert.equal(admits({ allow: ['10.0.0.0/8', '192.0.2.0/24'] }, '192.0.2.200'), true);
    assert.equal(admits({ allow: ['10.0.0.0/8', '192.0.2.0/24'] }, '198.51.100.1'), false);
  });

  test('empty rules admit everyone (and say so)', () => {
    for (const spec of [{}, { allow: [], deny: [] }]) {
      const r = new AddressRules(spec);
      assert.equal(r.empty, true);
      assert.equal(r.usesUids, false);
      for (const address of ['10.0.0.1', '::1', '::ffff:1.2.3.4']) assert.equal(r.admits({ address }), true);
      assert.equal(r.admits({}), true, 'a unix peer of unknown uid');
      assert.equal(r.admits({ uid: 0 }), true);
    }
  });

  test('an address that is not an IP (a malformed peer address) matches no rule', () => {
    assert.equal(admits({ allow: ['0.0.0.0/0'] }, 'not-an-ip'), false);
    assert.equal(admits({ deny: ['0.0.0.0/0'] }, 'not-an-ip'), true);
  });

  test('rules are trimmed', () => {
    assert.equal(admits({ allow: [' 10.0.0.0/8 '] }, '10.1.2.3'), true);
  });
});

describe('uid rules for unix peers', () => {
  test('an allowed uid is admitted, another uid and an unknown uid are not', () => {
    const r = new AddressRules({ allow: ['uid:1000'] });
    assert.equal(r.usesUids, true);
    assert.equal(r.empty, false);
    assert.equal(r.admits({ uid: 1000 }), true);
    assert.equal(r.admits({ uid: 1001 }), false);
    assert.equal(r.admits({}), false, 'a unix peer whose uid was not read matches no uid rule');
  });

  test('a denied uid is refused; an unknown uid is not denied by a uid rule', () => {
    const r = new AddressRules({ deny: ['uid:0'] });
    assert.equal(r.usesUids, true);
    assert.equal(r.admits({ uid: 0 }), false);
    assert.equal(r.admits({ uid: 1000 }), true);
    assert.equal(r.admits({}), true);
  });

  test('address rules do not match unix peers, and uid rules do not match TCP peers', () => {
    assert.equal(new AddressRules({ allow: ['0.0.0.0/0', '::/0'] }).admits({ uid: 1000 }), false);
    assert.equal(new AddressRules({ allow: ['uid:1000'] }).admits({ address: '127.0.0.1', uid: 1000 }), false);
  });

  test('address rules alone do not use uids', () => {
    assert.equal(new AddressRules({ allow: ['10.0.0.0/8'], deny: ['::1'] }).usesUids, false);
  });
});

describe('bad rules throw EINVAL naming the key path', () => {
  const cases: [string, { allow?: string[]; deny?: string[] }, string][] = [
    ['not an IP', { allow: ['example.com'] }, 'listen[0].allow[0]'],
    ['an IPv4 prefix of 33', { allow: ['10.0.0.0/8', '10.0.0.0/33'] }, 'listen[0].allow[1]'],
    ['an IPv6 prefix of 129', { deny: ['fd00::/129'] }, 'listen[0].deny[0]'],
    ['uid:x', { deny: ['::1', 'uid:x'] }, 'listen[0].deny[1]'],
    ['a negative prefix', { allow: ['10.0.0.0/-1'] }, 'listen[0].allow[0]'],
    ['an empty prefix', { allow: ['10.0.0.0/'] }, 'listen[0].allow[0]'],
    ['an empty rule', { allow: [''] }, 'listen[0].allow[0]'],
  ];
  for (const [what, spec, path] of cases) {
    test(`${what}: ${JSON.stringify(spec)} names ${path}`, () => {
      assert.throws(
        () => new AddressRules(spec, 'listen[0]'),
        (e: unknown) => e instanceof BlockError && e.code === 'EINVAL' && e.message.includes(path),
      );
    });
  }

  test('the message quotes the bad rule', () => {
    assert.throws(() => new AddressRules({ allow: ['10.0.0.0/33'] }, 'x'), /'10\.0\.0\.0\/33'/);
  });
});

describe('property: IPv4 prefix matching agrees with a bit mask', () => {
  const u32 = fc.integer({ min: 0, max: 0xffffffff });
  const dotted = (n: number) => [24, 16, 8, 0].map((s) => (n >>> s) & 0xff).join('.');
  const mask = (bits: number) => (bits === 0 ? 0 : (0xffffffff << (32 - bits)) >>> 0);

  test('admits({address}) for allow [net/bits] is (address & mask) === (net & mask)', () => {
    fc.assert(
      fc.property(u32, u32, fc.integer({ min: 0, max: 32 }), (net, addr, bits) => {
        const m = mask(bits);
        const expected = ((addr & m) >>> 0) === ((net & m) >>> 0);
        const rules = new AddressRules({ allow: [`${dotted(net)}/${bits}`] });
        assert.equal(rules.admits({ address: dotted(addr) }), expected);
        assert.equal(rules.admits({ address: `::ffff:${dotted(addr)}` }), expected, 'the mapped form agrees');
      }),
      { numRuns: 500 },
    );
  });

  test('an address inside the range (built from the network and random host bits) is admitted; deny of it refuses', () => {
    fc.assert(
      fc.property(u32, u32, fc.integer({ min: 0, max: 32 }), (net, host, bits) => {
        const m = mask(bits);
        const inside = (((net & m) >>> 0) | ((host & ~m) >>> 0)) >>> 0;
        const spec = `${dotted(net)}/${bits}`;
        assert.equal(new AddressRules({ allow: [spec] }).admits({ address: dotted(inside) }), true);
        assert.equal(new AddressRules({ allow: ['0.0.0.0/0'], deny: [spec] }).admits({ address: dotted(inside) }), false);
      }),
      { numRuns: 300 },
    );
  });
});
