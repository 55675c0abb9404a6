"""Local agents: the instances connected to this gateway and the dispatch of tasks to them.

Each connected SDK process is an `AgentInstance` with an outbox (what the Connect stream sends it)
and the set of tasks it holds. Several instances of one agent share its tasks: a task goes to
the instance with the fewest tasks in flight. An instance that disconnects fails its tasks at
once with the reason; the router then hands them to another instance, or to the same agent when
it reconnects, while their deadlines allow.

The registry remembers the cards of agents that were connected since the gateway started: an
agent that is restarting is known, and a task for it waits for an instance instead of being
refused as if it did not exist.

An `AgentBackend` is a local agent the gateway calls itself instead of one that connects to it
(an A2A server: gateway/edges/a2a/outbound.py). The registry offers its card and runs its tasks
through it when no SDK instance of that name is connected; while it is unavailable it counts as
no instance (a task waits for it, as for a restarting agent).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from gateway.errors import NotFound, Unavailable
from gateway.exchange.tasks import AgentCard, TaskError, TaskResult, TaskSpec, TaskState, TaskUpdate

log = logging.getLogger("fedgate.agents")


@dataclass(frozen=True)
class Assignment:
    """A task handed to an instance; `requester_org` is the proven asking organization."""

    spec: TaskSpec
    requester_org: str


@dataclass(frozen=True)
class CancelRequest:
    task_id: str
    reason: str


OutboxItem = Assignment | CancelRequest | None  # None closes the stream


@dataclass(eq=False)
class AgentInstance:
    instance_id: str
    cards: dict[str, AgentCard]
    outbox: asyncio.Queue[OutboxItem] = field(default_factory=asyncio.Queue)
    tasks: dict[str, asyncio.Queue[TaskUpdate]] = field(default_factory=dict)
    closed: bool = False
    # The participant token's subject that connected this instance ("" without tokens): a call
    # it makes while serving a task is known to come from that task.
    subject: str = ""
    # Tasks held between turns (their turn ended input-required): updates for them are dropped
    # until the requester's next message starts the next turn.
    parked: set[str] = field(default_factory=set)


class AgentBackend(abc.ABC):
    """A local agent the gateway reaches itself (it does not connect to the gateway).

    Its turns follow the registry's: `dispatch` runs turn 0, `continue_task` a next turn of a
    task it holds (its last turn ended input-required), `end` gives up a task it holds between
    turns. Each yields the turn's updates, the last one ending the turn; closing one early stops
    the task at the agent.
    """

    name: str
    # Set by the registry: call it when the backend becomes available (wakes waiting tasks).
    on_available: Callable[[], None] | None = None

    @property
    @abc.abstractmethod
    def card(self) -> AgentCard | None:
        """Its card now; None while it is not known (the agent is then not offered)."""

    @property
    def available(self) -> bool:
        """Whether a task may go to it now (it counts as one instance)."""
        return self.card is not None

    @abc.abstractmethod
    def dispatch(self, spec: TaskSpec, requester_org: str) -> AsyncGenerator[TaskUpdate, None]:
        """Run turn 0 of a task."""

    @abc.abstractmethod
    def continue_task(self, spec: TaskSpec, requester_org: str) -> AsyncGenerator[TaskUpdate, None]:
        """Run the next turn of a task this backend holds."""

    @abc.abstractmethod
    def end(self, task_id: str, reason: str) -> None:
        """Give up a task held between turns (its deadline, a cancel)."""


class AgentRegistry:
    """Which agents are connected, and routing of tasks and their updates."""

    def __init__(self, org: str) -> None:
        self.org = org
        self._instances: dict[str, list[AgentInstance]] = {}
        self._owner: dict[str, AgentInstance] = {}
        self._known: dict[str, AgentCard] = {}
        self._arrivals: dict[str, asyncio.Event] = {}
        self._tiebreak = itertools.count()
        self._backends: dict[str, AgentBackend] = {}
        self._backend_tasks: dict[str, str] = {}  # task id -> agent, for tasks backends hold

    def add_backend(self, backend: AgentBackend) -> None:
        """Offer an agent the gateway calls itself (used when no SDK instance is connected)."""
        self._backends[backend.name] = backend
        backend.on_available = lambda: self._arrived(backend.name)

    def _arrived(self, agent: str) -> None:
        arrival = self._arrivals.pop(agent, None)
        if arrival is not None:
            arrival.set()

    def _backend(self, agent: str) -> AgentBackend | None:
        """The backend of `agent`, when no SDK instance of it is connected and it has a card."""
        if self._instances.get(agent):
            return None
        backend = self._backends.get(agent)
        return backend if backend is not None and backend.card is not None else None

    def register(self, instance: AgentInstance) -> None:
        for name, card in instance.cards.items():
            self._instances.setdefault(name, []).append(instance)
            self._known[name] = card
            arrival = self._arrivals.pop(name, None)
            if arrival is not None:
                arrival.set()
        log.info("agent instance %s connected: %s", instance.instance_id, ", ".join(instance.cards))

    def unregister(
        self, instance: AgentInstance, reason: str = "agent instance disconnected"
    ) -> None:
        """Remove an instance and fail every task it still held."""
        instance.closed = True
        for name in instance.cards:
            group = self._instances.get(name, [])
            if instance in group:
                group.remove(instance)
            if not group:
                self._instances.pop(name, None)
        for task_id, queue in list(instance.tasks.items()):
            self._owner.pop(task_id, None)
            queue.put_nowait(
                TaskUpdate(
                    task_id,
                    TaskState.FAILED,
                    result=TaskResult(
                        task_id,
                        TaskState.FAILED,
                        error=TaskError("agent_disconnected", f"{reason} mid-task"),
                        responder_org=self.org,
                    ),
                )
            )
        instance.tasks.clear()
        instance.outbox.put_nowait(None)
        log.info("agent instance %s disconnected", instance.instance_id)

    def close_all(self) -> None:
        """Close every instance's stream (at shutdown); the SDK reconnects to the next gateway."""
        for instance in {i for group in self._instances.values() for i in group}:
            instance.outbox.put_nowait(None)

    def card(self, agent: str) -> AgentCard | None:
        """The card of a connected agent (or of a backend)."""
        group = self._instances.get(agent)
        if group:
            return group[-1].cards[agent]
        backend = self._backend(agent)
        return backend.card if backend is not None else None

    def known_card(self, agent: str) -> AgentCard | None:
        """The card of a connected agent, or of one connected earlier (it may be restarting)."""
        return self.card(agent) or self._known.get(agent)

    async def wait_for_instance(self, agent: str) -> None:
        """Return once an instance of `agent` is connected (the caller bounds the wait)."""
        while not self.instance_count(agent):
            arrival = self._arrivals.setdefault(agent, asyncio.Event())
            await arrival.wait()

    def serves(self, subject: str, task_id: str) -> bool:
        """Whether an instance connected by `subject` holds the task `task_id`.

        Without participant tokens an instance has no subject, and a caller cannot be told
        apart from any other local process: then holding the task is enough.
        """
        instance = self._owner.get(task_id)
        if instance is None or instance.closed:
            return False
        return not instance.subject or instance.subject == subject

    def tasks_served_by(self, subject: str) -> list[str]:
        """The tasks held by the instances that `subject` connected (none without tokens)."""
        if not subject:
            return []
        return [task for task, instance in self._owner.items() if instance.subject == subject]

    def cards(self) -> list[AgentCard]:
        names = set(self._instances) | {n for n in self._backends if self._backend(n)}
        return [card for name in sorted(names) if (card := self.card(name)) is not None]

    def instance_count(self, agent: str) -> int:
        backend = self._backend(agent)
        if backend is not None:
            return 1 if backend.available else 0
        return len(self._instances.get(agent, ()))

    def in_flight(self, agent: str) -> int:
        local = sum(len(i.tasks) for i in self._instances.get(agent, ()))
        return local + sum(1 for name in self._backend_tasks.values() if name == agent)

    def deliver(self, instance: AgentInstance, update: TaskUpdate) -> bool:
        """Route an update from an instance; updates for tasks it does not hold are dropped."""
        queue = instance.tasks.get(update.task_id)
        if queue is None:
            return False
        if update.task_id in instance.parked:
            log.warning(
                "agent instance %s sent an update for task %s between its turns; dropped",
                instance.instance_id,
                update.task_id,
            )
            return False
        if update.state.final:
            instance.tasks.pop(update.task_id, None)
            self._owner.pop(update.task_id, None)
        queue.put_nowait(update)
        return True

    def cancel(self, task_id: str, reason: str) -> bool:
        instance = self._owner.get(task_id)
        if instance is None or instance.closed:
            return False
        instance.outbox.put_nowait(CancelRequest(task_id, reason))
        return True

    def end(self, task_id: str, reason: str) -> None:
        """Give up a task held between turns (its deadline, a cancel): the instance stops it."""
        agent = self._backend_tasks.pop(task_id, None)
        if agent is not None and agent in self._backends:
            self._backends[agent].end(task_id, reason)
            return
        instance = self._owner.pop(task_id, None)
        if instance is not None:
            instance.parked.discard(task_id)
        held = instance is not None and instance.tasks.pop(task_id, None) is not None
        if held and instance is not None and not instance.closed:
            instance.outbox.put_nowait(CancelRequest(task_id, reason))

    async def dispatch(self, spec: TaskSpec, requester_org: str) -> AsyncIterator[TaskUpdate]:
        """Run a task on the least busy instance; yields WORKING, then its updates, the last one
        ending the turn: a final one, or input-required (the instance keeps the task for its
        next turn, see continue_task).

        Leaving early (deadline, cancellation) tells the instance to stop the task.
        """
        backend = self._backend(spec.agent)
        if backend is not None:
            async for update in self._backend_turn(backend.dispatch(spec, requester_org), spec):
                yield update
            return
        group = self._instances.get(spec.agent)
        if not group:
            raise NotFound(f"agent {spec.agent!r} is not connected to the gateway of {self.org!r}")
        instance = min(group, key=lambda i: (len(i.tasks), next(self._tiebreak)))
        if spec.task_id in self._owner:
            raise Unavailable(f"task {spec.task_id!r} is already running on this gateway")
        queue: asyncio.Queue[TaskUpdate] = asyncio.Queue()
        instance.tasks[spec.task_id] = queue
        self._owner[spec.task_id] = instance
        instance.outbox.put_nowait(Assignment(spec, requester_org))
        # The task is with an instance now: say so here rather than have every agent send
        # a message only to say it started (a unary requester never sees this update).
        yield TaskUpdate(spec.task_id, TaskState.WORKING)
        async for update in self._turn(instance, spec, queue):
            yield update

    async def continue_task(self, spec: TaskSpec, requester_org: str) -> AsyncIterator[TaskUpdate]:
        """The requester's next message for a task held between turns, to the instance that
        holds it; yields its updates, the last one ending the turn."""
        agent = self._backend_tasks.get(spec.task_id)
        if agent is not None and agent in self._backends:
            turn = self._backends[agent].continue_task(spec, requester_org)
            async for update in self._backend_turn(turn, spec):
                yield update
            return
        instance = self._owner.get(spec.task_id)
        queue = instance.tasks.get(spec.task_id) if instance is not None else None
        if instance is None or queue is None or instance.closed:
            yield TaskUpdate(
                spec.task_id,
                TaskState.FAILED,
                result=TaskResult(
                    spec.task_id,
                    TaskState.FAILED,
                    error=TaskError(
                        "agent_disconnected", "the agent instance holding the task disconnected"
                    ),
                    responder_org=self.org,
                ),
            )
            return
        instance.parked.discard(spec.task_id)
        instance.outbox.put_nowait(Assignment(spec, requester_org))
        yield TaskUpdate(spec.task_id, TaskState.WORKING)
        async for update in self._turn(instance, spec, queue):
            yield update

    async def _backend_turn(
        self, updates: AsyncGenerator[TaskUpdate, None], spec: TaskSpec
    ) -> AsyncIterator[TaskUpdate]:
        """A backend's turn; a task it holds between turns is counted in flight."""
        self._backend_tasks[spec.task_id] = spec.agent
        held = False
        try:
            async with contextlib.aclosing(updates):
                async for update in updates:
                    yield update
                    if update.state.ends_turn:
                        held = not update.state.final
                        return
        finally:
            if not held:
                self._backend_tasks.pop(spec.task_id, None)

    async def _turn(
        self, instance: AgentInstance, spec: TaskSpec, queue: asyncio.Queue[TaskUpdate]
    ) -> AsyncIterator[TaskUpdate]:
        ended = False
        try:
            while True:
                update = await queue.get()
                yield update
                if update.state.ends_turn:
                    ended = True
                    if not update.state.final:
                        instance.parked.add(spec.task_id)
                    return
        finally:
            if not ended and instance.tasks.pop(spec.task_id, None) is not None:
                self._owner.pop(spec.task_id, None)
                if not instance.closed:
                    instance.outbox.put_nowait(
                        CancelRequest(spec.task_id, "requester stopped waiting")
                    )
