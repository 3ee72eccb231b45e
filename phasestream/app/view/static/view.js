// phasestream view: the page. Talks only to the view server that served it (never to Tiled):
// /api/state once, then server-sent events (/events) for every change; images are PNGs of the server.
"use strict";

const view = {
  runs: new Map(),        // uid -> summary (see follow.py, summarize)
  colors: [],
  statuses: [],
  selected: null,
  filter: null,           // {soc, tol, status, uids: Set} while a search is active
  drawnVersion: {},       // uid -> version of the maps shown
  drawnOd: {},
  pixel: null,            // {uid, y, x}: the pixel whose spectrum is shown (renderPixel)
  connection: "connecting",
};
// latency log read by benchmarks/view.py and the tests: one entry per map update received for the shown run
window.phasestreamLog = [];
window.phasestreamView = view;

const $ = (id) => document.getElementById(id);
const pct = (x) => (x === null || x === undefined ? "" : (100 * x).toFixed(1) + "%");
const now = () => Date.now() / 1000;
// A result the worker keeps writing is touched at least every --stop-timeout / 3 (20 s by default); one left
// `running` by a worker that died says so after this long (docs/contract.md, "Recovery").
const SILENT_AFTER = 180;

function received(run) {  // the view server's clock against this browser's (summarized_at: the server's)
  run._received = now();
  run._offset = typeof run.summarized_at === "number" ? run._received - run.summarized_at : 0;
  return run;
}

function silentFor(run) {  // seconds a running result has gone without an update, on the view server's clock
  if (run.status !== "running" || typeof run.updated_at !== "number") return 0;
  return now() - run._offset - run.updated_at;
}

