// clipkit search page. Data from the API is only ever written with textContent or as an
// attribute value of a same-origin URL built from an integer id: never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let blobUrls = [];
let maxPixels = 1000000;  // the server's decode cap, from /healthz: larger images are shrunk here first

function apiHeaders() {
  const key = $("key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function say(text, isError) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (e) { /* not JSON */ }
  return "request failed (HTTP " + resp.status + ")";
}

function clearResults() {
  blobUrls.forEach((u) => URL.revokeObjectURL(u));
  blobUrls = [];
  $("results").replaceChildren();
}

async function setThumb(img, id) {
  const src = "/thumb/" + encodeURIComponent(String(id));
  const headers = apiHeaders();
  if (!Object.keys(headers).length) { img.src = src; return; }
  const resp = await fetch(src, { headers });  // an <img> cannot send the key header
  if (!resp.ok) return;
  const url = URL.createObjectURL(await resp.blob());
  blobUrls.push(url);
  img.src = url;
}

function card(hit) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.alt = hit.caption == null ? "" : String(hit.caption);
  img.loading = "lazy";
  if (Number.isInteger(hit.id)) setThumb(img, hit.id);
  const cap = document.createElement("figcaption");
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = typeof hit.score === "number" ? hit.score.toFixed(3) : "";
  const text = document.createElement("div");
  text.className = "caption";
  text.textContent = hit.caption == null ? "" : String(hit.caption);
  cap.append(score, text);
  const fullPath = hit.image_rel != null ? String(hit.image_rel) : hit.image != null ? String(hit.image) : "";
  if (fullPath) {  // only when the server is configured to return paths
    const path = document.createElement("div");
    path.className = "path";
    path.textContent = fullPath.split(/[\\/]/).pop();
    path.title = fullPath;
    cap.append(path);
  }
  fig.append(img, cap);
  return fig;
}

function show(results, t0) {
  clearResults();
  results.forEach((hit) => $("results").append(card(hit)));
  const ms = Math.round(performance.now() - t0);
  say(results.length ? results.length + " results in " + ms + " ms" : "no results", false);
}

async function run(request) {
  const t0 = performance.now();
  say("searching...", false);
  try {
    const resp = await request();
    if (!resp.ok) { clearResults(); say(await errorText(resp), true); return; }
    const body = await resp.json();
    show(Array.isArray(body.results) ? body.results : [], t0);
  } catch (e) {
    say("network error: " + e.message, true);
  }
}

function kValue() {
  const k = parseInt($("k").value, 10);
  const max = parseInt($("k").max, 10) || 100;
  return Number.isInteger(k) && k > 0 ? Math.min(k, max) : Math.min(24, max);
}

$("text-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = $("q").value.trim();
  if (!q) { say("type something to search for", true); return; }
  const params = new URLSearchParams({ q, k: String(kValue()) });
  run(() => fetch("/search?" + params.toString(), { headers: apiHeaders() }));
});

async function fitted(file) {
  // An image over the server's pixel cap is redrawn smaller (PNG) so the upload is accepted; anything the
  // browser cannot decode as a bitmap is sent as is, for the server to judge.
  let bitmap;
  try { bitmap = await createImageBitmap(file); } catch (e) { return file; }
  const pixels = bitmap.width * bitmap.height;
  if (pixels <= maxPixels) { bitmap.close(); return file; }
  const scale = Math.sqrt(maxPixels / pixels) * 0.99;
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.floor(bitmap.width * scale));
  canvas.height = Math.max(1, Math.floor(bitmap.height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  const blob = await new Promise((done) => canvas.toBlob(done, "image/png"));
  return blob || file;
}

$("file").addEventListener("change", async () => {
  const file = $("file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", await fitted(file), file.name);
  form.append("k", String(kValue()));
  run(() => fetch("/search", { method: "POST", body: form, headers: apiHeaders() }));
});

fetch("/healthz").then((r) => r.json()).then((h) => {
  $("status").textContent = h.count + " images, model " + h.model + ", dim " + h.dim;
  const maxK = Number(h.max_k);
  if (Number.isInteger(maxK)) $("k").max = String(maxK);
  if (Number.isInteger(h.max_pixels) && h.max_pixels > 0) maxPixels = h.max_pixels;
}).catch(() => {});
