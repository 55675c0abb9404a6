"""The task table: every accepted task, so that a task runs at most once per idempotency key,
survives a gateway restart, and can be collected later by its requester.

A task is keyed by (origin organization, idempotency key); the key defaults to the task id.
The input of a task for one of our agents is kept while the task runs (a restart dispatches it
again) and dropped when it ends. A task sent to a partner keeps no input at all: the partner
holds it, and a retry brings the input again. The result kept is what was released to the
requester, so a retry gets the same answer.

The table lives in the gateway's one database, beside the audit chain, and is written by the
audit store's one writer (gateway.audit.store): a step of an exchange commits its audit record
and its task-table write (`TaskOp`) in one transaction, so there is no moment when one is
durable and the other is not. This module holds the rows, the operations and their SQL; the
`TaskTable` facade gives the router the table's reads and single writes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson
from sqlalchemy import BigInteger, Column, Index, String, Text
from sqlmodel import Field, SQLModel

from gateway.exchange.tasks import TaskError, TaskResult, TaskSpec, TaskState

TaskKey = tuple[str, str]  # (origin_org, idempotency key or task id)


def task_key(origin_org: str, spec: TaskSpec) -> TaskKey:
    """(origin, key): the key covers who asked, what, and the idempotency key (or task id).

    A key reused by another requester, or for another agent skill, is another task: it never
    answers with someone else's stored result. Hashed, so any length of names fits the column.
    """
    owner = spec.requester.partition("/")[0]  # the token's subject, without the name it added
    material = "\x00".join((owner, spec.target, spec.idempotency_key or spec.task_id))
    return (origin_org, hashlib.sha256(material.encode()).hexdigest())


@dataclass(frozen=True)
class TaskRow:
    origin_org: str
    key: str
    task_id: str
    target: str
    requester: str
    remote: bool
    state: TaskState
    spec: TaskSpec | None  # while the task runs
    result: TaskResult | None  # once it ended
    created_ms: int
    updated_ms: int

    @property
    def final(self) -> bool:
        return self.state.final


def result_to_json(result: TaskResult) -> dict[str, Any]:
    return {
        "task_id": result.task_id,
        "state": result.state.value,
        "output": result.output,
        "field_actions": [list(a) for a in result.field_actions],
        "error": [result.error.code, result.error.message] if result.error else None,
        "receipt": result.receipt,
        "responder_org": result.responder_org,
        "policy_version": result.policy_version,
        "provenance": list(result.provenance),
        "turn": result.turn,
    }


def result_from_json(data: dict[str, Any]) -> TaskResult:
    error = data.get("error")
    return TaskResult(
        task_id=data["task_id"],
        state=TaskState(data["state"]),
        output=data.get("output") or {},
        field_actions=tuple((p, a) for p, a in data.get("field_actions", [])),
        error=TaskError(error[0], error[1]) if error else None,
        receipt=data.get("receipt"),
        responder_org=data.get("responder_org", ""),
        policy_version=data.get("policy_version", ""),
        provenance=tuple(data.get("provenance", [])),
        turn=int(data.get("turn", 0)),
    )


def spec_to_json(spec: TaskSpec) -> dict[str, Any]:
    return {
        "task_id": spec.task_id,
        "target_org": spec.target_org,
        "agent": spec.agent,
        "skill": spec.skill,
        "input": spec.input,
        "requester": spec.requester,
        "deadline": spec.deadline,
        "idempotency_key": spec.idempotency_key,
        "delegation": spec.delegation,
        "parent_task_id": spec.parent_task_id,
        # Who asked and why: a recovered task is released under the same claims.
        "purpose": spec.purpose,
        "roles": list(spec.roles),
        "input_field_actions": [list(a) for a in spec.input_field_actions],
        "turn": spec.turn,
    }


def spec_from_json(data: dict[str, Any]) -> TaskSpec:
    return TaskSpec(
        task_id=data["task_id"],
        target_org=data["target_org"],
        agent=data["agent"],
        skill=data["skill"],
        input=data["input"],
        requester=data.get("requester", ""),
        deadline=float(data["deadline"]),
        idempotency_key=data.get("idempotency_key", ""),
        delegation=data.get("delegation", ""),
        parent_task_id=data.get("parent_task_id", ""),
        purpose=data.get("purpose", ""),
        roles=tuple(data.get("roles", ())),
        input_field_actions=tuple((p, a) for p, a in data.get("input_field_actions", [])),
        turn=int(data.get("turn", 0)),
    )


def kept_spec(spec: TaskSpec, *, remote: bool) -> TaskSpec:
    """What the table keeps of a task: all of it, or for a task sent to a partner no input."""
    return replace(spec, input={}, input_field_actions=()) if remote else spec


@dataclass(frozen=True, slots=True)
class Accept:
    """Take the task's key; if it is taken already, nothing of the step is written."""

    origin_org: str
    spec: TaskSpec
    remote: bool


@dataclass(frozen=True, slots=True)
class Finish:
    """Keep the task's final result and drop its input."""

    origin_org: str
    key: str
    result: TaskResult


@dataclass(frozen=True, slots=True)
class Forget:
    """Drop a task that never ran (the peer refused it), so a retry with its key runs it."""

    origin_org: str
    key: str


TaskOp = Accept | Finish | Forget


