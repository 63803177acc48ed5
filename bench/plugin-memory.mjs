// The bench's plugin backend: a paged RAM disk written against blockgate/plugin's
// PluginDevice base class, as a plugin author would, to measure what the plugin
// adapter costs next to the built-in memory backend (docs/PERFORMANCE.md, "Plugins").
import { Buffer } from 'node:buffer';
import { PluginDevice, defineBackend, sizeSetting } from 'blockgate/plugin';

const PAGE = 1 << 20;

class PagedDisk extends PluginDevice {
  // Writes are in memory when they return: nothing to flush.
  durableWrites = true;

  constructor(size) {
    super();
    this.bytes = size;
    this.pages = new Array(Math.ceil(size / PAGE));
  }

  get size() {
    return this.bytes;
  }

  read(buf, offset) {
    for (let done = 0; done < buf.length; ) {
      const at = (offset + done) % PAGE;
      const n = Math.min(PAGE - at, buf.length - done);
      const page = this.pages[Math.floor((offset + done) / PAGE)];
      if (page) page.copy(buf, done, at, at + n);
      else buf.fill(0, done, done + n);
      done += n;
    }
  }

  write(data, offset) {
    for (let done = 0; done < data.length; ) {
      const p = Math.floor((offset + done) / PAGE);
      const at = (offset + done) % PAGE;
      const n = Math.min(PAGE - at, data.length - done);
      const page = (this.pages[p] ??= Buffer.alloc(PAGE));
      data.copy(page, at, done, done + n);
      done += n;
    }
  }
}

export default defineBackend({
  name: 'bench-memory',
  settings: { size: sizeSetting },
  open: (s) => new PagedDisk(s.size),
});
