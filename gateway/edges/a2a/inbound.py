"""A2A in: our organization's A2A clients call any agent it may reach through the gateway.

Every A2A operation goes through the SDK's own request handler (`DefaultRequestHandlerV2`: task
bookkeeping, history, context checks, streaming, resubscription), one per reachable agent, whose
executor (`RouterExecutor`) turns a message into `router.submit(spec)`: the same path, policy,
audit and receipts as an SDK requester's call. In front of it `GatewayRequestHandler` resolves
the agent a call is for, authenticates the caller by its participant token, checks that the token
may call the skill, reads the gateway's request metadata, and maps gateway errors onto A2A ones.

    HTTP (JSON-RPC, HTTP+JSON) ─┐                       ┌─ DefaultRequestHandlerV2 (org/agent)
                                ├─ GatewayRequestHandler ┤      └─ RouterExecutor ─ router.submit
    gRPC (lf.a2a.v1) ───────────┘                       └─ ... one per reachable agent
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import grpc
from a2a.auth.user import User
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import Event, EventQueue
from a2a.server.request_handlers import (
    DefaultGrpcServerCallContextBuilder,
    DefaultRequestHandlerV2,
    RequestHandler,
)
from a2a.server.routes import DefaultServerCallContextBuilder
from a2a.server.tasks import InMemoryTaskStore
from a2a.types.a2a_pb2 import (
    AgentCard as A2ACard,
)
from a2a.types.a2a_pb2 import (
    Artifact,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    Part,
    Role,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskArtifactUpdateEvent,
    TaskPushNotificationConfig,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.types.a2a_pb2 import (
    TaskState as A2AState,
)
from a2a.utils.constants import VERSION_HEADER
from a2a.utils.errors import (
    InvalidParamsError,
    UnsupportedOperationError,
    VersionNotSupportedError,
)
from fedgate.convert import struct_to_dict
from google.protobuf.timestamp_pb2 import Timestamp
from packaging.version import InvalidVersion, Version
from starlette.requests import Request

from gateway.config import AGENT_NAME, ORG_NAME
from gateway.edges.a2a.cards import CardDirectory, Target, a2a_card
from gateway.edges.a2a.errors import (
    GatewayNotFound,
    GatewayUnauthenticated,
    to_a2a,
)
from gateway.edges.a2a.mapping import (
    derive_context,
    json_to_message,
    output_artifacts,
    output_reply,
    output_status_message,
    request_input,
    result_metadata,
)
from gateway.edges.a2a.port import ExchangePort
from gateway.errors import FedgateError
from gateway.exchange.tasks import AgentCard, SkillCard, TaskResult, TaskSpec, TaskState, TaskUpdate
from gateway.identity.tokens import TokenAuthority, TokenClaims, call_allowed

log = logging.getLogger("fedgate.a2a")

STATE_TARGET = "fedgate.target"
STATE_OWNER = "fedgate.owner"
STATE_PLAN = "fedgate.plan"
INTERRUPTED = {A2AState.TASK_STATE_INPUT_REQUIRED, A2AState.TASK_STATE_AUTH_REQUIRED}
TERMINAL = {
    A2AState.TASK_STATE_COMPLETED,
    A2AState.TASK_STATE_CANCELED,
    A2AState.TASK_STATE_FAILED,
    A2AState.TASK_STATE_REJECTED,
}
_TO_A2A = {
    TaskState.SUBMITTED: A2AState.TASK_STATE_SUBMITTED,
    TaskState.WORKING: A2AState.TASK_STATE_WORKING,
    TaskState.COMPLETED: A2AState.TASK_STATE_COMPLETED,
    TaskState.FAILED: A2AState.TASK_STATE_FAILED,
    TaskState.CANCELED: A2AState.TASK_STATE_CANCELED,
    TaskState.INPUT_REQUIRED: A2AState.TASK_STATE_INPUT_REQUIRED,
    TaskState.REJECTED: A2AState.TASK_STATE_REJECTED,
    TaskState.AUTH_REQUIRED: A2AState.TASK_STATE_AUTH_REQUIRED,
}
_MAX_CLAIM = 128
# The states whose result carries output: the end of a turn (see TaskState.ends_turn).
_CARRY_OUTPUT = {TaskState.COMPLETED, TaskState.INPUT_REQUIRED, TaskState.AUTH_REQUIRED}


# ---- who calls ---------------------------------------------------------------------------


class Caller(User):
    """An A2A caller: the subject of its participant token (empty when tokens are off)."""

    def __init__(self, subject: str = "", claims: TokenClaims | None = None) -> None:
        self.subject = subject
        self.claims = claims

    @property
    def is_authenticated(self) -> bool:
        return self.claims is not None

    @property
    def user_name(self) -> str:
        return self.subject

    def may_call(self, org: str, agent: str, skill: str) -> bool:
        return self.claims is None or call_allowed(self.claims.calls, org, agent, skill)

    def callable_skills(self, card: AgentCard) -> list[SkillCard]:
        return [s for s in card.skills if self.may_call(card.org, card.name, s.name)]


class Authenticator:
    """Participant tokens as A2A bearer credentials."""

    def __init__(self, tokens: TokenAuthority | None) -> None:
        self.tokens = tokens

    @property
    def required(self) -> bool:
        return self.tokens is not None

    def caller(self, authorization: str | None) -> Caller:
        if self.tokens is None:
            return Caller()
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GatewayUnauthenticated(
                "no participant token: send 'Authorization: Bearer TOKEN' with a token from "
                "`fedgate tokens issue --call ORG/AGENT.SKILL`"
            )
        try:
            claims = self.tokens.verify(token.strip())
        except FedgateError as exc:
            raise to_a2a(exc) from None
        return Caller(claims.subject, claims)


class HttpContextBuilder(DefaultServerCallContextBuilder):
    """The call context of an HTTP request: the SDK's, plus the target agent and the caller."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        org, agent = request.path_params.get("org", ""), request.path_params.get("agent", "")
        context.state[STATE_TARGET] = Target(org, agent)
        return context

    def build_user(self, request: Request) -> User:
        return self.auth.caller(request.headers.get("authorization"))


