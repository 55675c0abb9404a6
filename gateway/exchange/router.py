"""Routing of one exchange, with policy and audit: testable without a socket.

Three paths:
  * a local requester calls a local agent: dispatched, nothing crosses a boundary;
  * a local requester calls a partner's agent (outbound, gateway/exchange/outbound.py): the
    `send` policy filters the input, `request_sent` is committed, the task goes to the peer's
    gateway, the responder's receipt is verified and `result_received` is committed;
  * a peer calls one of our agents (inbound): `invoke` policy, `request_received`, dispatch,
    the `share` policy filters the result, a receipt is signed and `result_released` is committed
    before a single byte of the result leaves.

Once only: a task is keyed by (origin organization, idempotency key or task id). A retry of a
running task waits for it; a retry of a finished one gets the stored result, as released. An
accepted task is in the task table, so a restart dispatches it again or fails it with a reason.

A value the policy withholds never reaches a log line or an audit record: records keep paths and
digests. An agent's free-text progress notes and error messages stay inside the organization;
a peer sees states and stable error codes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import grpc
from fedgate.v1 import fedgate_pb2 as pb

from gateway.audit.store import AuditEvent
from gateway.edges.wire import AgentCard, result_from_pb
from gateway.errors import (
    AuditUnavailable,
    Cancelled,
    DeadlineExceeded,
    FedgateError,
    InvalidArgument,
    NotFound,
    PayloadLimitExceeded,
    PermissionDenied,
    Unavailable,
)
from gateway.exchange.outbound import OutboundRoutes
from gateway.exchange.router_base import (
    Claims,
    DuplicateTask,
    Limits,
    Running,
    departure,
    error_result,
)
from gateway.exchange.tasks import (
    TaskError,
    TaskResult,
    TaskSpec,
    TaskState,
    TaskUpdate,
    new_task_id,
    validate_names,
    validate_task_id,
)
from gateway.identity.signing import ReceiptBody, sign_receipt
from gateway.payload import check_limits, digest
from gateway.policy.engine import Policy
from gateway.store.task_table import TaskRow, task_key

__all__ = ["Limits", "Router"]

log = logging.getLogger("fedgate.router")

# Why a responder closes the records of a task whose requesting gateway went away.
STREAM_CLOSED = "the requesting gateway closed the task stream"

# What a peer is told when one of our agents fails: a stable code, never the agent's own text.
_PEER_ERROR_MESSAGES = {
    "agent_disconnected": "the agent instance disconnected mid-task",
    "skill_error": "the agent's skill reported an error",
    "policy_refused": (
        "the result could not be evaluated by the sharing policy and was not released"
    ),
    "gateway_restarted": "the gateway restarted before the task finished",
    "no_agent": "no agent instance was available before the deadline",
}


def _owned(requester: str, owner: str | None) -> bool:
    """Whether a task's requester ('subject' or 'subject/name') belongs to `owner` (None: any)."""
    return owner is None or requester.partition("/")[0] == owner


def claims_of(spec: TaskSpec) -> dict[str, str | tuple[str, ...]]:
    """The delegated claims of an inbound task, as the policy sees them (see delegation)."""
    return {"role": spec.roles, "purpose": spec.purpose, "subject": spec.requester}


def _describe_claims(spec: TaskSpec) -> str:
    """The delegated claims of who asked, as kept in the audit record."""
    parts = []
    if spec.purpose:
        parts.append(f"purpose={spec.purpose}")
    if spec.roles:
        parts.append("roles=" + ",".join(spec.roles))
    return " ".join(parts)


