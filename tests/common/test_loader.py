"""Strict loading: every checkpoint problem is an error that names the tensor."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.engine.loader import WeightLoadError
from lightpd.common.engine.model_config import ModelConfig, ModelConfigError
from lightpd.common.engine.models import UnsupportedArchitectureError
from lightpd.common.tiny import write_tiny_checkpoint
from tests.conftest import open_engine


def copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_weights(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def load(model_dir) -> LLMEngine:
    return open_engine(EngineConfig(model=str(model_dir), device="cpu", num_kv_slots=64))


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    single = write_tiny_checkpoint(tmp_path / "single", "qwen2", seed=3)
    sharded = write_tiny_checkpoint(tmp_path / "sharded", "qwen2", seed=3, max_shard_bytes=50_000)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").is_file()
    a = dict(load(single).runner.model.named_parameters())
    b = dict(load(sharded).runner.model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fused_projections_hold_the_checkpoint_rows(tiny_model):
    model_dir = tiny_model("qwen2")
    tensors = load_file(Path(model_dir) / "model.safetensors")
    params = dict(load(model_dir).runner.model.named_parameters())
    qkv = params["model.layers.1.self_attn.qkv_proj.weight"]
    expected = torch.cat([tensors[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, expected)
    bias = params["model.layers.1.self_attn.qkv_proj.bias"]
    assert torch.equal(
        bias, torch.cat([tensors[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"])
    )


def test_missing_tensor_is_named(tiny_model, tmp_path):
    model_dir = copy_model(tiny_model("llama"), tmp_path / "m")
    edit_weights(model_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        WeightLoadError, match=r"missing tensor 'model.layers.1.self_attn.k_proj.weight'"
    ):
        load(model_dir)


def test_unexpected_tensor_is_named(tiny_model, tmp_path):
    model_dir = copy_model(tiny_model("llama"), tmp_path / "m")
    edit_weights(model_dir, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(3)}))
    with pytest.raises(WeightLoadError, match=r"unexpected tensor 'model.layers.0.extra.weight'"):
        load(model_dir)


def test_misshaped_tensor_is_named_with_both_shapes(tiny_model, tmp_path):
    model_dir = copy_model(tiny_model("llama"), tmp_path / "m")

    def shrink(tensors):
        name = "model.layers.0.mlp.up_proj.weight"
        tensors[name] = tensors[name][:-1].contiguous()

    edit_weights(model_dir, shrink)
    with pytest.raises(
        WeightLoadError,
        match=r"'model.layers.0.mlp.up_proj.weight': expected "
        r"shape \(128, 64\), got \(127, 64\)",
    ):
        load(model_dir)


def test_unknown_architecture_lists_the_supported_ones(tiny_model, tmp_path):
    model_dir = copy_model(tiny_model("llama"), tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError) as err:
        ModelConfig.from_dir(model_dir)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in message


def test_unsupported_rope_scaling_and_missing_config_are_clear(tiny_model, tmp_path):
    model_dir = copy_model(tiny_model("llama"), tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"]["rope_type"] = "yarn"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_dir(model_dir)
    with pytest.raises(ModelConfigError, match=r"config\.json not found"):
        ModelConfig.from_dir(tmp_path / "nowhere")


def test_legacy_rope_scaling_key_is_read(tiny_model):
    raw = json.loads((Path(tiny_model("llama")) / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = {**params, "type": params.pop("rope_type")}
    config = ModelConfig.from_dict(raw)
    assert config.rope.rope_type == "llama3" and config.rope.theta == 500000.0
    assert config.rope.original_max_position_embeddings == 256
