"""Prefill batching: prompts under a token budget, long ones in chunks; KV held until acked."""

from collections import deque

from common.engine.kv_manager import KVManager
from common.engine.request import Request
from common.engine.scheduler import ScheduledBatch


class PrefillScheduler:
    def __init__(self, kv: KVManager, max_prefill_tokens: int) -> None:
        self.kv = kv
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.held: dict[str, Request] = {}  # prompt done, KV kept until the decode node acks

    @property
    def has_runnable(self) -> bool:
        return bool(self.prefilling) or (
            bool(self.waiting) and self.kv.can_allocate(self.waiting[0])
        )

    @property
    def num_queued_tokens(self) -> int:
        queued = sum(r.num_prompt_tokens for r in self.waiting)
        return queued + sum(r.num_tokens - r.num_computed_tokens for r in self.prefilling)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> ScheduledBatch | None:
        budget = self.max_prefill_tokens
        batch = ScheduledBatch(True, [], [], [])
        for request in self.prefilling:
            if budget <= 0:
                break
            budget -= batch.add_chunk(request, budget)
        while budget > 0 and self.waiting and self.kv.can_allocate(self.waiting[0]):
            request = self.waiting.popleft()
            self.kv.allocate(request)
            self.prefilling.append(request)
            budget -= batch.add_chunk(request, budget)
        return batch if batch.requests else None

    def finish_chunk(self, request: Request, end: int) -> bool:
        """Record a computed chunk; True when the prompt is complete (KV now held)."""
        request.num_computed_tokens = end
        if end < request.num_tokens:
            return False
        self.prefilling.remove(request)
        self.held[request.request_id] = request
        return True

    def release(self, request_id: str) -> Request | None:
        """Drop a request wherever it is and free its KV."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return request
        for request in self.prefilling:
            if request.request_id == request_id:
                self.prefilling.remove(request)
                self.kv.deallocate(request)
                return request
        request = self.held.pop(request_id, None)
        if request is not None:
            self.kv.deallocate(request)
        return request
