// qkv explain: the page's script. Plain JavaScript, no framework, no bundler, no network
// beyond the server that sent the page (or none at all in an exported HTML file).
//
// The page asks the explainer API (qkv/explain/app.py) for the model's tensors: small things as
// JSON, matrices as little-endian float32 with their shape in the X-Shape header. Every
// matrix is drawn on a <canvas>; hovering a cell prints its exact value.
"use strict";

(function () {
  const PREFIX = document.body.dataset.prefix;
  const INLINE = window.QKV_INLINE || null; // an exported file carries its data
  const $ = (id) => document.getElementById(id);
  const S = {
    model: null, cap: null, vocab: null, pinned: null, hideSpecial: false,
    head: null, // {layer, head, stage, data, shape}
    cacheHeads: new Map(),
  };

  // ------------------------------------------------------------------ talking to the server
  async function api(path, body) {
    const init = body === undefined ? {} : {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    };
    const r = await fetch(PREFIX + "/api/" + path, init);
    const data = await r.json();
    if (!r.ok) throw new Error(message(data) || r.statusText);
    return data;
  }

  // FastAPI's {"detail"}, or the OpenAI envelope {"error": {"message"}} of `qkv serve`'s app
  const message = (data) => (data && (data.detail || (data.error && data.error.message))) || "";

  function decodeInline(entry) {
    const raw = atob(entry.b64);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return { data: new Float32Array(bytes.buffer), shape: entry.shape.split(",").map(Number) };
  }

  async function bin(path, inlineKey) {
    if (INLINE) {
      const entry = INLINE.bin[inlineKey];
      if (!entry) return null; // not part of the export
      return decodeInline(entry);
    }
    const r = await fetch(PREFIX + "/api/" + path);
    if (!r.ok) throw new Error(message(await r.json()) || r.statusText);
    const shape = r.headers.get("X-Shape").split(",").filter((s) => s !== "").map(Number);
    return { data: new Float32Array(await r.arrayBuffer()), shape };
  }

  function status(text, error) {
    $("status").textContent = text;
    $("status").className = error ? "error" : "";
  }

  // ------------------------------------------------------------------ colours and heatmaps
  // A perceptually ordered map (dark blue -> green -> yellow), 256 entries.
  const ANCHORS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const LUT = (() => {
    const lut = new Uint8Array(256 * 3);
    for (let i = 0; i < 256; i++) {
      const t = (i / 255) * (ANCHORS.length - 1), a = Math.floor(Math.min(t, ANCHORS.length - 2));
      const f = t - a;
      for (let c = 0; c < 3; c++) {
        lut[i * 3 + c] = Math.round(ANCHORS[a][c] * (1 - f) + ANCHORS[a + 1][c] * f);
      }
    }
    return lut;
  })();

  function range(data, rows, cols, hidden) {
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < rows; i++) {
      for (let j = 0; j < cols; j++) {
        if (hidden && hidden.has(j)) continue;
        const v = data[i * cols + j];
        if (Number.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
      }
    }
    if (lo === Infinity) { lo = 0; hi = 1; }
    return [lo, hi === lo ? lo + 1 : hi];
  }

  // Draw a rows x cols matrix into `canvas`, each cell `cell` pixels; -inf and hidden
  // columns are grey. Returns the scale used.
  function heatmap(canvas, data, rows, cols, cell, hidden, offset) {
    const off = offset || 0;
    const [lo, hi] = range(data.subarray(off, off + rows * cols), rows, cols, hidden);
    const img = new ImageData(cols, rows);
    const px = img.data;
    for (let i = 0; i < rows; i++) {
      for (let j = 0; j < cols; j++) {
        const v = data[off + i * cols + j], p = (i * cols + j) * 4;
        if (!Number.isFinite(v) || (hidden && hidden.has(j))) {
          px[p] = px[p + 1] = px[p + 2] = 215;
        } else {
          const k = Math.max(0, Math.min(255, Math.round(((v - lo) / (hi - lo)) * 255))) * 3;
          px[p] = LUT[k]; px[p + 1] = LUT[k + 1]; px[p + 2] = LUT[k + 2];
        }
        px[p + 3] = 255;
      }
    }
    const scratch = document.createElement("canvas");
    scratch.width = cols; scratch.height = rows;
    scratch.getContext("2d").putImageData(img, 0, 0);
    canvas.width = Math.max(1, Math.round(cols * cell));
    canvas.height = Math.max(1, Math.round(rows * cell));
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(scratch, 0, 0, canvas.width, canvas.height);
    return [lo, hi];
  }

  function cellSize(rows, cols, width) {
    return Math.max(0.25, Math.min(24, width / Math.max(rows, cols)));
  }

  // ------------------------------------------------------------------ small helpers
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function table(head, rows) {
    const t = el("table"), tr = el("tr");
    head.forEach((h) => tr.appendChild(el("th", {}, h)));
    t.appendChild(tr);
    rows.forEach((row) => {
      const r = el("tr");
      row.forEach((c) => r.appendChild(c instanceof Node ? wrapCell(c) : el("td", {}, String(c))));
      t.appendChild(r);
    });
    return t;
  }

  function wrapCell(node) { const td = el("td"); td.appendChild(node); return td; }
  const exact = (v) => (Number.isFinite(v) ? Number(v.toPrecision(9)).toString() : String(v));
  const show = (t) => (t === null || t === undefined ? "" : t.replace(/\n/g, "\\n"));

  function fillSelect(select, options, value) {
    select.replaceChildren(...options.map(([v, label]) => el("option", { value: v }, label)));
    if (value !== undefined) select.value = String(value);
  }

  function specialColumns(keyIds) {
    if (!S.hideSpecial || !S.model) return null;
    const special = new Set(S.model.special_ids);
    const cols = new Set();
    keyIds.forEach((id, j) => { if (special.has(id)) cols.add(j); });
    return cols;
  }

  // a capture with only attention weights: a bare alignment, or a recurrent translator's
  function bare(c) { return c.family === "alignment" || c.family === "rnn"; }

  // query / key tokens (and ids) of an attention layer
  function axes(layer) {
    const c = S.cap, encdec = c.family === "encoder-decoder";
    const inDecoder = (encdec && layer.stack === "decoder") || bare(c);
    const q = inDecoder ? [c.target_tokens, c.target_ids] : [c.tokens, c.ids];
    const k = layer.cross || !inDecoder ? [c.tokens, c.ids] : [c.target_tokens, c.target_ids];
    return { qTok: q[0], qIds: q[1], kTok: k[0], kIds: k[1] };
  }

  // ------------------------------------------------------------------ tokens
  function renderTokens() {
    const c = S.cap, special = new Set(S.model.special_ids);
    const chips = (tokens, ids, box, side) => {
      box.replaceChildren(...tokens.map((t, i) => {
        const chip = el("span", { class: "tok", "data-index": i, "data-side": side });
        chip.append(show(t));
        if (ids[i] !== undefined) chip.appendChild(el("sub", {}, String(ids[i])));
        if (special.has(ids[i])) chip.classList.add("special");
        if (S.pinned && S.pinned.side === side && S.pinned.index === i) chip.classList.add("pinned");
        chip.addEventListener("click", () => pin(side, i));
        return chip;
      }));
    };
    chips(c.tokens, c.ids, $("tokens"), "source");
    chips(c.target_tokens, c.target_ids, $("target-tokens"), "target");
  }

  function pin(side, index) {
    const same = S.pinned && S.pinned.side === side && S.pinned.index === index;
    S.pinned = same ? null : { side, index };
    renderTokens();
    drawOverview();
    drawHead();
    renderResidual();
  }

  // the pinned token as a (row, column) of a layer's map: row if it is a query, col if a key
  function pinnedCell(layer) {
    if (!S.pinned) return { row: null, col: null };
    const c = S.cap, encdec = c.family === "encoder-decoder";
    const qSide = (encdec && layer.stack === "decoder") || layer.cross ? "target" : "source";
    const kSide = encdec && layer.stack === "decoder" && !layer.cross ? "target" : "source";
    return { row: S.pinned.side === qSide ? S.pinned.index : null,
      col: S.pinned.side === kSide ? S.pinned.index : null };
  }

  function outline(ctx, row, col, rows, cols, cw, ch) {
    ctx.strokeStyle = "#ff2d55";
    ctx.lineWidth = Math.max(1, Math.min(2, cw / 3));
    if (row !== null && row < rows) ctx.strokeRect(0.5, row * ch + 0.5, cols * cw - 1, ch - 1);
    if (col !== null && col < cols) ctx.strokeRect(col * cw + 0.5, 0.5, cw - 1, rows * ch - 1);
  }

  // ------------------------------------------------------------------ overview (all heads)
  const THUMB = 72; // pixels per thumbnail
  async function loadOverview() {
    S.thumbs = await bin(S.cap.id + "/thumbs?size=64", "thumbs");
    drawOverview();
  }

  function drawOverview() {
    const t = S.thumbs, canvas = $("overview");
    if (!t) return;
    const [L, H, s] = t.shape, gap = 4;
    canvas.width = H * (THUMB + gap); canvas.height = L * (THUMB + gap);
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    const tile = document.createElement("canvas");
    for (let l = 0; l < L; l++) {
      const layer = S.cap.layers[l];
      for (let h = 0; h < H && h < layer.heads; h++) {
        heatmap(tile, t.data, s, s, 1, null, (l * H + h) * s * s);
        ctx.imageSmoothingEnabled = false;
        const x = h * (THUMB + gap), y = l * (THUMB + gap);
        ctx.drawImage(tile, x, y, THUMB, THUMB);
        const p = pinnedCell(layer), fy = THUMB / layer.tq, fx = THUMB / layer.tk;
        ctx.save(); ctx.translate(x, y);
        outline(ctx, p.row, p.col, layer.tq, layer.tk, fx, fy);
        ctx.restore();
      }
    }
    const o = S.overHover; // the map under the pointer: a frame around it
    if (o) {
      ctx.strokeStyle = "#222"; ctx.lineWidth = 2;
      ctx.strokeRect(o.h * (THUMB + gap) - 1, o.l * (THUMB + gap) - 1, THUMB + 2, THUMB + 2);
    }
    canvas.dataset.drawn = String(L * H);
  }

  // the map (layer l, head h) under the pointer and where in it (fx, fy in [0, 1)), or null
  function overviewCell(ev) {
    const r = $("overview").getBoundingClientRect();
    const scale = $("overview").width / r.width;
    const x = (ev.clientX - r.left) * scale, y = (ev.clientY - r.top) * scale;
    const h = Math.floor(x / (THUMB + 4)), l = Math.floor(y / (THUMB + 4));
    const fx = (x - h * (THUMB + 4)) / THUMB, fy = (y - l * (THUMB + 4)) / THUMB;
    if (l < 0 || h < 0 || l >= S.cap.layers.length || h >= S.cap.layers[l].heads) return null;
    if (fx >= 1 || fy >= 1) return null; // the gap between maps
    return { l, h, fx, fy };
  }

  function overviewClick(ev) {
    const c = overviewCell(ev);
    if (c) {
      $("layer").value = String(c.l); fillHeadSelect(); $("head").value = String(c.h);
      selectHead();
    }
  }

  // hovering a map names it and the cell under the pointer: its tokens and (pooled) weight
  function overviewHover(ev) {
    const c = ev ? overviewCell(ev) : null, ro = $("overview-readout"), t = S.thumbs;
    const was = S.overHover;
    S.overHover = c && { l: c.l, h: c.h };
    if ((was && was.l) !== (c && c.l) || (was && was.h) !== (c && c.h)) drawOverview();
    if (!c || !t) {
      ro.textContent = "hover a map"; delete ro.dataset.layer;
      return;
    }
    const layer = S.cap.layers[c.l], ax = axes(layer), [, H, s] = t.shape;
    const i = Math.floor(c.fy * layer.tq), j = Math.floor(c.fx * layer.tk);
    const v = t.data[((c.l * H + c.h) * s + Math.floor(c.fy * s)) * s + Math.floor(c.fx * s)];
    const pooled = s !== layer.tq || s !== layer.tk;
    ro.textContent = `${layer.name}, head ${c.h}: query "${show(ax.qTok[i])}" (${i}) → ` +
      `"${show(ax.kTok[j])}" (${j}): ${pooled ? "≈ " + v.toFixed(4) + " (pooled)" : exact(v)}` +
      " · click to open";
    Object.assign(ro.dataset, { layer: layer.name, head: String(c.h), i: String(i), j: String(j),
      value: exact(v), pooled: String(pooled) });
  }

  // ------------------------------------------------------------------ one head, every stage
  function fillHeadControls() {
    fillSelect($("layer"), S.cap.layers.map((l, i) => [i, l.name]), 0);
    fillHeadSelect();
    fillSelect($("stage"), S.cap.stages.map((s) => [s, s === "weights" ? "weights (softmax)" : s]),
      "weights");
  }

  function fillHeadSelect() {
    const layer = S.cap.layers[Number($("layer").value)];
    const heads = [...Array(layer.heads).keys()].map((h) => [h, "head " + h]);
    fillSelect($("head"), heads.concat([["mean", "mean of heads"]]), 0);
  }

  async function headData(li, head, stage) {
    const layer = S.cap.layers[li];
    const key = [li, head, stage].join(":");
    if (S.cacheHeads.has(key)) return S.cacheHeads.get(key);
    let result;
    if (INLINE) {
      const all = await bin(null, "attention:" + layer.name + ":" + stage + ":all");
      if (!all) return null;
      if (head === "mean") {
        const n = layer.tq * layer.tk, mean = new Float32Array(n);
        for (let h = 0; h < layer.heads; h++) for (let i = 0; i < n; i++) mean[i] += all.data[h * n + i] / layer.heads;
        result = { data: mean, shape: [layer.tq, layer.tk] };
      } else {
        const n = layer.tq * layer.tk;
        result = { data: all.data.subarray(head * n, (head + 1) * n), shape: [layer.tq, layer.tk] };
      }
    } else {
      const q = "layer=" + encodeURIComponent(layer.name) + "&stage=" + stage + "&head=" + head;
      result = await bin(S.cap.id + "/attention?" + q);
      result.shape = result.shape.slice(-2);
    }
    S.cacheHeads.set(key, result);
    return result;
  }

  // Answers may arrive out of order: only the latest request of a kind may draw.
  const latest = {};
  const ticket = (kind) => { latest[kind] = (latest[kind] || 0) + 1; return latest[kind]; };
  const stale = (kind, t) => latest[kind] !== t;

  async function selectHead() {
    const li = Number($("layer").value), stage = $("stage").value;
    const head = $("head").value, t = ticket("head");
    const data = await headData(li, head, stage);
    if (stale("head", t)) return;
    if (!data) {
      $("head-note").textContent = "This stage is not part of the exported file: open the live page.";
      return;
    }
    S.head = { li, head, stage, data: data.data, shape: data.shape };
    drawHead();
  }

  function drawHead() {
    const h = S.head;
    if (!h) return;
    const layer = S.cap.layers[h.li], [rows, cols] = h.shape, canvas = $("head-canvas");
    const ax = axes(layer);
    const hidden = h.stage === "output" ? null : specialColumns(ax.kIds);
    const cell = cellSize(rows, cols, 640);
    const [lo, hi] = heatmap(canvas, h.data, rows, cols, cell, hidden);
    const p = pinnedCell(layer);
    outline(canvas.getContext("2d"), p.row, h.stage === "output" ? null : p.col, rows, cols,
      canvas.width / cols, canvas.height / rows);
    canvas.dataset.layer = layer.name; canvas.dataset.head = h.head; canvas.dataset.stage = h.stage;
    canvas.dataset.rows = rows; canvas.dataset.cols = cols;
    $("head-note").textContent = `${layer.name}, head ${h.head}, ${h.stage}: ${rows} × ${cols}` +
      (h.stage === "output" ? " (query × head dimension)" : " (query × key)") +
      `, colour from ${exact(lo)} to ${exact(hi)}` + (hidden && hidden.size ? `, ${hidden.size} special column(s) hidden` : "");
    renderRow();
  }

  function headCell(ev) {
    const h = S.head, canvas = $("head-canvas");
    if (!h) return null;
    const r = canvas.getBoundingClientRect();
    const j = Math.floor(((ev.clientX - r.left) / r.width) * h.shape[1]);
    const i = Math.floor(((ev.clientY - r.top) / r.height) * h.shape[0]);
    if (i < 0 || j < 0 || i >= h.shape[0] || j >= h.shape[1]) return null;
    return { i, j };
  }

  function hover(ev) {
    const c = headCell(ev);
    if (!c) return;
    const h = S.head, ax = axes(S.cap.layers[h.li]), v = h.data[c.i * h.shape[1] + c.j];
    const key = h.stage === "output" ? "dim " + c.j : `"${show(ax.kTok[c.j])}" (${c.j})`;
    const ro = $("readout");
    ro.textContent = `query "${show(ax.qTok[c.i])}" (${c.i}) → ${key}: ${exact(v)}`;
    ro.dataset.i = c.i; ro.dataset.j = c.j; ro.dataset.value = exact(v);
  }

  function clickHead(ev) {
    const c = headCell(ev);
    if (!c) return;
    const layer = S.cap.layers[S.head.li];
    const side = (S.cap.family === "encoder-decoder" && layer.stack === "decoder") || layer.cross ? "target" : "source";
    pin(side, c.i);
  }

  // the pinned query's row of the current stage, every value printed
  function renderRow() {
    const h = S.head, box = $("row-values");
    const p = h ? pinnedCell(S.cap.layers[h.li]) : { row: null };
    if (!h || p.row === null || p.row >= h.shape[0]) {
      box.replaceChildren(el("p", { class: "note" }, "Pin a query token to list its row."));
      return;
    }
    const ax = axes(S.cap.layers[h.li]), cols = h.shape[1];
    const hidden = h.stage === "output" ? null : specialColumns(ax.kIds);
    const head = ["query", ...[...Array(cols).keys()].map((j) => (h.stage === "output" ? "d" + j : show(ax.kTok[j])))];
    const t = table(head, []);
    const tr = el("tr", { id: "pinned-row", "data-row": p.row });
    tr.appendChild(el("th", {}, show(ax.qTok[p.row])));
    for (let j = 0; j < cols; j++) {
      const v = h.data[p.row * cols + j];
      const td = el("td", { "data-j": j, "data-value": exact(v) }, exact(v));
      if (hidden && hidden.has(j)) td.classList.add("hidden");
      tr.appendChild(td);
    }
    t.appendChild(tr);
    box.replaceChildren(t);
  }

  // ------------------------------------------------------------------ embeddings
  function renderEmbeddings() {
    const names = Object.keys(S.cap.tensors).filter((n) => n.startsWith("token_embedding/") || n.startsWith("position/"));
    fillSelect($("embed-tensor"), names.map((n) => [n, n]), names[0]);
    const kind = S.cap.position_kind;
    $("embed-note").textContent = kind === "rope"
      ? "RoPE: nothing is added; queries and keys are rotated. The position rows show each dimension pair's angle (radians)."
      : `The ${kind} positional term is added to the token vector before the first block.`;
    const rows = [];
    for (const n of names) rows.push([n, ...S.cap.tensors[n].norm.map((v) => v.toFixed(4))]);
    const stackTokens = S.cap.tokens.map(show);
    $("embed-norms").replaceChildren(table(["vector norm", ...stackTokens], rows));
    drawTensor("embed-tensor", "embed-canvas");
  }

  async function drawTensor(selectId, canvasId, noteId) {
    const name = $(selectId).value, k = ticket(canvasId);
    if (!name) return;
    const t = await bin(S.cap.id + "/tensor?name=" + encodeURIComponent(name), "tensor:" + name);
    if (stale(canvasId, k)) return;
    const canvas = $(canvasId);
    if (!t) { if (noteId) $(noteId).textContent = "Not part of the exported file."; return; }
    const [rows, cols] = t.shape;
    const [lo, hi] = heatmap(canvas, t.data, rows, cols, Math.max(1, Math.min(12, 900 / cols)));
    canvas.dataset.name = name;
    if (noteId) $(noteId).textContent = `${name}: ${rows} tokens × ${cols}, from ${exact(lo)} to ${exact(hi)}`;
  }

  // ------------------------------------------------------------------ output distribution
  function fillPositions() {
    const c = S.cap, n = c.logit_positions;
    const names = c.family === "encoder-decoder" || c.family === "rnn" ? c.target_tokens : c.tokens;
    const opts = [...Array(n).keys()].map((i) => [i, i + ": " + show(names[i])]);
    let chosen = n - 1;
    if (c.fill_mask.length) chosen = c.fill_mask[0].position;
    fillSelect($("position"), opts, chosen);
  }

  function samplingQuery() {
    const q = ["position=" + $("position").value, "temperature=" + ($("temperature").value || "1")];
    if ($("top-k").value) q.push("top_k=" + $("top-k").value);
    if ($("top-p").value) q.push("top_p=" + $("top-p").value);
    return q.join("&");
  }

  async function renderOutput() {
    if (!S.cap.logit_positions) return;
    const t = ticket("output");
    const probs = await bin(S.cap.id + "/probs?" + samplingQuery(), "probs");
    if (!probs) return;
    const raw = INLINE ? null : await bin(S.cap.id + "/probs?raw=true&position=" + $("position").value);
    if (stale("output", t)) return;
    const p = probs.data, V = p.length, order = [...Array(V).keys()].sort((a, b) => p[b] - p[a]);
    let sum = 0, nonzero = 0;
    for (let i = 0; i < V; i++) { sum += p[i]; if (p[i] > 0) nonzero++; }
    $("prob-sum").textContent = "sum of probabilities " + sum.toFixed(7);
    $("prob-sum").dataset.value = String(sum);
    $("nonzero").textContent = `${nonzero} of ${V} tokens can be drawn`;
    $("nonzero").dataset.value = String(nonzero);
    drawVocab(p, order);
    const rows = order.slice(0, 20).map((i, r) => [r + 1, i, show(S.vocab ? S.vocab[i] : String(i)),
      raw ? exact(raw.data[i]) : "", el("span", { class: "prob", "data-id": i, "data-value": exact(p[i]) }, exact(p[i]))]);
    $("top-tokens").replaceChildren(table(["rank", "id", "token", "logit", "probability"], rows));
    S.probs = p;
  }

  function drawVocab(p, order) {
    const canvas = $("vocab-canvas"), ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height, V = p.length, top = p[order[0]] || 1;
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
    ctx.fillStyle = "#3b7dd8";
    for (let x = 0; x < W; x++) { // each pixel column: the largest probability it covers
      const a = Math.floor((x * V) / W), b = Math.max(a + 1, Math.floor(((x + 1) * V) / W));
      let m = 0;
      for (let r = a; r < b && r < V; r++) m = Math.max(m, p[order[r]]);
      const h = Math.round((m / top) * (H - 2));
      if (h > 0) ctx.fillRect(x, H - h, 1, h);
    }
  }

  async function drawNext() {
    const body = { id: S.cap.id, temperature: Number($("temperature").value || 1),
      seed: $("seed").value === "" ? null : Number($("seed").value) };
    if ($("top-k").value) body.top_k = Number($("top-k").value);
    if ($("top-p").value) body.top_p = Number($("top-p").value);
    try {
      const r = await api("sample", body);
      $("drawn").textContent = `drawn: "${show(r.token)}" (id ${r.id})`;
      $("drawn").dataset.id = r.id;
    } catch (e) { status(e.message, true); }
  }

  // ------------------------------------------------------------------ encoder heads
  function renderEncoder() {
    const c = S.cap;
    const fill = c.fill_mask.map((f) => {
      const box = el("div", { class: "fill" });
      box.appendChild(el("h3", {}, "[MASK] at position " + f.position));
      box.appendChild(table(["token", "id", "probability"], f.candidates.map((x) => [show(x.token), x.id, exact(x.prob)])));
      return box;
    });
    $("fill-mask").replaceChildren(...fill);
    const labels = Object.entries(c.classes);
    if (labels.length) {
      const rows = labels.map(([name, prob]) => {
        const bar = el("span", { class: "bar", style: `width:${Math.round(prob * 200)}px` });
        return [name, el("span", { class: "class-prob", "data-label": name, "data-value": exact(prob) }, exact(prob)), bar];
      });
      $("classes").replaceChildren(el("h3", {}, "Classifier"), table(["class", "probability", ""], rows));
    } else $("classes").replaceChildren();
    $("view-encoder").hidden = !fill.length && !labels.length;
  }

  // ------------------------------------------------------------------ residual stream, norms, lens
  function renderResidual() {
    const c = S.cap;
    if (!c) return;
    const keys = c.residual_keys;
    const byStack = (k) => (c.family === "encoder-decoder" && k.startsWith("decoder") ? c.target_tokens : c.tokens);
    const rows = keys.map((k) => [k, ...c.tensors["residual/" + k].norm.map((v) => v.toFixed(4))]);
    const tokens = byStack(keys[keys.length - 1] || "").map(show);
    $("residual").replaceChildren(el("h3", {}, "‖residual‖ after each block"), table(["block", ...tokens], rows));
    const pos = S.pinned ? S.pinned.index : null;
    const stats = Object.entries(c.norms).map(([name, v]) => {
      const i = pos !== null && pos < v.length ? pos : v.length - 1;
      return [name, i, v[i][0].toFixed(5), v[i][1].toFixed(5)];
    });
    $("norm-stats").replaceChildren(el("h3", {}, "Layer-norm input statistics (pinned token, else the last)"),
      table(["norm", "token", "mean", "std"], stats));
  }

  async function renderLens() {
    if (INLINE || !S.cap.logit_positions) {
      $("lens").replaceChildren(el("p", { class: "note" }, INLINE ? "Not part of the exported file." : "No output layer."));
      return;
    }
    const t = ticket("lens");
    const rows = await api(S.cap.id + "/lens?position=" + $("position").value + "&k=5");
    if (stale("lens", t)) return;
    $("lens").replaceChildren(table(["after", "1st", "2nd", "3rd", "4th", "5th"], rows.map((r) =>
      [r.layer, ...r.top.map((t) => `${show(t.token)} ${t.prob.toFixed(3)}`)])));
  }

  function renderFfn() {
    const names = Object.keys(S.cap.tensors).filter((n) => n.startsWith("ffn/"));
    fillSelect($("ffn-layer"), names.map((n) => [n, n.slice(4)]), names[0]);
    drawTensor("ffn-layer", "ffn-canvas", "ffn-note");
  }

  // ------------------------------------------------------------------ step-by-step generation
  async function runSteps() {
    const body = { id: S.cap.id, steps: Number($("n-steps").value || 6),
      temperature: Number($("temperature").value || 1),
      seed: $("seed").value === "" ? null : Number($("seed").value) };
    if ($("top-k").value) body.top_k = Number($("top-k").value);
    if ($("top-p").value) body.top_p = Number($("top-p").value);
    try {
      S.steps = (await api("steps", body)).steps;
    } catch (e) { status(e.message, true); return; }
    drawSteps();
  }

  function drawSteps() {
    const steps = S.steps;
    if (!steps || !steps.length) return;
    const layer = $("steps-layer").value, width = steps[steps.length - 1].cache;
    const data = new Float32Array(steps.length * width).fill(NaN);
    steps.forEach((s, r) => {
      const heads = s.attention[layer], n = heads[0].length;
      for (let j = 0; j < n; j++) {
        let m = 0;
        for (const h of heads) m += h[j];
        data[r * width + j] = m / heads.length;
      }
    });
    heatmap($("steps-canvas"), data, steps.length, width, Math.max(2, Math.min(16, 800 / width)));
    $("steps").replaceChildren(table(["step", "token", "id", "KV cache (positions)"], steps.map((s, i) =>
      [i + 1, show(s.token), s.id, el("span", { class: "cache", "data-value": s.cache }, String(s.cache))])));
  }

  // ------------------------------------------------------------------ the whole page
  async function render(cap) {
    S.cap = cap; S.cacheHeads.clear(); S.pinned = null; S.head = null; S.steps = null;
    S.overHover = null;
    document.querySelectorAll(".view").forEach((v) => { v.hidden = false; });
    renderTokens();
    renderEmbeddings();
    fillHeadControls();
    const decoder = cap.family === "decoder";
    if (bare(cap)) { // an alignment matrix (or an RNN's): only the attention views apply
      for (const v of ["view-embeddings", "view-ffn", "view-residual", "view-lens"]) $(v).hidden = true;
    }
    $("view-output").hidden = !cap.logit_positions;
    $("draw").hidden = !decoder || !!INLINE;
    $("view-steps").hidden = !decoder || !!INLINE;
    fillSelect($("steps-layer"), cap.layers.map((l) => [l.name, l.name]), cap.layers[0].name);
    $("run-form").hidden = cap.family === "alignment" || !!INLINE;
    renderEncoder();
    renderFfn();
    renderResidual();
    fillPositions();
    if (!INLINE) {
      $("export-html").href = PREFIX + "/api/" + cap.id + "/export.html";
      $("export-html").hidden = false;
    }
    await Promise.all([loadOverview(), selectHead(), renderOutput(), renderLens()]);
    document.body.dataset.ready = cap.id;
  }

  async function run(ev) {
    if (ev) ev.preventDefault();
    status("running…");
    const started = performance.now();
    try {
      const body = { text: $("text").value };
      if ($("target").value) body.target = $("target").value;
      const cap = await api("capture", body);
      await render(cap);
      status(`${cap.tokens.length} tokens, ${cap.layers.length} attention layers, ${Math.round(performance.now() - started)} ms`);
    } catch (e) { status(e.message, true); }
  }

  function png(ev) {
    const canvas = $(ev.target.dataset.canvas);
    const a = el("a", { download: canvas.id + ".png", href: canvas.toDataURL("image/png"), class: "png-link" });
    ev.target.after(a);
    a.click();
    a.remove();
    ev.target.dataset.exported = a.href.slice(0, 22);
  }

  function wire() {
    $("run-form").addEventListener("submit", run);
    $("hide-special").addEventListener("change", (e) => {
      S.hideSpecial = e.target.checked; drawHead();
    });
    $("overview").addEventListener("click", overviewClick);
    $("overview").addEventListener("mousemove", overviewHover);
    $("overview").addEventListener("mouseleave", () => overviewHover(null));
    $("layer").addEventListener("change", () => { fillHeadSelect(); selectHead(); });
    $("head").addEventListener("change", selectHead);
    $("stage").addEventListener("change", selectHead);
    $("head-canvas").addEventListener("mousemove", hover);
    $("head-canvas").addEventListener("click", clickHead);
    $("embed-tensor").addEventListener("change", () => drawTensor("embed-tensor", "embed-canvas"));
    $("ffn-layer").addEventListener("change", () => drawTensor("ffn-layer", "ffn-canvas", "ffn-note"));
    for (const id of ["position", "temperature", "top-k", "top-p"]) {
      $(id).addEventListener("change", () => { renderOutput(); if (id === "position") renderLens(); });
    }
    $("draw").addEventListener("click", drawNext);
    $("run-steps").addEventListener("click", runSteps);
    $("steps-layer").addEventListener("change", drawSteps);
    document.querySelectorAll("button.png").forEach((b) => b.addEventListener("click", png));
  }

  async function start() {
    wire();
    if (INLINE) {
      S.model = INLINE.model;
      S.vocab = INLINE.vocab || null;
      $("run-form").hidden = true;
      document.querySelectorAll("#view-output .controls input, #view-output select")
        .forEach((e) => { e.disabled = true; }); // the export holds one distribution
      $("model-info").textContent = `${S.model.family} · exported capture`;
      await render(INLINE.capture);
      return;
    }
    S.model = await api("model");
    const m = S.model;
    $("model-info").textContent = m.family === "rnn"
      ? `rnn · ${m.cell.toUpperCase()} · ${m.n_layers} layers · d_hidden ${m.d_hidden} · ` +
        `${m.attention ? "Bahdanau attention" : "no attention"}`
      : `${m.family} · ${m.n_encoder_layers + m.n_decoder_layers} layers · ` +
        `${m.n_heads} heads · d_model ${m.d_model} · ${m.position} positions · context ${m.max_seq_len}`;
    $("target").hidden = m.family !== "encoder-decoder" && m.family !== "rnn";
    if (m.family === "encoder" && m.mask_id !== null) {
      $("text").value = "The animal didn't cross the [MASK] because it was too tired";
    }
    const ready = new URLSearchParams(location.search).get("capture");
    if (ready) { // a capture made elsewhere, e.g. a recurrent model's alignment
      $("model-info").textContent = "capture " + ready;
      await render(await api(encodeURIComponent(ready)));
      return;
    }
    S.vocab = await api("vocab");
    await run();
  }

  window.qkvExplain = { state: S, run, pin };
  start().catch((e) => status(e.message, true));
})();
