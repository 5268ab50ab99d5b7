// "The line learns" (issue 14): the Learn page (labelled counts, a proposal as a before/after table,
// Apply / Discard, the recipe's versions with a one-click rollback) and the drift words the live and
// system pages show. Loaded after app.js, whose helpers ($, el, api, toast, fmt, when, allows) it uses.
// Every server text goes in as text (el() appends strings as text nodes), never as HTML.
"use strict";

const L = { recipe: null, proposal: null };

function pct(x) {
  if (x === null || x === undefined || !Number.isFinite(Number(x))) return "–";
  const v = 100 * Number(x);
  return (v < 10 ? v.toFixed(1) : v.toFixed(0)) + " %";
}

// --- drift, in plain words -----------------------------------------------------------------------
function labelledWords(d) {
  const parts = [];
  if (d.labelled_good) parts.push(`${pct(d.labelled_frr)} of ${d.labelled_good} parts labelled good were rejected`);
  if (d.labelled_defect) parts.push(`${pct(d.labelled_escape)} of ${d.labelled_defect} parts labelled defect were passed`);
  return parts.length ? "labelled: " + parts.join("; ") : "";
}

// One line for a camera's drift state (the system page's column): the message, or "in band".
function driftWords(d) {
  if (!d) return "–";
  const base = d.message || `in band (${d.passed_parts || 0} passed parts watched)`;
  const lab = labelledWords(d);
  return lab ? `${base} · ${lab}` : base;
}

// The live page's drift box of one camera: shown only when drifting or when there are labels.
function showDrift(box, d) {
  const kids = [];
  if (d && d.message) kids.push(el("p", { class: "drift-msg" }, d.message));
  const lab = d ? labelledWords(d) : "";
  if (lab) kids.push(el("p", { class: "drift-labels" }, lab));
  box.className = "drift" + (d && d.message ? " warn" : "");
  box.replaceChildren(...kids);
}

// --- the Learn page ------------------------------------------------------------------------------
async function showLearn() {
  const sel = $("#learn-recipe");
  const recipes = await api("GET", "/api/recipes").catch(() => []);
  const onCamera = (S.cameras.find((c) => c.recipe) || {}).recipe || "";
  const keep = sel.value || L.recipe || onCamera;
  sel.replaceChildren(...recipes.map((r) => el("option", { value: r.name }, r.name + (r.live ? "" : " (not live)"))));
  if (recipes.some((r) => r.name === keep)) sel.value = keep;
  // Viewers and operators see the figures; the buttons that change a recipe are a technician's.
  $("#learn-propose").hidden = !allows("technician");
  $("#learn-propose").disabled = !sel.value || !allows("technician");
  if (!recipes.length) {
    $("#learn-counts").textContent = "No recipe yet: enroll one first.";
    return;
  }
  await loadLearn().catch((e) => toast(e.message));
}
$("#learn-recipe").addEventListener("change", () => loadLearn().catch((e) => toast(e.message)));

async function loadLearn() {
  const name = $("#learn-recipe").value;
  L.recipe = name;
  if (!name) return;
  const enc = encodeURIComponent(name);
  const [counts, versions, pending, cams] = await Promise.all([
    api("GET", `/api/recipes/${enc}/labelled`).catch((e) => ({ error: e.message })),
    api("GET", `/api/recipes/${enc}/versions`).catch(() => []),
    api("GET", `/api/recipes/${enc}/proposal`).catch(() => null),  // 404: none pending
    api("GET", "/api/cameras").catch(() => []),
  ]);
  if (name !== $("#learn-recipe").value) return;  // another recipe was picked meanwhile
  renderCounts(counts);
  renderLearnDrift(cams.filter((c) => c.recipe === name));
  renderProposal(pending);
  renderVersions(name, versions);
}

function renderCounts(c) {
  const box = $("#learn-counts");
  if (c.error) { box.textContent = c.error; return; }
  const words = [`${c.good} labelled good (${c.false_rejects} of them rejected by the line)`,
    `${c.defect} labelled defect (${c.escapes} of them passed)`, `live bank version v${c.bank_version}`];
  if (c.without_image) words.push(`${c.without_image} without a kept image (they cannot be scored again)`);
  box.textContent = words.join(" · ");
  box.dataset.good = String(c.good);
  box.dataset.defect = String(c.defect);
}

function renderLearnDrift(cams) {
  $("#learn-drift").replaceChildren(...cams.filter((c) => c.drift).map((c) =>
    el("p", { class: "drift" + (c.drift.message ? " warn" : "") }, `camera ${c.name}: ${driftWords(c.drift)}`)));
}

// "3 of 8 (38 %; at most 67 % with 95 % confidence)", or why there is no figure.
function rateCell(side, kind) {
  if (!side) return "–";
  const n = kind === "good" ? side.n_good : side.n_defect;
  if (!n) return kind === "good" ? "no labelled goods" : "no labelled defects";
  const count = kind === "good" ? side.false_rejects : side.escapes;
  const rate = kind === "good" ? side.false_reject_rate : side.escape_rate;
  const upper = kind === "good" ? side.false_reject_upper_95 : side.escape_upper_95;
  return `${count} of ${n} (${pct(rate)}; at most ${pct(upper)} with 95 % confidence)`;
}

