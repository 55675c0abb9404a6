"""The named steps of an exchange; gateway/exchange/routes.py composes them into routes.

    admit     before anything is stored: policy (invoke, or send), limits, delegation, breaker;
              a refusal is recorded (bounded) and raised, and it is not the key's outcome
    open      the request's record and the task table's accept, in one transaction
    dispatch  to a local agent instance (waiting for one, failing over), or to a partner
    filter    the share policy on a result for a peer; the receipt is signed
    verify    the partner's receipt over what we received
    close     the result's (or the failure's) record and the task table's finish, in one
              transaction, committed before the result is released to anyone

A value the policy withholds never reaches a log line or an audit record: records keep paths and
digests. An agent's free-text progress notes and error messages stay inside the organization; a
peer sees states and stable error codes only.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import grpc

from gateway.audit.store import AuditEvent, AuditStore, Written
from gateway.edges.wire import result_from_pb, state_from_pb
from gateway.errors import (
    ERROR_MARKER,
    AuditUnavailable,
    Cancelled,
    DeadlineExceeded,
    FedgateError,
    InvalidArgument,
    NotFound,
    PayloadLimitExceeded,
    PeerUnreachable,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from gateway.exchange.agents import AgentRegistry
from gateway.exchange.execution import SHUTDOWN, Claims, Execution
from gateway.exchange.limits import SignedHeadCache
from gateway.exchange.refusals import RefusalLog
from gateway.exchange.tasks import TaskError, TaskResult, TaskSpec, TaskState, TaskUpdate
from gateway.identity.delegation import issue_delegation
from gateway.identity.signing import (
    SignedCheckpoint,
    SignedReceipt,
    Signer,
    Verifier,
    sign_result,
    verify_checkpoint,
    verify_provenance_receipt,
    verify_receipt,
)
from gateway.payload import (
    canonical_bytes,
    check_limits,
    digest,
    files_as_digests,
    keyed_digest,
    sha256_digest,
)
from gateway.peers import PeerRegistry
from gateway.policy.engine import FilterResult, Policy, PolicyHolder
from gateway.store.task_table import Accept, Finish, Forget, TaskOp

log = logging.getLogger("fedgate.exchange")
T = TypeVar("T")

# What a peer is told when one of our agents fails: a stable code, never the agent's own text.
PEER_ERROR_MESSAGES = {
    "agent_disconnected": "the agent instance disconnected mid-task",
    "skill_error": "the agent's skill reported an error",
    "policy_refused": (
        "the result could not be evaluated by the sharing policy and was not released"
    ),
    "gateway_restarted": "the gateway restarted before the task finished",
    "no_agent": "no agent instance was available before the deadline",
    "deadline_exceeded": "the task passed its deadline",
    "canceled": "the task was canceled",
}

# The states whose result carries output: filtered, recorded and signed before it leaves.
_CARRY_OUTPUT = frozenset({TaskState.COMPLETED, TaskState.INPUT_REQUIRED, TaskState.AUTH_REQUIRED})


# The status a closing record names for a task that ended without a result, on both sides of
# an exchange alike: the status of the cause for a deadline or a cancel, else the task's state.
_CLOSING_STATUS = {"deadline_exceeded": "DEADLINE_EXCEEDED", "canceled": "CANCELLED"}

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


@dataclass(frozen=True)
class Limits:
    max_depth: int = 32
    max_fields: int = 10_000


def claims_of(spec: TaskSpec) -> dict[str, str | tuple[str, ...]]:
    """The delegated claims of an inbound task, as the policy sees them (see delegation)."""
    return {"role": spec.roles, "purpose": spec.purpose, "subject": spec.requester}


def owned(requester: str, owner: str | None) -> bool:
    """Whether a task's requester ('subject' or 'subject/name') belongs to `owner` (None: any)."""
    return owner is None or requester.partition("/")[0] == owner


def error_result(task_id: str, code: str, message: str, responder_org: str) -> TaskResult:
    """A task's outcome when it ended without a result: failed, or canceled."""
    state = TaskState.CANCELED if code == "canceled" else TaskState.FAILED
    return TaskResult(task_id, state, error=TaskError(code, message), responder_org=responder_org)


def _describe_claims(spec: TaskSpec) -> str:
    """The delegated claims of who asked, as kept in the audit record."""
    parts = []
    if spec.purpose:
        parts.append(f"purpose={spec.purpose}")
    if spec.roles:
        parts.append("roles=" + ",".join(spec.roles))
    return " ".join(parts)


