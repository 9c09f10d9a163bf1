"""Which slots and which table row each request holds: the one place that moves them.

With a prefix cache, a request's leading ``num_cached_slots`` positions map to
slots the cache owns (shared, referenced through ``request.prefix_node``) and the
rest to slots of its own. Slots the cache holds but no request references count
as free: they are evicted when an allocation needs them.
"""

import torch

from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.engine.prefix_cache import PrefixCache
from lightpd.common.engine.req_table import RequestTable
from lightpd.common.engine.request import Request


class KVManager:
    def __init__(
        self, pool: TokenKVPool, table: RequestTable, prefix_cache: PrefixCache | None = None
    ) -> None:
        self.pool = pool
        self.table = table
        self.prefix_cache = prefix_cache
        # Prompt tokens admitted (first admissions only), and of those, cache hits.
        self.num_prompt_tokens = 0
        self.num_cached_prompt_tokens = 0

    @property
    def num_available_slots(self) -> int:
        """Free slots, and cached slots that no request uses (evictable)."""
        evictable = 0 if self.prefix_cache is None else self.prefix_cache.num_evictable_slots
        return self.pool.num_free_slots + evictable

    @property
    def num_cached_slots(self) -> int:
        """Slots the prefix cache holds, used or not."""
        return 0 if self.prefix_cache is None else self.prefix_cache.num_cached_slots

    @property
    def num_locked_slots(self) -> int:
        """Cached slots some request uses (counted once, however many share them)."""
        return 0 if self.prefix_cache is None else self.prefix_cache.num_locked_slots

    def _uses_cache(self, request: Request) -> bool:
        # Every kind of request does: a reservation receives KV only for the positions
        # past its cached prefix (its own slots), and a prompt whose KV is sent out
        # sends the cached part from the cache's slots.
        return self.prefix_cache is not None

    def peek_prefix(self, request: Request) -> tuple[int, int]:
        """How many leading tokens of ``request`` would come from the cache, and how
        many of those are evictable now; changes nothing."""
        if not self._uses_cache(request):
            return 0, 0
        namespace = request.params.cache_namespace
        return self.prefix_cache.peek(self._cacheable_tokens(request), namespace)

    @staticmethod
    def _cacheable_tokens(request: Request) -> list[int]:
        # At least the last token is computed: the request samples from fresh logits.
        tokens = request.prompt_token_ids + request.output_token_ids
        return tokens[: request.num_tokens - 1]

    def can_allocate(self, request: Request) -> bool:
        if self.table.num_free_rows == 0:
            return False
        num_cached, num_unlocked = self.peek_prefix(request)
        # The matched slots that are evictable now are pinned once the request uses them.
        return request.num_tokens - num_cached <= self.num_available_slots - num_unlocked

    def allocate(self, request: Request) -> None:
        """Give ``request`` a row and a slot for each token it has (prompt + any
        output): the cached prefix's slots, then new ones; it computes the rest."""
        row = self.table.allocate_row()
        num_tokens = request.num_tokens
        tokens = request.prompt_token_ids + request.output_token_ids
        self.table.token_ids[row, :num_tokens] = torch.tensor(tokens, dtype=torch.int32)
        num_cached = 0
        if self._uses_cache(request):
            tokens = self._cacheable_tokens(request)
            cached, node = self.prefix_cache.match(tokens, request.params.cache_namespace)
            self.prefix_cache.lock(node)  # before evicting, so the match stays
            num_cached = cached.numel()
            self.table.req_to_token[row, :num_cached] = cached
            request.prefix_node = node
        self.table.req_to_token[row, num_cached:num_tokens] = self._take(num_tokens - num_cached)
        request.row = row
        request.num_slots = num_tokens
        request.num_cached_slots = num_cached
        request.num_computed_tokens = num_cached
        if request.num_cached_tokens is None:  # first admission (not a resume)
            request.num_cached_tokens = min(num_cached, request.num_prompt_tokens)
            self.num_prompt_tokens += request.num_prompt_tokens
            self.num_cached_prompt_tokens += request.num_cached_tokens

    def _take(self, num_slots: int) -> torch.Tensor:
        shortfall = num_slots - self.pool.num_free_slots
        if shortfall > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(shortfall)
        return self.pool.allocate(num_slots)

    def can_append(self, num_requests: int) -> bool:
        return num_requests <= self.num_available_slots

    def append_slot(self, requests: list[Request]) -> None:
        """One more slot for each request, at its next position (one tensor op for all)."""
        device = self.pool.device
        rows = torch.tensor([r.row for r in requests], device=device)
        positions = torch.tensor([r.num_slots for r in requests], device=device)
        self.table.req_to_token[rows, positions] = self._take(len(requests))
        for request in requests:
            request.num_slots += 1

    def cache_computed(self, request: Request) -> None:
        """Put the KV ``request`` has computed into the prefix cache, and map its
        positions to the cache's slots (where the cache had them already, its own
        copies go back to the pool), so that others can share it while it runs."""
        if request.prefix_node is None:
            return
        num_computed = request.num_computed_tokens
        tokens = (request.prompt_token_ids + request.output_token_ids)[:num_computed]
        slots = self.table.req_to_token[request.row, :num_computed]
        namespace = request.params.cache_namespace
        num_existing, node = self.prefix_cache.insert(tokens, slots, namespace)
        if num_existing > request.num_cached_slots:
            # Another request cached these tokens since this one was admitted.
            self.pool.free(slots[request.num_cached_slots : num_existing].clone())
            cached = self.prefix_cache.path_slots(node)
            slots[request.num_cached_slots : num_existing] = cached[
                request.num_cached_slots : num_existing
            ]
        self.prefix_cache.lock(node)
        self.prefix_cache.unlock(request.prefix_node)
        request.prefix_node = node
        request.num_cached_slots = num_computed

    def deallocate(self, request: Request) -> None:
        """Give back ``request``'s row and KV: with a prefix cache, what it computed
        stays cached (unreferenced, so evictable), and the rest is freed."""
        if request.prefix_node is not None:
            self.cache_computed(request)
            self.prefix_cache.unlock(request.prefix_node)
            request.prefix_node = None
        own = self.table.req_to_token[request.row, request.num_cached_slots : request.num_slots]
        self.pool.free(own)
        self.table.free_row(request.row)
        request.row = -1
        request.num_slots = 0
        request.num_cached_slots = 0
        request.num_computed_tokens = 0
