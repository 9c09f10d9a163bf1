"""A radix tree over token ids whose nodes own KV slots of the token pool.

Each edge is a run of token ids together with the slots that hold their KV, one
slot per token: sharing is exact to the token, with no page rounding. A request
that starts with a cached prefix takes a reference on the deepest node of its
match (which pins every node above it) and computes only the rest. Nodes that no
request references are evictable, least recently used leaves first; since a
reference pins a whole path, every unreferenced node lies in an unreferenced
subtree, so all of them can be reached by evicting leaves.

The cache also keeps the names of the whole blocks of tokens it holds
(``common.wire.prefix_blocks``: chained hashes, one per BLOCK_TOKENS tokens from
the root): each node keeps those of the blocks that end on its edge. Every
block stored or evicted is noted (``take_block_events``), so a node can tell the
control planes what it holds, and they route requests to the node that holds
most of their prompt.
"""

import heapq
import itertools

import torch

from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.wire.prefix_blocks import BLOCK_TOKENS, block_hashes


class PrefixNode:
    __slots__ = (
        "children",
        "depth",
        "hashes",
        "last_access",
        "namespace",
        "parent",
        "ref_count",
        "slots",
        "token_ids",
    )

    def __init__(
        self, token_ids: list[int], slots: torch.Tensor, parent: "PrefixNode | None"
    ) -> None:
        self.token_ids = token_ids  # the edge from the parent
        self.slots = slots  # int32 [len(token_ids)]: their KV
        self.parent = parent
        self.children: dict[int, PrefixNode] = {}  # by first token id
        self.ref_count = 0  # requests whose match ends here or below
        self.last_access = 0
        # Tokens from the root to the end of this edge, and the names of the
        # blocks that end on it (block ends in (depth - len, depth]).
        self.depth = len(token_ids) + (parent.depth if parent is not None else 0)
        self.hashes: list[int] = []
        self.namespace = 0  # a root's: whose prefixes its tree holds

    def __len__(self) -> int:
        return len(self.token_ids)

    def __lt__(self, other: "PrefixNode") -> bool:
        return self.last_access < other.last_access


