// ovstore serve: the page. Everything it shows comes from the server's /api/ (no other site).
"use strict";

const VIRIDIS = "44015446075a470d6047136548186a481d6f482374482878472d7b46327e453781443b844240864045883e49893d4e8a3a538b38588c365c8d34608d32648e31688e2f6c8e2d708e2c738e2a778e297b8e277f8e26828e24868e238a8d218e8d20928c1f968b1f9a8a1f9e891fa18721a58523a98326ad812ab07f2fb47c35b7793bbb7542be714ac16d52c5695ac86465cb5e6ece5877d15381d34d8bd64695d840a0da39aadc32b5de2bc0df25cae11fd5e21adfe318eae51af4e61efde725";
const LUT = [];
for (let i = 0; i < VIRIDIS.length; i += 6) {
  LUT.push([0, 2, 4].map((k) => parseInt(VIRIDIS.substr(i + k, 2), 16)));
}
const $ = (id) => document.getElementById(id);
const TAB = Math.random().toString(36).slice(2, 10);  // names this tab's views for the server

const state = {
  info: null, page: 0, perPage: 24, detail: null, thresholdTouched: false, labelSeq: 0,
  views: { A: { text: "", learned: "", result: null, token: null, seq: 0, ctrl: null },
           B: { text: "", learned: "", result: null, token: null, seq: 0, ctrl: null } },
};
window.ovstore = state;  // for the browser tests and the curious

function colour(v) {
  const x = Math.max(0, Math.min(1, v));
  return LUT[Math.round(x * (LUT.length - 1))];
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function decode(b64, tokens, h, w) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const all = new Float32Array(bytes.buffer);
  const out = [];
  for (let k = 0; k < tokens; k++) out.push(all.subarray(k * h * w, (k + 1) * h * w));
  return out;
}

// bilinear resize with align_corners=False, as the analysis and `ovstore label` resize maps
function resize(values, h, w, H, W) {
  if (h === H && w === W) return Float64Array.from(values);
  const out = new Float64Array(H * W);
  const sy = h / H, sx = w / W;
  for (let Y = 0; Y < H; Y++) {
    let y = Math.max(0, (Y + 0.5) * sy - 0.5);
    const y0 = Math.min(h - 1, Math.floor(y)), y1 = Math.min(h - 1, y0 + 1), fy = y - y0;
    for (let X = 0; X < W; X++) {
      let x = Math.max(0, (X + 0.5) * sx - 0.5);
      const x0 = Math.min(w - 1, Math.floor(x)), x1 = Math.min(w - 1, x0 + 1), fx = x - x0;
      const top = values[y0 * w + x0] * (1 - fx) + values[y0 * w + x1] * fx;
      const bottom = values[y1 * w + x0] * (1 - fx) + values[y1 * w + x1] * fx;
      out[Y * W + X] = top * (1 - fy) + bottom * fy;
    }
  }
  return out;
}

// what a map tile shows: shares of attention, or the map normalised as `ovstore label` does
function shown(values, view, normalize) {
  const r = view.result;
  const [h, w] = r.size;
  const [H, W] = displaySize();
  const v = resize(values, h, w, H, W);
  if (normalize === "none") {
    for (let i = 0; i < v.length; i++) v[i] /= r.divisor;
    return v;
  }
  let lo = Infinity, hi = -Infinity;
  for (const x of v) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
  const floor = normalize === "minmax" ? lo : 0;
  const span = hi - floor;
  for (let i = 0; i < v.length; i++) v[i] = span > 0 ? (v[i] - floor) / span : 0;
  return v;
}

function displaySize() {
  const [H, W] = state.info.image_size;
  const f = Math.min(1, 256 / Math.max(H, W));
  return [Math.max(1, Math.round(H * f)), Math.max(1, Math.round(W * f))];
}

