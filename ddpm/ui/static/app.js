// ddpm ui: the page. Plain JavaScript, no library, no network beyond this server. Text from the
// server or the user is only ever set with textContent (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
let state = null;        // GET /api/state
let result = null;       // the last "done" event
let process = null;      // curves of the forward view's process

// The two views that stream a request: the attribute of <body> that tells their state, their controls,
// and ``running`` ({model}) while their request draws. The model serves one request at a time, either's.
const SAMPLE = {attribute: "sample", active: "sampling", button: "sample-button", cancel: "cancel-button",
                status: "sample-status", progress: "progress", preview: "preview", previewBox: "preview-box",
                running: null, ready: () => Boolean(currentModel())};
const EDIT = {attribute: "edit", active: "editing", button: "edit-button", cancel: "edit-cancel",
              status: "edit-status", progress: "edit-progress", preview: "edit-preview",
              previewBox: "edit-preview-box", running: null, ready: () => Boolean(editModel() && edit.input)};

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
  if (name === "edit" && !edit.chosen) {
    edit.chosen = true;
    chooseEditImage();
  }
}

// ------------------------------------------------------------------------------ sample view

function currentModel() {
  return state.models[Number($("model").value)];
}

function fillModelControls() {
  const model = currentModel();
  $("model-description").textContent = model ? model.description : "No model loaded: start 'ddpm ui RUN_OR_MODEL'.";
  $("sample-button").disabled = !model;
  fillConditionControls(model, "");
  fillStepsPlaceholder();
}

// The class, guidance and prompt controls of a view (ids and classes start with ``prefix``) for ``model``.
function fillConditionControls(model, prefix) {
  const classes = model ? model.num_classes : 0;
  const label = $(`${prefix}label`);
  label.replaceChildren(element("option", {value: ""}, "classes in turn"));
  for (let c = 0; c < classes; c++) option(label, c, String(c));
  for (const node of document.querySelectorAll(`.for-${prefix}classes`)) node.hidden = !classes;
  for (const node of document.querySelectorAll(`.for-${prefix}text`)) node.hidden = !(model && model.text);
  for (const node of document.querySelectorAll(`.for-${prefix}guidance`)) {
    node.hidden = !(classes || (model && model.text));
  }
}

function conditionFields(model, prefix) {
  const fields = {};
  if (model.num_classes) fields.label = numberOrNull(`${prefix}label`);
  if (model.num_classes || model.text) fields.guidance_scale = numberOrNull(`${prefix}guidance`);
  if (model.text) {
    fields.prompt = $(`${prefix}prompt`).value;
    fields.negative_prompt = $(`${prefix}negative-prompt`).value;
  }
  return fields;
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
  return {
    model: model.index, sampler: $("sampler").value, steps: $("steps").disabled ? null : numberOrNull("steps"),
    seed: numberOrNull("seed") ?? 0, num_images: numberOrNull("num-images") ?? 4,
    batch_size: numberOrNull("batch-size") ?? 4, ...conditionFields(model, ""),
  };
}

function setViewState(view, name, message) {
  document.body.dataset[view.attribute] = name;
  $(view.status).textContent = message;
  $(view.button).disabled = name === view.active || !view.ready();
  $(view.cancel).disabled = name !== view.active;
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

// POST ``request`` to ``url`` and hand each event of the answer to ``handle``, with ``view``'s state on the way.
async function streamRequest(view, url, request, handle) {
  setViewState(view, view.active, "starting…");
  let response;
  try {
    response = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify(request)});
  } catch (error) {
    setViewState(view, "error", `the server cannot be reached: ${error.message}`);
    return;
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    setViewState(view, response.status === 409 ? "busy" : "error", body.error || `${response.status}`);
    return;
  }
  view.running = {model: request.model};
  try {
    for await (const {name, data} of serverSentEvents(response)) handle(name, data);
  } catch (error) {
    setViewState(view, "error", `the stream broke off: ${error.message}`);
  }
  view.running = null;
  if (document.body.dataset[view.attribute] === view.active) setViewState(view, "error", "the stream ended early");
}

