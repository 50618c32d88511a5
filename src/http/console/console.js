// The mxspool web console: plain JavaScript over the admin API (docs/api.md),
// signed in with a session cookie. Every value from the server is written
// with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const views = ["sign-in", "overview", "queue", "dead"];
let cursor = null;
let refresh = null;

function status(text, ok) {
  $("status").textContent = text || "";
  $("status").className = ok ? "ok" : "";
}

async function api(method, path, body) {
  const options = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) {
    show("sign-in");
    throw new Error("please sign in");
  }
  if (!response.ok) {
    throw new Error(data.error || `${method} ${path}: ${response.status}`);
  }
  return data;
}

function show(view) {
  for (const v of views) $(v).hidden = v !== view;
  $("nav").hidden = view === "sign-in";
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("current", a.dataset.view === view);
  }
  clearInterval(refresh);
  if (view === "overview") {
    loadOverview();
    refresh = setInterval(loadOverview, 5000);
  } else if (view === "queue") {
    cursor = null;
    $("messages").replaceChildren();
    loadQueue();
  } else if (view === "dead") {
    loadDead();
  }
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function button(parent, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  parent.appendChild(b);
  return b;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 120) return `${seconds}s`;
  if (seconds < 7200) return `${Math.floor(seconds / 60)}m`;
  if (seconds < 172800) return `${Math.floor(seconds / 3600)}h`;
  return `${Math.floor(seconds / 86400)}d`;
}

function since(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) + "Z" : "";
}

async function act(method, path, done) {
  try {
    await api(method, path);
    status(done, true);
  } catch (e) {
    status(e.message);
  }
}

async function loadOverview() {
  try {
    const [domains, dead] = await Promise.all([api("GET", "/api/domains"), api("GET", "/api/dead")]);
    const rows = domains.domains.map((d) => {
      const tr = document.createElement("tr");
      tr.dataset.domain = d.domain;
      cell(tr, d.domain);
      cell(tr, d.primary, d.primary);
      cell(tr, since(d.primary_since_ms));
      cell(tr, d.paused ? `yes (${d.paused_by})` : "no");
      cell(tr, d.queued);
      cell(tr, age(d.oldest_age_seconds));
      const td = cell(tr, "");
      const path = `/api/domains/${encodeURIComponent(d.domain)}`;
      button(td, "Flush", () => flush(d.domain).then(loadOverview));
      if (d.paused) {
        button(td, "Resume", () => act("POST", `${path}/resume`, `resumed ${d.domain}`).then(loadOverview));
      } else {
        button(td, "Pause", () => act("POST", `${path}/pause`, `paused ${d.domain}`).then(loadOverview));
      }
      return tr;
    });
    $("domains").replaceChildren(...rows);
    const changes = domains.domains.flatMap((d) =>
      d.history.map((c) => ({ domain: d.domain, ...c })));
    changes.sort((a, b) => b.at_ms - a.at_ms);
    $("history").replaceChildren(...changes.slice(0, 20).map((c) => {
      const li = document.createElement("li");
      li.textContent = `${since(c.at_ms)} ${c.domain}: primary ${c.primary}` +
        (c.reason ? ` (${c.reason})` : "");
      li.className = c.primary;
      return li;
    }));
    if (changes.length === 0) {
      const li = document.createElement("li");
      li.textContent = "no change since the server started";
      $("history").replaceChildren(li);
    }
    $("dead-count").textContent = String(dead.count);
    $("refreshed").textContent = new Date().toLocaleTimeString();
  } catch (e) {
    status(e.message);
  }
}

async function flush(domain) {
  try {
    await api("POST", "/api/queue/flush", domain ? { domain } : undefined);
    status(domain ? `mail for ${domain} is due now` : "all queued mail is due now", true);
  } catch (e) {
    status(e.message);
  }
}

function queueQuery() {
  const q = new URLSearchParams({ limit: "100" });
  for (const [key, id] of [["domain", "f-domain"], ["state", "f-state"], ["sender", "f-sender"], ["recipient", "f-recipient"]]) {
    if ($(id).value) q.set(key, $(id).value);
  }
  if (cursor) q.set("cursor", cursor);
  return q.toString();
}

function messageState(m) {
  if (m.held) return "held";
  if (m.recipients.some((r) => r.waiting_for_primary)) return "waiting for primary";
  if (m.recipients.some((r) => r.attempts > 0)) return "deferred";
  return "queued";
}

