// The dashboard: one read of /admin/overview a second, drawn into the page.
import { SignedOut, admin, signOut } from "./api.js";
import { Charts } from "./charts.js";
import { h, rate, seconds } from "./format.js";
import { NodesTable } from "./nodes.js";
import { legend, renderRequests } from "./requests.js";

const POLL_MS = 1000; // at most one request a second
const $ = (id) => document.getElementById(id);

const state = { overview: null, polls: 0, charts: null, nodes: null };
window.lightpd = state; // for the curious, and for the browser tests

function toast(message, kind = "ok") {
  const box = $("toast");
  box.textContent = message;
  box.className = kind;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.hidden = true), 5000);
}

function confirmDialog(question) {
  const dialog = $("confirm");
  $("confirm-text").textContent = question;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

async function act(nodeId, action) {
  const path = `/admin/nodes/${encodeURIComponent(nodeId)}`;
  try {
    const result = action === "drain" ? await admin("POST", `${path}/drain`) : await admin("DELETE", path);
    lastAction = performance.now();
    state.nodes.apply(nodeId, result.status);
    toast(`${nodeId}: ${result.status}`);
    pollSoon();
  } catch (exc) {
    if (exc instanceof SignedOut) return window.location.reload();
    toast(`${action} ${nodeId} failed: ${exc.message}`, "error");
  }
}

function card(label, value, detail = "") {
  return h("div", { class: "card" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value),
    h("div", { class: "detail muted" }, detail));
}

function last(column) {
  for (let i = column.length - 1; i >= 0; i--) if (column[i] !== null) return column[i];
  return null;
}

function renderSummary(o) {
  const count = (status) => o.nodes.filter((n) => n.status === status).length;
  const ts = o.timeseries;
  const recent = (column) => {
    const values = column.slice(-10);
    return values.reduce((sum, v) => sum + (v ?? 0), 0) / Math.max(1, values.length);
  };
  $("summary").replaceChildren(
    card("Nodes", `${count("ready")}/${o.nodes.length} ready`, `${count("draining")} draining · ${count("dead")} dead`),
    card("Running requests", String(o.stats.running_requests)),
    card("Requests/s", rate(recent(ts.requests_per_s)), "last 10 s"),
    card("Tokens/s", rate(recent(ts.tokens_per_s)), "generated, last 10 s"),
    card("TTFT p50", seconds(last(ts.ttft_p50_s)), `p99 ${seconds(last(ts.ttft_p99_s))}`),
    card("TPOT p50", seconds(last(ts.tpot_p50_s)), `p99 ${seconds(last(ts.tpot_p99_s))}`),
  );
}

function render(o) {
  $("model").textContent = `model ${o.stats.model}`;
  renderSummary(o);
  state.nodes.render(o.nodes, o.now);
  $("nodes-empty").hidden = o.nodes.length > 0;
  state.charts.update(o.timeseries);
  renderRequests($("requests").tBodies[0], o.requests, o.now);
  $("requests-empty").hidden = o.requests.length > 0;
  $("live").textContent = `live · ${new Date(o.now * 1000).toLocaleTimeString()}`;
  $("live").className = "live on";
}

let timer = null;
let lastStart = -Infinity;
let lastAction = -Infinity;
let inFlight = false;

async function poll() {
  const started = (lastStart = performance.now());
  inFlight = true;
  const windowS = Number($("window").value);
  const step = windowS > 300 ? 2 : 1;
  try {
    const overview = await admin("GET", `/admin/overview?window=${windowS}&step=${step}&requests=30`);
    state.polls += 1;
    if (started > lastAction) {  // an older read would undo what an action just showed
      state.overview = overview;
      render(overview);
    }
  } catch (exc) {
    if (exc instanceof SignedOut) return window.location.reload();
    $("live").textContent = `update failed: ${exc.message}`;
    $("live").className = "live off";
  } finally {
    inFlight = false;
  }
  schedule(POLL_MS - (performance.now() - started));
}

function schedule(delayMs) {
  clearTimeout(timer);
  timer = setTimeout(poll, Math.max(0, delayMs));
}

/** The next update as soon as the one-a-second limit allows. */
function pollSoon() {
  if (!inFlight) schedule(POLL_MS - (performance.now() - lastStart));
}

state.charts = new Charts($("charts"));
state.nodes = new NodesTable($("nodes"), { confirm: confirmDialog, act });
legend($("legend"));
$("window").addEventListener("change", pollSoon);
$("signout").addEventListener("click", async () => {
  await signOut();
  window.location.reload();
});
poll();
