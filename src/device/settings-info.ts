/**
 * What a layer's settings schema says about its keys, read from the valibot schema
 * itself (so a listing cannot drift from what the layer accepts): each key's type, whether
 * it is required, its default and its doc (a `v.description(...)` in its pipe), and the
 * command-line coercion of `key=value` strings to what a key expects.
 */
import type * as v from 'valibot';
import { sizeSetting } from './settings.js';

/** One setting of a layer, as `blockgate plugins` shows it. */
export interface SettingInfo {
  readonly key: string;
  /** A short type, e.g. `size`, `number`, `boolean`, `string`, `"auto" | "inline"`, `list of ...`. */
  readonly type: string;
  readonly required: boolean;
  /** The default valibot fills in (`v.optional(x, default)`), if any. */
  readonly default?: unknown;
  /** The key's `v.description(...)`, if it has one. */
  readonly doc?: string;
}

/** The parts of a valibot schema object this module looks at (valibot's own shape, v1). */
interface SchemaNode {
  readonly type: string;
  readonly wrapped?: SchemaNode;
  readonly default?: unknown;
  readonly options?: readonly (SchemaNode | string | number)[];
  readonly item?: SchemaNode;
  readonly entries?: Readonly<Record<string, SchemaNode>>;
  readonly pipe?: readonly { readonly type: string; readonly kind?: string; readonly description?: string }[];
}

const OPTIONAL = new Set(['optional', 'exact_optional', 'nullish', 'undefinedable']);

function node(schema: unknown): SchemaNode {
  return schema as SchemaNode;
}

/** The schema under any optional wrappers. */
function unwrap(s: SchemaNode): SchemaNode {
  let cur = s;
  while (OPTIONAL.has(cur.type) && cur.wrapped) cur = cur.wrapped;
  return cur;
}

/** The size setting of src/device/settings.ts (a number or a string such as "1G"). */
function isSize(s: SchemaNode): boolean {
  return s === node(sizeSetting) || (s.pipe?.[0] !== undefined && s.pipe[0] === node(sizeSetting));
}

function typeName(s: SchemaNode): string {
  const u = unwrap(s);
  if (isSize(u)) return 'size';
  switch (u.type) {
    case 'picklist':
      return (u.options ?? []).map((o) => JSON.stringify(o)).join(' | ');
    case 'array':
      return `list of ${u.item ? typeName(u.item) : 'values'}`;
    case 'union':
      return (u.options ?? []).map((o) => (typeof o === 'object' ? typeName(o) : JSON.stringify(o))).join(' | ');
    case 'literal':
      return JSON.stringify((u as { literal?: unknown }).literal);
    case 'strict_object':
    case 'object':
    case 'loose_object':
      return 'object';
    default:
      return u.type;
  }
}

function docOf(s: SchemaNode): string | undefined {
  for (let cur: SchemaNode | undefined = s; cur; cur = OPTIONAL.has(cur.type) ? cur.wrapped : undefined) {
    const d = cur.pipe?.find((a) => a.type === 'description')?.description;
    if (d !== undefined) return d;
  }
  return undefined;
}

/**
 * The settings of a layer schema (an object schema such as settingsSchema makes, or a
 * plain record of entries), without the `type` key every layer has. Keys in schema order.
 */
export function describeSettings(schema: v.GenericSchema | v.ObjectEntries, omit: readonly string[] = ['type']): SettingInfo[] {
  const entries = 'type' in schema && typeof schema.type === 'string' ? node(schema).entries ?? {} : (schema as unknown as Record<string, SchemaNode>);
  return Object.entries(entries)
    .filter(([key]) => !omit.includes(key))
    .map(([key, raw]) => {
      const s = node(raw);
      const optional = OPTIONAL.has(s.type);
      const doc = docOf(s);
      return {
        key,
        type: typeName(s),
        required: !optional,
        ...(optional && s.default !== undefined ? { default: typeof s.default === 'function' ? '(computed)' : s.default } : {}),
        ...(doc !== undefined ? { doc } : {}),
      };
    });
}

/** The kinds a command-line string can be converted to for a key. */
function accepts(s: SchemaNode, kind: string): boolean {
  const u = unwrap(s);
  if (u.type === kind) return true;
  if (u.type === 'union') return (u.options ?? []).some((o) => typeof o === 'object' && accepts(o, kind));
  return false;
}

/**
 * Converts command-line `key=value` strings to what each key of `entries` expects: a
 * key that accepts a string keeps it (sizes such as `1G` too); otherwise `true`/`false`
 * become booleans, numeric strings numbers, and for a list `a+b+c` becomes
 * `['a', 'b', 'c']`. Keys the schema does not know, and values that do not convert, are
 * passed on as strings, so the layer's own validation names them.
 */
export function coerceSettingStrings(
  entries: Readonly<Record<string, unknown>>,
  values: Readonly<Record<string, string>>,
): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(values)) {
    const raw = entries[key];
    out[key] = raw === undefined ? value : coerceOne(node(raw), value);
  }
  return out;
}

function coerceOne(s: SchemaNode, value: string): unknown {
  if (accepts(s, 'string') || accepts(s, 'picklist')) return value;
  if (accepts(s, 'boolean') && (value === 'true' || value === 'false')) return value === 'true';
  if (accepts(s, 'number') && value.trim() !== '' && Number.isFinite(Number(value))) return Number(value);
  const u = unwrap(s);
  if (u.type === 'array' && u.item) return value.split('+').map((part) => coerceOne(u.item!, part));
  return value;
}

/** The entries of an object schema (`settingsSchema(...)`), or `{}` for anything else. */
export function schemaEntries(schema: unknown): Readonly<Record<string, unknown>> {
  return node(schema).entries ?? {};
}
