// The page: a drawing pad (pointer events: mouse, touch, pen), file picker, drag-and-drop and
// paste; preprocessing, fixed point and secret sharing in the browser; one share to each
// replica; the reconstructed label, the latency and what each party saw.

import * as preprocess from "./preprocess.js";
import * as replicas from "./replicas.js";
import * as sharing from "./sharing.js";

const { ImageError, SIDE, decodeImage, preprocessPixels } = preprocess;
const { PairedClient, ServiceProblem, loadConfig } = replicas;

const $ = (id) => document.getElementById(id);
const els = {
  pad: $("pad"),
  padHint: $("pad-hint"),
  dropzone: $("dropzone"),
  source: $("source"),
  undo: $("undo"),
  clear: $("clear"),
  file: $("file"),
  classify: $("classify"),
  auto: $("auto"),
  result: $("result"),
  label: $("label"),
  latency: $("latency"),
  rounds: $("rounds"),
  model: $("model"),
  requestId: $("request-id"),
  onehot: $("onehot"),
  error: $("error"),
  input28: $("input28"),
  share0: $("share0"),
  share1: $("share1"),
  frac: $("frac"),
  bytes: $("bytes"),
  servers: $("servers"),
};

const cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  cspViolations.push({ directive: e.violatedDirective, blocked: e.blockedURI });
});

// -- drawing pad ------------------------------------------------------------------------------

const LINE_WIDTH = 18; // on the 280 px pad: ~1.5 px strokes once the digit is 20 px tall
const pad = els.pad;
const ctx = pad.getContext("2d", { willReadFrequently: true });
let strokes = []; // each: [[x, y], ...] in pad pixels
let current = null; // {id, points}
let fileSource = null; // {name, pixels: {width, height, data}, bitmap}
let autoTimer = 0;

function redraw() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
  if (fileSource) {
    const { bitmap } = fileSource;
    const scale = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
    const w = bitmap.width * scale;
    const h = bitmap.height * scale;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
  }
  for (const points of strokes) drawStroke(points);
  els.padHint.hidden = Boolean(fileSource || strokes.length);
  els.undo.disabled = !(fileSource || strokes.length);
  els.clear.disabled = els.undo.disabled;
}

function drawStroke(points, from = 0) {
  ctx.strokeStyle = "#fff";
  ctx.fillStyle = "#fff";
  ctx.lineWidth = LINE_WIDTH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  if (points.length === 1) {
    ctx.beginPath();
    ctx.arc(points[0][0], points[0][1], LINE_WIDTH / 2, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.beginPath();
  const start = Math.max(0, from - 1);
  ctx.moveTo(points[start][0], points[start][1]);
  for (let i = start + 1; i < points.length; i++) ctx.lineTo(points[i][0], points[i][1]);
  ctx.stroke();
}

function padPoint(e) {
  const rect = pad.getBoundingClientRect();
  return [((e.clientX - rect.left) * pad.width) / rect.width, ((e.clientY - rect.top) * pad.height) / rect.height];
}

pad.addEventListener("pointerdown", (e) => {
  if (e.pointerType === "mouse" && e.button !== 0) return;
  e.preventDefault();
  clearTimeout(autoTimer);
  if (fileSource) clearFile();
  pad.setPointerCapture(e.pointerId);
  current = { id: e.pointerId, points: [padPoint(e)] };
  strokes.push(current.points);
  drawStroke(current.points);
  redraw();
});

pad.addEventListener("pointermove", (e) => {
  if (!current || e.pointerId !== current.id) return;
  e.preventDefault();
  const from = current.points.length;
  const events = typeof e.getCoalescedEvents === "function" ? e.getCoalescedEvents() : [];
  for (const ev of events.length ? events : [e]) current.points.push(padPoint(ev));
  drawStroke(current.points, from);
});

function endStroke(e) {
  if (!current || e.pointerId !== current.id) return;
  current = null;
  redraw();
  if (els.auto.checked) {
    clearTimeout(autoTimer);
    autoTimer = setTimeout(classify, 350);
  }
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);
pad.addEventListener("contextmenu", (e) => e.preventDefault());

function clearFile() {
  if (fileSource) fileSource.bitmap.close();
  fileSource = null;
  els.source.textContent = "";
}

function undo() {
  clearTimeout(autoTimer);
  if (fileSource) clearFile();
  else strokes.pop();
  redraw();
  if (!strokes.length) resetResult();
  else if (els.auto.checked) autoTimer = setTimeout(classify, 350);
}

function clearAll() {
  clearTimeout(autoTimer);
  clearFile();
  strokes = [];
  redraw();
  resetResult();
}

els.undo.addEventListener("click", undo);
els.clear.addEventListener("click", clearAll);
els.classify.addEventListener("click", () => {
  clearTimeout(autoTimer);
  classify();
});
document.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && !e.shiftKey && e.key.toLowerCase() === "z") {
    e.preventDefault();
    undo();
  }
});

