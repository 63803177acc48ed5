import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { DEFAULT_HTTP_HOST, HttpServer, MAX_EVENT_CLIENTS, formatHttpAddress, json, parseHttpAddress } from '../../src/http/index.js';
import { parseConfig } from '../../src/cli/config.js';

test('--http takes PORT (loopback), HOST:PORT and [IPV6]:PORT, and refuses anything else', () => {
  assert.deepEqual(parseHttpAddress('9100'), { host: DEFAULT_HTTP_HOST, port: 9100 });
  assert.equal(DEFAULT_HTTP_HOST, '127.0.0.1');
  assert.deepEqual(parseHttpAddress('0.0.0.0:80'), { host: '0.0.0.0', port: 80 });
  assert.deepEqual(parseHttpAddress('[::1]:9100'), { host: '::1', port: 9100 });
  assert.equal(formatHttpAddress({ host: '::1', port: 9100 }), '[::1]:9100');
  for (const bad of ['', 'x', '::1:80', 'host:', ':80', '65536', 'a:b:1']) assert.throws(() => parseHttpAddress(bad), /expected/, bad);
});

test("the config key http is checked like --http, naming the key", () => {
  const exports = [{ name: 'a', backend: { type: 'memory', size: '1M' } }];
  assert.equal(parseConfig({ http: '127.0.0.1:9100', metrics: false, exports }).http, '127.0.0.1:9100');
  assert.throws(() => parseConfig({ http: 'nope', exports }, 'f.json'), /f\.json: http: expected PORT, HOST:PORT or \[IPV6\]:PORT/);
  assert.throws(() => parseConfig({ metrics: 'yes', exports }, 'f.json'), /f\.json: metrics: expected true or false/);
});

/** Opens an event stream and resolves with the status and the first chunk. */
function openStream(port: number): Promise<{ status: number; first: string; req: http.ClientRequest }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/events' }, (res) => {
      res.once('data', (b: Buffer) => resolve({ status: res.statusCode!, first: b.toString(), req }));
      res.once('end', () => resolve({ status: res.statusCode!, first: '', req }));
    });
    req.on('error', reject);
  });
}

test(`at most ${MAX_EVENT_CLIENTS} event streams at once: the next gets 503, and a freed slot is taken again`, async () => {
  const server = new HttpServer({ routes: { '/x': () => json({ ok: true }) }, events: { path: '/events', initial: () => ({ event: 'hello', data: { n: 1 } }) } });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  const open: http.ClientRequest[] = [];
  try {
    for (let i = 0; i < MAX_EVENT_CLIENTS; i++) {
      const s = await openStream(port);
      assert.equal(s.status, 200);
      assert.match(s.first, /event: hello\ndata: \{"n":1\}\n\n/);
      open.push(s.req);
    }
    const refused = await openStream(port);
    assert.equal(refused.status, 503);
    open.shift()!.destroy();
    // The server notices the close on its next turn; bounded retries, no timing assumption.
    let again = 503;
    for (let i = 0; i < 100 && again === 503; i++) {
      const s = await openStream(port);
      again = s.status;
      if (again === 200) open.push(s.req);
      else await new Promise((r) => setTimeout(r, 10));
    }
    assert.equal(again, 200);
    assert.equal(server.eventClients, MAX_EVENT_CLIENTS);
    const r = await fetch(`http://127.0.0.1:${port}/x`);
    assert.deepEqual(await r.json(), { ok: true });
  } finally {
    for (const r of open) r.destroy();
    await server.close();
  }
});
