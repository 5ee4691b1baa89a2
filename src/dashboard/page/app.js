// prefhost dashboard: charts of the run folders' metrics.jsonl, kept up to date through
// the server's event stream (/api/stream). Read-only: it only ever GETs.
'use strict';

const SVG = 'http://www.w3.org/2000/svg';
const MARKER_COLORS = { reload: '#2e7d32', reload_failed: '#c62828', loss_failed: '#ef6c00', lr_failed: '#ef6c00', restart_needed: '#6a1b9a' };
const PALETTE = ['#2563c9', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22'];
// TRL's order first, then the rest by name; throughput last.
const ORDER = ['loss', 'rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins',
  'logps/chosen', 'logps/rejected', 'logps/chosen_minus_ref', 'grad_norm', 'learning_rate'];
const NOT_CHARTED = new Set(['step', 'epoch']);
const MAX_POINTS = 2000;

const S = {
  runs: [],          // [{index, label}]
  info: [],          // /api/info per run
  sources: new Map(),// "run:name" → source
  loading: new Set(),
  again: new Set(),
  renderQueued: false,
};

const $ = (id) => document.getElementById(id);
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') node.className = v; else if (k === 'text') node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}
async function getJSON(url) {
  const r = await fetch(url, { cache: 'no-store' });
  if (!r.ok) throw new Error(url + ': ' + r.status);
  return r.json();
}
function basename(p) { const parts = String(p).split('/').filter(Boolean); return parts.length ? parts[parts.length - 1] : String(p); }

// ---- data

function sourceOf(run, name) {
  const key = run + ':' + name;
  let s = S.sources.get(key);
  if (!s) {
    s = { key, run, name, generation: null, count: 0, points: new Map(), events: [], last: null, color: PALETTE[0] };
    S.sources.set(key, s);
  }
  return s;
}
function labelOf(s) {
  const run = basename(S.runs[s.run] ? S.runs[s.run].label : s.run);
  return s.name ? run + ' / ' + s.name : run;
}
function reset(s, generation) {
  s.generation = generation; s.count = 0; s.points = new Map(); s.events = []; s.last = null;
}
function ingest(s, lines) {
  for (const line of lines) {
    s.count += 1;
    if (typeof line !== 'object' || line === null) continue;
    if (line.event) { s.events.push(line); continue; }
    const step = line.step;
    if (typeof step !== 'number') continue;
    s.last = line;
    for (const [k, v] of Object.entries(line)) {
      if (NOT_CHARTED.has(k) || typeof v !== 'number' || !isFinite(v)) continue;
      let pts = s.points.get(k);
      if (!pts) { pts = []; s.points.set(k, pts); }
      pts.push([step, v]);
    }
  }
}
async function loadSource(run, name) {
  const s = sourceOf(run, name);
  if (S.loading.has(s.key)) { S.again.add(s.key); return; }
  S.loading.add(s.key);
  try {
    for (;;) {
      const url = `/api/metrics?run=${run}&source=${encodeURIComponent(name)}&generation=${s.generation === null ? '' : s.generation}&from=${s.count}`;
      const r = await getJSON(url);
      if (r.generation !== s.generation || r.from !== s.count) {
        // Another file (a resume rewrote it), or lines this page never saw: from the start.
        if (r.from !== 0) { reset(s, null); continue; }
        reset(s, r.generation);
      }
      ingest(s, r.lines);
      queueRender();
      if (!r.more) break;
    }
  } catch (e) {
    console.warn(e);
  } finally {
    S.loading.delete(s.key);
    if (S.again.delete(s.key)) loadSource(run, name);
  }
}
async function loadInfo(run) {
  try {
    const info = await getJSON(`/api/info?run=${run}`);
    S.info[run] = info;
    for (const src of info.sources || []) sourceOf(run, src.name);
    queueRender();
  } catch (e) { console.warn(e); }
}
function onStamps(data) {
  (data.runs || []).forEach((stamp, run) => {
    const info = S.info[run];
    if (!info || info._stamp !== stamp.info) {
      loadInfo(run).then(() => { if (S.info[run]) S.info[run]._stamp = stamp.info; });
    }
    for (const [name, [generation, lines]] of Object.entries(stamp.sources || {})) {
      const s = sourceOf(run, name);
      if (s.generation !== generation || s.count !== lines) loadSource(run, name);
    }
  });
}

function connect() {
  const conn = $('conn');
  const es = new EventSource('/api/stream');
  es.addEventListener('open', () => { document.body.dataset.live = '1'; conn.textContent = 'live'; conn.classList.remove('offline'); });
  es.addEventListener('change', (ev) => { try { onStamps(JSON.parse(ev.data)); } catch (e) { console.warn(e); } });
  es.addEventListener('error', () => {
    document.body.dataset.live = '0';
    conn.textContent = 'offline: retrying (the data shown is as last seen)';
    conn.classList.add('offline');
  });
}

async function start() {
  try {
    const r = await getJSON('/api/runs');
    S.runs = r.runs;
    renderModelDiffs((await getJSON('/api/model-diffs')).reports);
  } catch (e) {
    $('runs').append(el('div', { class: 'empty', text: 'cannot reach the dashboard server' }));
    return;
  }
  await Promise.all(S.runs.map((r) => loadInfo(r.index)));
  for (const s of [...S.sources.values()]) loadSource(s.run, s.name);
  connect();
}

// ---- rendering

function queueRender() {
  if (S.renderQueued) return;
  S.renderQueued = true;
  setTimeout(() => { S.renderQueued = false; render(); }, 120);
}
function render() {
  // Colours by the order of runs and arms on the page, whatever order the data came in.
  allSources().forEach((s, i) => { s.color = PALETTE[i % PALETTE.length]; });
  renderRuns();
  renderLegend();
  renderEvals();
  renderCharts();
  renderEvents();
}

function fmtDuration(sec) {
  if (!isFinite(sec) || sec < 0) return '–';
  sec = Math.round(sec);
  const h = Math.floor(sec / 3600), m = Math.floor((sec % 3600) / 60), s = sec % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}
function fmt(v) {
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}
function sourcesOfRun(run) {
  const info = S.info[run];
  return ((info && info.sources) || []).map((src) => ({ meta: src, s: sourceOf(run, src.name) }));
}
function lastStep(s) { return s.last ? s.last.step : 0; }
function finished(s) { return s.events.some((e) => e.event === 'train_summary'); }

function renderRuns() {
  const box = $('runs');
  box.replaceChildren();
  S.runs.forEach((r) => {
    const info = S.info[r.index] || {};
    const rows = sourcesOfRun(r.index);
    const comparison = info.kind === 'comparison';
    let status;
    if (info.kind === 'waiting') status = 'waiting';
    else if (comparison) status = info.results ? 'finished' : info.running ? 'running' : 'stopped';
    else status = rows.length && finished(rows[0].s) ? 'finished' : info.running ? 'running' : rows.length && rows[0].s.count ? 'stopped' : 'waiting';
    const card = el('div', { class: 'card', 'data-run': r.index, 'data-status': status });
    card.append(el('h2', {}, basename(r.label), el('span', { class: 'badge', text: comparison ? 'comparison' : 'run' }), el('span', { class: 'badge ' + status, text: status })));
    card.append(el('div', { class: 'path', text: info.path || r.label }));
    // Progress: per arm for a comparison; ETA from the last logged steps per second.
    const progress = el('div', { class: 'progress' });
    const arms = comparison ? (info.arms && info.arms.length ? info.arms : rows.map((x) => x.meta.name)) : [''];
    const fallbackTotal = rows.map((x) => x.meta.total_steps).find((t) => t);
    let remaining = 0, rate = 0, etaKnown = true;
    for (const name of arms) {
      const row = rows.find((x) => x.meta.name === name);
      const total = (row && row.meta.total_steps) || fallbackTotal || 0;
      const step = row ? lastStep(row.s) : 0;
      const done = row && (finished(row.s) || row.meta.finished);
      const share = done ? 1 : total ? Math.min(1, step / total) : 0;
      const perSec = row && row.s.last && row.s.last.train_steps_per_second;
      if (perSec > 0 && !done) rate = perSec;
      if (!done) remaining += Math.max(0, total - step);
      if (!total) etaKnown = false;
      const bar = el('div', { class: 'bar' }, el('div', {}));
      bar.firstChild.style.width = (100 * share).toFixed(1) + '%';
      progress.append(el('div', { class: 'row', 'data-source': name }, el('span', { text: name || 'steps' }), bar,
        el('span', { text: total ? `${done ? total : step} / ${total}` : `${step}` })));
    }
    card.append(progress);
    const stats = [];
    if (status === 'running' || status === 'waiting') {
      stats.push(rate > 0 && etaKnown ? `ETA ${fmtDuration(remaining / rate)}` : 'ETA –');
    }
    const last = rows.map((x) => x.s.last).filter(Boolean).pop();
    if (last && last.train_steps_per_second) stats.push(`${fmt(last.train_steps_per_second)} steps/s`);
    if (last && typeof last.loss === 'number') stats.push(`loss ${fmt(last.loss)}`);
    const versions = rows.reduce((n, x) => n + ((x.meta.versions || []).length), 0);
    if (versions) stats.push(`${versions} script version${versions === 1 ? '' : 's'}`);
    card.append(el('div', { class: 'stats', text: stats.join(' · ') }));
    const config = info.config && info.config.config;
    if (config) {
      const d = el('details', { class: 'config' }, el('summary', { text: 'config' + (info.config.script ? ` (${info.config.script})` : '') }),
        el('pre', { text: JSON.stringify(config, null, 2) }));
      card.append(d);
    }
    box.append(card);
  });
}

function allSources() {
  const out = [];
  S.runs.forEach((r) => sourcesOfRun(r.index).forEach((x) => out.push(x.s)));
  return out;
}

function renderLegend() {
  const box = $('legend');
  box.replaceChildren();
  const sources = allSources();
  for (const s of sources) {
    const sw = el('span', { class: 'swatch' }); sw.style.background = s.color;
    box.append(el('span', { class: 'key', 'data-source': s.key }, sw, labelOf(s)));
  }
  if (sources.length) box.append(el('span', { class: 'sep' }));
  for (const [name, color] of Object.entries(MARKER_COLORS)) {
    if (name === 'lr_failed') continue;
    const m = el('span', { class: 'mark' }); m.style.background = color;
    box.append(el('span', { class: 'key' }, m, name === 'loss_failed' ? 'loss_failed / lr_failed' : name));
  }
  box.append(el('span', { class: 'key', text: '(click a marker for the script diff)' }));
}

function renderEvals() {
  const box = $('evals');
  box.replaceChildren();
  const rows = [];
  S.runs.forEach((r) => {
    const list = sourcesOfRun(r.index);
    let sharedBefore = null;
    for (const { s } of list) {
      const evals = s.events.filter((e) => e.event === 'eval');
      const before = evals.find((e) => e.step === 0);
      if (before && !sharedBefore) sharedBefore = before;
      const after = evals.filter((e) => e.step > 0).pop();
      if (before || after) rows.push({ s, before: before || null, after: after || null });
    }
    for (const row of rows) if (!row.before && row.s.run === r.index) row.before = sharedBefore;
  });
  if (!rows.length) return;
  const acc = (e) => e ? `${(100 * e.accuracy).toFixed(1)}% (${e.correct}/${e.total})` : '–';
  const table = el('table', {}, el('tr', {}, el('th', { text: 'held-out accuracy (greedy)' }), el('th', { text: 'before training' }), el('th', { text: 'after training' }), el('th', { text: 'change' })));
  for (const row of rows) {
    const delta = row.before && row.after ? `${(100 * (row.after.accuracy - row.before.accuracy)).toFixed(1)} pts` : '–';
    table.append(el('tr', { 'data-source': row.s.key }, el('td', { text: labelOf(row.s) }), el('td', { text: acc(row.before) }), el('td', { text: acc(row.after) }), el('td', { text: delta })));
  }
  box.append(el('h2', { text: 'held-out evaluation' }), table);
}

function metricOrder(names) {
  const rank = (n) => {
    const i = ORDER.indexOf(n);
    if (i >= 0) return [0, i, n];
    if (n.startsWith('train_')) return [3, 0, n];
    if (n.startsWith('diagnostics/')) return [1, 0, n];
    return [2, 0, n];
  };
  return names.sort((a, b) => {
    const [x, y] = [rank(a), rank(b)];
    return x[0] - y[0] || x[1] - y[1] || (x[2] < y[2] ? -1 : x[2] > y[2] ? 1 : 0);
  });
}

function niceTicks(lo, hi, n) {
  const span = hi - lo;
  const raw = span / Math.max(1, n);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  return out;
}
function thin(points) {
  if (points.length <= MAX_POINTS) return points;
  const k = Math.ceil(points.length / MAX_POINTS);
  const out = points.filter((_, i) => i % k === 0);
  if (out[out.length - 1] !== points[points.length - 1]) out.push(points[points.length - 1]);
  return out;
}

function renderCharts() {
  const box = $('charts');
  const sources = allSources();
  const names = new Set();
  for (const s of sources) for (const k of s.points.keys()) names.add(k);
  const markers = [];
  for (const s of sources) for (const e of s.events) if (MARKER_COLORS[e.event]) markers.push({ s, e });
  box.replaceChildren();
  if (!names.size) {
    box.append(el('div', { class: 'empty', text: 'no metrics logged yet' }));
    return;
  }
  for (const name of metricOrder([...names])) box.append(chart(name, sources, markers));
}

function chart(name, sources, markers) {
  const W = 460, H = 230, L = 58, R = 12, T = 16, B = 26;
  const series = sources.filter((s) => s.points.has(name)).map((s) => ({ s, pts: thin(s.points.get(name)) }));
  let n = 0, xmax = 1, ymin = Infinity, ymax = -Infinity;
  for (const { s, pts } of series) {
    n += s.points.get(name).length;
    for (const [x, y] of pts) { xmax = Math.max(xmax, x); ymin = Math.min(ymin, y); ymax = Math.max(ymax, y); }
  }
  for (const { e } of markers) xmax = Math.max(xmax, e.step);
  if (ymin === ymax) { const pad = Math.abs(ymin) * 0.1 || 1; ymin -= pad; ymax += pad; }
  const pad = (ymax - ymin) * 0.06; ymin -= pad; ymax += pad;
  const X = (x) => L + (W - L - R) * (x / xmax);
  const Y = (y) => T + (H - T - B) * (1 - (y - ymin) / (ymax - ymin));
  const section = el('section', { class: 'chart', 'data-metric': name, 'data-points': n, 'data-series': series.length });
  section.append(el('h3', { text: name }));
  const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': name });
  for (const v of niceTicks(ymin, ymax, 5)) {
    root.append(svg('line', { class: 'grid', x1: L, x2: W - R, y1: Y(v), y2: Y(v) }));
    const t = svg('text', { class: 'axis', x: L - 6, y: Y(v) + 3, 'text-anchor': 'end' }); t.textContent = fmt(v); root.append(t);
  }
  for (const v of niceTicks(0, xmax, 6)) {
    const t = svg('text', { class: 'axis', x: X(v), y: H - 8, 'text-anchor': 'middle' }); t.textContent = fmt(v); root.append(t);
  }
  root.append(svg('line', { class: 'grid', x1: L, x2: L, y1: T, y2: H - B }));
  for (const { s, pts } of series) {
    if (pts.length === 1) {
      root.append(svg('circle', { cx: X(pts[0][0]), cy: Y(pts[0][1]), r: 2.5, fill: s.color }));
    } else {
      root.append(svg('polyline', { class: 'series', stroke: s.color, points: pts.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(' '), 'data-source': s.key }));
    }
  }
  // Hover: the values at the nearest logged step. Under the markers, so they stay clickable.
  const hair = svg('line', { class: 'hair', y1: T, y2: H - B, visibility: 'hidden' });
  const overlay = svg('rect', { x: L, y: T, width: W - L - R, height: H - T - B, fill: 'transparent' });
  root.append(hair, overlay);
  overlay.addEventListener('mousemove', (ev) => {
    const box = root.getBoundingClientRect();
    const x = ((ev.clientX - box.left) / box.width * W - L) / (W - L - R) * xmax;
    const tip = $('tip');
    tip.replaceChildren();
    let shownStep = null;
    for (const { s } of series) {
      const pts = s.points.get(name);
      let best = pts[0];
      for (const p of pts) if (Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p;
      if (shownStep === null) shownStep = best[0];
      const sw = el('span', { class: 'sw' }); sw.style.background = s.color;
      tip.append(el('div', {}, sw, `${labelOf(s)}  step ${best[0]}: ${fmt(best[1])}`));
    }
    if (shownStep === null) return;
    hair.setAttribute('x1', X(shownStep)); hair.setAttribute('x2', X(shownStep)); hair.setAttribute('visibility', 'visible');
    tip.hidden = false;
    tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8) + 'px';
    tip.style.top = (ev.clientY + 14) + 'px';
  });
  overlay.addEventListener('mouseleave', () => { $('tip').hidden = true; hair.setAttribute('visibility', 'hidden'); });
  // Event markers, on every chart: a dashed line at the step, a clickable flag on top.
  const seen = new Map();
  for (const { s, e } of markers) {
    const color = MARKER_COLORS[e.event];
    const k = `${e.step}`;
    const offset = seen.get(k) || 0; seen.set(k, offset + 1);
    const x = X(e.step);
    const g = svg('g', { class: 'marker', 'data-event': e.event, 'data-step': e.step, 'data-source': s.key, tabindex: 0 });
    const title = svg('title', {}); title.textContent = `${e.event} at step ${e.step} (${labelOf(s)}): click for the script diff`;
    g.append(title, svg('line', { x1: x, x2: x, y1: T, y2: H - B, stroke: color }));
    const y0 = T - 1 + offset * 9;
    g.append(svg('path', { d: `M${x - 5},${y0 - 6} L${x + 5},${y0 - 6} L${x},${y0 + 2} Z`, fill: color }));
    g.addEventListener('click', () => openDiff(s, e));
    g.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') openDiff(s, e); });
    root.append(g);
  }
  section.append(root);
  return section;
}

function summary(e) {
  if (e.error) return String(e.error).split('\n')[0];
  if (e.files) return [].concat(e.files).join(', ');
  if (e.fields) return 'needs a restart: ' + [].concat(e.fields).join(', ');
  if (e.event === 'eval') return `accuracy ${(100 * e.accuracy).toFixed(1)}% (${e.correct}/${e.total})`;
  if (e.event === 'train_summary') return `${fmtDuration(e.train_runtime)}, ${fmt(e.train_steps_per_second || 0)} steps/s, mean loss ${fmt(e.train_loss || 0)}`;
  const rest = Object.entries(e).filter(([k]) => k !== 'step' && k !== 'event');
  return rest.map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`).join(', ').slice(0, 200);
}

function renderEvents() {
  const box = $('events');
  const all = [];
  for (const s of allSources()) for (const e of s.events) if (e.event !== 'param_grad_norms') all.push({ s, e });
  $('event-count').textContent = `(${all.length})`;
  box.replaceChildren();
  if (!all.length) return;
  all.sort((a, b) => a.e.step - b.e.step);
  const table = el('table', {}, el('tr', {}, el('th', { text: 'step' }), el('th', { text: 'run' }), el('th', { text: 'event' }), el('th', { text: '' })));
  for (const { s, e } of all) {
    const clickable = !!MARKER_COLORS[e.event];
    const tr = el('tr', { class: clickable ? 'clickable' : '' }, el('td', { text: e.step }), el('td', { text: labelOf(s) }), el('td', { text: e.event }), el('td', { text: summary(e) }));
    if (clickable) tr.addEventListener('click', () => openDiff(s, e));
    table.append(tr);
  }
  box.append(table);
}

// ---- `host diff` reports: what training changed, token by token (fixed at start)

function signed(v) { return typeof v === 'number' ? (v > 0 ? '+' : '') + fmt(v) : '–'; }
function offsetChart(rows) {
  // Mean change per token by offset: chosen and rejected bars side by side around zero.
  const W = 460, H = 170, L = 44, R = 8, T = 10, B = 22;
  const values = rows.flatMap((p) => [p.chosen_mean, p.rejected_mean]).filter((v) => typeof v === 'number');
  const top = Math.max(1e-9, ...values.map(Math.abs));
  const Y = (v) => T + (H - T - B) * (0.5 - v / (2 * top));
  const slot = (W - L - R) / Math.max(1, rows.length);
  const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'mean change by offset' });
  root.append(svg('line', { class: 'grid', x1: L, x2: W - R, y1: Y(0), y2: Y(0) }));
  for (const v of [top, -top]) {
    const t = svg('text', { class: 'axis', x: L - 4, y: Y(v) + 3, 'text-anchor': 'end' }); t.textContent = signed(v); root.append(t);
  }
  rows.forEach((p, i) => {
    [[p.chosen_mean, PALETTE[0], 0], [p.rejected_mean, PALETTE[1], 1]].forEach(([v, color, k]) => {
      if (typeof v !== 'number') return;
      const y = Math.min(Y(0), Y(v));
      root.append(svg('rect', { x: L + i * slot + 2 + k * (slot - 4) / 2, y, width: Math.max(1, (slot - 4) / 2), height: Math.abs(Y(v) - Y(0)), fill: color }));
    });
    const t = svg('text', { class: 'axis', x: L + (i + 0.5) * slot, y: H - 6, 'text-anchor': 'middle' });
    t.textContent = p.offset === 'earlier' ? '<' : p.offset === 'later' ? '>' : p.offset;
    root.append(t);
  });
  return root;
}
function renderModelDiffs(reports) {
  const box = $('model-diffs');
  box.replaceChildren();
  for (const [i, d] of (reports || []).entries()) {
    const card = el('div', { class: 'card model-diff', 'data-report': i });
    card.append(el('h2', {}, 'what training changed', el('span', { class: 'badge', text: basename(d.file) })));
    card.append(el('div', { class: 'path', text: `A: ${d.model_a}` }), el('div', { class: 'path', text: `B: ${d.model_b}` }),
      el('div', { class: 'path', text: `data: ${d.data} (${d.rows} rows)` }));
    card.append(el('div', { class: 'stats', text: `summed log-prob change B − A, mean over rows: chosen ${signed(d.mean_chosen_change)}, rejected ${signed(d.mean_rejected_change)}` }));
    const byOffset = el('table', { class: 'by-offset' }, el('tr', {}, el('th', { text: 'offset from first difference' }),
      el('th', { text: 'chosen mean' }), el('th', { text: 'tokens' }), el('th', { text: 'rejected mean' }), el('th', { text: 'tokens' })));
    for (const p of d.by_position) {
      byOffset.append(el('tr', { 'data-offset': p.offset }, el('td', { text: p.offset }), el('td', { text: signed(p.chosen_mean) }),
        el('td', { text: p.chosen_tokens }), el('td', { text: signed(p.rejected_mean) }), el('td', { text: p.rejected_tokens })));
    }
    const legend = el('div', { class: 'stats' });
    for (const [name, color] of [['chosen', PALETTE[0]], ['rejected', PALETTE[1]]]) {
      const sw = el('span', { class: 'swatch' }); sw.style.background = color;
      legend.append(el('span', { class: 'key' }, sw, name));
    }
    const chart = el('div', { class: 'offset-chart' }, offsetChart(d.by_position), legend);
    card.append(el('div', { class: 'diff-grid' }, byOffset, chart));
    const top = el('table', { class: 'largest' }, el('tr', {}, el('th', { text: 'line' }), el('th', { text: 'completion' }),
      el('th', { text: 'position' }), el('th', { text: 'context … token' }), el('th', { text: 'log-prob A → B' }), el('th', { text: 'change' })));
    for (const t of d.largest) {
      const cell = el('td', { class: 'context' }, el('span', { class: 'before', text: t.context }), el('mark', { class: 'token', text: t.token }));
      top.append(el('tr', {}, el('td', { text: t.line }), el('td', { text: t.completion }), el('td', { text: t.position }), cell,
        el('td', { text: `${fmt(t.logp_a)} → ${fmt(t.logp_b)}` }), el('td', { text: signed(t.delta) })));
    }
    card.append(el('h3', { text: 'largest changes' }), top);
    box.append(card);
  }
}

// ---- the source diff behind a marker

async function openDiff(s, e) {
  const box = $('diff');
  box.hidden = false;
  box.dataset.state = 'loading';
  box.dataset.event = e.event;
  box.dataset.step = e.step;
  $('diff-title').textContent = `${e.event} at step ${e.step} — ${labelOf(s)}`;
  const body = $('diff-body');
  body.replaceChildren(el('div', { class: 'empty', text: 'loading…' }));
  const head = [];
  if (e.error) head.push(el('div', { class: 'error', text: e.error }));
  if (e.fields) head.push(el('p', { text: 'Changed fields that need a restart (ignored by the running version): ' + [].concat(e.fields).join(', ') }));
  try {
    const d = await getJSON(`/api/diff?run=${s.run}&source=${encodeURIComponent(s.name)}&event=${encodeURIComponent(e.event)}&step=${e.step}`);
    const parts = [...head];
    if (d.note) parts.push(el('p', { text: d.note }));
    if (d.version) {
      const what = d.version.rejected ? `the rejected edit (step ${d.version.step})` : `the version in use from step ${d.version.step}`;
      parts.push(el('p', { text: d.previous === null || d.previous === undefined ? `${what}; no earlier version` : `${what}, against the version from step ${d.previous}` }));
    }
    const changed = (d.files || []).filter((f) => f.status !== 'unchanged');
    for (const f of changed) {
      parts.push(el('h4', {}, f.path, el('span', { class: 'status', text: f.status })));
      const pre = el('pre', { class: 'diff' });
      for (const line of f.diff.split('\n')) {
        if (!line) continue;
        pre.append(el('span', { class: line[0] === '+' ? 'add' : line[0] === '-' ? 'del' : line.startsWith('@@') ? 'hunk' : '', text: line }));
      }
      parts.push(pre);
    }
    const same = (d.files || []).length - changed.length;
    if (same) parts.push(el('p', { class: 'stats', text: `${same} other file${same === 1 ? '' : 's'} unchanged` }));
    body.replaceChildren(...parts);
    box.dataset.state = 'loaded';
  } catch (err) {
    body.replaceChildren(...head, el('p', { text: 'no source diff: ' + err.message }));
    box.dataset.state = 'failed';
  }
}
function closeDiff() { $('diff').hidden = true; $('diff').dataset.state = 'closed'; }
$('diff-close').addEventListener('click', closeDiff);
$('diff').addEventListener('click', (ev) => { if (ev.target === $('diff')) closeDiff(); });
document.addEventListener('keydown', (ev) => { if (ev.key === 'Escape') closeDiff(); });

start();
