/**
 * Layer settings: valibot schemas for the setting kinds layers share, and the one parse
 * function that names the layer and the offending key.
 */
import * as v from 'valibot';
import { BlockError } from '../errors/index.js';
import { parseSize } from './size.js';

/**
 * A size setting: a number of bytes or a string such as "1G" (see parseSize). The
 * parse error becomes a valibot issue so that it is reported with the key's name.
 */
export const sizeSetting = v.pipe(
  v.union([v.number(), v.string()], (issue) => `expected a size (a number or a string like "1G"), got ${issue.received}`),
  v.rawTransform<number | string, number>(({ dataset, addIssue, NEVER }) => {
    try {
      return parseSize(dataset.value);
    } catch (e) {
      addIssue({ message: (e as Error).message });
      return NEVER;
    }
  }),
);

/** An optional boolean setting. */
/** A file path setting (required where used bare; wrap in v.optional for an optional one). */
export const pathSetting = v.pipe(v.string((issue) => `expected a path string, got ${issue.received}`), v.minLength(1, 'must not be empty'));

/** A whole-number setting such as a PRNG seed. */
export const wholeNumberSetting = v.pipe(
  v.number((issue) => `expected a whole number, got ${issue.received}`),
  v.safeInteger('expected a whole number'),
);

export const booleanSetting = v.optional(v.boolean((issue) => `expected true or false, got ${issue.received}`));

/**
 * A layer's settings object: the given entries plus `type`, any other key rejected
 * (a typo in a config file should fail loudly, not be ignored).
 */
export function settingsSchema<const E extends v.ObjectEntries>(entries: E) {
  const all = { type: v.string(), ...entries };
  const known = Object.keys(all).join(', ');
  return v.strictObject(all, (issue) => {
    if (issue.expected === 'never') return `unknown setting (known: ${known})`;
    if (issue.expected === 'Object') return `expected a settings object, got ${issue.received}`;
    return 'required setting is missing';
  });
}

/**
 * The key path of a valibot issue as a config file spells it: `exports[0].backend.type`
 * (valibot's own dot path says `exports.0.backend.type`); '' for the value itself.
 */
export function issuePath(issue: v.BaseIssue<unknown>): string {
  return (issue.path ?? [])
    .map((p) => (typeof p.key === 'number' ? `[${p.key}]` : `.${String(p.key)}`))
    .join('')
    .replace(/^\./, '');
}

/**
 * The one "validate and name the bad key" function: returns the parsed value, or throws
 * BlockError EINVAL `WHERE: KEY.PATH: message` for the first issue. `top` names the value
 * itself when the issue is about it rather than a key ('' leaves the key part out).
 */
export function parseOrThrow<S extends v.GenericSchema>(schema: S, value: unknown, where: string, top = '(top level)'): v.InferOutput<S> {
  const result = v.safeParse(schema, value);
  if (result.success) return result.output;
  const issue = result.issues[0];
  const key = issuePath(issue) || top;
  throw new BlockError('EINVAL', `${where}: ${key === '' ? '' : `${key}: `}${issue.message}`);
}

/**
 * Validates a layer's settings `desc` against `schema`; on failure throws BlockError
 * EINVAL whose message names the layer and the bad key, e.g. "memory: size: invalid size 'x' (...)".
 */
export function parseSettings<S extends v.GenericSchema>(layer: string, schema: S, desc: unknown): v.InferOutput<S> {
  return parseOrThrow(schema, desc, layer, '(settings)');
}
