"""The federation service: gateway to gateway, over mutual TLS.

The caller is the organization its certificate names, nothing else (guarantee 1). Before anything
else every call passes two gates, so that no partner can make the gateway spend without bound:

* a caller whose certificate names a federation member that is not our peer is refused
  (PERMISSION_DENIED) under a rate kept per certificate fingerprint; past it, RESOURCE_EXHAUSTED;
* a peer's every call spends one unit of its rate (a task also holds one of its concurrency
  slots): ListAgents, SubmitTask, StreamTask, CancelTask, GetTask and ExchangeCheckpoint alike.

Refusals are recorded through the RefusalLog (sampled per source and window, so a flood costs
bounded storage and still shows). ExchangeCheckpoint validates the peer's head, keeps it at most
once per interval (PeerCheckpoints) and answers with our cached signed head (SignedHeadCache).

What a peer is told of our own failures is stable text (`public_error`): a store's error can name
internal hosts, so its detail goes to our log only. A result that leaves carries output only with
the receipt that signs it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.config import GatewayConfig
from gateway.edges.rpc import (
    ServicerBase,
    check_decoded,
    maps_errors,
    maps_stream_errors,
    refused_spec,
    result_of,
)
from gateway.edges.wire import (
    MAX_TEXT_CHARS,
    card_to_pb,
    check_text,
    checkpoint_from_pb,
    checkpoint_to_pb,
    result_to_pb,
    signed_output_only,
    state_to_pb,
    update_to_pb,
)
from gateway.errors import (
    AuditUnavailable,
    FedgateError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from gateway.exchange.limits import PeerCheckpoints, PeerLimiter, SignedHeadCache
from gateway.exchange.refusals import RefusalLog
from gateway.exchange.router import Router
from gateway.exchange.tasks import TaskError, TaskSpec, TaskUpdate, validate_task_id
from gateway.identity.delegation import Delegation, DelegationVerifier
from gateway.identity.signing import now_unix_ms
from gateway.identity.tls import ReloadingTls, peer_identity

log = logging.getLogger("fedgate.servicers")

# Calls of a federation member that is not a peer: refused, at this rate per certificate.
STRANGER_RATE_PER_SECOND = 1.0
STRANGER_BURST = 10
# How often a peer's signed audit head is kept (more often, the latest is held in memory).
PEER_CHECKPOINT_INTERVAL_SECONDS = 60.0
# How far ahead of our clock a peer may date its checkpoint.
CHECKPOINT_CLOCK_SKEW_MS = 5 * 60 * 1000
# Error codes of a result whose message is ours, about our own state: peers get stable text.
_INTERNAL_CODES = {"unavailable", "internal", "unknown"}


def _fingerprint(context: grpc.aio.ServicerContext) -> str:
    """The SHA-256 fingerprint of the caller's certificate (as grpc gives it), for limits."""
    pems = context.auth_context().get("x509_pem_cert") or [b""]
    return "sha256:" + hashlib.sha256(bytes(pems[0])).hexdigest()


def _stranger(fingerprint: str) -> str:
    return f"the certificate {fingerprint[:23]}…"


