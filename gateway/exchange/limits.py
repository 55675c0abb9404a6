"""Per-peer limits on the federation listener: a rate (token bucket) and a concurrency cap.

Every peer organization has its own bucket and its own count of tasks in flight, so a peer that
floods is refused while the others are served as before. `acquire` never sleeps: it grants a
`Permit` at once or raises ResourceExhausted naming the limit, in O(1).

    with limiter.acquire(peer_org):      # or `async with`, or permit.release() in a finally
        ... run the task ...
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from gateway.errors import ConfigError, ResourceExhausted

# Above this many tracked peers, idle ones (full bucket, nothing in flight) are forgotten.
_SWEEP_ABOVE = 1024


@dataclass
class _PeerState:
    tokens: float
    refilled_at: float
    in_flight: int = 0


class Permit:
    """One granted task of a peer: holds a concurrency slot until released, exactly once."""

    __slots__ = ("_limiter", "_released", "peer")

    def __init__(self, limiter: PeerLimiter, peer: str) -> None:
        self._limiter = limiter
        self.peer = peer
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the concurrency slot back; later calls do nothing."""
        if self._released:
            return
        self._released = True
        self._limiter._release(self.peer)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class PeerLimiter:
    """Rate and concurrency limits, kept separately for every peer organization."""

    def __init__(
        self,
        *,
        rate_per_second: float,
        burst: int,
        max_concurrent: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate_per_second > 0:
            raise ConfigError(
                f"limits.peer_rate_per_second must be positive, got {rate_per_second}"
            )
        if burst < 1:
            raise ConfigError(f"limits.peer_burst must be at least 1, got {burst}")
        if max_concurrent < 1:
            raise ConfigError(
                f"limits.peer_max_concurrent_tasks must be at least 1, got {max_concurrent}"
            )
        self.rate_per_second = rate_per_second
        self.burst = burst
        self.max_concurrent = max_concurrent
        self._clock = clock
        self._peers: dict[str, _PeerState] = {}
        self._lock = threading.Lock()

    def acquire(self, peer: str) -> Permit:
        """A permit for one task of `peer`, or ResourceExhausted naming the limit it hit."""
        with self._lock:
            now = self._clock()
            state = self._peers.get(peer)
            if state is None:
                if len(self._peers) >= _SWEEP_ABOVE:
                    self._forget_idle(now)
                state = self._peers[peer] = _PeerState(float(self.burst), now)
            else:
                elapsed = max(0.0, now - state.refilled_at)
                state.tokens = min(float(self.burst), state.tokens + elapsed * self.rate_per_second)
                state.refilled_at = now
            # Concurrency first: a task refused for it does not spend a unit of rate.
            if state.in_flight >= self.max_concurrent:
                tasks = "task" if self.max_concurrent == 1 else "tasks"
                raise ResourceExhausted(
                    f"organization {peer!r} already has {self.max_concurrent} {tasks} in flight "
                    "(the limit): retry when one finishes"
                )
            if state.tokens < 1.0:
                raise ResourceExhausted(
                    f"organization {peer!r} exceeded its rate of {self.rate_per_second:g} "
                    "tasks/s: retry later"
                )
            state.tokens -= 1.0
            state.in_flight += 1
        return Permit(self, peer)

    def in_flight(self, peer: str) -> int:
        """How many permits of `peer` are held now."""
        with self._lock:
            state = self._peers.get(peer)
            return state.in_flight if state else 0

    def _release(self, peer: str) -> None:
        with self._lock:
            state = self._peers.get(peer)
            if state is not None and state.in_flight > 0:
                state.in_flight -= 1

    def _forget_idle(self, now: float) -> None:
        """Drop peers that are indistinguishable from new ones: full bucket, nothing in flight."""
        for name in [
            name
            for name, state in self._peers.items()
            if state.in_flight == 0
            and state.tokens + (now - state.refilled_at) * self.rate_per_second >= self.burst
        ]:
            del self._peers[name]
