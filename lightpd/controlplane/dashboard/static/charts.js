// The cluster charts: uPlot line charts fed from /admin/overview's time series columns.
// A point with no value (no request ended in that second, no node reported) is a gap:
// lines are not drawn across idle periods, so a lone point shows as a dot.
import { h, percent, rate, seconds } from "./format.js";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
const HEIGHT = 170;

// id, title, series as [label, column], value format, smallest top of the y axis.
const CHARTS = [
  {
    id: "requests",
    title: "Requests per second",
    series: [["finished", "requests_per_s"], ["failed", "failed_per_s"]],
    format: rate,
    floor: 1,
  },
  {
    id: "tokens",
    title: "Generated tokens per second",
    series: [["tokens", "tokens_per_s"]],
    format: rate,
    floor: 10,
  },
  {
    id: "ttft",
    title: "Time to first token",
    series: [["p50", "ttft_p50_s"], ["p99", "ttft_p99_s"]],
    format: seconds,
    floor: 0.01,
    points: true,
  },
  {
    id: "tpot",
    title: "Time per output token",
    series: [["p50", "tpot_p50_s"], ["p99", "tpot_p99_s"]],
    format: seconds,
    floor: 0.01,
    points: true,
  },
  { id: "kv", title: "KV cache use per role", format: percent, floor: 1, kv: true },
];

function seriesOf(chart, ts) {
  if (chart.kv) return Object.keys(ts.kv_use).sort().map((role) => [role, ts.kv_use[role]]);
  return chart.series.map(([label, column]) => [label, ts[column]]);
}

function options(chart, labels, width) {
  const format = (value) => (value === null || value === undefined ? "–" : chart.format(value));
  return {
    width,
    height: HEIGHT,
    cursor: { drag: { x: false, y: false } },
    scales: {
      x: { time: true },
      y: { range: (u, min, max) => [0, Math.max(max ?? 0, chart.floor) * 1.05] },
    },
    axes: [
      { stroke: "#6b7280", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e5e7eb" } },
      {
        stroke: "#6b7280",
        size: 64,
        grid: { stroke: "#eef0f3" },
        ticks: { stroke: "#e5e7eb" },
        values: (u, values) => values.map(format),
      },
    ],
    series: [
      {},
      ...labels.map((label, i) => ({
        label,
        stroke: COLORS[i % COLORS.length],
        width: 1.5,
        spanGaps: false,
        points: { show: Boolean(chart.points), size: 4 },
        value: (u, value) => format(value),
      })),
    ],
  };
}

export class Charts {
  constructor(container) {
    this.plots = {}; // id -> uPlot, read by the tests through window.lightpd
    this.figures = {};
    for (const chart of CHARTS) {
      const body = h("div", { class: "plot" });
      this.figures[chart.id] = { chart, body, labels: null };
      container.append(
        h("figure", { class: "chart", id: `chart-${chart.id}` }, h("figcaption", {}, chart.title), body),
      );
    }
    new ResizeObserver(() => this.resize()).observe(container);
  }

  update(ts) {
    for (const [id, figure] of Object.entries(this.figures)) {
      const series = seriesOf(figure.chart, ts);
      const labels = series.map(([label]) => label);
      const data = [ts.t, ...series.map(([, values]) => values)];
      if (this.plots[id] && labels.join() === figure.labels.join()) {
        this.plots[id].setData(data);
      } else {
        this.plots[id]?.destroy();
        figure.body.replaceChildren();
        figure.labels = labels;
        this.plots[id] = new uPlot(options(figure.chart, labels, this.width(figure)), data, figure.body);
      }
    }
  }

  width(figure) {
    return Math.max(240, figure.body.clientWidth);
  }

  resize() {
    for (const [id, plot] of Object.entries(this.plots)) {
      plot.setSize({ width: this.width(this.figures[id]), height: HEIGHT });
    }
  }
}
