// ddpm ui: the page. Plain JavaScript, no library, no network beyond this server. Text from the
// server or the user is only ever set with textContent (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
let state = null;        // GET /api/state
let result = null;       // the last "done" event
let running = null;      // {model} while a request draws
let process = null;      // curves of the forward view's process

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

function option(select, value, text) {
  select.append(element("option", {value: String(value)}, text));
}

function showError(message) {
  $("page-error").textContent = message || "";
}

async function getJSON(url, init) {
  const response = await fetch(url, init);
  const body = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
  if (!response.ok) throw new Error(body.error || `${response.status}`);
  return body;
}

// ------------------------------------------------------------------------------ tabs

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === name));
  }
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
  if (name === "forward" && !process) loadProcess();
}

// ------------------------------------------------------------------------------ sample view

function currentModel() {
  return state.models[Number($("model").value)];
}

function fillModelControls() {
  const model = currentModel();
  const classes = model ? model.num_classes : 0;
  $("model-description").textContent = model ? model.description : "No model loaded: start 'ddpm ui RUN_OR_MODEL'.";
  $("sample-button").disabled = !model;
  const label = $("label");
  label.replaceChildren(element("option", {value: ""}, "classes in turn"));
  for (let c = 0; c < classes; c++) option(label, c, String(c));
  for (const node of document.querySelectorAll(".for-classes")) node.hidden = !classes;
  for (const node of document.querySelectorAll(".for-text")) node.hidden = !(model && model.text);
  for (const node of document.querySelectorAll(".for-guidance")) node.hidden = !(classes || (model && model.text));
  fillStepsPlaceholder();
}

function fillStepsPlaceholder() {
  const model = currentModel();
  const sampler = $("sampler").value;
  const steps = model ? model.default_steps[sampler] : null;
  $("steps").disabled = sampler === "dpm-adaptive";
  $("steps").placeholder = steps === null || steps === undefined ? "its own" : `default ${steps}`;
  if (model) $("steps").max = String(model.timesteps);
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function sampleRequest() {
  const model = currentModel();
  const request = {
    model: model.index, sampler: $("sampler").value, steps: $("steps").disabled ? null : numberOrNull("steps"),
    seed: numberOrNull("seed") ?? 0, num_images: numberOrNull("num-images") ?? 4,
    batch_size: numberOrNull("batch-size") ?? 4,
  };
  if (model.num_classes) request.label = numberOrNull("label");
  if (model.num_classes || model.text) request.guidance_scale = numberOrNull("guidance");
  if (model.text) {
    request.prompt = $("prompt").value;
    request.negative_prompt = $("negative-prompt").value;
  }
  return request;
}

function setSampleState(name, message) {
  document.body.dataset.sample = name;
  $("sample-status").textContent = message;
  $("sample-button").disabled = name === "sampling" || !currentModel();
  $("cancel-button").disabled = name !== "sampling";
}

async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield {name, data: JSON.parse(data)};
    }
  }
}

async function startSampling(event) {
  event.preventDefault();
  showError("");
  const request = sampleRequest();
  $("images").replaceChildren();
  $("after").hidden = true;
  $("progress").value = 0;
  result = null;
  setSampleState("sampling", "starting…");
  let response;
  try {
    response = await fetch("/api/sample", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(request),
    });
  } catch (error) {
    setSampleState("error", `the server cannot be reached: ${error.message}`);
    return;
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    setSampleState(response.status === 409 ? "busy" : "error", body.error || `${response.status}`);
    return;
  }
  running = {model: request.model};
  try {
    for await (const {name, data} of serverSentEvents(response)) handleEvent(name, data, request);
  } catch (error) {
    setSampleState("error", `the stream broke off: ${error.message}`);
  }
  running = null;
  if (document.body.dataset.sample === "sampling") setSampleState("error", "the stream ended early");
}

function handleEvent(name, data, request) {
  if (name === "progress") {
    $("progress").value = data.fraction;
    if (data.step) {
      const where = request.num_images > data.batch ? `, images ${data.first + 1}–${data.first + data.batch}` : "";
      $("sample-status").textContent = `step ${data.step}, t = ${data.t}${where}`;
    }
    if (data.preview) {
      $("preview").src = data.preview;
      $("preview-box").hidden = false;
    }
  } else if (name === "images") {
    data.images.forEach((url, i) => {
      const index = data.first + i;
      $("images").append(element("img", {src: url, class: "pixels sample", "data-index": String(index),
                                         alt: `sample ${index}`}));
    });
  } else if (name === "done") {
    showResult(data);
    setSampleState("done", `${data.count} images, ${data.nfe} network evaluations each`);
  } else if (name === "cancelled") {
    $("preview-box").hidden = true;
    setSampleState("cancelled", "cancelled");
  } else if (name === "error") {
    $("preview-box").hidden = true;
    setSampleState("error", data.error);
  }
}

