// Playground page: an example client of the public HTTP API (GET /v1/models, POST /v1/screenshots as
// soon as a screenshot is chosen, POST /v1/chat/completions with return_attention). Vanilla JS module,
// no build step; nothing is fetched from outside the server.
import { ApiError, groundingBody, request, screenshotBody } from "/static/api.js";
import { drawHeatmap, drawPoints, fmtScore, sizeCanvas } from "/static/draw.js";

const $ = (id) => document.getElementById(id);
const TRANSITIONAL = new Set(["loading", "unloading", "draining"]);
const state = {
  apiKey: "",            // page memory only: never written to storage, cookies or the URL
  models: [],
  pending: {},           // model id -> "loading" | "unloading" while our own request runs
  image: null,           // {dataUrl, name, width, height, bitmap}
  result: null,          // {points, attention, grid} of the last answer, in original-image pixels
  highlight: -1,         // index into result.points under the pointer or keyboard focus
  inflight: null,        // AbortController of the running completion
  prefill: null,         // AbortController of the running POST /v1/screenshots
  pollTimer: 0,
};

// Every call carries the key typed into the page, if any.
const api = (method, path, body, signal) => request(method, path, { body, signal, key: state.apiKey });

// ---------- messages ----------
function showError(title, err, source = "action") {
  const box = $("error");
  box.dataset.source = source;   // lets a later successful model listing clear its own error
  box.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = title;
  const msg = document.createElement("p");
  msg.className = "error-message";
  msg.textContent = err instanceof Error ? err.message : String(err);
  box.append(strong, msg);
  if (err instanceof ApiError && (err.status || err.code)) {
    const bits = [];
    if (err.status) bits.push(`HTTP ${err.status}`);
    if (err.code) bits.push(err.code);
    if (err.param) bits.push(`param: ${err.param}`);
    if (err.retryAfter) bits.push(`retry after ${err.retryAfter} s`);
    const detail = document.createElement("p");
    detail.className = "error-detail";
    detail.textContent = bits.join(" · ");
    box.append(detail);
    box.dataset.code = err.code || "";
    box.dataset.status = String(err.status || "");
  } else {
    box.dataset.code = "client";
    box.dataset.status = "";
  }
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" });
}

function clearError() {
  const box = $("error");
  box.hidden = true;
  box.replaceChildren();
  box.dataset.code = "";
  box.dataset.status = "";
  box.dataset.source = "";
}

// ---------- models ----------
function fmtBytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}

const modelStatus = (m) => (m && (state.pending[m.id] || m.status || m.state)) || "unknown";

async function refreshModels(showErrors) {
  try {
    const data = await api("GET", "/v1/models");
    state.models = Array.isArray(data.data) ? data.data : [];
    renderModels();
    if ($("error").dataset.source === "models") clearError();
  } catch (e) {
    $("model-badge").textContent = "unreachable";
    $("model-status").dataset.status = "error";
    if (showErrors) showError("Could not list models", e, "models");
  }
  schedulePoll();
}

function schedulePoll() {
  clearTimeout(state.pollTimer);
  // Poll fast while a model changes state so the badge follows loading -> loaded.
  const busy = state.models.some((m) => TRANSITIONAL.has(modelStatus(m)));
  state.pollTimer = setTimeout(() => { if (!document.hidden) refreshModels(false); else schedulePoll(); }, busy ? 1000 : 5000);
}

function renderModels() {
  const sel = $("model");
  const keep = sel.value;
  sel.replaceChildren();
  for (const m of state.models) {
    const opt = document.createElement("option");
    opt.value = m.id;
    opt.textContent = `${m.id} (${modelStatus(m)})`;
    sel.append(opt);
  }
  if (!state.models.length) {
    const opt = document.createElement("option");
    opt.value = "";
    opt.textContent = "No models";
    sel.append(opt);
  }
  if (state.models.some((m) => m.id === keep)) sel.value = keep;
  renderModelStatus();
}

