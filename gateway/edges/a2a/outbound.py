"""A2A out: an A2A server that knows nothing of Fedgate, offered as one of our local agents.

`A2AAgentBackend` reads the agent's card from its URL (at start, then every `refresh_seconds`,
with the card's ETag), offers the card's skills like those of an SDK agent, and runs each task
as an A2A client of the agent: streaming when the card says so, the task's remaining time as the
call's deadline, and a cancel at the agent when the task ends early (deadline, cancel, the
requester gone). Its updates follow the gateway's rules: progress states only, the output in the
final result, where the router's `share` policy filters it before anything leaves.

Failures take the stable codes of gateway/exchange/router.py: an agent that cannot be reached
fails the task with `no_agent`, one whose connection breaks mid-task with `agent_disconnected`,
one that answers with an error or ends the task failed or rejected with `skill_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import grpc
import httpx
from a2a.client import ClientCallContext, ClientConfig, ClientFactory
from a2a.client.card_resolver import parse_agent_card
from a2a.client.errors import A2AClientError, A2AClientTimeoutError
from a2a.types.a2a_pb2 import (
    AgentCard as A2ACard,
)
from a2a.types.a2a_pb2 import (
    Artifact,
    CancelTaskRequest,
    Message,
    SendMessageRequest,
    StreamResponse,
    Task,
)
from a2a.types.a2a_pb2 import (
    TaskState as A2AState,
)
from a2a.utils.errors import A2AError
from google.protobuf import json_format

from gateway.config import AGENT_NAME
from gateway.edges.a2a.errors import describe
from gateway.edges.a2a.mapping import (
    UnreadablePart,
    derive_context,
    input_to_message,
    reply_output,
    task_output,
)
from gateway.exchange.agents import AgentBackend
from gateway.exchange.tasks import (
    AgentCard,
    SkillCard,
    TaskError,
    TaskResult,
    TaskSpec,
    TaskState,
    TaskUpdate,
)

log = logging.getLogger("fedgate.a2a")

TRANSPORTS = ["JSONRPC", "HTTP+JSON", "GRPC"]
DOWN_PROBE_SECONDS = 1.0
_STATES = {
    A2AState.TASK_STATE_SUBMITTED: TaskState.SUBMITTED,
    A2AState.TASK_STATE_WORKING: TaskState.WORKING,
    A2AState.TASK_STATE_COMPLETED: TaskState.COMPLETED,
    A2AState.TASK_STATE_FAILED: TaskState.FAILED,
    A2AState.TASK_STATE_CANCELED: TaskState.CANCELED,
    A2AState.TASK_STATE_INPUT_REQUIRED: TaskState.INPUT_REQUIRED,
    A2AState.TASK_STATE_REJECTED: TaskState.REJECTED,
    A2AState.TASK_STATE_AUTH_REQUIRED: TaskState.AUTH_REQUIRED,
}
_MESSAGES = {
    "no_agent": "the A2A agent could not be reached",
    "agent_disconnected": "the connection to the A2A agent broke mid-task",
}


def fedgate_card(org: str, name: str, card: A2ACard) -> AgentCard:
    """The gateway's card for an A2A agent: each skill whose id is a valid skill name."""
    skills = []
    for skill in card.skills:
        if AGENT_NAME.match(skill.id):
            skills.append(SkillCard(name=skill.id, description=skill.description or skill.name))
        else:
            log.warning(
                "A2A agent %s: skill id %r is not a valid skill name (letters, digits, '-', '_'); "
                "it is not offered",
                name,
                skill.id[:64],
            )
    return AgentCard(
        org=org, name=name, description=card.description, version=card.version, skills=tuple(skills)
    )


class _Transport(Exception):
    """The agent could not be reached, or its connection broke."""