def accept_row(op: Accept, now_ms: int) -> tuple[Any, ...]:
    """The parameters of ACCEPT_SQL for `op`."""
    spec = op.spec
    return (
        op.origin_org,
        task_key(op.origin_org, spec)[1],
        spec.task_id,
        spec.target,
        spec.requester,
        op.remote,
        TaskState.WORKING.value,
        orjson.dumps(spec_to_json(kept_spec(spec, remote=op.remote))).decode("utf-8"),
        None,  # result_json
        now_ms,
        now_ms,
    )


def op_sql_params(op: TaskOp, now_ms: int) -> tuple[str, tuple[Any, ...]]:
    """(kind, parameters) of the SQL that applies `op` (kinds are keys of WRITE_SQL)."""
    if isinstance(op, Accept):
        return "accept", accept_row(op, now_ms)
    if isinstance(op, Finish):
        return "finish", (
            op.result.state.value,
            orjson.dumps(result_to_json(op.result)).decode("utf-8"),
            now_ms,
            op.origin_org,
            op.key,
        )
    return "forget", (op.origin_org, op.key)


def new_row(op: Accept, now_ms: int) -> TaskRow:
    """The row an accept creates (the in-memory table's twin of ACCEPT_SQL)."""
    spec = op.spec
    return TaskRow(
        op.origin_org,
        task_key(op.origin_org, spec)[1],
        spec.task_id,
        spec.target,
        spec.requester,
        op.remote,
        TaskState.WORKING,
        kept_spec(spec, remote=op.remote),
        None,
        now_ms,
        now_ms,
    )


def finished_row(row: TaskRow, result: TaskResult, now_ms: int) -> TaskRow:
    return replace(row, state=result.state, spec=None, result=result, updated_ms=now_ms)


class _Store(Protocol):
    """What the facade needs of the gateway's store (gateway.audit.store.AuditStore)."""

    def write_task(self, op: TaskOp) -> Awaitable[TaskRow | None]: ...
    def task_row(self, origin_org: str, key: str) -> Awaitable[TaskRow | None]: ...
    def task_by_id(self, origin_org: str, task_id: str) -> Awaitable[TaskRow | None]: ...
    def unfinished_tasks(self) -> Awaitable[list[TaskRow]]: ...


class TaskTable:
    """The task table of one gateway's store: reads, and writes that carry no audit record."""

    def __init__(self, store: _Store) -> None:
        self._store = store

    async def accept(self, origin_org: str, spec: TaskSpec, *, remote: bool) -> TaskRow | None:
        """Record a newly accepted task; returns the existing row instead if the key is taken.

        A `remote` task (sent to a partner) is kept without its input (see `kept_spec`).
        """
        return await self._store.write_task(Accept(origin_org, spec, remote))

    async def finish(self, origin_org: str, key: str, result: TaskResult) -> None:
        await self._store.write_task(Finish(origin_org, key, result))

    async def forget(self, origin_org: str, key: str) -> None:
        await self._store.write_task(Forget(origin_org, key))

    async def get(self, origin_org: str, key: str) -> TaskRow | None:
        return await self._store.task_row(origin_org, key)

    async def by_task_id(self, origin_org: str, task_id: str) -> TaskRow | None:
        return await self._store.task_by_id(origin_org, task_id)

    async def unfinished(self) -> list[TaskRow]:
        return await self._store.unfinished_tasks()


class TaskRowModel(SQLModel, table=True):
    __tablename__ = "fedgate_task"
    __table_args__ = (Index("ix_fedgate_task_task_id", "origin_org", "task_id"),)

    origin_org: str = Field(sa_column=Column(String(63), primary_key=True))
    key: str = Field(sa_column=Column(String(255), primary_key=True))
    task_id: str = Field(sa_column=Column(String(128), nullable=False))
    target: str = Field(sa_column=Column(Text, nullable=False))
    requester: str = Field(default="", sa_column=Column(Text, nullable=False))
    remote: bool = False
    state: str = Field(sa_column=Column(String(32), nullable=False, index=True))
    spec_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    result_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    updated_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


TASKS = TaskRowModel.__table__  # type: ignore[attr-defined]


def row_from_sql(model: Any) -> TaskRow:
    return TaskRow(
        origin_org=model.origin_org,
        key=model.key,
        task_id=model.task_id,
        target=model.target,
        requester=model.requester,
        remote=bool(model.remote),
        state=TaskState(model.state),
        spec=spec_from_json(orjson.loads(model.spec_json)) if model.spec_json else None,
        result=result_from_json(orjson.loads(model.result_json)) if model.result_json else None,
        created_ms=model.created_ms,
        updated_ms=model.updated_ms,
    )


# The writes, by kind, with `?` markers (gateway.store.db.driver_sql adapts them to the driver);
# their parameters are tuples in marker order. An accept returns the key if it inserted the row.
WRITE_SQL = {
    "accept": (
        "INSERT INTO fedgate_task (origin_org, key, task_id, target, requester, remote, state, "
        "spec_json, result_json, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (origin_org, key) DO NOTHING RETURNING key"
    ),
    "finish": (
        "UPDATE fedgate_task SET state = ?, spec_json = NULL, result_json = ?, updated_ms = ? "
        "WHERE origin_org = ? AND key = ?"
    ),
    "forget": "DELETE FROM fedgate_task WHERE origin_org = ? AND key = ?",
}
