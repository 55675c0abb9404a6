"""Per-peer limits: token bucket, concurrency cap, release exactly once, fairness between peers;
and the caches that bound what a peer can make us sign or store."""

from __future__ import annotations

import asyncio

import pytest

from gateway.audit.chain import AuditEvent
from gateway.audit.store import MemoryAuditStore
from gateway.errors import ConfigError, PermissionDenied, ResourceExhausted, Unauthenticated
from gateway.exchange.limits import PeerCheckpoints, PeerLimiter, Permit, SignedHeadCache
from gateway.identity.signing import SignedCheckpoint, Signer, Verifier, sign_checkpoint
from tests.conftest import Pki

RATE_REFUSAL = "organization 'insurer' exceeded its rate of 2 requests/s: retry later"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def limiter(clock: Clock, *, rate: float = 2, burst: int = 3, concurrent: int = 100) -> PeerLimiter:
    return PeerLimiter(rate_per_second=rate, burst=burst, max_concurrent=concurrent, clock=clock)


def refusal(limits: PeerLimiter, peer: str) -> str:
    with pytest.raises(ResourceExhausted) as caught:
        limits.acquire(peer)
    return caught.value.message


def test_burst_then_refusal_then_refill(clock: Clock) -> None:
    limits = limiter(clock)
    for _ in range(3):
        limits.acquire("insurer").release()
    assert refusal(limits, "insurer") == RATE_REFUSAL
    clock.now += 0.49  # 0.98 of a task: not yet
    assert refusal(limits, "insurer") == RATE_REFUSAL
    clock.now += 0.01
    limits.acquire("insurer").release()
    assert refusal(limits, "insurer") == RATE_REFUSAL
    clock.now += 60  # refills up to the burst, never beyond
    for _ in range(3):
        limits.acquire("insurer").release()
    assert refusal(limits, "insurer") == RATE_REFUSAL


def test_clock_going_backwards_grants_nothing(clock: Clock) -> None:
    limits = limiter(clock, burst=1)
    limits.acquire("insurer").release()
    clock.now -= 100
    assert refusal(limits, "insurer") == RATE_REFUSAL


def test_concurrency_limit_and_release(clock: Clock) -> None:
    limits = limiter(clock, rate=1000, burst=1000, concurrent=2)
    first, second = limits.acquire("insurer"), limits.acquire("insurer")
    assert limits.in_flight("insurer") == 2
    assert refusal(limits, "insurer") == (
        "organization 'insurer' already has 2 tasks in flight (the limit): retry when one finishes"
    )
    first.release()
    third = limits.acquire("insurer")
    assert limits.in_flight("insurer") == 2
    second.release()
    third.release()
    assert limits.in_flight("insurer") == 0


def test_a_refusal_for_concurrency_spends_no_rate(clock: Clock) -> None:
    limits = limiter(clock, burst=2, concurrent=1)
    held = limits.acquire("insurer")
    for _ in range(5):
        refusal(limits, "insurer")
    held.release()
    limits.acquire("insurer").release()  # the second unit of the burst is still there
    assert refusal(limits, "insurer") == RATE_REFUSAL


def test_permit_releases_exactly_once(clock: Clock) -> None:
    limits = limiter(clock, concurrent=2)
    held = limits.acquire("insurer")
    permit = limits.acquire("insurer")
    with permit:
        assert limits.in_flight("insurer") == 2
    assert permit.released
    permit.release()
    permit.release()
    assert limits.in_flight("insurer") == 1  # `held` keeps its slot
    held.release()


def test_permit_is_released_when_the_task_raises(clock: Clock) -> None:
    limits = limiter(clock, concurrent=1)
    with pytest.raises(RuntimeError), limits.acquire("insurer"):
        raise RuntimeError("task failed")
    assert limits.in_flight("insurer") == 0


async def test_permit_in_async_code(clock: Clock) -> None:
    limits = limiter(clock, rate=1000, burst=1000, concurrent=4)
    peak = 0

    async def task() -> None:
        nonlocal peak
        async with limits.acquire("insurer") as permit:
            assert isinstance(permit, Permit)
            peak = max(peak, limits.in_flight("insurer"))
            await asyncio.sleep(0)

    await asyncio.gather(*(task() for _ in range(4)))
    assert peak == 4
    assert limits.in_flight("insurer") == 0