function renderModelStatus() {
  const m = state.models.find((x) => x.id === $("model").value);
  const status = m ? modelStatus(m) : "unknown";
  $("model-status").dataset.status = status;
  $("model-badge").textContent = status;
  const mem = (m && m.memory) || {};
  const parts = [];
  if (m && Array.isArray(m.replicas)) {      // a model served from several GPUs (`devices`)
    const gpus = (rs) => rs.reduce((n, r) => n + (Array.isArray(r.devices) ? r.devices.length : 1), 0);
    parts.push(`${gpus(m.replicas.filter((r) => r.status === "loaded"))}/${gpus(m.replicas)} GPUs loaded`);
  }
  if (mem.weights_bytes) parts.push(`weights ${fmtBytes(mem.weights_bytes)}`);
  if (mem.active_bytes) parts.push(`active ${fmtBytes(mem.active_bytes)}`);
  if (mem.peak_bytes) parts.push(`peak ${fmtBytes(mem.peak_bytes)}`);
  if (mem.cache_bytes) parts.push(`cache ${fmtBytes(mem.cache_bytes)}`);
  if (mem.helper_weights_bytes) {            // a vision split's helper GPUs, beside the workers' own
    parts.push(`helper GPUs: weights ${fmtBytes(mem.helper_weights_bytes)}, active ${fmtBytes(mem.helper_active_bytes || 0)}`);
  }
  if (m && m.last_error && status === "failed") parts.push(`error: ${m.last_error}`);
  $("model-memory").textContent = parts.join(" · ");
  $("load-btn").disabled = !m || status === "loaded" || TRANSITIONAL.has(status);
  $("unload-btn").disabled = !m || status === "unloaded" || TRANSITIONAL.has(status);
}

async function changeModel(verb) {
  const id = $("model").value;
  if (!id) return;
  clearError();
  state.pending[id] = verb === "load" ? "loading" : "unloading";
  renderModels();
  try {
    // Ids may hold '/' (org/name): the route takes the rest of the path, so keep the slashes.
    const path = `/v1/models/${id.split("/").map(encodeURIComponent).join("/")}`;
    await (verb === "load" ? api("POST", `${path}/load`, {}) : api("DELETE", path));
  } catch (e) {
    showError(`Could not ${verb} ${id}`, e);
  } finally {
    delete state.pending[id];
    await refreshModels(false);
  }
}

// ---------- image input ----------
// Magic bytes of the formats the API accepts; anything else is refused before upload.
function sniffImage(bytes) {
  const at = (i, s) => [...s].every((c, k) => bytes[i + k] === c.charCodeAt(0));
  if (bytes[0] === 0x89 && at(1, "PNG")) return "image/png";
  if (bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff) return "image/jpeg";
  if (at(0, "RIFF") && at(8, "WEBP")) return "image/webp";
  return null;
}

const readAsDataURL = (blob) => new Promise((resolve, reject) => {
  const r = new FileReader();
  r.onload = () => resolve(r.result);
  r.onerror = () => reject(r.error);
  r.readAsDataURL(blob);
});

async function acceptFile(file) {
  if (!file) return;
  clearError();
  const name = file.name || "pasted image";
  try {
    const buf = new Uint8Array(await file.arrayBuffer());
    const mime = sniffImage(buf);
    if (!mime) throw new Error(`"${name}" is not a PNG, JPEG or WebP image.`);
    const blob = new Blob([buf], { type: mime });
    let bitmap;
    try { bitmap = await createImageBitmap(blob); } catch {
      throw new Error(`"${name}" looks like ${mime} but cannot be decoded (corrupt or truncated file?).`);
    }
    state.image = { dataUrl: await readAsDataURL(blob), name, width: bitmap.width, height: bitmap.height, bitmap };
  } catch (e) {
    state.image = null;
    resetResult();
    showStage(false);
    $("file-name").textContent = "";
    prefill();   // clears what it said about the previous image
    $("dropzone").dataset.hasImage = "0";
    showError("Invalid image", e);
    return;
  }
  if (state.inflight) state.inflight.abort();   // its answer belongs to the previous image
  $("file-name").textContent = `${name} · ${state.image.width} × ${state.image.height}`;
  $("dropzone").dataset.hasImage = "1";
  resetResult();
  drawImage();
  $("instruction").focus();
  prefill();
}

// While the instruction is being typed, the server already runs the screenshot through the model and
// keeps its state (POST /v1/screenshots): the question then takes a fraction of a whole request.
// Best effort: a failure here shows nothing, since the question itself reports any real problem.
async function prefill() {
  const status = $("prefill-status");
  if (state.prefill) state.prefill.abort();
  status.textContent = "";
  status.dataset.kept = "";
  if (!state.image) return;
  const ctl = new AbortController();
  state.prefill = ctl;
  const body = screenshotBody({ model: $("model").value, imageUrl: state.image.dataUrl, profile: currentProfile() });
  try {
    const shot = await api("POST", "/v1/screenshots", body, ctl.signal);
    if (state.prefill !== ctl) return;
    status.dataset.kept = shot.kept ? "1" : "0";
    status.textContent = shot.kept ? `kept for questions (${shot.cached_tokens} tokens)` : "";
    status.title = shot.kept ? "The next question about this screenshot runs from its kept state." : (shot.not_kept || "");
  } catch (e) {
    if (e.name !== "AbortError" && state.prefill === ctl) status.dataset.kept = "0";
  } finally {
    if (state.prefill === ctl) state.prefill = null;
  }
}

