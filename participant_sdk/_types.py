"""Plain values an agent developer or a requester works with."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fedgate.convert import field_actions_from_pb, receipt_json, state_name, struct_to_dict
from fedgate.v1 import fedgate_pb2 as pb

from participant_sdk._errors import FedgateError

FINAL_STATES = frozenset({"completed", "failed", "canceled", "rejected"})


@dataclass(frozen=True)
class TaskError:
    code: str
    message: str


@dataclass(frozen=True)
class TaskResult:
    """A task's outcome: its state, the output that was released, and what the policy did."""

    task_id: str
    state: str
    output: dict[str, Any] = field(default_factory=dict)
    # (path, action): what the responder's policy withheld or transformed; never the values.
    field_actions: tuple[tuple[str, str], ...] = ()
    error: TaskError | None = None
    receipt: dict[str, Any] | None = None
    responder_org: str = ""
    policy_version: str = ""
    # Receipts of the organizations that handled sub-tasks on the way (multi-hop), in order.
    provenance: tuple[dict[str, Any], ...] = ()
    # Multi-turn: the turn this result ends (0 for the first), and what `Client.reply` needs to
    # continue the task (the target and idempotency key the call carried).
    turn: int = 0
    target: str = ""
    idempotency_key: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "completed"

    @property
    def awaiting_input(self) -> bool:
        """The agent asked a question (the output): answer it with `Client.reply`."""
        return self.state in ("input-required", "auth-required")

    @property
    def withheld(self) -> tuple[str, ...]:
        return tuple(path for path, action in self.field_actions if action == "withheld")

    @classmethod
    def from_pb(cls, message: pb.TaskResult) -> TaskResult:
        error = message.error if message.HasField("error") else None
        receipt = (
            receipt_json(message.receipt, salt=message.receipt_salt)
            if message.HasField("receipt")
            else None
        )
        return cls(
            task_id=message.task_id,
            state=state_name(message.state),
            output=struct_to_dict(message.output),
            field_actions=field_actions_from_pb(message.field_actions),
            error=TaskError(error.code, error.message) if error is not None else None,
            receipt=receipt,
            responder_org=message.responder_org,
            policy_version=message.policy_version,
            provenance=tuple(receipt_json(r) for r in message.provenance),
            turn=message.turn,
        )


@dataclass(frozen=True)
class TaskUpdate:
    task_id: str
    state: str
    message: str = ""
    result: TaskResult | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def from_pb(cls, message: pb.TaskUpdate) -> TaskUpdate:
        return cls(
            task_id=message.task_id,
            state=state_name(message.state),
            message=message.message,
            result=TaskResult.from_pb(message.result) if message.HasField("result") else None,
        )


def scoped_task_key(
    requester_org: str, requester: str, target: str, idempotency_key: str, task_id: str
) -> str:
    """The stable key of one logical task, scoped as the gateway scopes its once-only key.

    Hex SHA-256 of the UTF-8 bytes of, joined by NUL (0x00): the requesting organization, the
    requester's owner (the part of `requester` before the first "/": the token's subject, without
    the name a requester adds), the target ("org/agent.skill"), and the idempotency key (the task
    id when the request carries none). The same request asked again, under any task id, by the
    same requester of the same organization, has the same key; a key reused by another
    organization or requester, or for another skill, does not.
    """
    owner = requester.partition("/")[0]
    material = "\x00".join((requester_org, owner, target, idempotency_key or task_id))
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass
class TaskContext:
    """What a skill knows about the task it runs: who asked, until when, and whether to stop.

    `idempotency_key` identifies the logical request across retries, re-dispatch after a crash and
    task ids (see `scoped_task_key`): a skill with side effects outside Fedgate (a payment, an
    order) passes it to its own systems to do them once. It is a hash, never the caller's raw key.
    `cancelled` is set when the requester cancels and when the deadline passes, before the skill's
    coroutine is cancelled.
    """

    task_id: str
    requester_org: str
    requester: str
    agent: str
    skill: str
    deadline: float  # seconds since the epoch
    idempotency_key: str = ""
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    _send_progress: Callable[[str], Awaitable[None]] | None = None
    _calls: Any = None  # the AgentWorker, which knows the gateway and the token
    _ask: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None

    @property
    def time_remaining(self) -> float:
        return max(0.0, self.deadline - time.time())

    async def progress(self, message: str) -> None:
        """Tell the requester the task is working, with a note (kept inside our organization)."""
        if self._send_progress is not None:
            await self._send_progress(message)

    async def ask(self, question: dict[str, Any]) -> dict[str, Any]:
        """Ask the requester for more input (multi-turn): the task's turn ends input-required
        with `question` as its output, filtered by the share policy and recorded like a result,
        and this returns the requester's next message (filtered by its send policy), within the
        task's deadline."""
        if not isinstance(question, dict):
            raise TypeError(f"a question is a dict, not {type(question).__name__}")
        if self._ask is None:
            raise FedgateError("task.ask needs a requester: this task runs without a gateway")
        return await self._ask(question)

    async def call(
        self,
        target: str,
        data: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - bounded by this task's deadline
        purpose: str = "",
        roles: tuple[str, ...] = (),
    ) -> TaskResult:
        """Call another agent while serving this task (multi-hop).

        This task's deadline bounds the call, canceling this task cancels it, our gateway's
        send policy sees where the data came from (claim `origin`), and the callee's receipt
        joins this task's provenance.
        """
        if self._calls is None:
            raise FedgateError("task.call needs a gateway: this task runs without one")
        remaining = self.time_remaining
        limit = remaining if timeout is None else min(timeout, remaining)
        client = self._calls.client()
        result: TaskResult = await client.call(
            target, data, timeout=limit, purpose=purpose, roles=roles, parent_task_id=self.task_id
        )
        return result