function showResult(data) {
  result = data;
  $("preview-box").hidden = true;
  $("progress").value = 1;
  data.labels.forEach((label, i) => {
    const image = document.querySelector(`#images img[data-index="${i}"]`);
    const prompt = data.prompts ? ` “${data.prompts[i]}”` : "";
    if (image) image.title = `image ${i}${label >= 0 ? `, class ${label}` : ""}${prompt}`;
  });
  $("command").textContent = data.command;
  $("download-grid").href = data.grid;
  $("download-gif").href = data.gif;
  const scrubber = $("scrubber");
  scrubber.max = String(data.frames.length - 1);
  scrubber.value = "0";
  showFrame();
  $("after").hidden = false;
}

function showFrame() {
  if (!result) return;
  const k = Number($("scrubber").value);
  $("frame-xt").src = `${result.frames_url}/${k}/x_t.png`;
  $("frame-x0").src = `${result.frames_url}/${k}/pred_x0.png`;
  $("scrub-label").textContent = `frame ${k + 1} of ${result.frames.length}: t = ${result.frames[k].t}`;
}

async function cancelSampling() {
  if (!running) return;
  $("sample-status").textContent = "cancelling…";
  try {
    await getJSON("/api/cancel", {method: "POST", headers: {"Content-Type": "application/json"},
                                  body: JSON.stringify({model: running.model})});
  } catch (error) {
    showError(error.message);
  }
}

// ------------------------------------------------------------------------------ forward view

async function loadProcess() {
  try {
    process = await getJSON(`/api/process/${Number($("process").value)}`);
  } catch (error) {
    showError(error.message);
    return;
  }
  $("t-slider").max = String(process.T);
  if (Number($("t-slider").value) > process.T) $("t-slider").value = String(process.T);
  for (const figure of document.querySelectorAll(".plot")) drawPlot(figure);
  showForward();
}

function forwardImageKey() {
  const source = $("image-source").value;
  return source === "data" ? `d${Number($("data-index").value) || 0}` : source;
}

function showForward() {
  if (!process) return;
  const t = Number($("t-slider").value);
  const query = `process=${Number($("process").value)}&image=${encodeURIComponent(forwardImageKey())}` +
    `&seed=${Number($("noise-seed").value) || 0}`;
  $("t-value").textContent = String(t);
  $("x0-image").src = `/api/forward.png?${query}&t=0`;
  $("xt-image").src = `/api/forward.png?${query}&t=${t}`;
  const values = $("forward-values");
  if (t === 0) {
    values.textContent = "t = 0: the data x₀ itself";
  } else {
    const abar = process.alphas_cumprod[t - 1];
    values.textContent = `t = ${t}:  ᾱ = ${fmt(abar)},  √ᾱ = ${fmt(Math.sqrt(abar))},  √(1 − ᾱ) = ` +
      `${fmt(Math.sqrt(1 - abar))},  SNR = ${fmt(process.snr[t - 1])},  β̃ = ${fmt(process.posterior_variance[t - 1])},` +
      `  β = ${fmt(process.betas[t - 1])}`;
  }
  for (const figure of document.querySelectorAll(".plot")) moveMarker(figure, t);
}

function fmt(x) {
  if (x === 0) return "0";
  return Math.abs(x) >= 0.01 && Math.abs(x) < 1000 ? x.toFixed(4) : x.toExponential(2);
}

const SVG = "http://www.w3.org/2000/svg";
const BOX = {left: 52, right: 350, top: 12, bottom: 172};

function svg(tag, attributes, text = "") {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text) node.textContent = text;
  return node;
}

function scaleOf(figure) {
  const values = process[figure.dataset.curve];
  const second = figure.dataset.second ? process[figure.dataset.second] : [];
  const log = figure.dataset.scale === "log";
  const finite = [...values, ...second].filter((v) => Number.isFinite(v) && (!log || v > 0));
  let lo = log ? Math.log10(Math.min(...finite)) : Math.min(0, ...finite);
  let hi = log ? Math.log10(Math.max(...finite)) : Math.max(...finite);
  if (hi === lo) hi = lo + 1;
  const y = (v) => {
    const u = log ? Math.log10(Math.max(v, 10 ** lo)) : v;
    return BOX.bottom - (u - lo) / (hi - lo) * (BOX.bottom - BOX.top);
  };
  const x = (t) => BOX.left + (t - 1) / Math.max(1, process.T - 1) * (BOX.right - BOX.left);
  return {x, y, lo, hi, log};
}

function line(values, s, attributes) {
  const stride = Math.max(1, Math.floor(values.length / 400));
  const points = [];
  for (let i = 0; i < values.length; i += stride) points.push(`${s.x(i + 1).toFixed(1)},${s.y(values[i]).toFixed(1)}`);
  points.push(`${s.x(values.length).toFixed(1)},${s.y(values[values.length - 1]).toFixed(1)}`);
  return svg("polyline", {points: points.join(" "), fill: "none", ...attributes});
}

