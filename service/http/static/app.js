// The imgcls web page: lists the served models (GET /models) and classifies images through POST /predict,
// one request per image so each shows its own latency. No framework, no build step, no CDN.
"use strict";

const $ = (selector) => document.querySelector(selector);
let served = [];

async function loadModels() {
  const state = $("#server-state");
  try {
    const response = await fetch("/models");
    const data = await response.json();
    served = data.models;
    state.textContent = data.ready ? "ready" : "not ready";
    state.className = "state " + (data.ready ? "ok" : "bad");
    const rows = [];
    for (const model of served) {
      for (const v of model.versions) {
        const tr = document.createElement("tr");
        const cells = [model.name, v.version, v.state, v.runtime || "", v.classes ? v.classes.join(", ") : (v.error || "")];
        for (const text of cells) {
          const td = document.createElement("td");
          td.textContent = text;
          tr.appendChild(td);
        }
        tr.classList.add(v.state === "READY" ? "ready" : "failed");
        rows.push(tr);
      }
    }
    $("#models tbody").replaceChildren(...rows);
    const select = $("#model");
    const current = select.value;
    select.replaceChildren(...served.filter((m) => m.versions.some((v) => v.state === "READY")).map((m) => new Option(m.name, m.name)));
    if (current) select.value = current;
    fillVersions();
  } catch (error) {
    state.textContent = "unreachable: " + error;
    state.className = "state bad";
  }
}

function fillVersions() {
  const model = served.find((m) => m.name === $("#model").value);
  const versions = model ? model.versions.filter((v) => v.state === "READY").map((v) => v.version) : [];
  $("#version").replaceChildren(new Option("latest", ""), ...versions.map((v) => new Option(String(v), String(v))));
}

async function classify(file) {
  const node = $("#result-template").content.firstElementChild.cloneNode(true);
  node.querySelector(".thumb").src = URL.createObjectURL(file);
  node.querySelector(".filename").textContent = file.name;
  node.querySelector(".latency").textContent = "classifying…";
  $("#results").prepend(node);
  const params = new URLSearchParams({ model: $("#model").value, top_k: $("#top-k").value, filename: file.name });
  if ($("#version").value) params.set("version", $("#version").value);
  const start = performance.now();
  try {
    const response = await fetch("/predict?" + params, {
      method: "POST", headers: { "Content-Type": file.type || "application/octet-stream" }, body: file,
    });
    const data = await response.json();
    const ms = performance.now() - start;
    if (!response.ok) {
      showError(node, `${response.status} ${data.code || ""}: ${data.error}`);
    } else {
      const result = data.results[0];
      if (result.error) {
        showError(node, `${result.error.code}: ${result.error.message}`);
      } else {
        const items = result.labels.map((label) => {
          const li = document.createElement("li");
          li.className = "label";
          li.innerHTML = '<span class="label-name"></span><span class="bar"><span class="fill"></span></span><span class="score"></span>';
          li.querySelector(".label-name").textContent = label.name;
          li.querySelector(".fill").style.width = (100 * label.score).toFixed(1) + "%";
          li.querySelector(".score").textContent = (100 * label.score).toFixed(1) + "%";
          return li;
        });
        node.querySelector(".labels").replaceChildren(...items);
      }
      node.dataset.model = `${data.model} v${data.version}`;
    }
    node.querySelector(".latency").textContent =
      `${ms.toFixed(1)} ms round trip` + (data.server_ms !== undefined ? `, ${data.server_ms.toFixed(1)} ms in the server` : "") +
      (node.dataset.model ? ` · ${node.dataset.model}` : "");
  } catch (error) {
    showError(node, String(error));
    node.querySelector(".latency").textContent = "";
  }
  node.classList.add("done");
}

function showError(node, text) {
  node.classList.add("failed");
  node.querySelector(".error").textContent = text;
}

function classifyAll(files) {
  for (const file of files) classify(file);
}

$("#files").addEventListener("change", (event) => { classifyAll(event.target.files); event.target.value = ""; });
$("#model").addEventListener("change", fillVersions);
const drop = $("#drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => { event.preventDefault(); classifyAll(event.dataTransfer.files); });
loadModels();
setInterval(loadModels, 10000);