class Router(OutboundRoutes):
    """Runs exchanges for one organization's gateway."""

    # ---- queries -------------------------------------------------------------------------

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

    async def get(self, task_id: str, *, origin_org: str, owner: str | None = None) -> TaskResult:
        """State of a task the asking organization (and, given, requester) submitted."""
        unknown = NotFound(f"task {task_id!r} is not known to the gateway of {self.org!r}")
        running = self._running.get(task_id)
        if running is not None and running.origin_org == origin_org:
            if not _owned(running.spec.requester, owner):
                raise unknown
            return TaskResult(task_id, TaskState.WORKING)
        finished = self._finished.get(task_id)
        if finished is not None and finished[0] == origin_org and _owned(finished[1], owner):
            return finished[2]
        row = await self.tasks.by_task_id(origin_org, task_id)
        if row is not None and _owned(row.requester, owner):
            if row.result is None and row.remote:
                return await self._ask_peer(row)
            return row.result or TaskResult(task_id, TaskState.WORKING)
        raise unknown

    async def get_for_peer(self, task_id: str, peer_org: str) -> TaskResult:
        """GetTask from a peer: the state of a task it sent us, never its output.

        A result leaves only with its `result_released` record: the peer collects it by asking
        again with the same idempotency key, which answers with the stored result and records
        that it was sent again. Output from GetTask would leave without a record.
        """
        result = await self.get(task_id, origin_org=peer_org)
        if result.state is not TaskState.COMPLETED:
            return result
        return TaskResult(result.task_id, result.state, responder_org=self.org)

    async def _ask_peer(self, row: TaskRow) -> TaskResult:
        """An outbound task whose connection broke: what does the partner say about it now?"""
        peer = row.target.partition("/")[0]
        try:
            message = await self.peers.stub(peer).GetTask(
                pb.GetTaskRequest(task_id=row.task_id), timeout=5
            )
        except (grpc.aio.AioRpcError, FedgateError):
            self.peers.redial(peer)
            return TaskResult(row.task_id, TaskState.WORKING, responder_org=peer)
        answer = result_from_pb(message)
        if answer.state is not TaskState.COMPLETED:
            return replace(answer, responder_org=peer)
        # A completed result is only as good as its receipt; the requester collects it (and we
        # record it) by calling again with the same key.
        return TaskResult(row.task_id, TaskState.WORKING, responder_org=peer)

    async def cancel(
        self, task_id: str, reason: str, *, origin_org: str, owner: str | None = None
    ) -> TaskState:
        """Cancel a running task the asking organization (and requester) submitted, and its
        sub-tasks."""
        running = self._running.get(task_id)
        if (
            running is None
            or running.origin_org != origin_org
            or not _owned(running.spec.requester, owner)
        ):
            result = await self.get(task_id, origin_org=origin_org, owner=owner)
            return result.state
        running.reason = reason or "canceled by the requester"
        for child in list(running.children):
            with contextlib.suppress(FedgateError):
                await self.cancel(child, f"parent task {task_id} was canceled", origin_org=self.org)
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

    async def submit(self, spec: TaskSpec, *, stream: bool = True) -> AsyncIterator[TaskUpdate]:
        """A task from a local requester, to a local or a partner's agent.

        With stream=False the requester wants only the result: a partner is then asked with
        one unary call instead of a stream of updates.
        """
        spec = self._prepare(spec)
        flow: Callable[[], AsyncIterator[TaskUpdate]]
        if spec.target_org == self.org:
            card = self.agents.card(spec.agent)
            if card is None:
                raise NotFound(
                    f"agent {spec.agent!r} is not connected to the gateway of {self.org!r}"
                )
            if card.skill(spec.skill) is None:
                raise NotFound(f"agent {spec.agent!r} of {self.org!r} has no skill {spec.skill!r}")
            flow = lambda: self._run_local(spec, origin_org=self.org, peer_org=None)  # noqa: E731
        else:
            flow = lambda: self._run_remote(spec, stream=stream)  # noqa: E731
        async for update in self._once(self.org, spec, flow, peer_org=None):
            yield update

    async def serve_peer(
        self, spec: TaskSpec, peer_org: str, claims: Claims = None
    ) -> AsyncIterator[TaskUpdate]:
        """A task from a peer organization, proven by its certificate, for one of our agents.

        `claims` are the verified delegation claims of who asked (role, purpose, subject).
        """
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
        flow = lambda: self._run_local(spec, origin_org=peer_org, peer_org=peer_org, claims=claims)  # noqa: E731
        async for update in self._once(peer_org, spec, flow, peer_org=peer_org):
            yield update

    async def recover(self) -> int:
        """After a restart: dispatch accepted tasks again, or fail them with a reason."""
        rows = await self.tasks.unfinished()
        for row in rows:
            spec = row.spec
            if row.remote and spec is not None and spec.remaining() > 0:
                # Sent to a partner before the restart: the partner holds the task. GetTask asks
                # it, and a retry with the key resumes it (the partner runs a key once).
                continue
            if row.remote or spec is None or spec.remaining() <= 0:
                reason = (
                    "the gateway restarted and the task's deadline passed before it could ask "
                    "the partner again"
                    if row.remote
                    else "the gateway restarted and the task's deadline has passed"
                )
                await self._fail_recovered(row, "gateway_restarted", reason)
                continue
            key = (row.origin_org, row.key)
            self._inflight[key] = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(self._recover_one(row))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        if rows:
            log.info("recovered %d unfinished tasks from the task table", len(rows))
        return len(rows)

    async def _recover_one(self, row: TaskRow) -> None:
        spec = row.spec
        assert spec is not None
        key = (row.origin_org, row.key)
        future = self._inflight[key]
        peer_org = None if row.origin_org == self.org else row.origin_org
        result: TaskResult | None = None
        try:
            # Recovery after a restart is rare: polling until an instance reconnects is enough.
            while not self.agents.instance_count(spec.agent) and spec.remaining() > 0:  # noqa: ASYNC110
                await asyncio.sleep(min(0.2, max(0.01, spec.remaining())))
            if not self.agents.instance_count(spec.agent):
                result = await self._fail_recovered(
                    row, "no_agent", _PEER_ERROR_MESSAGES["no_agent"]
                )
                return
            claims = claims_of(spec) if peer_org is not None else None
            policy = self.current_policy()
            if peer_org is not None and (
                policy is None
                or not policy.may_invoke(peer_org, spec.agent, spec.skill, claims).allowed
            ):
                # The policy changed while we were down: the task is refused, not run.
                result = await self._fail_recovered(
                    row, "policy_refused", _PEER_ERROR_MESSAGES["policy_refused"]
                )
                return
            async for update in self._run_local(
                spec, origin_org=row.origin_org, peer_org=peer_org, claims=claims, recovered=True
            ):
                if update.state.final:
                    result = update.result
        except FedgateError as exc:
            result = error_result(spec, exc, self.org)
        finally:
            self._inflight.pop(key, None)
            if not future.done():
                future.set_result(
                    result or error_result(spec, Cancelled("recovery stopped"), self.org)
                )

    async def _fail_recovered(self, row: TaskRow, code: str, message: str) -> TaskResult:
        """End a task from the task table with an error instead of running it."""
        result = TaskResult(
            row.task_id, TaskState.FAILED, error=TaskError(code, message), responder_org=self.org
        )
        await self.tasks.finish(row.origin_org, row.key, result)
        return result

    async def stop_background(self) -> None:
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    # ---- once only -----------------------------------------------------------------------

    def _prepare(self, spec: TaskSpec) -> TaskSpec:
        if self.draining:
            raise Unavailable(
                f"the gateway of {self.org!r} is shutting down: retry on another replica"
            )
        validate_names(spec.target_org, spec.agent, spec.skill)
        if not spec.task_id:
            spec = replace(spec, task_id=new_task_id())
        validate_task_id(spec.task_id)
        if spec.idempotency_key:
            validate_task_id(spec.idempotency_key)
        if spec.remaining() <= 0:
            raise DeadlineExceeded(f"task {spec.task_id} arrived after its deadline")
        return spec

    async def _once(
        self,
        origin_org: str,
        spec: TaskSpec,
        flow: Callable[[], AsyncIterator[TaskUpdate]],
        *,
        peer_org: str | None,
    ) -> AsyncIterator[TaskUpdate]:
        """Run `flow` unless this key already ran or runs; then answer with that result."""
        key = task_key(origin_org, spec)
        pending = self._inflight.get(key)
        if pending is not None:
            try:
                earlier = await asyncio.wait_for(
                    asyncio.shield(pending), max(0.001, spec.remaining())
                )
            except TimeoutError:
                raise DeadlineExceeded(
                    f"task {spec.task_id} passed its deadline while its first attempt still ran"
                ) from None
            yield await self._answer_retry(spec, earlier, peer_org)
            return
        if spec.task_id in self._running or spec.task_id in self._claimed_ids:
            raise InvalidArgument(f"task id {spec.task_id!r} is already running under another key")
        recent = self._recent.get(key)
        if recent is not None:
            yield await self._answer_retry(spec, recent, peer_org)
            return
        future: asyncio.Future[TaskResult] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        self._claimed_ids.add(spec.task_id)  # before any await: one task id, one key
        result: TaskResult | None = None
        try:
            try:
                async for update in flow():
                    if update.state.final:
                        result = update.result
                    yield update
            except DuplicateTask as duplicate:
                # The task table knew this key (before a restart, or from another replica).
                if duplicate.row.result is None:
                    raise Unavailable(
                        f"task {duplicate.row.task_id!r} was interrupted by a restart of "
                        f"{self.org!r} and is being recovered: ask for it again later"
                    ) from None
                result = duplicate.row.result
                yield await self._answer_retry(spec, duplicate.row.result, peer_org)
        except BaseException as exc:
            # A retry waiting on this attempt gets the same outcome; the requester going away
            # at the deadline is the deadline (error_result tells the two apart).
            result = result or error_result(spec, exc, self.org)
            raise
        finally:
            self._inflight.pop(key, None)
            self._claimed_ids.discard(spec.task_id)
            future.set_result(result or error_result(spec, Cancelled("stream closed"), self.org))

    async def _answer_retry(
        self, spec: TaskSpec, result: TaskResult, peer_org: str | None
    ) -> TaskUpdate:
        """The stored outcome of a task, for a retry with the same key (audited for a peer)."""
        if peer_org is not None and result.state is TaskState.COMPLETED:
            await self._record(
                self._event(
                    "result_released",
                    spec,
                    peer_org,
                    direction="inbound",
                    decision="allowed",
                    status=result.state.value,
                    withheld_paths=tuple(p for p, a in result.field_actions if a == "withheld"),
                    transformed=tuple((p, a) for p, a in result.field_actions if a != "withheld"),
                    digest_after=digest(result.output),
                    policy_version=result.policy_version or None,
                    detail="retry: the stored result was sent again",
                    receipt=result.receipt,
                )
            )
        result = replace(result, task_id=spec.task_id)
        return TaskUpdate(spec.task_id, result.state, result=result)

    # ---- inbound and local ---------------------------------------------------------------

    async def _dispatch(self, spec: TaskSpec, origin_org: str) -> AsyncIterator[TaskUpdate]:
        """Dispatch to an instance; if it dies mid-task, to another one (up to max_failovers)."""
        failovers = 0
        while True:
            final: TaskUpdate | None = None
            async for update in self.agents.dispatch(spec, origin_org):
                if not update.state.final:
                    yield update
                    continue
                final = update
            assert final is not None
            error = final.result.error if final.result is not None else None
            if (
                error is not None
                and error.code == "agent_disconnected"
                and failovers < self.max_failovers
                and self.agents.instance_count(spec.agent) > 0
                and spec.remaining() > 0
            ):
                failovers += 1
                log.info("task %s: agent instance died; failing over (%d)", spec.task_id, failovers)
                continue
            yield final
            return

    async def _run_local(
        self,
        spec: TaskSpec,
        *,
        origin_org: str,
        peer_org: str | None,
        claims: Claims = None,
        recovered: bool = False,
    ) -> AsyncIterator[TaskUpdate]:
        started = time.monotonic()
        policy = self.current_policy()
        if not recovered:
            received = (
                await self._admit_peer(spec, peer_org, policy, started, claims)
                if peer_org is not None
                else None
            )

            async def close(exc: BaseException) -> None:
                assert peer_org is not None
                await self._record_departure(
                    spec, peer_org, error_result(spec, exc, self.org), started
                )

            try:
                existing = await self._record_then_accept(
                    received, origin_org, spec, remote=False, close=close
                )
            except FedgateError as exc:
                if peer_org is not None and not isinstance(exc, AuditUnavailable):
                    await self.audit_rejection(spec, peer_org, exc, started=started, kind="failed")
                raise
            if existing is not None:
                raise DuplicateTask(existing)
        running = self._start(spec, origin_org, remote=False, claims=claims)
        final: TaskResult | None = None
        releasing = kept = False
        try:
            async for update in self._wait(spec, running, self._dispatch(spec, origin_org)):
                if not update.state.final:
                    # Progress notes are free text written by the agent: they stay inside.
                    yield update if peer_org is None else replace(update, message="")
                    continue
                result = update.result or TaskResult(
                    spec.task_id, update.state, responder_org=self.org
                )
                result = replace(
                    result,
                    task_id=spec.task_id,
                    responder_org=self.org,
                    provenance=tuple(running.provenance),
                )
                if peer_org is not None:
                    releasing = True  # from here on the release records the outcome
                    result, event = self._release(spec, peer_org, policy, result, started, running)
                    await self._record_then_finish(event, origin_org, spec, result)
                    kept = True
                final = result
                yield TaskUpdate(spec.task_id, result.state, result=result)
                return
        except FedgateError as exc:
            # Decide the outcome before any await: the requester's deadline may cancel us there.
            final = final or error_result(spec, exc, self.org)
            if peer_org is not None and not isinstance(exc, AuditUnavailable):
                await asyncio.shield(
                    self.audit_rejection(spec, peer_org, exc, started=started, kind="failed")
                )
            raise
        except BaseException as exc:
            # Cancelled, or closed (GeneratorExit) when the requester's stream went away while
            # we waited at a yield. Decide the outcome before any await, then record it.
            final = final or error_result(spec, exc, self.org)
            if peer_org is not None and not releasing:
                await asyncio.shield(self._record_departure(spec, peer_org, final, started))
            raise
        finally:
            self._finish(running, final)
            if final is not None and not kept:
                await self._finish_task(origin_org, spec, final)

    async def _record_departure(
        self, spec: TaskSpec, peer_org: str, final: TaskResult, started: float
    ) -> None:
        """Close the records of a task whose requesting gateway went away: as the deadline if
        that is what `final` says (it gives up at the deadline too), else as a cancel."""
        kind, gone = departure(final, STREAM_CLOSED)
        await self.audit_rejection(spec, peer_org, gone, started=started, kind=kind)

    async def _admit_peer(
        self, spec: TaskSpec, peer_org: str, policy: Policy | None, started: float, claims: Claims
    ) -> AuditEvent:
        """Invoke policy and limits, before any dispatch; returns the `request_received` event.

        A refusal is recorded here; the caller commits the returned event as the task is accepted.
        """
        card = self.agents.card(spec.agent)
        exists = card is not None and card.skill(spec.skill) is not None
        decision = policy.may_invoke(peer_org, spec.agent, spec.skill, claims) if policy else None
        if decision is None or not decision.allowed or not exists:
            # Seen from the peer, a denied invoke and a missing agent are the same answer.
            error = PermissionDenied(
                f"agent skill {spec.agent}.{spec.skill} of {self.org!r} does not exist or is not "
                f"shared with organization {peer_org!r}"
            )
            why = "no agent instance has this skill" if not exists else "no invoke rule allows it"
            await self._record(
                self._event(
                    "invoke_denied",
                    spec,
                    peer_org,
                    direction="inbound",
                    decision="denied",
                    status=error.status.name,
                    duration_ms=(time.monotonic() - started) * 1000,
                    policy_version=policy.version if policy else None,
                    detail=why,
                )
            )
            raise error
        try:
            check_limits(
                spec.input, max_depth=self.limits.max_depth, max_fields=self.limits.max_fields
            )
        except PayloadLimitExceeded as exc:
            await self.audit_rejection(spec, peer_org, exc, started=started)
            raise
        input_digest = digest(spec.input)
        return self._event(
            "request_received",
            spec,
            peer_org,
            direction="inbound",
            decision="allowed",
            status=TaskState.SUBMITTED.value,
            duration_ms=(time.monotonic() - started) * 1000,
            withheld_paths=tuple(p for p, a in spec.input_field_actions if a == "withheld"),
            transformed=tuple((p, a) for p, a in spec.input_field_actions if a != "withheld"),
            digest_before=input_digest,
            digest_after=input_digest,
            policy_version=decision.policy_version,
            detail=_describe_claims(spec),
            payload=spec.input if self.store_payloads else None,
        )

    def _release(
        self,
        spec: TaskSpec,
        peer_org: str,
        policy: Policy | None,
        result: TaskResult,
        started: float,
        running: Running,
    ) -> tuple[TaskResult, AuditEvent]:
        """Filter a final result for a peer and sign its receipt.

        Returns what the peer gets and the event to commit before it does: `result_released`,
        or `failed`/`canceled` with a stable error code and no free text.
        """
        duration = (time.monotonic() - started) * 1000
        if result.state is not TaskState.COMPLETED:
            code = result.error.code if result.error else "skill_error"
            if code not in _PEER_ERROR_MESSAGES and code != "canceled":
                code = "skill_error"
            message = _PEER_ERROR_MESSAGES.get(code, "the task was canceled")
            released = TaskResult(
                spec.task_id, result.state, error=TaskError(code, message), responder_org=self.org
            )
            return released, self._event(
                "canceled" if result.state is TaskState.CANCELED else "failed",
                spec,
                peer_org,
                direction="inbound",
                decision="error",
                status=result.state.value,
                duration_ms=duration,
                detail=code,
            )
        try:
            filtered = self._filter(policy, peer_org, spec, "share", result.output, running.claims)
        except FedgateError as exc:
            refused = TaskResult(
                spec.task_id,
                TaskState.FAILED,
                error=TaskError("policy_refused", _PEER_ERROR_MESSAGES["policy_refused"]),
                responder_org=self.org,
            )
            return refused, self._event(
                "failed",
                spec,
                peer_org,
                direction="inbound",
                decision="denied",
                status=TaskState.FAILED.value,
                duration_ms=duration,
                digest_before=digest(result.output) if isinstance(exc, PermissionDenied) else None,
                detail=f"policy_refused: {exc.message}",
            )
        actions = tuple((p, "withheld") for p in filtered.withheld) + filtered.transformed
        digest_before, released_digest = self._digests(result.output, filtered)
        receipt = sign_receipt(
            self.signer,
            ReceiptBody(
                task_id=spec.task_id,
                responder_org=self.org,
                result_digest=released_digest,
                withheld_paths=filtered.withheld,
                field_actions=filtered.transformed,
                policy_version=filtered.policy_version,
                signed_at_unix_ms=int(time.time() * 1000),
            ),
        ).to_json()
        released = TaskResult(
            spec.task_id,
            TaskState.COMPLETED,
            output=filtered.output,
            field_actions=actions,
            receipt=receipt,
            responder_org=self.org,
            policy_version=filtered.policy_version,
            provenance=result.provenance,
        )
        return released, self._event(
            "result_released",
            spec,
            peer_org,
            direction="inbound",
            decision="partial" if actions else "allowed",
            status=TaskState.COMPLETED.value,
            duration_ms=duration,
            withheld_paths=filtered.withheld,
            transformed=filtered.transformed,
            digest_before=digest_before,
            digest_after=released_digest,
            policy_version=filtered.policy_version,
            receipt=receipt,
            payload=result.output if self.store_payloads else None,
        )
