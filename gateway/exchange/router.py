"""The router: the exchange's public surface, used by the edges (gRPC, A2A).

    submit       a task from a local requester, to a local agent or a partner's (outbound)
    serve_peer   a task from a peer organization, proven by its certificate (inbound)
    get, cancel  a task the asker submitted;  cards_for_peer  what a peer may see
    recover      after a restart: the tasks the table holds open, run or resumed again

Once only: a task is keyed by (origin organization, requester, target, idempotency key or task
id). While a key's task runs, a call with the key follows it; after it ended, the call gets its
stored outcome, as released, under the task's own id (and a peer's repeated request and the
result sent again are recorded). A refusal before a task is accepted is never the key's outcome.

The routes themselves, step by step, are in gateway/exchange/routes.py and steps.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
from fedgate.v1 import fedgate_pb2 as pb

from gateway.audit.store import AuditEvent, AuditStore
from gateway.edges.wire import card_from_pb, result_from_pb
from gateway.errors import (
    DeadlineExceeded,
    FedgateError,
    InvalidArgument,
    NotFound,
    PeerUnreachable,
    PermissionDenied,
    Unavailable,
)
from gateway.exchange.agents import AgentRegistry
from gateway.exchange.execution import Claims, Execution, Executions, NextTurn
from gateway.exchange.routes import Routes
from gateway.exchange.steps import (
    PEER_ERROR_MESSAGES,
    Limits,
    Steps,
    claims_of,
    error_result,
    owned,
)
from gateway.exchange.tasks import (
    AgentCard,
    TaskResult,
    TaskSpec,
    TaskState,
    TaskUpdate,
    new_task_id,
    validate_names,
    validate_task_id,
)
from gateway.identity.signing import Signer, Verifier
from gateway.peers import PeerRegistry
from gateway.policy.engine import Policy, PolicyHolder
from gateway.store.task_table import Finish, TaskRow, TaskTable, task_key

__all__ = ["Limits", "Router", "claims_of"]

log = logging.getLogger("fedgate.router")


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
        limits: Limits | None = None,
        store_payloads: bool = False,
        max_failovers: int = 2,
        finished_capacity: int = 1_000,
        digest_key: bytes = b"",
    ) -> None:
        self.org = org
        self.agents = agents
        self.peers = peers
        self.policy = policy
        self.audit = audit
        self.steps = Steps(
            org=org,
            store=audit,
            agents=agents,
            peers=peers,
            policy=policy,
            signer=signer,
            verifier=verifier,
            limits=limits or Limits(),
            store_payloads=store_payloads,
            max_failovers=max_failovers,
            digest_key=digest_key,
        )
        self.executions = Executions(remember=finished_capacity)
        self.routes = Routes(self.steps)
        self.draining = False

    # ---- collaborators the server rotates or reads ------------------------------------------

    @property
    def tasks(self) -> TaskTable:
        return self.audit.tasks

    @property
    def signer(self) -> Signer:
        return self.steps.signer

    @signer.setter
    def signer(self, signer: Signer) -> None:
        self.steps.signer = signer

    @property
    def verifier(self) -> Verifier:
        return self.steps.verifier

    @property
    def delegation_ttl(self) -> float:
        return self.steps.delegation_ttl

    @delegation_ttl.setter
    def delegation_ttl(self, seconds: float) -> None:
        self.steps.delegation_ttl = seconds

    @property
    def in_flight(self) -> int:
        return len(self.executions)

    async def wait_idle(self, grace: float) -> bool:
        """Wait until no task runs; False if some still run after `grace` seconds."""
        return await self.executions.wait_idle(grace)

    def current_policy(self) -> Policy | None:
        return self.steps.current_policy()

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
        running = self.executions.by_id.get(task_id)
        if running is not None and running.origin_org == origin_org:
            if not owned(running.spec.requester, owner):
                raise unknown
            state = running.state if running.state is not TaskState.SUBMITTED else None
            return TaskResult(task_id, state or TaskState.WORKING)
        recent = self.executions.recent_by_id(task_id)
        if recent is not None and recent[0] == origin_org and owned(recent[1], owner):
            return recent[2]
        row = await self.tasks.by_task_id(origin_org, task_id)
        if row is not None and owned(row.requester, owner):
            if row.result is None and row.remote:
                return await self._ask_peer(row)
            return row.result or TaskResult(task_id, TaskState.WORKING)
        raise unknown

    async def partner_cards(self, peer_org: str, *, within: float = 5.0) -> list[AgentCard]:
        """The agent cards a partner's ListAgents shows us, through its circuit breaker and
        bounded in time: NotFound for an organization that is not a peer, PeerUnreachable (or
        the open circuit's Unavailable) when it does not answer. A card we cannot read is one
        we do not offer."""
        stub = self.peers.stub(peer_org)  # NotFound for an organization that is not a peer
        started = self.peers.admit(peer_org)
        failure: str | None = None
        try:
            reply = await stub.ListAgents(pb.ListAgentsRequest(), timeout=within)
        except grpc.aio.AioRpcError as exc:
            error = self.steps.peer_error(peer_org, exc)
            if isinstance(error, PeerUnreachable):
                failure = error.message
            raise error from None
        finally:
            self.peers.record(peer_org, started, failure=failure)
        cards = []
        for message in reply.agents:
            try:
                cards.append(card_from_pb(message, org=peer_org))
            except (ValueError, FedgateError):
                continue
        return cards

    async def get_for_peer(self, task_id: str, peer_org: str) -> TaskResult:
        """GetTask from a peer: the state of a task it sent us, never its output.

        A result leaves only with its `result_released` record: the peer collects it by asking
        again with the same idempotency key, which answers with the stored result and records
        that it was sent again. Output from GetTask would leave without a record.
        """
        result = await self.get(task_id, origin_org=peer_org)
        if result.state is not TaskState.COMPLETED:
            return replace(result, output={}, field_actions=(), receipt=None, provenance=())
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
        running = self.executions.by_id.get(task_id)
        if (
            running is None
            or running.origin_org != origin_org
            or not owned(running.spec.requester, owner)
        ):
            result = await self.get(task_id, origin_org=origin_org, owner=owner)
            return result.state
        why = reason or "canceled by the requester"
        for child in list(running.children):
            with contextlib.suppress(FedgateError):
                await self.cancel(child, f"parent task {task_id} was canceled", origin_org=self.org)
        if running.remote:
            # Tell the peer first, so it ends and records the task before ours closes.
            with contextlib.suppress(grpc.aio.AioRpcError, FedgateError):
                await self.peers.stub(running.spec.target_org).CancelTask(
                    pb.CancelTaskRequest(task_id=task_id, reason=why),
                    timeout=max(1.0, min(5.0, running.spec.remaining())),
                )
        running.cancel(why)
        return TaskState.CANCELED

    # ---- entry points --------------------------------------------------------------------

    async def submit(self, spec: TaskSpec, *, stream: bool = True) -> AsyncIterator[TaskUpdate]:
        """A task from a local requester, to a local or a partner's agent.

        With stream=False the requester wants only the result: a partner is then asked with
        one unary call instead of a stream of updates.
        """
        spec = self._prepare(spec)
        key = task_key(self.org, spec)
        execution = self.executions.by_key.get(key)
        if spec.turn and execution is None:
            ended = await self._ended_with(key, spec)
            if ended is not None:
                yield await self.routes.answer_retry(spec, ended, None)
                return
        if spec.turn:
            execution = await self._next_local_turn(execution, spec)
        elif execution is None:
            recent = self._recent(key, spec)
            if recent is not None:
                yield await self.routes.answer_retry(spec, recent, None)
                return
            started = time.monotonic()
            if spec.target_org == self.org:
                card = self.agents.known_card(spec.agent)
                if card is None:
                    raise NotFound(
                        f"agent {spec.agent!r} is not connected to the gateway of {self.org!r}"
                    )
                if card.skill(spec.skill) is None:
                    raise NotFound(
                        f"agent {spec.agent!r} of {self.org!r} has no skill {spec.skill!r}"
                    )
                execution = self.executions.start(
                    Execution(spec, self.org, key), lambda x: self.routes.local(x)
                )
            else:
                execution = await self._start_outbound(spec, key, started, stream=stream)
        async for update in execution.follow(states=stream, until=spec.deadline, turn=spec.turn):
            yield update

    async def _ended_with(self, key: tuple[str, str], spec: TaskSpec) -> TaskResult | None:
        """The outcome of the key's task if it ended with the turn `spec` repeats (the last
        turn of a conversation is repeated as any turn is, after the task ended too)."""
        result = self.executions.recent(key)
        if result is None:
            row = await self.tasks.get(*key)
            result = row.result if row is not None else None
        return result if result is not None and result.turn == spec.turn else None

    def _turn_check(self, execution: Execution | None, spec: TaskSpec) -> Execution:
        """The task a next message (spec.turn > 0) continues: it must be waiting for it."""
        if execution is None:
            raise NotFound(
                f"task {spec.task_id!r} is not waiting for a next message on the gateway of "
                f"{self.org!r}: it ended, or it is not known here"
            )
        if spec.turn != execution.turn + 1 or not execution.awaiting_input:
            now = (
                f"waiting for turn {execution.turn + 1}" if execution.awaiting_input else "running"
            )
            raise InvalidArgument(
                f"task {spec.task_id!r} is at turn {execution.turn} ({now}): turn {spec.turn} "
                "cannot start now"
            )
        if execution.pending_turn:
            raise InvalidArgument(
                f"turn {spec.turn} of task {spec.task_id!r} is already being started"
            )
        return execution

    async def _next_local_turn(self, execution: Execution | None, spec: TaskSpec) -> Execution:
        """Our requester's next message for a task waiting for it, local or at a partner."""
        if execution is not None and spec.turn in execution.turn_results:
            return execution  # a repeat of a turn that ended: follow() answers its result
        if execution is not None and spec.turn == execution.turn:
            return execution  # a repeat of the turn that runs: it follows it
        x = self._turn_check(execution, spec)
        # The turn runs within the task's deadline; this call's own (spec.deadline, possibly
        # shorter) bounds only its following in submit. Sent onward, the call's deadline would
        # end the task at the partner's answer DEADLINE_EXCEEDED while the partner goes on.
        spec = replace(spec, deadline=x.spec.deadline)
        x.pending_turn = spec.turn
        try:
            if not x.remote:
                x.continue_with(NextTurn(spec))
                return x
            started = time.monotonic()
            _, claims, spec = self._caller_context(spec)
            outbound, opening, admitted = await self.steps.admit_outbound(spec, claims, started)
        except BaseException:
            x.admission_failed()
            raise
        next_turn = NextTurn(spec, opening, outbound=outbound, started=started, admitted=admitted)
        await self._record_next_turn(x, next_turn)
        return x

    async def _record_next_turn(self, x: Execution, next_turn: NextTurn) -> None:
        """Commit a next message's request record, then hand the message to the route.

        A call that goes away ends its following, not the task: once the record is queued it
        commits whether or not its call still waits, and then the turn runs (a repeat of the
        turn collects its result). If it does not commit, the message was not admitted (and a
        partner's breaker admission taken for it is given back).
        """
        write = asyncio.ensure_future(self.steps.write(None, next_turn.opening, None))

        def settle(done: asyncio.Future[Any]) -> None:
            if done.cancelled() or done.exception() is not None:
                if next_turn.admitted is not None:
                    self.peers.record(next_turn.spec.target_org, next_turn.admitted, failure=None)
                x.admission_failed()
            else:
                x.continue_with(next_turn)

        write.add_done_callback(settle)  # before the caller resumes: it then follows the turn
        await asyncio.shield(write)

    async def _start_outbound(
        self, spec: TaskSpec, key: tuple[str, str], started: float, *, stream: bool
    ) -> Execution:
        try:
            parent, claims, spec = self._caller_context(spec)
        except FedgateError as exc:  # a parent task the caller does not serve: recorded too
            await self.steps.refuse(
                spec, spec.target_org, exc, started=started, direction="outbound"
            )
            raise
        outbound, opening, admitted = await self.steps.admit_outbound(spec, claims, started)
        execution = Execution(spec, self.org, key, remote=True, peer_org=spec.target_org)

        async def route(x: Execution) -> TaskResult:
            return await self.routes.outbound(
                x, outbound, opening, admitted, started, stream=stream, parent=parent
            )

        return self.executions.start(execution, route)

    def _caller_context(self, spec: TaskSpec) -> tuple[Execution | None, Claims, TaskSpec]:
        """Whose data a call onward carries: the `origin` claim of the send policy.

        It comes from the tasks the calling agent actually serves (the instances its token
        subject connected), never from what the call says; a parent task the caller names
        must be one of them. A requester that serves no task sends our own organization's data.
        """
        subject = spec.requester.partition("/")[0]
        parent: Execution | None = None
        if spec.parent_task_id:
            parent = self.executions.by_id.get(spec.parent_task_id)
            if parent is None or parent.remote or not self.agents.serves(subject, parent.task_id):
                raise PermissionDenied(
                    f"task {spec.parent_task_id[:128]!r} is not a task that the caller's agent "
                    "is serving here: a call onward names only the task it serves"
                )
            # The deadline travels along with the data.
            spec = replace(spec, deadline=min(spec.deadline, parent.spec.deadline))
        origins = {
            served.origin_org
            for task_id in self.agents.tasks_served_by(subject)
            if (served := self.executions.by_id.get(task_id)) is not None
        }
        if parent is not None:
            origins.add(parent.origin_org)
        return parent, {"origin": tuple(sorted(origins or {self.org}))}, spec

    async def serve_peer(
        self, spec: TaskSpec, peer_org: str, claims: Claims = None, *, stream: bool = True
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
            await self.steps.refuse(spec, peer_org, exc, started=started)
            raise
        key = task_key(peer_org, spec)
        execution = self.executions.by_key.get(key)
        if spec.turn and execution is None:
            ended = await self._ended_with(key, spec)
            if ended is not None:
                yield await self.routes.answer_retry(spec, ended, peer_org)
                return
        if execution is not None and spec.turn in execution.turn_results:
            # A repeat of a turn that ended: its result again, recorded.
            yield await self.routes.answer_retry(spec, execution.turn_results[spec.turn], peer_org)
            return
        if spec.turn and (execution is None or spec.turn > execution.turn):
            try:
                x = self._turn_check(execution, spec)
            except FedgateError as exc:  # bad input from a peer is recorded as any refusal
                await self.steps.refuse(spec, peer_org, exc, started=started)
                raise
            x.pending_turn = spec.turn
            try:
                policy, opening = await self.steps.admit_inbound(spec, peer_org, claims, started)
            except BaseException:
                x.admission_failed()
                raise
            await self._record_next_turn(x, NextTurn(spec, opening, policy=policy, started=started))
            execution = x
        elif execution is not None:
            # A repeat while the task runs: recorded, and it follows the task.
            await self.steps.write(
                None, self.steps.retry_received(spec, peer_org, execution.task_id), None
            )
        else:
            try:
                recent = self._recent(key, spec)
            except FedgateError as exc:
                await self.steps.refuse(spec, peer_org, exc, started=started)
                raise
            if recent is None and spec.resume:
                row = await self.tasks.get(*key)
                recent = row.result if row is not None else None
                if row is None:
                    # The requesting gateway recorded the request but it never arrived here.
                    unknown = NotFound(
                        f"task {spec.task_id!r} is not known to the gateway of {self.org!r}: "
                        "send it again with its input"
                    )
                    await self.steps.refuse(spec, peer_org, unknown, started=started)
                    raise unknown
            if recent is not None:
                yield await self.routes.answer_retry(spec, recent, peer_org)
                return
            policy, opening = await self.steps.admit_inbound(spec, peer_org, claims, started)
            execution = Execution(spec, peer_org, key, peer_org=peer_org, claims=claims)

            async def route(x: Execution) -> TaskResult:
                return await self.routes.inbound(x, policy, opening, started)

            self.executions.start(execution, route)
        async for update in execution.follow(states=stream, until=spec.deadline, turn=spec.turn):
            result = update.result
            if result is not None and spec.turn in execution.kept and result.state.ends_turn:
                # Recorded as kept, as no call followed when it committed: its release to
                # this call is recorded first.
                await self.steps.write(None, self.steps.sent_again(spec, peer_org, result), None)
            yield update

    def _recent(self, key: tuple[str, str], spec: TaskSpec) -> TaskResult | None:
        """The remembered outcome of the key, if its task ended here recently."""
        recent = self.executions.recent(key)
        if recent is None and spec.task_id in self.executions.by_id:
            raise InvalidArgument(f"task id {spec.task_id!r} is already running under another key")
        return recent

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

    # ---- after a restart -------------------------------------------------------------------

    async def recover(self) -> int:
        """After a restart: run the open tasks again, resume those sent to a partner, or fail
        them with a reason (their opening records get their closing ones)."""
        rows = await self.tasks.unfinished()
        for row in rows:
            spec = row.spec
            if spec is None or spec.remaining() <= 0:
                await self._fail_recovered(row, "gateway_restarted", _RESTART_REASON)
                continue
            key = (row.origin_org, row.key)
            if row.remote:
                self._resume_outbound(row, spec, key)
                continue
            peer_org = None if row.origin_org == self.org else row.origin_org
            claims = claims_of(spec) if peer_org is not None else None
            policy = self.current_policy()
            if peer_org is not None and (
                policy is None
                or not policy.may_invoke(peer_org, spec.agent, spec.skill, claims).allowed
            ):
                # The policy changed while we were down: the task is refused, not run.
                await self._fail_recovered(
                    row, "policy_refused", PEER_ERROR_MESSAGES["policy_refused"]
                )
                continue
            execution = Execution(spec, row.origin_org, key, peer_org=peer_org, claims=claims)
            if peer_org is None:
                self.executions.start(execution, lambda x: self.routes.local(x, recovered=True))
            else:
                self.executions.start(execution, self._recovered_inbound(policy))
        if rows:
            log.info("recovered %d unfinished tasks from the task table", len(rows))
        return len(rows)

    def _recovered_inbound(self, policy: Policy | None):  # type: ignore[no-untyped-def]
        started = time.monotonic()

        async def route(x: Execution) -> TaskResult:
            return await self.routes.inbound(x, policy, None, started)

        return route

    def _resume_outbound(self, row: TaskRow, spec: TaskSpec, key: tuple[str, str]) -> None:
        """A task we had sent before the restart: ask the partner again for its outcome."""
        started = time.monotonic()
        opening = self.steps.event(
            "request_sent", spec, spec.target_org, direction="outbound", decision="allowed"
        )
        resumed = replace(spec, input={}, input_field_actions=(), resume=True, purpose="", roles=())
        execution = Execution(spec, self.org, key, remote=True, peer_org=spec.target_org)

        async def route(x: Execution) -> TaskResult:
            try:
                delegation = self.steps.delegation_for(spec)
            except FedgateError as exc:
                result = error_result(x.task_id, "gateway_restarted", exc.message, self.org)
                await self.steps.write(x, None, Finish(self.org, row.key, result))
                return result
            return await self.routes.outbound(
                x,
                replace(resumed, delegation=delegation),
                opening,
                None,
                started,
                stream=False,
                parent=None,
            )

        self.executions.start(execution, route)

    async def _fail_recovered(self, row: TaskRow, code: str, message: str) -> TaskResult:
        """End a task from the task table with an error instead of running it, closing its
        opening record (request_received or request_sent) with the reason."""
        result = error_result(row.task_id, code, message, self.org)
        target_org, _, agent_skill = row.target.partition("/")
        agent, _, skill = agent_skill.partition(".")
        peer = target_org if row.remote else row.origin_org
        closing = None
        if peer != self.org:
            closing = AuditEvent(
                kind="failed",
                task_id=row.task_id,
                peer_org=peer,
                agent=agent,
                skill=skill,
                requester=row.requester,
                direction="outbound" if row.remote else "inbound",
                decision="error",
                status=TaskState.FAILED.value,
                detail=f"{code}: {message}",
            )
        await self.steps.write(None, closing, Finish(row.origin_org, row.key, result))
        return result

    async def stop_background(self) -> None:
        """Stop every running task (at shutdown): they stay open in the table for recovery."""
        await self.executions.stop()


_RESTART_REASON = "the gateway restarted and the task's deadline has passed"
