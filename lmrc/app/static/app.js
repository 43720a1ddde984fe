// lmrc app: the page. One session per tab (its id lives only in this script), every change goes to the server,
// which answers with the session's status; long work (open, propagate, export) is polled until it ends.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");

let sid = null;
let status = null;
let frame = 0;
let selected = null;      // object id being edited
let version = 0;          // bumps when masks may have changed, so the browser fetches them again
let polling = false;
let drag = null;          // the gesture in progress on the canvas
let awaitingExport = false;  // an export was asked for: download its file once it is built
const images = {frame: null, mask: null, reliability: null};

// --- talking to the server ---------------------------------------------------------------------------------------

async function api(path, body) {
  const response = await fetch("/api/" + path, {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({sid, ...(body || {})}),
  });
  return answer(response);
}

async function answer(response) {
  let data;
  try { data = await response.json(); } catch (e) { data = {error: `the server answered ${response.status}`}; }
  if (!response.ok || data.error) { throw new Error(data.error || `the server answered ${response.status}`); }
  return data;
}

function say(text, kind) {
  const box = $("message");
  box.textContent = text || "";
  box.className = text ? kind || "info" : "";
}

async function act(work) {      // run a user action; its failure is shown in the page, never thrown away
  try { say(""); await work(); } catch (e) { say(e.message, "error"); }
}

function url(kind, extra) {
  return `/api/${kind}?sid=${sid}&g=${status ? status.generation : 0}&${extra}`;
}

// --- status ------------------------------------------------------------------------------------------------------

function apply(next) {
  const before = status;
  status = next;
  const video = status.video;
  if (!before || !before.video || !video || before.generation !== status.generation) {
    frame = 0; selected = null; images.frame = null;
  }
  const slider = $("frame");
  slider.max = video ? video.frames - 1 : 0;
  slider.value = frame;
  if (selected === null && status.objects.length) selected = status.objects[status.objects.length - 1].id;
  renderObjects();
  renderMarks();
  renderJob();
  document.body.dataset.frames = video ? video.frames : 0;
  document.body.dataset.masked = status.masked_frames.length;
  if (video && (canvas.width !== video.width || canvas.height !== video.height)) {
    canvas.width = video.width; canvas.height = video.height;
  }
  version++;
  load();
}

function renderObjects() {
  const list = $("objects");
  list.textContent = "";
  for (const object of status.objects) {
    const button = document.createElement("button");
    button.dataset.object = object.id;
    button.className = object.id === selected ? "selected" : "";
    button.innerHTML = `<span class="swatch" style="background:${object.colour}"></span> object ${object.id}`;
    button.onclick = () => { selected = object.id; renderObjects(); };
    list.appendChild(button);
  }
}

function renderMarks() {
  const marks = $("marks");
  marks.textContent = "";
  const video = status.video;
  if (!video) return;
  for (const index of status.prompt_frames) {
    const mark = document.createElement("span");
    mark.style.left = `${(100 * index) / Math.max(1, video.frames - 1)}%`;
    mark.title = `prompt on frame ${index}`;
    marks.appendChild(mark);
  }
}

function renderJob() {
  const job = status.job;
  const running = job && job.state === "running";
  document.body.dataset.job = job ? `${job.kind}:${job.state}` : "none";
  document.body.dataset.jobNumber = job ? job.number : 0;
  $("cancel").disabled = !running;
  for (const id of ["propagate", "open", "add-object", "export-masks", "export-overlay", "export-cutout"]) {
    $(id).disabled = running;
  }
  const progress = $("progress");
  progress.max = job && job.total ? job.total : 1;
  progress.value = job ? job.done : 0;
  $("progress-text").textContent = job
    ? `${job.kind}: ${job.done}${job.total ? " / " + job.total : ""} frames` +
      (job.rate ? `, ${job.rate.toFixed(1)} frames/s` : "") + (job.state === "running" ? "" : ` (${job.state})`)
    : "";
  if (awaitingExport && job && job.kind.startsWith("export") && job.state !== "running") {
    awaitingExport = false;  // a fast export may be done before the first poll
    if (job.state === "done" && job.result) offerDownload(job.result);
  }
  if (job && job.state === "error") say(job.message, "error");
  else if (job && job.state !== "running" && job.message) say(job.message, "info");
  if (running && !polling) poll();
}

