/**
 * Per-export access rules of the NBD server: which clients may open an export, by
 * address (src/io/address-rules.ts), by TLS (`tls: 'require'` serves it only over
 * TLS), and by TLS identity (PSK identities, certificate subjects). The handshake asks
 * {@link ExportPolicy.access} for each option naming the export; a client the rules
 * refuse does not see the export in LIST and gets NBD_REP_ERR_POLICY (or
 * NBD_REP_ERR_TLS_REQD before TLS) for it.
 */
import { BlockError } from '../errors/index.js';
import { AddressRules, type AddressRuleSpec } from '../io/address-rules.js';
import type { ExportAccess } from './handshake.js';
import type { TlsPeer } from './tls.js';

/** A client as the access rules see it. */
export interface Client {
  /** The remote IP address; undefined on a unix socket. */
  readonly address?: string | undefined;
  /** A unix peer's uid (SO_PEERCRED), when read. */
  readonly uid?: number | undefined;
  /** The TLS session, once STARTTLS succeeded; null in clear. */
  readonly tls: TlsPeer | null;
}

/** An export's access rules as configured. */
export interface ExportPolicySpec extends AddressRuleSpec {
  /** 'require': served only over TLS (hidden from clients in clear). */
  readonly tls?: 'require' | undefined;
  /** PSK identities allowed (implies TLS). */
  readonly pskIdentities?: readonly string[] | undefined;
  /**
   * Certificate subjects allowed (implies TLS and a verified client certificate). A rule
   * such as `CN=alice` or `O=example,CN=alice` matches a subject containing each of its
   * `KEY=VALUE` parts.
   */
  readonly subjects?: readonly string[] | undefined;
}

/** Splits a rule such as `O=example,CN=alice` into its parts (a rule's values cannot contain ','). */
function subjectParts(s: string): string[] {
  return s.split(',').map((p) => p.trim()).filter((p) => p !== '');
}

export class ExportPolicy {
  readonly #rules: AddressRules | null;
  readonly #tls: boolean;
  readonly #identities: ReadonlySet<string> | null;
  /** Each rule as its KEY=VALUE parts, split at the first '='. */
  readonly #subjects: readonly (readonly (readonly [string, string])[])[] | null;

  /** Parses the rules; throws EINVAL naming `where` and the bad entry. */
  constructor(spec: ExportPolicySpec, where = 'export') {
    const rules = new AddressRules(spec, where);
    this.#rules = rules.empty ? null : rules;
    this.#identities = spec.pskIdentities && spec.pskIdentities.length > 0 ? new Set(spec.pskIdentities) : null;
    this.#subjects =
      spec.subjects && spec.subjects.length > 0
        ? spec.subjects.map((rule, i) => {
            const parts = subjectParts(rule);
            if (parts.length === 0 || parts.some((p) => !/^[A-Za-z][A-Za-z0-9.]*=./.test(p))) {
              throw new BlockError('EINVAL', `${where}.subjects[${i}]: expected KEY=VALUE parts such as CN=alice, got '${rule}'`);
            }
            return parts.map((p) => [p.slice(0, p.indexOf('=')), p.slice(p.indexOf('=') + 1)] as const);
          })
        : null;
    this.#tls = spec.tls === 'require' || this.#identities !== null || this.#subjects !== null;
  }

  /** True if a uid rule is configured (unix peers' credentials must be read). */
  get usesUids(): boolean {
    return this.#rules?.usesUids ?? false;
  }

  /** True if the export is served only over TLS. */
  get tlsOnly(): boolean {
    return this.#tls;
  }

  access(client: Client): ExportAccess {
    if (this.#rules && !this.#rules.admits(client)) return 'denied';
    if (!this.#tls) return 'ok';
    const t = client.tls;
    if (t === null) return 'tls';
    if (this.#identities === null && this.#subjects === null) return 'ok';
    if (this.#identities && t.pskIdentity !== undefined && this.#identities.has(t.pskIdentity)) return 'ok';
    const fields = t.subjectFields;
    if (this.#subjects && fields !== undefined) {
      // Field by field, on the parsed certificate: a value is compared whole, commas and all.
      if (this.#subjects.some((parts) => parts.every(([k, v]) => fields.get(k)?.includes(v) === true))) return 'ok';
    }
    return 'denied';
  }
}
