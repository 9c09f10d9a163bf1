// The nodes table: one row per node, kept across updates (buttons stay clickable),
// sortable by any column, with drain and remove behind a confirmation and undrain.
import { age, h, percent, rate } from "./format.js";

const STATUS_ORDER = { ready: 0, draining: 1, migrating: 2, dead: 3 };
const DRAINED = ["draining", "migrating"];

/** A row's figures; a dead node's last heartbeat is not shown as its load. */
function figures(node, now) {
  const stats = node.status === "dead" ? {} : (node.stats ?? {});
  const used = stats.num_free_slots === undefined ? 0 : node.num_slots - stats.num_free_slots;
  return {
    ...node,
    live: node.status !== "dead" && Boolean(node.stats),
    used,
    reserved: stats.num_reserved_slots ?? 0,
    kv_use: used / node.num_slots,
    running: stats.num_running ?? 0,
    queued: stats.num_queued ?? 0,
    tokens_per_s: stats.tokens_per_s ?? 0,
    // Share of the prompt tokens admitted since the node started found in its prefix cache.
    cache_hit_rate: stats.num_prompt_tokens ? stats.num_cached_prompt_tokens / stats.num_prompt_tokens : 0,
    cached_tokens: stats.num_cached_prompt_tokens ?? 0,
    heartbeat_age: now - node.last_heartbeat,
    status_rank: STATUS_ORDER[node.status] ?? 9,
  };
}

function kvBar(row) {
  const inKv = Math.max(0, row.used - row.reserved);
  const used = h("span", { class: "used", title: `${inKv} slots hold KV` });
  const reserved = h("span", { class: "reserved", title: `${row.reserved} slots reserved` });
  used.style.width = `${(100 * inKv) / row.num_slots}%`;
  reserved.style.width = `${(100 * row.reserved) / row.num_slots}%`;
  return h(
    "div",
    { class: "kvcell" },
    h("div", { class: "bar", role: "img", "aria-label": `KV ${percent(row.kv_use)} used` }, used, reserved),
    h("span", { class: "kvtext" }, `${row.used}/${row.num_slots} · ${row.reserved}`),
  );
}

export class NodesTable {
  constructor(table, { confirm, act }) {
    this.tbody = table.tBodies[0];
    this.rows = new Map(); // node id -> {tr, cells, drain, undrain}
    this.sortKey = "node_id";
    this.ascending = true;
    this.confirm = confirm;
    this.act = act;
    this.last = { nodes: [], now: 0 };
    for (const th of table.tHead.querySelectorAll("th[data-sort]")) {
      th.addEventListener("click", () => this.sortBy(th.dataset.sort, table));
    }
  }

  sortBy(key, table) {
    this.ascending = this.sortKey === key ? !this.ascending : true;
    this.sortKey = key;
    for (const th of table.tHead.querySelectorAll("th[data-sort]")) {
      th.removeAttribute("aria-sort");
      if (th.dataset.sort === key) th.setAttribute("aria-sort", this.ascending ? "ascending" : "descending");
    }
    this.render(this.last.nodes, this.last.now);
  }

  /** Shows what an action did before the next update confirms it. */
  apply(nodeId, status) {
    const nodes = this.last.nodes
      .map((n) => (n.node_id === nodeId ? { ...n, status } : n))
      .filter((n) => n.status !== "removed");
    this.render(nodes, this.last.now);
  }

  render(nodes, now) {
    this.last = { nodes, now };
    const key = this.sortKey === "status" ? "status_rank" : this.sortKey;
    const rows = nodes.map((n) => figures(n, now));
    rows.sort((a, b) => {
      const order = a[key] < b[key] ? -1 : a[key] > b[key] ? 1 : a.node_id < b.node_id ? -1 : 1;
      return this.ascending ? order : -order;
    });
    const seen = new Set();
    for (const row of rows) {
      seen.add(row.node_id);
      let entry = this.rows.get(row.node_id);
      if (!entry) {
        entry = this.newRow(row.node_id);
        this.rows.set(row.node_id, entry);
      }
      this.fill(entry, row);
      this.tbody.append(entry.tr); // moves it into sorted place
    }
    for (const [id, entry] of this.rows) {
      if (!seen.has(id)) {
        entry.tr.remove();
        this.rows.delete(id);
      }
    }
  }

  newRow(nodeId) {
    const button = (action, label, extra = "") =>
      h("button", { type: "button", class: `quiet ${extra}`, "data-action": action }, label);
    const drain = button("drain", "Drain");
    const undrain = button("undrain", "Undrain");
    const remove = button("remove", "Remove", "danger");
    drain.addEventListener("click", () =>
      this.ask(nodeId, "drain", `Drain ${nodeId}? It takes no new requests; its running ones finish.`),
    );
    undrain.addEventListener("click", () => this.act(nodeId, "undrain"));
    remove.addEventListener("click", () =>
      this.ask(nodeId, "remove", `Remove ${nodeId}? It leaves the fleet and stops at its next heartbeat.`),
    );
    const cells = Array.from({ length: 11 }, () => h("td"));
    const actions = h("td", { class: "actions" }, drain, undrain, remove);
    const tr = h("tr", { dataset: { nodeId } }, cells, actions);
    return { tr, cells, drain, undrain };
  }

  fill({ tr, cells: c, drain, undrain }, row) {
    c[0].replaceChildren(h("code", {}, row.node_id));
    c[1].textContent = row.role;
    c[2].textContent = row.model_name;
    c[2].className = "model";
    c[3].textContent = row.kv_transport ? `${row.device} · ${row.kv_transport}` : row.device;
    // A member of an expert-parallel group: its rank of the group's size, the group on hover.
    if (row.ep_size > 1) c[3].textContent += ` · EP ${row.ep_rank}/${row.ep_size}`;
    c[3].title = row.ep_size > 1 ? `expert-parallel group ${row.ep_group}` : "";
    c[4].replaceChildren(h("span", { class: `status badge ${row.status}` }, row.status));
    // A node its supervisor (lightctl up) started again after it died.
    if (row.restarts > 0) {
      const times = row.restarts === 1 ? "once" : `${row.restarts} times`;
      c[4].append(" ", h("span", { class: "restarts muted", title: `restarted ${times}` }, `↻${row.restarts}`));
    }
    c[5].replaceChildren(row.live ? kvBar(row) : "–");
    for (const [i, value] of [[6, row.running], [7, row.queued], [8, rate(row.tokens_per_s)]]) {
      c[i].textContent = row.live ? value : "–";
      c[i].className = "num";
      c[i].title = row.status === "dead" ? "dead: its last heartbeat's figures are not shown" : "";
    }
    c[9].textContent = row.live ? percent(row.cache_hit_rate) : "–";
    c[9].className = "num";
    c[9].title = row.live ? `${row.cached_tokens} prompt tokens from the prefix cache` : "";
    c[10].textContent = age(row.heartbeat_age);
    c[10].className = "num";
    tr.className = row.status;
    drain.disabled = row.status !== "ready";
    drain.hidden = DRAINED.includes(row.status);
    undrain.hidden = !drain.hidden;
  }

  async ask(nodeId, action, question) {
    if (await this.confirm(question)) await this.act(nodeId, action);
  }
}
