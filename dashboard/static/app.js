// tilestream dashboard: one EventSource, one snapshot per message, DOM updated once per animation frame.
// Plain JS, no dependencies. Every value from Kafka reaches the page through textContent or
// attributes only (never innerHTML): camera ids and labels are data, not markup.
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  const SVG = 'http://www.w3.org/2000/svg';

  // Counters the browser test reads: how many snapshots arrived / were applied, and how long applying took.
  const stats = (window.__dashboard = {
    snapshots: 0, applied: 0, lastApplyMs: 0, maxApplyMs: 0, totalApplyMs: 0, lastMessageAt: 0, generatedAt: 0,
  });

  // -- small helpers: touch the DOM only when a value really changed ---------------------------
  function setText(el, value) {
    const v = value === null || value === undefined || value === '' ? '–' : String(value);
    if (el.__v !== v) { el.__v = v; el.textContent = v; }
  }
  function setAttr(el, name, value) {
    const key = '__a_' + name;
    if (el[key] !== value) { el[key] = value; el.setAttribute(name, value); }
  }
  function setHidden(el, hidden) {
    if (el.hidden !== hidden) el.hidden = hidden;
  }
  function h(tag, cls, text) {
    const el = document.createElement(tag);
    if (cls) el.className = cls;
    if (text !== undefined) el.textContent = text;
    return el;
  }
  function svg(tag, attrs) {
    const el = document.createElementNS(SVG, tag);
    for (const k in attrs) el.setAttribute(k, attrs[k]);
    return el;
  }
  const fmt = {
    n: (v, d = 1) => (v === null || v === undefined ? null : Number(v).toFixed(d)),
    ms: (v) => (v === null || v === undefined ? null : v >= 1000 ? (v / 1000).toFixed(2) + ' s' : v.toFixed(v < 10 ? 1 : 0) + ' ms'),
    bytes: (v) => (v >= 1 << 20 ? (v / (1 << 20)).toFixed(1) + ' MiB' : v >= 1024 ? (v / 1024).toFixed(0) + ' KiB' : v + ' B'),
    time: (epochS) => new Date(epochS * 1000).toLocaleTimeString([], { hour12: false }),
    q: (q) => (q ? `${fmt.ms(q.p50)} · ${fmt.ms(q.p95)} · ${fmt.ms(q.p99)}` : null),
    // Compact for the cards: one unit for the three numbers when they are all below a second.
    qc: (q) => (!q ? null : q.p99 < 1000 ? `${Math.round(q.p50)} · ${Math.round(q.p95)} · ${Math.round(q.p99)} ms` : fmt.q(q)),
  };

  // Stable colours per label (and per dead-letter reason): fixed ones for the scene model, a hash for the rest.
  const FIXED = { background: [47, 59, 72], person: [255, 159, 28], bad_signature: [248, 81, 73], malformed: [210, 153, 34] };
  const colours = new Map();
  function colour(name) {
    let c = colours.get(name);
    if (!c) {
      if (FIXED[name]) c = FIXED[name];
      else {
        let x = 2166136261;
        for (let i = 0; i < name.length; i++) x = Math.imul(x ^ name.charCodeAt(i), 16777619) >>> 0;
        const hue = x % 360, s = 0.65, l = 0.55;
        const k = (n) => (n + hue / 30) % 12, a = s * Math.min(l, 1 - l);
        const f = (n) => Math.round(255 * (l - a * Math.max(-1, Math.min(k(n) - 3, Math.min(9 - k(n), 1)))));
        c = [f(0), f(8), f(4)];
      }
      colours.set(name, c);
    }
    return c;
  }
  const css = (rgb) => `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;
  const CODES = '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ';

  // -- camera cards ------------------------------------------------------------------------
  const cards = new Map(); // camera id -> {el, f: {field: element}, grid: canvas, gridKey}
  const camerasEl = $('cameras');
  let order = '';
  const seenLabels = new Set();

  function makeCard(id) {
    const el = h('article', 'cam');
    el.dataset.id = id;
    const head = h('header');
    const name = h('span', 'name', id);
    name.title = id;
    const status = h('span', 'status', '…');
    head.append(name, status);
    const body = h('div', 'body');
    const grid = h('canvas');
    grid.width = 1; grid.height = 1;
    grid.title = 'tile labels of the last frame';
    const info = h('div', 'info');
    const label = h('div', 'label');
    const lbl = h('span', 'lbl'), p = h('span', 'p');
    label.append(lbl, ' ', p);
    const dl = h('dl');
    const f = { status, lbl, p };
    for (const [key, title] of [['fps', 'frames/s'], ['frames', 'frames'], ['lat', 'p50/95/99'], ['last', 'last'],
                                ['spool', 'spool'], ['skip', 'skip/drop'], ['dead', 'dead']]) {
      const dd = h('dd');
      dd.dataset.f = key;
      dl.append(h('dt', null, title), dd);
      f[key] = dd;
    }
    info.append(label, dl);
    body.append(grid, info);
    el.append(head, body);
    return { el, f, grid, gridKey: '' };
  }

  function drawGrid(card, tiles) {
    const key = tiles ? tiles.cols + 'x' + tiles.rows + ':' + tiles.labels.join(',') + ':' + tiles.cells : '';
    if (key === card.gridKey) return;
    card.gridKey = key;
    const cv = card.grid;
    if (!tiles) { cv.width = 1; cv.height = 1; return; }
    if (cv.width !== tiles.cols) cv.width = tiles.cols;
    if (cv.height !== tiles.rows) cv.height = tiles.rows;
    const ctx = cv.getContext('2d');
    const img = ctx.createImageData(tiles.cols, tiles.rows);
    const palette = tiles.labels.map(colour);
    for (const l of tiles.labels) seenLabels.add(l);
    const cells = tiles.cells;
    for (let i = 0; i < cells.length; i++) {
      const idx = CODES.indexOf(cells[i]);
      const c = idx >= 0 && idx < palette.length ? palette[idx] : [11, 15, 19];
      img.data[i * 4] = c[0]; img.data[i * 4 + 1] = c[1]; img.data[i * 4 + 2] = c[2]; img.data[i * 4 + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    const aspect = tiles.width && tiles.height ? `${tiles.width} / ${tiles.height}` : '4 / 3';
    if (cv.style.aspectRatio !== aspect) { cv.style.aspectRatio = aspect; cv.style.height = 'auto'; }
  }

  function updateCard(card, c) {
    const f = card.f;
    setAttr(card.el, 'data-status', c.status);
    setText(f.status, c.status);
    setText(f.lbl, c.label === undefined ? 'no results yet' : c.label);
    setText(f.p, c.p === undefined ? ' ' : 'p=' + fmt.n(c.p, 2));
    setText(f.fps, fmt.n(c.fps, 1));
    setText(f.frames, c.incomplete ? `${c.frames} (${c.incomplete} incomplete)` : c.frames);
    setText(f.lat, fmt.qc(c.latency));
    setText(f.last, c.latency_ms === undefined ? null
      : `#${c.seq} · ${fmt.ms(c.latency_ms)}` + (c.last_result_age_s > 2 ? ` · ${Math.round(c.last_result_age_s)}s ago` : ''));
    const a = c.agent;
    setText(f.spool, a ? `${a.spool_frames} fr · ${fmt.bytes(a.spool_bytes)}` : null);
    setText(f.skip, a ? `${a.skipped} / ${a.dropped}` : null);
    setText(f.dead, c.dead_letters);
    setAttr(f.dead, 'class', c.dead_letters ? 'warn' : '');
    setAttr(f.spool, 'class', a && a.spool_frames ? 'warn' : '');
    drawGrid(card, c.tiles);
  }

  let filterText = '', onlyOffline = false, filterDirty = true;

  function applyCameras(list) {
    const ids = [];
    for (const c of list) {
      let card = cards.get(c.id);
      if (!card) { card = makeCard(c.id); cards.set(c.id, card); }
      ids.push(c.id);
      updateCard(card, c);
      const show = (!filterText || c.id.toLowerCase().includes(filterText)) && (!onlyOffline || c.status !== 'online');
      setHidden(card.el, !show);
    }
    const key = ids.join('\n');
    if (key !== order) {
      // The set of cameras changed: drop the gone, (re)place the rest in order. Unchanged cards are moved, not rebuilt.
      const keep = new Set(ids);
      for (const [id, card] of cards) if (!keep.has(id)) { card.el.remove(); cards.delete(id); }
      const frag = document.createDocumentFragment();
      for (const id of ids) frag.append(cards.get(id).el);
      camerasEl.append(frag);
      order = key;
    }
    setHidden($('cams-empty'), list.length > 0);
  }

  // -- pipeline panels -------------------------------------------------------------------------
  const keys = {};
  function changed(name, value) {
    const k = JSON.stringify(value);
    if (keys[name] === k) return false;
    keys[name] = k;
    return true;
  }
  function rows(tbody, data, cells) {
    const frag = document.createDocumentFragment();
    for (const d of data) {
      const tr = h('tr');
      for (const [text, cls] of cells(d)) tr.append(h('td', cls || null, text === null || text === undefined ? '–' : String(text)));
      if (d.reason) tr.dataset.reason = d.reason;
      frag.append(tr);
    }
    tbody.replaceChildren(frag);
  }

  function applyStages(p) {
    if (changed('stages', p.stages)) {
      rows($('stages').tBodies[0], p.stages, (s) => {
        const main = s.rates.frames_per_s ?? null;
        const other = Object.entries(s.rates).filter(([k]) => k !== 'frames_per_s').map(([k, v]) => `${k} ${v.toFixed(1)}`).join(', ');
        // The slowest reporting instance's p95 of the stage's first latency series (e.g. frame, capture_to_result).
        let p95 = null;
        for (const inst of s.instances) {
          if (!inst.fresh) continue;
          const names = Object.keys(inst.latency_ms || {}).sort();
          if (!names.length) continue;
          const q = inst.latency_ms[names[0]];
          if (q && q.p95 !== undefined && (p95 === null || q.p95 > p95)) p95 = q.p95;
        }
        return [[s.stage], [`${s.fresh}/${s.instances.length}`, 'num'], [main === null ? null : main.toFixed(1), 'num'],
                [p95 === null ? null : fmt.ms(p95), 'num'], [other || null]];
      });
      setHidden($('stages'), p.stages.length === 0);
      setHidden($('stages-empty'), p.stages.length > 0);
    }
    if (changed('lag', [p.lag, p.lag_totals])) {
      // Largest lag first: with many partitions the ones that matter stay at the top of the scroll box.
      const lag = [...p.lag].sort((a, b) => b.lag - a.lag || a.group.localeCompare(b.group) || a.topic.localeCompare(b.topic) || a.partition - b.partition);
      rows($('lag').tBodies[0], lag, (l) => [[l.group], [l.topic], [l.partition, 'num'], [l.lag, 'num']]);
      setHidden($('lag'), p.lag.length === 0);
      setHidden($('lag-empty'), p.lag.length > 0);
      setText($('lag-totals'), Object.entries(p.lag_totals).map(([g, v]) => `${g}: ${v}`).join(' · ') || ' ');
    }
  }

  let histBars = null;
  function applyLatency(lat) {
    const svgEl = $('latency-hist');
    const n = lat.counts.length, W = 330, H = 130, top = 14, bottom = 20, bw = (W - 10) / n;
    if (!histBars) {
      histBars = [];
      for (let i = 0; i < n; i++) {
        const x = 5 + i * bw;
        const bar = svg('rect', { class: 'bar', x: x + 1, width: bw - 2, y: H - bottom, height: 0 });
        const count = svg('text', { x: x + bw / 2, y: H - bottom - 2, 'text-anchor': 'middle' });
        const edge = i < n - 1 ? lat.buckets_ms[i] : null;
        const lab = svg('text', { x: x + bw / 2, y: H - 6, 'text-anchor': 'middle' });
        lab.textContent = edge === null ? `>${lat.buckets_ms[n - 2]}` : edge >= 1000 ? `${edge / 1000}s` : `${edge}`;
        svgEl.append(bar, count, lab);
        histBars.push({ bar, count });
      }
      const unit = svg('text', { x: W - 4, y: 9, 'text-anchor': 'end' });
      unit.textContent = 'ms (≤ bucket)';
      svgEl.append(unit);
    }
    const max = Math.max(1, ...lat.counts);
    lat.counts.forEach((v, i) => {
      const hgt = Math.round(((H - top - bottom) * v) / max);
      setAttr(histBars[i].bar, 'height', String(hgt));
      setAttr(histBars[i].bar, 'y', String(H - bottom - hgt));
      setAttr(histBars[i].count, 'y', String(H - bottom - hgt - 2));
      setText(histBars[i].count, v ? String(v) : ' ');
    });
    setText($('latency-n'), `${lat.n} frames, last ${Math.round(lat.window_s)} s`);
  }

  function applyDead(d) {
    if (changed('dead-minutes', d.minutes)) {
      const svgEl = $('dead-chart');
      const W = 330, H = 90, bottom = 14, n = d.minutes.length, bw = (W - 10) / n;
      const max = Math.max(1, ...d.minutes.map((m) => Object.values(m.counts).reduce((a, b) => a + b, 0)));
      const frag = document.createDocumentFragment();
      d.minutes.forEach((m, i) => {
        let y = H - bottom;
        for (const [reason, v] of Object.entries(m.counts)) {
          const hgt = Math.max(1, Math.round(((H - bottom - 6) * v) / max));
          y -= hgt;
          const r = svg('rect', { x: 5 + i * bw + 1, y, width: Math.max(1, bw - 2), height: hgt, fill: css(colour(reason)) });
          const t = svg('title', {});
          t.textContent = `${fmt.time(m.t)} ${reason}: ${v}`;
          r.append(t);
          frag.append(r);
        }
      });
      const axis = svg('line', { x1: 5, x2: W - 5, y1: H - bottom + 0.5, y2: H - bottom + 0.5, stroke: '#2a3440' });
      const l0 = svg('text', { x: 5, y: H - 2 }), l1 = svg('text', { x: W - 5, y: H - 2, 'text-anchor': 'end' }), lm = svg('text', { x: 5, y: 9 });
      l0.textContent = fmt.time(d.minutes[0].t); l1.textContent = 'now'; lm.textContent = `max ${max}/min`;
      frag.append(axis, l0, l1, lm);
      svgEl.replaceChildren(frag);
    }
    if (changed('dead-reasons', d.by_reason)) {
      const frag = document.createDocumentFragment();
      for (const [reason, v] of Object.entries(d.by_reason)) {
        const li = h('li');
        li.dataset.reason = reason;
        const sw = h('span', 'swatch');
        sw.style.background = css(colour(reason));
        li.append(sw, h('span', null, `${reason}: ${v}`));
        frag.append(li);
      }
      $('dead-reasons').replaceChildren(frag);
    }
    if (changed('dead-recent', d.recent)) {
      rows($('dead-recent').tBodies[0], d.recent, (r) => [[fmt.time(r.seen_at)], [r.stage], [r.reason], [r.frame_id || '(none)']]);
      setHidden($('dead-recent'), d.recent.length === 0);
      setHidden($('dead-empty'), d.recent.length > 0);
    }
  }

  function applyLegend() {
    const key = [...seenLabels].sort().join(',');
    if (!changed('legend', key)) return;
    const frag = document.createDocumentFragment();
    for (const l of [...seenLabels].sort()) {
      const s = h('span');
      const sw = h('span', 'swatch');
      sw.style.background = css(colour(l));
      s.append(sw, l);
      frag.append(s);
    }
    $('legend').replaceChildren(frag);
  }

  function apply(s) {
    const t = s.totals, p = s.pipeline;
    setText($('kpi-online'), `${t.online} / ${t.cameras}`);
    setText($('kpi-rate'), fmt.n(t.results_per_s, 1));
    setText($('kpi-latency'), fmt.q(s.latency.quantiles));
    setText($('kpi-dead'), t.dead_letters);
    setText($('kpi-model'), p.model ? `${p.model.model_id} v${p.model.model_version}` + (p.models.length > 1 ? ` (+${p.models.length - 1})` : '') : null);
    setText($('updated'), 'updated ' + fmt.time(s.generated_at));
    setText($('cams-count'), `${t.online} online · ${t.offline} offline`);
    applyCameras(s.cameras);
    applyStages(p);
    applyLatency(s.latency);
    applyDead(s.dead_letters);
    applyLegend();
  }

  // -- one update per animation frame, with the newest snapshot only ---------------------------
  let pending = null, latest = null, scheduled = false;
  function schedule() {
    if (!scheduled) { scheduled = true; requestAnimationFrame(flush); }
  }
  function flush() {
    scheduled = false;
    const s = pending;
    pending = null;
    if (!s) return;
    const t0 = performance.now();
    apply(s);
    const dt = performance.now() - t0;
    stats.applied += 1;
    stats.lastApplyMs = dt;
    stats.totalApplyMs += dt;
    stats.maxApplyMs = Math.max(stats.maxApplyMs, dt);
    stats.generatedAt = s.generated_at;
  }

  $('filter').addEventListener('input', (e) => { filterText = e.target.value.trim().toLowerCase(); if (latest) { pending = latest; schedule(); } });
  $('only-offline').addEventListener('change', (e) => { onlyOffline = e.target.checked; if (latest) { pending = latest; schedule(); } });

  // -- the event stream --------------------------------------------------------------------
  const conn = $('conn');
  function setConn(state, text) { setAttr(conn, 'data-state', state); setText(conn, text); }
  let source = null;
  function connect() {
    source = new EventSource('/events');
    source.addEventListener('open', () => setConn('live', 'live'));
    source.addEventListener('snapshot', (e) => {
      stats.snapshots += 1;
      stats.lastMessageAt = Date.now();
      try { latest = pending = JSON.parse(e.data); } catch (err) { return; }
      if (conn.__v !== 'live') setConn('live', 'live');
      schedule();
    });
    source.addEventListener('error', () => {
      if (source.readyState === EventSource.CLOSED) {
        // The server refused the stream (e.g. 401): find out whether we are still signed in.
        source = null;
        fetch('/api/snapshot', { credentials: 'same-origin', cache: 'no-store' }).then((r) => {
          if (r.status === 401) { setConn('refused', 'signed out'); window.location.assign('/login'); }
          else setTimeout(connect, 2000);
        }, () => setTimeout(connect, 2000));
        setConn('reconnecting', 'reconnecting…');
      } else {
        setConn('reconnecting', 'reconnecting…');
      }
    });
  }
  setInterval(() => {
    if (stats.lastMessageAt && Date.now() - stats.lastMessageAt > 5000 && conn.__v === 'live') setConn('stale', 'no updates');
  }, 1000);
  connect();
})();
