"""`python -m lightpd.controlplane.lightctl.healthcheck`, the nodes' container health check,
where no node answers (test_compose.py runs it against real nodes)."""

import subprocess
import sys

import pytest

from lightpd.controlplane.lightctl.embedded_redis import free_port
from lightpd.controlplane.lightctl.healthcheck import main, parse_args


def test_without_the_cluster_token_it_fails_and_says_why(monkeypatch, capsys):
    monkeypatch.delenv("LIGHTPD_CLUSTER_TOKEN", raising=False)
    assert main(["tcp://127.0.0.1:7100"]) == 1
    assert "LIGHTPD_CLUSTER_TOKEN is not set" in capsys.readouterr().err


def test_a_node_that_does_not_answer_is_unhealthy_within_the_timeout(monkeypatch, capsys):
    monkeypatch.setenv("LIGHTPD_CLUSTER_TOKEN", "cluster")
    assert main([f"tcp://127.0.0.1:{free_port()}", "--timeout-s=0.3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("unhealthy: no answer from tcp://127.0.0.1:")
    assert "down, still loading, or another cluster token" in err


def test_an_unknown_role_is_refused():
    with pytest.raises(SystemExit):
        parse_args(["tcp://prefill:7100", "--role=colocated"])


def test_it_loads_neither_torch_nor_transformers():
    # Run every few seconds in each node's container: it must start fast and stay small.
    code = (
        "import sys, lightpd.controlplane.lightctl.healthcheck; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
