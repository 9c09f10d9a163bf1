"""Suite-wide setup. Triton reads TRITON_INTERPRET when a kernel is decorated, so it
is set here, before any kernel module is imported, whenever no GPU is present."""

import os

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
