// The editing page: plain JavaScript over API v1, nothing fetched from another host.
// Images are fetched with the token (when the server has one) and shown from object URLs, kept per result URL:
// results are immutable, so going back in the history shows what was fetched before and sends no request.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem("p2p-token") || "",
  source: null,        // {kind: "inversion", imageId, inversionId, prompt} or {kind: "generated", prompt, seed}
  imageId: null,
  blend: {source: new Set(), target: new Set()},
  weights: {},         // target word -> weight
  running: null,       // the edit job in flight: {id, controller: AbortController}
  history: [],
  current: null,       // the history entry shown
  blobs: new Map(),    // result URL -> object URL
};

// -- the API ---------------------------------------------------------------------------------------------------

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

async function api(method, path, body) {
  const init = {method, headers: headers(body instanceof FormData ? {} : {"Content-Type": "application/json"})};
  if (body !== undefined) init.body = body instanceof FormData ? body : JSON.stringify(body);
  const response = await fetch(path, init);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (response.status === 401) $("token-box").hidden = false;
  if (!response.ok) throw new Error((data && data.error) || response.statusText);
  return data;
}

async function objectUrl(url) {
  if (!state.blobs.has(url)) {
    const response = await fetch(url, {headers: headers()});
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    state.blobs.set(url, URL.createObjectURL(await response.blob()));
  }
  return state.blobs.get(url);
}

async function showImage(img, url) {
  img.src = await objectUrl(url);
  img.dataset.url = url;
  await img.decode().catch(() => {});
}

// Follows a job's server-sent events (read with fetch, so the token header goes along) until it ends.
async function follow(jobId, onProgress, signal) {
  const response = await fetch(`/v1/jobs/${jobId}/events`, {headers: headers(), signal});
  if (!response.ok) throw new Error(`events of job ${jobId}: ${response.status}`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const name = (block.match(/^event: (.*)$/m) || [])[1];
      const data = (block.match(/^data: (.*)$/m) || [])[1];
      if (!name || !data) continue;
      const payload = JSON.parse(data);
      if (name === "progress") onProgress(payload.step, payload.total);
      else if (name === "running") onProgress(payload.progress.step, payload.progress.total);
      else if (name === "done" || name === "failed" || name === "cancelled") {
        reader.cancel().catch(() => {});
        return payload;
      }
    }
  }
  return api("GET", `/v1/jobs/${jobId}`);
}

function say(message, bad) {
  $("status").textContent = message;
  $("status").classList.toggle("error", !!bad);
}

function progressTo(bar, label) {
  return (step, total) => {
    bar.max = Math.max(total, 1);
    bar.value = step;
    label.textContent = total ? `step ${step} / ${total}` : "";
  };
}

// -- the source ------------------------------------------------------------------------------------------------

function activeTab() { return $("tab-generate").classList.contains("active") ? "generate" : "photo"; }

function selectTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  $("pane-photo").hidden = name !== "photo";
  $("pane-generate").hidden = name !== "generate";
  if (name === "generate") useGenerated();
  else { state.source = null; refreshButtons(); }
}

function useGenerated() {
  state.source = {kind: "generated", prompt: $("generate-prompt").value, seed: Number($("seed").value),
                  steps: Number($("generate-steps").value)};
  refreshWords();
}

async function pickImage(imageId, caption) {
  state.imageId = imageId;
  state.source = null;
  if (caption) $("source-prompt").value = caption;
  await showImage($("source-image"), `/v1/images/${imageId}.png`);
  $("edit-image").removeAttribute("src");
  refreshButtons();
}

async function loadScenes() {
  const scenes = await api("GET", "/v1/scenes");
  const box = $("scenes");
  box.textContent = "";
  for (const scene of scenes) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "scene";
    button.title = scene.caption;
    button.dataset.imageId = scene.image_id;
    const img = document.createElement("img");
    img.alt = scene.caption;
    button.append(img);
    button.addEventListener("click", async () => {
      for (const b of box.children) b.classList.toggle("selected", b === button);
      await pickImage(scene.image_id, scene.caption);
    });
    box.append(button);
    img.src = await objectUrl(scene.url);
  }
}

async function upload(file) {
  const form = new FormData();
  form.append("file", file);
  say("uploading " + file.name);
  const answer = await api("POST", "/v1/images", form);
  for (const b of $("scenes").children) b.classList.remove("selected");
  await pickImage(answer.image_id, null);
  say(`uploaded ${file.name} (${answer.width} x ${answer.height})`);
}

async function invert() {
  const prompt = $("source-prompt").value.trim();
  if (!prompt) { say("describe the image in a prompt first", true); return; }
  const body = {image_id: state.imageId, prompt, method: $("method").value,
                steps: Number($("inversion-steps").value)};
  $("invert").disabled = true;
  const bar = progressTo($("inversion-progress"), $("inversion-state"));
  bar(0, 1);
  try {
    const {job_id, inversion_id} = await api("POST", "/v1/inversions", body);
    const job = await follow(job_id, bar);
    if (job.status !== "done") throw new Error(job.error || job.status);
    bar(1, 1);
    $("inversion-state").textContent = job.result.hit ? "inverted before: reused" : "inverted";
    state.source = {kind: "inversion", imageId: state.imageId, inversionId: inversion_id, prompt};
    if (!$("target").value) $("target").value = prompt;
    await refreshWords();
    say("inverted; type a target prompt and edit");
  } catch (e) {
    say("inversion: " + e.message, true);
  } finally {
    refreshButtons();
  }
}

