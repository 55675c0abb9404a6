"""Refusal records: every refusal shows in the audit log, and a flood of them costs bounded storage.

A refusal (kind `rejected` or `invoke_denied`: a call refused before any other record of it
exists, such as an unknown peer, a limit, a malformed request) is recorded per *source*: the peer
organization, or for a federation member that is not a peer the fingerprint of its certificate.
Per (source, kind, direction, status) and per window of `window_seconds`, the first
`full_per_window` refusals are recorded in full; the rest are counted, and one aggregate record
at the end of the window names how many there were and the last cause. So 1,000 refusals in a
minute cost at most `full_per_window + 1` records, and a flood still shows, with its size.

Records that close an exchange already recorded (kinds `failed` and `canceled`, which the router
also writes through here) are never sampled: every request record is closed.

    refusals = RefusalLog(audit)            # one per audit store: RefusalLog.for_store(audit)
    await refusals.record(spec, peer_org, exc, started=started)           # best effort
    await refusals.record(spec, org, exc, started=started, source=fingerprint)
    await refusals.flush()                  # at shutdown, before the store closes

Names in a refused request are unverified and may be huge or hold NUL characters: the record
keeps a bounded prefix of each with NUL written as `\\0`, so the refusal of a bad request is
itself recordable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from gateway.audit.chain import AuditEvent
from gateway.audit.store import AuditStore
from gateway.errors import FedgateError
from gateway.exchange.tasks import TaskSpec

log = logging.getLogger("fedgate.refusals")

# Refusals that no other record of the same call precedes: a denied invoke is one too (the router
# writes it itself, failing closed, after asking `sample`).
SAMPLED_KINDS = frozenset({"rejected", "invoke_denied"})
# Sources beyond this many share one overflow window (and its bound): memory stays bounded too.
_MAX_WINDOWS = 4096
_OVERFLOW = "*"

_BY_STORE: weakref.WeakKeyDictionary[AuditStore, RefusalLog] = weakref.WeakKeyDictionary()


def bounded(text: str, limit: int) -> str:
    """An unverified string as kept in a record: at most `limit` characters, NUL written `\\0`."""
    return text[:limit].replace("\x00", "\\0")


@dataclass
class _Window:
    """Refusals of one (source, kind, direction, status) since `opened`."""

    opened: float
    peer_org: str
    recorded: int = 0
    suppressed: int = 0
    last_detail: str = ""
    flusher: asyncio.TimerHandle | None = None


class RefusalLog:
    """Records refusals in an audit store, sampled per source and window (see the module)."""

    def __init__(
        self,
        audit: AuditStore,
        *,
        window_seconds: float = 60.0,
        full_per_window: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_seconds <= 0 or full_per_window < 0:
            raise ValueError("window_seconds must be positive and full_per_window not negative")
        self.audit = audit
        self.window_seconds = window_seconds
        self.full_per_window = full_per_window
        self._clock = clock
        self._windows: dict[tuple[str, str, str, str], _Window] = {}
        self._pending: set[asyncio.Task[None]] = set()
        # How many refusals were seen and how many were recorded one by one (for tests and
        # metrics): seen - recorded were counted into aggregate records.
        self.seen = 0
        self.recorded = 0

    @classmethod
    def for_store(cls, audit: AuditStore) -> RefusalLog:
        """The one refusal log of `audit` (created on first use), shared by every caller, so the
        servicers and the router count one flood together."""
        log_ = _BY_STORE.get(audit)
        if log_ is None:
            log_ = _BY_STORE[audit] = cls(audit)
        return log_

    async def record(
        self,
        spec: TaskSpec,
        peer_org: str,
        exc: FedgateError,
        *,
        started: float,
        kind: str = "rejected",
        direction: str = "inbound",
        source: str | None = None,
    ) -> None:
        """Best effort: record a refusal (sampled, see the module); a store outage is logged,
        never raised, so it cannot hide the refusal itself from the caller.

        `source` is what a flood is counted by: the peer organization by default; pass the
        certificate fingerprint for a caller whose organization is not a peer.
        """
        self.seen += 1
        event = self._event(spec, peer_org, exc, started=started, kind=kind, direction=direction)
        if kind in SAMPLED_KINDS and not self._admit(source or peer_org, event):
            return
        self.recorded += 1
        await self._append(event)

    async def flush(self) -> None:
        """Write the aggregate record of every window that counted refusals, now (at shutdown)."""
        for key, window in list(self._windows.items()):
            if window.suppressed:
                await self._close(key, window)
        self._windows.clear()
        for task in list(self._pending):
            with contextlib.suppress(BaseException):
                await task

    # ---- sampling ----

    def sample(self, source: str, event: AuditEvent) -> bool:
        """Whether a refusal record the caller writes itself (a denied invoke, which fails
        closed) is to be written in full; if not, it is counted in its window."""
        self.seen += 1
        if event.kind not in SAMPLED_KINDS or self._admit(source, event):
            self.recorded += 1
            return True
        return False

    def _admit(self, source: str, event: AuditEvent) -> bool:
        """Whether `event` is recorded in full; if not, it is counted in its window."""
        now = self._clock()
        key = (source, event.kind, event.direction, event.status)
        window = self._windows.get(key)
        if window is not None and now - window.opened >= self.window_seconds:
            # The window is over (its flusher may not have run yet): close it, open a new one.
            self._spawn_close(key, window)
            window = None
        if window is None:
            if len(self._windows) >= _MAX_WINDOWS:
                self._forget_quiet(now)
            if len(self._windows) >= _MAX_WINDOWS:
                key = (_OVERFLOW, event.kind, event.direction, event.status)
                window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(opened=now, peer_org=event.peer_org)
        if window.recorded < self.full_per_window:
            window.recorded += 1
            return True
        window.suppressed += 1
        window.last_detail = event.detail
        if window.flusher is None:
            delay = max(0.0, window.opened + self.window_seconds - now)
            window.flusher = asyncio.get_running_loop().call_later(
                delay, self._spawn_close, key, window
            )
        return False

    def _forget_quiet(self, now: float) -> None:
        """Drop windows that are over and counted nothing beyond their full records."""
        for key in [
            key
            for key, window in self._windows.items()
            if now - window.opened >= self.window_seconds and not window.suppressed
        ]:
            del self._windows[key]

    def _spawn_close(self, key: tuple[str, str, str, str], window: _Window) -> None:
        task = asyncio.ensure_future(self._close(key, window))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _close(self, key: tuple[str, str, str, str], window: _Window) -> None:
        """Write the aggregate record of a window (once) and forget it."""
        if self._windows.get(key) is window:
            del self._windows[key]
        if window.flusher is not None:
            window.flusher.cancel()
        count, window.suppressed = window.suppressed, 0
        if not count:
            return
        source, kind, direction, status = key
        if source == _OVERFLOW:
            who = "callers beyond the tracked sources"
        elif source == window.peer_org:
            who = f"organization {window.peer_org!r}"
        else:
            who = f"the certificate {source} (organization {window.peer_org!r})"
        elapsed = max(0.0, self._clock() - window.opened)
        await self._append(
            AuditEvent(
                kind=kind,
                task_id="-",
                peer_org=window.peer_org if source != _OVERFLOW else "-",
                direction=direction,
                decision="denied",
                status=status,
                detail=bounded(
                    f"{count} more refusals ({status}) of {who} in {elapsed:.0f} s, not recorded "
                    f"one by one (the first {self.full_per_window} of every "
                    f"{self.window_seconds:g} s are); the last: {window.last_detail}",
                    1000,
                ),
            )
        )

    # ---- records ----

    @staticmethod
    def _event(
        spec: TaskSpec,
        peer_org: str,
        exc: FedgateError,
        *,
        started: float,
        kind: str,
        direction: str,
    ) -> AuditEvent:
        return AuditEvent(
            kind=kind,
            task_id=bounded(spec.task_id, 128) or "-",
            peer_org=bounded(peer_org, 64),
            agent=bounded(spec.agent, 64),
            skill=bounded(spec.skill, 64),
            requester=bounded(spec.requester, 256),
            direction=direction,
            decision="denied",
            status=exc.status.name,
            duration_ms=(time.monotonic() - started) * 1000,
            detail=bounded(exc.message, 1000),
        )

    async def _append(self, event: AuditEvent) -> None:
        try:
            await self.audit.append(event)
        except Exception:
            log.warning(
                "could not audit a refusal for peer %s (audit store unavailable)", event.peer_org
            )


__all__ = ["RefusalLog", "bounded"]