class A2AAgentBackend(AgentBackend):
    """One A2A server, configured by the URL of its card."""

    def __init__(
        self,
        name: str,
        card_url: str,
        *,
        org: str,
        context_key: bytes,
        max_file_bytes: int,
        refresh_seconds: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.name = name
        self.card_url = card_url
        self.org = org
        self.refresh_seconds = refresh_seconds
        self.max_file_bytes = max_file_bytes
        self._context_key = context_key
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        self._a2a_card: A2ACard | None = None
        self._card: AgentCard | None = None
        self._etag = ""
        self._reachable = False
        self._watch: asyncio.Task[None] | None = None
        self._factory: ClientFactory | None = None
        # Tasks whose agent asked for input: (the agent's task id, its context id).
        self._held: dict[str, tuple[str, str]] = {}
        self._ending: set[asyncio.Task[None]] = set()
        self._lost = asyncio.Event()
        self._channels: dict[str, grpc.aio.Channel] = {}

    # ---- the card ------------------------------------------------------------------------

    @property
    def card(self) -> AgentCard | None:
        return self._card

    @property
    def available(self) -> bool:
        return self._card is not None and self._reachable

    def _set_reachable(self, reachable: bool) -> None:
        was, self._reachable = self._reachable, reachable
        if reachable and not was and self.on_available is not None:
            self.on_available()  # tasks waiting for this agent go ahead
        if was and not reachable:
            self._lost.set()  # the watcher looks for it again at once, then often

    async def refresh(self) -> bool:
        """Read the card again; True when it changed. A failure keeps the card we had."""
        headers = {"If-None-Match": self._etag} if self._etag else {}
        try:
            response = await self._http.get(self.card_url, headers=headers, timeout=5.0)
            if response.status_code == 304:
                self._set_reachable(True)
                return False
            response.raise_for_status()
            card = parse_agent_card(response.json())
        except (httpx.HTTPError, ValueError, json_format.ParseError) as exc:
            self._set_reachable(False)
            log.warning("A2A agent %s: card at %s not read: %s", self.name, self.card_url, exc)
            return False
        self._etag = response.headers.get("etag", "")
        if self._a2a_card is not None and card == self._a2a_card:
            return False
        changed = self._a2a_card is not None
        self._a2a_card = card
        self._card = fedgate_card(self.org, self.name, card)
        self._factory = None
        self._set_reachable(True)
        log.info(
            "A2A agent %s: card %s (%s)",
            self.name,
            "changed" if changed else "read",
            ", ".join(s.name for s in self._card.skills) or "no skills offered",
        )
        return True

    def start(self) -> None:
        """Watch the card: read it now and every `refresh_seconds`."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_card())

    async def _watch_card(self) -> None:
        while True:
            await self.refresh()
            # An agent that is down is looked for more often: tasks are waiting for it.
            pause = (
                self.refresh_seconds
                if self._reachable
                else min(self.refresh_seconds, DOWN_PROBE_SECONDS)
            )
            self._lost.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), pause)

    async def close(self) -> None:
        for ending in list(self._ending):
            with contextlib.suppress(BaseException):
                await ending
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self._owns_http:
            await self._http.aclose()

    def _channel(self, url: str) -> grpc.aio.Channel:
        channel = self._channels.get(url)
        if channel is None:
            channel = self._channels[url] = grpc.aio.insecure_channel(url)
        return channel

    def _client_factory(self) -> ClientFactory:
        if self._factory is None:
            self._factory = ClientFactory(
                ClientConfig(
                    streaming=True,
                    httpx_client=self._http,
                    grpc_channel_factory=self._channel,
                    supported_protocol_bindings=TRANSPORTS,
                )
            )
        return self._factory

    # ---- tasks ---------------------------------------------------------------------------

    def _message(self, spec: TaskSpec, requester_org: str) -> Message:
        message = input_to_message(spec.input, message_id=str(uuid.uuid4()))
        context = spec.input.get("context")
        if isinstance(context, str) and context:
            # Ours as is; another organization's, derived once more, so that one organization
            # cannot join another's conversation with our agent by sending its context id.
            message.context_id = (
                context
                if requester_org == self.org
                else derive_context(self._context_key, f"from:{requester_org}", context)
            )
        return message

    def dispatch(self, spec: TaskSpec, requester_org: str) -> AsyncGenerator[TaskUpdate, None]:
        return self._turn(spec, requester_org, self._message(spec, requester_org))

    def continue_task(self, spec: TaskSpec, requester_org: str) -> AsyncGenerator[TaskUpdate, None]:
        """The requester's next message, to the agent's task that asked for input."""
        held = self._held.pop(spec.task_id, None)
        message = self._message(spec, requester_org)
        if held is not None:
            message.task_id, message.context_id = held
        return self._turn(spec, requester_org, message, continues=held is not None)

    def end(self, task_id: str, reason: str) -> None:
        """Give up a task waiting for input: the agent's task is canceled (best effort)."""
        held = self._held.pop(task_id, None)
        card = self._a2a_card
        if held is None or card is None:
            return
        client = self._client_factory().create(card)

        async def cancel() -> None:
            try:
                await self._cancel_at_agent(client, held[0])
            finally:
                with contextlib.suppress(Exception):
                    await client.close()

        ending = asyncio.ensure_future(cancel())
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    async def _turn(
        self, spec: TaskSpec, requester_org: str, message: Message, *, continues: bool = True
    ) -> AsyncGenerator[TaskUpdate, None]:
        card = self._a2a_card
        if card is None:
            yield _failed(spec, "no_agent", f"the card of A2A agent {self.name!r} is not known")
            return
        if not continues:
            yield _failed(
                spec, "agent_disconnected", "the A2A agent's task waiting for input is not held"
            )
            return
        request = SendMessageRequest(message=message)
        request.metadata.update(
            {
                "fedgate": {
                    "requesterOrg": requester_org,
                    "taskId": spec.task_id,
                    "skill": spec.skill,
                    "turn": spec.turn,
                    "deadlineUnixMs": int(spec.deadline * 1000),
                }
            }
        )
        run = _Run(spec, self.max_file_bytes)
        client = self._client_factory().create(card)
        try:
            try:
                async for response in client.send_message(
                    request, context=ClientCallContext(timeout=max(0.001, spec.remaining()))
                ):
                    for update in run.take(response):
                        if update.state.ends_turn and not update.state.final:
                            # The agent asks for input: it keeps its task for the next turn.
                            self._held[spec.task_id] = (run.agent_task_id, run.agent_context_id)
                        yield update
                        if update.state.ends_turn:
                            return
            except A2AClientTimeoutError:
                # The task's deadline: the router ends it, as for any agent.
                await asyncio.Event().wait()
            except A2AError as exc:
                if _is_transport(exc):
                    self._set_reachable(False)  # until the card can be read again
                    code = "agent_disconnected" if run.started else "no_agent"
                    log.warning("A2A agent %s: %s (%s)", self.name, _MESSAGES[code], describe(exc))
                    yield _failed(spec, code, f"{_MESSAGES[code]}: {describe(exc)}")
                    return
                yield _failed(spec, "skill_error", f"the A2A agent answered {describe(exc)}")
                return
            except UnreadablePart as exc:
                yield _failed(spec, "invalid_result", exc.message)
                return
            yield _failed(
                spec,
                "agent_disconnected",
                f"{_MESSAGES['agent_disconnected']}: its answer ended before the task did",
            )
        finally:
            if run.agent_task_id and not run.finished:
                await asyncio.shield(self._cancel_at_agent(client, run.agent_task_id))
            with contextlib.suppress(Exception):
                await client.close()

    async def _cancel_at_agent(self, client: Any, agent_task_id: str) -> None:
        """Best effort: stop the agent's task when ours ended before it did."""
        try:
            await client.cancel_task(
                CancelTaskRequest(id=agent_task_id), context=ClientCallContext(timeout=5.0)
            )
        except (A2AError, httpx.HTTPError, grpc.aio.AioRpcError) as exc:
            log.info("A2A agent %s: task %s not canceled: %s", self.name, agent_task_id, exc)


def _is_transport(exc: A2AError) -> bool:
    """An error that says the agent was not reached (or was lost), not an answer of the agent."""
    if type(exc) is not A2AClientError:
        return False
    cause = exc.__cause__
    if isinstance(cause, httpx.RequestError):
        return True
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
    )


