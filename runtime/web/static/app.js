// Technician station page: plain JS, no build step. Every text from the server goes in through
// textContent (never innerHTML) so a recipe or sample name can never inject markup.
"use strict";

const S = { user: null, role: null, csrf: null, cameras: [], timers: [], recipe: null, roi: null,
            askVerdict: null, conversation: newId() };
const ROLES = ["viewer", "operator", "technician", "admin"];  // lowest first, as auth.ROLES
const $ = (sel) => document.querySelector(sel);

function newId() { return Math.random().toString(36).slice(2, 12); }
function allows(role) { return ROLES.indexOf(S.role) >= ROLES.indexOf(role); }

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat(Infinity)) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}

function toast(msg, info) {
  const t = $("#toast");
  t.textContent = msg;
  t.className = info ? "info" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, info ? 2500 : 8000);
}

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (method !== "GET") {
    opts.headers["Content-Type"] = "application/json";
    opts.headers["X-CSRF-Token"] = S.csrf || "";
    opts.body = JSON.stringify(body || {});
  }
  const r = await fetch(path, opts);
  if (r.status === 401 && path !== "/api/login") { showLogin(); throw new Error("log in first"); }
  const data = (r.headers.get("Content-Type") || "").startsWith("application/json") ? await r.json() : await r.blob();
  if (!r.ok) throw new Error((data && data.error) || r.statusText);
  return data;
}

// Images come through fetch + object URLs: no flicker, and a failed frame keeps the last one.
async function loadImg(img, url) {
  // Only the newest request for an image may show: a slow older answer must not overwrite it.
  const n = (img._loads = (img._loads || 0) + 1);
  try {
    const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (!r.ok || n !== img._loads) return false;
    const blob = await r.blob();
    if (n !== img._loads) return false;
    const u = URL.createObjectURL(blob);
    img.onload = () => { if (img.dataset.prev) URL.revokeObjectURL(img.dataset.prev); img.dataset.prev = u; };
    img.src = u;
    return true;
  } catch (e) { return false; }
}

function fmt(v, n) { return v === null || v === undefined ? "–" : Number(v).toPrecision(n || 4); }
function when(iso) { return iso ? iso.replace("T", " ").slice(0, 23) : "–"; }

// --- session & navigation ------------------------------------------------------------------------
function showLogin() {
  S.user = null;
  for (const p of document.querySelectorAll(".page")) p.hidden = p.id !== "page-login";
  $("#nav").hidden = true; $("#logout").hidden = true; $("#who").textContent = "";
}

async function boot() {
  const s = await api("GET", "/api/session");
  if (!s.authenticated) { showLogin(); return; }
  Object.assign(S, { user: s.user, role: s.role, csrf: s.csrf });
  $("#who").textContent = `${s.user} (${s.role})`;
  $("#nav").hidden = false; $("#logout").hidden = false;
  for (const a of document.querySelectorAll("nav a[data-role]")) a.hidden = !allows(a.dataset.role);
  S.cameras = await api("GET", "/api/cameras");
  route();
}

function route() {
  if (!S.user) return showLogin();
  let page = (location.hash || "#live").slice(1);
  // A page the nav hides from this role (typed into the address bar) shows the live view instead.
  const link = [...document.querySelectorAll("nav a[data-role]")].find((a) => a.getAttribute("href") === "#" + page);
  if (link && !allows(link.dataset.role)) page = "live";
  for (const t of S.timers) clearInterval(t);
  S.timers = [];
  S.gen = (S.gen || 0) + 1;  // ends the live view's loop
  clearTimeout(S.loop);
  // Leaving the live view closes its MJPEG streams: removing src aborts the image's request.
  for (const i of document.querySelectorAll("img.live-frame")) i.removeAttribute("src");
  for (const p of document.querySelectorAll(".page")) p.hidden = p.id !== "page-" + page;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.getAttribute("href") === "#" + page);
  ({ live: showLive, enroll: showEnroll, learn: showLearn, history: showHistory, ask: showAsk, system: showSystem }[page] || showLive)();
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await api("POST", "/api/login", { username: $("#login-user").value, password: $("#login-pass").value });
    $("#login-pass").value = "";
    if (!location.hash || location.hash === "#login") location.hash = "#live";
    await boot();
  } catch (e) { toast(e.message); }
});
$("#logout").addEventListener("click", async () => { try { await api("POST", "/api/logout"); } finally { showLogin(); } });
window.addEventListener("hashchange", route);

