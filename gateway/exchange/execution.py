"""Executions: the tasks this gateway runs, apart from the calls that follow them.

An exchange runs in an asyncio task of its own, an `Execution`, from its opening record to its
closing one. Calls follow it: the call that started it, a retry with the same idempotency key,
a subscription. A call that goes away ends its following, not the task: only an explicit cancel,
the task's deadline or the end of its route ends a task. A broken stream is not a cancel.

`Executions` keeps the running ones by task id and by key (once only: one execution per key),
the outcomes of recent ones (so retries and GetTask need no database read), and whether the
gateway is idle (for a graceful shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import DeadlineExceeded, FedgateError, Unavailable
from gateway.exchange.tasks import TaskResult, TaskSpec, TaskState, TaskUpdate
from gateway.store.task_table import TaskKey

log = logging.getLogger("fedgate.exchange")

Claims = Mapping[str, str | Sequence[str]] | None

# What a follower's queue carries: an update, an error for the followers, or the end (None).
_Item = TaskUpdate | FedgateError | None

# Why an execution was stopped without an explicit cancel: the gateway is shutting down, and
# the task stays open in the task table, to be recovered after the restart.
SHUTDOWN = "the gateway is shutting down"


@dataclass(frozen=True, slots=True)
class NextTurn:
    """The requester's next message for a task whose turn ended input-required: its spec (the
    turn number and the new input), and what its admission prepared for the route (the opening
    record and, for a partner, the filtered request)."""

    spec: TaskSpec
    opening: Any = None
    outbound: TaskSpec | None = None
    policy: Any = None
    started: float = 0.0
    admitted: float | None = None  # the breaker's admission of the call to a partner


@dataclass(eq=False, slots=True)
class Execution:
    """A task this gateway is working on: inbound (for one of our agents, `peer_org` asked),
    outbound (`remote`: sent to a partner) or local (our requester, our agent).

    A task runs in turns: a turn ends with a final state, or with input-required (its output
    the agent's question), after which the requester's next message starts the next turn.
    Calls follow one turn each.
    """

    spec: TaskSpec
    origin_org: str
    key: TaskKey
    remote: bool = False
    peer_org: str | None = None
    claims: Claims = None
    # Set by cancel(): why the task is being stopped ("" until then); `stopping` at shutdown
    # (also after a cancel with another reason), when the task stays open for recovery.
    cancel_reason: str = ""
    stopping: bool = False
    # Sub-tasks our agents started while serving this task (multi-hop), and their receipts.
    children: set[str] = field(default_factory=set)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    state: TaskState = TaskState.SUBMITTED
    # Set while the task waits for an agent instance: the stable code it ends with if its
    # deadline passes first ("no_agent", or "agent_disconnected" after its instance died).
    waiting_for: str = ""
    # The current turn, the results of the turns that ended, and the next turns' messages.
    turn: int = 0
    # A next message being admitted (its record committing): no second one may start.
    pending_turn: int = 0
    turn_results: dict[int, TaskResult] = field(default_factory=dict)
    # Turns whose result was recorded as kept (no call followed when it committed): a call that
    # follows it now records its release before it gets the result.
    kept: set[int] = field(default_factory=set)
    # Made when a task first ends a turn waiting for input: most tasks never need them.
    _next_turns: asyncio.Queue[NextTurn] | None = None
    # Set when the admission of a next message ends, either way (see admitted_meanwhile).
    _admission: asyncio.Event | None = None
    outcome: asyncio.Future[TaskResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    task: asyncio.Task[None] | None = None
    # Each following call's queue, whether it wants the non-final states too, and its turn.
    _followers: list[tuple[asyncio.Queue[_Item], bool, int]] = field(default_factory=list)
    # While > 0 the route is committing a record: a cancel waits until the write has ended, so
    # the route always knows what was written.
    _protected: int = 0
    _cancel_pending: bool = False

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def next_turns(self) -> asyncio.Queue[NextTurn]:
        """The requester's next messages, in the order they were admitted."""
        if self._next_turns is None:
            self._next_turns = asyncio.Queue()
        return self._next_turns

    @property
    def _admission_ended(self) -> asyncio.Event:
        if self._admission is None:
            self._admission = asyncio.Event()
        return self._admission

    @property
    def followed(self) -> bool:
        """Whether a call is following this task right now (its result would leave at once)."""
        return any(turn == self.turn for _, _, turn in self._followers)

    @property
    def awaiting_input(self) -> bool:
        """Whether the current turn ended input-required and the next has not started."""
        ended = self.turn_results.get(self.turn)
        return ended is not None and not ended.state.final

    def publish(self, update: TaskUpdate) -> None:
        """A state change for the followers; non-final updates carry a state and nothing else."""
        self.state = update.state
        for queue, states, turn in self._followers:
            if states and turn == self.turn:
                queue.put_nowait(update)

    def fail_followers(self, error: FedgateError) -> None:
        """The calls following the task get `error` now; the task goes on (a retry with its key
        follows it again). For a store that cannot be written, or a partner out of reach."""
        for queue, _, turn in self._followers:
            if turn == self.turn:
                queue.put_nowait(error)

    def end_turn(self, result: TaskResult) -> None:
        """The current turn ended input-required with `result`; its followers get it."""
        self.turn_results[self.turn] = result
        self.state = result.state
        for queue, _, turn in self._followers:
            if turn == self.turn:
                queue.put_nowait(None)

    def start_turn(self, turn: int) -> None:
        self.turn = turn
        self.pending_turn = 0
        self.state = TaskState.WORKING

    def continue_with(self, next_turn: NextTurn) -> None:
        """The requester's next message: the route starts the next turn with it."""
        self.next_turns.put_nowait(next_turn)
        self._admission_ended.set()

    def admission_failed(self) -> None:
        """The next message being admitted was refused (nothing of it was recorded)."""
        self.pending_turn = 0
        self._admission_ended.set()

    async def admitted_meanwhile(self) -> NextTurn | None:
        """After the task stopped between turns (its deadline, a cancel): the next message
        admitted meanwhile, if any, waiting for one whose request record is committing. Its
        turn never runs, but its record is in the log and must be closed."""
        while self.pending_turn and self.next_turns.empty():
            self._admission_ended.clear()
            await self._admission_ended.wait()
        return None if self.next_turns.empty() else self.next_turns.get_nowait()

    def cancel(self, reason: str) -> bool:
        """Stop the task (its route records why); False if it has already ended."""
        if self.task is None or self.task.done():
            return False
        if not self.cancel_reason:
            self.cancel_reason = reason
        if reason == SHUTDOWN:
            self.stopping = True
        if self._protected:
            self._cancel_pending = True
        else:
            self.task.cancel()
        return True

    def postpone_cancel(self) -> None:
        """A cancel caught while the route waits to try a store write again: it takes effect
        after the write, as one that comes during the write does."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        self._cancel_pending = True

    @contextlib.contextmanager
    def protected(self) -> Iterator[None]:
        """A section (a store write) that a cancel does not interrupt: it takes effect after."""
        self._protected += 1
        try:
            yield
        finally:
            self._protected -= 1
            if not self._protected and self._cancel_pending and self.task is not None:
                self._cancel_pending = False
                self.task.cancel()

    async def follow(
        self, *, states: bool = True, until: float | None = None, turn: int | None = None
    ) -> AsyncIterator[TaskUpdate]:
        """A turn's updates as they come (with `states`), then the one that ends it (final,
        or input-required); `until` is the follower's own deadline (seconds since the epoch),
        if it has a shorter one than the task. `turn` defaults to the current one.

        Raises the FedgateError the task ended with, if it ended without a result, or one it
        gave its followers while it goes on (fail_followers).
        """
        turn = self.turn if turn is None else turn
        if turn not in self.turn_results and not self.outcome.done():
            queue: asyncio.Queue[_Item] = asyncio.Queue()
            follower = (queue, states, turn)
            self._followers.append(follower)
            try:
                if states and turn == self.turn and self.state is not TaskState.SUBMITTED:
                    yield TaskUpdate(self.task_id, self.state)
                while True:
                    if until is None or until >= self.spec.deadline:
                        item = await queue.get()
                    else:
                        try:
                            item = await asyncio.wait_for(queue.get(), until - time.time())
                        except TimeoutError:
                            raise DeadlineExceeded(
                                f"task {self.task_id} passed the deadline of this call while "
                                "its first attempt still ran"
                            ) from None
                    if item is None:
                        break
                    if isinstance(item, FedgateError):
                        raise item
                    yield item
            finally:
                self._followers.remove(follower)
        ended = self.turn_results.get(turn)
        result = ended if ended is not None else self.outcome.result()
        if result.error is not None and result.error.code == "deadline_exceeded":
            # The caller's answer to a task that ran out of time is the status, as for a call.
            raise DeadlineExceeded(result.error.message)
        yield TaskUpdate(result.task_id, result.state, result=result)

    def _end(self) -> None:
        for queue, _, _ in self._followers:
            queue.put_nowait(None)


Route = Callable[[Execution], Awaitable[TaskResult]]


class Executions:
    """The executions of one gateway, and the outcomes of recent ones."""

    def __init__(self, *, remember: int = 1_000) -> None:
        self.by_id: dict[str, Execution] = {}
        self.by_key: dict[TaskKey, Execution] = {}
        # Recent outcomes by key and by task id, with who asked: (origin_org, requester, result).
        self._recent_keys: OrderedDict[TaskKey, TaskResult] = OrderedDict()
        self._recent_ids: OrderedDict[str, tuple[str, str, TaskResult]] = OrderedDict()
        self._remember = remember
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self.by_id)

    def start(self, execution: Execution, route: Route) -> Execution:
        """Run `route` for `execution` in a task of its own; its outcome settles `outcome`."""
        self.by_id[execution.task_id] = execution
        self.by_key[execution.key] = execution
        self._idle.clear()
        execution.task = asyncio.get_running_loop().create_task(
            self._run(execution, route), name=f"fedgate-task-{execution.task_id}"
        )
        return execution

    async def _run(self, execution: Execution, route: Route) -> None:
        result: TaskResult | None = None
        try:
            result = await route(execution)
        except FedgateError as exc:
            if not execution.outcome.done():
                execution.outcome.set_exception(exc)
        except asyncio.CancelledError:
            # Stopped at shutdown: the task stays open in the table, recovered after a restart.
            if not execution.outcome.done():
                execution.outcome.set_exception(
                    Unavailable(f"task {execution.task_id} was interrupted: {SHUTDOWN}")
                )
        except Exception as exc:
            log.exception("task %s failed inside the gateway", execution.task_id)
            if not execution.outcome.done():
                execution.outcome.set_exception(
                    FedgateError(f"the gateway failed: {type(exc).__name__}")
                )
        else:
            if not execution.outcome.done():
                execution.outcome.set_result(result)
        finally:
            if execution.outcome.done():
                execution.outcome.exception()  # retrieved: a follower may never come
            self.by_id.pop(execution.task_id, None)
            if self.by_key.get(execution.key) is execution:
                del self.by_key[execution.key]
            if result is not None:
                self.remember(execution.key, execution.origin_org, execution.spec, result)
            execution._end()
            if not self.by_id:
                self._idle.set()

    def remember(self, key: TaskKey, origin_org: str, spec: TaskSpec, result: TaskResult) -> None:
        self._recent_keys[key] = result
        self._recent_ids[result.task_id] = (origin_org, spec.requester, result)
        while len(self._recent_keys) > self._remember:
            self._recent_keys.popitem(last=False)
        while len(self._recent_ids) > self._remember:
            self._recent_ids.popitem(last=False)

    def recent(self, key: TaskKey) -> TaskResult | None:
        return self._recent_keys.get(key)

    def recent_by_id(self, task_id: str) -> tuple[str, str, TaskResult] | None:
        return self._recent_ids.get(task_id)

    async def wait_idle(self, grace: float) -> bool:
        """Wait until no task runs; False if some still run after `grace` seconds."""
        if self._idle.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        return self._idle.is_set()

    async def stop(self) -> None:
        """Stop every execution (at shutdown): their tasks stay open in the task table."""
        for execution in list(self.by_id.values()):
            execution.cancel(SHUTDOWN)
        for execution in list(self.by_id.values()):
            if execution.task is not None:
                with contextlib.suppress(BaseException):
                    await execution.task
