"""Prometheus metrics of the control plane, plus per-node gauges read from the registry."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lightpd.controlplane.fleet_schemas import NodePublic

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (1, 8, 32, 128, 512, 2048, 8192, 32768, 131072)


class Metrics:
    """Request metrics under vLLM's family names with our prefix (``lightpd_``), each
    with a ``model_name`` label, so a vLLM dashboard can be pointed at us; and the
    fleet's load (running and waiting requests, KV usage, preemptions) summed over
    the nodes' last heartbeats."""

    def __init__(self, nodes: Callable[[], list[NodePublic]], model_name: str = "") -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._request_metrics()
        self._token_metrics()
        self.registry.register(_NodeCollector(nodes))
        self.registry.register(_FleetCollector(nodes, model_name))

    def _histogram(self, name: str, doc: str, buckets=None) -> Histogram:
        buckets = _LATENCY_BUCKETS if buckets is None else buckets
        return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry)

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, ["model_name", *labels], registry=self.registry)

    def _request_metrics(self) -> None:
        """Requests: how they ended, and their latencies and sizes."""
        self.requests = self._counter("lightpd_requests", "Requests by final status", ("status",))
        self.success = self._counter(
            "lightpd_request_success",
            "Requests that ended, by finish reason (stop, length, abort, error)",
            ("finished_reason",),
        )
        self.ttft = self._histogram("lightpd_time_to_first_token_seconds", "Time to first token")
        self.tpot = self._histogram(
            "lightpd_time_per_output_token_seconds", "Time per output token after the first"
        )
        self.e2e = self._histogram(
            "lightpd_e2e_request_latency_seconds", "End-to-end request latency"
        )
        self.queue_time = self._histogram(
            "lightpd_request_queue_time_seconds", "From arrival until a decode node took it"
        )
        self.prefill_time = self._histogram(
            "lightpd_request_prefill_time_seconds",
            "From admission to the first token (prefill and KV hand-off)",
        )
        self.decode_time = self._histogram(
            "lightpd_request_decode_time_seconds", "From the first token to the last"
        )
        self.inference_time = self._histogram(
            "lightpd_request_inference_time_seconds", "From admission to the last token"
        )
        self.request_prompt_tokens = self._histogram(
            "lightpd_request_prompt_tokens", "Prompt tokens per request", _TOKEN_BUCKETS
        )
        self.request_generation_tokens = self._histogram(
            "lightpd_request_generation_tokens", "Generated tokens per request", _TOKEN_BUCKETS
        )

    def _token_metrics(self) -> None:
        """Tokens: prompt and generated, from the prefix caches, sent prefill -> decode."""
        model_name = self.model_name
        self.prompt_tokens = self._counter("lightpd_prompt_tokens", "Prompt tokens")
        self.generation_tokens = self._counter("lightpd_generation_tokens", "Generated tokens")
        self.migrations = self._counter(
            "lightpd_request_migrations",
            "Requests moved to another decode node mid-stream (node died or drained)",
        ).labels(model_name)
        self.cached_prompt_tokens = self._counter(
            "lightpd_prompt_tokens_cached",
            "Prompt tokens taken from a node's prefix cache instead of computed",
        ).labels(model_name)
        self.kv_transfer_tokens = self._counter(
            "lightpd_kv_transfer_tokens",
            "Prompt tokens whose KV went from a prefill node to a decode node",
        ).labels(model_name)
        self.kv_transfer_bytes = self._counter(
            "lightpd_kv_transfer_bytes",
            "Bytes of KV sent from prefill nodes to decode nodes",
        ).labels(model_name)

    def finish(
        self,
        status: str,
        finished_reason: str,
        times: "RequestTimes",
        num_prompt: int,
        num_output: int,
    ) -> None:
        name = self.model_name
        self.requests.labels(name, status).inc()
        self.success.labels(name, finished_reason).inc()
        self.e2e.labels(name).observe(times.e2e_s)
        self.prompt_tokens.labels(name).inc(num_prompt)
        self.generation_tokens.labels(name).inc(num_output)
        self.request_prompt_tokens.labels(name).observe(num_prompt)
        self.request_generation_tokens.labels(name).observe(num_output)
        if times.queue_s is not None:
            self.queue_time.labels(name).observe(times.queue_s)
        if times.ttft_s is not None and times.queue_s is not None:
            self.prefill_time.labels(name).observe(max(0.0, times.ttft_s - times.queue_s))
            self.decode_time.labels(name).observe(times.e2e_s - times.ttft_s)
            self.inference_time.labels(name).observe(times.e2e_s - times.queue_s)
        if times.ttft_s is not None and num_output > 1:
            self.tpot.labels(name).observe((times.e2e_s - times.ttft_s) / (num_output - 1))