def test_one_peer_flooding_does_not_affect_another(clock: Clock) -> None:
    limits = limiter(clock, rate=2, burst=3, concurrent=2)
    held = [limits.acquire("insurer"), limits.acquire("insurer")]
    refused = 0
    for _ in range(1000):
        try:
            limits.acquire("insurer").release()
        except ResourceExhausted:
            refused += 1
    assert refused == 1000
    held.pop().release()
    for _ in range(1000):
        try:
            limits.acquire("insurer").release()
        except ResourceExhausted:
            refused += 1
    assert refused == 2000 - 1  # one unit of burst was left
    # 'lab' has its own bucket and its own slots: the flood changed nothing for it.
    lab = [limits.acquire("lab"), limits.acquire("lab")]
    assert limits.in_flight("lab") == 2
    for permit in lab:
        permit.release()
    limits.acquire("lab").release()
    assert refusal(limits, "lab") == (
        "organization 'lab' exceeded its rate of 2 requests/s: retry later"
    )


def test_idle_peers_are_forgotten_but_busy_ones_are_kept(clock: Clock) -> None:
    limits = limiter(clock, rate=1, burst=1, concurrent=1)
    busy = limits.acquire("busy")
    for n in range(1100):
        limits.acquire(f"peer-{n}").release()
        clock.now += 0.001
    clock.now += 10
    limits.acquire("newcomer").release()
    assert limits.in_flight("busy") == 1
    assert refusal(limits, "busy").startswith(
        "organization 'busy' already has 1 task in flight (the limit)"
    )
    busy.release()
    limits.acquire("busy").release()
    assert len(limits._peers) < 1100


@pytest.mark.parametrize(
    ("kwargs", "cause"),
    [
        ({"rate_per_second": 0}, "limits.peer_rate_per_second must be positive, got 0"),
        ({"burst": 0}, "limits.peer_burst must be at least 1, got 0"),
        ({"max_concurrent": 0}, "limits.peer_max_concurrent_tasks must be at least 1, got 0"),
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, float], cause: str) -> None:
    arguments = {"rate_per_second": 1.0, "burst": 1, "max_concurrent": 1, **kwargs}
    with pytest.raises(ConfigError) as caught:
        PeerLimiter(**arguments)  # type: ignore[arg-type]
    assert caught.value.message == cause


# -- every federation call spends rate; a refused caller is named by its certificate -------------


def test_a_short_call_spends_rate_but_holds_no_slot(clock: Clock) -> None:
    """CancelTask and friends spend the bucket tasks do, yet work for a peer at its task cap."""
    limits = limiter(clock, rate=1, burst=3, concurrent=1)
    held = limits.acquire("insurer")
    limits.spend("insurer")  # a cancel while the one slot is taken
    assert limits.in_flight("insurer") == 1
    limits.spend("insurer")
    with pytest.raises(ResourceExhausted) as caught:
        limits.spend("insurer")
    assert (
        caught.value.message
        == "organization 'insurer' exceeded its rate of 1 requests/s: retry later"
    )
    held.release()
    with pytest.raises(ResourceExhausted):
        limits.acquire("insurer")  # the calls spent the tasks' bucket too
    clock.now += 1
    limits.acquire("insurer").release()


def test_a_limiter_keyed_by_certificate_names_it(clock: Clock) -> None:
    limits = PeerLimiter(
        rate_per_second=1, burst=1, max_concurrent=1, clock=clock, describe=lambda k: f"cert {k}"
    )
    limits.spend("sha256:ab")
    with pytest.raises(ResourceExhausted, match=r"^cert sha256:ab exceeded its rate of 1"):
        limits.spend("sha256:ab")
    limits.spend("sha256:cd")  # another certificate, another bucket


# -- our signed head: signed at most once a second, and only when the chain moved ----------------


def _signer(pki: Pki, org: str = "hospital") -> Signer:
    return Signer.from_files(pki.cert(org), pki.key(org))


