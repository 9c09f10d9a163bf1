// The requests table: running and recent requests, each with its state timeline.
import { h, seconds } from "./format.js";

export const STATES = ["queued", "prefilling", "transferring", "decoding"];
const ENDS = ["finished", "failed", "aborted"];

export function legend(container) {
  container.replaceChildren(
    ...[...STATES, ...ENDS].map((state) =>
      h("span", { class: "legend-item" }, h("i", { class: `swatch ${state}` }), state),
    ),
  );
}

/** One bar: a segment per state, as long as the request stayed in it. */
function timeline(request, now) {
  const steps = request.timeline;
  const start = steps[0].at;
  const ended = ENDS.includes(request.state);
  const end = ended ? steps[steps.length - 1].at : now;
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
  const cap = ended ? h("i", { class: `end ${request.state}`, title: request.state }) : null;
  return h("div", { class: "timeline-cell" }, bar, cap);
}

export function renderRequests(tbody, requests, now) {
  const rows = [];
  for (const r of requests) {
    if (!r.timeline.length) continue;
    const shortId = r.request_id.length > 22 ? `…${r.request_id.slice(-20)}` : r.request_id;
    const nodes = r.prefill_node ? `${r.prefill_node} → ${r.decode_node}` : "–";
    const out = r.output_tokens ?? "…";
    const retries = r.attempts > 1 ? ` (${r.attempts} tries)` : "";
    const total = ENDS.includes(r.state) ? r.e2e_s : now - r.timeline[0].at;
    rows.push(
      h(
        "tr",
        { dataset: { requestId: r.request_id, state: r.state }, class: r.state },
        h("td", { title: r.request_id }, h("code", {}, shortId)),
        h("td", {}, h("span", { class: `badge ${r.state}` }, r.state)),
        h("td", { class: "timeline" }, timeline(r, now)),
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
