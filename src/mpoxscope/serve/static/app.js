// mpoxscope page: pick, drop or take a photo -> POST api/predict -> bars, heat-map, abstain message.
// Plain script, no build step, no network access beyond this server.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const state = { maxBytes: null, maxPixels: null, busy: false, previewUrl: null };

  function setStatus(text, isError) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", Boolean(isError));
    el.setAttribute("role", isError ? "alert" : "status");
  }

  function pct(p) {
    return (100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1) + "%";
  }

  function fact(dl, name, value) {
    if (value === undefined || value === null || value === "") return;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    dl.append(dt, dd);
  }

  async function getJson(url) {
    const r = await fetch(url, { headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(url + ": HTTP " + r.status);
    return r.json();
  }

  async function loadModelInfo() {
    try {
      const m = await getJson("api/model");
      state.maxBytes = m.limits && m.limits.max_upload_bytes;
      state.maxPixels = m.limits && m.limits.max_pixels;
      if (state.maxBytes) $("limit-text").textContent = ", up to " + Math.round(state.maxBytes / 1e6) + " MB";
      $("intended-use").textContent = m.intended_use || "";
      const dl = $("model-facts");
      fact(dl, "Model", m.name + " (version " + m.version + ", " + m.runtime + ")");
      fact(dl, "Classes", (m.classes || []).join(", "));
      fact(dl, "Input size", m.image_size ? m.image_size + " px" : "");
      if (m.metrics) {
        const v = m.metrics;
        if (typeof v.accuracy === "number") fact(dl, "Validation accuracy", pct(v.accuracy));
        if (typeof v.f1_macro === "number") fact(dl, "Validation macro-F1", v.f1_macro.toFixed(3));
      } else {
        fact(dl, "Validation metrics", "none recorded for this run");
      }
      fact(dl, "Says \u201cuncertain\u201d below", pct(m.abstain_threshold) +
        (m.threshold_source === "calibration" ? " (calibrated)" : " (default, not calibrated)"));
      if (m.screening) {
        fact(dl, "Says \u201cpossible " + m.screening.target_class + " \u2014 refer\u201d",
          window.mpoxDecision.screeningFact(m));
      }
    } catch (e) {
      setStatus("Could not reach the model service: " + e.message, true);
    }
  }

  async function loadExplainMethods() {
    try {
      const info = await getJson("api/explain-methods");
      const select = $("method");
      select.replaceChildren();
      for (const m of info.methods) {
        const o = document.createElement("option");
        o.value = m;
        o.textContent = m;
        select.append(o);
      }
      select.hidden = info.methods.length < 2;
      $("explain-options").hidden = !info.available;
      if (!info.available && info.reason) {
        $("explain-note").textContent = "Heat-maps are off: " + info.reason + ".";
        $("explain-note").hidden = false;
      }
    } catch (e) {
      $("explain-options").hidden = true;
    }
  }

  function wantedMethod() {
    if ($("explain-options").hidden || !$("want-heatmap").checked) return "";
    return $("method").value || "";
  }

  async function post(file, method) {
    const body = new FormData();
    body.append("file", file, file.name || "photo");
    const url = "api/predict" + (method ? "?explain=" + encodeURIComponent(method) : "");
    const r = await fetch(url, { method: "POST", body: body });
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    return { ok: r.ok, status: r.status, data: data };
  }

  function detail(res) {
    const d = res.data && res.data.detail;
    if (typeof d === "string") return d;
    return "the server answered HTTP " + res.status;
  }

  function renderBars(result) {
    const list = $("bars");
    list.replaceChildren();
    const entries = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
    for (const [name, p] of entries) {
      const li = document.createElement("li");
      if (name === result.top_class) li.classList.add("top");
      const label = document.createElement("span");
      label.className = "name";
      label.textContent = name;
      const track = document.createElement("span");
      track.className = "track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = (100 * p).toFixed(1) + "%";  // CSSOM, allowed by the page's CSP
      track.append(fill);
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = pct(p);
      li.append(label, track, value);
      list.append(li);
    }
  }

  function render(result, explainNote, resizeNote) {
    $("result").hidden = false;
    // The server's decision, word for word (the same text as `mpoxscope predict`); see decision.js.
    const view = window.mpoxDecision.view(result);
    const decision = $("decision");
    decision.textContent = view.headline;
    decision.dataset.kind = view.kind;
    const abstain = $("abstain");
    abstain.hidden = !view.alert;
    abstain.textContent = view.alert ? view.detail : "";
    $("summary").textContent = view.alert ? view.topLine : view.detail;
    renderBars(result);
    const fig = $("heatmap-figure");
    if (result.explanation) {
      $("heatmap").src = "data:image/png;base64," + result.explanation.overlay_png_base64;
      $("heatmap-caption").textContent = "Where the model looked for \u201c" + result.explanation.target_class +
        "\u201d (" + result.explanation.method + ")";
      fig.hidden = false;
    } else {
      $("heatmap").removeAttribute("src");
      fig.hidden = true;
    }
    $("pictures").classList.toggle("single", fig.hidden);
    const t = result.timing_ms;
    $("timing").textContent = "Model " + result.model.name + " v" + result.model.version + " \u00b7 " +
      Math.round(t.total) + " ms" + (resizeNote ? " \u00b7 " + resizeNote : "") +
      (explainNote ? " \u00b7 heat-map unavailable: " + explainNote : "");
  }

  // Photos over the server's byte or pixel limit (50-200 MP phone modes) are scaled down here, in the
  // browser, to a JPEG that fits: the model sees a few hundred pixels anyway.
  async function shrink(file) {
    const limit = Math.floor(Math.sqrt(state.maxPixels || 16e6));
    const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    const scale = Math.min(1, Math.min(3000, limit) / Math.max(bitmap.width, bitmap.height));
    const w = Math.max(1, Math.round(bitmap.width * scale));
    const h = Math.max(1, Math.round(bitmap.height * scale));
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    canvas.getContext("2d").drawImage(bitmap, 0, 0, w, h);
    const note = "resized in your browser from " + bitmap.width + "\u00d7" + bitmap.height + " to " + w +
      "\u00d7" + h;
    bitmap.close();
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
    if (!blob) throw new Error("cannot re-encode the photo");
    const name = (file.name || "photo").replace(/\.[^.]*$/, "") + "-resized.jpg";
    return { file: new File([blob], name, { type: "image/jpeg" }), note: note };
  }

  async function analyse(file) {
    if (!file || state.busy) return;
    state.busy = true;
    document.body.classList.add("busy");
    document.body.setAttribute("aria-busy", "true");
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    $("photo").src = state.previewUrl;
    setStatus("Analysing the photo\u2026", false);
    let resizeNote = "";
    try {
      if (state.maxBytes && file.size > state.maxBytes) {
        try {
          ({ file: file, note: resizeNote } = await shrink(file));
        } catch (e) {
          setStatus("This file is " + (file.size / 1e6).toFixed(1) + " MB; the limit is " +
            Math.round(state.maxBytes / 1e6) + " MB, and this browser cannot resize it. Try a smaller photo.",
            true);
          return;
        }
      }
      const method = wantedMethod();
      let res = await post(file, method);
      if (res.status === 413 && !resizeNote) {  // too many pixels: scale down once and try again
        try {
          ({ file: file, note: resizeNote } = await shrink(file));
          res = await post(file, method);
        } catch (e) { /* keep the server's answer */ }
      }
      let explainNote = "";
      if (!res.ok && method && res.status === 400) {
        explainNote = detail(res);  // still show the classification, without the heat-map
        res = await post(file, "");
      }
      if (!res.ok) {
        $("result").hidden = true;
        setStatus("Could not analyse this file: " + detail(res), true);
        return;
      }
      render(res.data, explainNote, resizeNote);
      setStatus("Done.", false);
    } catch (e) {
      setStatus("Could not reach the model service (" + e.message + "). Is the server still running?", true);
    } finally {
      state.busy = false;
      document.body.classList.remove("busy");
      document.body.removeAttribute("aria-busy");
    }
  }

  function wire() {
    for (const id of ["pick", "camera"]) {
      $(id).addEventListener("change", (ev) => {
        const f = ev.target.files && ev.target.files[0];
        analyse(f);
        ev.target.value = "";  // picking the same file again still triggers a change
      });
    }
    const drop = $("drop");
    for (const name of ["dragenter", "dragover"]) {
      drop.addEventListener(name, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
    }
    for (const name of ["dragleave", "drop"]) {
      drop.addEventListener(name, () => drop.classList.remove("over"));
    }
    drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const f = ev.dataTransfer && ev.dataTransfer.files && ev.dataTransfer.files[0];
      analyse(f);
    });
    // A photo dropped outside the zone must not navigate away from the page.
    window.addEventListener("dragover", (ev) => ev.preventDefault());
    window.addEventListener("drop", (ev) => ev.preventDefault());
  }

  wire();
  loadModelInfo();
  loadExplainMethods();
})();
