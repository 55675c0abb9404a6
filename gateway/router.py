"""Routing of one exchange, with policy and audit: testable without a socket.

Three paths:
  * a local requester calls a local agent: dispatched, nothing crosses a boundary;
  * a local requester calls a partner's agent (outbound): the `send` policy filters the input,
    `request_sent` is committed to the audit log, the task goes to the peer's gateway, the
    responder's receipt is verified and `result_received` is committed;
  * a peer calls one of our agents (inbound): `invoke` policy, `request_received`, dispatch,
    the `share` policy filters the result, a receipt is signed and `result_released` is committed
    before a single byte of the result leaves.

A value the policy withholds never reaches a log line or an audit record: records keep paths and
digests. An agent's free-text progress notes and error messages stay inside the organization;
a peer sees states and stable error codes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from fedgate.v1 import fedgate_pb2 as pb

from gateway.agents import AgentRegistry
from gateway.audit import AuditEvent, AuditStore
from gateway.errors import (
    AuditUnavailable,
    Cancelled,
    DeadlineExceeded,
    FedgateError,
    InvalidArgument,
    NotFound,
    PayloadLimitExceeded,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from gateway.payload import check_limits, digest
from gateway.peers import PeerRegistry
from gateway.policy import FilterResult, Policy, PolicyHolder
from gateway.signing import ReceiptBody, SignedReceipt, Signer, Verifier, sign_receipt, verify_receipt
from gateway.tasks import (
    TaskError,
    TaskResult,
    TaskSpec,
    TaskState,
    TaskUpdate,
    new_task_id,
    validate_names,
    validate_task_id,
)
from gateway.wire import AgentCard, spec_to_pb, update_from_pb

log = logging.getLogger("fedgate.router")

# gRPC statuses a peer may answer with, mapped back onto our error tree.
_STATUS_ERRORS: dict[grpc.StatusCode, type[FedgateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}

# What a peer is told when one of our agents fails: a stable code, never the agent's own text.
_PEER_ERROR_MESSAGES = {
    "agent_disconnected": "the agent instance disconnected mid-task",
    "skill_error": "the agent's skill reported an error",
    "policy_refused": "the result could not be evaluated by the sharing policy and was not released",
}


@dataclass(frozen=True)
class Limits:
    max_depth: int = 32
    max_fields: int = 10_000


@dataclass
class _Running:
    spec: TaskSpec
    origin_org: str
    remote: bool
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""


class Router:
    """Runs exchanges for one organization's gateway."""

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
        limits: Limits = Limits(),
        store_payloads: bool = False,
        finished_capacity: int = 10_000,
    ) -> None:
        self.org = org
        self.agents = agents
        self.peers = peers
        self.policy = policy
        self.audit = audit
        self.signer = signer
        self.verifier = verifier
        self.limits = limits
        self.store_payloads = store_payloads
        self.draining = False
        self._running: dict[str, _Running] = {}
        self._finished: OrderedDict[str, tuple[str, TaskResult]] = OrderedDict()
        self._finished_capacity = finished_capacity
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- queries -------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no task runs; False if some still run after `timeout` seconds."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def current_policy(self) -> Policy | None:
        return self.policy.current if self.policy is not None else None

    def cards_for_peer(self, peer_org: str) -> list[AgentCard]:
        """The agent cards (and skills) a peer may invoke; the rest do not exist for it."""
        policy = self.current_policy()
        if policy is None:
            return []
        visible = []
        for card in self.agents.cards():
            skills = tuple(
                s for s in card.skills if policy.may_invoke(peer_org, card.name, s.name).allowed
            )
            if skills:
                visible.append(replace(card, skills=skills))
        return visible

    def get(self, task_id: str, *, origin_org: str) -> TaskResult:
        """State of a task the asking organization submitted."""
        running = self._running.get(task_id)
        if running is not None and running.origin_org == origin_org:
            return TaskResult(task_id, TaskState.WORKING)
        finished = self._finished.get(task_id)
        if finished is not None and finished[0] == origin_org:
            return finished[1]
        raise NotFound(f"task {task_id!r} is not known to the gateway of {self.org!r}")

    async def cancel(self, task_id: str, reason: str, *, origin_org: str) -> TaskState:
        """Cancel a running task the asking organization submitted; returns its state."""
        running = self._running.get(task_id)
        if running is None or running.origin_org != origin_org:
            finished = self._finished.get(task_id)
            if finished is not None and finished[0] == origin_org:
                return finished[1].state
            raise NotFound(f"task {task_id!r} is not known to the gateway of {self.org!r}")
        running.reason = reason or "canceled by the requester"
        if running.remote:
            # Tell the peer first, so it ends and records the task before our stream closes.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.peers.stub(running.spec.target_org).CancelTask(
                    pb.CancelTaskRequest(task_id=task_id, reason=running.reason),
                    timeout=max(1.0, min(5.0, running.spec.remaining())),
                )
        running.cancel.set()
        return TaskState.CANCELED

    # ---- entry points --------------------------------------------------------------------

    async def submit(self, spec: TaskSpec) -> AsyncIterator[TaskUpdate]:
        """A task from a local requester, to a local or a partner's agent."""
        spec = self._prepare(spec)
        if spec.target_org == self.org:
            card = self.agents.card(spec.agent)
            if card is None:
                raise NotFound(
                    f"agent {spec.agent!r} is not connected to the gateway of {self.org!r}"
                )
            if card.skill(spec.skill) is None:
                raise NotFound(f"agent {spec.agent!r} of {self.org!r} has no skill {spec.skill!r}")
            updates = self._run_local(spec, origin_org=self.org, peer_org=None)
        else:
            updates = self._run_remote(spec)
        async for update in updates:
            yield update

    async def serve_peer(self, spec: TaskSpec, peer_org: str) -> AsyncIterator[TaskUpdate]:
        """A task from a peer organization, proven by its certificate, for one of our agents."""
        started = time.monotonic()
        try:
            spec = self._prepare(spec)
            if spec.target_org != self.org:
                raise NotFound(
                    f"this gateway serves organization {self.org!r}, not {spec.target_org!r}"
                )
        except FedgateError as exc:
            await self.audit_rejection(spec, peer_org, exc, started=started)
            raise
        async for update in self._run_local(spec, origin_org=peer_org, peer_org=peer_org):
            yield update

    # ---- helpers -------------------------------------------------------------------------

    def _prepare(self, spec: TaskSpec) -> TaskSpec:
        if self.draining:
            raise Unavailable(f"the gateway of {self.org!r} is shutting down: retry on another replica")
        validate_names(spec.target_org, spec.agent, spec.skill)
        if not spec.task_id:
            spec = replace(spec, task_id=new_task_id())
        validate_task_id(spec.task_id)
        if spec.task_id in self._running:
            raise InvalidArgument(f"task id {spec.task_id!r} is already running")
        if spec.remaining() <= 0:
            raise DeadlineExceeded(f"task {spec.task_id} arrived after its deadline")
        return spec

    def _start(self, spec: TaskSpec, origin_org: str, *, remote: bool) -> _Running:
        running = _Running(spec, origin_org, remote)
        self._running[spec.task_id] = running
        self._idle.clear()
        return running

    def _finish(self, running: _Running, result: TaskResult | None) -> None:
        self._running.pop(running.spec.task_id, None)
        if not self._running:
            self._idle.set()
        if result is not None:
            self._finished[running.spec.task_id] = (running.origin_org, result)
            while len(self._finished) > self._finished_capacity:
                self._finished.popitem(last=False)

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
        """Best effort: a rejection is recorded, but a store outage must not hide the refusal."""
        try:
            await self.audit.append(
                AuditEvent(
                    kind=kind,
                    task_id=spec.task_id or "-",
                    peer_org=peer_org,
                    agent=spec.agent,
                    skill=spec.skill,
                    direction=direction,
                    decision="denied",
                    requester=spec.requester,
                    status=exc.status.name,
                    duration_ms=(time.monotonic() - started) * 1000,
                    detail=exc.message,
                )
            )
        except Exception:
            log.warning("could not audit a rejection for peer %s (audit store unavailable)", peer_org)

    def _filter(
        self, policy: Policy | None, peer: str, spec: TaskSpec, direction: str, payload: dict[str, Any]
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
            direction,  # type: ignore[arg-type]
            payload,
            max_depth=self.limits.max_depth,
            max_fields=self.limits.max_fields,
        )

    async def _wait(self, spec: TaskSpec, running: _Running, updates: AsyncIterator[TaskUpdate]) -> AsyncIterator[TaskUpdate]:
        """Relay updates until a final one, the deadline, or a cancel request."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.remaining()
        iterator = updates.__aiter__()
        cancel_wait = asyncio.ensure_future(running.cancel.wait())
        try:
            while True:
                next_update = asyncio.ensure_future(iterator.__anext__())
                done, _ = await asyncio.wait(
                    {next_update, cancel_wait},
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if next_update not in done:
                    next_update.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                        await next_update
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
            cancel_wait.cancel()
            with contextlib.suppress(Exception):
                await iterator.aclose()  # type: ignore[attr-defined]

    # ---- inbound and local ---------------------------------------------------------------

    async def _run_local(
        self, spec: TaskSpec, *, origin_org: str, peer_org: str | None
    ) -> AsyncIterator[TaskUpdate]:
        started = time.monotonic()
        policy = self.current_policy()
        if peer_org is not None:
            await self._admit_peer(spec, peer_org, policy, started)
        running = self._start(spec, origin_org, remote=False)
        final: TaskResult | None = None
        releasing = False
        try:
            updates = self.agents.dispatch(spec, origin_org)
            async for update in self._wait(spec, running, updates):
                if not update.state.final:
                    # Progress notes are free text written by the agent: they stay inside.
                    yield update if peer_org is None else replace(update, message="")
                    continue
                result = update.result or TaskResult(spec.task_id, update.state, responder_org=self.org)
                result = replace(result, task_id=spec.task_id, responder_org=self.org)
                if peer_org is not None:
                    releasing = True  # from here on _release records the outcome
                    result = await self._release(spec, peer_org, policy, result, started)
                final = result
                yield TaskUpdate(spec.task_id, result.state, result=result)
                return
        except FedgateError as exc:
            if peer_org is not None and not isinstance(exc, AuditUnavailable):
                await self.audit_rejection(spec, peer_org, exc, started=started, kind="failed")
            raise
        except asyncio.CancelledError:
            if peer_org is not None and not releasing:
                # The requester's gateway went away mid-task: record how the exchange ended.
                gone = Cancelled("the requesting gateway closed the task stream")
                await asyncio.shield(
                    self.audit_rejection(spec, peer_org, gone, started=started, kind="canceled")
                )
            raise
        finally:
            self._finish(running, final)

    async def _admit_peer(
        self, spec: TaskSpec, peer_org: str, policy: Policy | None, started: float
    ) -> None:
        """Invoke policy, limits and the `request_received` record, before any dispatch."""
        card = self.agents.card(spec.agent)
        exists = card is not None and card.skill(spec.skill) is not None
        decision = policy.may_invoke(peer_org, spec.agent, spec.skill) if policy else None
        if decision is None or not decision.allowed or not exists:
            # Seen from the peer, a denied invoke and a missing agent are the same answer.
            error = PermissionDenied(
                f"agent skill {spec.agent}.{spec.skill} of {self.org!r} does not exist or is not "
                f"shared with organization {peer_org!r}"
            )
            why = "no agent instance has this skill" if not exists else "no invoke rule allows it"
            await self._record(
                AuditEvent(
                    kind="invoke_denied",
                    task_id=spec.task_id,
                    peer_org=peer_org,
                    agent=spec.agent,
                    skill=spec.skill,
                    direction="inbound",
                    decision="denied",
                    requester=spec.requester,
                    status=error.status.name,
                    duration_ms=(time.monotonic() - started) * 1000,
                    policy_version=policy.version if policy else None,
                    detail=why,
                )
            )
            raise error
        try:
            check_limits(spec.input, max_depth=self.limits.max_depth, max_fields=self.limits.max_fields)
        except PayloadLimitExceeded as exc:
            await self.audit_rejection(spec, peer_org, exc, started=started)
            raise
        await self._record(
            AuditEvent(
                kind="request_received",
                task_id=spec.task_id,
                peer_org=peer_org,
                agent=spec.agent,
                skill=spec.skill,
                direction="inbound",
                decision="allowed",
                requester=spec.requester,
                status=TaskState.SUBMITTED.value,
                duration_ms=(time.monotonic() - started) * 1000,
                withheld_paths=tuple(p for p, a in spec.input_field_actions if a == "withheld"),
                transformed=tuple((p, a) for p, a in spec.input_field_actions if a != "withheld"),
                digest_before=digest(spec.input),
                digest_after=digest(spec.input),
                policy_version=decision.policy_version,
                payload=spec.input if self.store_payloads else None,
            )
        )

    async def _release(
        self, spec: TaskSpec, peer_org: str, policy: Policy | None, result: TaskResult, started: float
    ) -> TaskResult:
        """Filter a final result for a peer, sign its receipt and commit `result_released`."""
        duration = (time.monotonic() - started) * 1000
        if result.state is not TaskState.COMPLETED:
            code = result.error.code if result.error else "skill_error"
            if code not in _PEER_ERROR_MESSAGES and code != "canceled":
                code = "skill_error"
            message = _PEER_ERROR_MESSAGES.get(code, "the task was canceled")
            released = TaskResult(
                spec.task_id, result.state, error=TaskError(code, message), responder_org=self.org
            )
            await self._record(
                AuditEvent(
                    kind="canceled" if result.state is TaskState.CANCELED else "failed",
                    task_id=spec.task_id,
                    peer_org=peer_org,
                    agent=spec.agent,
                    skill=spec.skill,
                    direction="inbound",
                    decision="error",
                    requester=spec.requester,
                    status=result.state.value,
                    duration_ms=duration,
                    detail=code,
                )
            )
            return released
        try:
            filtered = self._filter(policy, peer_org, spec, "share", result.output)
        except FedgateError as exc:
            await self._record(
                AuditEvent(
                    kind="failed",
                    task_id=spec.task_id,
                    peer_org=peer_org,
                    agent=spec.agent,
                    skill=spec.skill,
                    direction="inbound",
                    decision="denied",
                    requester=spec.requester,
                    status=TaskState.FAILED.value,
                    duration_ms=duration,
                    digest_before=digest(result.output) if isinstance(exc, PermissionDenied) else None,
                    detail=f"policy_refused: {exc.message}",
                )
            )
            return TaskResult(
                spec.task_id,
                TaskState.FAILED,
                error=TaskError("policy_refused", _PEER_ERROR_MESSAGES["policy_refused"]),
                responder_org=self.org,
            )
        actions = tuple((p, "withheld") for p in filtered.withheld) + filtered.transformed
        receipt = sign_receipt(
            self.signer,
            ReceiptBody(
                task_id=spec.task_id,
                responder_org=self.org,
                result_digest=digest(filtered.output),
                withheld_paths=filtered.withheld,
                field_actions=filtered.transformed,
                policy_version=filtered.policy_version,
                signed_at_unix_ms=int(time.time() * 1000),
            ),
        ).to_json()
        await self._record(
            AuditEvent(
                kind="result_released",
                task_id=spec.task_id,
                peer_org=peer_org,
                agent=spec.agent,
                skill=spec.skill,
                direction="inbound",
                decision="partial" if actions else "allowed",
                requester=spec.requester,
                status=TaskState.COMPLETED.value,
                duration_ms=duration,
                withheld_paths=filtered.withheld,
                transformed=filtered.transformed,
                digest_before=digest(result.output),
                digest_after=digest(filtered.output),
                policy_version=filtered.policy_version,
                receipt=receipt,
                payload=result.output if self.store_payloads else None,
            )
        )
        return TaskResult(
            spec.task_id,
            TaskState.COMPLETED,
            output=filtered.output,
            field_actions=actions,
            receipt=receipt,
            responder_org=self.org,
            policy_version=filtered.policy_version,
        )

    # ---- outbound ------------------------------------------------------------------------

    async def _run_remote(self, spec: TaskSpec) -> AsyncIterator[TaskUpdate]:
        started = time.monotonic()
        peer = spec.target_org
        stub = self.peers.stub(peer)  # NotFound for an organization that is not a peer
        policy = self.current_policy()
        try:
            filtered = self._filter(policy, peer, spec, "send", spec.input)
        except FedgateError as exc:
            await self.audit_rejection(spec, peer, exc, started=started, direction="outbound")
            raise
        actions = tuple((p, "withheld") for p in filtered.withheld) + filtered.transformed
        outbound = spec.with_input(filtered.output, actions)
        base = AuditEvent(
            kind="request_sent",
            task_id=spec.task_id,
            peer_org=peer,
            agent=spec.agent,
            skill=spec.skill,
            direction="outbound",
            decision="partial" if actions else "allowed",
            requester=spec.requester,
            status=TaskState.SUBMITTED.value,
            withheld_paths=filtered.withheld,
            transformed=filtered.transformed,
            digest_before=digest(spec.input),
            digest_after=digest(filtered.output),
            policy_version=filtered.policy_version,
            payload=spec.input if self.store_payloads else None,
        )
        await self._record(replace(base, duration_ms=(time.monotonic() - started) * 1000))
        running = self._start(spec, self.org, remote=True)
        final: TaskResult | None = None
        call = stub.StreamTask(
            spec_to_pb(outbound, sender_org=self.org), timeout=max(0.001, spec.remaining())
        )
        try:
            async for update in self._wait(spec, running, self._peer_updates(peer, call)):
                if not update.state.final:
                    yield update
                    continue
                result = await self._receive(spec, update, started)
                final = result
                yield TaskUpdate(spec.task_id, result.state, result=result)
                return
            raise Unavailable(f"organization {peer!r} closed the task stream without a result")
        except FedgateError as exc:
            if not isinstance(exc, AuditUnavailable):
                with contextlib.suppress(Exception):
                    await self.audit.append(
                        replace(
                            base,
                            kind="failed",
                            decision="error",
                            status=exc.status.name,
                            detail=exc.message,
                            duration_ms=(time.monotonic() - started) * 1000,
                            payload=None,
                        )
                    )
            raise
        finally:
            call.cancel()
            self._finish(running, final)

    async def _peer_updates(self, peer: str, call: Any) -> AsyncIterator[TaskUpdate]:
        try:
            async for message in call:
                yield update_from_pb(message)
        except grpc.aio.AioRpcError as exc:
            raise self._peer_error(peer, exc) from None

    def _peer_error(self, peer: str, exc: grpc.aio.AioRpcError) -> FedgateError:
        code = exc.code()
        details = exc.details() or code.name
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(
                f"organization {peer!r} at {self.peers.address(peer)} is unreachable: {details}"
            )
        error_type = _STATUS_ERRORS.get(code, Unavailable)
        return error_type(f"organization {peer!r} answered: {details}")

    async def _receive(self, spec: TaskSpec, update: TaskUpdate, started: float) -> TaskResult:
        """Verify the responder's receipt and commit `result_received`."""
        result = update.result or TaskResult(spec.task_id, update.state)
        peer = spec.target_org
        decision, detail = "allowed", ""
        if result.state is TaskState.COMPLETED:
            try:
                if result.receipt is None:
                    raise Unauthenticated("the result carries no receipt")
                verify_receipt(
                    self.verifier,
                    SignedReceipt.from_json(result.receipt),
                    expected_org=peer,
                    released_output=result.output,
                )
                check_limits(result.output, max_depth=self.limits.max_depth, max_fields=self.limits.max_fields)
            except (FedgateError, ValueError, KeyError, TypeError) as exc:
                decision = "receipt_invalid"
                detail = getattr(exc, "message", str(exc))
                result = TaskResult(
                    spec.task_id,
                    TaskState.FAILED,
                    error=TaskError("receipt_invalid", f"result of {peer!r} refused: {detail}"),
                    responder_org=peer,
                )
        await self._record(
            AuditEvent(
                kind="result_received" if result.state is TaskState.COMPLETED else (
                    "canceled" if result.state is TaskState.CANCELED else "failed"),
                task_id=spec.task_id,
                peer_org=peer,
                agent=spec.agent,
                skill=spec.skill,
                direction="outbound",
                decision=decision if result.state is TaskState.COMPLETED or decision != "allowed" else "error",
                requester=spec.requester,
                status=result.state.value,
                duration_ms=(time.monotonic() - started) * 1000,
                withheld_paths=tuple(p for p, a in result.field_actions if a == "withheld"),
                transformed=tuple((p, a) for p, a in result.field_actions if a != "withheld"),
                digest_after=digest(result.output) if result.state is TaskState.COMPLETED else None,
                policy_version=result.policy_version or None,
                detail=detail or (result.error.code if result.error else ""),
                receipt=result.receipt,
                payload=result.output if self.store_payloads and result.output else None,
            )
        )
        return replace(result, task_id=spec.task_id, responder_org=peer)

