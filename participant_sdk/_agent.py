"""Agents: skills as decorated async functions, served to the local gateway over one stream."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, overload

import grpc
from fedgate.convert import dict_to_struct, struct_to_dict
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from participant_sdk._channel import TlsCa, ca_pem, open_channel
from participant_sdk._client import Client
from participant_sdk._errors import DeadlineExceeded, SkillDefinitionError, from_rpc_error
from participant_sdk._types import TaskContext, scoped_task_key

log = logging.getLogger("participant_sdk.agent")

NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})$")
SkillFunction = Callable[[TaskContext, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class SkillSpec:
    name: str
    function: SkillFunction
    description: str
    input_schema: dict[str, Any] | None
    output_schema: dict[str, Any] | None


class Agent:
    """A named agent and its skills.

    triage = Agent("triage", description="Routes patients")

    @triage.skill(input_schema={...}, output_schema={...})
    async def assess(task: TaskContext, data: dict) -> dict: ...
    """

    def __init__(self, name: str, *, description: str = "", version: str = "") -> None:
        if not NAME.match(name):
            raise SkillDefinitionError(
                f"agent name {name!r} is not valid: letters, digits, '-' and '_', at most 63"
            )
        self.name = name
        self.description = description
        self.version = version
        self.skills: dict[str, SkillSpec] = {}

    @overload
    def skill(self, function: SkillFunction, /) -> SkillFunction: ...

    @overload
    def skill(
        self,
        *,
        name: str | None = None,
        description: str | None = None,
        input_schema: dict[str, Any] | None = None,
        output_schema: dict[str, Any] | None = None,
    ) -> Callable[[SkillFunction], SkillFunction]: ...

    def skill(
        self,
        function: SkillFunction | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        input_schema: dict[str, Any] | None = None,
        output_schema: dict[str, Any] | None = None,
    ) -> SkillFunction | Callable[[SkillFunction], SkillFunction]:
        """Register an async function `(task, input) -> dict` as a skill; checked right here."""

        def register(func: SkillFunction) -> SkillFunction:
            skill_name = name or func.__name__
            if not NAME.match(skill_name):
                raise SkillDefinitionError(f"skill name {skill_name!r} is not valid")
            if skill_name in self.skills:
                raise SkillDefinitionError(
                    f"agent {self.name!r} already has a skill named {skill_name!r}"
                )
            if not inspect.iscoroutinefunction(func):
                raise SkillDefinitionError(
                    f"skill {skill_name!r} must be an async function (async def)"
                )
            params = [
                p
                for p in inspect.signature(func).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            if len(params) != 2:
                raise SkillDefinitionError(
                    f"skill {skill_name!r} must take exactly two arguments (task, input), "
                    f"not {len(params)}"
                )
            for label, schema in (("input_schema", input_schema), ("output_schema", output_schema)):
                if schema is not None and not isinstance(schema, dict):
                    raise SkillDefinitionError(f"skill {skill_name!r}: {label} must be a dict")
            self.skills[skill_name] = SkillSpec(
                skill_name,
                func,
                description if description is not None else inspect.getdoc(func) or "",
                input_schema,
                output_schema,
            )
            return func

        return register(function) if function is not None else register

    def card(self) -> pb.AgentCard:
        return pb.AgentCard(
            name=self.name,
            description=self.description,
            version=self.version,
            skills=[
                pb.Skill(
                    name=s.name,
                    description=s.description,
                    input_schema=dict_to_struct(s.input_schema),
                    output_schema=dict_to_struct(s.output_schema),
                )
                for s in self.skills.values()
            ],
        )


async def run_skill_function(
    spec: SkillSpec, context: TaskContext, data: dict[str, Any]
) -> dict[str, Any]:
    """Call a skill until its deadline and check that it returned a JSON object.

    At the deadline `context.cancelled` is set first, then the skill's coroutine is cancelled, and
    DeadlineExceeded is raised (also when the skill swallowed the cancellation: an answer after
    the deadline is no answer). The deadline holds even while the gateway cannot cancel.
    """
    task = asyncio.current_task()
    assert task is not None, "a skill runs in an asyncio task"
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        context.cancelled.set()
        task.cancel()

    timer = asyncio.get_running_loop().call_later(context.time_remaining, expire)
    try:
        output = await spec.function(context, data)
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            raise DeadlineExceeded(f"task {context.task_id} passed its deadline") from None
        raise
    finally:
        timer.cancel()
    if expired:
        task.uncancel()
        raise DeadlineExceeded(f"task {context.task_id} passed its deadline")
    if not isinstance(output, dict):
        raise TypeError(f"skill {spec.name!r} returned {type(output).__name__}, expected a dict")
    return output


@dataclass
class _Job:
    """One task this process runs, by idempotency key; it outlives a dropped gateway connection."""

    key: str
    task_id: str
    context: TaskContext
    task: asyncio.Task[None] | None = None
    final: pb.TaskUpdate | None = None
    # Multi-turn: the turn the skill is in, and while it waits in task.ask, the question it
    # sent (sent again if the gateway hands the task again) and the answer it waits for.
    turn: int = 0
    question: pb.TaskUpdate | None = None
    answer: asyncio.Future[dict[str, Any]] | None = None


class AgentWorker:
    """Serves agents against the local gateway; reconnects with backoff when it goes away.

    A skill keeps running when the connection to the gateway drops: when the gateway (restarted,
    or another replica) hands the same task again, by idempotency key, the worker re-attaches to
    the running skill or answers with its finished result, so the skill runs once.
    """

    def __init__(
        self,
        agents: Sequence[Agent],
        gateway: str,
        *,
        token: str | None = None,
        instance_id: str | None = None,
        max_backoff: float = 5.0,
        remember_finished: int = 1_000,
        tls_ca: TlsCa = None,
    ) -> None:
        if not agents:
            raise SkillDefinitionError("serve at least one agent")
        for agent in agents:
            if not agent.skills:
                raise SkillDefinitionError(f"agent {agent.name!r} has no skills")
        self.agents = {agent.name: agent for agent in agents}
        self.gateway = gateway
        self.token = token or ""
        # TLS to a participant listener with a certificate: the CA that issued it (see Client).
        self.tls_ca = ca_pem(tls_ca)
        self.instance_id = instance_id or uuid.uuid4().hex
        self.max_backoff = max_backoff
        self.connected = asyncio.Event()
        self.connections = 0
        self._stopping = False
        self._call: Any = None
        self._outgoing: asyncio.Queue[pb.AgentMessage | None] | None = None
        self._jobs: dict[str, _Job] = {}
        self._finished: OrderedDict[str, _Job] = OrderedDict()
        self._remember_finished = remember_finished
        self._client: Any = None

    async def run(self) -> None:
        """Connect, serve, and reconnect after any disconnect until `stop()`."""
        attempt = 0
        try:
            while not self._stopping:
                try:
                    await self._session()
                    attempt = 0
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.UNAUTHENTICATED,
                    ):
                        raise from_rpc_error(exc) from None
                    log.info(
                        "gateway %s unavailable (%s); reconnecting", self.gateway, exc.code().name
                    )
                self.connected.clear()
                if self._stopping:
                    break
                attempt += 1
                delay = min(self.max_backoff, 0.05 * 2 ** min(attempt, 10))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter
        finally:
            self._cancel_all()
            if self._client is not None:
                await self._client.close()
                self._client = None

    def client(self) -> Any:
        """A Client on this worker's gateway and token, for skills that call onward."""
        if self._client is None:
            self._client = Client(
                self.gateway,
                token=self.token or None,
                requester=f"agent:{','.join(self.agents)}",
                tls_ca=self.tls_ca,
            )
        return self._client

    def stop(self) -> None:
        self._stopping = True
        if self._call is not None:
            self._call.cancel()
        self._cancel_all()

    def _cancel_all(self) -> None:
        for job in list(self._jobs.values()):
            job.context.cancelled.set()
            if job.task is not None:
                job.task.cancel()

    def _send(self, update: pb.TaskUpdate) -> None:
        if self._outgoing is not None:
            self._outgoing.put_nowait(pb.AgentMessage(update=update))

    async def _session(self) -> None:
        outgoing: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
        outgoing.put_nowait(
            pb.AgentMessage(
                register=pb.RegisterAgents(
                    cards=[a.card() for a in self.agents.values()],
                    instance_id=self.instance_id,
                    token=self.token,
                )
            )
        )

        async def requests() -> AsyncIterator[pb.AgentMessage]:
            while True:
                message = await outgoing.get()
                if message is None:
                    return
                yield message

        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        async with open_channel(self.gateway, self.tls_ca) as channel:
            stub = pb_grpc.ParticipantStub(channel)
            self._call = call = stub.Connect(requests(), metadata=metadata)
            self._outgoing = outgoing
            try:
                async for message in call:
                    kind = message.WhichOneof("kind")
                    if kind == "registered":
                        self.connections += 1
                        self.connected.set()
                    elif kind == "task":
                        self._assign(message.task)
                    elif kind == "cancel":
                        self._cancel_task(message.cancel.task_id)
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
            finally:
                self._call = None
                self._outgoing = None
                outgoing.put_nowait(None)

    def _assign(self, assignment: pb.TaskAssignment) -> None:
        request = assignment.request
        # Scoped as at the gateway (the requesting organization, who asked there, the target and
        # the idempotency key), so a key reused by someone else, or for another skill, runs again.
        key = _task_key(assignment)
        finished = self._finished.get(key)
        if finished is not None and finished.final is not None:
            # Handed again after a reconnect: the skill already ran; send its result again.
            update = pb.TaskUpdate()
            update.CopyFrom(finished.final)
            update.task_id = update.result.task_id = request.task_id
            self._send(update)
            return
        running = self._jobs.get(key)
        if running is not None:
            if request.turn > running.turn and running.answer is not None:
                # The requester's next message, for the skill waiting in task.ask.
                running.turn, running.question = request.turn, None
                if not running.answer.done():
                    running.answer.set_result(struct_to_dict(request.input))
                return
            # Handed again after a reconnect while it still runs: its result goes to the new id
            # (and a question it is waiting on an answer for is asked again).
            running.task_id = request.task_id
            if running.question is not None:
                self._send(running.question)
            return
        self._start_job(key, assignment)

    def _start_job(self, key: str, assignment: pb.TaskAssignment) -> None:
        request = assignment.request
        deadline = request.deadline_unix_ms / 1000 if request.deadline_unix_ms else time.time() + 30

        async def progress(message: str) -> None:
            self._send(
                pb.TaskUpdate(task_id=job.task_id, state=pb.TASK_STATE_WORKING, message=message)
            )

        async def ask(question: dict[str, Any]) -> dict[str, Any]:
            result = pb.TaskResult(
                task_id=job.task_id,
                state=pb.TASK_STATE_INPUT_REQUIRED,
                output=dict_to_struct(question),
                turn=job.turn,
            )
            job.question = pb.TaskUpdate(
                task_id=job.task_id, state=pb.TASK_STATE_INPUT_REQUIRED, result=result
            )
            job.answer = asyncio.get_running_loop().create_future()
            self._send(job.question)
            try:
                return await job.answer
            finally:
                job.answer = None

        context = TaskContext(
            task_id=request.task_id,
            requester_org=assignment.requester_org,
            requester=request.requester,
            agent=request.agent,
            skill=request.skill,
            deadline=deadline,
            idempotency_key=key,
            _send_progress=progress,
            _calls=self,
            _ask=ask,
        )
        job = _Job(key, request.task_id, context)
        agent = self.agents.get(request.agent)
        spec = agent.skills.get(request.skill) if agent else None

        def finish(result: pb.TaskResult) -> None:
            result.task_id = job.task_id
            job.final = pb.TaskUpdate(task_id=job.task_id, state=result.state, result=result)
            self._jobs.pop(key, None)
            self._finished[key] = job
            while len(self._finished) > self._remember_finished:
                self._finished.popitem(last=False)
            self._send(job.final)

        async def execute() -> None:
            if spec is None:
                finish(
                    _failed(
                        job.task_id,
                        "unknown_skill",
                        f"this instance has no skill {request.agent}.{request.skill}",
                    )
                )
                return
            # No "working" message: the gateway tells the requester when it hands the task over.
            try:
                output = await run_skill_function(spec, context, struct_to_dict(request.input))
                finish(pb.TaskResult(state=pb.TASK_STATE_COMPLETED, output=dict_to_struct(output)))
            except DeadlineExceeded:
                finish(_failed(job.task_id, "deadline_exceeded", "the task's deadline passed"))
            except asyncio.CancelledError:
                finish(_failed(job.task_id, "canceled", "canceled", pb.TASK_STATE_CANCELED))
            except Exception as exc:
                log.warning(
                    "skill %s.%s failed: %s", request.agent, request.skill, type(exc).__name__
                )
                finish(_failed(job.task_id, "skill_error", f"{type(exc).__name__}: {exc}"))

        self._jobs[key] = job
        job.task = asyncio.ensure_future(execute())

    def _cancel_task(self, task_id: str) -> None:
        for job in list(self._jobs.values()):
            if job.task_id == task_id and job.task is not None:
                job.context.cancelled.set()
                job.task.cancel()


def _task_key(assignment: pb.TaskAssignment) -> str:
    """The scoped key of an assigned task (TaskContext.idempotency_key)."""
    request = assignment.request
    return scoped_task_key(
        assignment.requester_org,
        request.requester,
        f"{request.target_org}/{request.agent}.{request.skill}",
        request.idempotency_key,
        request.task_id,
    )


def _failed(
    task_id: str, code: str, message: str, state: pb.TaskState = pb.TASK_STATE_FAILED
) -> pb.TaskResult:
    return pb.TaskResult(
        task_id=task_id, state=state, error=pb.TaskError(code=code, message=message)
    )


async def serve(
    *agents: Agent,
    gateway: str = "127.0.0.1:7400",
    token: str | None = None,
    instance_id: str | None = None,
    tls_ca: TlsCa = None,
) -> None:
    """Serve agents against the local gateway until cancelled, reconnecting as needed.

    `tls_ca`: the CA certificate (PEM bytes or a path) of a participant listener with TLS.
    """
    worker = AgentWorker(agents, gateway, token=token, instance_id=instance_id, tls_ca=tls_ca)
    try:
        await worker.run()
    finally:
        worker.stop()