async function poll() {
  polling = true;
  try {
    while (true) {
      await new Promise((resolve) => setTimeout(resolve, 300));
      const response = await fetch(`/api/status?sid=${sid}`);
      const next = await answer(response);
      apply(next);
      if (!next.job || next.job.state !== "running") break;
    }
  } catch (e) { say(e.message, "error"); }
  polling = false;
}

function offerDownload(name) {
  const link = document.createElement("a");
  link.href = `/api/download?sid=${sid}&name=${encodeURIComponent(name)}`;
  link.download = name;
  link.textContent = name;
  link.className = "download";
  $("downloads").prepend(link, " ");
  link.click();
}

// --- drawing -----------------------------------------------------------------------------------------------------

function fetchImage(src) {
  return new Promise((resolve) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => resolve(null);  // 204: nothing there yet
    image.src = src;
  });
}

let loading = 0;
async function load() {
  const video = status && status.video;
  $("frame-label").textContent = video ? `frame ${frame} / ${video.frames - 1}` : "no video";
  if (!video) { draw(); return; }
  const ticket = ++loading;
  const showReliability = $("show-reliability").checked && status.reliability_frames.includes(frame);
  const [picture, mask, reliability] = await Promise.all([
    fetchImage(url("frame", `i=${frame}`)),
    status.masked_frames.includes(frame) ? fetchImage(url("mask", `i=${frame}&v=${version}`)) : null,
    showReliability ? fetchImage(url("reliability", `i=${frame}&name=${$("reliability-name").value}&v=${version}`)) : null,
  ]);
  if (ticket !== loading) return;  // a later frame was asked for meanwhile
  Object.assign(images, {frame: picture, mask, reliability});
  document.body.dataset.shown = `${status.generation}:${frame}:${version}`;
  draw();
}

