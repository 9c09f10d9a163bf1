"""A node's leases: any message renews its sender's; silence past the lease ends
only that sender's; peers that own no request are not remembered."""

import time

from lightpd.common.node.runtime import Leases


def test_only_the_silent_owner_expires_and_others_are_forgotten():
    leases = Leases(lease_s=0.3)
    for origin in (b"talks", b"silent", b"owns-nothing"):
        leases.heard(origin)
    assert leases.expired({b"talks", b"silent"}) == []
    for _ in range(5):  # "talks" keeps sending; well past the lease in all
        time.sleep(0.1)
        leases.heard(b"talks")
    assert leases.expired({b"talks", b"silent"}) == [b"silent"]
    # An owner with no record starts its lease now; an origin that owned nothing
    # at the last look is no longer remembered.
    assert leases.expired({b"talks", b"new"}) == []
    assert set(leases._heard) == {b"talks", b"new"}
    leases.forget(b"talks")
    assert set(leases._heard) == {b"new"}
