/** Ports for tests that must name one before a server starts (nbdkit -p, systemd-socket-activate -l). */
import net from 'node:net';

/**
 * A loopback TCP port free at the time of the call: the OS picks it for a listener that
 * is closed at once. Another process may take it before the caller binds it; the tests
 * that use it start their server right away.
 */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}