function draw() {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (images.frame) ctx.drawImage(images.frame, 0, 0, canvas.width, canvas.height);
  if (images.reliability) ctx.drawImage(images.reliability, 0, 0, canvas.width, canvas.height);
  if (images.mask && $("show-masks").checked) {
    ctx.globalAlpha = 0.55;
    ctx.drawImage(images.mask, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }
  if (!drag) return;
  ctx.lineWidth = Math.max(2, canvas.width / 400);
  if (drag.tool === "box") {
    ctx.strokeStyle = "#ffeb3b";
    ctx.strokeRect(drag.x0, drag.y0, drag.x1 - drag.x0, drag.y1 - drag.y0);
  } else if (drag.path) {
    ctx.strokeStyle = drag.tool === "brush" ? "rgba(0,230,118,0.7)" : "rgba(255,23,68,0.7)";
    ctx.lineWidth = 2 * drag.radius; ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    drag.path.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    if (drag.path.length === 1) ctx.lineTo(drag.path[0][0] + 0.1, drag.path[0][1]);
    ctx.stroke();
  }
}

function goTo(index) {
  if (!status || !status.video) return;
  frame = Math.max(0, Math.min(status.video.frames - 1, index));
  $("frame").value = frame;
  load();
}

// --- prompts on the canvas -----------------------------------------------------------------------------------------

function tool() { return document.querySelector("input[name=tool]:checked").value; }

function position(event) {     // page pixels -> frame pixels
  const rect = canvas.getBoundingClientRect();
  return [(event.clientX - rect.left) * canvas.width / rect.width,
          (event.clientY - rect.top) * canvas.height / rect.height];
}

function scale() { return canvas.width / canvas.getBoundingClientRect().width; }

async function prompt(body) {
  if (!status || !status.video) throw new Error("open a video first");
  if (selected === null) {
    const made = await api("object");
    selected = made.id;
  }
  apply(await api("prompt", {frame, object: selected, ...body}));
}

canvas.addEventListener("mousedown", (event) => {
  if (!status || !status.video || event.button !== 0) return;
  const [x, y] = position(event);
  const kind = tool();
  drag = {tool: kind, x0: x, y0: y, x1: x, y1: y};
  if (kind === "brush" || kind === "eraser") {
    drag.radius = Number($("brush-size").value) * scale() / 2;
    drag.path = [[x, y]];
  }
  draw();
});

window.addEventListener("mousemove", (event) => {
  if (!drag) return;
  const [x, y] = position(event);
  drag.x1 = x; drag.y1 = y;
  if (drag.path) drag.path.push([x, y]);
  draw();
});

window.addEventListener("mouseup", () => {
  if (!drag) return;
  const gesture = drag;
  drag = null;
  act(async () => {
    if (gesture.tool === "box") {
      const box = [Math.min(gesture.x0, gesture.x1), Math.min(gesture.y0, gesture.y1),
                   Math.max(gesture.x0, gesture.x1), Math.max(gesture.y0, gesture.y1)];
      if (box[2] - box[0] < 3 || box[3] - box[1] < 3) { draw(); throw new Error("drag to draw a box around the object"); }
      await prompt({box: box.map(Math.round)});
    } else if (gesture.tool === "positive" || gesture.tool === "negative") {
      await prompt({point: [gesture.x1, gesture.y1, gesture.tool === "positive"]});
    } else {
      await prompt({stroke: {path: gesture.path, radius: gesture.radius, positive: gesture.tool === "brush"}});
    }
  });
});

// --- controls ------------------------------------------------------------------------------------------------------

$("frame").addEventListener("input", (event) => goTo(Number(event.target.value)));
$("prev").onclick = () => goTo(frame - 1);
$("next").onclick = () => goTo(frame + 1);
window.addEventListener("keydown", (event) => {
  if (event.target.tagName === "INPUT" && event.target.type === "text") return;
  if (event.key === "ArrowLeft") goTo(frame - 1);
  if (event.key === "ArrowRight") goTo(frame + 1);
});
for (const id of ["show-masks", "show-reliability", "reliability-name"]) $(id).addEventListener("change", load);

$("open").onclick = () => act(async () => apply(await api("open", {path: $("path").value})));

$("upload-video").addEventListener("change", (event) => act(async () => {
  const file = event.target.files[0];
  if (!file) return;
  say(`uploading ${file.name} ...`);
  const response = await fetch(`/api/upload?sid=${sid}&name=${encodeURIComponent(file.name)}`,
                               {method: "POST", body: file});
  apply(await answer(response));
  event.target.value = "";
}));

$("upload-folder").addEventListener("change", (event) => act(async () => {
  const files = Array.from(event.target.files).filter((f) => /\.(jpe?g|png)$/i.test(f.name));
  if (!files.length) throw new Error("that folder holds no jpg/png frames");
  for (let i = 0; i < files.length; i++) {
    say(`uploading frame ${i + 1} of ${files.length} ...`);
    const response = await fetch(`/api/upload?sid=${sid}&folder=1&first=${i === 0 ? 1 : 0}` +
                                 `&name=${encodeURIComponent(files[i].name)}`, {method: "POST", body: files[i]});
    await answer(response);
  }
  say("");
  apply(await api("open_upload"));
  event.target.value = "";
}));

$("add-object").onclick = () => act(async () => {
  const made = await api("object");
  selected = made.id;
  apply(made);
});

$("set-box").onclick = () => act(async () => {
  const numbers = $("box-input").value.split(/[ ,]+/).filter(Boolean).map(Number);
  if (numbers.length !== 4 || numbers.some(Number.isNaN)) throw new Error("type a box as four numbers: x0,y0,x1,y1");
  await prompt({box: numbers});
});

$("clear-object").onclick = () => act(async () => {
  if (selected === null) throw new Error("no object selected");
  apply(await api("clear", {frame, object: selected}));
});

$("propagate").onclick = () => act(async () => apply(await api("propagate")));
$("cancel").onclick = () => act(async () => apply(await api("cancel")));
for (const kind of ["masks", "overlay", "cutout"]) {
  $(`export-${kind}`).onclick = () => act(async () => {
    const next = await api("export", {kind});
    awaitingExport = true;
    apply(next);
  });
}

// --- the session -----------------------------------------------------------------------------------------------------

window.addEventListener("pagehide", () => {
  if (sid) navigator.sendBeacon("/api/close", JSON.stringify({sid}));
});

act(async () => {
  const response = await fetch("/api/session", {method: "POST"});
  const data = await response.json();
  sid = data.session;
  document.body.dataset.session = sid;
  apply(data);
  if (data.error) say(data.error, "error");
});
