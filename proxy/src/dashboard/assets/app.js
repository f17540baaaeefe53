// serin dashboard: polls /api/overview once a second and draws it. Plain JS, no
// library; charts are SVG drawn here. Nothing is fetched from anywhere else.
'use strict';

(() => {
  const TOKEN_KEY = 'serin-admin-token';
  const POLL_MS = 1000;
  const SVG = 'http://www.w3.org/2000/svg';
  const CHARTS = [
    { key: 'rps', title: 'requests/s', unit: '' },
    { key: 'share', title: 'share %', unit: '%', max: 100 },
    { key: 'success', title: 'success %', unit: '%', max: 100 },
    { key: 'p99', title: 'p99 ms (p50 dashed)', unit: 'ms', second: 'p50' },
  ];
  const cards = new Map();
  // The figures window: the page's own ?window=SECONDS (1..900), else the server's 60 s.
  const windowParam = new URLSearchParams(location.search).get('window');
  const overviewUrl = windowParam ? `/api/overview?window=${encodeURIComponent(windowParam)}` : '/api/overview';
  let token = sessionStorage.getItem(TOKEN_KEY) || '';

  // el('div', {class: 'x', text: 'y', 'data-a': 1}, child, …)
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    for (const c of children) if (c != null) node.append(c);
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    setAttrs(node, attrs);
    return node;
  }
  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === 'text') node.textContent = v;
      else node.setAttribute(k, v === true ? '' : String(v));
    }
  }
  const $ = (id) => document.getElementById(id);

  const num = (v, digits) => (v == null ? '–' : Number(v).toFixed(digits));
  const pct = (v) => (v == null ? '–' : `${Number(v).toFixed(1)}%`);
  const ms = (v) => (v == null ? '–' : `${Number(v).toFixed(v < 10 ? 2 : 1)} ms`);
  const successClass = (v) => (v == null ? '' : v >= 99 ? 'good' : v >= 95 ? 'warn' : 'bad');
  function ago(unixMs) {
    const s = Math.max(0, Math.round((Date.now() - unixMs) / 1000));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m${s % 60}s`;
    return `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
  }

  // ---- the token --------------------------------------------------------------
  function showToken() {
    $('token-state').textContent = token ? 'token set (this tab only)' : 'no token';
  }
  $('token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    token = $('token').value.trim();
    $('token').value = '';
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    showToken();
  });
  $('token-forget').addEventListener('click', () => {
    token = '';
    sessionStorage.removeItem(TOKEN_KEY);
    showToken();
  });
  showToken();

  // ---- write actions ----------------------------------------------------------
  async function act(service, action, body, out) {
    const headers = { 'Content-Type': 'application/json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    out.className = 'result pending';
    out.textContent = `${action}…`;
    try {
      const url = `/api/services/${encodeURIComponent(service)}/${action}`;
      const r = await fetch(url, { method: 'POST', headers, body: JSON.stringify(body), cache: 'no-store' });
      const answer = await r.json().catch(() => ({ error: r.statusText }));
      if (r.ok) {
        out.className = answer.nacked || answer.timed_out ? 'result warn' : 'result ok';
        out.textContent = answer.message;
      } else {
        out.className = 'result error';
        out.textContent = `refused (${r.status}): ${answer.error}`;
      }
    } catch (e) {
      out.className = 'result error';
      out.textContent = `failed: ${e}`;
    }
  }

  function actionsFor(service, card) {
    const out = el('span', { class: 'result', 'data-role': 'result', role: 'status' });
    const form = el('form', { class: 'weights', 'data-role': 'weights-form' });
    const inputs = el('span', { class: 'inputs' });
    const submit = el('button', { type: 'submit', text: 'Set weights', 'data-role': 'set-weights' });
    form.append(inputs, submit);
    form.addEventListener('input', () => { card.dirty = true; });
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const weights = {};
      for (const input of inputs.querySelectorAll('input')) weights[input.name] = Number(input.value || 0);
      card.dirty = false;
      act(service, 'weights', { weights }, out);
    });
    const rollback = el('button', { type: 'button', class: 'danger', text: 'Roll back', 'data-role': 'rollback' });
    let armed = null;
    rollback.addEventListener('click', () => {
      if (!armed) {
        rollback.textContent = 'Click again to roll back';
        rollback.classList.add('armed');
        armed = setTimeout(() => {
          armed = null;
          rollback.textContent = 'Roll back';
          rollback.classList.remove('armed');
        }, 5000);
        return;
      }
      clearTimeout(armed);
      armed = null;
      rollback.textContent = 'Roll back';
      rollback.classList.remove('armed');
      act(service, 'rollback', {}, out);
    });
    card.inputs = inputs;
    return el('div', { class: 'actions' }, form, rollback, out);
  }

  function fillInputs(card, svc) {
    const names = svc.subsets.length ? svc.subsets : svc.versions.map((v) => v.version);
    const key = names.join(',');
    if (card.inputsKey !== key) {
      card.inputsKey = key;
      card.dirty = false;
      card.inputs.replaceChildren(...names.map((name, i) => el('label', { class: 'subset' },
        el('span', { class: `chip c${i % 6}`, text: name }),
        el('input', { type: 'number', min: 0, max: 100, step: 1, name, 'data-subset': name, 'aria-label': `${name} %` }),
        '%')));
    }
    if (card.dirty) return;
    for (const input of card.inputs.querySelectorAll('input')) {
      if (document.activeElement !== input) input.value = svc.weights[input.name] ?? 0;
    }
  }

  // ---- charts -----------------------------------------------------------------
  const W = 300;
  const H = 84;
  const PAD = 14;

  function chart(spec, svc, len) {
    let max = spec.max || 0;
    let min = 0;
    const all = [];
    for (const v of svc.versions) {
      for (const key of [spec.key, spec.second]) if (key) all.push(...v.series[key].filter((x) => x != null));
    }
    if (!spec.max) max = Math.max(1, ...all) * 1.1;
    if (spec.key === 'success') min = Math.min(90, Math.floor(Math.min(100, ...all) / 10) * 10);
    const x = (i) => (len > 1 ? (i / (len - 1)) * W : 0);
    const y = (val) => PAD + (1 - (val - min) / (max - min || 1)) * (H - PAD - 12);
    const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', 'data-chart': spec.key, role: 'img',
      'aria-label': `${spec.title}, last 5 minutes` });
    root.append(svg('line', { x1: 0, x2: W, y1: y(min), y2: y(min), class: 'axis' }));
    const label = (x, y, text, anchor) => {
      const t = svg('text', { x, y, class: 'label', 'text-anchor': anchor });
      t.textContent = text;
      root.append(t);
    };
    label(2, 10, `${spec.title} · max ${num(Math.max(0, ...all), 1)}`, 'start');
    label(2, H - 1, '−5 min', 'start');
    label(W - 2, H - 1, 'now', 'end');
    svc.versions.forEach((v, vi) => {
      for (const [key, extra] of [[spec.key, ''], [spec.second, ' dashed']]) {
        if (!key) continue;
        let points = [];
        const flush = () => {
          if (points.length === 1) points.push(points[0].replace(/^([\d.]+)/, (m) => String(Number(m) + 1)));
          if (points.length) root.append(svg('polyline', { points: points.join(' '), class: `line c${vi % 6}${extra}` }));
          points = [];
        };
        v.series[key].forEach((val, i) => {
          if (val == null) flush();
          else points.push(`${x(i).toFixed(1)},${y(val).toFixed(1)}`);
        });
        flush();
      }
    });
    return el('figure', { class: 'chart-box' }, root);
  }

  // ---- canary -----------------------------------------------------------------
  function canaryBlock(c) {
    const phaseClass = { SUCCEEDED: 'good', FAILED: 'bad', ABORTED: 'warn' }[c.phase] || 'run';
    const head = el('div', { class: 'canary-head' },
      el('strong', { text: `Canary ${c.canary}` }), ' ',
      el('span', { class: `phase ${phaseClass}`, 'data-field': 'phase', text: c.phase }),
      ` weight ${c.weight}% · step ${Math.min(c.step + 1, c.steps.length)} of ${c.steps.length} · failed checks ${c.failed_checks} of ${c.threshold}`,
      c.running && c.next_check_unix_ms ? ` · next check in ${Math.max(0, Math.round((c.next_check_unix_ms - Date.now()) / 1000))}s` : '');
    const steps = el('div', { class: 'steps' }, ...c.steps.map((w, i) =>
      el('span', { class: `step${i < c.step ? ' done' : ''}${w === c.weight && c.running ? ' now' : ''}`, text: `${w}%` })));
    const reason = c.reason ? el('p', { class: 'reason bad', text: c.reason }) : null;
    const figures = c.last_figures.length ? el('p', { class: 'muted' }, 'last interval: ' + c.last_figures.map((f) =>
      `${f.version} ${f.requests} req, ${pct(f.success_percent)} ok, p99 ${ms(f.p99_ms)}`).join(' · ')) : null;
    const events = el('ol', { class: 'events', reversed: true }, ...c.events.slice().reverse().map((e) =>
      el('li', { class: `ev-${e.kind}` }, el('time', { text: new Date(e.unix_ms).toLocaleTimeString() }), ' ',
        el('b', { text: e.kind }), ` ${e.message}`)));
    return el('div', { class: 'canary', 'data-role': 'canary' }, head, steps, reason, figures,
      el('p', { class: 'muted small', text: `events (${c.events.length}), newest first` }), events);
  }

  // ---- a service card -----------------------------------------------------------
  function card(svc) {
    let c = cards.get(svc.service);
    if (c) return c;
    c = { root: el('section', { class: 'card service', 'data-service': svc.service }) };
    c.title = el('h2', {}, el('span', { text: svc.name }), ' ', el('span', { class: 'muted small', text: svc.service }));
    c.weights = el('p', { class: 'weights-now' });
    c.canary = el('div');
    c.table = el('table', { class: 'grid figures' });
    c.charts = el('div', { class: 'charts' });
    c.root.append(c.title, c.weights, c.canary, c.table, c.charts, actionsFor(svc.service, c));
    cards.set(svc.service, c);
    return c;
  }

  function renderService(svc, data) {
    const c = card(svc);
    const split = Object.entries(svc.weights).map(([k, v]) => `${k} ${v}`).join(' · ');
    c.weights.textContent = split ? `route weights: ${split}` : 'no weighted route';
    c.canary.replaceChildren(...(svc.canary ? [canaryBlock(svc.canary)] : []));
    const head = el('tr', {}, ...['version', 'weight', 'req/s', 'share', 'success', 'p50', 'p99', `requests (${data.window_s}s)`, 'sidecars']
      .map((t) => el('th', { text: t })));
    const rows = svc.versions.map((v, i) => el('tr', { 'data-version': v.version },
      el('td', {}, el('span', { class: `chip c${i % 6}`, 'data-field': 'version', text: v.version })),
      el('td', { 'data-field': 'weight', text: svc.weights[v.version] == null ? '–' : `${svc.weights[v.version]}%` }),
      el('td', { 'data-field': 'rps', text: num(v.rps, 1) }),
      el('td', { 'data-field': 'share', text: pct(v.requests ? v.share_percent : null) }),
      el('td', { 'data-field': 'success', class: successClass(v.success_percent), text: pct(v.success_percent) }),
      el('td', { 'data-field': 'p50', text: ms(v.p50_ms) }),
      el('td', { 'data-field': 'p99', text: ms(v.p99_ms) }),
      el('td', { 'data-field': 'requests', text: String(v.requests) }),
      el('td', { 'data-field': 'reporters', text: String(v.reporters) })));
    c.table.replaceChildren(el('thead', {}, head), el('tbody', {}, ...rows));
    c.charts.replaceChildren(...CHARTS.map((spec) => chart(spec, svc, data.series_len)));
    fillInputs(c, svc);
    return c.root;
  }

  // ---- sidecars -------------------------------------------------------------------
  function renderSidecars(data) {
    const types = data.sidecars.length ? data.sidecars[0].types.map((t) => t.type) : [];
    const table = $('sidecars');
    table.tHead.replaceChildren(el('tr', {}, ...['node', 'workload', 'version', 'connected', ...types]
      .map((t) => el('th', { text: t }))));
    const nacks = [];
    table.tBodies[0].replaceChildren(...data.sidecars.map((s) => el('tr', { 'data-node': s.id },
      el('td', { text: s.id }), el('td', { text: s.workload }), el('td', { text: s.version || '–' }),
      el('td', { text: `${ago(s.connected_since_unix_ms)} ago` }),
      ...s.types.map((t) => {
        if (t.last_nack) nacks.push(`${s.id} ${t.type} ${t.last_nack}`);
        const text = [t.state, t.version ? `v${t.version}` : '', t.push_to_ack_ms != null ? `${t.push_to_ack_ms}ms` : '']
          .filter(Boolean).join(' ');
        return el('td', { class: `sync ${t.state.replace(' ', '-').toLowerCase()}`, 'data-type': t.type, text });
      }))));
    if (!data.sidecars.length) {
      table.tBodies[0].append(el('tr', {}, el('td', { colspan: 4 + types.length, class: 'muted', text: 'no sidecars connected' })));
    }
    $('sidecar-count').textContent = `(${data.sidecars.length})`;
    $('cp-versions').textContent = 'control plane versions: ' +
      Object.entries(data.versions).map(([k, v]) => `${k}=${v}`).join(' ');
    $('nacks').replaceChildren(...nacks.map((n) => el('li', { class: 'bad', text: `last NACK: ${n}` })));
  }

  function render(data) {
    $('writes-off').hidden = data.writes_enabled;
    $('window').textContent = data.window_s;
    const roots = data.services.map((svc) => renderService(svc, data));
    for (const [key, c] of cards) {
      if (!data.services.some((s) => s.service === key)) {
        c.root.remove();
        cards.delete(key);
      }
    }
    // Moved only when out of place, so a focused weight input keeps its focus.
    const box = $('services');
    roots.forEach((root, i) => {
      if (box.children[i] !== root) box.insertBefore(root, box.children[i] || null);
    });
    $('no-services').hidden = data.services.length > 0;
    renderSidecars(data);
  }

  async function poll() {
    try {
      const r = await fetch(overviewUrl, { cache: 'no-store' });
      if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || `HTTP ${r.status}`);
      render(await r.json());
      $('conn').className = 'conn ok';
      $('conn').textContent = `live · ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      $('conn').className = 'conn bad';
      $('conn').textContent = `cannot reach the control plane (${e.message || e}); retrying`;
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }
  poll();
})();