class GrpcContextBuilder(DefaultGrpcServerCallContextBuilder):
    """The call context of a gRPC call; its target is the request's tenant (`org/agent`).

    The SDK's gRPC binding does not check `a2a-version`; this does: a version whose major is
    not 1 is refused (a call without one is taken as 1.0, which every gRPC client speaks).
    """

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def build(self, context: grpc.aio.ServicerContext) -> ServerCallContext:
        for key, value in context.invocation_metadata() or ():
            if key.lower() == VERSION_HEADER.lower():
                text = value.decode() if isinstance(value, bytes) else str(value)
                if not _speaks_1(text):
                    raise VersionNotSupportedError(
                        f"A2A version {text[:16]!r} is not supported by this gateway: it speaks 1.0"
                    )
        return super().build(context)

    def build_user(self, context: grpc.aio.ServicerContext) -> User:
        values = [
            v for k, v in (context.invocation_metadata() or ()) if k.lower() == "authorization"
        ]
        value = values[0] if values else None
        return self.auth.caller(value.decode() if isinstance(value, bytes) else value)


def _speaks_1(text: str) -> bool:
    try:
        return Version(text).major == 1
    except InvalidVersion:
        return False


# ---- the task book: the SDK's in-memory store, scoped and bounded ---------------------------


def _owner_scope(context: ServerCallContext) -> str:
    return str(context.state.get(STATE_OWNER, "\x00"))


class BoundedTaskStore(InMemoryTaskStore):
    """The SDK's in-memory task store, scoped to (caller, agent), keeping at most `capacity`
    finished tasks (the oldest go first); the task table and the audit log keep them all."""

    def __init__(self, capacity: int = 10_000) -> None:
        super().__init__(owner_resolver=_owner_scope)
        self.capacity = capacity
        self._finished: OrderedDict[tuple[str, str], None] = OrderedDict()

    async def save(self, task: Task, context: ServerCallContext) -> None:
        await super().save(task, context)
        if task.status.state not in TERMINAL:
            return
        key = (_owner_scope(context), task.id)
        self._finished[key] = None
        self._finished.move_to_end(key)
        while len(self._finished) > self.capacity:
            (owner, task_id), _ = self._finished.popitem(last=False)
            await super().delete(task_id, ServerCallContext(state={STATE_OWNER: owner}))


# ---- one send: what the handler worked out before the SDK takes over -----------------------


@dataclass(frozen=True)
class SendPlan:
    target: Target
    skill: str
    caller: Caller
    payload: dict[str, Any]
    deadline_seconds: float
    purpose: str = ""
    roles: tuple[str, ...] = ()
    client_context: bool = False


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


