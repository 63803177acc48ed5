/**
 * The live status page of `serve --http`, served at `/`: one static HTML document with
 * its style and script inline, so there is nothing to build at install time and nothing
 * is fetched from the network. The script opens the event stream (/api/events): the
 * first event carries the last minutes of one-second samples and the status, then one
 * event a second carries the new sample and status. It draws with a canvas (a few
 * lines per graph; no charting library) and builds every element with textContent, so
 * names and peers from the server are never parsed as HTML.
 *
 * Hooks for tests and scripts: `body[data-state]` is `connecting`, `live` or `lost`;
 * `body[data-updates]` counts the samples received; each graph's canvas carries
 * `data-points`, the number of samples it drew.
 */
import crypto from 'node:crypto';

const STYLE = `
:root { color-scheme: light dark; --fg: #1b1f24; --bg: #f6f7f9; --card: #fff; --muted: #667; --line: #d8dde3;
  --read: #1f77b4; --write: #d62728; --iops: #2ca02c; --p50: #9467bd; --p99: #ff7f0e; --bad: #c0392b; --ok: #2e7d32; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e8ea; --bg: #14171a; --card: #1d2125; --muted: #99a; --line: #333a40; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; gap: 1.5em; align-items: baseline; padding: .8em 1.2em; background: var(--card); border-bottom: 1px solid var(--line); flex-wrap: wrap; }
header h1 { font-size: 1.2em; margin: 0; }
#state::before { content: "\\25CF "; }
body[data-state=live] #state { color: var(--ok); }
body[data-state=lost] #state, body[data-state=connecting] #state { color: var(--bad); }
main { padding: 1em 1.2em; display: grid; gap: 1em; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: .8em 1em; }
h2 { font-size: 1em; margin: 0 0 .6em; }
h3 { font-size: .95em; margin: .2em 0 .4em; }
.muted { color: var(--muted); }
.export { border-top: 1px solid var(--line); padding-top: .6em; margin-top: .6em; }
.export:first-of-type { border-top: 0; margin-top: 0; padding-top: 0; }
.graphs { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: .8em; margin-top: .5em; }
figure { margin: 0; }
figcaption { font-size: .85em; color: var(--muted); }
figcaption b { font-weight: 600; }
canvas { width: 100%; height: 110px; display: block; border: 1px solid var(--line); border-radius: 4px; }
table { border-collapse: collapse; width: 100%; font-size: .9em; }
th, td { text-align: left; padding: .25em .5em; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; color: var(--muted); }
.flags { font-size: .85em; max-width: 28em; }
.pending { color: var(--bad); font-weight: 600; }
.told { color: var(--ok); }
.recorded { color: var(--bad); }
.key { display: inline-block; width: .8em; height: .8em; border-radius: 2px; margin: 0 .25em 0 .6em; vertical-align: -1px; }
`;

