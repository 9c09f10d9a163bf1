"""Prometheus metrics of the control plane, plus per-node gauges read from the registry."""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from controlplane.schemas import NodePublic

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, nodes: Callable[[], list[NodePublic]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lightpd_requests", "Requests by final status", ["status"], registry=self.registry
        )
        self.ttft = Histogram(
            "lightpd_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "lightpd_time_per_output_token_seconds",
            "Time per output token after the first",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "lightpd_e2e_request_latency_seconds",
            "End-to-end request latency",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "lightpd_prompt_tokens", "Prompt tokens", registry=self.registry
        )
        self.generation_tokens = Counter(
            "lightpd_generation_tokens", "Generated tokens", registry=self.registry
        )
        self.migrations = Counter(
            "lightpd_request_migrations",
            "Requests moved to another decode node mid-stream (node died or drained)",
            registry=self.registry,
        )
        self.registry.register(_NodeCollector(nodes))

    def finish(
        self, status: str, e2e_s: float, ttft_s: float | None, num_prompt: int, num_output: int
    ) -> None:
        self.requests.labels(status).inc()
        self.e2e.observe(e2e_s)
        self.prompt_tokens.inc(num_prompt)
        self.generation_tokens.inc(num_output)
        if ttft_s is not None and num_output > 1:
            self.tpot.observe((e2e_s - ttft_s) / (num_output - 1))


class _NodeCollector(Collector):
    """Gauges of each node from the last registry snapshot; scraping never hits Redis."""

    def __init__(self, nodes: Callable[[], list[NodePublic]]) -> None:
        self.nodes = nodes

    def collect(self) -> Iterator[GaugeMetricFamily]:
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
        }
        for node in self.nodes():
            if node.stats is None or node.status == "dead":  # a dead node's stats are stale
                continue
            for field, gauge in gauges.items():
                gauge.add_metric([node.node_id, node.role], getattr(node.stats, field))
        yield from gauges.values()
