/**
 * Who may connect: allow and deny lists of IPv4/IPv6 addresses and CIDR ranges, and of
 * unix-socket peer uids. Checked at accept time, before the first byte of a protocol is
 * sent, by the NBD server (per listener and per export) and usable by any frontend.
 *
 * Matching uses Node's `net.BlockList`, which understands both families and IPv4-mapped
 * IPv6 addresses (`::ffff:127.0.0.1` matches a rule for `127.0.0.1/8`), so a dual-stack
 * listener needs no rule written twice.
 *
 * The decision: a peer matching any deny rule is refused; else, if there are allow
 * rules, it must match one; else it is admitted. Unix peers are matched by uid only
 * (they have no address); their uid comes from SO_PEERCRED (src/io/peer-cred.ts).
 */
import net from 'node:net';
import { BlockError } from '../errors/index.js';

/** The rules as configured: addresses (`192.0.2.7`, `::1`), CIDR ranges (`10.0.0.0/8`, `fd00::/8`) and `uid:N`. */
export interface AddressRuleSpec {
  readonly allow?: readonly string[];
  readonly deny?: readonly string[];
}

/** A peer as seen at accept time. */
export interface Peer {
  /** The remote IP address, or undefined for a unix socket. */
  readonly address?: string | undefined;
  /** The unix peer's uid from SO_PEERCRED, when known. */
  readonly uid?: number | undefined;
}

/** One side (allow or deny) of the rules. */
class RuleSet {
  readonly blocks = new net.BlockList();
  readonly uids = new Set<number>();
  empty = true;

  add(rule: string, where: string): void {
    this.empty = false;
    const uid = /^uid:(\d+)$/.exec(rule);
    if (uid) {
      this.uids.add(Number(uid[1]));
      return;
    }
    const slash = rule.indexOf('/');
    const addr = slash < 0 ? rule : rule.slice(0, slash);
    const family = net.isIP(addr);
    if (family === 0) throw new BlockError('EINVAL', `${where}: '${rule}' is not an IP address, a CIDR range or uid:N`);
    const type = family === 4 ? 'ipv4' : 'ipv6';
    if (slash < 0) {
      this.blocks.addAddress(addr, type);
      return;
    }
    const bitsText = rule.slice(slash + 1);
    const bits = Number(bitsText);
    const max = family === 4 ? 32 : 128;
    if (!/^\d+$/.test(bitsText) || bits > max) {
      throw new BlockError('EINVAL', `${where}: '${rule}' has a prefix length outside 0..${max}`);
    }
    this.blocks.addSubnet(addr, bits, type);
  }

  matches(peer: Peer): boolean {
    if (peer.address === undefined) return peer.uid !== undefined && this.uids.has(peer.uid);
    const family = net.isIP(peer.address);
    if (family === 0) return false;
    return this.blocks.check(peer.address, family === 4 ? 'ipv4' : 'ipv6');
  }
}

export class AddressRules {
  readonly #allow = new RuleSet();
  readonly #deny = new RuleSet();

  /** Parses the rules; throws EINVAL naming `where` and the bad rule. */
  constructor(spec: AddressRuleSpec, where = 'rules') {
    spec.allow?.forEach((r, i) => this.#allow.add(r.trim(), `${where}.allow[${i}]`));
    spec.deny?.forEach((r, i) => this.#deny.add(r.trim(), `${where}.deny[${i}]`));
  }

  /** True if no rule is configured (everyone is admitted). */
  get empty(): boolean {
    return this.#allow.empty && this.#deny.empty;
  }

  /** True if any rule names a uid (the listener must then read unix peers' credentials). */
  get usesUids(): boolean {
    return this.#allow.uids.size > 0 || this.#deny.uids.size > 0;
  }

  /** Whether `peer` may connect. A unix peer whose uid is unknown matches no uid rule. */
  admits(peer: Peer): boolean {
    if (this.#deny.matches(peer)) return false;
    return this.#allow.empty || this.#allow.matches(peer);
  }
}