def _text_message(text: str, context_id: str, task_id: str) -> Message:
    return Message(
        message_id=str(uuid.uuid4()),
        role=Role.ROLE_AGENT,
        context_id=context_id,
        task_id=task_id,
        parts=[Part(text=text)],
    )


class RouterExecutor(AgentExecutor):
    """Runs an A2A message as a task of the router and reports its updates as A2A events.

    A task's first A2A event is held until the router says something: a result that is a reply
    (an A2A agent answered with a message) then goes out as a Message, anything else as a Task.
    Progress updates carry states only; the output, filtered by the policies on the way, comes
    with the update that ends a turn (input-required, or final), as artifacts and a status
    message with the receipt in its metadata. A follow-up message to a task waiting for input
    is the router's next turn of it.
    """

    def __init__(self, edge: InboundEdge, target: Target) -> None:
        self.edge = edge
        self.target = target
        self._canceling: set[str] = set()
        # Tasks waiting for input: the turn their last result ended.
        self._awaiting: dict[str, int] = {}

    def awaits_input(self, task_id: str) -> bool:
        return task_id in self._awaiting

    def forget(self, task_id: str) -> None:
        self._awaiting.pop(task_id, None)

    def _spec(self, context: RequestContext, plan: SendPlan) -> TaskSpec:
        payload = dict(plan.payload)
        if plan.client_context and context.context_id:
            payload["context"] = (
                context.context_id
                if self.target.org == self.edge.port.org
                else derive_context(self.edge.context_key, self.target.org, context.context_id)
            )
        return TaskSpec(
            task_id=str(context.task_id),
            target_org=self.target.org,
            agent=self.target.agent,
            skill=plan.skill,
            input=payload,
            requester=plan.caller.subject[:255],
            deadline=time.time() + plan.deadline_seconds,
            purpose=plan.purpose,
            roles=plan.roles,
        )

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        plan = context.call_context.state.get(STATE_PLAN)
        if not isinstance(plan, SendPlan) or context.message is None:
            raise InvalidParamsError("a message for a task of the gateway")
        task_id, context_id = str(context.task_id), str(context.context_id)
        spec = self._spec(context, plan)
        created = context.current_task is not None
        if created:
            last = self._awaiting.pop(task_id, None)
            if last is None:
                raise UnsupportedOperationError(
                    f"task {task_id!r} is not waiting for input: send a new message"
                )
            spec = replace(spec, turn=last + 1)

        async def announce() -> None:
            nonlocal created
            if created:
                return
            created = True
            message = Message()
            message.CopyFrom(context.message)
            await event_queue.enqueue_event(
                Task(
                    id=task_id,
                    context_id=context_id,
                    status=TaskStatus(state=A2AState.TASK_STATE_SUBMITTED, timestamp=_now()),
                    history=[message],
                )
            )

        try:
            updates = (
                self.edge.port.continue_task(spec)
                if context.current_task is not None
                else self.edge.port.submit(spec, stream=True)
            )
            async for update in updates:
                if task_id in self._canceling:
                    return  # cancel() reports the end
                # A turn ends with its result (a state alone is a snapshot of where it is).
                if not (update.state.final or (update.state.ends_turn and update.result)):
                    await announce()
                    if update.state in (TaskState.WORKING, TaskState.AUTH_REQUIRED):
                        await event_queue.enqueue_event(
                            self._status(task_id, context_id, update.state, update.message)
                        )
                    continue
                await self._finish(update, task_id, context_id, created, announce, event_queue)
                return
        except FedgateError as exc:
            if not created:
                raise to_a2a(exc) from None
            code = exc.status.name.lower()
            await event_queue.enqueue_event(
                TaskStatusUpdateEvent(
                    task_id=task_id,
                    context_id=context_id,
                    status=TaskStatus(
                        state=A2AState.TASK_STATE_FAILED,
                        timestamp=_now(),
                        message=_text_message(f"{code}: {exc.message}", context_id, task_id),
                    ),
                    metadata={"fedgate": {"error": {"code": code, "message": exc.message}}},
                )
            )
        finally:
            self._canceling.discard(task_id)

    def _status(
        self, task_id: str, context_id: str, state: TaskState, text: str = ""
    ) -> TaskStatusUpdateEvent:
        status = TaskStatus(state=_TO_A2A[state], timestamp=_now())
        if text:
            status.message.CopyFrom(_text_message(text, context_id, task_id))
        return TaskStatusUpdateEvent(task_id=task_id, context_id=context_id, status=status)

    async def _finish(
        self,
        update: TaskUpdate,
        task_id: str,
        context_id: str,
        created: bool,
        announce: Callable[[], Awaitable[None]],
        event_queue: EventQueue,
    ) -> None:
        result = update.result or TaskResult(task_id, update.state)
        if not result.state.final:
            self._awaiting[task_id] = result.turn  # its next message continues it
        metadata = result_metadata(result)
        reply = output_reply(result.output) if result.state is TaskState.COMPLETED else None
        if reply is not None and not created:
            message = json_to_message(reply, role=Role.ROLE_AGENT, message_id=str(uuid.uuid4()))
            message.context_id = context_id
            if metadata:
                message.metadata.update(metadata)
            await event_queue.enqueue_event(message)
            return
        await announce()
        status = TaskStatus(state=_TO_A2A[result.state], timestamp=_now())
        if result.state in _CARRY_OUTPUT:
            for name, description, parts, artifact_metadata in output_artifacts(result.output):
                if not parts:
                    continue  # every part withheld: the field actions say so
                artifact = Artifact(
                    artifact_id=str(uuid.uuid4()), name=name, description=description, parts=parts
                )
                if artifact_metadata:
                    artifact.metadata.update(artifact_metadata)
                await event_queue.enqueue_event(
                    TaskArtifactUpdateEvent(
                        task_id=task_id, context_id=context_id, artifact=artifact, last_chunk=True
                    )
                )
            shown = output_status_message(result.output) or reply
            if shown is not None:
                message = json_to_message(shown, role=Role.ROLE_AGENT, message_id=str(uuid.uuid4()))
                if message.parts:
                    message.context_id, message.task_id = context_id, task_id
                    status.message.CopyFrom(message)
        elif result.error is not None:
            status.message.CopyFrom(
                _text_message(f"{result.error.code}: {result.error.message}", context_id, task_id)
            )
        event = TaskStatusUpdateEvent(task_id=task_id, context_id=context_id, status=status)
        if metadata:
            event.metadata.update(metadata)
        await event_queue.enqueue_event(event)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id = str(context.task_id)
        caller = context.call_context.user
        owner = caller.subject if isinstance(caller, Caller) and caller.claims else None
        try:
            state = await self.edge.port.cancel(task_id, "canceled by the A2A client", owner=owner)
        except FedgateError as exc:
            log.info("A2A cancel of task %s: %s", task_id, exc.message)
            return
        if state is TaskState.CANCELED:
            self._canceling.add(task_id)
            await event_queue.enqueue_event(
                self._status(task_id, str(context.context_id or ""), TaskState.CANCELED)
            )