async function loadQueue() {
  try {
    const page = await api("GET", `/api/queue?${queueQuery()}`);
    $("queue-count").textContent = `(${page.count})`;
    for (const m of page.messages) {
      const tr = document.createElement("tr");
      tr.className = "clickable";
      tr.dataset.id = m.id;
      cell(tr, m.id);
      cell(tr, age(m.age_seconds));
      cell(tr, m.sender || "<>");
      cell(tr, m.recipients.map((r) => `${r.address} (${r.status})`).join(", "));
      cell(tr, messageState(m));
      tr.addEventListener("click", () => openMessage(m.id));
      $("messages").appendChild(tr);
    }
    cursor = page.next_cursor;
    $("next-page").hidden = !cursor;
  } catch (e) {
    status(e.message);
  }
}

async function openMessage(id) {
  try {
    const m = await api("GET", `/api/queue/${encodeURIComponent(id)}`);
    $("message").hidden = false;
    $("message").dataset.id = m.id;
    $("m-id").textContent = m.id;
    const fields = [["Sender", m.sender || "<>"], ["Size", `${m.size} bytes`], ["Age", age(m.age_seconds)], ["Held", m.held ? "yes" : "no"]];
    $("m-envelope").replaceChildren(...fields.flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      return [dt, dd];
    }));
    $("m-recipients").replaceChildren(...m.recipients.map((r) => {
      const tr = document.createElement("tr");
      cell(tr, r.address);
      cell(tr, r.status);
      cell(tr, r.attempts);
      cell(tr, r.last_reply);
      return tr;
    }));
    $("m-headers").textContent = m.headers || "";
  } catch (e) {
    status(e.message);
  }
}

async function messageAction(action) {
  const id = $("message").dataset.id;
  if (!id) return;
  if ((action === "delete" || action === "bounce") &&
      !window.confirm(`${action === "delete" ? "Delete" : "Bounce"} message ${id}? This cannot be undone.`)) {
    return;
  }
  const path = `/api/queue/${encodeURIComponent(id)}`;
  if (action === "delete") {
    await act("DELETE", path, `deleted ${id}`);
    $("message").hidden = true;
  } else {
    await act("POST", `${path}/${action}`, `${action}: ${id}`);
    if (action === "hold") {
      // A held message stays: show it as it is now.
      await openMessage(id);
    } else {
      // Released or bounced mail may leave the queue at once.
      $("message").hidden = true;
    }
  }
  cursor = null;
  $("messages").replaceChildren();
  await loadQueue();
}

async function loadDead() {
  try {
    const dead = await api("GET", "/api/dead");
    $("dead-letters").replaceChildren(...dead.messages.map((m) => {
      const tr = document.createElement("tr");
      tr.dataset.id = m.id;
      cell(tr, m.id);
      cell(tr, age(m.age_seconds));
      cell(tr, m.sender || "<>");
      cell(tr, m.recipients.map((r) => `${r.address} (${r.status})`).join(", "));
      const td = cell(tr, "");
      const path = `/api/dead/${encodeURIComponent(m.id)}`;
      button(td, "Requeue", () => act("POST", `${path}/requeue`, `requeued ${m.id}`).then(loadDead));
      button(td, "Delete", () => {
        if (window.confirm(`Delete dead letter ${m.id}? This cannot be undone.`)) {
          act("DELETE", path, `deleted ${m.id}`).then(loadDead);
        }
      });
      return tr;
    }));
  } catch (e) {
    status(e.message);
  }
}

async function route() {
  const session = await fetch("/api/session", { credentials: "same-origin" })
    .then((r) => r.json())
    .catch(() => ({ signed_in: false }));
  if (!session.signed_in) {
    show("sign-in");
    return;
  }
  const view = (location.hash || "#overview").slice(1);
  show(views.includes(view) && view !== "sign-in" ? view : "overview");
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("POST", "/api/session", { token: $("token").value });
      $("token").value = "";
      status("signed in", true);
      route();
    } catch (e) {
      status(e.message === "please sign in" ? "wrong admin token" : e.message);
    }
  });
  $("sign-out").addEventListener("click", async () => {
    await api("DELETE", "/api/session").catch(() => {});
    show("sign-in");
  });
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    cursor = null;
    $("messages").replaceChildren();
    loadQueue();
  });
  $("flush-all").addEventListener("click", () => flush($("f-domain").value || null));
  $("next-page").addEventListener("click", loadQueue);
  for (const b of document.querySelectorAll("[data-action]")) {
    b.addEventListener("click", () => messageAction(b.dataset.action));
  }
  window.addEventListener("hashchange", route);
  route();
});
