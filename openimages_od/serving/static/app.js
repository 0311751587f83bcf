// openimages-od web page: upload a file or give a URL, draw the detections on a canvas.
// No external scripts (works offline). Colours match openimages_od/serving/draw.py PALETTE.
"use strict";
const PALETTE = [[255,0,255],[255,215,0],[0,255,255],[255,128,0],[128,255,0],
                 [255,0,128],[0,128,255],[255,255,255],[170,0,255],[0,255,128]];
const colorFor = (id) => { const c = PALETTE[(id - 1) % PALETTE.length]; return `rgb(${c[0]},${c[1]},${c[2]})`; };
const $ = (id) => document.getElementById(id);

function authHeaders() {
  const t = $("token").value.trim();
  return t ? { "Authorization": "Bearer " + t } : {};
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModelInfo() {
  try {
    const r = await fetch("/readyz");
    const j = await r.json();
    $("model-info").textContent = r.ok
      ? `model ${j.model.name} (${j.model.backbone || "?"}, ${j.model.num_classes} classes)`
      : `not ready: ${j.error.message}`;
  } catch (e) { $("model-info").textContent = "service unreachable"; }
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this image"));
    img.src = src;
  });
}

function render(img, result) {
  const canvas = $("canvas");
  canvas.width = result.width; canvas.height = result.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, result.width, result.height);
  const line = Math.max(2, Math.round(Math.min(result.width, result.height) / 150));
  const fontPx = Math.max(10, Math.round(Math.min(result.width, result.height) / 40));
  ctx.font = `${fontPx}px sans-serif`;
  const dets = result.detections.slice().reverse();  // best drawn last, on top
  for (const d of dets) {
    const b = d.box, color = colorFor(d.class_id);
    ctx.strokeStyle = color; ctx.lineWidth = line;
    ctx.strokeRect(b.x0 + line / 2, b.y0 + line / 2, b.x1 - b.x0 - line, b.y1 - b.y0 - line);
    const text = `${d.label} ${d.score.toFixed(2)}`;
    const tw = ctx.measureText(text).width + 4, th = fontPx + 4;
    const ty = b.y0 - th >= 0 ? b.y0 - th : b.y0 + line;
    ctx.fillStyle = color; ctx.fillRect(b.x0, ty, tw, th);
    ctx.fillStyle = "#000"; ctx.textBaseline = "top"; ctx.fillText(text, b.x0 + 2, ty + 2);
  }
  const tbody = $("detections").querySelector("tbody");
  tbody.replaceChildren();
  result.detections.forEach((d, i) => {
    const tr = document.createElement("tr");
    tr.className = "detection";
    const cells = [String(i + 1), d.label, d.mid, d.score.toFixed(3),
                   [d.box.x0, d.box.y0, d.box.x1, d.box.y1].map((v) => v.toFixed(0)).join(", ")];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
    tr.firstChild.style.borderLeft = `6px solid ${colorFor(d.class_id)}`;
    tbody.appendChild(tr);
  });
}

async function detect(ev) {
  ev.preventDefault();
  const file = $("file").files[0], url = $("url").value.trim();
  const minScore = $("min-score").value || "0.5";
  let body, headers = authHeaders(), imgSrc;
  if (file) {
    body = new FormData();
    body.append("image", file, file.name);
    body.append("min_score", minScore);
    imgSrc = URL.createObjectURL(file);
  } else if (url) {
    // Ask for the image back drawn-free but as data, so the canvas is never cross-origin tainted.
    body = JSON.stringify({ image: url, min_score: parseFloat(minScore), draw: true, format: "png" });
    headers["Content-Type"] = "application/json";
  } else {
    setStatus("choose a file or enter a URL", true);
    return;
  }
  setStatus("detecting…", false);
  document.body.dataset.state = "busy";
  try {
    const r = await fetch("/v1/detect", { method: "POST", body, headers });
    const j = await r.json();
    if (!r.ok) throw new Error(`${r.status} ${j.error.code}: ${j.error.message}`);
    if (!imgSrc) {
      // The server drew the boxes; show its image as the base and draw on top (same result).
      imgSrc = `data:${j.image_format};base64,${j.image}`;
    }
    const img = await loadImage(imgSrc);
    render(img, j);
    setStatus(`${j.num_detections} detection(s) in ${j.timing_ms} ms`, false);
    document.body.dataset.state = "done";
  } catch (e) {
    setStatus(e.message, true);
    document.body.dataset.state = "error";
  }
}

$("detect-form").addEventListener("submit", detect);
loadModelInfo();