# ---- the request handler in front of the SDK's ------------------------------------------


@contextlib.contextmanager
def _gateway_errors() -> Iterator[None]:
    """A gateway error raised while handling a call becomes its A2A error (errors.py)."""
    try:
        yield
    except FedgateError as exc:
        raise to_a2a(exc) from None


@dataclass
class InboundEdge:
    """What the A2A-in request handling shares: the router port, cards, auth, settings."""

    port: ExchangePort
    directory: CardDirectory
    auth: Authenticator
    context_key: bytes
    max_file_bytes: int
    default_deadline: float
    max_deadline: float
    default_target: Target | None = None
    task_capacity: int = 10_000
    base_url: Callable[[], str] = lambda: ""
    grpc_address: Callable[[], str | None] = lambda: None
    store: BoundedTaskStore = field(init=False)

    def __post_init__(self) -> None:
        self.store = BoundedTaskStore(self.task_capacity)

    def card_for(self, card: AgentCard, caller: Caller) -> A2ACard:
        return a2a_card(
            card,
            caller.callable_skills(card),
            our_org=self.port.org,
            base_url=self.base_url(),
            grpc_address=self.grpc_address(),
            require_tokens=self.auth.required,
        )


class GatewayRequestHandler(RequestHandler):
    """Resolves, authenticates and authorizes each call, then hands it to the SDK's handler of
    the agent it is for."""

    def __init__(self, edge: InboundEdge) -> None:
        self.edge = edge
        self._handlers: dict[str, DefaultRequestHandlerV2] = {}
        self._executors: dict[str, RouterExecutor] = {}

    def _target(self, context: ServerCallContext) -> Target:
        target = context.state.get(STATE_TARGET)
        if not isinstance(target, Target):
            target = Target.parse(context.tenant) if context.tenant else self.edge.default_target
        if target is None:
            raise InvalidParamsError(
                "the call names no agent: use the gRPC interface of the agent's card (its tenant "
                "is ORG/AGENT), or set [a2a] grpc_default_agent"
            )
        if not ORG_NAME.match(target.org) or not AGENT_NAME.match(target.agent):
            raise GatewayNotFound(f"no agent {target.key[:140]!r} is reachable from this gateway")
        return target

    async def resolve(self, context: ServerCallContext) -> tuple[Target, AgentCard, Caller]:
        """The agent a call is for, if this caller may reach it (else it does not exist)."""
        target = self._target(context)
        caller = context.user if isinstance(context.user, Caller) else Caller()
        if self.edge.auth.required and not caller.is_authenticated:
            raise GatewayUnauthenticated("no participant token")
        card = await self.edge.directory.find(target)
        if card is None or not caller.callable_skills(card):
            raise GatewayNotFound(
                f"agent {target.key!r} is not reachable from the gateway of "
                f"{self.edge.port.org!r} for this caller: it is not connected, not shared with "
                "us, or the token does not allow calling it"
            )
        context.state[STATE_TARGET] = target
        context.state[STATE_OWNER] = f"{caller.subject}\x00{target.key}"
        return target, card, caller

    async def _handler(self, context: ServerCallContext) -> DefaultRequestHandlerV2:
        target, card, caller = await self.resolve(context)
        return self._handler_for(target, card, caller)

    def _handler_for(
        self, target: Target, card: AgentCard, caller: Caller
    ) -> DefaultRequestHandlerV2:
        handler = self._handlers.get(target.key)
        if handler is None:
            executor = self._executors[target.key] = RouterExecutor(self.edge, target)
            handler = DefaultRequestHandlerV2(
                agent_executor=executor,
                task_store=self.edge.store,
                agent_card=self.edge.card_for(card, caller),
            )
            self._handlers[target.key] = handler
        return handler

    async def _plan(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> DefaultRequestHandlerV2:
        """Check a send before the SDK makes a task of it; the plan goes to the executor."""
        target, card, caller = await self.resolve(context)
        handler = self._handler_for(target, card, caller)
        options = _gateway_options(params)
        skills = caller.callable_skills(card)
        wanted = options.get("skill")
        if wanted is not None:
            if not isinstance(wanted, str) or not any(s.name == wanted for s in skills):
                raise InvalidParamsError(
                    f"agent {target.key!r} has no skill {str(wanted)[:64]!r} this caller may call: "
                    f"choose one of {', '.join(s.name for s in skills)}"
                )
            skill = wanted
        elif len(skills) == 1:
            skill = skills[0].name
        else:
            raise InvalidParamsError(
                f"agent {target.key!r} has several skills: name one in the request's metadata, "
                f'{{"fedgate": {{"skill": NAME}}}}, one of {", ".join(s.name for s in skills)}'
            )
        if params.message.task_id:
            # A follow-up continues a task waiting for input (the router's next turn); one for
            # a task still working is refused before the SDK queues it (a terminal or unknown
            # task the SDK refuses itself).
            stored = await self.edge.store.get(params.message.task_id, context)
            waiting = self._executors[target.key].awaits_input(params.message.task_id)
            if stored is not None and stored.status.state not in TERMINAL and not waiting:
                raise UnsupportedOperationError(
                    f"task {params.message.task_id!r} is still working: send the next message "
                    "when it asks for input"
                )
        payload = request_input(params.message, max_file_bytes=self.edge.max_file_bytes)
        context.state[STATE_PLAN] = SendPlan(
            target=target,
            skill=skill,
            caller=caller,
            payload=payload,
            deadline_seconds=_deadline(options, self.edge.default_deadline, self.edge.max_deadline),
            purpose=_claim(options.get("purpose"), "purpose"),
            roles=tuple(_claim(r, "roles") for r in _list(options.get("roles"))),
            client_context=bool(params.message.context_id),
        )
        return handler

    # -- the A2A operations --

    async def on_message_send(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> Task | Message:
        with _gateway_errors():
            handler = await self._plan(params, context)
            result: Task | Message = await handler.on_message_send(params, context)
            return result

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event, None]:
        with _gateway_errors():
            handler = await self._plan(params, context)
            stream = handler.on_message_send_stream(params, context)
            async with contextlib.aclosing(stream):
                async for event in stream:
                    yield event

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        with _gateway_errors():
            task: Task | None = await (await self._handler(context)).on_get_task(params, context)
            return task

    async def on_list_tasks(
        self, params: ListTasksRequest, context: ServerCallContext
    ) -> ListTasksResponse:
        with _gateway_errors():
            handler = await self._handler(context)
            page: ListTasksResponse = await handler.on_list_tasks(params, context)
            return page

    async def on_cancel_task(
        self, params: CancelTaskRequest, context: ServerCallContext
    ) -> Task | None:
        with _gateway_errors():
            target, card, caller = await self.resolve(context)
            handler = self._handler_for(target, card, caller)
            executor = self._executors[target.key]
            if executor.awaits_input(params.id):
                # Between turns no execution of ours runs for the SDK to cancel: the router
                # holds the task (and the agent its own); cancel it there first.
                stored = await self.edge.store.get(params.id, context)
                if stored is not None:
                    owner = caller.subject if caller.claims is not None else None
                    await self.edge.port.cancel(
                        params.id, "canceled by the A2A client", owner=owner
                    )
                    executor.forget(params.id)
            task: Task | None = await handler.on_cancel_task(params, context)
            return task

    async def on_subscribe_to_task(
        self, params: SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event, None]:
        with _gateway_errors():
            handler = await self._handler(context)
            stream = handler.on_subscribe_to_task(params, context)
            async with contextlib.aclosing(stream):
                async for event in stream:
                    yield event

    async def on_create_task_push_notification_config(
        self, params: TaskPushNotificationConfig, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        with _gateway_errors():
            handler = await self._handler(context)
            made: TaskPushNotificationConfig = (
                await handler.on_create_task_push_notification_config(params, context)
            )
            return made

    async def on_get_task_push_notification_config(
        self, params: GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        with _gateway_errors():
            handler = await self._handler(context)
            found: TaskPushNotificationConfig = await handler.on_get_task_push_notification_config(
                params, context
            )
            return found

    async def on_list_task_push_notification_configs(
        self, params: ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> ListTaskPushNotificationConfigsResponse:
        with _gateway_errors():
            handler = await self._handler(context)
            listed: ListTaskPushNotificationConfigsResponse = (
                await handler.on_list_task_push_notification_configs(params, context)
            )
            return listed

    async def on_delete_task_push_notification_config(
        self, params: DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        with _gateway_errors():
            handler = await self._handler(context)
            await handler.on_delete_task_push_notification_config(params, context)

    async def on_get_extended_agent_card(
        self, params: GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> A2ACard:
        with _gateway_errors():
            handler = await self._handler(context)
            card: A2ACard = await handler.on_get_extended_agent_card(params, context)
            return card

    async def aclose(self) -> None:
        for handler in self._handlers.values():
            await handler.aclose()


def _gateway_options(params: SendMessageRequest) -> dict[str, Any]:
    """`metadata.fedgate` of a send request: what the gateway reads (and nothing leaves)."""
    if not params.HasField("metadata"):
        return {}
    try:
        options = struct_to_dict(params.metadata).get("fedgate", {})
    except ValueError:
        raise InvalidParamsError("the request's metadata is not valid JSON") from None
    if not isinstance(options, dict):
        raise InvalidParamsError('metadata.fedgate is an object: {"skill": NAME, ...}')
    unknown = set(options) - {"skill", "deadlineSeconds", "purpose", "roles"}
    if unknown:
        raise InvalidParamsError(
            f"metadata.fedgate has unknown keys {sorted(unknown)}: the gateway reads skill, "
            "deadlineSeconds, purpose and roles"
        )
    return options


def _deadline(options: dict[str, Any], default: float, maximum: float) -> float:
    value = options.get("deadlineSeconds")
    if value is None:
        return min(default, maximum)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidParamsError("metadata.fedgate.deadlineSeconds is a positive number")
    return float(min(value, maximum))


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidParamsError("metadata.fedgate.roles is a list of strings")
    return value


def _claim(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > _MAX_CLAIM:
        raise InvalidParamsError(
            f"metadata.fedgate.{name} holds strings of at most {_MAX_CLAIM} characters"
        )
    return value


__all__ = [
    "Authenticator",
    "BoundedTaskStore",
    "Caller",
    "GatewayRequestHandler",
    "GrpcContextBuilder",
    "HttpContextBuilder",
    "InboundEdge",
    "RouterExecutor",
]
