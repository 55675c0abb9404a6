"""Per-peer limits: token bucket, concurrency cap, release exactly once, fairness between peers."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import ConfigError, ResourceExhausted
from gateway.exchange.limits import PeerLimiter, Permit

RATE_REFUSAL = "organization 'insurer' exceeded its rate of 2 tasks/s: retry later"


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
        "organization 'lab' exceeded its rate of 2 tasks/s: retry later"
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
