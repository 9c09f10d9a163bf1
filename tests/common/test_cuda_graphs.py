"""Decode under CUDA graphs gives the tokens eager decode gives, and holds nothing back.

The graph tests need a GPU (``LIGHTPD_TEST_DEVICE=cuda``, as bench/gpu_run.sh runs them).
"""

import itertools

import pytest
import torch

from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.engine.cuda_graphs import graph_batch_sizes
from lightpd.common.wire.sampling_params import SamplingParams
from tests.common.test_engine import hf_greedy, random_prompts
from tests.conftest import DEVICE, open_engine

on_gpu = pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA graphs need a GPU")


def test_batch_size_ladder() -> None:
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    sizes = graph_batch_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 32] and sizes[-1] == 256
    assert all(b - a <= 16 for a, b in itertools.pairwise(sizes))


def test_cpu_engines_run_eagerly(tiny_model) -> None:
    engine = open_engine(EngineConfig(model=tiny_model("llama"), device="cpu", num_kv_slots=64))
    assert engine.runner.graphs is None


@on_gpu
def test_graph_decode_matches_transformers_and_eager(tiny_model) -> None:
    model_dir = tiny_model("llama")
    # 11 requests: batches of 11 down to 1 replay padded graphs (max 8) or run eagerly.
    lengths = [1, 3, 8, 17, 30, 2, 64, 5, 12, 40, 9]
    greedy = SamplingParams(temperature=0, max_new_tokens=32, min_new_tokens=32)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=20)

    def run(max_graph_batch: int) -> tuple[list[list[int]], LLMEngine]:
        engine = open_engine(
            EngineConfig(
                model=model_dir,
                device=DEVICE,
                num_kv_slots=2048,
                cuda_graph_max_batch=max_graph_batch,
            )
        )
        prompts = random_prompts(lengths, engine.model_config.vocab_size)
        params = [greedy if i % 2 == 0 else seeded for i in range(len(prompts))]
        return engine.generate(prompts, params), engine

    graphed, engine = run(8)
    eager, _ = run(0)

    assert engine.runner.graphs is not None and engine.runner.graphs.max_batch_size == 8
    assert graphed == eager
    prompts = random_prompts(lengths, engine.model_config.vocab_size)
    greedy_prompts = prompts[::2]
    assert graphed[::2] == hf_greedy(model_dir, greedy_prompts)
    assert engine.num_available_slots == engine.pool.num_slots
    assert engine.runner.table.num_free_rows == engine.runner.table.max_num_reqs


@on_gpu
def test_kv_pool_grows_with_the_memory_fraction(tiny_model) -> None:
    model_dir = tiny_model("llama")

    def slots(fraction: float) -> tuple[int, int]:
        config = EngineConfig(model=model_dir, device=DEVICE, gpu_memory_fraction=fraction)
        with LLMEngine(config) as engine:
            result = engine.pool.num_slots, engine.model_config.kv_bytes_per_token
        del engine
        torch.cuda.empty_cache()
        return result

    (small, kv_bytes_per_token), (large, _) = slots(0.3), slots(0.5)
    _, total = torch.cuda.mem_get_info()
    # A fifth more of the card is a fifth of the card more in KV slots (weights,
    # activations and graphs are the same in both), give or take the allocator.
    expected = 0.2 * total / kv_bytes_per_token
    assert small > 0
    assert abs((large - small) - expected) < 0.02 * expected
