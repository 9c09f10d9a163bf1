"""Linear layers whose parameters know how to load themselves from a checkpoint."""

import torch
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class PackedLinear(nn.Linear):
    """One matmul for several projections of the same input (q/k/v, gate/up).

    The checkpoint stores each projection separately; ``load_shard`` copies one of
    them into its rows, so the fusion costs nothing at run time.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        for param in self.parameters():
            param.weight_loader = self.load_shard

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        start, size = self.shard_offsets[shard]
        default_weight_loader(param.data.narrow(0, start, size), loaded)
