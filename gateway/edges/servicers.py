"""The gRPC edge: turn messages into domain objects, call the router, map errors to statuses."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.config import GatewayConfig
from gateway.edges.wire import (
    card_from_pb,
    card_to_pb,
    checkpoint_from_pb,
    checkpoint_to_pb,
    result_to_pb,
    spec_from_pb,
    spec_to_pb,
    state_to_pb,
    update_from_pb,
    update_to_pb,
)
from gateway.errors import (
    ERROR_MARKER,
    FedgateError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from gateway.exchange.agents import AgentInstance, AgentRegistry, Assignment, CancelRequest
from gateway.exchange.limits import PeerLimiter
from gateway.exchange.router import Router
from gateway.exchange.tasks import (
    TaskError,
    TaskResult,
    TaskSpec,
    TaskState,
    TaskUpdate,
    validate_names,
)
from gateway.identity.delegation import DelegationVerifier
from gateway.identity.tls import ReloadingTls, peer_identity
from gateway.identity.tokens import TokenAuthority, TokenClaims

log = logging.getLogger("fedgate.servicers")


async def _abort(context: grpc.aio.ServicerContext, exc: FedgateError) -> None:
    context.set_trailing_metadata(((ERROR_MARKER, type(exc).__name__),))
    # gRPC carries the message in metadata (16 KiB at most): a message quoting unverified
    # input must never grow past that and turn a clear refusal into a broken stream.
    message = exc.message if len(exc.message) <= 2000 else exc.message[:2000] + "…"
    await context.abort(exc.status, message)


def _refused_spec(request: Any) -> TaskSpec:
    """What a refused request names (unverified, possibly undecodable), for its audit record."""
    return TaskSpec(
        task_id=getattr(request, "task_id", "") or "-",
        target_org=getattr(request, "target_org", ""),
        agent=getattr(request, "agent", ""),
        skill=getattr(request, "skill", ""),
        input={},
        requester=getattr(request, "requester", ""),
    )


async def _result_of(updates: AsyncIterator[TaskUpdate]) -> pb.TaskResult:
    """Run a task to its end for a unary call: the result of its last (final) update."""
    last: TaskUpdate | None = None
    async for update in updates:
        last = update
    assert last is not None, "a task's updates end with a final one"
    return result_to_pb(last.result or TaskResult(last.task_id, last.state))


def _maps_errors(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A unary handler's FedgateError becomes its gRPC status and message."""

    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except FedgateError as exc:
            await _abort(context, exc)
            raise  # abort raises; this keeps type checkers honest

    return handler


def _maps_stream_errors(
    method: Callable[..., AsyncIterator[Any]],
) -> Callable[..., AsyncIterator[Any]]:
    """A streaming handler's FedgateError becomes its gRPC status and message."""

    @functools.wraps(method)
    async def handler(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        try:
            async for message in method(self, request, context):
                yield message
        except FedgateError as exc:
            await _abort(context, exc)

    return handler


class _Base:
    def __init__(self, config: GatewayConfig, router: Router) -> None:
        self.config = config
        self.router = router

    def _spec(self, request: pb.TaskRequest, context: grpc.aio.ServicerContext) -> TaskSpec:
        _check_decoded(request)
        try:
            return spec_from_pb(
                request,
                default_deadline=self.config.gateway.default_deadline_seconds,
                max_deadline=self.config.gateway.max_deadline_seconds,
                time_remaining=context.time_remaining(),
            )
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"task input is not a valid JSON object: {exc}") from None


