"""Which slots and which table row each request holds: the one place that moves them."""

import torch

from common.engine.kv_pool import TokenKVPool
from common.engine.req_table import RequestTable
from common.engine.request import Request


class KVManager:
    def __init__(self, pool: TokenKVPool, table: RequestTable) -> None:
        self.pool = pool
        self.table = table

    def can_allocate(self, request: Request) -> bool:
        return self.table.num_free_rows > 0 and self.pool.can_allocate(request.num_tokens)

    def allocate(self, request: Request) -> None:
        """Give ``request`` a row and a slot for each token it has (prompt + any output)."""
        row = self.table.allocate_row()
        num_tokens = request.num_tokens
        tokens = request.prompt_token_ids + request.output_token_ids
        self.table.token_ids[row, :num_tokens] = torch.tensor(tokens, dtype=torch.int32)
        self.table.req_to_token[row, :num_tokens] = self.pool.allocate(num_tokens)
        request.row = row
        request.num_slots = num_tokens
        request.num_computed_tokens = 0

    def can_append(self, num_requests: int) -> bool:
        return self.pool.can_allocate(num_requests)

    def append_slot(self, requests: list[Request]) -> None:
        """One more slot for each request, at its next position (one tensor op for all)."""
        device = self.pool.device
        rows = torch.tensor([r.row for r in requests], device=device)
        positions = torch.tensor([r.num_slots for r in requests], device=device)
        self.table.req_to_token[rows, positions] = self.pool.allocate(len(requests))
        for request in requests:
            request.num_slots += 1

    def deallocate(self, request: Request) -> None:
        self.pool.free(self.table.req_to_token[request.row, : request.num_slots])
        self.table.free_row(request.row)
        request.row = -1
        request.num_slots = 0
        request.num_computed_tokens = 0