// The events every streamed request has: progress (with x̂0 of a pixel model), cancelled and error.
function commonEvent(view, name, data, count) {
  if (name === "progress") {
    $(view.progress).value = data.fraction;
    if (data.step) {
      const where = count > data.batch ? `, images ${data.first + 1}–${data.first + data.batch}` : "";
      $(view.status).textContent = `step ${data.step}, t = ${data.t}${where}`;
    }
    if (data.preview) {
      $(view.preview).src = data.preview;
      $(view.previewBox).hidden = false;
    }
  } else if (name === "cancelled" || name === "error") {
    $(view.previewBox).hidden = true;
    setViewState(view, name, name === "error" ? data.error : "cancelled");
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
  await streamRequest(SAMPLE, "/api/sample", request, (name, data) => handleEvent(name, data, request));
}

function handleEvent(name, data, request) {
  if (name === "images") {
    data.images.forEach((url, i) => {
      const index = data.first + i;
      $("images").append(element("img", {src: url, class: "pixels sample", "data-index": String(index),
                                         alt: `sample ${index}`}));
    });
  } else if (name === "done") {
    showResult(data);
    setViewState(SAMPLE, "done", `${data.count} images, ${data.nfe} network evaluations each`);
  } else {
    commonEvent(SAMPLE, name, data, request.num_images);
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

async function cancelRequest(view) {
  if (!view.running) return;
  $(view.status).textContent = "cancelling…";
  try {
    await getJSON("/api/cancel", {method: "POST", headers: {"Content-Type": "application/json"},
                                  body: JSON.stringify({model: view.running.model})});
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

// ------------------------------------------------------------------------------ edit view

// The image being edited (at the model's size, as the server made it), its pixels, and the mask drawn
// on it: one byte per pixel, 1 keeps it and 0 has it generated (the library's convention).
const edit = {input: null, info: null, file: null, width: 0, height: 0, pixels: null, mask: null,
              drawing: false, value: 0, last: null, chosen: false};
const TINT = [224, 0, 160];  // the generated part, blended over the image (style.css's --generate)

function editModel() {
  return state.models[Number($("edit-model").value)];
}

function editMethod() {
  return $("edit-method").value;
}

function fillEditChoices() {
  state.models.forEach((m) => option($("edit-model"), m.index, `${m.index}: ${m.name}`));
  for (const name of state.samplers) option($("edit-sampler"), name, name);
  $("edit-sampler").value = state.edit.default_sampler;
  $("edit-jump").value = String(state.edit.repaint.jump_length);
  $("edit-resamples").value = String(state.edit.repaint.resamples);
  for (const id of ["edit-jump", "edit-resamples"]) $(id).max = String(state.edit.max_repaint);
  $("edit-samples").max = String(state.edit.max_samples);
  if (state.images.data) {
    option($("edit-source"), "data", `data set (${state.images.source})`);
    $("edit-source").value = "data";
    $("edit-index").max = String(state.images.data - 1);
    $("edit-index-label").hidden = false;
  }
}

function fillEditControls() {
  const model = editModel();
  const method = editMethod();
  fillConditionControls(model, "edit-");
  const shown = {"for-repaint": method === "repaint", "for-sampler": method !== "repaint",
                 "for-img2img": method === "img2img", "for-mask": method !== "img2img"};
  for (const [name, show] of Object.entries(shown)) {
    for (const node of document.querySelectorAll(`#view-edit .${name}`)) node.hidden = !show;
  }
  $("edit-button").textContent = method === "img2img" ? "Edit" : "Inpaint";
  if (model) {
    const steps = method === "repaint" ? Math.min(state.edit.repaint.steps, model.timesteps)
      : model.default_steps[$("edit-sampler").value];
    $("edit-steps").placeholder = steps === null || steps === undefined ? "its own" : `default ${steps}`;
    $("edit-steps").max = String(model.timesteps);
  }
  editNote();
  renderMask();
  setViewState(EDIT, document.body.dataset.edit || "idle", $("edit-status").textContent);
}

// What the method will do, and how the image was made the model's size.
function editNote() {
  const model = editModel();
  if (!model) {
    $("edit-note").textContent = "No model loaded: start 'ddpm ui RUN_OR_MODEL'.";
    return;
  }
  const method = editMethod();
  let text;
  if (method === "repaint") {
    const K = numberOrNull("edit-steps") ?? Math.min(state.edit.repaint.steps, model.timesteps);
    const j = numberOrNull("edit-jump") ?? 1;
    const r = numberOrNull("edit-resamples") ?? 1;
    const nfe = K + (K > j ? Math.floor((K - 1) / j) * (r - 1) * j : 0);  // ddpm.inpaint.repaint_nfe
    text = `RePaint: ${K} kept DDPM steps, going back up ${j} steps every ${j}, ${r} times in all: ` +
      `${nfe.toLocaleString("en")} network evaluations per result.`;
  } else if (method === "replacement") {
    text = "Replacement: after every step of the sampler the kept pixels are put back, noised to that step.";
  } else {
    text = "img2img (SDEdit): of the sampler's steps the last strength × N are run, from the image noised " +
      "to the first of them; strength 0 gives the image back, 1 all but ignores it.";
  }
  const info = edit.info;
  if (info) {
    const [w, h] = info.source_size;
    const made = w === info.width && h === info.height ? "" : ` (from ${w}×${h}: resized and centre-cropped as ` +
      "the data loader makes training images)";
    text += ` The image: ${info.width}×${info.height}${made}.`;
  }
  $("edit-note").textContent = text;
}

async function chooseEditImage() {
  const model = editModel();
  if (!model) return;
  const source = $("edit-source").value;
  let url = `/api/edit/inputs?model=${model.index}`;
  let init = {method: "POST"};
  $("edit-index-label").hidden = source !== "data";
  if (source === "upload") {
    if (!edit.file) return;
    init = {method: "POST", headers: {"Content-Type": "application/octet-stream"}, body: edit.file};
  } else {
    url += `&image=${source === "data" ? `d${Number($("edit-index").value) || 0}` : "pattern"}`;
  }
  try {
    await loadEditImage(await getJSON(url, init));
    showError("");
  } catch (error) {
    showError(`image refused: ${error.message}`);
  }
}

async function uploadEditImage() {
  const file = $("edit-upload").files[0];
  if (!file) return;
  if (file.size > state.max_upload_bytes) {
    showError(`${file.name} is larger than ${state.max_upload_bytes / 2 ** 20} MiB`);
    return;
  }
  edit.file = file;
  const source = $("edit-source");
  let choice = source.querySelector("option[value=upload]");
  if (!choice) {
    choice = element("option", {value: "upload"});
    source.append(choice);
  }
  choice.textContent = `uploaded: ${file.name}`;
  source.value = "upload";
  await chooseEditImage();
}

async function loadEditImage(info) {
  const image = new Image();
  image.src = info.url;
  await image.decode();
  const canvas = $("mask-canvas");
  canvas.width = info.width;
  canvas.height = info.height;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  Object.assign(edit, {input: info.input, info, width: info.width, height: info.height,
                       pixels: context.getImageData(0, 0, info.width, info.height).data.slice(),
                       mask: new Uint8Array(info.width * info.height).fill(1)});
  const side = Math.max(info.width, info.height);
  $("brush").max = String(Math.max(2, Math.round(side / 4)));
  $("brush").value = String(Math.max(1, Math.round(side / 8) / 2));
  renderMask();
  editNote();
  setViewState(EDIT, document.body.dataset.edit || "idle", $("edit-status").textContent);
  document.body.dataset.editInput = info.input;
}

// The image, with the pixels to generate tinted (img2img: the whole image as it is).
function renderMask() {
  if (!edit.pixels) return;
  const context = $("mask-canvas").getContext("2d");
  const out = context.createImageData(edit.width, edit.height);
  const whole = editMethod() === "img2img";
  for (let i = 0; i < edit.mask.length; i++) {
    const keep = whole || edit.mask[i] === 1;
    for (let c = 0; c < 3; c++) {
      const v = edit.pixels[4 * i + c];
      out.data[4 * i + c] = keep ? v : Math.round(0.35 * v + 0.65 * TINT[c]);
    }
    out.data[4 * i + 3] = 255;
  }
  context.putImageData(out, 0, 0);
}

function canvasPoint(event) {
  const box = $("mask-canvas").getBoundingClientRect();
  return {x: (event.clientX - box.left) / box.width * edit.width,
          y: (event.clientY - box.top) / box.height * edit.height};
}

// Every pixel whose centre lies within the brush's radius (in the model's pixels) of ``point``.
function paintAt(point) {
  const r = Number($("brush").value);
  for (let y = Math.max(0, Math.floor(point.y - r)); y <= Math.min(edit.height - 1, Math.floor(point.y + r)); y++) {
    for (let x = Math.max(0, Math.floor(point.x - r)); x <= Math.min(edit.width - 1, Math.floor(point.x + r)); x++) {
      if ((x + 0.5 - point.x) ** 2 + (y + 0.5 - point.y) ** 2 <= r * r) edit.mask[y * edit.width + x] = edit.value;
    }
  }
}

// From the last point to this one in steps of half a pixel, so that a quick stroke leaves no gaps.
function paintStroke(point) {
  const from = edit.last || point;
  const n = Math.max(1, Math.ceil(2 * Math.hypot(point.x - from.x, point.y - from.y)));
  for (let i = 1; i <= n; i++) {
    paintAt({x: from.x + (point.x - from.x) * i / n, y: from.y + (point.y - from.y) * i / n});
  }
  edit.last = point;
  renderMask();
}

function startStroke(event) {
  if (!edit.pixels || editMethod() === "img2img") return;
  event.preventDefault();
  edit.drawing = true;
  edit.value = event.button === 2 || event.shiftKey ? 1 : 0;
  edit.last = null;
  $("mask-canvas").setPointerCapture(event.pointerId);
  paintStroke(canvasPoint(event));
}

function endStroke() {
  edit.drawing = false;
  edit.last = null;
}

function setMask(f) {
  if (!edit.mask) return;
  edit.mask = edit.mask.map(f);
  renderMask();
}

// The mask as the server takes it: one bit per pixel, row by row, most significant bit first, in base64.
function maskBitmap() {
  const bytes = new Uint8Array(Math.ceil(edit.mask.length / 8));
  edit.mask.forEach((keep, i) => {
    if (keep) bytes[i >> 3] |= 0x80 >> (i & 7);
  });
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}

function editRequest() {
  const model = editModel();
  const method = editMethod();
  const request = {model: model.index, input: edit.input, method, steps: numberOrNull("edit-steps"),
                   seed: numberOrNull("edit-seed") ?? 0, num_samples: numberOrNull("edit-samples") ?? 1,
                   ...conditionFields(model, "edit-")};
  if (method === "repaint") {
    request.jump_length = numberOrNull("edit-jump") ?? state.edit.repaint.jump_length;
    request.resamples = numberOrNull("edit-resamples") ?? state.edit.repaint.resamples;
  } else {
    request.sampler = $("edit-sampler").value;
  }
  if (method === "img2img") request.strength = Number($("edit-strength").value);
  else request.mask = maskBitmap();
  return request;
}

async function startEditing(event) {
  event.preventDefault();
  showError("");
  if (!edit.input) return;
  const request = editRequest();
  $("edit-images").replaceChildren();
  $("edit-after").hidden = true;
  $("edit-progress").value = 0;
  await streamRequest(EDIT, "/api/edit", request, (name, data) => handleEditEvent(name, data, request));
}

function handleEditEvent(name, data, request) {
  if (name === "images") {
    data.images.forEach((url, i) => {
      const index = data.first + i;
      $("edit-images").append(element("img", {src: url, class: "pixels edited", "data-index": String(index),
                                              alt: `result ${index}`}));
    });
  } else if (name === "done") {
    showEditResult(data);
    setViewState(EDIT, "done", `${data.count} result${data.count === 1 ? "" : "s"}, ${data.nfe} network ` +
      "evaluations each");
  } else {
    commonEvent(EDIT, name, data, request.num_samples);
  }
}

function showEditResult(data) {
  $("edit-preview-box").hidden = true;
  $("edit-progress").value = 1;
  for (const image of document.querySelectorAll("#edit-images img")) {
    const i = Number(image.dataset.index);
    const label = data.labels[i];
    image.title = `result ${i}${label >= 0 ? `, class ${label}` : ""}: click for its PNG`;
    const figure = element("figure");
    const link = element("a", {href: data.outputs[i], download: `edit-${String(i).padStart(6, "0")}.png`});
    image.replaceWith(figure);
    link.append(image);
    figure.append(link, element("figcaption", {}, label >= 0 ? `class ${label}` : `result ${i + 1}`));
  }
  $("edit-command").textContent = data.command;
  $("edit-download-image").href = data.image;
  $("edit-download-mask").href = data.mask || "#";
  $("edit-download-grid").href = data.grid;
  $("edit-after").hidden = false;
}

function wireEdit() {
  const canvas = $("mask-canvas");
  canvas.addEventListener("pointerdown", startStroke);
  canvas.addEventListener("pointermove", (event) => {
    if (edit.drawing) paintStroke(canvasPoint(event));
  });
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  $("mask-clear").addEventListener("click", () => setMask(() => 1));
  $("mask-invert").addEventListener("click", () => setMask((keep) => 1 - keep));
  $("edit-model").addEventListener("change", () => {
    fillEditControls();
    chooseEditImage();  // the image again, at this model's size
  });
  for (const id of ["edit-method", "edit-sampler"]) $(id).addEventListener("change", fillEditControls);
  for (const id of ["edit-steps", "edit-jump", "edit-resamples"]) $(id).addEventListener("input", editNote);
  $("edit-source").addEventListener("change", chooseEditImage);
  $("edit-index").addEventListener("input", chooseEditImage);
  $("edit-upload").addEventListener("change", uploadEditImage);
  $("edit-strength").addEventListener("input", () => {
    $("edit-strength-value").textContent = Number($("edit-strength").value).toFixed(2);
  });
  $("edit-form").addEventListener("submit", startEditing);
  $("edit-cancel").addEventListener("click", () => cancelRequest(EDIT));
  $("edit-copy").addEventListener("click", () => navigator.clipboard?.writeText($("edit-command").textContent));
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
  fillEditChoices();
  fillEditControls();
  fillModelControls();
  setViewState(SAMPLE, "idle", "");
  setViewState(EDIT, "idle", "");
}

function wire() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  $("model").addEventListener("change", fillModelControls);
  $("sampler").addEventListener("change", fillStepsPlaceholder);
  $("sample-form").addEventListener("submit", startSampling);
  $("cancel-button").addEventListener("click", () => cancelRequest(SAMPLE));
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
  wireEdit();
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
