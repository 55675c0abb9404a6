"""What a partner can make the federation listener spend: limits, and the caches that bound it.

`PeerLimiter`: a rate (token bucket) and a concurrency cap per key. Every peer organization has
its own bucket and its own count of tasks in flight, so a peer that floods is refused while the
others are served as before; a second limiter keyed by certificate fingerprint does the same for
federation members that are not peers. Every federation call spends one unit of rate (`spend`);
a task also holds a concurrency slot (`acquire`). Neither sleeps: each answers at once or raises
ResourceExhausted naming the limit, in O(1).

    with limiter.acquire(peer_org):      # or `async with`, or permit.release() in a finally
        ... run the task ...

`SignedHeadCache`: our signed audit head as handed to peers, signed (and kept) at most once per
`min_interval` and only when the chain moved, instead of once per call.

`PeerCheckpoints`: peers' signed heads, kept at most once per peer per `store_interval`; the
checkpoints in between are checked and answered from memory, so a flood of ever-higher heads
costs no storage.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from gateway.audit.store import AuditStore
from gateway.errors import ConfigError, PermissionDenied, ResourceExhausted
from gateway.identity.signing import SignedCheckpoint, Signer, verify_checkpoint

log = logging.getLogger("fedgate.limits")

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


def _organization(key: str) -> str:
    return f"organization {key!r}"


class PeerLimiter:
    """Rate and concurrency limits, kept separately for every key (a peer organization, or a
    certificate fingerprint); `describe` names a key in refusals."""

    def __init__(
        self,
        *,
        rate_per_second: float,
        burst: int,
        max_concurrent: int,
        clock: Callable[[], float] = time.monotonic,
        describe: Callable[[str], str] = _organization,
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
        self._describe = describe
        self._peers: dict[str, _PeerState] = {}
        self._lock = threading.Lock()

    def acquire(self, peer: str) -> Permit:
        """A permit for one task of `peer`, or ResourceExhausted naming the limit it hit."""
        with self._lock:
            state = self._refilled(peer)
            # Concurrency first: a task refused for it does not spend a unit of rate.
            if state.in_flight >= self.max_concurrent:
                tasks = "task" if self.max_concurrent == 1 else "tasks"
                raise ResourceExhausted(
                    f"{self._describe(peer)} already has {self.max_concurrent} {tasks} in flight "
                    "(the limit): retry when one finishes"
                )
            self._spend(peer, state)
            state.in_flight += 1
        return Permit(self, peer)

    def spend(self, peer: str) -> None:
        """One unit of `peer`'s rate for a short call (no concurrency slot: a peer at its cap of
        tasks can still cancel one), or ResourceExhausted."""
        with self._lock:
            self._spend(peer, self._refilled(peer))

    def _refilled(self, peer: str) -> _PeerState:
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
        return state

    def _spend(self, peer: str, state: _PeerState) -> None:
        if state.tokens < 1.0:
            raise ResourceExhausted(
                f"{self._describe(peer)} exceeded its rate of {self.rate_per_second:g} "
                "requests/s: retry later"
            )
        state.tokens -= 1.0

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


class SignedHeadCache:
    """Our signed audit head, as every peer's ExchangeCheckpoint (and, later, every final answer
    without a receipt) gets it: a signed lower bound of our log.

    Signed and kept through `AuditStore.checkpoint` at most once per `min_interval` seconds, and
    only when the chain moved (the store committed since) or the signing key changed; every other
    call gets the cached one, so a flood of calls costs neither signatures nor storage.
    """

    def __init__(
        self,
        audit: AuditStore,
        signer: Callable[[], Signer],
        *,
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audit = audit
        self._signer = signer
        self.min_interval = min_interval
        self._clock = clock
        self._lock = asyncio.Lock()
        # (the checkpoint, when it was signed, the store's commit count then, the signing cert)
        self._cached: tuple[SignedCheckpoint, float, int, bytes] | None = None

    async def current(self) -> SignedCheckpoint:
        """The latest signed head; signs a new one only when due (see the class)."""
        async with self._lock:  # callers arriving together share one signature
            signer = self._signer()
            if self._cached is not None:
                checkpoint, signed_at, commits, cert = self._cached
                fresh = self._clock() - signed_at < self.min_interval
                unchanged = commits == self._audit.commits and cert == signer.cert_der
                if fresh or unchanged:
                    return checkpoint
            commits = self._audit.commits
            checkpoint = await self._audit.checkpoint(signer)
            self._cached = (checkpoint, self._clock(), commits, signer.cert_der)
            return checkpoint


class PeerCheckpoints:
    """Peers' signed audit heads, kept in the audit store at most once per peer per interval.

    Every checkpoint offered is verified and compared with the highest one seen from that peer
    (in memory): a head behind it, or at its sequence with another hash, is refused as the store
    refuses one behind what it keeps (the peer's log lost records or was rewritten), and the head
    it went back from is kept as evidence if it was only in memory. A higher head is kept at once
    when the peer's interval is over, else remembered (and kept with the first offer after the
    interval): storage grows by at most one row per peer per `store_interval`, and one more of
    evidence, whatever the rate. A remembered head not yet kept is lost on a restart; the peer's
    next regular exchange brings it again.
    """

    def __init__(
        self,
        audit: AuditStore,
        *,
        store_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audit = audit
        self.store_interval = store_interval
        self._clock = clock
        # Per peer: the highest verified head seen, whether it is stored, and when we last stored.
        self._highest: dict[str, SignedCheckpoint] = {}
        self._stored: dict[str, SignedCheckpoint] = {}
        self._stored_at: dict[str, float] = {}
        self._evidence_at: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def offer(self, checkpoint: SignedCheckpoint) -> None:
        """Verify `checkpoint` (its org is the proven caller's) and keep it when due.

        Raises Unauthenticated (a signature or certificate that does not verify), PermissionDenied
        (a head that contradicts one seen before) or AuditUnavailable.
        """
        if self._audit.verifier is None:
            raise ConfigError(
                "no federation CA to verify peer checkpoints with: open the store with a verifier"
            )
        verify_checkpoint(self._audit.verifier, checkpoint)
        org = checkpoint.org
        async with self._lock:
            now = self._clock()
            highest = self._highest.get(org)
            if highest is not None and _contradicts(checkpoint, highest):
                log.warning(
                    "peer %s presented an audit head at sequence %d that contradicts its signed "
                    "head at sequence %d",
                    org,
                    checkpoint.sequence,
                    highest.sequence,
                )
                # The evidence is the head it went back from: kept unless it already is, at most
                # once per interval (on top of the regular one), so alternating costs no more.
                if self._stored.get(org) is not highest and self._due(self._evidence_at, org, now):
                    self._evidence_at[org] = now
                    await self._keep(highest)
                raise PermissionDenied(
                    f"peer {org!r} signed head {checkpoint.sequence}, behind or diverging from "
                    f"its earlier signed head {highest.sequence}: its audit log lost records or "
                    "was rewritten; keep both checkpoints as evidence"
                )
            if highest is not None and checkpoint.sequence == highest.sequence:
                return  # the same head again: nothing new to keep
            if self._due(self._stored_at, org, now):
                # Stamped before the write: a store outage is retried once per interval, not
                # once per call.
                self._stored_at[org] = now
                await self._keep(checkpoint)
            self._highest[org] = checkpoint

    def _due(self, stamps: dict[str, float], org: str, now: float) -> bool:
        return now - stamps.get(org, float("-inf")) >= self.store_interval

    async def _keep(self, checkpoint: SignedCheckpoint) -> None:
        await self._audit.store_peer_checkpoint(checkpoint)
        self._stored[checkpoint.org] = checkpoint


def _contradicts(new: SignedCheckpoint, seen: SignedCheckpoint) -> bool:
    return new.sequence < seen.sequence or (
        new.sequence == seen.sequence and new.head_hash != seen.head_hash
    )
