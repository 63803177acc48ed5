/** The `--http [HOST:]PORT` address: loopback unless a host is given. */
import { BlockError } from '../errors/index.js';

/** The host of `--http PORT`: loopback only, so metrics and the status page are not on the network unless asked. */
export const DEFAULT_HTTP_HOST = '127.0.0.1';

export interface HttpAddress {
  readonly host: string;
  readonly port: number;
}

/** The largest TCP port number. */
const MAX_PORT = 65535;

/** Parses `PORT`, `HOST:PORT` or `[V6]:PORT`; EINVAL naming what is wrong. */
export function parseHttpAddress(text: string): HttpAddress {
  const m = /^(?:(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]]+)):)?(\d+)$/.exec(text.trim());
  if (!m) throw new BlockError('EINVAL', `expected PORT, HOST:PORT or [IPV6]:PORT, got '${text}'`);
  const port = Number(m[3]);
  if (port > MAX_PORT) throw new BlockError('EINVAL', `expected a port number from 0 to ${MAX_PORT}, got ${m[3]}`);
  return { host: m[1] ?? m[2] ?? DEFAULT_HTTP_HOST, port };
}

/** The URL of an address, for the log. */
export function httpUrl(a: HttpAddress): string {
  return `http://${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}/`;
}