// --- live view -----------------------------------------------------------------------------------
function showLive() {
  const box = $("#live-cams");
  box.replaceChildren();
  const views = [];
  for (const cam of S.cameras) {
    const v = { name: cam.name, lastId: null,
      img: el("img", { alt: `camera ${cam.name}`, class: "live-frame", "data-camera": cam.name }),
      roi: el("div", { class: "roi-box", hidden: true }), heat: el("img", { alt: "heatmap", class: "live-heatmap" }),
      badge: el("span", { class: "badge" }, "–"), info: el("div", { class: "vinfo" }), head: el("div", { class: "camhead" }),
      label: el("div", { class: "vlabel" }), drift: el("div", { class: "drift", id: `live-drift-${cam.name}` }) };
    // Technicians switch the camera's recipe here (any live recipe), audited like every recipe change.
    const assign = allows("technician") ? el("div", { class: "row assign" }) : null;
    box.append(el("div", { class: "cam", id: `cam-${cam.name}` }, v.head, v.drift, el("div", { class: "frame" }, v.img, v.roi),
      el("div", { class: "verdict" }, v.heat, el("div", {}, v.badge, v.info, v.label)), assign));
    if (assign) fillAssign(assign, cam.name);
    views.push(v);
  }
  if (!S.cameras.length) box.append(el("p", {}, "No cameras configured."));
  const gen = S.gen;
  for (const v of views) liveStream(v, gen);
  // One loop for the cameras' status and verdicts, the next round only after this one finished: a
  // slow station never piles requests up. The images themselves come as MJPEG streams.
  const round = async () => {
    const cams = await api("GET", "/api/cameras").catch(() => null);
    await Promise.all(views.map((v) => updateCamera(v, cams && cams.find((x) => x.name === v.name))));
    if (gen === S.gen) S.loop = setTimeout(round, 700);
  };
  round();
}

// The camera's live view: one MJPEG stream (multipart/x-mixed-replace) that the server paces; it is
// opened again a little later when it fails (camera without frames yet, station restarted).
function liveStream(v, gen) {
  const open = () => { if (gen === S.gen) v.img.src = `/api/cameras/${encodeURIComponent(v.name)}/live.mjpg?g=${gen}`; };
  v.img.onerror = () => { if (gen === S.gen) setTimeout(open, 2000); };
  open();
}

async function updateCamera(v, c) {
  const name = encodeURIComponent(v.name);
  if (c) {
    v.head.replaceChildren(el("strong", {}, c.name), ` · ${c.status} · recipe `, el("b", {}, c.recipe || "none"),
      c.inspect_fps ? ` · ${c.inspect_fps} fps · p50 ${fmt(c.latency_ms_p50, 3)} ms` : "",
      c.inspection_error ? el("div", { class: "reason" }, c.inspection_error) : "");
    showDrift(v.drift, c.drift);  // learn.js: the recipe's drift in plain words, labelled rates
    if (c.roi && c.frame_size && v.img.clientWidth) {
      const k = v.img.clientWidth / c.frame_size[0];
      Object.assign(v.roi.style, { left: c.roi[0] * k + "px", top: c.roi[1] * k + "px",
        width: c.roi[2] * k + "px", height: c.roi[3] * k + "px" });
      v.roi.hidden = false;
    } else v.roi.hidden = true;
  }
  const last = await api("GET", `/api/cameras/${name}/verdict`).catch(() => null);
  if (last && last.id !== v.lastId) {
    v.lastId = last.id;
    v.badge.textContent = last.verdict; v.badge.className = "badge " + last.verdict;
    v.info.replaceChildren(el("div", {}, `score ${fmt(last.score)} / threshold ${fmt(last.threshold)}`),
      el("div", {}, last.sentence), el("div", { class: "muted" }, when(last.captured_at)));
    v.label.replaceChildren(labelButtons(last.id, null, "live", v.name));
    // Ask for this verdict's overlay by id: the camera may have moved on since.
    loadImg(v.heat, `/api/cameras/${name}/overlay.jpg?id=${last.id}`);
  }
}

async function fillAssign(box, camera) {
  const recipes = (await api("GET", "/api/recipes").catch(() => [])).filter((r) => r.live);
  const sel = el("select", { id: `assign-${camera}` }, el("option", { value: "" }, "(no recipe)"),
    ...recipes.map((r) => el("option", { value: r.name }, r.name)));
  const current = S.cameras.find((c) => c.name === camera);
  sel.value = (current && current.recipe) || "";
  box.replaceChildren(el("label", {}, "Recipe on this camera", sel), el("button", { type: "button", id: `assign-btn-${camera}`,
    onclick: async () => {
      try {
        await api("POST", "/api/recipes/assign", { camera, recipe: sel.value || null });
        S.cameras = await api("GET", "/api/cameras");
        toast(`camera ${camera}: recipe ${sel.value || "none"}`, true);
      } catch (e) { toast(e.message); }
    } }, "Use"));
}

