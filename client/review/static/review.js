// leukograph review: the sample page. Plain JavaScript, no build step.
"use strict";
(function () {
  const config = JSON.parse(document.getElementById("config").textContent);
  const base = "/api/samples/" + encodeURIComponent(config.sample);
  const reviewerInput = document.getElementById("reviewer");
  const gallery = document.getElementById("gallery");
  const banner = document.getElementById("banner");
  let state = null;          // last /state answer
  let order = [];            // cell ids in gallery order
  let byId = new Map();      // id -> cell
  let focused = null;        // cell id
  let anchor = null;         // for shift-click ranges
  const selected = new Set();
  let busy = false;
  let pollTimer = null;
  let lastStateText = "";

  reviewerInput.value = localStorage.getItem("leukograph-reviewer") || "";
  reviewerInput.addEventListener("change", () => localStorage.setItem("leukograph-reviewer", reviewerInput.value.trim()));

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  }
  const title = (label) => (config.titles[label] || label);
  const pct = (v) => (v == null ? "-" : v.toFixed(1));

  function showBanner(message, ok) {
    banner.textContent = message;
    banner.className = "banner" + (ok ? " ok" : "");
    banner.hidden = !message;
  }

  async function call(path, payload) {
    const response = await fetch(base + path, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": config.csrf },
      body: JSON.stringify(payload),
    });
    const data = await response.json().catch(() => ({ error: "HTTP " + response.status }));
    if (!response.ok) { const err = new Error(data.error || ("HTTP " + response.status)); err.status = response.status; throw err; }
    return data;
  }

  function reviewer() {
    const name = reviewerInput.value.trim();
    if (!name) { showBanner("Enter your name as reviewer first (top right)."); reviewerInput.focus(); return null; }
    localStorage.setItem("leukograph-reviewer", name);
    return name;
  }

  async function refresh() {
    const response = await fetch(base + "/state", { credentials: "same-origin" });
    if (!response.ok) { showBanner("Cannot load the sample: HTTP " + response.status); return; }
    const text = await response.text();
    if (text !== lastStateText) {  // polling re-renders only what changed: the page stays put while counting
      lastStateText = text;
      state = JSON.parse(text);
      render();
    }
    clearTimeout(pollTimer);
    if (state.status === "counting") pollTimer = setTimeout(refresh, 2000);  // live while the stream counts
  }

  function render() {
    const signed = !!state.signoff;
    const status = document.getElementById("status");
    status.textContent = state.status;
    status.className = "status status-" + state.status.replace(" ", "-");
    renderDifferential();
    renderAgreement();
    renderGallery();
    renderAudit();
    document.querySelectorAll(".picker button").forEach((b) => { b.disabled = signed; });
    const signButton = document.getElementById("signoff");
    signButton.disabled = signed;
    const d = state.summary.differential;
    document.getElementById("signoff-state").textContent = signed
      ? "Signed off by " + state.signoff.reviewer + " at " + state.signoff.signed_at.slice(0, 19).replace("T", " ") + " UTC. The sample is locked."
      : (d.n_unidentified ? d.n_unidentified + " unidentified cell(s) still to classify before sign-off." : "Ready to sign off.");
  }

  function renderDifferential() {
    const d = state.summary.differential;
    const body = document.querySelector("#differential tbody");
    body.replaceChildren(...d.rows.map((r) => el("tr", { "data-class": r.name },
      el("td", { text: r.name }), el("td", { class: "num", text: r.count }), el("td", { class: "num", text: pct(r.percent) }),
      el("td", { text: r.ci_low == null ? "-" : pct(r.ci_low) + " - " + pct(r.ci_high) }))));
    body.append(el("tr", {}, el("td", { text: "WBC identified" }), el("td", { class: "num", id: "n-wbc", text: d.n_wbc }),
      el("td", { class: "num", text: d.n_wbc ? "100.0" : "-" }), el("td", { text: "target " + d.target })));
    document.getElementById("diff-note").textContent = state.signoff ? "(verified, signed)" : "(verified so far; preliminary)";
    document.getElementById("diff-extra").textContent =
      "Unidentified (not in %): " + d.n_unidentified + ". Not a white cell: " + state.summary.not_wbc +
      ". Smudge/unclassifiable: " + state.summary.smudge + ". Platelets: " + d.n_platelets +
      (d.platelets_per_100_wbc == null ? "" : " (" + d.platelets_per_100_wbc.toFixed(1) + " per 100 WBC)") + ".";
  }

  function renderAgreement() {
    const body = document.querySelector("#agreement tbody");
    body.replaceChildren(...state.summary.agreement.filter((r) => r.pre_classified).map((r) => el("tr", { "data-class": r.class },
      el("td", { text: title(r.class) }), el("td", { class: "num", text: r.pre_classified }), el("td", { class: "num", text: r.kept }),
      el("td", { class: "num", text: r.changed }),
      el("td", { class: "num", text: r.agreement_percent == null ? "-" : r.agreement_percent.toFixed(1) + "%" }),
      el("td", { text: Object.entries(r.changed_to).map(([k, v]) => title(k) + " " + v).join(", ") }))));
  }

  function groupsOf(cells) {
    // Unidentified first, then each class, then the two review-only choices; least confident first inside a group.
    const names = [config.unidentified, ...config.wbc, ...config.review_only];
    return names.map((name) => ({ name, cells: cells.filter((c) => c.label === name)
      .sort((a, b) => (a.confidence ?? 0) - (b.confidence ?? 0) || a.id.localeCompare(b.id)) }))
      .filter((g) => g.cells.length);
  }

  function renderGallery() {
    byId = new Map(state.cells.map((c) => [c.id, c]));
    const groups = groupsOf(state.cells);
    order = groups.flatMap((g) => g.cells.map((c) => c.id));
    for (const id of [...selected]) if (!byId.has(id)) selected.delete(id);
    if (focused && !byId.has(focused)) focused = null;
    if (!focused && order.length) focused = order[0];
    gallery.replaceChildren(...groups.map((g) => el("section", { class: "group", "data-group": g.name },
      el("h3", {}, title(g.name) + " ", el("span", { class: "count", text: "(" + g.cells.length + ")" })),
      el("div", { class: "cells" }, ...g.cells.map(cellTile)))));
    if (!order.length) gallery.append(el("p", { class: "note", text: "No white cell recorded yet." }));
    updateMarks();
  }

  function cellTile(c) {
    const tile = el("div", { class: "cell" + (c.version ? " reviewed" : "") + (c.label !== c.pre_label ? " changed" : ""),
      "data-id": c.id, "data-label": c.label, "data-version": c.version, title: "cell " + c.id },
      c.has_thumbnail ? el("img", { src: base + "/cells/" + c.id + "/thumbnail.jpg", alt: "cell " + c.id, loading: "lazy" })
        : el("div", { class: "note", text: "no image" }),
      el("div", { class: "caption" }, el("span", { class: "pre", title: "pre-classification", text: c.pre_label === config.unidentified ? "unident." : c.pre_label.slice(0, 6) }),
        el("span", { text: c.confidence == null ? "" : (100 * c.confidence).toFixed(0) + "%" })));
    tile.addEventListener("click", (event) => onClick(event, c.id));
    return tile;
  }

  function updateMarks() {
    gallery.querySelectorAll(".cell").forEach((t) => {
      t.classList.toggle("focused", t.dataset.id === focused);
      t.classList.toggle("selected", selected.has(t.dataset.id));
    });
    document.getElementById("selection-note").textContent = selected.size ? selected.size + " selected." : "";
  }

  function onClick(event, id) {
    if (event.shiftKey && anchor && order.includes(anchor)) {
      const [a, b] = [order.indexOf(anchor), order.indexOf(id)].sort((x, y) => x - y);
      order.slice(a, b + 1).forEach((x) => selected.add(x));
    } else if (event.ctrlKey || event.metaKey) {
      selected.has(id) ? selected.delete(id) : selected.add(id);
      anchor = id;
    } else {
      anchor = id;
    }
    focused = id;
    updateMarks();
    showDetail(id);
    gallery.focus();
  }

  function move(step) {
    if (!order.length) return;
    const at = focused ? order.indexOf(focused) : -1;
    focused = order[Math.max(0, Math.min(order.length - 1, at + step))];
    updateMarks();
    const tile = gallery.querySelector('.cell[data-id="' + focused + '"]');
    if (tile) tile.scrollIntoView({ block: "nearest" });
    showDetail(focused);
  }

  function targets() {
    const ids = selected.size ? [...selected] : (focused ? [focused] : []);
    return ids.filter((id) => byId.has(id)).map((id) => ({ id, version: byId.get(id).version }));
  }

  function nextAfter(ids) {
    const last = Math.max(...ids.map((x) => order.indexOf(x)));
    const rest = order.slice(last + 1).filter((x) => !ids.includes(x));
    return rest.length ? rest[0] : focused;
  }

  async function relabel(label, action) {
    if (busy || !state || state.signoff) return;
    const who = reviewer(); if (!who) return;
    const cells = targets();
    if (!cells.length) return;
    busy = true;
    const after = nextAfter(cells.map((c) => c.id));
    try {
      await call("/relabel", { cells, label, reviewer: who, action });
      showBanner((action === "accept" ? "Accepted " : "Reclassified ") + cells.length + " cell(s) as " + title(label) + ".", true);
      selected.clear();
      focused = after;
    } catch (err) {
      showBanner((err.status === 409 ? "Conflict: " : "Not saved: ") + err.message);
    } finally {
      busy = false;
      await refresh();
      if (focused) showDetail(focused);
    }
  }

  async function accept() {
    const cell = focused && byId.get(focused);
    if (!cell || selected.size) return relabelSelectionKeep();
    if (!config.wbc.includes(cell.pre_label)) { showBanner("An unidentified cell needs a class: press its number."); return; }
    return relabel(cell.pre_label, "accept");
  }

  async function relabelSelectionKeep() {
    showBanner("Enter accepts one focused cell; clear the selection (Esc) first.");
  }

  async function undo() {
    if (busy || !state || state.signoff) return;
    const who = reviewer(); if (!who) return;
    busy = true;
    try {
      const result = await call("/undo", { reviewer: who });
      showBanner("Undone: " + result.cells.length + " cell(s).", true);
    } catch (err) {
      showBanner((err.status === 409 ? "Conflict: " : "Cannot undo: ") + err.message);
    } finally { busy = false; await refresh(); }
  }

  async function signOff() {
    if (busy || !state || state.signoff) return;
    const who = reviewer(); if (!who) return;
    if (!window.confirm("Sign off sample " + config.sample + " as " + who + "? It cannot be changed afterwards.")) return;
    busy = true;
    try {
      await call("/signoff", { reviewer: who });
      showBanner("Signed off by " + who + ".", true);
    } catch (err) {
      showBanner("Not signed: " + err.message);
    } finally { busy = false; await refresh(); }
  }

  async function showDetail(id) {
    const response = await fetch(base + "/cells/" + id, { credentials: "same-origin" });
    if (!response.ok) return;
    const info = await response.json();
    const detail = document.getElementById("detail");
    detail.hidden = false;
    document.getElementById("detail-id").textContent = id;
    const frame = document.getElementById("detail-frame");
    frame.replaceChildren();
    if (info.frame) {
      const pic = svg("svg", { viewBox: "0 0 " + info.frame.width + " " + info.frame.height, id: "frame-svg" });
      pic.append(svg("image", { href: info.frame.url, x: 0, y: 0, width: info.frame.width, height: info.frame.height }));
      for (const c of info.cells) {
        const [x1, y1, x2, y2] = c.box;
        const rect = svg("rect", { x: x1, y: y1, width: x2 - x1, height: y2 - y1,
          class: c.kind + (c.cell_index === info.cell_index ? " this" : ""), "data-id": c.id });
        const tip = svg("title", {}); tip.textContent = c.id + ": " + c.label;
        rect.append(tip);
        pic.append(rect);
      }
      frame.append(pic, el("p", { class: "note", text: "Frame " + info.frame_index + (info.frame.frame_ref ? " (" + info.frame.frame_ref + ")" : "") }));
    } else {
      frame.append(el("p", { class: "note", text: "No frame image stored for this cell." }));
    }
    const me = info.cells.find((c) => c.cell_index === info.cell_index);
    const probs = Object.entries((me && me.probs) || {}).sort((a, b) => b[1] - a[1]);
    document.querySelector("#detail-probs tbody").replaceChildren(...probs.map(([k, v]) =>
      el("tr", {}, el("td", { text: k }), el("td", { class: "num", text: (100 * v).toFixed(1) + "%" }))));
    const cell = byId.get(id);
    document.getElementById("detail-meta").textContent = cell
      ? "Pre-classified " + cell.pre_label + "; now " + title(cell.label) + (cell.reviewer ? " (by " + cell.reviewer + ", version " + cell.version + ")" : "") + ". Model " + cell.model_version + "."
      : "";
  }

  function renderAudit() {
    document.querySelector("#audit tbody").replaceChildren(...state.audit.map((a) => el("tr", {},
      el("td", { class: "num", text: a.seq }), el("td", { text: a.at.slice(0, 19).replace("T", " ") }), el("td", { text: a.reviewer }),
      el("td", { text: a.action.replace("_", " ") }),
      el("td", { text: a.frame_index == null ? "" : a.frame_index + "-" + a.cell_index }),
      el("td", { text: a.from_label ? title(a.from_label) : "" }), el("td", { text: a.to_label ? title(a.to_label) : "" }))));
  }

  document.querySelectorAll(".choice").forEach((b) => b.addEventListener("click", () => relabel(b.dataset.label, "reclassify")));
  document.getElementById("accept").addEventListener("click", accept);
  document.getElementById("undo").addEventListener("click", undo);
  document.getElementById("signoff").addEventListener("click", signOff);

  document.addEventListener("keydown", (event) => {
    if (event.target === reviewerInput || event.altKey) return;
    const key = event.key;
    if ((event.ctrlKey || event.metaKey) && key.toLowerCase() === "z") { event.preventDefault(); undo(); return; }
    if (event.ctrlKey || event.metaKey) return;
    if (/^[1-9]$/.test(key)) {
      const label = config.choices[Number(key) - 1];
      if (label) { event.preventDefault(); relabel(label, "reclassify"); }
    } else if (key === "ArrowRight" || key === "ArrowDown") { event.preventDefault(); move(1); }
    else if (key === "ArrowLeft" || key === "ArrowUp") { event.preventDefault(); move(-1); }
    else if (key === "Enter") { event.preventDefault(); accept(); }
    else if (key === " ") { event.preventDefault(); if (focused) { selected.has(focused) ? selected.delete(focused) : selected.add(focused); updateMarks(); } }
    else if (key === "Escape") { selected.clear(); updateMarks(); }
    else if (key === "u") { undo(); }
  });

  refresh().then(() => { if (focused) showDetail(focused); });
})();