class Stopped(Exception):
    """The dispatch ended without a result from its agent or partner: `result` says why."""

    def __init__(self, result: TaskResult, error: FedgateError) -> None:
        super().__init__(error.message)
        self.result = result
        self.error = error


class Steps:
    """The steps, with the collaborators they work with (handed in, not inherited)."""

    def __init__(
        self,
        *,
        org: str,
        store: AuditStore,
        agents: AgentRegistry,
        peers: PeerRegistry,
        policy: PolicyHolder | None,
        signer: Signer,
        verifier: Verifier,
        limits: Limits = Limits(),
        store_payloads: bool = False,
        max_failovers: int = 2,
        delegation_ttl: float = 300.0,
        digest_key: bytes = b"",
    ) -> None:
        self.org = org
        self.store = store
        self.agents = agents
        self.peers = peers
        self.policy = policy
        self.signer = signer
        self.verifier = verifier
        self.limits = limits
        self.store_payloads = store_payloads
        self.max_failovers = max_failovers
        self.delegation_ttl = delegation_ttl
        self.refusals = RefusalLog.for_store(store)
        # The local secret of pre-filter digests (data folder, digest.key): a digest of what a
        # policy withheld may go into an export, and must not let anyone confirm a guess.
        self.digest_key = digest_key or secrets.token_bytes(32)
        # Our signed audit head, for every answer without a receipt (re-signed at most 1/s).
        self.own_head = SignedHeadCache(store, lambda: self.signer)

    # ---- shared ----------------------------------------------------------------------------

    def current_policy(self) -> Policy | None:
        return self.policy.current if self.policy is not None else None

    def event(self, kind: str, spec: TaskSpec, peer_org: str, **fields: Any) -> AuditEvent:
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

    async def refuse(
        self,
        spec: TaskSpec,
        peer_org: str,
        exc: FedgateError,
        *,
        started: float,
        kind: str = "rejected",
        direction: str = "inbound",
    ) -> None:
        """Best effort: a refusal is recorded, but a store outage must not hide the refusal.

        Through the store's RefusalLog: names bounded, and a flood sampled per peer and window
        (records that close an exchange, `failed` and `canceled`, are always written).
        """
        await self.refusals.record(
            spec, peer_org, exc, started=started, kind=kind, direction=direction
        )

    async def write(
        self,
        x: Execution | None,
        events: AuditEvent | Sequence[AuditEvent] | None,
        op: TaskOp | None,
    ) -> Written:
        """Commit a step: its records and its task-table write in one transaction.

        A cancel of the execution waits until the write has ended. A store that fails for a
        reason other than an outage fails closed: nothing is released unrecorded.
        """
        if x is None:
            return await self._write(events, op)
        with x.protected():
            return await self._write(events, op)

    async def _write(
        self, events: AuditEvent | Sequence[AuditEvent] | None, op: TaskOp | None
    ) -> Written:
        try:
            return await self.store.write(events, op)
        except (AuditUnavailable, Unavailable):
            raise
        except Exception as exc:  # a store bug must fail closed, not release unaudited data
            log.exception("audit write failed")
            raise AuditUnavailable(
                f"audit store cannot be written: {type(exc).__name__}; exchanges are refused "
                "until it recovers"
            ) from None

    def filter(
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

    def digests(self, original: dict[str, Any], filtered: FilterResult) -> tuple[str, str, bytes]:
        """Digests of a payload before (keyed: it may leave in an export, and must not let
        anyone confirm a guess of what was withheld) and after its filter (plain: the partner
        holds what left), and the canonical bytes of what left. Each payload is encoded once.
        """
        after = canonical_bytes(filtered.output)
        released = sha256_digest(after)
        if not filtered.withheld and not filtered.transformed:
            # Released unchanged (a property test holds the filter to it): what it was before
            # is what the partner holds, so its plain digest tells nobody anything new.
            return released, released, after
        return keyed_digest(self.digest_key, original), released, after

    async def until_done(self, x: Execution, work: Awaitable[T]) -> T:
        """Await `work` (a dispatch) until the task's deadline or a cancel.

        Raises Stopped with the outcome (deadline_exceeded, or canceled with the reason); a
        stop at shutdown propagates, so the task stays open for recovery.
        """
        try:
            async with asyncio.timeout(max(0.0, x.spec.remaining())):
                return await work
        except TimeoutError:
            error: FedgateError = DeadlineExceeded(
                f"task {x.task_id} for {x.spec.target} passed its deadline"
            )
            if x.waiting_for:
                raise self._gave_up_waiting(x) from None
            raise Stopped(
                error_result(x.task_id, "deadline_exceeded", error.message, x.spec.target_org),
                error,
            ) from None
        except asyncio.CancelledError:
            if x.cancel_reason in ("", SHUTDOWN):
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            error = Cancelled(x.cancel_reason)
            raise Stopped(
                error_result(x.task_id, "canceled", x.cancel_reason, x.spec.target_org), error
            ) from None

    # ---- inbound: a peer calls one of our agents --------------------------------------------

    async def admit_inbound(
        self, spec: TaskSpec, peer_org: str, claims: Claims, started: float
    ) -> tuple[Policy | None, AuditEvent]:
        """Invoke policy and limits, before anything is stored; returns the policy snapshot
        and the `request_received` event. A refusal is recorded here and raised."""
        policy = self.current_policy()
        card = self.agents.known_card(spec.agent)
        exists = card is not None and card.skill(spec.skill) is not None
        decision = policy.may_invoke(peer_org, spec.agent, spec.skill, claims) if policy else None
        if decision is None or not decision.allowed or not exists:
            # Seen from the peer, a denied invoke and a missing agent are the same answer.
            error = PermissionDenied(
                f"agent skill {spec.agent}.{spec.skill} of {self.org!r} does not exist or is not "
                f"shared with organization {peer_org!r}"
            )
            why = "no agent instance has this skill" if not exists else "no invoke rule allows it"
            denied = self.event(
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
            if self.refusals.sample(peer_org, denied):  # a flood is counted, not written
                await self.write(None, denied, None)  # fails closed
            raise error
        try:
            check_limits(
                spec.input, max_depth=self.limits.max_depth, max_fields=self.limits.max_fields
            )
        except PayloadLimitExceeded as exc:
            await self.refuse(spec, peer_org, exc, started=started)
            raise
        input_digest = digest(spec.input)
        return policy, self.event(
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
            payload=files_as_digests(spec.input) if self.store_payloads else None,
            turn=spec.turn,
            # The requester's signed statement, with its chain position: what we hold of its log.
            evidence={"delegation": spec.delegation} if spec.delegation else None,
        )

    def retry_received(self, spec: TaskSpec, peer_org: str, original_task_id: str) -> AuditEvent:
        """The record of a repeated request: the task it repeats answers it."""
        input_digest = digest(spec.input)
        return self.event(
            "request_received",
            replace(spec, task_id=original_task_id),
            peer_org,
            direction="inbound",
            decision="allowed",
            status=TaskState.SUBMITTED.value,
            digest_before=input_digest,
            digest_after=input_digest,
            detail=(
                f"retry of task {original_task_id} with the same idempotency key"
                if spec.task_id == original_task_id
                else f"retry of task {original_task_id} with the same idempotency key (sent "
                f"as task id {spec.task_id[:128]})"
            ),
            turn=spec.turn,
        )

    def sent_again(self, spec: TaskSpec, peer_org: str, result: TaskResult) -> AuditEvent:
        """The record of a stored result sent again to a retry."""
        return self.event(
            "result_released",
            replace(spec, task_id=result.task_id),
            peer_org,
            direction="inbound",
            decision="partial" if result.field_actions else "allowed",
            status=result.state.value,
            withheld_paths=tuple(p for p, a in result.field_actions if a == "withheld"),
            transformed=tuple((p, a) for p, a in result.field_actions if a != "withheld"),
            digest_after=digest(result.output),
            policy_version=result.policy_version or None,
            detail="retry: the stored result was sent again",
            receipt=result.receipt,
            turn=result.turn,
        )

    async def dispatch_to_agent(self, x: Execution) -> TaskResult:
        """Hand the task to an instance of its agent and wait for the update ending its turn.

        With no instance connected, the task waits for one (until its deadline): an agent
        restarting is not a refusal. If an instance dies mid-task, the task goes to another
        one, or to the same agent when it reconnects (up to max_failovers times).
        """
        spec = x.spec
        failovers = 0
        x.waiting_for = "no_agent"
        while True:
            if not self.agents.instance_count(spec.agent):
                # Give up a little before the deadline, so the requester hears why.
                margin = min(0.25, 0.1 * max(0.0, spec.remaining()))
                try:
                    await asyncio.wait_for(
                        self.agents.wait_for_instance(spec.agent),
                        max(0.0, spec.remaining() - margin),
                    )
                except TimeoutError:
                    raise self._gave_up_waiting(x) from None
            x.waiting_for = ""
            result = await self._turn_of_agent(x, self.agents.dispatch(spec, x.origin_org))
            error = result.error
            if (
                error is not None
                and error.code == "agent_disconnected"
                and failovers < self.max_failovers
                and spec.remaining() > 0
            ):
                failovers += 1
                log.info("task %s: agent instance died; failing over (%d)", spec.task_id, failovers)
                x.waiting_for = "agent_disconnected"
                continue
            return result

    async def continue_agent(self, x: Execution, spec: TaskSpec) -> TaskResult:
        """The requester's next message, to the instance holding the task; the turn's result."""
        return await self._turn_of_agent(x, self.agents.continue_task(spec, x.origin_org))

    async def _turn_of_agent(self, x: Execution, updates: AsyncIterator[TaskUpdate]) -> TaskResult:
        final: TaskUpdate | None = None
        async for update in updates:
            if not update.state.ends_turn:
                # States only: no output leaves but with a turn's filtered, recorded result;
                # and progress notes are free text written by the agent: they stay inside.
                x.publish(
                    TaskUpdate(
                        x.task_id,
                        update.state,
                        message=update.message if x.peer_org is None else "",
                    )
                )
                continue
            final = update
        assert final is not None
        result = final.result or TaskResult(x.task_id, final.state)
        return replace(
            result,
            task_id=x.task_id,
            state=final.state,
            responder_org=self.org,
            provenance=tuple(x.provenance) if final.state.final else (),
            turn=x.turn,
        )

    def _gave_up_waiting(self, x: Execution) -> Stopped:
        """The deadline came while the task waited for an instance of its agent: the outcome
        says that, not only that time ran out."""
        message = PEER_ERROR_MESSAGES["no_agent"]
        if x.waiting_for == "agent_disconnected":
            message = (
                "the agent instance disconnected mid-task, and no instance took the task over "
                "before its deadline"
            )
        return Stopped(
            error_result(x.task_id, x.waiting_for, message, self.org),
            DeadlineExceeded(f"task {x.task_id} passed its deadline waiting for an agent"),
        )

    def release(
        self, x: Execution, policy: Policy | None, result: TaskResult, started: float
    ) -> tuple[TaskResult, AuditEvent]:
        """Filter a final result for the peer and sign its receipt.

        Returns what the peer gets and the event to commit before it does: `result_released`
        (or `result_kept`, when no call follows the task: it waits for a retry to collect it),
        or `failed`/`canceled` with a stable error code and no free text.
        """
        assert x.peer_org is not None
        spec, peer_org = x.spec, x.peer_org
        duration = (time.monotonic() - started) * 1000
        if result.state not in _CARRY_OUTPUT:
            code = result.error.code if result.error else "skill_error"
            if code not in PEER_ERROR_MESSAGES:
                code = "skill_error"
            released = replace(
                error_result(spec.task_id, code, PEER_ERROR_MESSAGES[code], self.org), turn=x.turn
            )
            return released, self.event(
                "canceled" if released.state is TaskState.CANCELED else "failed",
                spec,
                peer_org,
                direction="inbound",
                decision="error",
                status=_CLOSING_STATUS.get(code, released.state.value),
                duration_ms=duration,
                detail=code if code != "canceled" else f"canceled: {x.cancel_reason[:200]}",
                turn=x.turn,
            )
        try:
            filtered = self.filter(policy, peer_org, spec, "share", result.output, x.claims)
        except FedgateError as exc:
            refused = error_result(
                spec.task_id, "policy_refused", PEER_ERROR_MESSAGES["policy_refused"], self.org
            )
            return refused, self.event(
                "failed",
                spec,
                peer_org,
                direction="inbound",
                decision="denied",
                status=TaskState.FAILED.value,
                duration_ms=duration,
                digest_before=(
                    keyed_digest(self.digest_key, result.output)
                    if isinstance(exc, PermissionDenied)
                    else None
                ),
                detail=f"policy_refused: {exc.message}",
                turn=x.turn,
            )
        actions = tuple((p, "withheld") for p in filtered.withheld) + filtered.transformed
        digest_before, released_digest, encoded = self.digests(result.output, filtered)
        chain_sequence, chain_head = self.store.committed_head
        receipt = sign_result(
            self.signer,
            task_id=spec.task_id,
            encoded_output=encoded,
            withheld_paths=filtered.withheld,
            field_actions=filtered.transformed,
            policy_version=filtered.policy_version,
            state=result.state.value,
            turn=x.turn,
            chain_sequence=chain_sequence,
            chain_head=chain_head,
        ).to_json()  # with its salt: kept in our record, and sent beside the receipt
        released = TaskResult(
            spec.task_id,
            result.state,
            output=filtered.output,
            field_actions=actions,
            receipt=receipt,
            responder_org=self.org,
            policy_version=filtered.policy_version,
            provenance=self._shared_provenance(policy, x, result),
            turn=x.turn,
        )
        return released, self.event(
            "result_released" if x.followed else "result_kept",
            spec,
            peer_org,
            direction="inbound",
            decision="partial" if actions else "allowed",
            status=result.state.value,
            duration_ms=duration,
            withheld_paths=filtered.withheld,
            transformed=filtered.transformed,
            digest_before=digest_before,
            digest_after=released_digest,
            policy_version=filtered.policy_version,
            receipt=receipt,
            payload=files_as_digests(result.output) if self.store_payloads else None,
            detail="" if x.followed else "kept for collection: no call was following the task",
            turn=x.turn,
        )

    def _shared_provenance(
        self, policy: Policy | None, x: Execution, result: TaskResult
    ) -> tuple[dict[str, Any], ...]:
        """Receipts of the organizations our agent consulted: only if a share rule lets them
        go to this peer (default: nothing about sub-tasks leaves)."""
        if not result.provenance or policy is None or x.peer_org is None:
            return ()
        decision = policy.may_share_provenance(x.peer_org, x.spec.agent, x.spec.skill, x.claims)
        return result.provenance if decision.allowed else ()

    # ---- outbound: our requester calls a partner's agent -----------------------------------

    def delegation_for(self, spec: TaskSpec) -> str:
        """The signed statement of who asked, for the target organization only, short-lived."""
        chain_sequence, chain_head = self.store.committed_head
        return issue_delegation(
            self.signer,
            audience_org=spec.target_org,
            subject=spec.requester or f"{self.org}:unnamed-requester",
            roles=spec.roles,
            purpose=spec.purpose,
            task_id=spec.task_id,
            ttl_seconds=self.delegation_ttl,
            chain_sequence=chain_sequence,  # a signed lower bound of our log, for the partner
            chain_head=chain_head,
        )

    async def admit_outbound(
        self, spec: TaskSpec, claims: Claims, started: float
    ) -> tuple[TaskSpec, AuditEvent, float]:
        """The send policy, the delegation statement and the breaker, before anything is
        stored; returns what goes to the peer, the `request_sent` event, and the breaker's
        admission (hand it to send_to_peer, or give it back with `peers.record`)."""
        peer = spec.target_org
        try:
            self.peers.stub(peer)  # NotFound for an organization that is not a peer
            policy = self.current_policy()
            filtered = self.filter(policy, peer, spec, "send", spec.input, claims)
            delegation = self.delegation_for(spec)  # refuses a bad purpose or role
            # Last: from here on every path reports back to the peer's circuit breaker.
            admitted = self.peers.admit(peer)  # fails fast while the peer's circuit is open
        except FedgateError as exc:
            await self.refuse(spec, peer, exc, started=started, direction="outbound")
            raise
        actions = tuple((p, "withheld") for p in filtered.withheld) + filtered.transformed
        outbound = replace(
            spec.with_input(filtered.output, actions),
            delegation=delegation,
            purpose="",
            roles=(),
        )
        return outbound, self._sent_event(spec, peer, filtered, actions, started), admitted

    def _sent_event(
        self,
        spec: TaskSpec,
        peer: str,
        filtered: FilterResult,
        actions: tuple[tuple[str, str], ...],
        started: float,
    ) -> AuditEvent:
        digest_before, digest_after, _ = self.digests(spec.input, filtered)
        return self.event(
            "request_sent",
            spec,
            peer,
            direction="outbound",
            decision="partial" if actions else "allowed",
            status=TaskState.SUBMITTED.value,
            duration_ms=(time.monotonic() - started) * 1000,
            withheld_paths=filtered.withheld,
            transformed=filtered.transformed,
            digest_before=digest_before,
            digest_after=digest_after,
            policy_version=filtered.policy_version,
            payload=files_as_digests(spec.input) if self.store_payloads else None,
            turn=spec.turn,
        )

    async def send_to_peer(
        self, x: Execution, request: Any, *, stream: bool, admitted: float | None
    ) -> TaskUpdate:
        """Send the task to the partner's gateway; the final update it answers with.

        Non-final updates carry states only (a partner cannot push output through them). The
        breaker hears of every transport failure and success; `admitted` is the breaker's
        admission of this call, if admit_outbound just took it.
        """
        peer = x.spec.target_org
        if admitted is not None:
            call_started = admitted
        else:
            try:
                call_started = self.peers.admit(peer)
            except Unavailable as exc:  # the circuit is open: as good as out of reach
                raise PeerUnreachable(exc.message) from None
        stub = self.peers.stub(peer)
        failure: str | None = None
        call = None
        try:
            timeout = max(0.001, x.spec.remaining())
            if not stream:
                call = stub.SubmitTask(request, timeout=timeout)
                message = await call
                return _final_from_pb(message.task_id, peer, message, result_message=True)
            call = stub.StreamTask(request, timeout=timeout)
            async for message in call:
                update = _final_from_pb(message.task_id, peer, message, result_message=False)
                if update.state.ends_turn:
                    return update
                x.publish(TaskUpdate(x.task_id, update.state))
            raise Unavailable(f"organization {peer!r} closed the task stream without a result")
        except grpc.aio.AioRpcError as exc:
            error = self.peer_error(peer, exc)
            if isinstance(error, PeerUnreachable):
                failure = error.message
            raise error from None
        finally:
            self.peers.record(peer, call_started, failure=failure)
            if call is not None:
                call.cancel()

    def peer_error(self, peer: str, exc: grpc.aio.AioRpcError) -> FedgateError:
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

    def receive(
        self, x: Execution, update: TaskUpdate, started: float
    ) -> tuple[TaskResult, AuditEvent]:
        """Verify the responder's receipt; returns the result and its `result_received` event."""
        spec = x.spec
        result = update.result or TaskResult(spec.task_id, update.state)
        if result.state not in _CARRY_OUTPUT and result.output:
            # Only a verified receipt lets a partner's output in, and a failed or canceled
            # answer has none to verify: whatever output it holds is not taken.
            result = replace(result, output={})
        peer = spec.target_org
        decision, detail = ("allowed" if result.state in _CARRY_OUTPUT else "error"), ""
        output_digest: str | None = None
        evidence: dict[str, Any] | None = None
        if result.state in _CARRY_OUTPUT:
            try:
                if result.receipt is None:
                    raise Unauthenticated("the result carries no receipt")
                receipt = SignedReceipt.from_json(result.receipt)
                encoded = canonical_bytes(result.output)  # once: the commitment and the digest
                # Signer (valid now), task, turn, state, and the output it commits to.
                verify_receipt(
                    self.verifier,
                    receipt,
                    expected_org=peer,
                    released_output=result.output,
                    encoded_output=encoded,
                    task_id=spec.task_id,
                    turn=x.turn,
                    state=result.state.value,
                )
                for entry in result.provenance:
                    # Who signed each sub-task's receipt, for which task (not its content:
                    # its salt stays with the requester that consulted them).
                    verify_provenance_receipt(self.verifier, SignedReceipt.from_json(entry))
                output_digest = sha256_digest(encoded)
                check_limits(
                    result.output,
                    max_depth=self.limits.max_depth,
                    max_fields=self.limits.max_fields,
                )
            except (FedgateError, ValueError, KeyError, TypeError) as exc:
                decision, output_digest = "receipt_invalid", None
                detail = getattr(exc, "message", str(exc))
                result = error_result(
                    spec.task_id, "receipt_invalid", f"result of {peer!r} refused: {detail}", peer
                )
        elif result.checkpoint is not None:
            evidence = self._checkpoint_evidence(peer, result.checkpoint)
        kind = "result_received" if result.state in _CARRY_OUTPUT else "failed"
        if result.state is TaskState.CANCELED:
            kind = "canceled"
        event = self.event(
            kind,
            spec,
            peer,
            direction="outbound",
            decision=decision,
            status=result.state.value,
            duration_ms=(time.monotonic() - started) * 1000,
            withheld_paths=tuple(p for p, a in result.field_actions if a == "withheld"),
            transformed=tuple((p, a) for p, a in result.field_actions if a != "withheld"),
            digest_after=output_digest if result.state in _CARRY_OUTPUT else None,
            policy_version=result.policy_version or None,
            detail=detail or (result.error.code if result.error else ""),
            receipt=result.receipt,
            payload=(
                files_as_digests(result.output) if self.store_payloads and result.output else None
            ),
            turn=x.turn,
            evidence=evidence,
        )
        return replace(result, task_id=spec.task_id, responder_org=peer, turn=x.turn), event

    async def with_head(self, x: Execution, result: TaskResult) -> TaskResult:
        """An answer without a receipt (failed, canceled) carries our signed audit head: the
        partner always holds a signed lower bound of our log. Best effort: a store that cannot
        sign one now does not hold the answer back, nor does a cancel that came while the
        answer's record committed (it takes effect here, and the task has ended)."""
        if result.receipt is not None:
            return result
        try:
            head = await self.own_head.current()
        except FedgateError as exc:
            log.warning("no signed head for the answer of task %s: %s", result.task_id, exc.message)
            return result
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if x.cancel_reason in ("", SHUTDOWN) or task is None:
                raise
            task.uncancel()
            return result
        return replace(result, checkpoint=head.to_json())

    def _checkpoint_evidence(self, peer: str, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
        """A partner's signed head that came with an answer without a receipt, kept as
        evidence of its log if it verifies as that partner's (else not kept)."""
        try:
            signed = SignedCheckpoint.from_json(checkpoint)
            verify_checkpoint(self.verifier, signed, expected_org=peer)
        except (FedgateError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "organization %s answered with a checkpoint that does not verify (%s); not kept",
                peer,
                getattr(exc, "message", type(exc).__name__),
            )
            return None
        return {"checkpoint": signed.to_json()}

    def closing(
        self,
        opening: AuditEvent,
        kind: str,
        error: FedgateError,
        started: float,
        *,
        code: str | None = None,
    ) -> AuditEvent:
        """The record that closes an opening record whose task ended without a result."""
        return replace(
            opening,
            kind=kind,
            decision="error",
            status=error.status.name,
            detail=(f"{code}: " if code else "") + error.message[:1000],
            payload=None,
            withheld_paths=(),
            transformed=(),
            digest_before=None,
            digest_after=None,
            duration_ms=(time.monotonic() - started) * 1000,
        )

    def accept(self, x: Execution) -> Accept:
        return Accept(x.origin_org, x.spec, x.remote)

    def finish(self, x: Execution, result: TaskResult) -> Finish:
        return Finish(x.origin_org, x.key[1], result)

    def forget(self, x: Execution) -> Forget:
        return Forget(x.origin_org, x.key[1])


def _final_from_pb(task_id: str, peer: str, message: Any, *, result_message: bool) -> TaskUpdate:
    """A partner's answer (a TaskResult, or a TaskUpdate of a stream) as an update; one that
    cannot be read fails the task. A non-final update keeps its state and nothing else."""
    try:
        if result_message:
            result = result_from_pb(message)
            if not result.state.ends_turn:  # a unary answer is the one that ends the turn
                raise InvalidArgument(f"a result in state {result.state.value} ends no turn")
            return TaskUpdate(result.task_id, result.state, result=result)
        state = state_from_pb(message.state)
        if not state.ends_turn:
            return TaskUpdate(message.task_id, state)
        if not message.HasField("result"):
            return TaskUpdate(message.task_id, state)
        result = result_from_pb(message.result)
        return TaskUpdate(message.task_id, state, result=result)
    except (ValueError, FedgateError) as exc:
        detail = getattr(exc, "message", None) or str(exc)
        return TaskUpdate(
            task_id,
            TaskState.FAILED,
            result=error_result(
                task_id, "invalid_result", f"the answer of {peer!r} cannot be read: {detail}", peer
            ),
        )


__all__ = [
    "PEER_ERROR_MESSAGES",
    "Limits",
    "Steps",
    "Stopped",
    "claims_of",
    "error_result",
    "owned",
]
