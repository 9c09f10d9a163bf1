"""The control plane's queue bound, shared by tenants: a flood fills it, and another
tenant still gets its share of places (issue 25)."""

from lightpd.controlplane.queue_shares import QueueShares

FLOOD, OTHER = 11, 22


def test_a_flood_cannot_take_every_place():
    queue = QueueShares(max_queued=10)
    assert all(queue.take(FLOOD, 1.0) for _ in range(10))
    assert not queue.take(FLOOD, 1.0)  # full, and it holds its share (all of it)
    # Another tenant's requests get in up to half the bound while the flood waits.
    assert [queue.take(OTHER, 1.0) for _ in range(6)] == [True] * 5 + [False]
    assert queue.num_queued == 15
    # As places come back, the flood gets in only below its share again.
    for _ in range(5):
        queue.give_back(FLOOD)
    assert not queue.take(FLOOD, 1.0)  # 5 of a share of 5, and the queue is full
    for _ in range(5):
        queue.give_back(OTHER)
    assert queue.take(FLOOD, 1.0) and queue.num_queued == 6


def test_weights_divide_the_bound():
    queue = QueueShares(max_queued=12)
    for _ in range(12):
        queue.take(FLOOD, 1.0)
    taken = sum(queue.take(OTHER, 3.0) for _ in range(20))
    assert taken == 9  # 12 x 3 / (3 + 1)


def test_one_tenant_alone_has_the_whole_bound():
    queue = QueueShares(max_queued=4)
    assert [queue.take(0, 1.0) for _ in range(5)] == [True] * 4 + [False]
    queue.give_back(0)
    assert queue.take(0, 1.0)
