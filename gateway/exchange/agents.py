"""Local agents: the instances connected to this gateway and the dispatch of tasks to them.

Each connected SDK process is an `AgentInstance` with an outbox (what the Connect stream sends it)
and the set of tasks it holds. Several instances of one agent share its tasks: a task goes to
the instance with the fewest tasks in flight. An instance that disconnects fails its tasks at
once with the reason; the router then hands them to another instance, or to the same agent when
it reconnects, while their deadlines allow.

The registry remembers the cards of agents that were connected since the gateway started: an
agent that is restarting is known, and a task for it waits for an instance instead of being
refused as if it did not exist.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
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


class AgentRegistry:
    """Which agents are connected, and routing of tasks and their updates."""

    def __init__(self, org: str) -> None:
        self.org = org
        self._instances: dict[str, list[AgentInstance]] = {}
        self._owner: dict[str, AgentInstance] = {}
        self._known: dict[str, AgentCard] = {}
        self._arrivals: dict[str, asyncio.Event] = {}
        self._tiebreak = itertools.count()

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
        """The card of a connected agent."""
        group = self._instances.get(agent)
        return group[-1].cards[agent] if group else None

    def known_card(self, agent: str) -> AgentCard | None:
        """The card of a connected agent, or of one connected earlier (it may be restarting)."""
        return self.card(agent) or self._known.get(agent)

    async def wait_for_instance(self, agent: str) -> None:
        """Return once an instance of `agent` is connected (the caller bounds the wait)."""
        while not self._instances.get(agent):
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
        return [group[-1].cards[name] for name, group in sorted(self._instances.items())]

    def instance_count(self, agent: str) -> int:
        return len(self._instances.get(agent, ()))

    def in_flight(self, agent: str) -> int:
        return sum(len(i.tasks) for i in self._instances.get(agent, ()))

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