const currentProfile = () => (document.querySelector('input[name="profile"]:checked') || {}).value || "balanced";

// ---------- drawing ----------
function showStage(on) {
  $("stack").hidden = !on;
  $("stage-empty").hidden = on;
  $("stage").dataset.state = on ? "image" : "empty";
}

function drawImage() {
  const { width: w, height: h, bitmap } = state.image;
  sizeCanvas($("image-canvas"), w, h).drawImage(bitmap, 0, 0);
  sizeCanvas($("heatmap"), w, h);
  sizeCanvas($("points-canvas"), w, h);
  $("stage").style.setProperty("--aspect", `${w} / ${h}`);
  $("stage").style.setProperty("--ratio", String(w / h));
  showStage(true);
}

// Marker size constant on screen: 4.5 CSS pixels, converted to canvas (original-image) pixels.
function redrawPoints() {
  const c = $("points-canvas");
  const shown = c.getBoundingClientRect().width || c.width;
  const unit = Math.max(2, 4.5 * (c.width / shown));
  drawPoints(c, (state.result && state.result.points) || [], { unit, highlight: state.highlight });
  const pts = (state.result && state.result.points) || [];
  c.dataset.pointsDrawn = String(pts.length);
  c.setAttribute("aria-label", pts.length
    ? `Best point at x ${Math.round(pts[0].x)}, y ${Math.round(pts[0].y)}, score ${fmtScore(pts[0].score)}; ${pts.length} candidates`
    : "Predicted points");
}

// ---------- results ----------
function resetResult() {
  state.result = null;
  state.highlight = -1;
  for (const id of ["heatmap", "points-canvas"]) {
    const c = $(id);
    sizeCanvas(c, c.width, c.height);
  }
  $("heatmap").dataset.drawn = "0";
  $("points-canvas").dataset.pointsDrawn = "0";
  $("points").replaceChildren();
  $("action-text").textContent = "—";
  $("copy-btn").disabled = true;
  for (const id of ["latency", "image-size", "resized-size", "grid-size", "usage"]) $(id).textContent = "—";
}

const fmtSize = (s) => (Array.isArray(s) && s.length === 2 ? `${s[0]} × ${s[1]} px` : "—");

function showResult(data, ms) {
  const msg = data.choices && data.choices[0] && data.choices[0].message;
  const g = msg && msg.grounding;
  if (!g || !Array.isArray(g.points)) throw new ApiError(0, "bad_response", "The response has no grounding field.");
  const [w, h] = g.image_size || [state.image.width, state.image.height];
  const points = g.points.map((p) => ({
    x: p.x ?? p.nx * w, y: p.y ?? p.ny * h, nx: p.nx ?? p.x / w, ny: p.ny ?? p.y / h, score: Number(p.score) || 0,
  }));
  state.result = { points };
  state.highlight = -1;
  $("action-text").textContent = msg.content || "—";
  $("copy-btn").disabled = !msg.content;
  $("latency").textContent = `${ms.toFixed(0)} ms`;
  $("image-size").textContent = fmtSize(g.image_size);
  $("resized-size").textContent = fmtSize(g.resized_size);
  $("grid-size").textContent = Array.isArray(g.grid) ? `${g.grid[0]} × ${g.grid[1]} tokens` : "—";
  const u = data.usage || {};
  const cached = (u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens) || 0;
  $("usage").textContent = u.total_tokens != null
    ? `${u.prompt_tokens} prompt${cached ? ` (${cached} cached)` : ""} · ${u.total_tokens} total` : "—";
  const drawn = drawHeatmap($("heatmap"), g.attention, g.grid);
  $("heatmap").dataset.drawn = drawn ? "1" : "0";
  $("heatmap-toggle").disabled = !drawn;
  redrawPoints();
  renderPointList(points);
  $("stage").dataset.state = "result";
}

function renderPointList(points) {
  const list = $("points");
  list.replaceChildren();
  const top = Math.max(...points.map((p) => p.score), 1e-12);   // bars are relative to the best
  points.forEach((p, i) => {
    const li = document.createElement("li");
    li.tabIndex = 0;
    li.className = i === 0 ? "best" : "";
    Object.assign(li.dataset, { rank: i + 1, x: p.x, y: p.y, score: p.score });
    li.innerHTML = `<span class="rank"></span><span class="coords"></span><span class="norm muted"></span>`
      + `<span class="score"><span class="track"><span class="bar"></span></span><span class="val"></span></span>`;
    li.querySelector(".rank").textContent = i + 1;
    li.querySelector(".coords").textContent = `(${Math.round(p.x)}, ${Math.round(p.y)})`;
    li.querySelector(".norm").textContent = `${p.nx.toFixed(3)}, ${p.ny.toFixed(3)}`;
    li.querySelector(".bar").style.width = `${Math.max(0, Math.min(1, p.score / top)) * 100}%`;
    li.querySelector(".val").textContent = fmtScore(p.score, 3);
    li.setAttribute("aria-label", `Rank ${i + 1}: x ${Math.round(p.x)}, y ${Math.round(p.y)}, score ${fmtScore(p.score, 3)}`);
    const on = () => { state.highlight = i; redrawPoints(); };
    const off = () => { state.highlight = -1; redrawPoints(); };
    li.addEventListener("mouseenter", on);
    li.addEventListener("focus", on);
    li.addEventListener("mouseleave", off);
    li.addEventListener("blur", off);
    list.append(li);
  });
}

