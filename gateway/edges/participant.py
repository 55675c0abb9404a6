"""The participant service: this organization's local agents and requesters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.config import GatewayConfig
from gateway.edges.rpc import (
    Malformed,
    ServicerBase,
    abort,
    check_decoded,
    maps_errors,
    maps_stream_errors,
    result_of,
)
from gateway.edges.wire import (
    MAX_TEXT_CHARS,
    card_from_pb,
    card_to_pb,
    check_text,
    result_to_pb,
    signed_output_only,
    spec_to_pb,
    state_from_pb,
    state_to_pb,
    update_from_pb,
    update_to_pb,
)
from gateway.errors import FedgateError, InvalidArgument, Unauthenticated
from gateway.exchange.agents import AgentInstance, AgentRegistry, Assignment, CancelRequest
from gateway.exchange.router import Router
from gateway.exchange.tasks import (
    TaskError,
    TaskResult,
    TaskSpec,
    TaskState,
    TaskUpdate,
    validate_names,
    validate_task_id,
)
from gateway.identity.tokens import TokenAuthority, TokenClaims

log = logging.getLogger("fedgate.servicers")


class ParticipantServicer(ServicerBase, pb_grpc.ParticipantServicer):
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
        wait = self.config.participant.connect_timeout_seconds
        try:
            first = await asyncio.wait_for(anext(aiter(request_iterator)), wait)
        except StopAsyncIteration:
            return
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no RegisterAgents message within {wait:g} s of opening Connect: an agent "
                "registers its cards (and token) first; participant.connect_timeout_seconds sets "
                "the wait",
            )
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
            await abort(context, exc)
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
                        await abort(context, refused[0])
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
        instance_id = check_text("the instance id", register.instance_id[:128], 128)
        instance_id = instance_id or uuid.uuid4().hex
        return AgentInstance(instance_id=instance_id, cards=cards)

    async def _read_updates(
        self, instance: AgentInstance, requests: AsyncIterator[pb.AgentMessage]
    ) -> None:
        async for message in requests:
            if isinstance(message, Malformed) or message.WhichOneof("kind") != "update":
                continue
            try:
                state_from_pb(message.update.state)
            except FedgateError:
                log.warning(
                    "agent instance %s sent an update with an unknown state", instance.instance_id
                )
                continue
            try:
                update = update_from_pb(message.update)
            except (ValueError, FedgateError) as exc:
                # An output JSON cannot carry (NaN, infinity, a NUL in a key) or a field past its
                # bound: the task fails, the gateway does not.
                cause = (
                    f"the skill's output is not valid JSON: {exc}"
                    if isinstance(exc, ValueError)
                    else f"the skill's result was refused: {exc.message}"
                )
                task_id = message.update.task_id
                update = TaskUpdate(
                    task_id,
                    TaskState.FAILED,
                    result=TaskResult(
                        task_id, TaskState.FAILED, error=TaskError("skill_error", cause)
                    ),
                )
            self.agents.deliver(instance, update)

    @maps_stream_errors
    async def StreamTask(
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TaskUpdate]:
        spec = self._authorize_call(self._spec(request, context), context)
        remote = spec.target_org != self.router.org
        async for update in self.router.submit(spec):
            # From a partner, output reaches our requester only as a result its receipt signs.
            yield update_to_pb(signed_output_only(update) if remote else update)

    @maps_errors
    async def SubmitTask(
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskResult:
        spec = self._authorize_call(self._spec(request, context), context)
        return await result_of(self.router.submit(spec, stream=False))

    @maps_errors
    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelTaskResponse:
        check_decoded(request)
        validate_task_id(request.task_id)
        check_text("the cancel reason", request.reason, MAX_TEXT_CHARS)
        claims = self._claims(context)
        state = await self.router.cancel(
            request.task_id,
            request.reason,
            origin_org=self.router.org,
            owner=claims.subject if claims is not None else None,
        )
        return pb.CancelTaskResponse(state=state_to_pb(state))

    @maps_errors
    async def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskResult:
        check_decoded(request)
        validate_task_id(request.task_id)
        claims = self._claims(context)
        owner = claims.subject if claims is not None else None
        return result_to_pb(
            await self.router.get(request.task_id, origin_org=self.router.org, owner=owner)
        )

    def _operator(self, context: grpc.aio.ServicerContext, what: str) -> None:
        """Refuse unless the caller holds an operator token (when this gateway requires tokens)."""
        claims = self._claims(context)
        if claims is not None and self.tokens is not None:
            self.tokens.check_operator(claims, what)

    @maps_errors
    async def ListConnectedAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConnectedAgentsResponse:
        """The connected agents, their cards and load: for an operator token only."""
        self._operator(context, "the connected agents")
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

    @maps_errors
    async def ListPeers(
        self, request: pb.ListPeersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPeersResponse:
        """The peers, their addresses, circuits and last errors: for an operator token only."""
        self._operator(context, "the peers' status")
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
