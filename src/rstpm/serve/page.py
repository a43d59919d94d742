"""The page at ``/``: for a person at the line, choose a run, drop or pick an image, read the
verdict and see the overlay. One self-contained HTML document (inline style and script, nothing
fetched from elsewhere); the run list is written into it by the server, the image goes to
``POST /v1/runs/{name}/predict?overlay=png`` as multipart.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rstpm inspection</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 52rem; color: #222;
       padding: 0 1rem; }
h1 { font-size: 1.4rem; }
#drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center;
        cursor: pointer; margin: 1rem 0; }
#drop.over { background: #eef6ff; border-color: #2a7ae2; }
#verdict { font-size: 2rem; font-weight: bold; margin: .5rem 0; }
#verdict.normal { color: #1b7f3b; }
#verdict.anomalous { color: #c62828; }
#error { color: #c62828; }
#overlay { max-width: 100%; image-rendering: pixelated; display: none; }
table { border-collapse: collapse; }
td { padding: .15rem .8rem .15rem 0; }
.muted { color: #666; font-size: .9rem; }
</style>
</head>
<body>
<h1>rstpm inspection</h1>
<p class="muted">Server: <span id="status">checking...</span></p>
<label for="run">Run</label>
<select id="run" name="run">__OPTIONS__</select>
<div id="drop" tabindex="0">Drop an image here, or click to choose one
  (PNG, JPEG, BMP, TIFF)<input id="file" type="file"
  accept="image/png,image/jpeg,image/bmp,image/tiff,.tif,.tiff" hidden></div>
<div id="verdict"></div>
<p id="error"></p>
<table id="numbers"></table>
<img id="overlay" alt="overlay of the anomaly map">
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function show(data) {
  $("verdict").textContent = data.verdict || "no verdict (run not calibrated)";
  $("verdict").className = data.verdict || "";
  const rows = [["score", data.score], ["normalised score", data.normalised_score],
    ["image threshold", data.threshold && data.threshold.image],
    ["defect area", data.defect_area_fraction], ["variant", data.variant]];
  $("numbers").replaceChildren(...rows.map(([name, value]) => {
    const tr = document.createElement("tr");
    for (const text of [name, typeof value === "number" ? value.toPrecision(4) : value]) {
      const td = document.createElement("td");
      td.textContent = text === null || text === undefined ? "-" : String(text);
      tr.appendChild(td);
    }
    return tr;
  }));
  if (data.overlay_png) {
    $("overlay").src = "data:image/png;base64," + data.overlay_png;
    $("overlay").style.display = "block";
  }
}
async function inspect(file) {
  $("error").textContent = "";
  $("verdict").textContent = "...";
  $("verdict").className = "";
  $("overlay").style.display = "none";
  const form = new FormData();
  form.append("file", file, file.name);
  const run = encodeURIComponent($("run").value);
  try {
    const response = await fetch(`v1/runs/${run}/predict?overlay=png`,
                                 {method: "POST", body: form});
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    show(data);
  } catch (error) {
    $("verdict").textContent = "";
    $("error").textContent = String(error.message || error);
  }
}
const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
drop.addEventListener("keydown", (e) => { if (e.key === "Enter") $("file").click(); });
$("file").addEventListener("change", () => {
  if ($("file").files[0]) inspect($("file").files[0]);
});
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) inspect(e.dataTransfer.files[0]);
});
fetch("readyz").then((r) => r.json()).then((d) => {
  $("status").textContent = d.ready ? "ready" : "not ready";
}).catch(() => { $("status").textContent = "unreachable"; });
</script>
</body>
</html>
"""


def render_page(run_names: Sequence[str]) -> str:
    """The page with one ``<option>`` per run."""
    options = "".join(
        f'<option value="{html.escape(name)}">{html.escape(name)}</option>' for name in run_names
    )
    return _TEMPLATE.replace("__OPTIONS__", options)
