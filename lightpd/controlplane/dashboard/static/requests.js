// The requests table: running and recent requests, each with its state timeline on
// one time axis shared by every row (so their order and overlap can be read off).
import { h, seconds } from "./format.js";

export const STATES = ["queued", "prefilling", "transferring", "decoding"];
const ENDS = ["finished", "failed", "aborted"];
const TICK_STEPS_S = [0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200];
const NARROW = window.matchMedia("(max-width: 1180px)"); // as in style.css
const MAX_TICKS = 3; // steps on the axis: 4 labels at most, so they fit 130 px

export function legend(container) {
  container.replaceChildren(
    ...[...STATES, ...ENDS].map((state) =>
      h("span", { class: "legend-item" }, h("i", { class: `swatch ${state}` }), state),
    ),
  );
}

function startOf(request) {
  return request.timeline[0].at;
}

function endOf(request, now) {
  return ENDS.includes(request.state) ? request.timeline.at(-1).at : now;
}

/** The shared axis: from the earliest start among the rows to now. */
export function timeAxis(requests, now) {
  const starts = requests.filter((r) => r.timeline.length).map(startOf);
  const start = Math.min(now - 1, ...starts);
  return { start, end: now, span: now - start };
}

function percentAt(axis, t) {
  return `${(100 * Math.min(Math.max(t - axis.start, 0), axis.span)) / axis.span}%`;
}

function ago(back) {
  if (back === 0) return "now";
  if (back < 1) return `−${Math.round(back * 1000)} ms`;
  if (back < 120) return `−${Number(back.toFixed(1))} s`;
  if (back < 7200) return `−${Number((back / 60).toFixed(1))} min`;
  return `−${Number((back / 3600).toFixed(1))} h`;
}

/** Tick labels for the axis header: "now" and round times before it. */
export function axisTicks(axis) {
  const step = TICK_STEPS_S.find((s) => axis.span / s <= MAX_TICKS) ?? TICK_STEPS_S.at(-1);
  const ticks = [];
  for (let k = 0; k * step <= axis.span + 1e-9; k++) {
    const at = axis.end - k * step;
    const tick = h("span", { class: (at - axis.start) / axis.span < 0.15 ? "tick start" : "tick" }, ago(k * step));
    tick.style.left = percentAt(axis, at);
    ticks.push(tick);
  }
  return h("div", { class: "time-axis", "aria-label": `time axis, last ${seconds(axis.span)}` }, ticks);
}

/** One bar placed on the shared axis: a segment per state, as long as it lasted. */
function timeline(request, now, axis) {
  const steps = request.timeline;
  const start = startOf(request);
  const end = endOf(request, now);
  const total = Math.max(end - start, 1e-6);
  const segments = [];
  steps.forEach((step, i) => {
    if (ENDS.includes(step.state)) return;
    const until = i + 1 < steps.length ? steps[i + 1].at : end;
    const span = h("span", {
      class: `segment ${step.state}`,
      title: `${step.state} ${seconds(until - step.at)}`,
    });
    span.style.width = `${(100 * Math.max(0, until - step.at)) / total}%`;
    segments.push(span);
  });
  const bar = h("div", { class: "timeline-bar", title: `total ${seconds(end - start)}` }, segments);
  bar.style.left = percentAt(axis, start);
  bar.style.width = `calc(${percentAt(axis, end)} - ${percentAt(axis, start)})`;
  const track = h("div", { class: "timeline-track" }, bar);
  if (ENDS.includes(request.state)) {
    const cap = h("i", { class: `end ${request.state}`, title: request.state });
    cap.style.left = percentAt(axis, end);
    track.append(cap);
  }
  return track;
}

export function renderRequests(tbody, requests, now, axis) {
  const rows = [];
  for (const r of requests) {
    if (!r.timeline.length) continue;
    const idChars = NARROW.matches ? 12 : 20;
    const shortId = r.request_id.length > idChars + 2 ? `…${r.request_id.slice(-idChars)}` : r.request_id;
    const nodes = r.prefill_node ? `${r.prefill_node} → ${r.decode_node}` : "–";
    const out = r.output_tokens ?? "…";
    const retries = r.attempts > 1 ? ` (${r.attempts} tries)` : "";
    const total = ENDS.includes(r.state) ? r.e2e_s : now - startOf(r);
    rows.push(
      h(
        "tr",
        { dataset: { requestId: r.request_id, state: r.state, start: startOf(r) }, class: r.state },
        h("td", { title: r.request_id }, h("code", {}, shortId)),
        h("td", {}, h("span", { class: `badge ${r.state}` }, r.state)),
        h("td", { class: "timeline" }, timeline(r, now, axis)),
        h("td", { class: "nodes" }, nodes + retries),
        h("td", { class: "num" }, `${r.prompt_tokens} → ${out}`),
        h("td", { class: "num" }, seconds(r.ttft_s)),
        h("td", { class: "num" }, seconds(r.tpot_s)),
        h("td", { class: "num" }, seconds(total)),
      ),
    );
    if (r.error) {
      rows.push(h("tr", { class: "error-row" }, h("td", { colspan: 8, class: "error" }, `error: ${r.error}`)));
    }
  }
  tbody.replaceChildren(...rows);
}

/**
 * Failed requests kept apart, so that they stay listed after newer requests push
 * them out of the recent ones: every failure the page saw (the latest MAX_KEPT).
 */
export class FailedRequests {
  static MAX_KEPT = 200;

  constructor() {
    this.byId = new Map();
  }

  add(requests) {
    for (const r of requests) {
      if (r.state === "failed" && r.timeline.length) this.byId.set(r.request_id, r);
    }
    if (this.byId.size > FailedRequests.MAX_KEPT) {
      const latest = this.list().slice(0, FailedRequests.MAX_KEPT);
      this.byId = new Map(latest.map((r) => [r.request_id, r]));
    }
  }

  /** The latest first. */
  list() {
    return [...this.byId.values()].sort((a, b) => startOf(b) - startOf(a));
  }

  get size() {
    return this.byId.size;
  }
}
