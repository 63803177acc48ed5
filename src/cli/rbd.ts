/**
 * `blockgate rbd create POOL/IMAGE SIZE`: creates an RBD image for the rbd backend. It is
 * an ordinary format-2 image with the cluster's default features (what `rbd create`
 * makes), so `rbd`, `qemu-img` and `rbd-nbd` read it as any other (docs/CEPH.md).
 *
 * librbd is loaded only when the command runs (src/backends/rbd/librbd.ts).
 */
import { Command } from 'commander';
import { BlockError, toBlockError } from '../errors/index.js';
import { parseSize, formatSize } from '../device/size.js';
import { RadosClient, createImage, parseRbdSpec } from '../backends/rbd/index.js';

interface RbdCreateFlags {
  conf?: string;
  id?: string;
  keyring?: string;
}

function failed(e: unknown): void {
  const b = toBlockError(e);
  process.stderr.write(`blockgate rbd create: ${b.message} (${b.code})\n`);
  process.exitCode = 1;
}

/** Creates POOL/IMAGE of SIZE bytes; the client connects with the given conf, user and keyring. */
export async function rbdCreate(spec: string, sizeArg: string, flags: RbdCreateFlags): Promise<void> {
  let target: { pool: string; image: string };
  let size: number;
  try {
    target = parseRbdSpec(spec);
    size = parseSize(sizeArg);
  } catch (e) {
    throw new BlockError('EINVAL', (e as Error).message);
  }
  const client = await RadosClient.connect({
    ...(flags.conf !== undefined ? { conf: flags.conf } : {}),
    ...(flags.id !== undefined ? { id: flags.id } : {}),
    ...(flags.keyring !== undefined ? { keyring: flags.keyring } : {}),
  });
  try {
    await createImage(client, target.pool, target.image, size);
  } finally {
    await client.shutdown();
  }
  process.stdout.write(`created rbd:${target.pool}/${target.image} (${formatSize(size)})\n`);
}

export function rbdCommand(): Command {
  const cmd = new Command('rbd').description('create RBD images for the rbd backend (docs/CEPH.md)');
  cmd
    .command('create')
    .description('create an RBD image (format 2, the cluster\'s default features) that `blockgate serve rbd:POOL/IMAGE` can serve')
    .argument('<pool/image>', 'the pool and the new image\'s name, e.g. rbd/disk1')
    .argument('<size>', 'the image size, e.g. 10G (suffixes K, M, G, T, P are powers of 1024)')
    .option('--conf <path>', 'ceph.conf (default: librados\'s search: $CEPH_CONF, /etc/ceph/ceph.conf, ...)')
    .option('--id <user>', 'cephx user without "client." (default: admin)')
    .option('--keyring <path>', 'keyring (default: the conf\'s)')
    .action(async (spec: string, size: string, flags: RbdCreateFlags) => {
      try {
        await rbdCreate(spec, size, flags);
      } catch (e) {
        failed(e);
      }
    });
  return cmd;
}
