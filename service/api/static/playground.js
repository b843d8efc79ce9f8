// genserve playground: plain browser JS, no build step, no external requests.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let activeRequest = null; // AbortController of the running generation

// ---------- errors ----------
function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}
function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}
async function apiErrorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}: ${text || response.statusText}`;
}

// ---------- server-sent events over fetch (EventSource cannot POST) ----------
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let eventName = "message";
  let dataLines = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (dataLines.length) yield { event: eventName, data: JSON.parse(dataLines.join("\n")) };
        eventName = "message";
        dataLines = [];
      } else if (line.startsWith("event:")) {
        eventName = line.slice(6).trim();
      } else if (line.startsWith("data:")) {
        dataLines.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
}

async function streamGenerate(body, onEvent) {
  activeRequest = new AbortController();
  try {
    const response = await fetch("/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...body, stream: true }),
      signal: activeRequest.signal,
    });
    if (!response.ok) {
      showError(await apiErrorMessage(response));
      return;
    }
    for await (const event of sseEvents(response)) {
      if (event.event === "error") {
        showError(event.data.error ? event.data.error.message : JSON.stringify(event.data));
        return;
      }
      onEvent(event);
    }
  } catch (error) {
    if (error.name !== "AbortError") showError(`request failed: ${error.message}`);
  } finally {
    activeRequest = null;
  }
}

function optionalNumber(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function setBusy(prefix, busy) {
  $(`${prefix}-generate`).disabled = busy;
  $(`${prefix}-stop`).disabled = !busy;
}

// ---------- autoregressive ----------
async function generateText() {
  clearError();
  const output = $("ar-output");
  output.textContent = "";
  $("ar-status").textContent = "streaming...";
  setBusy("ar", true);
  const body = {
    model: $("model").value,
    prompt: $("ar-prompt").value,
    max_tokens: optionalNumber("ar-max-tokens"),
    temperature: optionalNumber("ar-temperature"),
    top_k: optionalNumber("ar-top-k"),
    top_p: optionalNumber("ar-top-p"),
    repetition_penalty: optionalNumber("ar-repetition-penalty"),
    seed: optionalNumber("ar-seed"),
  };
  const selected = models.find((candidate) => candidate.name === body.model);
  const byDiffusion = selected && selected.paradigm === "diffusion";
  if (byDiffusion) {  // text by masked diffusion: steps, no repetition penalty; progress shows the text crystallising
    delete body.repetition_penalty;
    body.steps = optionalNumber("ar-steps");
  }
  let tokens = 0;
  const started = performance.now();
  await streamGenerate(body, (event) => {
    if (event.event === "progress" && event.data.text !== undefined) {
      output.textContent = event.data.text;
      $("ar-status").textContent = `step ${event.data.step} / ${event.data.steps}`;
    } else if (event.event === "token") {
      output.textContent += event.data.text;
      tokens += event.data.token_ids.length;
      $("ar-status").textContent = `${tokens} tokens`;
    } else if (event.event === "done") {
      output.textContent = event.data.text;
      const seconds = (performance.now() - started) / 1000;
      $("ar-status").textContent = `done: ${event.data.finish_reason}, ${event.data.usage.completion_tokens} tokens ` +
        `in ${seconds.toFixed(2)} s` + (event.data.timings.ttft_s === null ? ` (${event.data.steps} steps)` :
        ` (ttft ${(event.data.timings.ttft_s * 1000).toFixed(1)} ms)`);
    }
  });
  if ($("ar-status").textContent === "streaming...") $("ar-status").textContent = "stopped";
  setBusy("ar", false);
}

// ---------- diffusion ----------
function pngImage(base64, className) {
  const image = document.createElement("img");
  image.src = `data:image/png;base64,${base64}`;
  image.className = className;
  return image;
}

async function generateImage() {
  clearError();
  const gallery = $("diffusion-images");
  gallery.replaceChildren();
  $("diffusion-preview-figure").hidden = true;
  $("diffusion-status").textContent = "queued...";
  setBusy("diffusion", true);
  const body = {
    model: $("model").value,
    prompt: $("diffusion-prompt").value,
    steps: Number($("diffusion-steps").value),
    guidance_scale: optionalNumber("diffusion-guidance"),
    n: optionalNumber("diffusion-n"),
    seed: optionalNumber("diffusion-seed"),
    preview_every: 1,
  };
  if ($("diffusion-scheduler").value) body.scheduler = $("diffusion-scheduler").value;
  await streamGenerate(body, (event) => {
    if (event.event === "progress") {
      $("diffusion-status").textContent = `step ${event.data.step} / ${event.data.steps}`;
      if (event.data.preview_png_base64) {
        $("diffusion-preview").src = `data:image/png;base64,${event.data.preview_png_base64}`;
        $("diffusion-preview-caption").textContent = `preview, step ${event.data.step}`;
        $("diffusion-preview-figure").hidden = false;
      }
    } else if (event.event === "done") {
      for (const image of event.data.images) {
        const figure = document.createElement("figure");
        figure.append(pngImage(image.png_base64, "pixel final-image"));
        const caption = document.createElement("figcaption");
        caption.textContent = `seed ${image.seed}`;
        figure.append(caption);
        gallery.append(figure);
      }
      $("diffusion-status").textContent =
        `done: ${event.data.steps} steps (${event.data.scheduler}) in ${event.data.timings.total_s.toFixed(2)} s`;
    }
  });
  setBusy("diffusion", false);
}

// ---------- model picker ----------
function selectModel() {
  const model = models.find((candidate) => candidate.name === $("model").value);
  const paradigm = model ? model.paradigm : "";
  const writesText = model ? model.modality === "text" : false;  // AR, or text by masked diffusion
  $("paradigm").textContent = writesText && paradigm === "diffusion" ? "diffusion (text)" : paradigm;
  $("ar-panel").hidden = !writesText;
  $("ar-steps-label").hidden = paradigm !== "diffusion";
  $("diffusion-panel").hidden = paradigm !== "diffusion" || writesText;
}

async function loadModels() {
  const response = await fetch("/models");
  if (!response.ok) {
    showError(await apiErrorMessage(response));
    return;
  }
  models = (await response.json()).models || [];
  const select = $("model");
  select.replaceChildren(...models.map((model) => new Option(`${model.name} (${model.paradigm})`, model.name)));
  selectModel();
}

// ---------- live latency panel from /metrics ----------
const HISTOGRAMS = {
  autoregressive: [["genserve_request_duration_seconds", "end to end"],
                   ["genserve_time_to_first_token_seconds", "time to first token"],
                   ["genserve_inter_token_latency_seconds", "inter-token latency"],
                   ["genserve_queue_wait_seconds", "queue wait"]],
  diffusion: [["genserve_request_duration_seconds", "end to end"],
              ["genserve_denoise_step_seconds", "denoise step"],
              ["genserve_queue_wait_seconds", "queue wait"]],
};

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

// cumulative buckets [[le, count]] summed over the series of one paradigm
function bucketsOf(samples, histogram, paradigm) {
  const byBound = new Map();
  for (const sample of samples) {
    if (sample.name !== `${histogram}_bucket` || sample.labels.paradigm !== paradigm) continue;
    const bound = sample.labels.le === "+Inf" ? Infinity : Number(sample.labels.le);
    byBound.set(bound, (byBound.get(bound) || 0) + sample.value);
  }
  return [...byBound.entries()].sort((a, b) => a[0] - b[0]);
}

// The same linear interpolation inside a bucket as PromQL's histogram_quantile.
function quantile(q, buckets) {
  if (!buckets.length) return NaN;
  const total = buckets[buckets.length - 1][1];
  if (total === 0) return NaN;
  const rank = q * total;
  let previousBound = 0;
  let previousCount = 0;
  for (const [bound, count] of buckets) {
    if (count >= rank) {
      if (bound === Infinity) return previousBound;
      if (count === previousCount) return bound;
      return previousBound + (bound - previousBound) * (rank - previousCount) / (count - previousCount);
    }
    previousBound = bound;
    previousCount = count;
  }
  return previousBound;
}

function formatSeconds(seconds) {
  if (!Number.isFinite(seconds)) return "-";
  return seconds < 1 ? `${(seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1)} ms` : `${seconds.toFixed(2)} s`;
}

function bars(buckets) {
  const container = document.createElement("div");
  container.className = "bars";
  let previous = 0;
  const counts = buckets.map(([, count]) => { const inBucket = count - previous; previous = count; return inBucket; });
  const highest = Math.max(1, ...counts);
  buckets.forEach(([bound], index) => {
    const bar = document.createElement("span");
    bar.style.height = `${Math.round(28 * counts[index] / highest)}px`;
    bar.title = `le ${bound === Infinity ? "+Inf" : formatSeconds(bound)}: ${counts[index]}`;
    container.append(bar);
  });
  return container;
}

function renderMetrics(samples) {
  const panel = $("metrics");
  panel.replaceChildren();
  for (const [paradigm, histograms] of Object.entries(HISTOGRAMS)) {
    const table = document.createElement("table");
    table.dataset.paradigm = paradigm;
    table.innerHTML = `<caption style="text-align:left;font-weight:600">${paradigm}</caption>` +
      "<tr><th></th><th>count</th><th>p50</th><th>p95</th><th>p99</th><th>shape</th></tr>";
    for (const [histogram, title] of histograms) {
      const buckets = bucketsOf(samples, histogram, paradigm);
      const row = table.insertRow();
      row.dataset.histogram = histogram;
      row.insertCell().textContent = title;
      row.insertCell().textContent = buckets.length ? String(buckets[buckets.length - 1][1]) : "0";
      for (const q of [0.5, 0.95, 0.99]) row.insertCell().textContent = formatSeconds(quantile(q, buckets));
      row.insertCell().append(bars(buckets));
    }
    panel.append(table);
  }
}

async function refreshMetrics() {
  try {
    const response = await fetch("/metrics");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    renderMetrics(parseMetrics(await response.text()));
    $("metrics-status").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("metrics-status").textContent = `metrics unavailable: ${error.message}`;
  }
}

// ---------- wiring ----------
$("model").addEventListener("change", () => { clearError(); selectModel(); });
$("ar-generate").addEventListener("click", generateText);
$("diffusion-generate").addEventListener("click", generateImage);
for (const prefix of ["ar", "diffusion"]) {
  $(`${prefix}-stop`).addEventListener("click", () => { if (activeRequest) activeRequest.abort(); });
}
$("diffusion-steps").addEventListener("input", () => { $("diffusion-steps-value").textContent = $("diffusion-steps").value; });
loadModels().catch((error) => showError(`could not list models: ${error.message}`));
refreshMetrics();
setInterval(refreshMetrics, 2000);