// --- enrollment wizard ---------------------------------------------------------------------------
const E = { frame: new Image(), drag: null, frameSize: null };

async function showEnroll() {
  const camSel = $("#enroll-camera");
  if (!camSel.options.length) for (const c of S.cameras) camSel.append(el("option", { value: c.name }, c.name));
  const pick = $("#enroll-recipe-pick");
  const recipes = await api("GET", "/api/recipes");
  const keep = pick.value;
  pick.replaceChildren(el("option", { value: "" }, "(new recipe)"), ...recipes.map((r) =>
    el("option", { value: r.name }, `${r.name}${r.live ? " (live)" : ""}`)));
  pick.value = keep;
  drawRoiCanvas();
  const tick = async () => {
    const cam = camSel.value;
    if (!cam || E.drag) return;
    const r = await fetch(`/api/cameras/${encodeURIComponent(cam)}/frame.jpg`, { cache: "no-store" });
    if (!r.ok) return;
    const bmp = await createImageBitmap(await r.blob());
    E.bitmap = bmp; E.frameSize = [bmp.width, bmp.height];
    drawRoiCanvas();
  };
  tick();
  S.timers.push(setInterval(tick, 800));
  if (S.recipe) renderRecipe(await api("GET", `/api/recipes/${encodeURIComponent(S.recipe)}`));
}

function drawRoiCanvas() {
  const cv = $("#enroll-canvas");
  const ctx = cv.getContext("2d");
  if (E.bitmap) {
    if (cv.width !== E.bitmap.width || cv.height !== E.bitmap.height) { cv.width = E.bitmap.width; cv.height = E.bitmap.height; }
    ctx.drawImage(E.bitmap, 0, 0);
  } else { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, cv.width, cv.height); }
  const r = E.drag ? E.drag.rect : S.roi;
  if (r) {
    ctx.strokeStyle = "#ffd400"; ctx.lineWidth = Math.max(2, cv.width / 320); ctx.setLineDash([8, 4]);
    ctx.strokeRect(r[0], r[1], r[2], r[3]);
    ctx.setLineDash([]);
  }
}

function canvasPoint(ev) {
  const cv = $("#enroll-canvas");
  const b = cv.getBoundingClientRect();
  const x = Math.round((ev.clientX - b.left) * cv.width / b.width);
  const y = Math.round((ev.clientY - b.top) * cv.height / b.height);
  return [Math.max(0, Math.min(cv.width, x)), Math.max(0, Math.min(cv.height, y))];
}

$("#enroll-canvas").addEventListener("pointerdown", (ev) => {
  ev.preventDefault();
  $("#enroll-canvas").setPointerCapture(ev.pointerId);
  const p = canvasPoint(ev);
  E.drag = { start: p, rect: [p[0], p[1], 0, 0] };
});
$("#enroll-canvas").addEventListener("pointermove", (ev) => {
  if (!E.drag) return;
  const [x0, y0] = E.drag.start, [x1, y1] = canvasPoint(ev);
  E.drag.rect = [Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0)];
  drawRoiCanvas();
});
$("#enroll-canvas").addEventListener("pointerup", () => {
  if (!E.drag) return;
  const r = E.drag.rect;
  E.drag = null;
  if (r[2] >= 8 && r[3] >= 8) S.roi = r;
  $("#enroll-roi").textContent = S.roi ? `x ${S.roi[0]}, y ${S.roi[1]}, ${S.roi[2]} × ${S.roi[3]} px` : "whole image";
  drawRoiCanvas();
});
$("#enroll-roi-clear").addEventListener("click", () => { S.roi = null; $("#enroll-roi").textContent = "whole image"; drawRoiCanvas(); });
$("#enroll-recipe-pick").addEventListener("change", async (ev) => {
  if (!ev.target.value) return;
  const r = await api("GET", `/api/recipes/${encodeURIComponent(ev.target.value)}`);
  S.roi = r.roi; $("#enroll-roi").textContent = r.roi ? `x ${r.roi[0]}, y ${r.roi[1]}, ${r.roi[2]} × ${r.roi[3]} px` : "whole image";
  drawRoiCanvas();
});

const ENROLL_BUTTONS = ["#enroll-capture", "#enroll-finish", "#enroll-upload", "#defect-capture", "#defect-upload", "#defect-save"];
function enableEnroll() {
  const on = !!S.recipe;
  for (const b of ENROLL_BUTTONS) $(b).disabled = !on;
}