// -- words, sliders, blend -------------------------------------------------------------------------------------

function sourcePrompt() { return state.source ? state.source.prompt : ""; }

async function wordsOf(prompt) {
  if (!prompt) return [];
  const answer = await api("GET", "/v1/tokens?prompt=" + encodeURIComponent(prompt));
  return answer.words.filter((w) => w.tokens.length > 0);
}

function wordChip(side, word, withWeight) {
  const chip = document.createElement("div");
  chip.className = "word" + (state.blend[side].has(word) ? " blend" : "");
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = word;
  button.title = "click to blend this word's region";
  button.dataset.word = word;
  button.addEventListener("click", () => {
    const set = state.blend[side];
    set.has(word) ? set.delete(word) : set.add(word);
    chip.classList.toggle("blend", set.has(word));
    scheduleEdit();
  });
  chip.append(button);
  if (withWeight) {
    const slider = document.createElement("input");
    Object.assign(slider, {type: "range", min: "-1", max: "4", step: "0.1", value: String(state.weights[word] ?? 1)});
    slider.dataset.word = word;
    slider.className = "weight-slider";
    const shown = document.createElement("span");
    shown.className = "weight";
    shown.textContent = "x" + Number(slider.value).toFixed(1);
    slider.addEventListener("input", () => {
      state.weights[word] = Number(slider.value);
      shown.textContent = "x" + Number(slider.value).toFixed(1);
      scheduleEdit();
    });
    chip.append(slider, shown);
  }
  return chip;
}

async function refreshWords() {
  try {
    const [source, target] = await Promise.all([wordsOf(sourcePrompt()), wordsOf($("target").value.trim())]);
    const keep = (set, words) => { for (const w of [...set]) if (!words.includes(w)) set.delete(w); };
    keep(state.blend.source, source.map((w) => w.word));
    keep(state.blend.target, target.map((w) => w.word));
    $("source-words").replaceChildren(...uniq(source).map((w) => wordChip("source", w, false)));
    $("target-words").replaceChildren(...uniq(target).map((w) => wordChip("target", w, true)));
  } catch (e) {
    say(e.message, true);
  }
  refreshButtons();
}

function uniq(words) { return [...new Set(words.map((w) => w.word))]; }

function refreshButtons() {
  $("invert").disabled = !state.imageId;
  $("run-edit").disabled = !state.source || !$("target").value.trim();
}

// -- editing ---------------------------------------------------------------------------------------------------

function editBody() {
  const target = $("target").value.trim();
  const source = state.source;
  const sameLength = target.split(" ").length === source.prompt.split(" ").length;
  let mode = $("mode").value;
  if (mode === "auto") mode = target === source.prompt ? "reweight" : (sameLength ? "replace" : "refine");
  const equalizer = {};
  for (const [word, weight] of Object.entries(state.weights)) {
    if (weight !== 1 && target.split(" ").includes(word)) equalizer[word] = weight;
  }
  const controller = {mode, cross_steps: Number($("cross").value), self_steps: Number($("self").value)};
  if (Object.keys(equalizer).length) controller.equalizer = equalizer;
  if (mode === "reweight" && !controller.equalizer) controller.mode = "replace";
  const body = {controller, maps: $("maps").checked};
  if (state.blend.source.size && state.blend.target.size) {
    body.blend = [[...state.blend.source], [...state.blend.target]];
  }
  if (source.kind === "inversion") Object.assign(body, {inversion_id: source.inversionId, targets: [target]});
  else Object.assign(body, {prompts: [source.prompt, target], seed: source.seed, steps: source.steps});
  return body;
}

let pending = null;
function scheduleEdit() {  // sliders and word clicks re-edit once they rest (from the source's edit cache)
  $("cross-value").textContent = Number($("cross").value).toFixed(2);
  $("self-value").textContent = Number($("self").value).toFixed(2);
  if (!state.source || !$("target").value.trim() || !state.history.length) return;
  clearTimeout(pending);
  pending = setTimeout(runEdit, 250);
}

async function runEdit() {
  if (!state.source) return;
  if (state.running) {  // a newer edit replaces the one in flight
    state.running.controller.abort();
    api("DELETE", `/v1/jobs/${state.running.id}`).catch(() => {});
  }
  const body = editBody();
  const bar = progressTo($("edit-progress"), $("edit-state"));
  bar(0, 1);
  const controller = new AbortController();
  let jobId = null;
  try {
    ({job_id: jobId} = await api("POST", "/v1/edits", body));
    state.running = {id: jobId, controller};
    const job = await follow(jobId, bar, controller.signal);
    if (job.status !== "done") throw new Error(job.error || job.status);
    const entry = {jobId, body, result: job.result, label: body.targets ? body.targets[0] : body.prompts[1]};
    state.history.push(entry);
    await show(entry);
    say(`edit done (${job.result.cache === "hit" ? "re-edited from the cache" : "source " + job.result.cache})`);
  } catch (e) {
    if (e.name !== "AbortError") say("edit: " + e.message, true);
  } finally {
    if (state.running && state.running.id === jobId) state.running = null;
  }
}