function renderProposal(p) {
  L.proposal = p;
  $("#learn-proposal-card").hidden = !p;
  if (!p) return;
  $("#learn-proposal-base").textContent = `computed on bank version v${p.base_bank_version}`;
  const stale = $("#learn-stale");
  stale.hidden = !p.stale;
  stale.textContent = p.stale ? `The recipe changed since (live: v${p.live_bank_version}): propose again before applying.` : "";
  $("#learn-decide").hidden = !allows("technician");
  $("#learn-apply").disabled = !!p.stale || !allows("technician");
  $("#learn-discard").disabled = !allows("technician");
  const row = (what, id, before, after) => el("tr", {}, el("th", {}, what),
    el("td", { id: `learn-${id}-before` }, before), el("td", { id: `learn-${id}-after` }, after));
  $("#learn-table tbody").replaceChildren(
    row("False rejects (parts labelled good)", "frr", rateCell(p.before, "good"), rateCell(p.after, "good")),
    row("Escapes (parts labelled defect)", "esc", rateCell(p.before, "defect"), rateCell(p.after, "defect")),
    row("Threshold", "thr", fmt(p.threshold_before), fmt(p.threshold_after)));
  const refused = Object.entries(p.refused_goldens || {});
  const list = (items) => items.length ? items.join(", ") : "none";
  $("#learn-goldens").replaceChildren(
    el("p", { id: "learn-add" }, `Golden parts to add (${(p.add_goldens || []).length}): ${list(p.add_goldens || [])}`),
    el("p", { id: "learn-defects" }, `Labelled defects to add (${(p.add_defects || []).length}): ${list(p.add_defects || [])}` +
      (p.retrain_head ? " · the defect head is retrained" : "")),
    el("div", { id: "learn-refused" }, el("p", {}, `Not added as golden parts (${refused.length})${refused.length ? ":" : ""}`),
      refused.length ? el("ul", {}, refused.map(([n, why]) => el("li", {}, `${n}: ${why}`))) : null));
  $("#learn-notes").replaceChildren(...(p.notes || []).map((n) => el("li", {}, n)));
}

function renderVersions(recipe, versions) {
  const live = versions.find((v) => v.live) || {};
  $("#learn-versions tbody").replaceChildren(...versions.map((v) => {
    const back = !v.live && !v.error && allows("technician") ? el("button", { type: "button", id: `learn-rollback-${v.bank_version}`,
      class: v.bank_version === live.previous ? "" : "secondary",
      onclick: () => rollback(recipe, v.bank_version) }, v.bank_version === live.previous ? "Roll back (previous)" : "Roll back") : null;
    if (v.error) return el("tr", { "data-version": v.bank_version }, el("td", {}, `v${v.bank_version}`), el("td", { colspan: 8 }, v.error));
    return el("tr", { "data-version": v.bank_version, class: v.live ? "live" : "" }, el("td", {}, `v${v.bank_version}`),
      el("td", {}, v.live ? "LIVE" : ""), el("td", {}, when(v.updated_at)), el("td", {}, v.k ?? "–"), el("td", {}, v.defects ?? "–"),
      el("td", {}, fmt(v.threshold)), el("td", {}, v.by || "–"), el("td", {}, v.reason || "–"), el("td", {}, back));
  }));
}

async function learnBusy(fn) {
  const buttons = ["#learn-propose", "#learn-apply", "#learn-discard"];
  $("#learn-busy").hidden = false;
  for (const b of buttons) $(b).disabled = true;
  try { return await fn(); } catch (e) { toast(e.message); return null; } finally {
    $("#learn-busy").hidden = true;
    const tech = allows("technician");
    $("#learn-propose").disabled = !$("#learn-recipe").value || !tech;
    $("#learn-discard").disabled = !tech;
    $("#learn-apply").disabled = !!(L.proposal && L.proposal.stale) || !tech;
  }
}

$("#learn-propose").addEventListener("click", () => learnBusy(async () => {
  const name = $("#learn-recipe").value;
  const p = await api("POST", `/api/recipes/${encodeURIComponent(name)}/proposal`, {});
  renderProposal(p);
  toast(`proposal for ${name}: ${(p.add_goldens || []).length} golden parts to add`, true);
  await loadLearn();
}));

$("#learn-apply").addEventListener("click", () => learnBusy(async () => {
  const name = $("#learn-recipe").value;
  const r = await api("POST", `/api/recipes/${encodeURIComponent(name)}/proposal/apply`,
    { reason: $("#learn-reason").value.trim(), base_bank_version: L.proposal ? L.proposal.base_bank_version : null });
  $("#learn-reason").value = "";
  toast(`recipe ${name}: bank version v${r.bank_version} is live (v${r.base_bank_version} kept for a rollback)`, true);
  await loadLearn();
}));

$("#learn-discard").addEventListener("click", () => learnBusy(async () => {
  const name = $("#learn-recipe").value;
  await api("POST", `/api/recipes/${encodeURIComponent(name)}/proposal/discard`, {});
  toast(`proposal for ${name} discarded`, true);
  await loadLearn();
}));

async function rollback(recipe, version) {
  await learnBusy(async () => {
    const r = await api("POST", `/api/recipes/${encodeURIComponent(recipe)}/rollback`, { version });
    toast(`recipe ${recipe}: rolled back from v${r.from} to v${r.to}`, true);
    await loadLearn();
  });
}