def _common_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """The cached KV of token prefixes, and who uses it.

    The protocol: ``match`` then ``lock`` at admission; ``insert`` what a request
    computed, then ``unlock`` its old node, when it is done (or ``lock`` the node
    ``insert`` returns, to keep using it); ``evict`` when the pool needs room."""

    def __init__(self, pool: TokenKVPool) -> None:
        self.pool = pool
        self._empty = torch.empty(0, dtype=torch.int32, device=pool.device)
        # One tree per namespace (a tenant's, see SamplingParams.cache_namespace): a
        # prefix is shared only within its namespace. 0 is the fleet-wide one.
        self.roots: dict[int, PrefixNode] = {}
        self.num_cached_slots = 0  # slots owned by the tree
        self.num_locked_slots = 0  # of those, slots on a path some request references
        self._clock = itertools.count(1)
        # Block names stored (True) or removed (False) since the last take, last word
        # wins; noted only once someone takes them (a node publishing them).
        self._block_events: dict[int, bool] = {}
        self._noting_blocks = False

    @property
    def num_evictable_slots(self) -> int:
        return self.num_cached_slots - self.num_locked_slots

    # ---- lookups ----

    def _root(self, namespace: int, create: bool) -> PrefixNode:
        """The namespace's tree; one that holds nothing is kept only once something
        goes in (a lookup alone leaves none behind)."""
        root = self.roots.get(namespace)
        if root is None:
            root = PrefixNode([], self._empty, None)
            root.namespace = namespace
            if create:
                self.roots[namespace] = root
        return root

    def peek(self, token_ids: list[int], namespace: int = 0) -> tuple[int, int]:
        """Without changing anything: how many leading ``token_ids`` are cached, and
        how many of those are evictable now (locking the match would pin them)."""
        root = self.roots.get(namespace)
        if root is None:
            return 0, 0
        node, matched, unlocked = root, 0, 0
        while matched < len(token_ids):
            child = node.children.get(token_ids[matched])
            if child is None:
                break
            n = _common_length(child.token_ids, token_ids[matched:])
            matched += n
            if child.ref_count == 0:
                unlocked += n
            if n < len(child):
                break
            node = child
        return matched, unlocked

    def match(self, token_ids: list[int], namespace: int = 0) -> tuple[torch.Tensor, PrefixNode]:
        """The slots of the longest cached prefix of ``token_ids`` in ``namespace``
        and the node it ends at (a node is split so that the match ends exactly at
        one). Marks the path as just used."""
        node, _, parts = self._walk(token_ids, namespace, create=False)
        if not parts:
            return self._empty, node
        return torch.cat(parts), node

    def _walk(
        self, token_ids: list[int], namespace: int, create: bool
    ) -> tuple[PrefixNode, int, list[torch.Tensor]]:
        """Follow ``token_ids`` down the namespace's tree, splitting the last edge
        where they part, and mark the path as just used: the node they end at, how
        many tokens it covers, and the slots of each edge on the way."""
        node, matched, parts = self._root(namespace, create), 0, []
        now = next(self._clock)
        while matched < len(token_ids):
            child = node.children.get(token_ids[matched])
            if child is None:
                break
            n = _common_length(child.token_ids, token_ids[matched:])
            if n < len(child):
                child = self._split(child, n)
            child.last_access = now
            parts.append(child.slots)
            matched += n
            node = child
        return node, matched, parts

    def path_slots(self, node: PrefixNode) -> torch.Tensor:
        """The slots of the whole prefix that ends at ``node``, int32."""
        parts = []
        while node.parent is not None:
            parts.append(node.slots)
            node = node.parent
        return torch.cat(parts[::-1]) if parts else self._empty

    def _split(self, node: PrefixNode, length: int) -> PrefixNode:
        """Cut ``node``'s edge after ``length`` tokens; returns the new upper half."""
        upper = PrefixNode(node.token_ids[:length], node.slots[:length], node.parent)
        upper.ref_count = node.ref_count
        upper.last_access = node.last_access
        start = node.parent.depth
        num_upper_blocks = (start + length) // BLOCK_TOKENS - start // BLOCK_TOKENS
        upper.hashes, node.hashes = node.hashes[:num_upper_blocks], node.hashes[num_upper_blocks:]
        upper.children[node.token_ids[length]] = node
        node.parent.children[upper.token_ids[0]] = upper
        node.token_ids = node.token_ids[length:]
        node.slots = node.slots[length:]
        node.parent = upper
        return upper

    # ---- references ----

    def lock(self, node: PrefixNode) -> None:
        """A request uses the prefix ending at ``node``: keep that path."""
        while node.parent is not None:
            if node.ref_count == 0:
                self.num_locked_slots += len(node)
            node.ref_count += 1
            node = node.parent

    def unlock(self, node: PrefixNode) -> None:
        while node.parent is not None:
            node.ref_count -= 1
            if node.ref_count < 0:
                raise RuntimeError("a prefix cache node was unlocked more often than locked")
            if node.ref_count == 0:
                self.num_locked_slots -= len(node)
            node = node.parent

    # ---- insertion and eviction ----

    def insert(
        self, token_ids: list[int], slots: torch.Tensor, namespace: int = 0
    ) -> tuple[int, PrefixNode]:
        """Cache ``slots`` as the KV of ``token_ids`` in ``namespace``. Where a prefix
        is cached already, the tree keeps its own slots: returns that prefix's length
        (the caller still owns ``slots`` there) and the node the whole of
        ``token_ids`` ends at. The tree owns ``slots`` past that length from now on."""
        node, pos, _ = self._walk(token_ids, namespace, create=True)
        num_existing = pos
        if pos < len(token_ids):
            leaf = PrefixNode(list(token_ids[pos:]), slots[pos:].clone(), node)
            leaf.last_access = next(self._clock)
            node.children[token_ids[pos]] = leaf
            self.num_cached_slots += len(leaf)
            # Only the new blocks are named, the chain going on from the path's last.
            first = pos // BLOCK_TOKENS
            previous = self._last_block_name(node) if first else None
            leaf.hashes = block_hashes(token_ids, first, previous, namespace)
            self._note_blocks(leaf.hashes, stored=True)
            # Nothing references a new leaf: its slots are evictable at once.
            node = leaf
        return num_existing, node

    def evict(self, num_slots: int) -> int:
        """Free at least ``num_slots`` unreferenced slots back to the pool (or as many
        as there are), the least recently used leaves first; a leaf longer than
        needed loses only its tail. Returns how many were freed."""
        leaves = [n for n in self._nodes() if not n.children and n.ref_count == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_slots and leaves:
            leaf = heapq.heappop(leaves)
            take = min(len(leaf), num_slots - freed)
            keep = len(leaf) - take
            self.pool.free(leaf.slots[keep:])
            self.num_cached_slots -= take
            freed += take
            start = leaf.depth - len(leaf)
            num_kept_blocks = (start + keep) // BLOCK_TOKENS - start // BLOCK_TOKENS
            self._note_blocks(leaf.hashes[num_kept_blocks:], stored=False)
            if keep:
                leaf.token_ids = leaf.token_ids[:keep]
                leaf.slots = leaf.slots[:keep]
                leaf.depth = start + keep
                leaf.hashes = leaf.hashes[:num_kept_blocks]
                continue
            parent = leaf.parent
            del parent.children[leaf.token_ids[0]]
            if parent.parent is None:  # a namespace's root
                if not parent.children:
                    del self.roots[parent.namespace]
            elif not parent.children and parent.ref_count == 0:
                heapq.heappush(leaves, parent)
        return freed

    # ---- block names ----

    def _note_blocks(self, hashes: list[int], stored: bool) -> None:
        if not self._noting_blocks:
            return
        for block in hashes:
            self._block_events[block] = stored

    def _last_block_name(self, node: PrefixNode) -> int:
        """The name of the last whole block of the path that ends at ``node``."""
        while not node.hashes:
            node = node.parent
        return node.hashes[-1]

    def take_block_events(self) -> tuple[list[int], list[int]]:
        """The names of the blocks stored and of those removed since the last call
        (a block stored then removed in between counts as removed, and the reverse
        as stored). The first call starts the noting."""
        self._noting_blocks = True
        events, self._block_events = self._block_events, {}
        stored = [block for block, kept in events.items() if kept]
        return stored, [block for block, kept in events.items() if not kept]

    def block_names(self) -> list[int]:
        """The names of every whole block the cache holds now."""
        return [block for node in self._nodes() for block in node.hashes]

    def _nodes(self) -> list[PrefixNode]:
        """Every node but the roots."""
        nodes, stack = (
            [],
            [child for root in self.roots.values() for child in root.children.values()],
        )
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes

    def cached_slots(self) -> torch.Tensor:
        """Every slot the tree owns (for consistency checks)."""
        parts = [n.slots for n in self._nodes()]
        return torch.cat(parts) if parts else self._empty

    def ref_counts(self) -> list[int]:
        """The reference count of every node (for consistency checks)."""
        return [n.ref_count for n in self._nodes()]
