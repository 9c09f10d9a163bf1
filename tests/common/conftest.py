"""Fixtures of the KV hand-off's tests: a sender and a receiver engine on the tiny
llama (``tests/common/kv_pair.py``), made once per test module."""

import pytest

from tests.common.kv_pair import make_engines


def _engines(tiny_model, cache: bool):
    engines = make_engines(tiny_model("llama"), cache=cache)
    yield engines
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def engines(tiny_model):
    """No prefix cache: every prompt moves whole (the transport's own behaviour)."""
    yield from _engines(tiny_model, cache=False)


@pytest.fixture(scope="module")
def cached_engines(tiny_model):
    yield from _engines(tiny_model, cache=True)
