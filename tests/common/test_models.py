"""Our models against transformers on the same random weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightpd.common.engine import EngineConfig
from tests.conftest import DEVICE, open_engine

ARCHES = [
    ("llama", {}),  # Llama 3.1 layout: llama3 rope scaling, untied head
    ("llama", {"tie_word_embeddings": True}),  # Llama 3.2 layout: tied head
    ("mistral", {}),
    ("qwen2", {}),  # q/k/v biases, tied
    ("qwen3", {}),  # q/k norms, head_dim != hidden / heads
    ("mixtral", {}),  # MoE in every layer, top-2 renormalised
    ("qwen2_moe", {}),  # q/k/v biases, a dense layer among MoE ones, shared expert
    ("qwen3_moe", {}),  # q/k norms, MoE top-2 renormalised
]
PROMPT_LENGTHS = (1, 5, 17, 40, 64)


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize(("arch", "options"), ARCHES, ids=lambda v: str(v) if v else "")
def test_last_position_logits_match_transformers(tiny_model, arch, options):
    model_dir = tiny_model(arch, **options)
    engine = open_engine(EngineConfig(model=model_dir, device=DEVICE, num_kv_slots=1024))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = random_prompts(PROMPT_LENGTHS, engine.model_config.vocab_size)

    ours = engine.runner.prompt_logits(prompts).cpu()  # one packed batch of ragged prompts

    with torch.no_grad():
        theirs = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in prompts])
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    assert engine.num_available_slots == 1024


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load_in_their_dtype(tiny_model, dtype):
    model_dir = tiny_model("qwen3", dtype=dtype)
    engine = open_engine(EngineConfig(model=model_dir, device=DEVICE, num_kv_slots=256))
    assert {p.dtype for p in engine.runner.model.parameters()} == {getattr(torch, dtype)}
    assert engine.pool.kv_buffer.dtype == getattr(torch, dtype)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    prompts = random_prompts((7, 23), engine.model_config.vocab_size)
    ours = engine.runner.prompt_logits(prompts).float().cpu()
    with torch.no_grad():
        theirs = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in prompts]).float()
    # Half precision: same shape of distribution, not the same bits.
    assert (ours - theirs).abs().max().item() < 0.1 * theirs.abs().max().item()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
