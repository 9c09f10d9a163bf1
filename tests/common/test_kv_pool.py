import pytest
import torch

from lightpd.common.engine.kv_pool import OutOfSlotsError, TokenKVPool


def make_pool(num_slots: int = 64) -> TokenKVPool:
    return TokenKVPool(
        num_slots, num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu"
    )


def test_allocate_and_free_report_exact_counts():
    pool = make_pool(64)
    a = pool.allocate(10)
    b = pool.allocate(50)
    assert (pool.num_free_slots, pool.num_used_slots) == (4, 60)
    owned = torch.cat([a, b])
    assert owned.unique().numel() == 60, "a slot was handed out twice"
    assert not set(owned.tolist()) & set(pool.free_slots().tolist())
    pool.free(a)
    assert pool.num_free_slots == 14
    pool.free(b)
    assert pool.num_free_slots == 64
    assert sorted(pool.free_slots().tolist()) == list(range(64))


def test_out_of_slots_is_an_error_that_changes_nothing():
    pool = make_pool(8)
    pool.allocate(6)
    with pytest.raises(OutOfSlotsError, match="asked for 3 KV slots with 2 free"):
        pool.allocate(3)
    assert pool.num_free_slots == 2


def test_double_free_is_caught():
    pool = make_pool(8)
    slots = pool.allocate(8)
    pool.free(slots)
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(slots[:1])


def test_layers_are_separate_contiguous_blocks():
    pool = make_pool(16)
    # 16 slots to hand out and the padding slot past them
    assert pool.k_cache(1).shape == (17, 2, 8) and pool.padding_slot == 16
    assert pool.k_cache(1).is_contiguous() and pool.v_cache(0).is_contiguous()
    pool.k_cache(1).fill_(1.0)
    assert pool.k_cache(0).abs().sum() == 0 and pool.v_cache(1).abs().sum() == 0


def test_the_padding_slot_is_never_handed_out():
    pool = make_pool(8)
    assert sorted(pool.allocate(8).tolist()) == list(range(8))
    assert not pool.can_allocate(1)