function drawPlot(figure) {
  const s = scaleOf(figure);
  const area = figure.querySelector("svg");
  const tick = (v) => (s.log ? `1e${Math.round(v)}` : fmt(v));
  area.replaceChildren(
    svg("rect", {x: BOX.left, y: BOX.top, width: BOX.right - BOX.left, height: BOX.bottom - BOX.top, class: "frame"}),
    svg("text", {x: BOX.left - 4, y: BOX.top + 4, "text-anchor": "end", class: "tick"}, tick(s.hi)),
    svg("text", {x: BOX.left - 4, y: BOX.bottom, "text-anchor": "end", class: "tick"}, tick(s.lo)),
    svg("text", {x: BOX.left, y: BOX.bottom + 16, class: "tick"}, "1"),
    svg("text", {x: BOX.right, y: BOX.bottom + 16, "text-anchor": "end", class: "tick"}, String(process.T)),
    svg("text", {x: (BOX.left + BOX.right) / 2, y: BOX.bottom + 16, "text-anchor": "middle", class: "tick"}, "t"),
  );
  if (figure.dataset.second) area.append(line(process[figure.dataset.second], s, {class: "curve second"}));
  area.append(line(process[figure.dataset.curve], s, {class: "curve"}));
  area.append(svg("line", {class: "marker", y1: BOX.top, y2: BOX.bottom}), svg("circle", {class: "dot", r: 3.5}));
}

function moveMarker(figure, t) {
  const s = scaleOf(figure);
  const marker = figure.querySelector(".marker");
  const dot = figure.querySelector(".dot");
  if (!marker) return;
  const x = s.x(Math.max(1, t));
  marker.setAttribute("x1", x);
  marker.setAttribute("x2", x);
  dot.setAttribute("cx", x);
  dot.setAttribute("cy", s.y(process[figure.dataset.curve][Math.max(1, t) - 1]));
  dot.style.visibility = t === 0 ? "hidden" : "visible";
}

async function uploadImage() {
  const file = $("upload").files[0];
  if (!file) return;
  if (file.size > state.max_upload_bytes) {
    showError(`${file.name} is larger than ${state.max_upload_bytes / 2 ** 20} MiB`);
    return;
  }
  try {
    const body = await getJSON("/api/images", {method: "POST", headers: {"Content-Type": "application/octet-stream"},
                                               body: file});
    const source = $("image-source");
    option(source, body.image, `uploaded: ${file.name}`);
    source.value = body.image;
    $("data-index-label").hidden = true;
    showError("");
    showForward();
  } catch (error) {
    showError(`upload refused: ${error.message}`);
  }
}

async function openTheory(details) {
  if (!details.open || details.dataset.loaded) return;
  const pre = details.querySelector("pre");
  try {
    const section = await getJSON(`/api/theory/${details.dataset.theory}`);
    pre.textContent = `${section.path}#${section.anchor}\n\n${section.text}`;
    details.dataset.loaded = "1";
  } catch (error) {
    pre.textContent = error.message;
  }
}

// ------------------------------------------------------------------------------ start

function fillControls() {
  const models = $("model");
  state.models.forEach((m) => option(models, m.index, `${m.index}: ${m.name}`));
  for (const name of state.samplers) option($("sampler"), name, name);
  $("sampler").value = state.default_sampler;
  for (const id of ["num-images", "batch-size"]) $(id).max = String(state.max_images);
  state.processes.forEach((label, i) => option($("process"), i, label));
  if (state.images.data) {
    option($("image-source"), "data", `data set (${state.images.source})`);
    $("image-source").value = "data";
    $("data-index").max = String(state.images.data - 1);
    $("data-index-label").hidden = false;
  }
  const edit = state.edit;
  $("edit-tab").hidden = !edit.available;
  $("edit-message").textContent = edit.available
    ? `The library has ${edit.functions.join(" and ")} (${edit.module}); this view's controls (a mask drawn on an ` +
      "image, a strength slider) are the next step of issue 21."
    : "";
  fillModelControls();
  setSampleState("idle", "");
}

function wire() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  $("model").addEventListener("change", fillModelControls);
  $("sampler").addEventListener("change", fillStepsPlaceholder);
  $("sample-form").addEventListener("submit", startSampling);
  $("cancel-button").addEventListener("click", cancelSampling);
  $("scrubber").addEventListener("input", showFrame);
  $("copy-command").addEventListener("click", () => navigator.clipboard?.writeText($("command").textContent));
  $("process").addEventListener("change", loadProcess);
  $("t-slider").addEventListener("input", showForward);
  $("noise-seed").addEventListener("input", showForward);
  $("data-index").addEventListener("input", showForward);
  $("image-source").addEventListener("change", () => {
    $("data-index-label").hidden = $("image-source").value !== "data";
    showForward();
  });
  $("upload").addEventListener("change", uploadImage);
  for (const details of document.querySelectorAll("details[data-theory]")) {
    details.addEventListener("toggle", () => openTheory(details));
  }
}

async function start() {
  wire();
  try {
    state = await getJSON("/api/state");
  } catch (error) {
    showError(`cannot read the server's state: ${error.message}`);
    return;
  }
  fillControls();
  document.body.dataset.ready = "1";
}

start();