// -- image files: picker, drag-and-drop, paste -------------------------------------------------

async function useFile(file) {
  clearTimeout(autoTimer);
  const token = ++generation;
  startBusy();
  let decoded;
  try {
    if (!file) throw new ImageError("That was not a file. Drop or paste a picture of one digit.");
    decoded = await decodeImage(file);
  } catch (err) {
    if (token === generation) finishError(err);
    return;
  }
  if (token !== generation) {
    decoded.bitmap.close();
    return;
  }
  clearFile();
  strokes = [];
  fileSource = { name: file.name || "pasted image", pixels: decoded, bitmap: decoded.bitmap };
  els.source.textContent = `${fileSource.name} · ${decoded.width}×${decoded.height} px`;
  redraw();
  await classify(token);
}

els.file.addEventListener("change", () => {
  const file = els.file.files && els.file.files[0];
  els.file.value = ""; // picking the same file again fires again
  if (file) useFile(file);
});

let dragDepth = 0;
document.addEventListener("dragenter", (e) => {
  if (!e.dataTransfer || !Array.from(e.dataTransfer.types).includes("Files")) return;
  e.preventDefault();
  dragDepth += 1;
  els.dropzone.classList.add("dragging");
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) els.dropzone.classList.remove("dragging");
});
document.addEventListener("dragover", (e) => {
  e.preventDefault();
  if (e.dataTransfer) e.dataTransfer.dropEffect = "copy";
});
document.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  els.dropzone.classList.remove("dragging");
  const files = e.dataTransfer ? e.dataTransfer.files : null;
  useFile(files && files.length ? files[0] : null);
});

document.addEventListener("paste", (e) => {
  const items = e.clipboardData ? Array.from(e.clipboardData.items) : [];
  const item = items.find((i) => i.kind === "file");
  if (!item) return; // text: leave it alone
  e.preventDefault();
  useFile(item.getAsFile());
});

// -- classification ---------------------------------------------------------------------------

let client = null;
let generation = 0; // the newest classification wins; older answers are dropped
let configReady = null;

function currentPixels() {
  if (fileSource) return fileSource.pixels;
  if (!strokes.length) throw new ImageError("Draw a digit first, or pick, drop or paste an image of one.");
  return ctx.getImageData(0, 0, pad.width, pad.height);
}

async function classify(token = ++generation) {
  startBusy();
  try {
    await configReady;
    const x = preprocessPixels(currentPixels());
    paintInput(x);
    last.input = Array.from(x);
    const result = await client.predict(x);
    if (token !== generation) return;
    last.result = result;
    finishResult(result);
  } catch (err) {
    if (token !== generation) return;
    finishError(err);
  }
}

function startBusy() {
  els.result.dataset.state = "busy";
  els.error.hidden = true;
  els.error.textContent = "";
  els.label.textContent = "";
}

function bump() {
  els.result.dataset.seq = String(Number(els.result.dataset.seq) + 1);
}

function resetResult() {
  generation += 1;
  els.result.dataset.state = "idle";
  els.label.textContent = "";
  els.error.hidden = true;
  els.error.textContent = "";
  for (const el of [els.latency, els.rounds, els.requestId]) el.textContent = "–";
  els.bytes.textContent = "";
  paintOnehot(null);
  for (const c of [els.input28, els.share0, els.share1]) {
    c.getContext("2d").clearRect(0, 0, c.width, c.height);
  }
}