async function show(entry) {
  state.current = entry;
  const images = entry.result.images;
  await showImage($("source-image"), images[0]);
  await showImage($("edit-image"), images[images.length - 1]);
  $("edit-image").dataset.job = entry.jobId;
  $("edit-caption").textContent = "edit: " + entry.label;
  clearOverlays();
  renderHistory();
  renderMaps(entry);
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  state.history.forEach((entry, i) => {
    const li = document.createElement("li");
    li.className = entry === state.current ? "current" : "";
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.job = entry.jobId;
    const img = document.createElement("img");
    img.alt = entry.label;
    objectUrl(entry.result.images[entry.result.images.length - 1]).then((u) => { img.src = u; });
    const c = entry.body.controller;
    const weights = Object.entries(c.equalizer || {}).map(([w, x]) => `, ${w} x${x}`).join("");
    const blend = entry.body.blend ? `, blend ${entry.body.blend.map((ws) => ws.join("+")).join(" / ")}` : "";
    button.append(img, `${i + 1}. ${entry.label} (${c.mode}, cross ${c.cross_steps}, self ${c.self_steps}${weights}${blend})`);
    button.addEventListener("click", () => show(entry));  // going back re-runs nothing
    li.append(button);
    list.append(li);
  });
  $("open-maps").disabled = !state.history.length;
}

// -- attention maps --------------------------------------------------------------------------------------------

function renderMaps(entry) {
  const grid = $("maps-grid");
  grid.replaceChildren();
  const maps = entry.result.maps;
  if (!maps) { grid.textContent = "this edit kept no maps (tick 'attention maps')"; return; }
  maps.prompts.forEach((words, p) => {
    const row = document.createElement("div");
    row.className = "maps-row";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p === 0 ? "source" : `target ${p}`;
    row.append(label);
    for (const w of words) {
      const tile = document.createElement("button");
      tile.type = "button";
      tile.className = "map-tile";
      tile.dataset.prompt = String(p);
      tile.dataset.word = w.word;
      const img = document.createElement("img");
      img.alt = w.word;
      tile.append(img, w.word);
      objectUrl(w.png).then((u) => { img.src = u; });
      tile.addEventListener("click", () => overlay(tile, p, w));
      row.append(tile);
    }
    grid.append(row);
  });
}

function clearOverlays() {
  for (const id of ["source-overlay", "edit-overlay"]) {
    const canvas = $(id);
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    delete canvas.dataset.word;
  }
  for (const t of document.querySelectorAll(".map-tile.active")) t.classList.remove("active");
}

function ramp(v) {  // blue, cyan, yellow, red: the ramp of p2p-engine's map pictures
  const c = (x) => Math.max(0, Math.min(1, 1.5 - Math.abs(4 * v - x)));
  return [c(3), c(2), c(1)].map((x) => Math.round(255 * x));
}

async function overlay(tile, p, w) {  // the word's map, coloured, over the image of its prompt
  const wasActive = tile.classList.contains("active");
  clearOverlays();
  if (wasActive) return;
  tile.classList.add("active");
  const img = new Image();
  img.src = await objectUrl(w.png);
  await img.decode();
  const canvas = $(p === 0 ? "source-overlay" : "edit-overlay");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    const [r, g, b] = ramp(pixels.data[i] / 255);
    pixels.data.set([r, g, b, 255], i);
  }
  ctx.putImageData(pixels, 0, 0);
  canvas.dataset.word = w.word;
}

// -- start -----------------------------------------------------------------------------------------------------

async function connect() {
  try {
    const health = await fetch("/healthz").then((r) => r.json());
    $("model").textContent = `model ${health.model} (${health.family}, ${health.image_size} px)`;
    await loadScenes();
    say("ready");
  } catch (e) {
    say(e.message, true);
  }
}

function start() {
  $("token").value = state.token;
  $("token").addEventListener("change", () => {
    state.token = $("token").value.trim();
    sessionStorage.setItem("p2p-token", state.token);
    connect();
  });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => selectTab(tab.dataset.tab));
  $("file").addEventListener("change", () => $("file").files[0] && upload($("file").files[0]).catch((e) => say(e.message, true)));
  $("invert").addEventListener("click", invert);
  $("run-edit").addEventListener("click", runEdit);
  for (const id of ["generate-prompt", "seed", "generate-steps"]) {
    $(id).addEventListener("change", () => activeTab() === "generate" && useGenerated());
  }
  let typing = null;
  $("target").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(refreshWords, 200); });
  $("cross").addEventListener("input", scheduleEdit);
  $("self").addEventListener("input", scheduleEdit);
  $("open-maps").addEventListener("click", () => { $("maps-grid").hidden = !$("maps-grid").hidden; });
  connect();
}

document.addEventListener("DOMContentLoaded", start);
