"""The prefix cache: the same tokens with it as without, and no slot lost or shared wrongly."""

import random

import torch

from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.engine.prefix_cache import PrefixCache
from lightpd.common.wire.prefix_blocks import BLOCK_TOKENS, block_hashes
from lightpd.common.wire.sampling_params import SamplingParams
from tests.conftest import DEVICE, open_engine


def make_engine(model_dir: str, cache: bool, **options) -> LLMEngine:
    options.setdefault("num_kv_slots", 2048)
    config = EngineConfig(model=model_dir, device=DEVICE, enable_prefix_cache=cache, **options)
    return open_engine(config)


def tokens_of(g: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def run(engine: LLMEngine, jobs, aborts=None) -> dict[str, list[int]]:
    """``jobs``: (step, request id, prompt, params), added at their step; ``aborts``:
    step -> request ids to abort then. Steps until all are done; tokens by id."""
    jobs = sorted(jobs, key=lambda j: j[0])
    aborts = aborts or {}
    tokens = {j[1]: [] for j in jobs}
    step = 0
    while jobs or engine.has_unfinished():
        while jobs and jobs[0][0] <= step:
            _, request_id, prompt, params = jobs.pop(0)
            engine.add_request(request_id, prompt, params)
        for request_id in aborts.get(step, ()):
            engine.abort(request_id)
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
        assert step < 100_000, "the engine stopped making progress"
    return tokens


def assert_pool_consistent(engine: LLMEngine) -> None:
    pool, cache = engine.pool, engine.scheduler.kv.prefix_cache
    assert pool.num_free_slots + cache.num_evictable_slots == pool.num_slots
    assert all(count == 0 for count in cache.ref_counts())
    assert cache.num_locked_slots == 0
    owned = torch.cat([pool.free_slots(), cache.cached_slots()]).sort().values
    # Every slot is free or cached, and none is both or cached twice.
    assert torch.equal(owned.cpu(), torch.arange(pool.num_slots, dtype=torch.int32))
    assert_block_names(cache)


def assert_block_names(cache: PrefixCache) -> None:
    """Each node names exactly the whole blocks that end on its edge, as a control
    plane would name them from the tokens of the path."""
    stack = [
        (child, [], namespace)
        for namespace, root in cache.roots.items()
        for child in root.children.values()
    ]
    while stack:
        node, above, namespace = stack.pop()
        path = above + node.token_ids
        assert node.depth == len(path)
        first = (len(above)) // BLOCK_TOKENS
        assert node.hashes == block_hashes(path, namespace=namespace)[first:]
        stack += [(child, path, namespace) for child in node.children.values()]


def test_tree_splits_pins_and_evicts_least_recent_first():
    pool = TokenKVPool(32, 1, 1, 2, torch.float32, "cpu")
    cache = PrefixCache(pool)

    def cache_tokens(tokens: list[int]) -> None:
        slots = pool.allocate(len(tokens))
        num_existing, _ = cache.insert(tokens, slots)
        pool.free(slots[:num_existing])

    cache_tokens([1, 2, 3, 4])
    cache_tokens([1, 2, 9])  # splits [1, 2, 3, 4] after two tokens
    assert cache.num_cached_slots == 5
    assert cache.peek([1, 2, 3, 7]) == (3, 3)
    slots, node = cache.match([1, 2, 9, 9])
    assert slots.numel() == 3
    cache.lock(node)
    assert cache.peek([1, 2, 3]) == (3, 1)  # [1, 2] is pinned by the lock
    # Only [3, 4] is evictable; a part of a leaf goes from its tail.
    assert cache.evict(1) == 1 and cache.peek([1, 2, 3, 4]) == (3, 1)
    assert cache.evict(10) == 1 and cache.peek([1, 2, 3]) == (2, 0)
    cache.unlock(node)
    assert cache.num_evictable_slots == 3
    cache_tokens([5, 6])
    cache.match([1, 2, 9])  # now the most recent: [5, 6] goes first
    assert cache.evict(2) == 2 and cache.peek([5, 6]) == (0, 0)
    assert cache.peek([1, 2, 9]) == (3, 3)
    assert pool.num_free_slots + cache.num_evictable_slots == pool.num_slots


def test_outputs_are_the_same_with_and_without_the_cache(tiny_model):
    model_dir = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    vocab = 400
    system = tokens_of(g, 40, vocab)
    other = tokens_of(g, 23, vocab)
    prompts = [system + tokens_of(g, 9, vocab)]
    # Shared prefixes of several lengths, some ending inside a cached edge.
    prompts += [system[:k] + tokens_of(g, 7, vocab) for k in (1, 5, 17, 39, 40)]
    prompts += [system, system[:30], other + system, other, other[:12] + system]
    greedy = SamplingParams(temperature=0, max_new_tokens=12, min_new_tokens=12)
    jobs = []
    for i, prompt in enumerate(prompts):
        jobs.append((3 * i, f"g{i}", prompt, greedy))
        # n>1-like: the same prompt several times, with different seeds.
        for j in range(3):
            seeded = SamplingParams(temperature=0.9, seed=10 * i + j, max_new_tokens=10)
            jobs.append((3 * i + 1, f"s{i}-{j}", prompt, seeded))
    # A whole prompt that is cached: once its first copy has finished.
    jobs.append((40, "again", prompts[0], greedy))
    jobs.append((40, "again-seeded", prompts[0], SamplingParams(temperature=0.9, seed=5)))

    want = run(make_engine(model_dir, cache=False, max_prefill_tokens=16), jobs)
    engine = make_engine(model_dir, cache=True, max_prefill_tokens=16)
    got = run(engine, jobs)
    assert got == want
    assert_pool_consistent(engine)
    # And the cache did serve them: a repeat finds all but its last token cached.
    engine.add_request("probe", prompts[0], greedy)
    assert engine.scheduler.kv.peek_prefix(engine._requests["probe"])[0] == len(prompts[0]) - 1


def test_random_traffic_with_aborts_and_eviction_leaks_nothing(tiny_model):
    model_dir = tiny_model("llama")
    rng = random.Random(0)
    g = torch.Generator().manual_seed(1)
    vocab = 400
    bases = [tokens_of(g, n, vocab) for n in (60, 45, 30, 12)]
    jobs, aborts = [], {}
    for i in range(1000):
        base = rng.choice(bases)
        prompt = base[: rng.randint(1, len(base))] + tokens_of(g, rng.randint(0, 12), vocab)
        if not prompt:
            prompt = [7]
        params = SamplingParams(
            temperature=rng.choice([0, 0.8]),
            seed=i,
            # Mostly short, now and then long: the long ones outgrow their estimate,
            # the pool runs dry and requests pause.
            max_new_tokens=rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 24]),
            min_new_tokens=1,
        )
        step = i // 4
        jobs.append((step, f"r{i}", prompt, params))
        if rng.random() < 0.1:
            aborts.setdefault(step + rng.randint(0, 6), []).append(f"r{i}")
    probes = [
        (0, f"p{i}", [*b, 5, 6], SamplingParams(temperature=0, max_new_tokens=6))
        for i, b in enumerate(bases)
    ]

    # A pool a few prompts large: the cache evicts all the time, and requests pause.
    engine = make_engine(model_dir, cache=True, num_kv_slots=256, max_num_reqs=16)
    engine.take_cache_events()  # as a node does: from now on, changes are noted
    got = run(engine, jobs, aborts)
    # What a control plane following the events would hold is what the cache holds.
    stored, removed = engine.take_cache_events()
    assert not set(stored) & set(removed)
    assert set(stored) == set(engine.cached_block_names())
    assert engine.scheduler.num_preemptions > 0
    # Far more tokens than the pool went through it: the cache filled it and evicted.
    assert engine.pool.num_free_slots < engine.pool.num_slots // 4
    assert_pool_consistent(engine)
    # No request saw another's KV: what was not aborted (aborts land at other
    # points in another schedule) came out as without the cache.
    want = run(make_engine(model_dir, cache=False, num_kv_slots=256, max_num_reqs=16), jobs)
    aborted = {request_id for ids in aborts.values() for request_id in ids}
    assert {k: v for k, v in got.items() if k not in aborted} == {
        k: v for k, v in want.items() if k not in aborted
    }
    # And fresh requests on the cache left behind.
    got = run(engine, probes)
    assert_pool_consistent(engine)
    assert got == run(make_engine(model_dir, cache=False, num_kv_slots=256), probes)