def _failed(spec: TaskSpec, code: str, message: str) -> TaskUpdate:
    return TaskUpdate(
        spec.task_id,
        TaskState.FAILED,
        result=TaskResult(spec.task_id, TaskState.FAILED, error=TaskError(code, message)),
    )


class _Run:
    """What one task at an A2A agent has said so far; progress out, output only at the end."""

    def __init__(self, spec: TaskSpec, max_file_bytes: int) -> None:
        self.spec = spec
        self.max_file_bytes = max_file_bytes
        self.agent_task_id = ""
        self.agent_context_id = ""
        self.artifacts: dict[str, Artifact] = {}
        self.status_message: Message | None = None
        self.state: TaskState | None = None
        self.started = False
        self.finished = False  # the agent ended this turn (or the task): nothing to cancel

    def take(self, response: StreamResponse) -> list[TaskUpdate]:
        self.started = True
        kind = response.WhichOneof("payload")
        if kind == "message":
            self.finished = True
            output = reply_output(response.message, max_file_bytes=self.max_file_bytes)
            return [self._final(TaskState.COMPLETED, output)]
        if kind == "task":
            return self._task(response.task)
        if kind == "artifact_update":
            event = response.artifact_update
            self.agent_task_id = self.agent_task_id or event.task_id
            self._artifact(event.artifact, append=event.append)
            return []
        if kind == "status_update":
            event = response.status_update
            self.agent_task_id = self.agent_task_id or event.task_id
            self.agent_context_id = self.agent_context_id or event.context_id
            status = event.status
            return self._status(
                status.state, status.message if status.HasField("message") else None
            )
        return []

    def _task(self, task: Task) -> list[TaskUpdate]:
        self.agent_task_id, self.agent_context_id = task.id, task.context_id
        for artifact in task.artifacts:
            self._artifact(artifact, append=False)
        status = task.status
        return self._status(status.state, status.message if status.HasField("message") else None)

    def _artifact(self, artifact: Artifact, *, append: bool) -> None:
        known = self.artifacts.get(artifact.artifact_id)
        if known is not None and append:
            known.parts.extend(artifact.parts)
            return
        copy = Artifact()
        copy.CopyFrom(artifact)
        self.artifacts[artifact.artifact_id] = copy

    def _status(self, a2a_state: int, message: Message | None) -> list[TaskUpdate]:
        state = _STATES.get(a2a_state)  # type: ignore[call-overload]
        if state is None:
            return []
        if message is not None:
            self.status_message = message
        if state.ends_turn:
            self.finished = True
            if state in (TaskState.COMPLETED, TaskState.INPUT_REQUIRED, TaskState.AUTH_REQUIRED):
                output = task_output(
                    self.artifacts.values(), self.status_message, max_file_bytes=self.max_file_bytes
                )
                return [self._final(state, output)]
            code = "canceled" if state is TaskState.CANCELED else "skill_error"
            text = _text(self.status_message) or f"the A2A agent ended the task {state.value}"
            return [
                TaskUpdate(
                    self.spec.task_id,
                    state,
                    result=TaskResult(self.spec.task_id, state, error=TaskError(code, text)),
                )
            ]
        if state is self.state:
            return []
        self.state = state
        # Progress carries a state only: the agent's status text stays with the router, which
        # shows it to our own requesters and never to a partner.
        return [TaskUpdate(self.spec.task_id, state, message=_text(message))]

    def _final(self, state: TaskState, output: dict[str, Any]) -> TaskUpdate:
        return TaskUpdate(
            self.spec.task_id, state, result=TaskResult(self.spec.task_id, state, output=output)
        )


def _text(message: Message | None) -> str:
    if message is None:
        return ""
    return " ".join(p.text for p in message.parts if p.WhichOneof("content") == "text")[:1000]


__all__ = ["A2AAgentBackend", "fedgate_card"]
