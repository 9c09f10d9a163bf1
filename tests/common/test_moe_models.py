"""MoE families: greedy tokens as transformers, the experts' reference, and strict
loading of per-expert checkpoint tensors into stacked weights."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightpd.common.engine.loader import WeightLoadError
from lightpd.common.engine.models.moe import SparseMoeBlock, moe_experts_reference
from lightpd.common.tiny import write_tiny_checkpoint
from tests.common.test_engine import GREEDY, hf_greedy, make_engine, random_prompts, run_staggered
from tests.common.test_loader import copy_model, edit_weights, load

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
LENGTHS = (3, 41, 12, 1, 27)
ARRIVALS = (0, 0, 1, 3, 9)  # joins while others are mid-decode


@pytest.mark.parametrize("arch", FAMILIES)
def test_continuous_batching_matches_transformers_greedy(tiny_model, arch):
    model_dir = tiny_model(arch)
    prompts = random_prompts(LENGTHS, 400)
    expected = hf_greedy(model_dir, prompts)
    # A small prefill budget also makes the long prompt run in chunks.
    engine = make_engine(model_dir, max_prefill_tokens=24)
    tokens = run_staggered(engine, prompts, GREEDY, ARRIVALS)
    for i, want in enumerate(expected):
        assert tokens[f"r{i}"] == want, f"request {i} (prompt of {LENGTHS[i]} tokens)"
    assert engine.num_available_slots == engine.pool.num_slots


@pytest.mark.parametrize(
    ("arch", "module", "gate", "up", "down"),
    [
        ("mixtral", "block_sparse_moe", "w1", "w3", "w2"),
        ("qwen3_moe", "mlp", "gate_proj", "up_proj", "down_proj"),
    ],
)
def test_experts_are_stacked_gate_then_up(tiny_model, arch, module, gate, up, down):
    model_dir = tiny_model(arch)
    tensors = load_file(Path(model_dir) / "model.safetensors")
    params = dict(load(model_dir).runner.model.named_parameters())
    w13, w2 = params["model.layers.1.mlp.experts.w13"], params["model.layers.1.mlp.experts.w2"]
    for e in range(w13.shape[0]):
        prefix = f"model.layers.1.{module}.experts.{e}"
        expected = torch.cat([tensors[f"{prefix}.{gate}.weight"], tensors[f"{prefix}.{up}.weight"]])
        assert torch.equal(w13[e], expected)  # (2I, H)
        assert torch.equal(w2[e], tensors[f"{prefix}.{down}.weight"])  # (H, I)


def test_sparse_and_dense_layers_follow_sparse_step_and_mlp_only_layers(tmp_path):
    overrides = {"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    model_dir = write_tiny_checkpoint(tmp_path / "m", "qwen2_moe", overrides=overrides)
    engine = load(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ours = [isinstance(layer.mlp, SparseMoeBlock) for layer in engine.runner.model.model.layers]
    theirs = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert ours == theirs == [False, True, False, False, False, True]
    prompt = random_prompts([9], engine.model_config.vocab_size)[0]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, -1]
    assert (engine.runner.prompt_logits([prompt])[0] - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("renormalize", [False, True])
def test_experts_reference_is_the_weighted_sum_of_each_tokens_top_k(top_k, renormalize):
    num_experts, hidden, inter, num_tokens = 4, 16, 8, 7
    g = torch.Generator().manual_seed(top_k)
    x = torch.randn(num_tokens, hidden, generator=g)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.3
    w2 = torch.randn(num_experts, hidden, inter, generator=g) * 0.3

    out = moe_experts_reference(x, logits, w13, w2, top_k, renormalize)

    for t in range(num_tokens):
        probs = logits[t].softmax(-1)
        chosen = probs.argsort(descending=True)[:top_k]
        weights = probs[chosen] / (probs[chosen].sum() if renormalize else 1.0)
        want = torch.zeros(hidden)
        for weight, e in zip(weights, chosen.tolist(), strict=True):
            gate, up = w13[e, :inter] @ x[t], w13[e, inter:] @ x[t]
            want += weight * (w2[e] @ (F.silu(gate) * up))
        assert torch.allclose(out[t], want, atol=1e-5), f"token {t}"
    # An empty batch (an idle member of an expert-parallel group) is a valid call.
    empty = moe_experts_reference(x[:0], logits[:0], w13, w2, top_k, renormalize)
    assert empty.shape == (0, hidden)


@pytest.mark.parametrize(
    ("arch", "name"),
    [
        ("mixtral", "model.layers.1.block_sparse_moe.experts.2.w3.weight"),
        ("qwen2_moe", "model.layers.2.mlp.experts.5.up_proj.weight"),
        ("qwen3_moe", "model.layers.0.mlp.experts.7.down_proj.weight"),
    ],
)
def test_missing_expert_tensor_is_named(tiny_model, tmp_path, arch, name):
    model_dir = copy_model(tiny_model(arch), tmp_path / "m")
    edit_weights(model_dir, lambda t: t.pop(name))
    with pytest.raises(WeightLoadError, match=rf"missing tensor '{name}'") as err:
        load(model_dir)
    assert str(err.value).count("missing tensor") == 1


def test_unexpected_expert_tensors_are_named(tiny_model, tmp_path):
    model_dir = copy_model(tiny_model("qwen3_moe"), tmp_path / "m")
    extra = {
        "model.layers.0.mlp.experts.8.gate_proj.weight": torch.ones(32, 64),  # 8 experts: 0-7
        "model.layers.0.mlp.experts.0.w4.weight": torch.ones(32, 64),
        "model.layers.0.mlp.shared_expert_gate.weight": torch.ones(1, 64),  # Qwen2-MoE only
    }
    edit_weights(model_dir, lambda t: t.update(extra))
    with pytest.raises(WeightLoadError) as err:
        load(model_dir)
    for name in extra:
        assert f"unexpected tensor {name!r}" in str(err.value)
    assert "missing" not in str(err.value)


def test_misshaped_expert_tensor_is_named_with_both_shapes(tiny_model, tmp_path):
    model_dir = copy_model(tiny_model("mixtral"), tmp_path / "m")
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:, :-1].contiguous()

    edit_weights(model_dir, shrink)
    with pytest.raises(
        WeightLoadError, match=rf"'{name}': expected shape \(64, 96\), got \(64, 95\)"
    ):
        load(model_dir)