function finishResult(r) {
  els.label.textContent = String(r.label);
  els.latency.textContent = `${Math.round(r.latencyMs)} ms`;
  const mb = (r.peerBytes / 1e6).toFixed(2);
  els.rounds.textContent = Number.isInteger(r.rounds) ? `${r.rounds} rounds · ${mb} MB` : "–";
  els.model.textContent = r.modelVersion;
  els.model.title = r.modelVersion;
  els.requestId.textContent = r.requestId;
  els.requestId.title = r.requestId;
  els.frac.textContent = String(r.fracBits);
  paintShare(els.share0, r.inputShares[0]);
  paintShare(els.share1, r.inputShares[1]);
  paintOnehot(r.onehot);
  const sent = (8 * r.inputShares[0].length).toLocaleString("en");
  els.bytes.textContent =
    `Each replica received ${sent} bytes (${r.inputShares[0].length} numbers of 64 bits) ` +
    `and answered 10 numbers; neither ever held the image, the weights or the label.`;
  els.result.dataset.state = "done";
  bump();
}

/** Words a person understands for any failure. */
export function humanMessage(err) {
  if (err instanceof ImageError || err instanceof ServiceProblem) return err.message;
  return `Something went wrong in the page: ${err && err.message ? err.message : String(err)}. Reload the page and try again.`;
}

function finishError(err) {
  last.error = { name: err && err.name, message: humanMessage(err), kind: err && err.kind, code: err && err.code };
  els.label.textContent = "";
  paintOnehot(null);
  for (const c of [els.share0, els.share1]) c.getContext("2d").clearRect(0, 0, c.width, c.height);
  els.error.textContent = humanMessage(err);
  els.error.hidden = false;
  els.result.dataset.state = "error";
  bump();
  if (!(err instanceof ImageError)) console.warn("privdigit:", err);
}

// -- pictures ---------------------------------------------------------------------------------

function paintGrey(canvas, n, grey) {
  const c = canvas.getContext("2d");
  const img = c.createImageData(SIDE, SIDE);
  for (let i = 0; i < n; i++) {
    const v = grey(i);
    img.data[4 * i] = v;
    img.data[4 * i + 1] = v;
    img.data[4 * i + 2] = v;
    img.data[4 * i + 3] = 255;
  }
  c.putImageData(img, 0, 0);
}

function paintInput(x) {
  paintGrey(els.input28, x.length, (i) => Math.round(x[i] * 255));
}

function paintShare(canvas, values) {
  paintGrey(canvas, values.length, (i) => Number(values[i] & 0xffn)); // low byte as grey
}

function paintOnehot(onehot) {
  els.onehot.replaceChildren(
    ...Array.from({ length: 10 }, (_, d) => {
      const cell = document.createElement("div");
      cell.className = onehot && onehot[d] ? "cell hot" : "cell";
      const bit = document.createElement("b");
      bit.textContent = onehot ? String(onehot[d]) : "·";
      const digit = document.createElement("span");
      digit.textContent = String(d);
      cell.append(bit, digit);
      return cell;
    }),
  );
}

// -- start ------------------------------------------------------------------------------------

function showServers(urls, model, problem, pairs = 1) {
  const dot = document.createElement("span");
  dot.className = `status-dot ${problem ? "bad" : model ? "ok" : ""}`;
  const text = urls
    ? `Replica 0: ${urls[0]} · Replica 1: ${urls[1]}` +
      (pairs > 1 ? ` (one of ${pairs} replica pairs, which take turns)` : "") +
      (model ? ` · both serve model ${model.version} (fixed point, ${model.fracBits} fractional bits)` : "") +
      (problem ? " · not answering yet" : "")
    : "The page could not load its configuration.";
  els.servers.replaceChildren(dot, document.createTextNode(text));
}

async function start() {
  const pairs = await loadConfig();
  client = new PairedClient(pairs);
  last.client = client;
  try {
    const model = await client.getModel();
    els.frac.textContent = String(model.fracBits);
    els.model.textContent = model.version;
    showServers(client.urls, model, null, pairs.length);
  } catch (err) {
    showServers(client.urls, null, err, pairs.length); // the next classification asks again
  }
}

const last = { input: null, result: null, error: null, client: null };

redraw();
paintOnehot(null);
configReady = start().catch((err) => {
  showServers(null, null, err);
  throw err;
});
configReady.catch(() => {}); // reported when someone classifies

// Test and debugging hook: the page's own functions, no extra powers.
window.__privdigit = {
  preprocess,
  sharing,
  replicas,
  last,
  cspViolations,
  ready: configReady,
  humanMessage,
  /** The 28x28 input (array of 784 numbers) the page makes from base64-encoded file bytes. */
  async preprocessBase64(b64, type = "image/png") {
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    return Array.from(await preprocess.preprocessBlob(new Blob([bytes], { type })));
  },
};
