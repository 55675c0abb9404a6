"""The three routes of an exchange, each a short pipeline of the steps in gateway/exchange/steps.py.

    local     our requester, our agent:   open · dispatch · close
    inbound   a peer, our agent:          (admitted) open · dispatch · filter+sign · close · release
    outbound  our requester, a partner:   (admitted) open · send · verify · close · release

Admission (policy, limits, delegation, breaker) runs before a route starts, in the call that
asked (gateway/exchange/router.py): a refusal there is the call's answer, and never the key's
stored outcome. A route runs in its own task (gateway/exchange/execution.py) from its opening
record to its closing one; each record commits with its task-table write in one transaction,
before anything is released.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from typing import Any

from gateway.audit.store import AuditEvent
from gateway.edges.wire import spec_to_pb
from gateway.errors import (
    AuditUnavailable,
    Cancelled,
    DeadlineExceeded,
    FedgateError,
    Unavailable,
)
from gateway.exchange.execution import Execution, NextTurn
from gateway.exchange.steps import _CARRY_OUTPUT, Steps, Stopped, error_result
from gateway.exchange.tasks import TaskResult, TaskSpec, TaskState, TaskUpdate
from gateway.identity.signing import without_salt
from gateway.policy.engine import Policy
from gateway.store.task_table import TaskOp, TaskRow

log = logging.getLogger("fedgate.exchange")

# A closing write that fails is tried again this often, until the task's deadline and
# this long after it: the store recovering by itself lets the result go out after all.
_CLOSE_RETRY_SECONDS = 0.5
_CLOSE_GRACE_SECONDS = 5.0
# A partner out of reach is asked again with this backoff (doubling), until the deadline.
_RESEND_FIRST_SECONDS = 0.2
_RESEND_MAX_SECONDS = 2.0


class Routes:
    """The routes of one gateway, over its steps and its executions."""

    def __init__(self, steps: Steps) -> None:
        self.steps = steps

    # ---- local: our requester calls our agent ----------------------------------------------

    async def local(self, x: Execution, *, recovered: bool = False) -> TaskResult:
        s = self.steps
        if not recovered:
            written = await s.write(x, None, s.accept(x))
            if written.existing is not None:
                return await self.answer_existing(x, written.existing)
        work = s.dispatch_to_agent(x)
        while True:
            result = await self._dispatch(x, work)
            await self._close(x, None, s.finish(x, result))
            if result.state.final:
                return result
            next_turn = await self._next_turn(x, result)
            if isinstance(next_turn, TaskResult):
                await self._close(x, None, s.finish(x, next_turn))
                return next_turn
            work = s.continue_agent(x, next_turn.spec)

    # ---- inbound: a peer calls our agent ---------------------------------------------------

    async def inbound(
        self,
        x: Execution,
        policy: Policy | None,
        opening: AuditEvent | None,
        started: float,
    ) -> TaskResult:
        """`opening` is the request_received record (None for a task recovered after a
        restart: its record is in the log already)."""
        s = self.steps
        if opening is not None:
            written = await s.write(x, opening, s.accept(x))
            if written.existing is not None:
                return await self.answer_existing(x, written.existing)
        work = s.dispatch_to_agent(x)
        while True:
            result = await self._dispatch(x, work)
            released, event = s.release(x, policy, result, started)
            await self._close(x, event, s.finish(x, released))
            if released.state.final:
                return await s.with_head(x, released)
            next_turn = await self._next_turn(x, released)
            if isinstance(next_turn, TaskResult):  # its deadline, or a cancel, came first
                ended, event = s.release(x, policy, next_turn, started)
                await self._close(x, event, s.finish(x, ended))
                return await s.with_head(x, ended)
            policy, started = next_turn.policy, next_turn.started
            work = s.continue_agent(x, next_turn.spec)

    async def _dispatch(self, x: Execution, work: Awaitable[TaskResult]) -> TaskResult:
        s = self.steps
        try:
            return await s.until_done(x, work)
        except Stopped as stopped:
            return replace(stopped.result, turn=x.turn)
        except FedgateError as exc:
            failed = error_result(x.task_id, exc.status.name.lower(), exc.message, s.org)
        except Exception as exc:  # a bug below (an agent backend's): the task fails, closed
            log.exception("task %s: its dispatch failed inside the gateway", x.task_id)
            message = f"the gateway failed while running the task: {type(exc).__name__}"
            failed = error_result(x.task_id, "internal", message, s.org)
        return replace(failed, turn=x.turn)  # the turn it failed in, as its record says

    async def _next_turn(
        self, x: Execution, ended: TaskResult | None = None
    ) -> NextTurn | TaskResult:
        """Between turns: wait for the requester's next message (its call has recorded it),
        until the task's deadline or a cancel, which end the task (the outcome returned)."""
        x.end_turn(ended or x.turn_results.get(x.turn) or TaskResult(x.task_id, x.state))
        try:
            next_turn = await self.steps.until_done(x, x.next_turns.get())
        except Stopped as stopped:
            late = await x.admitted_meanwhile()
            if late is not None:
                # Its request is recorded (and for a partner, admitted by the breaker): the
                # stop ends that turn, which never runs, so the closing record names it.
                x.start_turn(late.spec.turn)
                if late.admitted is not None:
                    self.steps.peers.record(x.spec.target_org, late.admitted, failure=None)
            if not x.remote:
                self.steps.agents.end(x.task_id, stopped.error.message)
            return replace(stopped.result, turn=x.turn)
        x.start_turn(next_turn.spec.turn)
        return next_turn

    # ---- outbound: our requester calls a partner's agent ----------------------------------

    async def outbound(
        self,
        x: Execution,
        outbound: TaskSpec,
        opening: AuditEvent,
        admitted: float | None,
        started: float,
        *,
        stream: bool,
        parent: Execution | None,
    ) -> TaskResult:
        """Send `outbound` (the filtered request) to the partner; `opening` is request_sent
        (its copy from the table for a task resumed after a restart: then `admitted` is None
        and `outbound` carries no input, only `resume`)."""
        s = self.steps
        peer = x.spec.target_org
        if not outbound.resume:
            try:
                written = await s.write(x, opening, s.accept(x))
            except BaseException:
                if admitted is not None:
                    s.peers.record(peer, admitted, failure=None)  # give the admission back
                raise
            existing = written.existing
            if existing is not None and (existing.result is not None or not existing.remote):
                if admitted is not None:
                    s.peers.record(peer, admitted, failure=None)
                return await self.answer_existing(x, existing)
            # New, or sent before a restart and asked again: send it; the partner runs a key
            # once and answers a repeat with its stored result.
        if parent is not None:
            parent.children.add(x.task_id)
        try:
            while True:
                result = await self._outbound_turn(x, outbound, opening, admitted, started, stream)
                if result.state.final:
                    break
                next_turn = await self._next_turn(x, result)
                if isinstance(next_turn, TaskResult):  # its deadline, or a cancel, came first
                    error = (
                        Cancelled(x.cancel_reason)
                        if next_turn.state is TaskState.CANCELED
                        else DeadlineExceeded(f"task {x.task_id} passed its deadline")
                    )
                    closing = self._ended(opening, next_turn, error, started)
                    closing = replace(closing, turn=x.turn)  # a turn admitted as it stopped
                    await self._close(x, closing, s.finish(x, next_turn))
                    return next_turn
                assert next_turn.outbound is not None
                outbound, opening, started = (
                    next_turn.outbound,
                    next_turn.opening,
                    next_turn.started,
                )
                admitted = next_turn.admitted
        finally:
            if parent is not None:
                parent.children.discard(x.task_id)
        if parent is not None and result.receipt is not None:
            # Without its salt: a provenance receipt never lets anyone check a guess.
            parent.provenance.extend([without_salt(result.receipt), *result.provenance])
        return result

    async def _outbound_turn(
        self,
        x: Execution,
        outbound: TaskSpec,
        opening: AuditEvent,
        admitted: float | None,
        started: float,
        stream: bool,
    ) -> TaskResult:
        """One turn with the partner: send, verify its answer, close the turn's records."""
        s = self.steps
        peer = x.spec.target_org
        request = spec_to_pb(outbound, sender_org=s.org)
        closing: AuditEvent
        op: TaskOp
        try:
            update = await s.until_done(x, self._send(x, request, stream, admitted))
            result, closing = s.receive(x, update, started)
            op = s.finish(x, result)
        except Stopped as stopped:
            # The deadline, or an explicit cancel (the partner was told first).
            result = stopped.result
            closing, op = self._ended(opening, result, stopped.error, started), s.finish(x, result)
        except (DeadlineExceeded, Cancelled) as exc:
            # The partner ended the task: its deadline, or a cancel there.
            code = "deadline_exceeded" if isinstance(exc, DeadlineExceeded) else "canceled"
            result = error_result(x.task_id, code, exc.message, peer)
            closing, op = self._ended(opening, result, exc, started), s.finish(x, result)
        except FedgateError as exc:
            # The partner refused before running the task: nothing is the key's outcome, so
            # the key is given back and a retry runs the task. (A later turn refused ends it.)
            closing = s.closing(opening, "failed", exc, started)
            if x.turn == 0:
                await self._close(x, closing, s.forget(x))
                raise
            result = error_result(x.task_id, exc.status.name.lower(), exc.message, peer)
            op = s.finish(x, result)
        await self._close(x, closing, op)
        return result

    def _ended(
        self, opening: AuditEvent, result: TaskResult, error: FedgateError, started: float
    ) -> AuditEvent:
        """The record that closes a request whose task ended without a result (deadline,
        cancel): canceled or failed, naming the stable code."""
        kind = "canceled" if result.state is TaskState.CANCELED else "failed"
        code = result.error.code if result.error is not None else None
        return self.steps.closing(opening, kind, error, started, code=code)

    async def _send(
        self, x: Execution, request: Any, stream: bool, admitted: float | None
    ) -> TaskUpdate:
        """Send until the partner answers; a partner out of reach is asked again (it runs a
        key once) until the deadline, while the calls following the task hear UNAVAILABLE."""
        delay = _RESEND_FIRST_SECONDS
        while True:
            try:
                return await self.steps.send_to_peer(x, request, stream=stream, admitted=admitted)
            except Unavailable as exc:
                # Out of reach, our breaker open, or the partner answered that it cannot take
                # or record the task right now (it may be running it already): ask again.
                x.fail_followers(exc)
                error: FedgateError = exc
            admitted = None
            log.info("task %s: %s; asking again in %.1fs", x.task_id, error.message, delay)
            await asyncio.sleep(delay)
            delay = min(_RESEND_MAX_SECONDS, delay * 2)
            # Each attempt carries a fresh statement of who asked: a used one is a replay.
            request.delegation = self.steps.delegation_for(x.spec)

    # ---- shared ----------------------------------------------------------------------------

    async def answer_existing(self, x: Execution, row: TaskRow) -> TaskResult:
        """The task table already held the key (before a restart, or on another replica)."""
        if row.result is None:
            raise Unavailable(
                f"task {row.task_id!r} was interrupted by a restart of {self.steps.org!r} and "
                "is being recovered: ask for it again later"
            )
        # A repeat is recorded for a peer that asked us; our own requester's repeat of a task
        # sent to a partner is no exchange with it (as when a recent outcome answers it).
        await self.answer_retry(x.spec, row.result, None if x.remote else x.peer_org)
        return row.result

    async def answer_retry(
        self, spec: TaskSpec, result: TaskResult, peer_org: str | None
    ) -> TaskUpdate:
        """The stored outcome of a task, for a retry with its key; for a peer, the repeated
        request and the result sent again are recorded first, under the task's own id."""
        s = self.steps
        if peer_org is not None:
            events: list[AuditEvent] = [s.retry_received(spec, peer_org, result.task_id)]
            if result.state in _CARRY_OUTPUT:  # an input-required turn's question too
                events.append(s.sent_again(spec, peer_org, result))
            await s.write(None, events, None)
        return TaskUpdate(result.task_id, result.state, result=result)

    async def _close(self, x: Execution, event: AuditEvent | None, op: TaskOp) -> None:
        """Commit the closing record and the task's final row, before anything is released.

        If the store cannot be written, the calls following the task hear UNAVAILABLE at once;
        the write is tried again until the deadline (and a grace), so the result goes out when
        the store is back, to a retry with the key. A result waiting here is not released.
        """
        s = self.steps
        loop = asyncio.get_running_loop()
        give_up = loop.time() + max(0.0, x.spec.remaining()) + _CLOSE_GRACE_SECONDS
        while True:
            events: Sequence[AuditEvent] | None = None
            if event is not None:
                events = (_as_followed(event, x.followed),)
            try:
                await s.write(x, events, op)
                if events and events[0].kind == "result_kept":
                    x.kept.add(x.turn)
                return
            except (AuditUnavailable, Unavailable) as exc:
                if loop.time() >= give_up:
                    raise
                x.fail_followers(exc)
                try:
                    await asyncio.sleep(_CLOSE_RETRY_SECONDS)
                except asyncio.CancelledError:
                    if x.stopping or not x.cancel_reason:
                        raise  # at shutdown the task stays open, recovered after the restart
                    # The turn ended before the cancel came: its record goes in first.
                    x.postpone_cancel()


def _as_followed(event: AuditEvent, followed: bool) -> AuditEvent:
    """A result that nobody follows right now is kept for collection, not released."""
    if event.kind == "result_released" and not followed:
        return replace(
            event, kind="result_kept", detail="kept for collection: no call was following the task"
        )
    if event.kind == "result_kept" and followed:
        return replace(event, kind="result_released", detail="")
    return event


__all__ = ["Routes"]
