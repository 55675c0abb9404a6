"""Outbound: a local requester's task for a partner's agent.

The `send` policy filters the input, `request_sent` is committed, the task goes to the peer's
gateway through its circuit breaker, the responder's receipt is verified against what arrived,
and `result_received` is committed before the requester sees anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc

from gateway.audit.store import AuditEvent
from gateway.edges.wire import result_from_pb, spec_to_pb, update_from_pb
from gateway.errors import (
    ERROR_MARKER,
    AuditUnavailable,
    Cancelled,
    DeadlineExceeded,
    FedgateError,
    InvalidArgument,
    NotFound,
    PeerUnreachable,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from gateway.exchange.router_base import (
    REQUESTER_GONE,
    Claims,
    DuplicateTask,
    RouterBase,
    departure,
    error_result,
)
from gateway.exchange.tasks import TaskError, TaskResult, TaskSpec, TaskState, TaskUpdate
from gateway.identity.delegation import issue_delegation
from gateway.identity.signing import SignedReceipt, verify_receipt
from gateway.payload import check_limits, digest

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
# Answers that say the peer itself is not working, as opposed to refusing this one task.
_TRANSPORT_FAILURES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


class OutboundRoutes(RouterBase):
    """The outbound half of the router."""

    def _parent_of(self, spec: TaskSpec) -> Any:
        """The inbound task one of our agents is serving while it makes this call, if any."""
        return self._running.get(spec.parent_task_id) if spec.parent_task_id else None

    def delegation_for(self, spec: TaskSpec) -> str:
        """The signed statement of who asked, for the target organization only, short-lived."""
        return issue_delegation(
            self.signer,
            audience_org=spec.target_org,
            subject=spec.requester or f"{self.org}:unnamed-requester",
            roles=spec.roles,
            purpose=spec.purpose,
            task_id=spec.task_id,
            ttl_seconds=self.delegation_ttl,
        )

    async def _run_remote(
        self, spec: TaskSpec, *, stream: bool = True
    ) -> AsyncIterator[TaskUpdate]:
        started = time.monotonic()
        peer = spec.target_org
        stub = self.peers.stub(peer)  # NotFound for an organization that is not a peer
        policy = self.current_policy()
        parent = self._parent_of(spec)
        # Conditions fail closed on an absent claim, so a request of our own names us as origin.
        claims: Claims = {"origin": (self.org,)}
        if parent is not None:
            # Multi-hop: our agent passes on data that came from parent.origin_org. The deadline
            # travels along, and the send policy can tell such data apart (claim `origin`).
            spec = replace(spec, deadline=min(spec.deadline, parent.spec.deadline))
            claims = {"origin": parent.origin_org}
        try:
            filtered = self._filter(policy, peer, spec, "send", spec.input, claims)
            delegation = self.delegation_for(spec)  # refuses a bad purpose or role
            # Last: from here on every path reports back to the peer's circuit breaker.
            call_started = self.peers.admit(peer)  # fails fast while the peer's circuit is open
        except FedgateError as exc:
            await self.audit_rejection(spec, peer, exc, started=started, direction="outbound")
            raise
        actions = tuple((p, "withheld") for p in filtered.withheld) + filtered.transformed
        digest_before, digest_after = self._digests(spec.input, filtered)
        outbound = replace(
            spec.with_input(filtered.output, actions),
            delegation=delegation,
            purpose="",
            roles=(),
        )
        base = self._event(
            "request_sent",
            spec,
            peer,
            direction="outbound",
            decision="partial" if actions else "allowed",
            status=TaskState.SUBMITTED.value,
            withheld_paths=filtered.withheld,
            transformed=filtered.transformed,
            digest_before=digest_before,
            digest_after=digest_after,
            policy_version=filtered.policy_version,
            payload=spec.input if self.store_payloads else None,
        )
        transport_failure: str | None = None
        accepted = forget = resumable = kept = False
        closing: tuple[str, FedgateError] | None = None  # the record that closes request_sent
        final: TaskResult | None = None
        running = None
        call = None

        async def close(exc: BaseException) -> None:
            kind, why = departure(error_result(spec, exc, peer), REQUESTER_GONE)
            await self._close_record(base, kind, why, started)

        try:
            existing = await self._record_then_accept(
                replace(base, duration_ms=(time.monotonic() - started) * 1000),
                self.org,
                spec,
                remote=True,
                close=close,
            )
            if existing is not None and (existing.result is not None or not existing.remote):
                raise DuplicateTask(existing)
            # New, or an outbound task whose connection broke: send it (again); the peer runs
            # a key once and answers a repeat with its stored result.
            accepted = True
            running = self._start(spec, self.org, remote=True)
            if parent is not None:
                parent.children.add(spec.task_id)
            request = spec_to_pb(outbound, sender_org=self.org)
            timeout = max(0.001, spec.remaining())
            if stream:
                call = stub.StreamTask(request, timeout=timeout)
                updates = self._peer_updates(peer, call)
            else:
                call = stub.SubmitTask(request, timeout=timeout)
                updates = self._peer_result(peer, call)
            async for update in self._wait(spec, running, updates):
                if not update.state.final:
                    yield update
                    continue
                result, event = self._receive(spec, update, started)
                await self._record_then_finish(event, self.org, spec, result)
                kept = True
                if parent is not None and result.receipt is not None:
                    parent.provenance.extend([result.receipt, *result.provenance])
                final = result
                yield TaskUpdate(spec.task_id, result.state, result=result)
                return
            raise Unavailable(f"organization {peer!r} closed the task stream without a result")
        except FedgateError as exc:
            # Decide the outcome before any await: the requester's deadline may cancel us there.
            final = final or error_result(spec, exc, peer)
            if isinstance(exc, PeerUnreachable):
                # The peer may have accepted the task before the connection broke: keep the
                # key open, so a retry resumes it (the peer runs its key once) or GetTask asks.
                transport_failure, resumable = exc.message, True
            elif isinstance(exc, (Unavailable, ResourceExhausted)) and not isinstance(
                exc, AuditUnavailable
            ):
                # The peer refused before running the task: forget the key so a retry runs it.
                forget = True
            if not isinstance(exc, AuditUnavailable):
                closing = ("failed", exc)
            raise
        except BaseException as exc:
            # Cancelled, or closed (GeneratorExit) when our requester went away at a yield:
            # at its deadline (recorded as the deadline, as the stored outcome says) or not.
            final = final or error_result(spec, exc, peer)
            if accepted and not kept:
                closing = departure(final, REQUESTER_GONE)
            raise
        finally:
            self.peers.record(peer, call_started, failure=transport_failure)
            if call is not None:
                call.cancel()
            if parent is not None:
                parent.children.discard(spec.task_id)
            if running is not None:
                # A forgotten or resumable task keeps no outcome: a retry runs or resumes it.
                self._finish(running, None if (resumable or forget) else final)
            if closing is not None:
                await self._close_record(base, *closing, started)
            if accepted and forget:
                await self._forget_task(self.org, spec)
            elif accepted and final is not None and not resumable and not kept:
                await self._finish_task(self.org, spec, final)

    async def _close_record(
        self, sent: AuditEvent, kind: str, exc: FedgateError, started: float
    ) -> None:
        """Best effort: the record that closes a `request_sent` whose task ended without a
        result (a store outage must not hide the error itself)."""
        with contextlib.suppress(Exception):
            await asyncio.shield(
                self.audit.append(
                    replace(
                        sent,
                        kind=kind,
                        decision="error",
                        status=exc.status.name,
                        detail=exc.message,
                        payload=None,
                        duration_ms=(time.monotonic() - started) * 1000,
                    )
                )
            )

    async def _peer_result(self, peer: str, call: Any) -> AsyncIterator[TaskUpdate]:
        """A unary SubmitTask call as a one-update stream."""
        try:
            message = await call
        except grpc.aio.AioRpcError as exc:
            raise self._peer_error(peer, exc) from None
        try:
            result = result_from_pb(message)
        except (ValueError, FedgateError) as exc:
            yield _unreadable(message.task_id, peer, exc)
            return
        yield TaskUpdate(result.task_id, result.state, result=result)

    async def _peer_updates(self, peer: str, call: Any) -> AsyncIterator[TaskUpdate]:
        try:
            async for message in call:
                try:
                    update = update_from_pb(message)
                except (ValueError, FedgateError) as exc:
                    yield _unreadable(message.task_id, peer, exc)
                    return
                yield update
        except grpc.aio.AioRpcError as exc:
            raise self._peer_error(peer, exc) from None

    def _peer_error(self, peer: str, exc: grpc.aio.AioRpcError) -> FedgateError:
        code = exc.code()
        details = exc.details() or code.name
        answered = any(key == ERROR_MARKER for key, _ in (exc.trailing_metadata() or ()))
        if code in _TRANSPORT_FAILURES and not answered:
            return PeerUnreachable(
                f"organization {peer!r} at {self.peers.address(peer)} is unreachable: {details}"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"organization {peer!r} answered: {details}")
        error_type = _STATUS_ERRORS.get(code, Unavailable)
        return error_type(f"organization {peer!r} answered: {details}")

    def _receive(
        self, spec: TaskSpec, update: TaskUpdate, started: float
    ) -> tuple[TaskResult, AuditEvent]:
        """Verify the responder's receipt; returns the result and its `result_received` event."""
        result = update.result or TaskResult(spec.task_id, update.state)
        peer = spec.target_org
        decision, detail = ("allowed" if result.state is TaskState.COMPLETED else "error"), ""
        output_digest: str | None = None
        if result.state is TaskState.COMPLETED:
            try:
                if result.receipt is None:
                    raise Unauthenticated("the result carries no receipt")
                receipt = SignedReceipt.from_json(result.receipt)
                verify_receipt(self.verifier, receipt, expected_org=peer)
                output_digest = digest(result.output)
                if output_digest != receipt.body.result_digest:
                    raise Unauthenticated(
                        f"receipt of task {spec.task_id!r} covers result "
                        f"{receipt.body.result_digest}, but the output received digests to "
                        f"{output_digest}: the result was changed after {peer!r} released it"
                    )
                check_limits(
                    result.output,
                    max_depth=self.limits.max_depth,
                    max_fields=self.limits.max_fields,
                )
            except (FedgateError, ValueError, KeyError, TypeError) as exc:
                decision, output_digest = "receipt_invalid", None
                detail = getattr(exc, "message", str(exc))
                result = TaskResult(
                    spec.task_id,
                    TaskState.FAILED,
                    error=TaskError("receipt_invalid", f"result of {peer!r} refused: {detail}"),
                    responder_org=peer,
                )
        kind = {TaskState.COMPLETED: "result_received", TaskState.CANCELED: "canceled"}.get(
            result.state, "failed"
        )
        event = self._event(
            kind,
            spec,
            peer,
            direction="outbound",
            decision=decision,
            status=result.state.value,
            duration_ms=(time.monotonic() - started) * 1000,
            withheld_paths=tuple(p for p, a in result.field_actions if a == "withheld"),
            transformed=tuple((p, a) for p, a in result.field_actions if a != "withheld"),
            digest_after=output_digest if result.state is TaskState.COMPLETED else None,
            policy_version=result.policy_version or None,
            detail=detail or (result.error.code if result.error else ""),
            receipt=result.receipt,
            payload=result.output if self.store_payloads and result.output else None,
        )
        return replace(result, task_id=spec.task_id, responder_org=peer), event


def _unreadable(task_id: str, peer: str, exc: Exception) -> TaskUpdate:
    """A partner's answer that cannot be read (an unknown state, a non-finite number)."""
    detail = getattr(exc, "message", None) or str(exc)
    return TaskUpdate(
        task_id,
        TaskState.FAILED,
        result=TaskResult(
            task_id,
            TaskState.FAILED,
            error=TaskError("invalid_result", f"the answer of {peer!r} cannot be read: {detail}"),
            responder_org=peer,
        ),
    )
