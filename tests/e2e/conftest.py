"""Real node processes on 127.0.0.1 for end-to-end tests."""

import pytest

from lightpd.controlplane.lightctl.node_process import NodeProcess, start_node
from tests.e2e.fleet import CLUSTER_TOKEN


@pytest.fixture
def nodes():
    """Factory of node processes, all stopped at the end of the test."""
    started: list[NodeProcess] = []

    def start(role: str, model: str, *args: str) -> NodeProcess:
        node = start_node(role, model, *args, cluster_token=CLUSTER_TOKEN)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
