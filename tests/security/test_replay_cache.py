"""Issue 11 (low): the delegation replay cache is bounded in bytes per peer, cheap per entry, and
fails closed at its bound (RESOURCE_EXHAUSTED) without ever letting a replay through."""

from __future__ import annotations

import time
import tracemalloc
import uuid

import pytest

from gateway.errors import ResourceExhausted, Unauthenticated
from gateway.identity.delegation import DelegationVerifier
from gateway.identity.signing import Verifier
from tests.conftest import Pki
from tests.integration.federation import delegation


def test_an_entry_costs_about_ninety_bytes(pki: Pki) -> None:
    """At the default rate (200/s) and the longest lifetime accepted (900 s + skew) a peer keeps
    about 186,000 entries: this many bytes each decide what that costs (measured: 90 B, from
    about 280 B with (issuer, id) tuple keys and a heap)."""
    verifier = DelegationVerifier("hospital", Verifier.from_file(pki.ca))
    count, now = 50_000, time.time()
    ids = [uuid.uuid4().hex.encode() for _ in range(count)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for n, token_id in enumerate(ids):
            # 200 a second, as a peer at the default rate sends them
            assert verifier._seen.add(("lab", token_id.decode()), now + 330 + n / 200, now)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert used / count < 120, f"{used / count:.0f} B per remembered statement"
    assert verifier.seen_count == count


def test_the_cache_fails_closed_at_its_bound_in_bytes(pki: Pki) -> None:
    verifier = DelegationVerifier(
        "hospital", Verifier.from_file(pki.ca), max_replay_bytes_per_peer=16 * 1024
    )
    statements = [delegation(pki, "lab", "hospital", f"t-{n}") for n in range(400)]
    accepted = 0
    with pytest.raises(ResourceExhausted) as caught:
        for n, statement in enumerate(statements):
            verifier.verify(statement, peer_org="lab", task_id=f"t-{n}")
            accepted += 1
    assert 50 < accepted < 400
    assert caught.value.message == (
        f"organization 'lab' sent more delegation statements within their lifetime ({accepted}) "
        "than this gateway remembers against replay (16 KiB per organization): retry later"
    )
    # Nothing was evicted to make room: a replay of the first statement is still refused ...
    with pytest.raises(Unauthenticated, match="was already used"):
        verifier.verify(statements[0], peer_org="lab", task_id="t-0")
    # ... and another peer has its own share.
    verifier.verify(
        delegation(pki, "insurer", "hospital", "i-1"), peer_org="insurer", task_id="i-1"
    )


def test_entries_are_forgotten_after_their_lifetime_and_the_peer_is_served_again(pki: Pki) -> None:
    clock = [time.time()]
    verifier = DelegationVerifier(
        "hospital",
        Verifier.from_file(pki.ca),
        max_replay_bytes_per_peer=16 * 1024,
        clock=lambda: clock[0],
    )
    statements = [delegation(pki, "lab", "hospital", f"t-{n}", ttl=60) for n in range(400)]
    with pytest.raises(ResourceExhausted):
        for n, statement in enumerate(statements):
            verifier.verify(statement, peer_org="lab", task_id=f"t-{n}")
    replay = statements[0]
    with pytest.raises(Unauthenticated, match="was already used"):
        verifier.verify(replay, peer_org="lab", task_id="t-0")
    clock[0] += 60 + 30 + 1  # lifetime, clock skew, and the second entries are grouped by
    assert verifier.seen_count == 0
    verifier.verify(delegation(pki, "lab", "hospital", "later"), peer_org="lab", task_id="later")