class FederationServicer(_Base, pb_grpc.FederationServicer):
    """Gateway to gateway. The caller is the organization its certificate names, nothing else."""

    def __init__(
        self,
        config: GatewayConfig,
        router: Router,
        tls: ReloadingTls,
        limiter: PeerLimiter,
        delegations: DelegationVerifier,
    ) -> None:
        super().__init__(config, router)
        self.tls = tls
        self.limiter = limiter
        self.delegations = delegations

    async def _admit(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> tuple[str, TaskSpec, Any, Any]:
        """Identity, limits, request shape and the delegation statement of an inbound task.

        Returns the peer, the task, the permit (release it when the task ends) and the claims.
        """
        org = await self._peer(context, request)
        started = time.monotonic()
        spec = _refused_spec(request)
        try:
            _check_decoded(request)
            permit = self.limiter.acquire(org)
        except FedgateError as exc:
            await self.router.audit_rejection(spec, org, exc, started=started)
            raise
        try:
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
            spec = self._spec(request, context)
        except FedgateError as exc:
            permit.release()
            await self.router.audit_rejection(spec, org, exc, started=started)
            raise
        # Who asked is what the signed statement says, not the request body.
        spec = replace(
            spec, requester=delegation.subject, purpose=delegation.purpose, roles=delegation.roles
        )
        return org, spec, permit, delegation.claims()

    async def _peer(self, context: grpc.aio.ServicerContext, request: Any = None) -> str:
        try:
            org = peer_identity(context, self.tls.material.revoked_serials)
        except FedgateError as exc:
            # A revoked or inconsistent certificate: refused, and recorded (the organization it
            # names is in the message; it is not proven, so the record's peer is "-").
            await self.router.audit_rejection(
                _refused_spec(None), "-", exc, started=time.monotonic()
            )
            raise
        if org not in self.router.peers:
            error = PermissionDenied(
                f"organization {org!r} is not a peer of {self.router.org!r}: the operator must add "
                f"it under [peers.{org}] in fedgate.toml"
            )
            await self.router.audit_rejection(
                _refused_spec(request), org, error, started=time.monotonic()
            )
            raise error
        claimed = getattr(request, "sender_org", "")
        if claimed and claimed != org:
            log.warning(
                "a request from %s claimed sender %r in its body; ignored", org, claimed[:64]
            )
        return org

    @_maps_errors
    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        org = await self._peer(context)
        return pb.ListAgentsResponse(
            agents=[card_to_pb(c) for c in self.router.cards_for_peer(org)]
        )

    @_maps_stream_errors
    async def StreamTask(
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TaskUpdate]:
        org, spec, permit, claims = await self._admit(request, context)
        with permit:
            async for update in self.router.serve_peer(spec, org, claims):
                yield update_to_pb(update)

    @_maps_errors
    async def SubmitTask(
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskResult:
        org, spec, permit, claims = await self._admit(request, context)
        with permit:
            return await _result_of(self.router.serve_peer(spec, org, claims, stream=False))

    @_maps_errors
    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelTaskResponse:
        org = await self._peer(context)
        _check_decoded(request)
        state = await self.router.cancel(request.task_id, request.reason, origin_org=org)
        return pb.CancelTaskResponse(state=state_to_pb(state))

    @_maps_errors
    async def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskResult:
        org = await self._peer(context)
        _check_decoded(request)
        return result_to_pb(await self.router.get_for_peer(request.task_id, org))

    @_maps_errors
    async def ExchangeCheckpoint(
        self, request: pb.SignedCheckpoint, context: grpc.aio.ServicerContext
    ) -> pb.SignedCheckpoint:
        org = await self._peer(context)
        _check_decoded(request)
        theirs = checkpoint_from_pb(request)
        if theirs.org != org:
            raise PermissionDenied(
                f"checkpoint names organization {theirs.org!r} but the caller is {org!r}"
            )
        await self.router.audit.store_peer_checkpoint(theirs)
        ours = await self.router.audit.checkpoint(self.router.signer)
        return checkpoint_to_pb(ours)


class ParticipantServicer(_Base, pb_grpc.ParticipantServicer):
    """Local agents and requesters of this organization."""

    def __init__(
        self,
        config: GatewayConfig,
        router: Router,
        agents: AgentRegistry,
        tokens: TokenAuthority | None,
    ) -> None:
        super().__init__(config, router)
        self.agents = agents
        self.tokens = tokens

    def _bearer(self, context: grpc.aio.ServicerContext) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                return value[len("Bearer ") :].strip()
        return ""

    def _claims(self, context: grpc.aio.ServicerContext, token: str = "") -> TokenClaims | None:
        """The caller's verified token, or None when this gateway does not require tokens."""
        if self.tokens is None:
            return None
        token = self._bearer(context) or token
        if not token:
            raise Unauthenticated(
                "no participant token: issue one with `fedgate tokens issue` and pass it to the "
                "SDK (token=...)"
            )
        return self.tokens.verify(token)

    def _authorize_call(self, spec: TaskSpec, context: grpc.aio.ServicerContext) -> TaskSpec:
        claims = self._claims(context)
        if claims is None or self.tokens is None:
            return spec
        self.tokens.check_call(claims, spec.target_org, spec.agent, spec.skill)
        # The authenticated subject is who asked; the request's own name is kept beside it.
        said = spec.requester
        requester = (
            claims.subject if not said or said == claims.subject else f"{claims.subject}/{said}"
        )
        return replace(spec, requester=requester[:255])

    async def Connect(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GatewayMessage]:
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if (
            isinstance(first, Malformed)
            or first.WhichOneof("kind") != "register"
            or not first.register.cards
        ):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first message on Connect must register at least one agent card",
            )
        token = self._bearer(context) or first.register.token
        try:
            instance = self._instance(first.register)
            claims = self._claims(context, token)
            if claims is not None and self.tokens is not None:
                for name in instance.cards:
                    self.tokens.check_register(claims, name)
                instance.subject = claims.subject
        except FedgateError as exc:
            await _abort(context, exc)
            return
        if self.router.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        self.agents.register(instance)
        # The loop below waits on the outbox alone; None there ends the stream. The reader puts
        # it when the agent's side closes, the token watcher when the token stops being valid.
        reader = asyncio.ensure_future(self._read_updates(instance, request_iterator))
        reader.add_done_callback(lambda _: instance.outbox.put_nowait(None))
        refused: list[FedgateError] = []
        watcher = (
            asyncio.ensure_future(self._watch_token(instance, token, refused))
            if claims is not None
            else None
        )
        try:
            yield pb.GatewayMessage(
                registered=pb.Registered(org=self.router.org, agents=sorted(instance.cards))
            )
            while True:
                item = await instance.outbox.get()
                if item is None:
                    if refused:
                        await _abort(context, refused[0])
                    return
                if isinstance(item, Assignment):
                    yield pb.GatewayMessage(
                        task=pb.TaskAssignment(
                            request=spec_to_pb(item.spec, sender_org=item.requester_org),
                            requester_org=item.requester_org,
                        )
                    )
                elif isinstance(item, CancelRequest):
                    yield pb.GatewayMessage(
                        cancel=pb.CancelAssignment(task_id=item.task_id, reason=item.reason)
                    )
        finally:
            for helper in (reader, watcher):
                if helper is not None:
                    helper.cancel()
                    with contextlib.suppress(BaseException):
                        await helper
            self.agents.unregister(instance)

    async def _watch_token(
        self, instance: AgentInstance, token: str, refused: list[FedgateError]
    ) -> None:
        """A revoked or expired token stops working within a second, open streams included."""
        assert self.tokens is not None
        while True:
            await asyncio.sleep(1.0)
            try:
                self.tokens.verify(token)
            except FedgateError as exc:
                refused.append(exc)
                instance.outbox.put_nowait(None)
                return

    def _instance(self, register: pb.RegisterAgents) -> AgentInstance:
        cards = {}
        for message in register.cards:
            try:
                card = card_from_pb(message, org=self.router.org)
            except ValueError as exc:
                raise InvalidArgument(f"an agent card's schema is not valid JSON: {exc}") from None
            if not card.skills:
                raise InvalidArgument(f"agent card {card.name!r} declares no skill")
            for skill in card.skills:
                validate_names(self.router.org, card.name, skill.name)
            if card.name in cards:
                raise InvalidArgument(f"agent {card.name!r} is registered twice in one message")
            cards[card.name] = card
        instance_id = register.instance_id[:128] or uuid.uuid4().hex
        return AgentInstance(instance_id=instance_id, cards=cards)

    async def _read_updates(
        self, instance: AgentInstance, requests: AsyncIterator[pb.AgentMessage]
    ) -> None:
        async for message in requests:
            if isinstance(message, Malformed) or message.WhichOneof("kind") != "update":
                continue
            try:
                update = update_from_pb(message.update)
            except FedgateError:
                log.warning(
                    "agent instance %s sent an update with an unknown state", instance.instance_id
                )
                continue
            except ValueError as exc:
                # An output JSON cannot carry (NaN, infinity): the task fails, the gateway does not.
                task_id = message.update.task_id
                update = TaskUpdate(
                    task_id,
                    TaskState.FAILED,
                    result=TaskResult(
                        task_id,
                        TaskState.FAILED,
                        error=TaskError(
                            "skill_error", f"the skill's output is not valid JSON: {exc}"
                        ),
                    ),
                )
            self.agents.deliver(instance, update)

    @_maps_stream_errors
    async def StreamTask(
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TaskUpdate]:
        spec = self._authorize_call(self._spec(request, context), context)
        async for update in self.router.submit(spec):
            yield update_to_pb(update)

    @_maps_errors
    async def SubmitTask(
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskResult:
        spec = self._authorize_call(self._spec(request, context), context)
        return await _result_of(self.router.submit(spec, stream=False))

    @_maps_errors
    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelTaskResponse:
        _check_decoded(request)
        claims = self._claims(context)
        state = await self.router.cancel(
            request.task_id,
            request.reason,
            origin_org=self.router.org,
            owner=claims.subject if claims is not None else None,
        )
        return pb.CancelTaskResponse(state=state_to_pb(state))

    @_maps_errors
    async def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskResult:
        _check_decoded(request)
        claims = self._claims(context)
        owner = claims.subject if claims is not None else None
        return result_to_pb(
            await self.router.get(request.task_id, origin_org=self.router.org, owner=owner)
        )

    async def ListConnectedAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConnectedAgentsResponse:
        return pb.ListConnectedAgentsResponse(
            agents=[
                pb.ConnectedAgent(
                    card=card_to_pb(card),
                    instances=self.agents.instance_count(card.name),
                    tasks_in_flight=self.agents.in_flight(card.name),
                )
                for card in self.agents.cards()
            ]
        )

    async def ListPeers(
        self, request: pb.ListPeersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPeersResponse:
        peers = self.router.peers
        return pb.ListPeersResponse(
            peers=[
                pb.PeerStatus(
                    org=org,
                    address=peers.address(org),
                    circuit=health.circuit,
                    latency_ms=health.latency_ms,
                    last_error=health.last_error,
                    consecutive_failures=health.consecutive_failures,
                    in_flight=health.in_flight,
                )
                for org in peers.names
                for health in [peers.health[org]]
            ]
        )


class Malformed:
    """A request whose bytes did not decode: it reaches the servicer, which answers clearly."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _check_decoded(request: object) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgument(request.reason)


def _safe_decoder(message_type: Any) -> Any:
    def decode(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as exc:  # DecodeError, RecursionError, invalid UTF-8, wrong wire types
            cause = str(exc).split("\n")[0][:200] or type(exc).__name__
            return Malformed(
                f"the {message_type.DESCRIPTOR.name} message could not be decoded ({cause}): "
                "check the field types and nesting (at most 33 levels in a Struct)"
            )

    return decode


def add_servicer(server: grpc.aio.Server, service_name: str, servicer: object) -> None:
    """Register a fedgate.v1 service with decoders that never fail: bad bytes become Malformed."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_safe_decoder(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


__all__ = ["FederationServicer", "Malformed", "ParticipantServicer", "TaskState", "add_servicer"]