class FederationServicer(ServicerBase, pb_grpc.FederationServicer):
    """Gateway to gateway. The caller is the organization its certificate names, nothing else."""

    def __init__(
        self,
        config: GatewayConfig,
        router: Router,
        tls: ReloadingTls,
        limiter: PeerLimiter,
        delegations: DelegationVerifier,
        *,
        refusals: RefusalLog | None = None,
        strangers: PeerLimiter | None = None,
        checkpoints: PeerCheckpoints | None = None,
        own_head: SignedHeadCache | None = None,
    ) -> None:
        super().__init__(config, router)
        self.tls = tls
        self.limiter = limiter
        self.delegations = delegations
        self.refusals = refusals or RefusalLog.for_store(router.audit)
        self.strangers = strangers or PeerLimiter(
            rate_per_second=STRANGER_RATE_PER_SECOND,
            burst=STRANGER_BURST,
            max_concurrent=1,
            describe=_stranger,
        )
        self.checkpoints = checkpoints or PeerCheckpoints(
            router.audit, store_interval=PEER_CHECKPOINT_INTERVAL_SECONDS
        )
        self.own_head = own_head or SignedHeadCache(router.audit, lambda: self.router.signer)

    # ---- the gates ----

    async def _peer(self, context: grpc.aio.ServicerContext, request: Any = None) -> str:
        """The calling peer organization, proven by its certificate; any other caller is refused
        and recorded, at most at the per-certificate rate (past it, RESOURCE_EXHAUSTED)."""
        started = time.monotonic()
        error: FedgateError
        org = "-"
        try:
            org = peer_identity(context, self.tls.material.revoked_serials)
        except FedgateError as exc:
            # A revoked or inconsistent certificate: the organization it names is in the
            # message; it is not proven, so the record's peer is "-".
            error = exc
        else:
            if org in self.router.peers:
                claimed = getattr(request, "sender_org", "")
                if isinstance(claimed, str) and claimed and claimed != org:
                    log.warning(
                        "a request from %s claimed sender %r in its body; ignored",
                        org,
                        claimed[:64],
                    )
                return org
            error = PermissionDenied(
                f"organization {org!r} is not a peer of {self.router.org!r}: the operator must add "
                f"it under [peers.{org}] in fedgate.toml"
            )
        fingerprint = _fingerprint(context)  # only a stranger is counted by certificate
        try:
            self.strangers.spend(fingerprint)
        except FedgateError as exhausted:
            error = exhausted
        await self.refusals.record(
            refused_spec(request), org, error, started=started, source=fingerprint
        )
        raise error

    async def _spend(self, org: str, request: Any, started: float) -> None:
        """One unit of the peer's rate for a call that is not a task."""
        try:
            self.limiter.spend(org)
        except FedgateError as exc:
            await self.refusals.record(refused_spec(request), org, exc, started=started)
            raise

    async def _admit(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> tuple[str, TaskSpec, Any, Any]:
        """Identity, limits, request shape and the delegation statement of an inbound task.

        Returns the peer, the task, the permit (release it when the task ends) and the claims.
        """
        org = await self._peer(context, request)
        started = time.monotonic()
        spec = refused_spec(request)
        try:
            permit = self.limiter.acquire(org)  # first: a malformed flood spends rate too
        except FedgateError as exc:
            await self.refusals.record(spec, org, exc, started=started)
            raise
        try:
            check_decoded(request)
            if not request.task_id:
                raise InvalidArgument("a task from a peer gateway must carry its task id")
            if not request.delegation:
                raise Unauthenticated(
                    "the task carries no delegation statement of who asked: the sending gateway "
                    "must sign one (Fedgate 0.1 and later do)"
                )
            delegation = self.delegations.verify(
                request.delegation, peer_org=org, task_id=request.task_id
            )
            _check_delegated_text(delegation)
            spec = self._spec(request, context)
        except FedgateError as exc:
            permit.release()
            await self.refusals.record(spec, org, exc, started=started)
            raise
        # Who asked is what the signed statement says, not the request body.
        spec = replace(
            spec, requester=delegation.subject, purpose=delegation.purpose, roles=delegation.roles
        )
        return org, spec, permit, delegation.claims()

    # ---- what a peer is told ----

    def public_error(self, exc: FedgateError) -> FedgateError:
        """A failure of our own stores as stable text: its detail (a database's error can name
        internal hosts) goes to our log, never to a peer."""
        if isinstance(exc, AuditUnavailable):
            log.error("refused a peer's call: %s", exc.message)
            return AuditUnavailable(self._unavailable_text("audit store"))
        if isinstance(exc, Unavailable) and _store_named(exc.message) == "task table":
            log.error("refused a peer's call: %s", exc.message)
            return Unavailable(self._unavailable_text("task table"))
        return exc

    def internal_error_message(self, exc: BaseException) -> str:
        return f"the gateway of {self.router.org!r} failed while handling this call: retry later"

    def _unavailable_text(self, store: str | None) -> str:
        if store is None:
            return f"the gateway of {self.router.org!r} could not finish the task: retry later"
        return (
            f"the {store} cannot be written at the gateway of {self.router.org!r}: exchanges "
            "are refused until it recovers; retry later"
        )

    def _released(self, update: TaskUpdate) -> TaskUpdate:
        """An update as it may leave for a peer: output only with the receipt that signs it, and
        our own failures in stable text."""
        update = signed_output_only(update)
        result = update.result
        if result is None:
            return update
        if result.error is not None and result.error.code in _INTERNAL_CODES:
            text = self._unavailable_text(_store_named(result.error.message))
            result = replace(result, error=TaskError(result.error.code, text))
        return replace(update, result=result)

    async def _serve(
        self, spec: TaskSpec, org: str, claims: Any, *, stream: bool = True
    ) -> AsyncIterator[TaskUpdate]:
        async for update in self.router.serve_peer(spec, org, claims, stream=stream):
            yield self._released(update)

    # ---- the calls ----

    @maps_errors
    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        org = await self._peer(context, request)
        await self._spend(org, request, time.monotonic())
        return pb.ListAgentsResponse(
            agents=[card_to_pb(c) for c in self.router.cards_for_peer(org)]
        )

    @maps_stream_errors
    async def StreamTask(
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TaskUpdate]:
        org, spec, permit, claims = await self._admit(request, context)
        with permit:
            async for update in self._serve(spec, org, claims):
                yield update_to_pb(update)

    @maps_errors
    async def SubmitTask(
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskResult:
        org, spec, permit, claims = await self._admit(request, context)
        with permit:
            return await result_of(self._serve(spec, org, claims, stream=False))

    @maps_errors
    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelTaskResponse:
        org = await self._peer(context, request)
        started = time.monotonic()
        await self._spend(org, request, started)
        try:
            check_decoded(request)
            validate_task_id(request.task_id)
            check_text("the cancel reason", request.reason, MAX_TEXT_CHARS)
        except FedgateError as exc:
            await self.refusals.record(refused_spec(request), org, exc, started=started)
            raise
        state = await self.router.cancel(request.task_id, request.reason, origin_org=org)
        return pb.CancelTaskResponse(state=state_to_pb(state))

    @maps_errors
    async def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskResult:
        org = await self._peer(context, request)
        started = time.monotonic()
        await self._spend(org, request, started)
        try:
            check_decoded(request)
            validate_task_id(request.task_id)
        except FedgateError as exc:
            await self.refusals.record(refused_spec(request), org, exc, started=started)
            raise
        result = await self.router.get_for_peer(request.task_id, org)
        released = self._released(TaskUpdate(result.task_id, result.state, result=result))
        assert released.result is not None
        return result_to_pb(released.result)

    @maps_errors
    async def ExchangeCheckpoint(
        self, request: pb.SignedCheckpoint, context: grpc.aio.ServicerContext
    ) -> pb.SignedCheckpoint:
        """Keep the peer's signed audit head (validated, at most once per interval) and answer
        with ours (cached, signed at most about once a second)."""
        org = await self._peer(context, request)
        started = time.monotonic()
        await self._spend(org, request, started)
        try:
            check_decoded(request)
            theirs = checkpoint_from_pb(request)
            if theirs.org != org:
                raise PermissionDenied(
                    f"checkpoint names organization {theirs.org!r} but the caller is {org!r}"
                )
            ahead = theirs.signed_at_unix_ms - now_unix_ms()
            if ahead > CHECKPOINT_CLOCK_SKEW_MS:
                raise InvalidArgument(
                    f"the checkpoint is dated {ahead / 1000:.0f} s in the future: check the "
                    "clocks of both gateways"
                )
            await self.checkpoints.offer(theirs)
        except FedgateError as exc:
            if not isinstance(exc, AuditUnavailable):
                await self.refusals.record(_checkpoint_spec(), org, exc, started=started)
            raise
        return checkpoint_to_pb(await self.own_head.current())


def _store_named(message: str) -> str | None:
    """Which of our stores an error message of ours is about, if any."""
    for store in ("audit store", "task table"):
        if store in message:
            return store
    return None


def _checkpoint_spec() -> TaskSpec:
    """What the record of a refused checkpoint names: no task."""
    return TaskSpec(task_id="-", target_org="", agent="", skill="", input={})


def _check_delegated_text(delegation: Delegation) -> None:
    """The names a delegation statement carries are kept in our records: no NUL in any."""
    texts = [("subject", delegation.subject), ("purpose", delegation.purpose)]
    texts += [("a role", role) for role in delegation.roles]
    for name, value in texts:
        if "\x00" in value:
            raise InvalidArgument(
                f"the delegation statement's {name} contains a NUL character: text on the wire "
                "never holds one"
            )