async def test_our_signed_head_is_cached(pki: Pki, clock: Clock) -> None:
    audit = MemoryAuditStore(verifier=Verifier.from_file(pki.ca))
    signer = _signer(pki)
    heads = SignedHeadCache(audit, lambda: signer, min_interval=1.0, clock=clock)
    first = await heads.current()
    assert (first.org, first.sequence) == ("hospital", 0)
    assert await heads.current() is first
    clock.now += 5
    assert await heads.current() is first, "nothing was committed: the same head, not re-signed"
    await audit.append(AuditEvent(kind="rejected", task_id="t-1", peer_org="lab"))
    second = await heads.current()
    assert second.sequence == 1
    await audit.append(AuditEvent(kind="rejected", task_id="t-2", peer_org="lab"))
    assert await heads.current() is second, "within the second: the cached one"
    clock.now += 1
    third = await heads.current()
    assert third.sequence == 2
    together = await asyncio.gather(*(heads.current() for _ in range(50)))
    assert all(h is third for h in together)
    assert [c.sequence for c in audit.own_checkpoints()] == [0, 1, 2], "one row a signature"
    await audit.close()


async def test_a_rotated_key_signs_a_fresh_head(pki: Pki, clock: Clock) -> None:
    audit = MemoryAuditStore(verifier=Verifier.from_file(pki.ca))
    signers = [_signer(pki)]
    heads = SignedHeadCache(audit, lambda: signers[-1], clock=clock)
    await heads.current()
    clock.now += 2
    signers.append(_signer(pki, "insurer"))  # stands for a new certificate of ours
    assert (await heads.current()).org == "insurer"
    await audit.close()


# -- peers' signed heads: kept at most once per interval, the rest answered from memory -----------


def _head(
    pki: Pki, sequence: int, head_hash: str | None = None, org: str = "lab"
) -> SignedCheckpoint:
    return sign_checkpoint(_signer(pki, org), sequence, head_hash or f"{sequence:064x}")


async def test_peer_heads_are_kept_once_per_interval(pki: Pki, clock: Clock) -> None:
    audit = MemoryAuditStore(verifier=Verifier.from_file(pki.ca))
    gate = PeerCheckpoints(audit, store_interval=60, clock=clock)
    for sequence in range(10, 110):
        await gate.offer(_head(pki, sequence))
    await gate.offer(_head(pki, 5, org="insurer"))  # another peer, its own interval
    assert [c.sequence for c in audit.peer_checkpoints("lab")] == [10]
    clock.now += 60
    await gate.offer(_head(pki, 200))
    await gate.offer(_head(pki, 200))  # the same head again: nothing new
    assert [c.sequence for c in audit.peer_checkpoints("lab")] == [10, 200]
    assert [c.sequence for c in audit.peer_checkpoints("insurer")] == [5]
    await audit.close()


async def test_a_head_that_goes_back_is_refused_and_its_evidence_kept(
    pki: Pki, clock: Clock
) -> None:
    audit = MemoryAuditStore(verifier=Verifier.from_file(pki.ca))
    gate = PeerCheckpoints(audit, store_interval=60, clock=clock)
    await gate.offer(_head(pki, 10))
    await gate.offer(_head(pki, 50))  # remembered, not yet kept
    for sequence, head_hash in ((40, None), (50, "ee" * 32), (20, None)):
        with pytest.raises(PermissionDenied) as caught:
            await gate.offer(_head(pki, sequence, head_hash))
        assert caught.value.message.startswith(
            f"peer 'lab' signed head {sequence}, behind or diverging from its earlier signed head 50"
        )
    # The head it went back from is kept as evidence, once: alternating costs no more rows.
    assert [c.sequence for c in audit.peer_checkpoints("lab")] == [10, 50]
    await audit.close()


async def test_a_forged_head_is_refused_whatever_the_interval(pki: Pki, clock: Clock) -> None:
    audit = MemoryAuditStore(verifier=Verifier.from_file(pki.ca))
    gate = PeerCheckpoints(audit, store_interval=60, clock=clock)
    await gate.offer(_head(pki, 10))
    honest = _head(pki, 11)
    forged = SignedCheckpoint(
        "lab", 11, "ff" * 32, honest.signed_at_unix_ms, honest.signer_certificate, honest.signature
    )
    with pytest.raises(Unauthenticated):
        await gate.offer(forged)
    await gate.offer(honest)  # the forgery left no trace in memory either
    await audit.close()
