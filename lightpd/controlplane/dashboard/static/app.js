// The dashboard: one round of reads a second (/admin/overview, and the last minute's
// figures for the cards), drawn into the page.
import { SignedOut, admin, signOut } from "./api.js";
import { Charts } from "./charts.js";
import { age, h, rate, seconds } from "./format.js";
import { NodesTable } from "./nodes.js";
import { FailedRequests, axisTicks, legend, renderRequests, timeAxis } from "./requests.js";

const POLL_MS = 1000; // at most one round of reads a second
const CARD_WINDOW_S = 60; // what the figure cards summarize
const STALE_S = 10; // a card whose data is older than this is marked stale
const FAILED_SCAN = 500; // recent requests searched for failures while only those are shown
const $ = (id) => document.getElementById(id);

const state = {
  overview: null,
  recent: null, // the time series over the cards' window, as one point
  clock: null, // Redis's time at the last update, and when it came (performance.now())
  polls: 0,
  charts: null,
  nodes: null,
  failed: new FailedRequests(),
  filter: "all", // or "failed"
};
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
  const calls = { drain: ["POST", `${path}/drain`], undrain: ["POST", `${path}/undrain`], remove: ["DELETE", path] };
  try {
    const result = await admin(...calls[action]);
    lastAction = performance.now();
    state.nodes.apply(nodeId, result.status);
    toast(`${nodeId}: ${result.status}`);
    pollSoon();
  } catch (exc) {
    if (exc instanceof SignedOut) return window.location.reload();
    toast(`${action} ${nodeId} failed: ${exc.message}`, "error");
  }
}

/** Redis's clock now, from its time at the last update and the time since. */
function serverNow() {
  return state.clock.server + (performance.now() - state.clock.local) / 1000;
}

/**
 * A figure card. ``covers`` names its window ("now", "last 60 s"); ``dataAt`` is the
 * Unix time its data is from (null: none), whose age the card shows and updates; it
 * is stale past ``staleAfter`` seconds.
 */
function card({ id, label, covers, value, detail = "", dataAt, agePrefix = "data from", staleAfter = STALE_S }) {
  const dataset = { dataAt: dataAt ?? "", agePrefix, staleAfter };
  return h(
    "div",
    { class: "card", id: `card-${id}`, dataset },
    h("div", { class: "label" }, h("span", {}, label), h("span", { class: "window" }, covers)),
    h("div", { class: "value" }, value),
    h("div", { class: "detail muted" }, detail),
    h("div", { class: "age muted" }),
  );
}

/** Each card's data age; "stale" on those too old, and on all while updates fail. */
function refreshAges() {
  if (!state.clock) return;
  const now = serverNow();
  const updatesFail = (performance.now() - state.clock.local) / 1000 > STALE_S;
  for (const element of document.querySelectorAll("#summary .card")) {
    const { dataAt, agePrefix, staleAfter } = element.dataset;
    const box = element.querySelector(".age");
    const seconds = dataAt === "" ? 0 : now - Number(dataAt);
    if (dataAt === "") box.textContent = `none in the last ${Number($("window").value) / 60} min`;
    else box.textContent = `${agePrefix} ${age(seconds)}`;
    element.classList.toggle("stale", updatesFail || seconds > Number(staleAfter));
  }
}

/** The Unix second of the newest non-empty point of a column, or null. */
function newest(ts, column) {
  for (let i = column.length - 1; i >= 0; i--) if (column[i] !== null) return ts.t[i];
  return null;
}

function renderSummary(o, recent) {
  const count = (status) => o.nodes.filter((n) => n.status === status).length;
  const ts = o.timeseries;
  const last = `last ${CARD_WINDOW_S} s`;
  const windowEnd = recent.t[0];
  const only = (column) => recent[column][0];
  const latency = (id, label) => {
    const p50 = only(`${id}_p50_s`);
    return card({
      id, label, covers: last, value: seconds(p50),
      detail: p50 === null ? "no request ended" : `p99 ${seconds(only(`${id}_p99_s`))}`,
      dataAt: newest(ts, ts[`${id}_p50_s`]), agePrefix: "newest sample", staleAfter: CARD_WINDOW_S,
    });
  };
  $("summary").replaceChildren(
    card({
      id: "nodes", label: "Nodes", covers: "now", value: `${count("ready")}/${o.nodes.length} ready`,
      detail: `${count("draining")} draining · ${count("migrating")} migrating · ${count("dead")} dead`,
      dataAt: o.now,
    }),
    card({
      id: "running", label: "Running requests", covers: "now", value: String(o.stats.running_requests),
      dataAt: o.now,
    }),
    card({
      id: "requests", label: "Requests/s", covers: last, value: rate(only("requests_per_s")),
      detail: `finished · ${rate(only("failed_per_s"))}/s failed`, dataAt: windowEnd,
    }),
    card({
      id: "tokens", label: "Tokens/s", covers: last, value: rate(only("tokens_per_s")),
      detail: "generated", dataAt: windowEnd,
    }),
    latency("ttft", "TTFT p50"),
    latency("tpot", "TPOT p50"),
  );
  refreshAges();
}

function renderRequestTable() {
  const o = state.overview;
  const failedOnly = state.filter === "failed";
  const requests = failedOnly ? state.failed.list() : o.requests;
  const axis = timeAxis(requests, o.now);
  $("requests-axis").replaceChildren(axisTicks(axis));
  renderRequests($("requests").tBodies[0], requests, o.now, axis);
  $("requests-empty").textContent = failedOnly ? "No failed request seen." : "No request yet.";
  $("requests-empty").hidden = requests.length > 0;
  $("failed-count").textContent = String(state.failed.size);
  $("failed-count").classList.toggle("none", state.failed.size === 0);
}

function render() {
  const o = state.overview;
  $("model").textContent = `model ${o.stats.model}`;
  renderSummary(o, state.recent);
  state.nodes.render(o.nodes, o.now);
  $("nodes-empty").hidden = o.nodes.length > 0;
  state.charts.update(o.timeseries);
  renderRequestTable();
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
    const reads = [
      admin("GET", `/admin/overview?window=${windowS}&step=${step}&requests=30`),
      admin("GET", `/admin/timeseries?window=${CARD_WINDOW_S}&step=${CARD_WINDOW_S}`),
    ];
    if (state.filter === "failed") reads.push(admin("GET", `/admin/requests?limit=${FAILED_SCAN}`));
    const [overview, recent, scanned] = await Promise.all(reads);
    state.polls += 1;
    state.failed.add(overview.requests);
    if (scanned) state.failed.add(scanned);
    if (started > lastAction) {  // an older read would undo what an action just showed
      state.overview = overview;
      state.recent = recent;
      state.clock = { server: overview.now, local: performance.now() };
      render();
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

function setFilter(filter) {
  state.filter = filter;
  for (const button of $("request-filter").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(button.dataset.filter === filter));
  }
  if (state.overview) renderRequestTable();
  pollSoon(); // the failed view also searches the recent requests
}

state.charts = new Charts($("charts"));
state.nodes = new NodesTable($("nodes"), { confirm: confirmDialog, act });
legend($("legend"));
$("window").addEventListener("change", pollSoon);
for (const button of $("request-filter").querySelectorAll("button")) {
  button.addEventListener("click", () => setFilter(button.dataset.filter));
}
$("signout").addEventListener("click", async () => {
  await signOut();
  window.location.reload();
});
setInterval(refreshAges, 1000);
poll();
