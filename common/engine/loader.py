"""Build a model from a local Hugging Face directory and load its safetensors strictly."""

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from common.engine.layers.linear import default_weight_loader
from common.engine.model_config import ModelConfig
from common.engine.models import get_model_class

# Buffers some checkpoints carry that we compute ourselves.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_PROGRESS_MIN_BYTES = 1 << 30


class WeightLoadError(ValueError):
    """The checkpoint does not match the model: names the offending tensors."""


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightLoadError(f"shards named in {index.name} are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {model_dir}")
    return files


def load_model(
    model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Instantiate ``config.architecture`` on ``device`` in ``dtype`` and load its weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = get_model_class(config.architecture)(config)
    finally:
        torch.set_default_dtype(previous)
    load_weights(model, safetensors_files(Path(model_dir)), device)
    return model.eval()


def load_weights(model: nn.Module, files: list[Path], device: torch.device) -> None:
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules_mapping", {})
    expected = {name: _shards_of(param) for name, param in params.items()}
    loaded: dict[str, set] = {name: set() for name in params}
    errors: list[str] = []
    tied = getattr(model.config, "tie_word_embeddings", False)

    for name, tensor in _iter_tensors(files, device):
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        param_name, shard = _map_name(name, packed)
        if param_name not in params:
            errors.append(f"unexpected tensor {name!r}")
            continue
        param = params[param_name]
        loader = getattr(param, "weight_loader", None)
        try:
            if loader is None:
                default_weight_loader(param, tensor)
            else:
                loader(param, tensor, shard)
        except ValueError as exc:
            errors.append(f"tensor {name!r}: {exc}")
            continue
        loaded[param_name].add(shard)

    for param_name, shards in expected.items():
        for shard in shards - loaded[param_name]:
            errors.append(f"missing tensor {_checkpoint_name(param_name, shard, packed)!r}")
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise WeightLoadError(f"checkpoint does not match the model:\n  {shown}{more}")


def _shards_of(param: nn.Parameter) -> set:
    owner = (
        getattr(param.weight_loader, "__self__", None) if hasattr(param, "weight_loader") else None
    )
    return set(owner.shard_offsets) if owner is not None else {None}


def _map_name(name: str, packed: dict[str, tuple[str, str]]) -> tuple[str, str | None]:
    for part, (fused, shard) in packed.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard
    return name, None


def _checkpoint_name(param_name: str, shard: str | None, packed: dict) -> str:
    for part, (fused, fused_shard) in packed.items():
        if fused_shard == shard and f".{fused}." in param_name:
            return param_name.replace(f".{fused}.", f".{part}.")
    return param_name


def _iter_tensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    total = sum(f.stat().st_size for f in files)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="Loading weights",
        disable=total < _PROGRESS_MIN_BYTES,
    ) as progress:
        for path in files:
            # Straight to the target device; the dtype cast happens in the param copy.
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensor = f.get_tensor(name)
                    yield name, tensor
                    progress.update(tensor.numel() * tensor.element_size())
