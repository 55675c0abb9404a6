"""State and helpers shared by every route of an exchange (see gateway/exchange/router.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.audit.store import AuditEvent, AuditStore
from gateway.errors import (
    AuditUnavailable,
    Cancelled,
    DeadlineExceeded,
    FedgateError,
    PermissionDenied,
)
from gateway.exchange.agents import AgentRegistry
from gateway.exchange.refusals import RefusalLog
from gateway.exchange.tasks import TaskError, TaskResult, TaskSpec, TaskState, TaskUpdate
from gateway.identity.signing import Signer, Verifier
from gateway.payload import digest
from gateway.peers import PeerRegistry
from gateway.policy.engine import FilterResult, Policy, PolicyHolder
from gateway.store.task_table import MemoryTaskStore, TaskKey, TaskRow, TaskStore, task_key

log = logging.getLogger("fedgate.router")

# Why a requester's gateway closes the records of a task its requester went away from.
REQUESTER_GONE = "the requester went away before the task ended"

Claims = Mapping[str, str | Sequence[str]] | None


@dataclass(frozen=True)
class Limits:
    max_depth: int = 32
    max_fields: int = 10_000


@dataclass
class Running:
    """A task this gateway is working on right now."""

    spec: TaskSpec
    origin_org: str
    remote: bool
    claims: Claims = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    # Sub-tasks our agents started while serving this task (multi-hop), and their receipts.
    children: set[str] = field(default_factory=set)
    provenance: list[dict[str, Any]] = field(default_factory=list)


class DuplicateTask(Exception):
    """The task table already holds this key: the flow stops and the stored outcome answers."""

    def __init__(self, row: TaskRow) -> None:
        super().__init__(row.task_id)
        self.row = row


def error_result(spec: TaskSpec, exc: BaseException, responder_org: str) -> TaskResult:
    """The result kept for a task that ended with an error instead of a result."""
    if isinstance(exc, FedgateError):
        code, message = exc.status.name.lower(), exc.message
    elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)) and spec.remaining() <= 0.05:
        # The requester's own gRPC deadline fired with the task's: that is the deadline, not a
        # cancel. The two are computed a few milliseconds apart, hence the small tolerance.
        code, message = "deadline_exceeded", f"task {spec.task_id} passed its deadline"
    elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        code, message = "canceled", REQUESTER_GONE
    else:
        code, message = "internal", f"the gateway failed: {type(exc).__name__}"
    state = TaskState.CANCELED if code in ("canceled", "cancelled") else TaskState.FAILED
    return TaskResult(
        spec.task_id, state, error=TaskError(code, message), responder_org=responder_org
    )


def departure(final: TaskResult, gone: str) -> tuple[str, FedgateError]:
    """The record kind and error that close a task whose requester went away: the deadline
    if that is what its stored outcome says (error_result decided it), else a cancel (`gone`)."""
    if final.error is not None and final.error.code == "deadline_exceeded":
        return "failed", DeadlineExceeded(f"task {final.task_id} passed its deadline")
    return "canceled", Cancelled(gone)


class RouterBase:
    """Shared state: who we are, what runs, and the stores every route writes to."""

    def __init__(
        self,
        *,
        org: str,
        agents: AgentRegistry,
        peers: PeerRegistry,
        policy: PolicyHolder | None,
        audit: AuditStore,
        signer: Signer,
        verifier: Verifier,
        tasks: TaskStore | None = None,
        limits: Limits = Limits(),
        store_payloads: bool = False,
        max_failovers: int = 2,
        finished_capacity: int = 1_000,
    ) -> None:
        self.org = org
        self.agents = agents
        self.peers = peers
        self.policy = policy
        self.audit = audit
        self.signer = signer
        self.verifier = verifier
        self.tasks: TaskStore = tasks if tasks is not None else MemoryTaskStore()
        self.limits = limits
        self.store_payloads = store_payloads
        self.max_failovers = max_failovers
        self.delegation_ttl = 300.0
        self.draining = False
        self._running: dict[str, Running] = {}
        self._inflight: dict[TaskKey, asyncio.Future[TaskResult]] = {}
        self._claimed_ids: set[str] = set()
        # Recent outcomes, for GetTask and retries without a database read; the task table
        # holds them all.
        self._finished: OrderedDict[str, tuple[str, str, TaskResult]] = OrderedDict()
        self._recent: OrderedDict[TaskKey, TaskResult] = OrderedDict()
        self._finished_capacity = finished_capacity
        self._idle = asyncio.Event()
        self._idle.set()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def wait_idle(self, grace: float) -> bool:
        """Wait until no task runs; False if some still run after `grace` seconds."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            return False
        return True

    def current_policy(self) -> Policy | None:
        return self.policy.current if self.policy is not None else None

    def _start(
        self, spec: TaskSpec, origin_org: str, *, remote: bool, claims: Claims = None
    ) -> Running:
        running = Running(spec, origin_org, remote, claims)
        self._running[spec.task_id] = running
        self._idle.clear()
        return running

    def _finish(self, running: Running, result: TaskResult | None) -> None:
        self._running.pop(running.spec.task_id, None)
        if not self._running:
            self._idle.set()
        if result is not None:
            self._finished[running.spec.task_id] = (
                running.origin_org,
                running.spec.requester,
                result,
            )
            self._recent[task_key(running.origin_org, running.spec)] = result
            while len(self._finished) > self._finished_capacity:
                self._finished.popitem(last=False)
            while len(self._recent) > self._finished_capacity:
                self._recent.popitem(last=False)

    async def _record(self, event: AuditEvent) -> None:
        """Commit an audit record; the exchange stops here if the store cannot be written."""
        try:
            await self.audit.append(event)
        except AuditUnavailable:
            raise
        except Exception as exc:  # a store bug must fail closed, not release unaudited data
            log.exception("audit append failed")
            raise AuditUnavailable(
                f"audit store cannot be written: {type(exc).__name__}; exchanges are refused "
                "until it recovers"
            ) from None

    async def _record_then_accept(
        self,
        event: AuditEvent | None,
        origin_org: str,
        spec: TaskSpec,
        *,
        remote: bool,
        close: Callable[[BaseException], Awaitable[None]] | None = None,
    ) -> TaskRow | None:
        """Commit `event` (if any), then take the task's key in the task table.

        In this order: a row in the table is a task that may run again after a restart, so it
        must never exist without the record of its request. A key taken while our requester
        goes away is given back (the write goes on in the table's writer), so no 'working' row
        outlives a task nobody waits for; and an `event` that commits while it goes away (the
        audit writer goes on too) is closed by `close`, so no record of a request is left
        open. Returns the row already holding the key, if any.
        """
        if event is not None:
            recording = asyncio.ensure_future(self._record(event))
            try:
                await asyncio.shield(recording)
            except asyncio.CancelledError as exc:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(recording)  # raises if it was not committed
                    if close is not None:
                        await asyncio.shield(close(exc))
                raise
        accepting = asyncio.ensure_future(self.tasks.accept(origin_org, spec, remote=remote))
        try:
            return await asyncio.shield(accepting)
        except asyncio.CancelledError as exc:
            with contextlib.suppress(BaseException):
                if await asyncio.shield(accepting) is None:
                    await self._forget_task(origin_org, spec)
            if event is not None and close is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(close(exc))
            raise

    async def _record_then_finish(
        self, event: AuditEvent, origin_org: str, spec: TaskSpec, result: TaskResult
    ) -> None:
        """Commit `event`, then keep the task's final result, both before it is released.

        In this order: a result in the table is one that GetTask and retries answer with, so it
        must never be there before the record of its release.
        """
        await self._record(event)
        await self._finish_task(origin_org, spec, result)

    def _event(self, kind: str, spec: TaskSpec, peer_org: str, **fields: Any) -> AuditEvent:
        """An audit event about `spec` and `peer_org`; `fields` fill in the rest."""
        return AuditEvent(
            kind=kind,
            task_id=spec.task_id or "-",
            peer_org=peer_org,
            agent=spec.agent,
            skill=spec.skill,
            requester=spec.requester,
            **fields,
        )

    async def audit_rejection(
        self,
        spec: TaskSpec,
        peer_org: str,
        exc: FedgateError,
        *,
        started: float,
        kind: str = "rejected",
        direction: str = "inbound",
    ) -> None:
        """Best effort: a rejection is recorded, but a store outage must not hide the refusal.

        The names in a refused request are unverified and may be huge: the record keeps a
        bounded prefix of each, so refusals cannot fill the audit store.
        """
        await RefusalLog.for_store(self.audit).record(
            spec, peer_org, exc, started=started, kind=kind, direction=direction
        )

    @staticmethod
    def _digests(original: dict[str, Any], filtered: FilterResult) -> tuple[str, str]:
        """Digests of a payload before and after its filter; one, when the filter hid nothing."""
        before = digest(original)
        if not filtered.withheld and not filtered.transformed:
            return before, before  # released unchanged (a property test holds the filter to it)
        return before, digest(filtered.output)

    def _filter(
        self,
        policy: Policy | None,
        peer: str,
        spec: TaskSpec,
        direction: Literal["send", "share"],
        payload: dict[str, Any],
        claims: Claims = None,
    ) -> FilterResult:
        if policy is None:
            raise PermissionDenied(
                f"no sharing policy is configured on {self.org!r}: nothing may leave (add [policy] "
                "to fedgate.toml)"
            )
        return policy.filter(
            peer,
            spec.agent,
            spec.skill,
            direction,
            payload,
            claims,
            max_depth=self.limits.max_depth,
            max_fields=self.limits.max_fields,
        )

    async def _finish_task(self, origin_org: str, spec: TaskSpec, result: TaskResult) -> None:
        """Keep a task's final result in the task table; an outage there must not hide it."""
        try:
            await asyncio.shield(self.tasks.finish(*task_key(origin_org, spec), result))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("could not record the end of task %s in the task table", spec.task_id)

    async def _forget_task(self, origin_org: str, spec: TaskSpec) -> None:
        """Drop a task that never ran, so that a retry with its key runs it."""
        try:
            await asyncio.shield(self.tasks.forget(*task_key(origin_org, spec)))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("could not drop task %s from the task table", spec.task_id)

    async def _wait(
        self, spec: TaskSpec, running: Running, updates: AsyncIterator[TaskUpdate]
    ) -> AsyncIterator[TaskUpdate]:
        """Relay updates until a final one, the deadline, or a cancel request."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.remaining()
        iterator = updates.__aiter__()
        cancel_wait = asyncio.ensure_future(running.cancel.wait())
        next_update: asyncio.Future[TaskUpdate] | None = None
        try:
            while True:
                next_update = asyncio.ensure_future(iterator.__anext__())
                done, _ = await asyncio.wait(
                    {next_update, cancel_wait},
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if next_update not in done:
                    if cancel_wait in done:
                        yield TaskUpdate(
                            spec.task_id,
                            TaskState.CANCELED,
                            result=TaskResult(
                                spec.task_id,
                                TaskState.CANCELED,
                                error=TaskError("canceled", running.reason),
                                responder_org=spec.target_org,
                            ),
                        )
                        return
                    raise DeadlineExceeded(
                        f"task {spec.task_id} for {spec.target} passed its deadline"
                    )
                try:
                    update = next_update.result()
                except StopAsyncIteration:
                    return
                yield update
                if update.state.final:
                    return
        finally:
            # However we leave (final update, deadline, cancel, or our own caller going away),
            # stop the pending read first, so that the source's own cleanup runs: the agent
            # registry then tells the agent to stop, and a peer call is cancelled.
            cancel_wait.cancel()
            if next_update is not None and not next_update.done():
                next_update.cancel()
                with contextlib.suppress(BaseException):
                    await next_update
            elif next_update is not None and not next_update.cancelled():
                next_update.exception()  # retrieved: a read that failed as we left is not news
            with contextlib.suppress(Exception):
                await iterator.aclose()  # type: ignore[attr-defined]