@dataclass(frozen=True)
class RequestTimes:
    """Seconds from a request's arrival: when a decode node took it, its first token,
    its end (None for what it never reached)."""

    e2e_s: float
    queue_s: float | None = None
    ttft_s: float | None = None


class _FleetCollector(Collector):
    """vLLM's load gauges for the whole fleet, from the nodes' last heartbeats."""

    def __init__(self, nodes: Callable[[], list[NodePublic]], model_name: str) -> None:
        self.nodes = nodes
        self.model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        live = [n for n in self.nodes() if n.stats is not None and n.status != "dead"]
        decode = [n for n in live if n.role == "decode"]
        total = sum(n.num_slots for n in decode)
        free = sum(n.stats.num_free_slots for n in decode)
        values = (
            ("num_requests_running", "Requests decoding on the nodes", "num_running"),
            ("num_requests_waiting", "Requests queued at the nodes", "num_queued"),
        )
        for name, doc, field in values:
            gauge = GaugeMetricFamily(f"lightpd_{name}", doc, labels=["model_name"])
            gauge.add_metric([self.model_name], sum(getattr(n.stats, field) for n in live))
            yield gauge
        usage = GaugeMetricFamily(
            "lightpd_kv_cache_usage_perc",
            "Share of the decode nodes' KV slots in use (1 = full)",
            labels=["model_name"],
        )
        usage.add_metric([self.model_name], 1 - free / total if total else 0.0)
        yield usage
        preemptions = CounterMetricFamily(
            "lightpd_num_preemptions",
            "Requests paused for KV room on the live nodes (recomputed later)",
            labels=["model_name"],
        )
        preemptions.add_metric([self.model_name], sum(n.stats.num_preemptions for n in live))
        yield preemptions


class _NodeCollector(Collector):
    """Gauges of each node from the last registry snapshot; scraping never hits Redis."""

    def __init__(self, nodes: Callable[[], list[NodePublic]]) -> None:
        self.nodes = nodes

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauges = {
            "num_free_slots": GaugeMetricFamily(
                "lightpd_node_free_slots", "Free KV slots", labels=["node", "role"]
            ),
            "num_reserved_slots": GaugeMetricFamily(
                "lightpd_node_reserved_slots",
                "KV slots held for incoming KV",
                labels=["node", "role"],
            ),
            "num_running": GaugeMetricFamily(
                "lightpd_node_running_requests", "Running requests", labels=["node", "role"]
            ),
            "num_queued": GaugeMetricFamily(
                "lightpd_node_queued_requests", "Queued requests", labels=["node", "role"]
            ),
            "tokens_per_s": GaugeMetricFamily(
                "lightpd_node_tokens_per_second", "Tokens per second", labels=["node", "role"]
            ),
            "num_cached_slots": GaugeMetricFamily(
                "lightpd_node_prefix_cache_slots",
                "KV slots the prefix cache holds (used or evictable)",
                labels=["node", "role"],
            ),
            "cache_hit_rate": GaugeMetricFamily(
                "lightpd_node_prefix_cache_hit_rate",
                "Share of the prompt tokens admitted since the node started that its "
                "prefix cache held",
                labels=["node", "role"],
            ),
        }
        counters = {
            "num_prompt_tokens": CounterMetricFamily(
                "lightpd_node_prefix_cache_queries",
                "Prompt tokens admitted (looked up in the prefix cache)",
                labels=["node", "role"],
            ),
            "num_cached_prompt_tokens": CounterMetricFamily(
                "lightpd_node_prefix_cache_hits",
                "Prompt tokens found in the prefix cache",
                labels=["node", "role"],
            ),
        }
        # Restarts come with the registration (the supervisor counts them), so a node
        # keeps its count while dead, and its id keeps its series across restarts.
        restarts = CounterMetricFamily(
            "lightpd_node_restarts",
            "Times a supervisor (lightctl up) started the node again after it exited",
            labels=["node", "role"],
        )
        for node in self.nodes():
            restarts.add_metric([node.node_id, node.role], node.restarts)
            if node.stats is None or node.status == "dead":  # a dead node's stats are stale
                continue
            for field, family in (gauges | counters).items():
                family.add_metric([node.node_id, node.role], getattr(node.stats, field))
        yield from gauges.values()
        yield from counters.values()
        yield restarts