async function busy(fn) {
  $("#enroll-busy").hidden = false;
  for (const b of [...ENROLL_BUTTONS, "#enroll-start"]) $(b).disabled = true;
  try { return await fn(); } catch (e) { toast(e.message); return null; } finally {
    $("#enroll-busy").hidden = true;
    $("#enroll-start").disabled = false;
    enableEnroll();
  }
}

function readDataUrl(file) {
  return new Promise((ok, bad) => { const r = new FileReader(); r.onload = () => ok(r.result); r.onerror = bad; r.readAsDataURL(file); });
}

$("#enroll-start").addEventListener("click", () => busy(async () => {
  const name = $("#enroll-recipe-pick").value || $("#enroll-recipe-new").value.trim();
  if (!name) throw new Error("pick a recipe or type a new name");
  const body = { recipe: name, camera: $("#enroll-camera").value, roi: S.roi,
                 target_frr: Number($("#enroll-frr").value) };
  const state = await api("POST", "/api/enroll/start", body);
  S.recipe = state.name;
  renderRecipe(state);
  toast(`enrolling into ${state.name}`, true);
}));

$("#enroll-capture").addEventListener("click", () => busy(async () => {
  const res = await api("POST", "/api/enroll/capture", { recipe: S.recipe, camera: $("#enroll-camera").value });
  renderStep(res);
}));

$("#enroll-upload").addEventListener("change", (ev) => busy(async () => {
  const files = [];
  for (const f of ev.target.files) files.push({ name: f.name, data: await readDataUrl(f) });
  ev.target.value = "";
  if (files.length) renderStep(await api("POST", "/api/enroll/upload", { recipe: S.recipe, files }));
}));

$("#enroll-finish").addEventListener("click", () => busy(async () => {
  const res = await api("POST", "/api/enroll/finish", { recipe: S.recipe, camera: $("#enroll-camera").value,
                                                         accept_flagged: $("#enroll-accept").checked });
  renderStep(res);
  const live = res.state.live;
  $("#enroll-result").replaceChildren(el("p", { class: live ? "quality ok" : "quality bad", id: "enroll-status" },
    live ? `Recipe ${res.recipe} is LIVE on camera ${$("#enroll-camera").value}: ${res.k} golden samples, bank v${res.bank_version}.`
         : `Recipe ${res.recipe} is NOT live: ${res.k < 2 ? "enroll at least two good parts" : "the quality check flagged samples; remove them or accept them"}.`));
  S.cameras = await api("GET", "/api/cameras");
}));

// --- known-defective parts: capture, upload or mark a golden sample; optional painted mask ----------
// The brush paints on a visible canvas (the image with a red overlay) and, in white on black, on an
// off-screen canvas of the image's own size: that one is sent as the PNG mask.
const P = { img: null, mask: null, painted: false, drawing: null, target: null };

function defectType() {
  const v = $("#defect-type").value.trim();
  return v || null;
}

async function openPaint(title, blob, target) {
  const url = URL.createObjectURL(blob);
  const img = new Image();
  await new Promise((ok, bad) => { img.onload = ok; img.onerror = () => bad(new Error("cannot show this image")); img.src = url; });
  const cv = $("#defect-canvas");
  cv.width = img.naturalWidth; cv.height = img.naturalHeight;
  P.mask = document.createElement("canvas");
  P.mask.width = cv.width; P.mask.height = cv.height;
  const m = P.mask.getContext("2d");
  m.fillStyle = "#000"; m.fillRect(0, 0, cv.width, cv.height);
  Object.assign(P, { img, painted: false, drawing: null, target });
  $("#defect-paint-title").textContent = title;
  $("#defect-paint").hidden = false;
  drawPaint();
  cv.scrollIntoView({ block: "center" });
}

function closePaint() {
  if (P.img) URL.revokeObjectURL(P.img.src);
  Object.assign(P, { img: null, mask: null, painted: false, drawing: null, target: null });
  $("#defect-paint").hidden = true;
}

function drawPaint() {
  const cv = $("#defect-canvas"), ctx = cv.getContext("2d");
  if (!P.img) return;
  ctx.globalAlpha = 1; ctx.drawImage(P.img, 0, 0);
  ctx.globalAlpha = 0.45;
  // The mask's white becomes red on the image: the technician sees exactly what will be sent.
  const tmp = document.createElement("canvas");
  tmp.width = cv.width; tmp.height = cv.height;
  const t = tmp.getContext("2d");
  t.drawImage(P.mask, 0, 0);
  t.globalCompositeOperation = "multiply"; t.fillStyle = "#f00"; t.fillRect(0, 0, cv.width, cv.height);
  ctx.globalCompositeOperation = "lighter"; ctx.drawImage(tmp, 0, 0);
  ctx.globalCompositeOperation = "source-over"; ctx.globalAlpha = 1;
}

