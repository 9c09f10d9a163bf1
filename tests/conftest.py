"""Suite-wide setup. Triton reads TRITON_INTERPRET when a kernel is decorated, so it
is set here, before any kernel module is imported, whenever no GPU is present."""

import os
import threading
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Engine tests run on the CPU (references) unless told otherwise, e.g. on a GPU
# machine: LIGHTPD_TEST_DEVICE=cuda runs them through the Triton kernels.
DEVICE = os.environ.get("LIGHTPD_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Build (once per session) a tiny random checkpoint: tiny_model("qwen3", dtype=...)."""
    from lightpd.common.tiny import write_tiny_checkpoint

    cache: dict[tuple, str] = {}

    def build(arch: str = "llama", **options) -> str:
        key = (arch, *sorted(options.items()))
        if key not in cache:
            name = "-".join(str(part) for part in (arch, *options.values())) or arch
            out = tmp_path_factory.mktemp(f"tiny-{name}")
            cache[key] = str(write_tiny_checkpoint(out, arch, **options))
        return cache[key]

    return build


# What a test starts in this process it stops: a thread left running (a connector's
# sender, a grammar compiler, an engine's worker) would touch the GPU while a later
# test captures a CUDA graph, and a node would meet the same. Each module of the
# engine and kernel tests is checked once its fixtures are torn down: a thread it
# started that still runs after a grace period fails it. (Module, not test: a
# module's shared engine may start its grammar thread during any of its tests.)
CHECKED_FOR_THREADS = ("tests/common", "tests/kernels")
THREAD_GRACE_S = 10.0
# Process-wide helpers that never touch a device: tqdm's refresh monitor, started
# by the first progress bar (transformers' save_pretrained) and kept for the process.
LIFELONG_THREADS = ("tqdm_monitor",)

_open_engines: list = []


def open_engine(config, connector=None):
    """An LLMEngine that is closed when the test that opened it ends, passed or not.
    (A module's shared engine is opened directly and closed by its fixture.)"""
    from lightpd.common.engine import LLMEngine

    engine = LLMEngine(config, connector)
    _open_engines.append(engine)
    return engine


@pytest.fixture(autouse=True)
def closes_its_engines():
    opened = len(_open_engines)
    yield
    while len(_open_engines) > opened:
        _open_engines.pop().close()


@pytest.fixture(scope="module", autouse=True)
def leaves_no_thread_running(request):
    path = Path(str(request.node.fspath)).resolve().relative_to(Path(__file__).resolve().parents[1])
    before = set(threading.enumerate())
    yield
    if not str(path).startswith(CHECKED_FOR_THREADS):
        return
    deadline = time.monotonic() + THREAD_GRACE_S
    while left := [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and t.name not in LIFELONG_THREADS
    ]:
        if time.monotonic() > deadline:
            pytest.fail(f"{path} left threads running: {sorted(t.name for t in left)}")
        time.sleep(0.05)
