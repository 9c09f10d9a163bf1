"""Per-request rows on the device: which slot and which token sits at each position."""

import torch


class RequestTable:
    """``req_to_token[row, pos]`` is the KV slot of position ``pos`` of the request
    in ``row``; ``token_ids[row, pos]`` is its token. Keeping the tokens on the
    device lets decode read its inputs and the penalties their history without a
    host round trip."""

    def __init__(self, max_num_reqs: int, max_context_len: int, device: torch.device | str) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_context_len = max_context_len
        # One row past the free ones is never handed out: the padding request of a
        # batch padded to a captured CUDA graph's size.
        self.padding_row = max_num_reqs
        self.req_to_token = torch.zeros(
            (max_num_reqs + 1, max_context_len), dtype=torch.int32, device=device
        )
        self.token_ids = torch.zeros(
            (max_num_reqs + 1, max_context_len), dtype=torch.int32, device=device
        )
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def allocate_row(self) -> int:
        if not self._free_rows:
            raise RuntimeError(f"all {self.max_num_reqs} request rows are in use")
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)