async function locate() {
  clearError();
  if (!state.image) { showError("No screenshot", "Choose, drop or paste a screenshot first."); return; }
  const instruction = $("instruction").value.trim();
  if (!instruction) { showError("No instruction", "Type what to locate, e.g. “click the Save button”."); $("instruction").focus(); return; }
  if (state.inflight) state.inflight.abort();
  const ctl = new AbortController();
  state.inflight = ctl;
  const profile = currentProfile();
  const topK = Math.max(1, Math.min(20, parseInt($("top-k").value, 10) || 5));
  const body = groundingBody({ model: $("model").value, imageUrl: state.image.dataUrl, instruction, profile, topK });
  resetResult();   // stale points from another instruction would mislead while this one runs
  setBusy(true);
  const t0 = performance.now();
  try {
    const data = await api("POST", "/v1/chat/completions", body, ctl.signal);
    showResult(data, performance.now() - t0);
  } catch (e) {
    if (e.name === "AbortError") return;
    showError("Request failed", e);
  } finally {
    if (state.inflight === ctl) { state.inflight = null; setBusy(false); }
  }
  refreshModels(false);   // a job may have loaded its model on demand
}

function setBusy(on) {
  $("busy").hidden = !on;
  $("locate-btn").disabled = on;
  $("stage").setAttribute("aria-busy", on ? "true" : "false");
}

async function copyAction() {
  const text = $("action-text").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch {   // clipboard API needs a secure context; fall back to a hidden textarea
    const ta = Object.assign(document.createElement("textarea"), { value: text });
    document.body.append(ta);
    ta.select();
    document.execCommand("copy");
    ta.remove();
  }
  $("copy-status").textContent = "Copied";
  setTimeout(() => { $("copy-status").textContent = ""; }, 1500);
}

// ---------- wiring ----------
function wire() {
  $("api-key").addEventListener("input", (e) => { state.apiKey = e.target.value.trim(); });
  $("api-key").addEventListener("change", () => refreshModels(true));
  $("refresh-models").addEventListener("click", () => { clearError(); refreshModels(true); });
  $("model").addEventListener("change", () => { renderModelStatus(); prefill(); });
  $("load-btn").addEventListener("click", () => changeModel("load"));
  $("unload-btn").addEventListener("click", () => changeModel("unload"));

  const dz = $("dropzone");
  $("file-input").addEventListener("change", (e) => { acceptFile(e.target.files[0]); e.target.value = ""; });
  dz.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file-input").click(); }
  });
  // Dropping anywhere on the page takes the image (and keeps the browser from navigating to the file).
  window.addEventListener("dragover", (e) => { e.preventDefault(); dz.classList.add("dragging"); });
  window.addEventListener("dragleave", (e) => { if (!e.relatedTarget) dz.classList.remove("dragging"); });
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    dz.classList.remove("dragging");
    acceptFile(e.dataTransfer && e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...((e.clipboardData && e.clipboardData.items) || [])].find((it) => it.kind === "file" && it.type.startsWith("image/"));
    if (item) { e.preventDefault(); acceptFile(item.getAsFile()); }
  });

  for (const radio of document.querySelectorAll('input[name="profile"]')) radio.addEventListener("change", prefill);
  $("locate-form").addEventListener("submit", (e) => { e.preventDefault(); locate(); });
  $("instruction").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); locate(); }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !e.defaultPrevented) { e.preventDefault(); locate(); }
  });

  const applyHeatmap = () => {
    const c = $("heatmap");
    c.hidden = !$("heatmap-toggle").checked;
    c.style.opacity = $("heatmap-opacity").value;
  };
  $("heatmap-toggle").addEventListener("change", applyHeatmap);
  $("heatmap-opacity").addEventListener("input", applyHeatmap);
  applyHeatmap();
  $("copy-btn").addEventListener("click", copyAction);
  new ResizeObserver(() => { if (state.result) redrawPoints(); }).observe($("stack"));
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshModels(false); });
}

wire();
resetResult();
refreshModels(true);
