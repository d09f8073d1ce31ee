// The stowaway console: reads /api/v1 (relative URLs, so it works behind
// `kubectl port-forward` or a path prefix) and polls it every few seconds.
// Actions send the admin token as `Authorization: Bearer`; the token is kept in
// this tab's sessionStorage only, never in a cookie. Text from the server is only
// ever set as textContent, never parsed as HTML.
"use strict";

const API = "api/v1/";
const TOKEN_KEY = "stowaway-admin-token";
const REFRESH_MS = 5000;
const ROWS = 50;

const $ = (id) => document.getElementById(id);
let actionsEnabled = false;
let timer = null;
let lastSearch = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

async function api(path, options = {}) {
  const response = await fetch(API + path, {
    ...options,
    credentials: "omit",
    cache: "no-store",
    headers: { Accept: "application/json", ...(options.headers || {}) },
  });
  let body = null;
  try {
    body = await response.json();
  } catch (_e) {
    body = null;
  }
  if (!response.ok) {
    let detail = body && body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg).join("; ");
    throw new Error(`HTTP ${response.status}: ${detail || response.statusText}`);
  }
  return body;
}

async function act(action, selection, what) {
  const body = JSON.stringify(selection);
  try {
    const result = await api(`actions/${action}`, {
      method: "POST",
      body,
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token()}` },
    });
    showMessage(`${what}: ${describeResult(action, result)}`);
  } catch (e) {
    showError(`${what} failed: ${e.message}`);
  }
  refresh();
}

function describeResult(action, r) {
  if (action === "requeue") {
    const parts = [`requeued ${r.requeued}`];
    if (r.superseded.length) parts.push(`${r.superseded.length} superseded`);
    if (r.leased.length) parts.push(`${r.leased.length} in flight, left alone`);
    if (r.file_gone.length) parts.push(`${r.file_gone.length} with no spool file`);
    if (r.not_found.length) parts.push(`${r.not_found.length} not found`);
    return parts.join(", ");
  }
  if (action === "purge") {
    return `purged ${r.purged} row(s), ${bytes(r.bytes)}, removed ${r.files_removed} file(s)` +
      (r.skipped.length ? `, ${r.skipped.length} left alone` : "");
  }
  return JSON.stringify(r);
}

function showMessage(text) {
  $("error").hidden = true;
  $("message").textContent = text;
  $("message").hidden = false;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function bytes(n) {
  if (n == null) return "–";
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return i === 0 ? `${v} bytes` : `${v.toFixed(1)} ${units[i]}`;
}

function age(seconds) {
  if (seconds == null) return "–";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

function when(iso) {
  if (!iso) return "–";
  return iso.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", " UTC");
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function button(label, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

function canAct() {
  return actionsEnabled && token() !== "";
}

function renderSummary(s) {
  for (const status of ["pending", "in_flight", "failed", "unrouted", "done"]) {
    $(`count-${status}`).textContent = s[status];
  }
  $("bytes-waiting").textContent = bytes(s.bytes_waiting);
  $("oldest-pending").textContent = age(s.oldest_pending_age_seconds);
  const h = s.last_hour;
  $("last-hour").textContent = `${h.uploaded} uploaded, ${h.failed} failed, ${h.retried} retried`;
  const tbody = $("destinations").querySelector("tbody");
  tbody.replaceChildren();
  for (const d of s.destinations) {
    const tr = document.createElement("tr");
    tr.dataset.name = d.name;
    tr.dataset.state = d.state;
    if (d.state === "blocked") tr.className = "blocked";
    cell(tr, d.name + (d.url ? ` (${d.url})` : ""));
    const state = cell(tr, "");
    const badge = document.createElement("span");
    badge.className = `state state-${d.state}`;
    badge.textContent = d.state;
    state.appendChild(badge);
    cell(tr, when(d.since));
    cell(tr, d.pending);
    cell(tr, d.failed);
    if (d.fix && d.fix === d.reason) {
      // A 401/403's reason already says what to do (as `stowaway check` does): once.
      cell(tr, d.reason, "reason fix").colSpan = 2;
    } else {
      cell(tr, d.reason || "", "reason");
      cell(tr, d.fix || "", "fix");
    }
    tbody.appendChild(tr);
  }
  if (!s.destinations.length) {
    const tr = document.createElement("tr");
    cell(tr, "none recorded yet (a forwarder records its destinations when it runs)", "muted")
      .colSpan = 7;
    tbody.appendChild(tr);
  }
}

function renderRows(tableId, rows, statusColumn) {
  const table = $(tableId);
  const tbody = table.querySelector("tbody");
  tbody.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    tr.dataset.status = r.status;
    cell(tr, r.id);
    cell(tr, r.sop_instance_uid, "uid");
    cell(tr, r.study_instance_uid, "uid");
    cell(tr, r.destination || "(unrouted)");
    cell(tr, statusColumn ? r.status : r.attempts);
    cell(tr, when(r.received_at));
    cell(tr, r.last_error || "", "error");
    const buttons = cell(tr, "");
    buttons.appendChild(button("History", "action history", () => showDetails(r.id)));
    if (canAct() && r.status !== "in_flight" && r.status !== "unrouted") {
      buttons.appendChild(button("Requeue", "action requeue", () =>
        act("requeue", { ids: [r.id] }, `requeue row ${r.id}`)));
    }
    if (canAct() && (r.status === "failed" || r.status === "done")) {
      buttons.appendChild(button("Purge", "action purge danger", () => {
        if (window.confirm(`Delete row ${r.id} and its spool file?`)) {
          act("purge", { ids: [r.id] }, `purge row ${r.id}`);
        }
      }));
    }
    tbody.appendChild(tr);
  }
  if (!rows.length) {
    const tr = document.createElement("tr");
    cell(tr, "(none)", "muted").colSpan = 8;
    tbody.appendChild(tr);
  }
}

let detailsId = null;

async function showDetails(id, scroll = true) {
  detailsId = id;
  try {
    const d = await api(`instances/${id}`);
    $("details-id").textContent = d.id;
    const dl = $("details-fields");
    dl.replaceChildren();
    for (const [key, value] of Object.entries(d)) {
      if (key === "events" || key === "spool_file") continue;
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = value == null ? "–" : String(value);
      dl.append(dt, dd);
    }
    const f = d.spool_file;
    let state = "present, intact";
    if (!f.intact) state = f.present ? `CORRUPT: ${f.problem}` :
      (d.status === "done" ? "deleted after upload" : `MISSING: ${f.problem}`);
    $("details-spool").textContent = `${f.absolute_path} (${state})`;
    const tbody = $("history").querySelector("tbody");
    tbody.replaceChildren();
    for (const e of d.events) {
      const tr = document.createElement("tr");
      cell(tr, when(e.at));
      cell(tr, e.kind);
      cell(tr, e.detail || "");
      tbody.appendChild(tr);
    }
    $("details").hidden = false;
    if (scroll) $("details").scrollIntoView();
  } catch (e) {
    showError(`row ${id}: ${e.message}`);
  }
}

async function search(event) {
  if (event) event.preventDefault();
  const uid = $("search-uid").value.trim();
  if (!uid) return;
  lastSearch = { kind: $("search-kind").value, uid };
  await runSearch();
}

async function runSearch() {
  if (!lastSearch) return;
  const query = new URLSearchParams({ [lastSearch.kind]: lastSearch.uid, limit: String(ROWS) });
  try {
    const page = await api(`instances?${query}`);
    renderRows("results", page.items, true);
    $("results").hidden = false;
  } catch (e) {
    showError(`search: ${e.message}`);
  }
}

async function refresh() {
  try {
    const [summary, failed, waiting] = await Promise.all([
      api("summary"),
      api(`instances?status=failed&limit=${ROWS}`),
      api(`instances?status=pending&limit=${ROWS}`),
    ]);
    renderSummary(summary);
    renderRows("failed", failed.items, false);
    renderRows("waiting", waiting.items, false);
    $("requeue-all-failed").hidden = !(canAct() && summary.failed > 0);
    await runSearch();
    if (detailsId !== null && !$("details").hidden) await showDetails(detailsId, false);
    $("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    showError(`cannot read the queue: ${e.message}`);
  }
}

function renderTokenState() {
  if (!actionsEnabled) {
    $("token-state").textContent = "read-only (no --admin-token-file)";
    $("token-form").querySelectorAll("input, button").forEach((el) => { el.hidden = true; });
    return;
  }
  $("token-state").textContent = token() ? "token set: actions on" : "enter a token to act";
}

function schedule() {
  if (timer) clearInterval(timer);
  timer = $("auto-refresh").checked ? setInterval(refresh, REFRESH_MS) : null;
}

async function start() {
  try {
    const server = await api("server");
    actionsEnabled = server.actions_enabled;
    $("version").textContent = `v${server.version}`;
  } catch (e) {
    showError(`cannot reach the API: ${e.message}`);
  }
  renderTokenState();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    renderTokenState();
    refresh();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    renderTokenState();
    refresh();
  });
  $("refresh").addEventListener("click", refresh);
  $("auto-refresh").addEventListener("change", schedule);
  $("search-form").addEventListener("submit", search);
  $("details-close").addEventListener("click", () => { $("details").hidden = true; });
  $("requeue-all-failed").addEventListener("click", () =>
    act("requeue", { failed: true }, "requeue every failed row"));
  await refresh();
  schedule();
}

document.addEventListener("DOMContentLoaded", start);