function paintAt(ev) {
  const cv = $("#defect-canvas"), b = cv.getBoundingClientRect();
  const x = (ev.clientX - b.left) * cv.width / b.width, y = (ev.clientY - b.top) * cv.height / b.height;
  const r = Number($("#defect-brush").value) * cv.width / Math.max(b.width, 1) / 2;
  const m = P.mask.getContext("2d");
  m.strokeStyle = "#fff"; m.fillStyle = "#fff"; m.lineWidth = 2 * r; m.lineCap = "round";
  m.beginPath();
  if (P.drawing) { m.moveTo(P.drawing[0], P.drawing[1]); m.lineTo(x, y); m.stroke(); }
  else { m.arc(x, y, r, 0, 2 * Math.PI); m.fill(); }
  P.drawing = [x, y]; P.painted = true;
  drawPaint();
}

$("#defect-canvas").addEventListener("pointerdown", (ev) => {
  if (!P.img) return;
  ev.preventDefault();
  $("#defect-canvas").setPointerCapture(ev.pointerId);
  P.drawing = null;
  paintAt(ev);
});
$("#defect-canvas").addEventListener("pointermove", (ev) => { if (P.img && P.drawing) paintAt(ev); });
$("#defect-canvas").addEventListener("pointerup", () => { P.drawing = null; });
$("#defect-clear").addEventListener("click", () => {
  if (!P.mask) return;
  const m = P.mask.getContext("2d");
  m.fillStyle = "#000"; m.fillRect(0, 0, P.mask.width, P.mask.height);
  P.painted = false; drawPaint();
});
$("#defect-cancel").addEventListener("click", closePaint);

$("#defect-save").addEventListener("click", () => busy(async () => {
  if (!P.target) throw new Error("capture, upload or mark a part first");
  const mask = P.painted ? P.mask.toDataURL("image/png") : null;
  const t = P.target, type = defectType();
  let res;
  if (t.kind === "upload") {
    res = await api("POST", "/api/enroll/defect/upload", { recipe: S.recipe,
      files: [{ name: t.name, data: t.data, mask, defect_type: type }] });
  } else {
    res = await api("POST", "/api/enroll/defect/mark", { recipe: S.recipe, sample: t.name, mask, defect_type: type });
  }
  closePaint();
  renderStep(res);
  toast(`${t.name} enrolled as a defect${mask ? " with its painted region" : ""}`, true);
}));

$("#defect-capture").addEventListener("click", () => busy(async () => {
  renderStep(await api("POST", "/api/enroll/defect/capture", { recipe: S.recipe, camera: $("#enroll-camera").value,
                                                              defect_type: defectType() }));
}));

$("#defect-upload").addEventListener("change", (ev) => busy(async () => {
  const chosen = [...ev.target.files];
  ev.target.value = "";
  if (chosen.length === 1) {  // one image: paint its defect first
    const f = chosen[0];
    await openPaint(`Uploaded ${f.name}: paint the defect (optional)`, f, { kind: "upload", name: f.name, data: await readDataUrl(f) });
    return;
  }
  const files = [];
  for (const f of chosen) files.push({ name: f.name, data: await readDataUrl(f), defect_type: defectType() });
  if (files.length) renderStep(await api("POST", "/api/enroll/defect/upload", { recipe: S.recipe, files }));
}));

async function markDefective(recipe, s) {
  const blob = await api("GET", `/api/recipes/${encodeURIComponent(recipe)}/samples/${s.sha256}.png`);
  await openPaint(`Golden sample ${s.name} is defective: paint the defect (optional)`, blob, { kind: "mark", name: s.name });
}

function renderStep(res) {
  if (res.skipped && res.skipped.length) toast(res.skipped.join("; "), true);
  renderRecipe(res.state, res);
}