function paint(canvas, v, vmax, mask, threshold) {
  const [H, W] = displaySize();
  canvas.width = W; canvas.height = H;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(W, H);
  for (let i = 0; i < v.length; i++) {
    let [r, g, b] = colour(vmax > 0 ? v[i] / vmax : 0);
    if (mask) {
      const inside = v[i] >= threshold;
      const y = Math.floor(i / W), x = i % W;
      const edge = inside && (x === 0 || y === 0 || x === W - 1 || y === H - 1 ||
        v[i - 1] < threshold || v[i + 1] < threshold || v[i - W] < threshold || v[i + W] < threshold);
      if (edge) { r = 255; g = 255; b = 255; } else if (!inside) { r *= 0.45; g *= 0.45; b *= 0.45; }
    }
    img.data.set([r, g, b, 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
  canvas.shownValues = v;
}

function defaultToken(result) {
  const words = result.tokens.filter((t) => t.kind === "word" || t.kind === "learned");
  return (words.length ? words[words.length - 1] : result.tokens[0]).index;
}

function query(view, extra = {}) {
  const p = new URLSearchParams();
  if (view.learned) p.set("learned", view.learned); else p.set("text", view.text);
  for (const [k, v] of Object.entries(extra)) p.set(k, v);
  return p;
}

async function requestMaps(name) {
  const view = state.views[name];
  if (view.ctrl) view.ctrl.abort();  // the user typed past it: drop the request in flight
  if (!view.text && !view.learned) { view.result = null; render(); return; }
  view.seq += 1;
  const seq = view.seq;
  const ctrl = new AbortController();
  view.ctrl = ctrl;
  const p = query(view, { page: state.page, per_page: state.perPage, view: `${TAB}-${name}`, seq });
  setStatus("computing…");
  const started = performance.now();
  try {
    const response = await fetch(`/api/maps?${p}`, { signal: ctrl.signal });
    const body = await response.json();
    if (seq !== view.seq) return;  // a newer request of this view answers instead
    if (!response.ok) {
      if (response.status !== 409) setStatus(body.error || response.statusText, true);
      return;
    }
    const [h, w] = body.size;
    body.images.forEach((im) => { im.values = decode(im.maps, body.tokens.length, h, w); delete im.maps; });
    view.result = body;
    if (view.token === null || view.token >= body.tokens.length || view.lastText !== (view.learned || view.text)) {
      view.token = defaultToken(body);
    }
    view.lastText = view.learned || view.text;
    setStatus(`maps of ${body.images.length} images in ${Math.round(performance.now() - started)} ms ` +
              `(server ${body.elapsed_ms} ms)`);
    render();
  } catch (err) {
    if (err.name !== "AbortError") setStatus(String(err), true);
  } finally {
    if (view.ctrl === ctrl) view.ctrl = null;
  }
}

function renderTokens(name) {
  const view = state.views[name];
  const box = $(`tokens-${name.toLowerCase()}`);
  box.replaceChildren();
  if (!view.result) return;
  const tag = document.createElement("span");
  tag.className = "which";
  tag.textContent = name === "A" ? "tokens:" : "compare:";
  box.append(tag);
  for (const t of view.result.tokens) {
    if (!$("all-tokens").checked && !(t.kind === "word" || t.kind === "learned")) continue;
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = `chip ${t.kind}${t.index === view.token ? " selected" : ""}`;
    chip.textContent = t.text;
    chip.dataset.token = t.index;
    chip.dataset.view = name;
    chip.addEventListener("click", () => {  // its map on every tile, and large beside the image shown
      view.token = t.index;
      render();
      if (name === "A") openDetail(state.detail !== null ? state.detail : pageImages()[0].image);
    });
    box.append(chip);
  }
}

function tileFor(name, position) {
  const view = state.views[name];
  if (!view.result) return null;
  const normalize = $("normalize").value;
  const values = shown(view.result.images[position].values[view.token], view, normalize);
  return values;
}

function render() {
  renderTokens("A");
  renderTokens("B");
  const grid = $("grid");
  grid.replaceChildren();
  const images = pageImages();
  const normalize = $("normalize").value;
  const threshold = parseFloat($("threshold").value);
  const mask = $("show-mask").checked && normalize !== "none";
  const tiles = {};
  const vmax = {};
  for (const name of ["A", "B"]) {
    const view = state.views[name];
    if (!view.result) continue;
    tiles[name] = view.result.images.map((_, p) => tileFor(name, p));
    vmax[name] = normalize === "none" ? Math.max(1e-12, ...tiles[name].map((v) => v.reduce((a, b) => Math.max(a, b), 0))) : 1;
  }
  images.forEach((entry, position) => {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.image = entry.image;
    const row = document.createElement("div");
    row.className = "tiles";
    const photo = document.createElement("canvas");
    photo.className = "photo";
    drawImage(photo, entry.image);
    row.append(photo);
    for (const name of ["A", "B"]) {
      if (!tiles[name]) continue;
      const canvas = document.createElement("canvas");
      canvas.className = `map map-${name}`;
      canvas.dataset.view = name;
      paint(canvas, tiles[name][position], vmax[name], mask, threshold);
      canvas.addEventListener("mousemove", hover);
      canvas.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
      row.append(canvas);
    }
    card.append(row);
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = `${entry.image}: ${entry.prompt}`;
    caption.title = entry.prompt;
    card.append(caption);
    card.addEventListener("click", () => openDetail(entry.image));
    grid.append(card);
  });
  const commands = ["A", "B"].map((n) => state.views[n].result && state.views[n].result.command).filter(Boolean);
  $("command").textContent = commands.length ? commands.join(" && ") : "type a prompt and press Enter";
  const pages = Math.ceil(state.info.images.length / state.perPage);
  $("page-info").textContent = `page ${state.page + 1} of ${pages} (${state.info.images.length} images)` +
    (normalize === "none" && vmax.A ? `; colour 0 to ${vmax.A.toPrecision(3)} (share of attention)` : "");
}

const photos = {};
function drawImage(canvas, image) {
  const [H, W] = displaySize();
  canvas.width = W; canvas.height = H;
  const paintIt = (img) => canvas.getContext("2d").drawImage(img, 0, 0, W, H);
  if (photos[image] && photos[image].complete) { paintIt(photos[image]); return; }
  const img = photos[image] || new Image();
  photos[image] = img;
  img.addEventListener("load", () => paintIt(img), { once: true });
  if (!img.src) img.src = `/api/image.png?image=${image}`;
}

function pageImages() {
  const start = state.page * state.perPage;
  return state.info.images.slice(start, start + state.perPage);
}

function hover(event) {
  const canvas = event.currentTarget;
  const rect = canvas.getBoundingClientRect();
  const x = Math.min(canvas.width - 1, Math.floor((event.clientX - rect.left) / rect.width * canvas.width));
  const y = Math.min(canvas.height - 1, Math.floor((event.clientY - rect.top) / rect.height * canvas.height));
  const value = canvas.shownValues[y * canvas.width + x];
  const view = state.views[canvas.dataset.view];
  const token = view.result.tokens[view.token].text;
  const what = $("normalize").value === "none" ? (view.result.share ? "share" : "value") : $("normalize").value;
  const tip = $("tooltip");
  tip.textContent = `${token} (${x}, ${y}): ${what} ${value.toFixed(4)}`;
  tip.style.left = `${event.clientX + 12}px`;
  tip.style.top = `${event.clientY + 12}px`;
  tip.hidden = false;
}

function openDetail(image) {
  state.detail = image;
  const view = state.views.A;
  $("detail").hidden = false;
  if (!view.result) {
    $("detail-title").textContent = `image ${image}`;
    $("detail-map").src = `/api/image.png?image=${image}&size=256`;
    return;
  }
  const token = view.result.tokens[view.token];
  $("detail-title").textContent = `"${token.text}" of "${view.result.text}" on image ${image}`;
  $("detail-map").src = `/api/map.png?${query(view, { image, token: view.token })}`;
  if (view.result.learned) {  // a learned token shown: label its class with it
    const box = document.querySelector(`#label-tokens input[value="${CSS.escape(view.result.learned)}"]`);
    if (box) box.checked = true;
  } else if (!$("classes").value) {
    const words = view.result.tokens.filter((t) => t.kind === "word").map((t) => t.text);
    $("classes").value = [...new Set(words)].join(",");
  }
  requestLabel();
}

// the learned tokens ticked in the label panel: each labels its class with the token, as
// `ovstore label --token FILE` does
function labelTokens() {
  return [...document.querySelectorAll("#label-tokens input:checked")].map((c) => c.value);
}

async function requestLabel() {
  const tokens = labelTokens();
  if (state.detail === null || (!$("classes").value.trim() && !tokens.length)) return;
  const p = new URLSearchParams({ image: state.detail, classes: $("classes").value, view: `${TAB}-label`,
                                  seq: ++state.labelSeq });
  if (tokens.length) p.set("tokens", tokens.join(","));
  if ($("normalize").value !== "none") p.set("normalize", $("normalize").value);
  if (state.thresholdTouched) p.set("threshold", $("threshold").value);
  const seq = p.get("seq");
  const response = await fetch(`/api/label?${p}`);
  const body = await response.json();
  if (String(state.labelSeq) !== seq) return;
  if (!response.ok) { if (response.status !== 409) setStatus(body.error, true); return; }
  state.label = body;
  $("label-command").textContent = body.command;
  $("detail-label").src = `/api/label.png?${p}`;
}

function download() {
  const cards = [...document.querySelectorAll("#grid .card")];
  if (!cards.length) return;
  const [H, W] = displaySize();
  const scale = Math.max(1, Math.floor(128 / Math.max(H, W)));
  const cols = Math.min(6, cards.length);
  const perCard = cards[0].querySelectorAll("canvas").length;
  const cw = perCard * (W * scale + 4) + 8, ch = H * scale + 30;
  const out = document.createElement("canvas");
  out.width = cols * cw;
  out.height = Math.ceil(cards.length / cols) * ch + 24;
  const ctx = out.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, out.width, out.height);
  ctx.fillStyle = "#111"; ctx.font = "13px sans-serif";
  ctx.fillText($("command").textContent.slice(0, 200), 4, 16);
  cards.forEach((card, k) => {
    const x0 = (k % cols) * cw + 4, y0 = Math.floor(k / cols) * ch + 24;
    card.querySelectorAll("canvas").forEach((c, j) => ctx.drawImage(c, x0 + j * (W * scale + 4), y0, W * scale, H * scale));
    ctx.fillText(card.querySelector(".caption").textContent.slice(0, 40), x0, y0 + H * scale + 14);
  });
  out.toBlob((blob) => {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "ovstore-view.png";
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 5000);
  }, "image/png");
}

function copy(id) {
  const text = $(id).textContent;
  if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text);
  else {
    const range = document.createRange();
    range.selectNodeContents($(id));
    const sel = window.getSelection();
    sel.removeAllRanges(); sel.addRange(range);
    document.execCommand("copy");
  }
  setStatus("command copied");
}