const SCRIPT = `
(function () {
'use strict';
var HISTORY = 300;
var MIN_SPAN = 60;
var history = {};
var updates = 0;
var body = document.body;

function el(tag, attrs) {
  var e = document.createElement(tag);
  if (attrs) for (var k in attrs) { if (k === 'text') e.textContent = attrs[k]; else e.setAttribute(k, attrs[k]); }
  for (var i = 2; i < arguments.length; i++) { var c = arguments[i]; if (c !== null && c !== undefined) e.append(c); }
  return e;
}
function size(n) {
  var u = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  var i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 ? String(Math.round(n)) : n.toFixed(n >= 100 ? 0 : 1)) + ' ' + u[i];
}
function num(n) { return n >= 100 ? String(Math.round(n)) : n.toFixed(1); }
function ms(v) { return v === null ? '-' : v < 1 ? Math.round(v * 1000) + ' \\u00b5s' : num(v) + ' ms'; }
function time(t) { return new Date(t).toLocaleTimeString(); }
function errname(n) { return ({ 1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 22: 'EINVAL', 28: 'ENOSPC', 122: 'EDQUOT', 30: 'EROFS' })[n] || ('errno ' + n); }

function addSample(s) {
  for (var i = 0; i < s.exports.length; i++) {
    var e = s.exports[i];
    var h = history[e.export] || (history[e.export] = []);
    h.push({ at: s.at, r: e.readBytesPerSec, w: e.writeBytesPerSec, iops: e.iops, p50: e.p50Ms, p99: e.p99Ms });
    if (h.length > HISTORY) h.splice(0, h.length - HISTORY);
  }
}

/** Draws series (arrays of numbers or null) on a canvas, y from 0 to their maximum. */
function draw(canvas, series, colors) {
  var dpr = window.devicePixelRatio || 1;
  var w = canvas.clientWidth || 300, h = canvas.clientHeight || 110;
  canvas.width = w * dpr; canvas.height = h * dpr;
  var g = canvas.getContext('2d');
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  var max = 0, n = 0;
  series.forEach(function (s) { n = Math.max(n, s.length); s.forEach(function (v) { if (v !== null && v > max) max = v; }); });
  var pad = 4, top = 6;
  // At least a minute wide, so the first seconds of a server read as a line, not a spike.
  var span = Math.min(HISTORY, Math.max(MIN_SPAN, n));
  g.strokeStyle = getComputedStyle(body).getPropertyValue('--line');
  g.beginPath(); g.moveTo(0, h - pad); g.lineTo(w, h - pad); g.stroke();
  series.forEach(function (s, k) {
    g.strokeStyle = getComputedStyle(body).getPropertyValue(colors[k]);
    g.lineWidth = 1.5;
    g.beginPath();
    var started = false;
    for (var i = 0; i < s.length; i++) {
      var v = s[i];
      if (v === null) { started = false; continue; }
      var x = w - (s.length - 1 - i) * (w / (span - 1));
      var y = h - pad - (max > 0 ? v / max : 0) * (h - pad - top);
      if (started) g.lineTo(x, y); else { g.moveTo(x, y); started = true; }
    }
    g.stroke();
  });
  canvas.dataset.points = String(n);
  return max;
}

function graph(title, keys) {
  var cap = el('figcaption', null, el('b', { text: title }));
  keys.forEach(function (k) {
    var key = el('span', { class: 'key' });
    key.style.background = 'var(' + k[1] + ')';
    cap.append(key, k[0]);
  });
  var value = el('span', { class: 'muted' });
  cap.append(' ', value);
  var c = el('canvas', { 'data-graph': title });
  return { fig: el('figure', null, cap, c), canvas: c, value: value };
}

var exportViews = {};
function exportView(name) {
  var v = exportViews[name];
  if (v) return v;
  var head = el('h3');
  var info = el('div', { class: 'muted' });
  var tp = graph('throughput', [['read', '--read'], ['write', '--write']]);
  var io = graph('IOPS', [['requests/s', '--iops']]);
  var lat = graph('latency', [['p50', '--p50'], ['p99', '--p99']]);
  var box = el('div', { class: 'export', 'data-export': name }, head, info, el('div', { class: 'graphs' }, tp.fig, io.fig, lat.fig));
  v = exportViews[name] = { box: box, head: head, info: info, tp: tp, io: io, lat: lat };
  document.getElementById('exports').append(box);
  return v;
}

function renderExports(st) {
  var seen = {};
  st.exports.forEach(function (e) {
    seen[e.name] = true;
    var v = exportView(e.name);
    v.head.textContent = (e.name === '' ? "'' (default)" : e.name) + ' \\u2014 ' + e.description;
    var es = e.errseq;
    var live = e.live ? e.live.ops : null;
    var totals = live ? ', read ' + size(live.read.bytes) + ', written ' + size(live.write.bytes) : '';
    v.info.textContent = size(e.size) + ', ' + (e.readOnly ? 'read-only' : 'read-write') + (e.gate !== undefined ? ', gate unit ' + e.gate : '') +
      ', ' + e.sessions.length + ' session(s)' + totals + ', write-back errors: ' + (es.error === 0 ? 'none' : errname(es.error) + (es.seen ? ' (seen)' : ' (not yet seen)'));
    var h = history[e.name] || [];
    var m = draw(v.tp.canvas, [h.map(function (p) { return p.r; }), h.map(function (p) { return p.w; })], ['--read', '--write']);
    var last = h[h.length - 1];
    v.tp.value.textContent = last ? 'now ' + size(last.r) + '/s read, ' + size(last.w) + '/s write (max ' + size(m) + '/s)' : '';
    draw(v.io.canvas, [h.map(function (p) { return p.iops; })], ['--iops']);
    v.io.value.textContent = last ? 'now ' + num(last.iops) : '';
    draw(v.lat.canvas, [h.map(function (p) { return p.p50; }), h.map(function (p) { return p.p99; })], ['--p50', '--p99']);
    v.lat.value.textContent = last ? 'p50 ' + ms(last.p50) + ', p99 ' + ms(last.p99) : '';
  });
  for (var name in exportViews) if (!seen[name]) { exportViews[name].box.remove(); delete exportViews[name]; }
}

function renderSessions(st) {
  var rows = [];
  st.exports.forEach(function (e) {
    e.sessions.forEach(function (s) {
      var f = s.figures || {};
      rows.push(el('tr', { 'data-session': String(s.id) },
        el('td', { text: String(s.id) }), el('td', { text: e.name }), el('td', { text: s.peer }),
        el('td', { text: s.security || 'clear' }), el('td', { text: f.replies || '-' }), el('td', { class: 'flags', text: f.flags ? f.flags.split('|').join(' ') : '-' }),
        el('td', { text: f.requests !== undefined ? String(f.requests) : '-' }),
        el('td', { text: f.bytesRead !== undefined ? size(f.bytesRead) : '-' }), el('td', { text: f.bytesWritten !== undefined ? size(f.bytesWritten) : '-' }),
        el('td', { class: s.errorPending ? 'pending' : '', text: s.errorPending ? 'pending' : 'none' })));
    });
  });
  var tb = document.querySelector('#sessions tbody');
  tb.replaceChildren.apply(tb, rows.length ? rows : [el('tr', null, el('td', { colspan: '10', class: 'muted', text: 'no sessions' }))]);
}

function renderTimeline(st) {
  var items = [];
  st.exports.forEach(function (e) {
    e.sessions.forEach(function (s) {
      if (s.errorPending) items.push(el('li', { class: 'pending', 'data-kind': 'pending', 'data-session': String(s.id) },
        'still pending: session ' + s.id + ' (' + s.peer + ') on ' + e.name + ' has ' + errname(e.errseq.error) + ' waiting for its next flush'));
    });
  });
  st.timeline.slice().reverse().forEach(function (ev) {
    if (ev.kind === 'recorded') items.push(el('li', { class: 'recorded', 'data-kind': 'recorded' }, time(ev.at) + ' recorded ' + errname(ev.errno) + ' on ' + ev.export));
    else items.push(el('li', { class: 'told', 'data-kind': 'reported', 'data-session': String(ev.session) },
      time(ev.at) + ' told session ' + ev.session + ' (' + ev.peer + ') of ' + errname(ev.errno) + ' on ' + ev.export));
  });
  var ul = document.getElementById('timeline');
  ul.replaceChildren.apply(ul, items.length ? items : [el('li', { class: 'muted', text: 'no write-back error recorded' })]);
}

function renderGates(st) {
  var rows = st.gates.map(function (g) {
    return el('tr', { 'data-gate': g.name }, el('td', { text: g.name }), el('td', { text: String(g.unit) }), el('td', { text: size(g.mediasize) }),
      el('td', { text: String(g.queued) }), el('td', { text: String(g.inFlight) }), el('td', { text: String(g.sleeping) }), el('td', { text: String(g.openCount) }), el('td', { text: g.info }));
  });
  var tb = document.querySelector('#gates tbody');
  tb.replaceChildren.apply(tb, rows.length ? rows : [el('tr', null, el('td', { colspan: '8', class: 'muted', text: 'no gates' }))]);
}

function render(st, sample) {
  document.getElementById('uptime').textContent = 'up ' + Math.round(st.uptimeSeconds) + ' s';
  document.getElementById('listeners').textContent = st.listeners.join(', ');
  document.getElementById('loop').textContent = sample ? 'event loop delay p99 ' + num(sample.loopP99Ms) + ' ms' : '';
  renderExports(st);
  renderSessions(st);
  renderTimeline(st);
  renderGates(st);
}

var source = new EventSource('api/events');
source.addEventListener('hello', function (m) {
  var d = JSON.parse(m.data);
  history = {};
  d.history.forEach(addSample);
  body.dataset.state = 'live';
  document.getElementById('state').textContent = 'live';
  render(d.status, d.history[d.history.length - 1]);
});
source.addEventListener('sample', function (m) {
  var d = JSON.parse(m.data);
  addSample(d.sample);
  updates++;
  body.dataset.updates = String(updates);
  render(d.status, d.sample);
});
source.onerror = function () {
  body.dataset.state = 'lost';
  document.getElementById('state').textContent = 'reconnecting';
};
})();
`;