function renderRecipe(state, step) {
  S.recipe = state.name;
  const nd = (state.defects || []).length;
  $("#enroll-current").textContent = `recipe ${state.name} · ${state.k} samples${nd ? ` · ${nd} defects` : ""} · ${state.live ? "LIVE" : "not live"}`;
  const q = (step && step.quality) || state.quality;
  const qbox = $("#enroll-quality");
  qbox.replaceChildren();
  if (q && q.method) {
    qbox.className = "quality " + (q.ok ? "ok" : "bad");
    qbox.append(el("div", {}, `Quality check (${q.method}): ${q.ok ? "passed" : "FAILED"}`));
    for (const f of q.flagged || []) qbox.append(el("div", {}, `Flagged ${f.name}: ${f.reason}`));
    if (q.inconsistent) qbox.append(el("div", {}, `Inconsistent: ${q.inconsistent}`));
  }
  const list = $("#enroll-samples");
  list.replaceChildren(...state.samples.map((s) => {
    const img = el("img", { alt: s.name });
    loadImg(img, `/api/recipes/${encodeURIComponent(state.name)}/samples/${s.sha256}.png`);
    return el("div", { class: "sample" + (s.flagged ? " flagged" : ""), "data-name": s.name }, img,
      el("div", {}, s.name), el("div", {}, s.score === null ? "score –" : `score ${fmt(s.score)}`),
      s.flagged ? el("div", { class: "reason" }, s.flagged) : null,
      el("button", { type: "button", class: "remove", onclick: () => busy(async () =>
        renderStep(await api("POST", "/api/enroll/remove", { recipe: state.name, sample: s.name }))) }, "Remove"),
      el("button", { type: "button", class: "mark", onclick: () => busy(() => markDefective(state.name, s)) }, "Defective"));
  }));
  $("#defect-list").replaceChildren(...(state.defects || []).map((d) => {
    const base = `/api/recipes/${encodeURIComponent(state.name)}/defects/${d.sha256}`;
    const img = el("img", { alt: d.name });
    loadImg(img, `${base}.png`);
    // The painted region over the thumbnail (white on black, screen-blended: only the region lights up).
    const mask = d.has_mask ? el("img", { alt: `${d.name} painted region`, class: "mask" }) : null;
    if (mask) loadImg(mask, `${base}/mask.png`);
    return el("div", { class: "sample defect", "data-name": d.name }, el("div", { class: "thumb" }, img, mask), el("div", {}, d.name),
      el("div", {}, d.defect_type ? el("span", { class: "tag" }, d.defect_type) : null, d.has_mask ? "painted region" : "no mask"),
      el("div", {}, d.score === null || d.score === undefined ? "score –" : `score ${fmt(d.score)}`),
      el("button", { type: "button", class: "remove-defect", onclick: () => busy(async () =>
        renderStep(await api("POST", "/api/enroll/defect/remove", { recipe: state.name, defect: d.name }))) }, "Remove"));
  }));
  const expect = (step && step.expectation) || state.expectation;
  $("#enroll-expect").textContent = expect && expect.explained ? expect.explained : "";
  const explained = (step && step.threshold_explained) || state.threshold_explained;
  // The first warning ("only N scores ...") says what explain() already says in plain words.
  const warn = (((step && step.threshold) || state.threshold || {}).warnings || []).filter((w) => !w.startsWith("only "));
  $("#enroll-threshold").textContent = explained ? explained + (warn.length ? "  (" + warn.join("; ") + ")" : "") : "";
  enableEnroll();
}

// --- history -------------------------------------------------------------------------------------
function histQuery() {
  const p = new URLSearchParams();
  if ($("#hist-camera").value) p.set("camera", $("#hist-camera").value);
  if ($("#hist-recipe").value) p.set("recipe", $("#hist-recipe").value);
  if ($("#hist-ng").checked) p.set("ng", "1");
  // datetime-local is the browser's local time: convert to an absolute instant.
  if ($("#hist-since").value) p.set("since", String(new Date($("#hist-since").value).getTime() / 1000));
  if ($("#hist-until").value) p.set("until", String(new Date($("#hist-until").value).getTime() / 1000));
  p.set("limit", $("#hist-limit").value || "100");
  return p.toString();
}

async function showHistory() {
  const camSel = $("#hist-camera"), recSel = $("#hist-recipe");
  if (camSel.options.length <= 1) for (const c of S.cameras) camSel.append(el("option", { value: c.name }, c.name));
  const recipes = await api("GET", "/api/recipes").catch(() => []);
  const keep = recSel.value;
  recSel.replaceChildren(el("option", { value: "" }, "all"), ...recipes.map((r) => el("option", { value: r.name }, r.name)));
  recSel.value = keep;
  await loadHistory();
}