function statusText(run) {
  const silent = silentFor(run);
  return silent > SILENT_AFTER ? `running, no update for ${Math.floor(silent / 60)} min` : (run.status || "");
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function setConnection(state) {
  view.connection = state;
  const badge = $("connection");
  badge.textContent = state;
  badge.className = "state-" + state.split(" ")[0];
}

function fractionBar(run) {
  const bar = el("span", { class: "bar", title: run.phases.map((p) => `${p} ${pct(run.phase_fractions[p] || 0)}`).join(", ") });
  run.phases.forEach((p, k) => {
    const part = el("span");
    part.style.width = (100 * (run.phase_fractions[p] || 0)).toFixed(2) + "%";
    part.style.background = view.colors[k % view.colors.length];
    bar.append(part);
  });
  return bar;
}

function energies(run) {
  return run.energies_expected ? `${run.energies_seen}/${run.energies_expected}` : `${run.energies_seen}`;
}

function matches(run) {
  const f = view.filter;
  if (!f) return true;
  if (f.uids.has(run.uid)) return true;
  // runs that appear or change after the search: the same predicate as `phasestream query`
  if (f.status && run.status !== f.status) return false;
  if (f.soc !== null && (run.state_of_charge === null || Math.abs(run.state_of_charge - f.soc) > f.tol)) return false;
  return true;
}

function renderList() {
  const rows = [...view.runs.values()].filter(matches)
    .sort((a, b) => (b.updated_at || 0) - (a.updated_at || 0) || (a.uid < b.uid ? -1 : 1));
  const body = $("runs");
  body.replaceChildren(...rows.map((run) => {
    const tr = el("tr", { "data-uid": run.uid, class: run.uid === view.selected ? "selected" : "" },
      el("td", {}, run.sample || run.uid.slice(0, 8)),
      el("td", {}, run.state_of_charge === null ? "" : run.state_of_charge.toFixed(2)),
      el("td", { class: "status-" + run.status + (silentFor(run) > SILENT_AFTER ? " silent" : "") }, statusText(run)),
      el("td", { class: "energies" }, energies(run)),
      el("td", {}, fractionBar(run)),
      el("td", {}, pct(run.ambiguous_fraction)));
    tr.addEventListener("click", () => select(run.uid));
    return tr;
  }));
  $("list-note").textContent = `${rows.length} of ${view.runs.size} results` + (view.filter ? " (search)" : "");
}

function select(uid) {
  if (view.selected !== uid) {  // another run: its own pixel, once one is clicked
    view.pixel = null;
    $("pixel").hidden = true;
    $("pixel-marker").hidden = true;
  }
  view.selected = uid;
  delete view.drawnVersion[uid];
  delete view.drawnOd[uid];
  history.replaceState(null, "", "#" + uid);
  renderList();
  renderRun(true);
}

// One request per image at a time: while an image loads, a newer version waits and replaces any older
// waiting one, so a fast stream never leaves an image forever half-loaded.
// onSettled (optional) is called once the image loaded or failed; timing (optional): an object that gets
// `requested` and `loaded` (seconds) as the image is fetched.
function loadImage(img, src, onDrawn, timing, onSettled) {
  if (img.dataset.loading === "1") { img._next = [src, onDrawn, timing, onSettled]; return; }
  img.dataset.loading = "1";
  const settle = (drawn) => {
    img.dataset.loading = "0";
    if (drawn && onDrawn) onDrawn(now());
    if (onSettled) onSettled();
    const next = img._next;
    img._next = null;
    if (next) loadImage(img, ...next);
  };
  img.onload = () => {
    if (timing) timing.loaded = now();
    if (img.decode) img.decode().then(() => settle(true), () => settle(true)); else settle(true);
  };
  img.onerror = () => settle(false);
  if (timing) timing.requested = now();
  img.src = src;
}

function renderHistory(run) {
  const svg = $("history");
  const W = 480, H = 200, pad = 28;
  const pts = run.history;
  const parts = [`<rect x="${pad}" y="4" width="${W - pad - 4}" height="${H - pad - 4}" fill="none" stroke="#444"/>`];
  const maxN = Math.max(run.energies_expected || 0, ...pts.map((p) => p[0]), 2);
  const x = (n) => pad + (W - pad - 4) * (n - 1) / (maxN - 1);
  const y = (f) => 4 + (H - pad - 4) * (1 - f);
  run.phases.forEach((p, k) => {
    const xy = pts.map(([n, fr]) => `${x(n).toFixed(1)},${y(fr[k] || 0).toFixed(1)}`);
    const color = view.colors[k % view.colors.length];
    if (xy.length) parts.push(`<polyline fill="none" stroke-width="2" stroke="${color}" points="${xy.join(" ")}"/>`);
    xy.forEach((p) => { const [cx, cy] = p.split(","); parts.push(`<circle cx="${cx}" cy="${cy}" r="3" fill="${color}"/>`); });
  });
  parts.push(`<text x="${pad}" y="${H - 8}" fill="#aaa" font-size="11">1</text>`,
    `<text x="${W - 30}" y="${H - 8}" fill="#aaa" font-size="11">${maxN} energies</text>`,
    `<text x="2" y="12" fill="#aaa" font-size="11">1</text>`, `<text x="2" y="${H - pad}" fill="#aaa" font-size="11">0</text>`);
  svg.innerHTML = parts.join("");
}

// A pixel clicked on the phase map or the OD image: its OD spectrum, the maps there and each reference fitted to
// it with an offset and a scale, which the PCC ignores (/api/runs/<uid>/pixel, pixel.py). Shown again with each
// new version of the run's maps; one request at a time, the latest pixel wins.
function pixelAt(img, event, run) {
  const shape = run.image_shape, r = img.getBoundingClientRect();
  if (!shape || !r.width || !r.height) return null;
  const index = (v, n) => Math.max(0, Math.min(n - 1, Math.floor(v * n)));
  return { uid: run.uid, y: index((event.clientY - r.top) / r.height, shape[0]), x: index((event.clientX - r.left) / r.width, shape[1]) };
}

function choosePixel(event) {
  const run = view.runs.get(view.selected);
  const at = run && pixelAt(event.currentTarget, event, run);
  if (!at) return;
  view.pixel = at;
  view.pixelVersion = run.version;
  loadPixel();
}

async function loadPixel() {
  const want = view.pixel;
  if (!want) return;
  if (view.pixelLoading) { view.pixelAgain = true; return; }
  view.pixelLoading = true;
  let body = null, error = null;
  try {
    const reply = await fetch(`/api/runs/${encodeURIComponent(want.uid)}/pixel?y=${want.y}&x=${want.x}`);
    body = await reply.json().catch(() => ({ error: reply.statusText }));
    if (!reply.ok) { error = body.error || `${reply.status} ${reply.statusText}`; body = null; }
  } catch (e) {
    error = String(e);
  }
  view.pixelLoading = false;
  if (view.pixel === want) renderPixel(want, body, error);
  if (view.pixelAgain) { view.pixelAgain = false; loadPixel(); }
}

function renderPixel(want, body, error) {
  const run = view.runs.get(want.uid);
  if (!run || view.selected !== want.uid) return;
  $("pixel").hidden = false;
  const img = $("img-phase"), marker = $("pixel-marker"), shape = run.image_shape;
  const w = img.clientWidth / shape[1], h = img.clientHeight / shape[0];
  Object.assign(marker.style, { left: `${want.x * w}px`, top: `${want.y * h}px`, width: `${Math.max(3, w)}px`, height: `${Math.max(3, h)}px` });
  marker.hidden = false;
  const where = `pixel (y ${want.y}, x ${want.x})`;
  if (!body) {
    $("pixel-title").textContent = where;
    $("pixel-pcc").textContent = "";
    $("pixel-note").textContent = `not shown: ${error}`;
    $("spectrum").innerHTML = "";
    return;
  }
  const said = body.phase === null ? (body.mask === false ? "outside the particle mask" : "no phase") : body.phase;
  $("pixel-title").textContent = `${where}: ${said}` + (body.ambiguous ? " (ambiguous)" : "") +
    (body.reliability === null ? "" : `, reliability ${body.reliability.toFixed(4)}`) +
    (body.refined_phase === null ? "" : `; GMVAE refined: ${body.refined_phase}`) +
    (body.phase_denoised === null ? "" : `; denoised: ${body.phase_denoised}`);
  const pcc = Object.entries(body.pcc).filter(([, v]) => v !== null);
  $("pixel-pcc").textContent = pcc.length ? "PCC: " + pcc.map(([p, v]) => `${p} ${v.toFixed(4)}`).join(", ") : "";
  $("pixel-note").textContent = "Points: the pixel's OD" + (body.denoised ? " (rings: denoised)" : "") + ". " +
    (body.references === "stored" ? "Lines: each reference fitted to the OD with an offset and a scale, which the PCC ignores."
      : "No reference values are stored with this result: the spectrum alone.");
  renderSpectrum(body, run);
}

function renderSpectrum(body, run) {
  const svg = $("spectrum"), W = 480, H = 220, pad = 40;
  const E = body.energies_eV;
  const values = [...body.od, ...(body.denoised || []), ...Object.values(body.fitted).flatMap((f) => f || [])]
    .filter((v) => typeof v === "number");
  if (!E.length || !values.length) { svg.innerHTML = ""; return; }
  const e0 = Math.min(...E), e1 = Math.max(...E), v0 = Math.min(...values), v1 = Math.max(...values);
  const sx = (e) => pad + (W - pad - 8) * (e1 === e0 ? 0.5 : (e - e0) / (e1 - e0));
  const sy = (v) => 8 + (H - 28 - 8) * (v1 === v0 ? 0.5 : 1 - (v - v0) / (v1 - v0));
  const order = E.map((e, i) => i).sort((a, b) => E[a] - E[b]);  // the planes in the order they came
  const parts = [`<rect x="${pad}" y="8" width="${W - pad - 8}" height="${H - 36}" fill="none" stroke="#444"/>`];
  run.phases.forEach((p, k) => {
    const f = body.fitted[p];
    if (!f) return;
    const xy = order.map((i) => `${sx(E[i]).toFixed(1)},${sy(f[i]).toFixed(1)}`).join(" ");
    parts.push(`<polyline class="fitted" data-phase="${k}" fill="none" stroke-width="${p === body.phase ? 2.5 : 1.2}" stroke="${view.colors[k % view.colors.length]}" points="${xy}"/>`);
  });
  (body.denoised || []).forEach((v, i) => {
    if (v !== null) parts.push(`<circle class="denoised-point" data-energy="${E[i]}" data-od="${v}" cx="${sx(E[i]).toFixed(1)}" cy="${sy(v).toFixed(1)}" r="4.5" fill="none" stroke="#7fc8ff" stroke-width="1.5"/>`);
  });
  body.od.forEach((v, i) => {
    if (v !== null) parts.push(`<circle class="od-point" data-energy="${E[i]}" data-od="${v}" cx="${sx(E[i]).toFixed(1)}" cy="${sy(v).toFixed(1)}" r="3" fill="#fff"/>`);
  });
  const label = (x, y, text, anchor = "start") => `<text x="${x}" y="${y}" fill="#aaa" font-size="11" text-anchor="${anchor}">${text}</text>`;
  parts.push(label(pad, H - 12, `${e0.toFixed(1)} eV`), label(W - 8, H - 12, `${e1.toFixed(1)} eV`, "end"),
    label(pad - 4, 18, v1.toPrecision(3), "end"), label(pad - 4, H - 30, v0.toPrecision(3), "end"), label(pad - 4, H / 2, "OD", "end"));
  svg.innerHTML = parts.join("");
}

function renderRun(force = false) {
  const run = view.runs.get(view.selected);
  $("run").hidden = !run;
  if (!run) return;
  $("run-title").textContent = `${run.sample || ""} SoC ${run.state_of_charge ?? "?"}, scan ${run.scan_id ?? "?"} (${run.uid})`;
  const status = $("run-status");
  status.replaceChildren(el("span", { id: "run-state", class: "status-" + run.status }, statusText(run)),
    " energies seen ", el("span", { id: "run-energies" }, energies(run)),
    run.mean_reliability === null || run.mean_reliability === undefined ? "" : `, mean reliability ${run.mean_reliability.toFixed(3)}`,
    `, ambiguous ${pct(run.ambiguous_fraction)}`);
  $("run-errors").replaceChildren(...run.errors.map((e) => el("li", {}, e)));
  $("legend").replaceChildren(...run.phases.map((p, k) => el("span", {}, Object.assign(el("i"), { style: `background:${view.colors[k % view.colors.length]}` }), p)));
  $("legend").querySelectorAll("i").forEach((i, k) => { i.style.background = view.colors[k % view.colors.length]; });
  const rows = [el("tr", {}, el("th", {}, "phase"), el("th", {}, "PCC fraction"), el("th", {}, "refined"))];
  run.phases.forEach((p) => rows.push(el("tr", { class: "fraction", "data-phase": p, "data-fraction": String(run.phase_fractions[p] ?? ""), "data-refined": String(run.refined_fractions[p] ?? "") },
    el("td", {}, p), el("td", {}, pct(run.phase_fractions[p])), el("td", {}, pct(run.refined_fractions[p])))));
  $("fractions").replaceChildren(...rows);
  const r = run.refinement;
  const kept = r.kept ? ` (refined fractions from the earlier complete refinement${r.kept.strategy ? ", " + r.kept.strategy : ""}, kept)` : "";
  $("refinement").textContent = r.status ? `GMVAE refinement: ${r.status}${r.strategy ? " (" + r.strategy + ")" : ""}${r.reason ? ": " + r.reason : ""}${kept}` : "GMVAE refinement: not run";
  $("links").replaceChildren("In Tiled (sign in to Tiled to open): ",
    ...Object.entries(run.links).map(([name, href]) => el("a", { href, target: "_blank", rel: "noopener" }, name)).flatMap((a) => [a, " "]));
  renderHistory(run);

  const base = `/api/runs/${encodeURIComponent(run.uid)}`;
  if (force || view.drawnVersion[run.uid] !== run.version) {
    view.drawnVersion[run.uid] = run.version;
    const entry = { uid: run.uid, version: run.version, n: run.energies_seen, maps: run.maps_energies, status: run.status,
      updated_at: run.updated_at, received: run._received || now(), drawn: null };
    window.phasestreamLog.push(entry);
    const pccs = $("pcc-images");
    if (pccs.children.length !== run.phases.length || force) {
      pccs.replaceChildren(...run.phases.map((p, k) => el("figure", {}, el("img", { id: "img-pcc" + k, alt: "PCC " + p }), el("figcaption", {}, "PCC with " + p + " (-1 blue, +1 red)"))));
    }
    const version = run.version;
    // the PCC maps once the phase map is in: their rendering (K times the data) would hold it up
    loadImage($("img-phase"), `${base}/phase.png?v=${version}`, (t) => {
      entry.drawn = t;
      $("phase-caption").textContent = `phase map after ${entry.maps} energies (brightness: reliability; grey: ambiguous)`;
    }, entry, () => {
      if (view.selected !== run.uid) return;  // another run was selected meanwhile: it loads its own
      run.phases.forEach((p, k) => { const img = $("img-pcc" + k); if (img) loadImage(img, `${base}/pcc${k}.png?v=${version}`); });
    });
  }
  if (view.pixel && view.pixel.uid === run.uid && view.pixelVersion !== run.version) {  // new maps: the pixel anew
    view.pixelVersion = run.version;
    loadPixel();
  }
  const odKey = `${run.energies_seen}:${run.od_version}`;
  if (run.energies_seen > 0 && (force || view.drawnOd[run.uid] !== odKey)) {
    view.drawnOd[run.uid] = odKey;
    loadImage($("img-od"), `${base}/od.png?v=${run.version}.${run.od_version}.${run.energies_seen}`);
    $("od-caption").textContent = `latest OD image (energy ${run.energies_seen})`;
  }
}

function update(run) {
  view.runs.set(run.uid, received(run));
  if (!view.selected && run.uid === view.wanted) { select(run.uid); return; }
  renderList();
  if (run.uid === view.selected) renderRun();
}

async function search(event) {
  event && event.preventDefault();
  const soc = $("q-soc").value, tol = $("q-tol").value || "0", status = $("q-status").value;
  if (!soc && !status) { view.filter = null; renderList(); return; }
  const params = new URLSearchParams({ soc, tolerance: tol, status });
  const reply = await fetch("/api/search?" + params);
  const body = await reply.json();
  if (!reply.ok) { $("list-note").textContent = body.error; return; }
  view.filter = { soc: soc ? Number(soc) : null, tol: Number(tol), status, uids: new Set(body.uids) };
  renderList();
}

async function start() {
  const state = await (await fetch("/api/state")).json();
  view.colors = state.phase_colors;
  view.statuses = state.statuses;
  for (const s of state.statuses) $("q-status").append(el("option", { value: s }, s));
  state.runs.forEach((r) => view.runs.set(r.uid, received(r)));
  setConnection(state.state);
  const wanted = view.wanted = location.hash.slice(1);  // a run named in the URL, shown once it exists
  if (wanted && view.runs.has(wanted)) select(wanted); else renderList();
  $("search").addEventListener("submit", search);
  $("img-phase").addEventListener("click", choosePixel);
  $("img-od").addEventListener("click", choosePixel);
  $("q-clear").addEventListener("click", () => { $("q-soc").value = ""; $("q-status").value = ""; view.filter = null; renderList(); });

  const events = new EventSource("/events");
  events.addEventListener("snapshot", (e) => {
    const body = JSON.parse(e.data);
    view.runs = new Map(body.runs.map((r) => [r.uid, received(r)]));
    setConnection(body.state);
    renderList();
    if (view.selected) renderRun();
    else if (wanted && view.runs.has(wanted)) select(wanted);
  });
  events.addEventListener("run", (e) => update(JSON.parse(e.data)));
  events.addEventListener("connection", (e) => setConnection(JSON.parse(e.data).state));
  events.onerror = () => setConnection("reconnecting");  // the view server itself; EventSource retries
  setInterval(() => { renderList(); if (view.selected) renderRun(); }, 30000);  // a silent result's age
}

start();
