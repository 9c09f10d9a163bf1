"""Send each layer's new KV the moment that layer has run, so transfer overlaps compute."""

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from common.engine.kv_pool import TokenKVPool
from common.engine.kv_transfer import gather_layer
from common.engine.req_table import RequestTable
from common.engine.request import Request

# (request, layer, first position, number of tokens, K bytes, V bytes)
SendLayer = Callable[[Request, int, int, int, torch.Tensor, torch.Tensor], None]


class LayerStreamer:
    """Forward hooks on the decoder layers (``model.model.layers``) that hand each
    layer's K/V of the running chunks to ``send`` as soon as the layer returns."""

    def __init__(
        self, model: nn.Module, pool: TokenKVPool, table: RequestTable, send: SendLayer
    ) -> None:
        self.pool = pool
        self.table = table
        self.send = send
        self._chunks: list[tuple[Request, int, int]] = []
        for index, layer in enumerate(model.model.layers):
            layer.register_forward_hook(functools.partial(self._on_layer, index))

    @contextmanager
    def streaming(self, chunks: list[tuple[Request, int, int]]) -> Iterator[None]:
        """Stream positions [start, end) of each (request, start, end) during the pass."""
        self._chunks = chunks
        try:
            yield
        finally:
            self._chunks = []

    def _on_layer(self, layer: int, module: nn.Module, args: tuple, output: object) -> None:
        for request, start, end in self._chunks:
            slots = self.table.req_to_token[request.row, start:end]
            k, v = gather_layer(self.pool, layer, slots)
            self.send(request, layer, start, end - start, k, v)