def test_namespaces_share_nothing_and_name_their_blocks_apart():
    """Tenants' prefixes live in namespaces of their own: the same tokens cached by
    one are a miss for another (by match, peek and block name), and eviction frees
    across them, dropping a namespace's tree once it is empty."""
    pool = TokenKVPool(128, 1, 1, 2, torch.float32, "cpu")
    cache = PrefixCache(pool)
    tokens = list(range(3, 3 + 2 * BLOCK_TOKENS + 5))
    alice, bob = 1234567, -987654321
    num_existing, _ = cache.insert(tokens, pool.allocate(len(tokens)), alice)
    assert num_existing == 0
    assert cache.peek(tokens, alice) == (len(tokens), len(tokens))
    assert cache.peek(tokens, bob) == (0, 0) and cache.peek(tokens) == (0, 0)
    slots, _ = cache.match(tokens, bob)
    assert slots.numel() == 0 and bob not in cache.roots  # a miss leaves nothing behind
    hit, _ = cache.match(tokens, alice)
    assert hit.numel() == len(tokens)
    shared = cache.block_names()
    assert shared == block_hashes(tokens, namespace=alice)
    assert not set(shared) & set(block_hashes(tokens)) and not set(shared) & set(
        block_hashes(tokens, namespace=bob)
    )
    cache.insert(tokens, pool.allocate(len(tokens)), bob)
    assert cache.peek(tokens, bob)[0] == len(tokens)
    assert_block_names(cache)
    assert cache.evict(2 * len(tokens)) == 2 * len(tokens)
    assert cache.roots == {} and pool.num_free_slots == pool.num_slots