async function loadHistory() {
  const q = histQuery();
  $("#hist-csv").href = "/api/history.csv?" + q;
  const rows = await api("GET", "/api/history?" + q);
  const tb = $("#hist-table tbody");
  tb.replaceChildren(...rows.map((r) => el("tr", { "data-id": r.id, "data-verdict": r.verdict, onclick: (ev) => {
    for (const x of tb.children) x.classList.remove("sel");
    ev.currentTarget.classList.add("sel");
    showDetail(r.id);
  } }, el("td", {}, when(r.captured_at)), el("td", {}, r.camera), el("td", {}, r.recipe),
    el("td", {}, el("span", { class: "badge " + r.verdict }, r.verdict)), el("td", {}, fmt(r.score)), el("td", {}, r.location || ""),
    el("td", {}, labelButtons(r.id, r.label, "hist")))));
  if (!rows.length) tb.append(el("tr", {}, el("td", { colspan: 7 }, "No verdicts match.")));
}
$("#hist-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadHistory().catch((e) => toast(e.message)); });

// Labels (good / defect) on a verdict: one click, stored in the archive with the logged-in user as
// author. ``prefix`` names the buttons (hist-label-good-<id>, live-label-defect-<camera> ...).
function labelText(l) { return l ? l.label + (l.defect_type ? ` (${l.defect_type})` : "") : "unlabelled"; }
function labelButtons(id, current, prefix, key) {
  const shown = el("span", { class: "lbl " + (current ? current.label : ""), id: `${prefix}-label-${key || id}` }, labelText(current));
  const send = (label) => async (ev) => {
    ev.stopPropagation();  // a click on a history row's button does not also open the row
    try {
      const r = await api("POST", `/api/verdicts/${id}/label`, { label });
      shown.textContent = labelText(r); shown.className = "lbl " + r.label;
      toast(`labelled ${r.label}` + (r.image ? "" : " (its image was not kept)"), true);
    } catch (e) { toast(e.message); }
  };
  if (!allows("operator")) return el("span", { class: "labels" }, shown);  // a viewer sees the label, cannot set it
  return el("span", { class: "labels" }, shown,
    el("button", { type: "button", class: "secondary", id: `${prefix}-label-good-${key || id}`, onclick: send("good") }, "good"),
    el("button", { type: "button", class: "secondary", id: `${prefix}-label-defect-${key || id}`, onclick: send("defect") }, "defect"));
}

function verdictCard(box, r, withAsk) {
  const img = el("img", { alt: "inspected image", class: "hist-image" });
  const heat = el("img", { alt: "heatmap", class: "hist-heatmap" });
  box.replaceChildren(...[
    el("h3", {}, el("span", { class: "badge " + r.verdict }, r.verdict), ` ${r.camera} · ${r.recipe} · ${when(r.captured_at)}`),
    r.has_image ? el("div", {}, img, heat) : el("p", {}, "(image not kept: OK images are sampled)"),
    el("dl", { class: "kv" },
      el("dt", {}, "score"), el("dd", {}, `${fmt(r.score)} (threshold ${fmt(r.threshold)})`),
      el("dt", {}, "sentence"), el("dd", { class: "sentence" }, r.sentence),
      el("dt", {}, "regions"), el("dd", {}, (r.regions || []).map((g) => `${g.location} (${fmt(g.area_pct, 2)} %)`).join(", ") || "none"),
      el("dt", {}, "explanation"), el("dd", { class: "explanation" }, r.explanation || "–"),
      r.reason ? [el("dt", {}, "reason"), el("dd", {}, r.reason)] : null),
    withAsk && allows("operator") ? el("button", { type: "button", id: "hist-ask", onclick: () => { S.askVerdict = r; S.conversation = newId(); $("#ask-log").replaceChildren(); location.hash = "#ask"; } }, "Ask about this") : null,
  ].filter((x) => x));
  if (r.has_image) {
    loadImg(img, `/api/history/${r.id}/image.jpg`);
    loadImg(heat, `/api/history/${r.id}/heatmap.jpg`);
  }
}

async function showDetail(id) { verdictCard($("#hist-detail"), await api("GET", `/api/history/${id}`), true); }

// --- ask -----------------------------------------------------------------------------------------
function showAsk() {
  if (S.askVerdict) verdictCard($("#ask-subject"), S.askVerdict, false);
}
$("#ask-new").addEventListener("click", () => { S.conversation = newId(); $("#ask-log").replaceChildren(); });
$("#ask-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!S.askVerdict) { toast("pick a verdict in History first"); return; }
  const q = $("#ask-question").value.trim() || "Is there any anomaly in the image?";
  $("#ask-question").value = "";
  const log = $("#ask-log");
  const answer = el("span", { class: "answer" });
  const note = el("div", { class: "note" });
  log.append(el("div", { class: "msg user" }, q), el("div", { class: "msg bot" }, answer, note));
  $("#ask-send").disabled = true;
  try {
    const r = await fetch("/api/ask", { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": S.csrf },
      body: JSON.stringify({ verdict_id: S.askVerdict.id, question: q, conversation: S.conversation }) });
    if (!r.ok) throw new Error((await r.json()).error || r.statusText);
    // Streamed NDJSON: each {"t": piece} is shown as it arrives.
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i); buf = buf.slice(i + 1);
        if (!line.trim()) continue;
        const m = JSON.parse(line);
        if (m.t !== undefined) answer.textContent += m.t;
        if (m.done) {
          answer.textContent = m.done.text;  // the checked answer (a contradicting one is replaced)
          answer.parentElement.dataset.turn = m.done.turn || "";
          note.textContent = m.done.source === "llm" ? "" : `(${m.done.source}${m.done.replaced ? ": model answer replaced, " + m.done.replaced : ""}${m.done.note ? ": " + m.done.note : ""})`;
        }
        if (m.error) note.textContent = "error: " + m.error;
      }
      log.scrollTop = log.scrollHeight;
    }
  } catch (e) { toast(e.message); } finally { $("#ask-send").disabled = false; }
});