const BODY = `<body data-state="connecting" data-updates="0">
<header><h1>blockgate</h1><span id="state">connecting</span><span id="uptime" class="muted"></span><span id="listeners" class="muted"></span><span id="loop" class="muted"></span></header>
<main>
<section><h2>Exports</h2><div id="exports"></div></section>
<section><h2>Sessions</h2><table id="sessions"><thead><tr><th>id</th><th>export</th><th>peer</th><th>security</th><th>replies</th><th>flags</th><th>requests</th><th>read</th><th>written</th><th>write-back error</th></tr></thead><tbody></tbody></table></section>
<section><h2>Write-back error timeline</h2><ul id="timeline"></ul></section>
<section><h2>Gates</h2><table id="gates"><thead><tr><th>name</th><th>unit</th><th>size</th><th>queued</th><th>in flight</th><th>handlers waiting</th><th>opens</th><th>info</th></tr></thead><tbody></tbody></table></section>
</main>`;

const PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>blockgate status</title><style>${STYLE}</style></head>
${BODY}
<script>${SCRIPT}</script>
</body></html>
`;

const hash = (s: string): string => `'sha256-${crypto.createHash('sha256').update(s).digest('base64')}'`;

/** The page's Content-Security-Policy: its own inline style and script (by hash), its event stream, nothing else. */
export const STATUS_PAGE_CSP = `default-src 'none'; script-src ${hash(SCRIPT)}; style-src ${hash(STYLE)}; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'`;

/** The status page. */
export function statusPage(): string {
  return PAGE;
}
