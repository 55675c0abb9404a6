"""The domain of an exchange: a task, its state updates and its result, as plain dataclasses."""

from __future__ import annotations

import enum
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.config import AGENT_NAME, ORG_NAME
from gateway.errors import InvalidArgument


class TaskState(enum.StrEnum):
    """A2A's task states, one to one."""

    SUBMITTED = "submitted"
    WORKING = "working"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    INPUT_REQUIRED = "input-required"
    REJECTED = "rejected"
    AUTH_REQUIRED = "auth-required"

    @property
    def final(self) -> bool:
        return self in _FINAL

    @property
    def ends_turn(self) -> bool:
        """Final, or waiting for the requester (input-required, auth-required): the state
        carries a result, filtered, recorded and signed like a final one."""
        return self in _FINAL or self in _AWAITING


_FINAL = {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELED, TaskState.REJECTED}
_AWAITING = {TaskState.INPUT_REQUIRED, TaskState.AUTH_REQUIRED}
TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What was asked: who, of which agent skill, with what input, until when."""

    task_id: str
    target_org: str
    agent: str
    skill: str
    input: dict[str, Any]
    requester: str = ""
    deadline: float = 0.0  # absolute, seconds since the epoch
    idempotency_key: str = ""
    delegation: str = ""
    input_field_actions: tuple[tuple[str, str], ...] = ()
    parent_task_id: str = ""
    # Declared by a local requester; sent to a peer only inside the signed delegation statement.
    purpose: str = ""
    roles: tuple[str, ...] = ()
    # A requesting gateway asking again, after its restart, for a task it had sent (no input).
    resume: bool = False
    # 0 for a new task; n > 0 continues a task whose turn n - 1 ended input-required, with the
    # requester's next message as the input.
    turn: int = 0

    @property
    def target(self) -> str:
        return f"{self.target_org}/{self.agent}.{self.skill}"

    def remaining(self) -> float:
        return self.deadline - time.time()

    def with_input(self, payload: dict[str, Any], actions: tuple[tuple[str, str], ...]) -> TaskSpec:
        return replace(self, input=payload, input_field_actions=actions)


@dataclass(frozen=True, slots=True)
class TaskError:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class TaskResult:
    task_id: str
    state: TaskState
    output: dict[str, Any] = field(default_factory=dict)
    field_actions: tuple[tuple[str, str], ...] = ()
    error: TaskError | None = None
    receipt: dict[str, Any] | None = None
    responder_org: str = ""
    policy_version: str = ""
    # Receipts (JSON form) of the organizations that handled sub-tasks, for multi-hop provenance.
    provenance: tuple[dict[str, Any], ...] = ()
    # The turn this result ends (see TaskSpec.turn).
    turn: int = 0
    # On an answer without a receipt (failed, canceled): the responder's signed audit head
    # (gateway.identity.signing.SignedCheckpoint in its JSON form), a lower bound of its log.
    checkpoint: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TaskUpdate:
    task_id: str
    state: TaskState
    message: str = ""
    result: TaskResult | None = None


@dataclass(frozen=True, slots=True)
class SkillCard:
    name: str
    description: str = ""
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class AgentCard:
    org: str
    name: str
    description: str = ""
    version: str = ""
    skills: tuple[SkillCard, ...] = ()

    def skill(self, name: str) -> SkillCard | None:
        return next((s for s in self.skills if s.name == name), None)


def new_task_id() -> str:
    return str(uuid.uuid4())


def shown(value: str, limit: int = 64) -> str:
    """An unverified name as quoted in an error message: bounded, so a huge one stays small."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def validate_names(org: str, agent: str, skill: str) -> None:
    """Refuse a target whose parts are not valid names, naming the bad part."""
    if not ORG_NAME.match(org):
        raise InvalidArgument(
            f"malformed target organization {shown(org)}: lowercase letters, digits and hyphens"
        )
    if not AGENT_NAME.match(agent):
        raise InvalidArgument(f"malformed agent name {shown(agent)}: letters, digits, '-' and '_'")
    if not AGENT_NAME.match(skill):
        raise InvalidArgument(f"malformed skill name {shown(skill)}: letters, digits, '-' and '_'")


def validate_task_id(task_id: str) -> None:
    if not TASK_ID.match(task_id):
        raise InvalidArgument(
            f"malformed task id {task_id[:64]!r}: 1-128 characters of letters, digits, '.', "
            "'_', ':' and '-'"
        )