// --- system --------------------------------------------------------------------------------------
function kv(obj) {
  // Nested objects (engines, source, broker) become nested lists rather than raw JSON.
  return el("dl", { class: "kv" }, Object.entries(obj).map(([k, v]) =>
    [el("dt", {}, k), el("dd", {}, v === null || v === undefined ? "–"
      : Array.isArray(v) ? v.map((x) => (typeof x === "object" && x !== null ? JSON.stringify(x) : String(x))).join(", ")
      : typeof v === "object" ? kv(v) : String(v))]));
}

async function showSystem() {
  const tick = async () => {
    const s = await api("GET", "/api/system");
    const cams = el("table", { id: "sys-cams" }, el("thead", {}, el("tr", {}, ["Camera", "Status", "Recipe", "Inspections/s", "Latency p50 ms", "p99 (or max) ms", "Error", "Drift"].map((h) => el("th", {}, h)))),
      el("tbody", {}, s.cameras.map((c) => el("tr", { "data-camera": c.name }, [c.name, c.status, c.recipe || "–", c.inspect_fps ?? "–", c.latency_ms_p50 ?? "–", c.latency_ms_p99 ?? c.latency_ms_max ?? "–", c.inspection_error || "", driftWords(c.drift)].map((v) => el("td", {}, v))))));
    // The drift watch's plain words (the status heartbeat's warnings): the line should look at these.
    const warnings = (s.warnings || []).length ? el("div", { class: "card drift warn", id: "sys-warnings" }, el("h3", {}, "Warnings"),
      ...s.warnings.map((w) => el("p", {}, w))) : null;
    $("#sys-body").replaceChildren(...[warnings,
      el("div", { class: "card" }, el("h3", {}, "Versions and engines"), kv({ "AnomalyGPT Edge": s.version, python: s.python, platform: s.platform,
        onnxruntime: s.onnxruntime, opencv: s.opencv, backend: s.backend, "bundle": s.bundle.path, "bundle sha256": s.bundle.sha256,
        "bundle source": s.bundle.source, "exported": s.bundle.created_at, engines: s.engines, LLM: s.llm, uptime_s: s.uptime_s })),
      el("div", { class: "card" }, el("h3", {}, "Cameras"), cams),
      el("div", { class: "card" }, el("h3", {}, "Delivery"), kv({ "spool depth": s.spool_depth, broker: s.broker, ...(s.archive ? { archive: s.archive } : {}) }))].filter((x) => x));
  };
  await tick().catch((e) => toast(e.message));
  S.timers.push(setInterval(() => tick().catch(() => {}), 2000));
  $("#admin").hidden = !allows("admin");
  if (allows("admin")) await loadAdmin();
}

async function loadAdmin() {
  const users = await api("GET", "/api/users");
  $("#users-table tbody").replaceChildren(...users.map((u) => el("tr", {}, el("td", {}, u.name), el("td", {}, u.role),
    el("td", {}, u.name === S.user ? "" : el("button", { type: "button", class: "secondary", onclick: async () => {
      try { await api("POST", "/api/users", { action: "remove", name: u.name }); await loadAdmin(); } catch (e) { toast(e.message); }
    } }, "Remove")))));
  const audit = await api("GET", "/api/audit?limit=100");
  $("#audit-table tbody").replaceChildren(...audit.reverse().map((a) => el("tr", {}, el("td", {}, when(a.ts)), el("td", {}, `${a.user} (${a.role})`),
    el("td", {}, a.action), el("td", {}, a.target || ""), el("td", {}, a.details && a.details.ok === false ? "failed: " + (a.details.error || "") : "ok"))));
}
$("#user-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await api("POST", "/api/users", { action: "set", name: $("#user-name").value, role: $("#user-role").value, password: $("#user-pass").value });
    $("#user-pass").value = "";
    await loadAdmin();
    toast("user saved", true);
  } catch (e) { toast(e.message); }
});

// Started once every deferred script (learn.js too) has run: the pages may call into any of them.
document.addEventListener("DOMContentLoaded", () => boot().catch((e) => toast(e.message)));
