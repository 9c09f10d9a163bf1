"""Build a model from a local Hugging Face directory and load its safetensors strictly."""

import json
import re
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from lightpd.common.engine.layers.linear import default_weight_loader
from lightpd.common.engine.model_config import ModelConfig
from lightpd.common.engine.models import get_model_class

# Buffers some checkpoints carry that we compute ourselves.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_PROGRESS_MIN_BYTES = 1 << 30
# One projection of one expert, as MoE checkpoints store them.
_EXPERT_TENSOR = re.compile(
    r"(?P<prefix>.+)\.experts\.(?P<expert>\d+)\.(?P<projection>\w+)\.weight"
)


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
    names = _NameMap.of(model)
    expected = {name: _shards_of(param) for name, param in params.items()}
    loaded: dict[str, set] = {name: set() for name in params}
    errors: list[str] = []
    tied = getattr(model.config, "tie_word_embeddings", False)

    for name, read in _iter_tensors(files, device):
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        param_name, shard = names.to_param(name)
        if param_name in params and shard in getattr(params[param_name], "skipped_shards", ()):
            continue  # held by another member of an expert-parallel group: never read
        if param_name not in params or shard not in expected[param_name]:
            errors.append(f"unexpected tensor {name!r}")
            continue
        param = params[param_name]
        loader = getattr(param, "weight_loader", None)
        tensor = read()
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
            errors.append(f"missing tensor {names.to_checkpoint(param_name, shard)!r}")
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise WeightLoadError(f"checkpoint does not match the model:\n  {shown}{more}")


def _shards_of(param: nn.Parameter) -> set:
    """The checkpoint tensors that make up ``param``: shard keys, or {None} for one tensor."""
    if hasattr(param, "shards"):  # set by the module, e.g. stacked experts
        return set(param.shards)
    owner = (
        getattr(param.weight_loader, "__self__", None) if hasattr(param, "weight_loader") else None
    )
    return set(owner.shard_offsets) if owner is not None else {None}


@dataclass(frozen=True)
class _NameMap:
    """Checkpoint tensor names <-> (our parameter, shard), from what the model declares."""

    packed: dict[str, tuple[str, str]]  # q_proj -> (qkv_proj, "q")
    experts: dict[str, tuple[str, str]]  # one expert's gate_proj -> (w13, "gate")
    renamed: dict[str, str]  # checkpoint module -> ours (block_sparse_moe -> mlp)

    @classmethod
    def of(cls, model: nn.Module) -> "_NameMap":
        return cls(
            getattr(model, "packed_modules_mapping", {}),
            getattr(model, "expert_modules_mapping", {}),
            getattr(model, "renamed_modules", {}),
        )

    def to_param(self, name: str) -> tuple[str, Hashable]:
        for theirs, ours in self.renamed.items():
            name = name.replace(f".{theirs}.", f".{ours}.")
        match = _EXPERT_TENSOR.fullmatch(name)
        if match and match["projection"] in self.experts:
            stacked, shard = self.experts[match["projection"]]
            return f"{match['prefix']}.experts.{stacked}", (int(match["expert"]), shard)
        for part, (fused, shard) in self.packed.items():
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), shard
        return name, None

    def to_checkpoint(self, param_name: str, shard: Hashable) -> str:
        name = param_name
        if isinstance(shard, tuple):  # (expert, shard) of a stacked expert parameter
            expert, expert_shard = shard
            prefix, stacked = param_name.rsplit(".", 1)
            part = next(p for p, key in self.experts.items() if key == (stacked, expert_shard))
            name = f"{prefix}.{expert}.{part}.weight"
        else:
            for part, (fused, fused_shard) in self.packed.items():
                if fused_shard == shard and f".{fused}." in name:
                    name = name.replace(f".{fused}.", f".{part}.")
                    break
        for theirs, ours in self.renamed.items():
            name = name.replace(f".{ours}.", f".{theirs}.")
        return name


def _iter_tensors(
    files: list[Path], device: torch.device
) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """Each tensor's name and how to read it, so tensors the model skips stay on disk."""
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

                def read(name: str, f=f) -> torch.Tensor:
                    tensor = f.get_tensor(name)
                    progress.update(tensor.numel() * tensor.element_size())
                    return tensor

                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, partial(read, name)