function bindPrompt(name, input) {
  let timer = null;
  const go = () => {
    clearTimeout(timer);
    state.views[name].text = input.value.trim();
    if (name === "A") { state.views.A.learned = ""; $("learned").value = ""; }
    requestMaps(name);
  };
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
  input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(go, 350); });
}

async function start() {
  const response = await fetch("/api/info");
  state.info = await response.json();
  const info = state.info;
  $("store-info").textContent = `${info.store} — ${info.images.length} images, model ${info.model.id}, ` +
    `${info.layers.filter((l) => l.used).length} layers, ${info.calls} calls (${info.branch})`;
  $("threshold").value = info.label_defaults.threshold;
  $("threshold-value").textContent = Number(info.label_defaults.threshold).toFixed(2);
  for (const t of info.learned_tokens) {
    const option = document.createElement("option");
    option.value = t.name;
    option.textContent = `${t.name}* (${t.file})`;
    $("learned").append(option);
    const tick = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox"; box.value = t.name;
    box.addEventListener("change", requestLabel);
    tick.append(box, ` ${t.name}*`);
    $("label-tokens").append(tick);
    $("label-tokens").hidden = false;
  }
  bindPrompt("A", $("text-a"));
  bindPrompt("B", $("text-b"));
  $("learned").addEventListener("change", () => {
    state.views.A.learned = $("learned").value;
    state.views.A.text = $("learned").value ? "" : $("text-a").value.trim();
    requestMaps("A");
  });
  for (const id of ["normalize", "show-mask", "all-tokens"]) $(id).addEventListener("change", () => { render(); requestLabel(); });
  $("threshold").addEventListener("input", () => {
    state.thresholdTouched = true;
    $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
    if ($("normalize").value !== "none") $("show-mask").checked = true;
    render();
    requestLabel();
  });
  $("prev").addEventListener("click", () => { if (state.page > 0) { state.page--; refresh(); } });
  $("next").addEventListener("click", () => {
    if ((state.page + 1) * state.perPage < info.images.length) { state.page++; refresh(); }
  });
  $("download").addEventListener("click", download);
  $("copy").addEventListener("click", () => copy("command"));
  $("copy-label").addEventListener("click", () => copy("label-command"));
  $("label-go").addEventListener("click", requestLabel);
  $("classes").addEventListener("keydown", (e) => { if (e.key === "Enter") requestLabel(); });
  $("close-detail").addEventListener("click", () => { $("detail").hidden = true; state.detail = null; });
  render();
}

function refresh() {
  render();
  requestMaps("A");
  requestMaps("B");
}

start().catch((err) => setStatus(`cannot reach the server: ${err}`, true));
