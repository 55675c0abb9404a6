"""The task table: every accepted task, so that a task runs at most once per idempotency key,
survives a gateway restart, and can be collected later by its requester.

A task is keyed by (origin organization, idempotency key); the key defaults to the task id.
The input is kept while the task runs (a restart dispatches it again) and dropped when it ends;
the result kept is what was released to the requester, so a retry gets the same answer.

SQLite uses synchronous=NORMAL here: a row survives a crash of the process (the audit log,
which is FULL, is the record of truth); PostgreSQL is durable either way.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Column, Index, String, Text, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel

from gateway.db import create_store_engine, is_sqlite
from gateway.tasks import TaskError, TaskResult, TaskSpec, TaskState

TaskKey = tuple[str, str]  # (origin_org, idempotency key or task id)


def task_key(origin_org: str, spec: TaskSpec) -> TaskKey:
    return (origin_org, spec.idempotency_key or spec.task_id)


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
    )


def spec_to_json(spec: TaskSpec) -> dict[str, Any]:
    return {
        "task_id": spec.task_id, "target_org": spec.target_org, "agent": spec.agent,
        "skill": spec.skill, "input": spec.input, "requester": spec.requester,
        "deadline": spec.deadline, "idempotency_key": spec.idempotency_key,
        "delegation": spec.delegation, "parent_task_id": spec.parent_task_id,
        "input_field_actions": [list(a) for a in spec.input_field_actions],
    }


def spec_from_json(data: dict[str, Any]) -> TaskSpec:
    return TaskSpec(
        task_id=data["task_id"], target_org=data["target_org"], agent=data["agent"],
        skill=data["skill"], input=data["input"], requester=data.get("requester", ""),
        deadline=float(data["deadline"]), idempotency_key=data.get("idempotency_key", ""),
        delegation=data.get("delegation", ""), parent_task_id=data.get("parent_task_id", ""),
        input_field_actions=tuple((p, a) for p, a in data.get("input_field_actions", [])),
    )


class TaskStore(ABC):
    """Accepted tasks by (origin, key)."""

    @abstractmethod
    async def accept(self, origin_org: str, spec: TaskSpec, *, remote: bool) -> TaskRow | None:
        """Record a newly accepted task; returns the existing row instead if the key is taken."""

    @abstractmethod
    async def finish(self, origin_org: str, key: str, result: TaskResult) -> None:
        """Record the task's final result and drop its input."""

    @abstractmethod
    async def forget(self, origin_org: str, key: str) -> None:
        """Drop a task that never ran (the peer refused it), so a retry with its key runs it."""

    @abstractmethod
    async def get(self, origin_org: str, key: str) -> TaskRow | None: ...

    @abstractmethod
    async def by_task_id(self, origin_org: str, task_id: str) -> TaskRow | None: ...

    @abstractmethod
    async def unfinished(self) -> list[TaskRow]: ...

    async def close(self) -> None:
        return None


class MemoryTaskStore(TaskStore):
    """The in-memory twin, for tests and for gateways that opt out of durable tasks."""

    def __init__(self) -> None:
        self.rows: dict[TaskKey, TaskRow] = {}

    async def accept(self, origin_org: str, spec: TaskSpec, *, remote: bool) -> TaskRow | None:
        key = task_key(origin_org, spec)
        if key in self.rows:
            return self.rows[key]
        now = int(time.time() * 1000)
        self.rows[key] = TaskRow(origin_org, key[1], spec.task_id, spec.target, spec.requester,
                                 remote, TaskState.WORKING, spec, None, now, now)
        return None

    async def finish(self, origin_org: str, key: str, result: TaskResult) -> None:
        row = self.rows.get((origin_org, key))
        if row is not None:
            self.rows[(origin_org, key)] = replace(row, state=result.state, spec=None, result=result,
                                                   updated_ms=int(time.time() * 1000))

    async def forget(self, origin_org: str, key: str) -> None:
        self.rows.pop((origin_org, key), None)

    async def get(self, origin_org: str, key: str) -> TaskRow | None:
        return self.rows.get((origin_org, key))

    async def by_task_id(self, origin_org: str, task_id: str) -> TaskRow | None:
        return next((r for r in self.rows.values()
                     if r.origin_org == origin_org and r.task_id == task_id), None)

    async def unfinished(self) -> list[TaskRow]:
        return [r for r in self.rows.values() if not r.final]


class TaskRowModel(SQLModel, table=True):
    __tablename__ = "fedgate_task"
    __table_args__ = (Index("ix_fedgate_task_task_id", "origin_org", "task_id"),)

    origin_org: str = Field(sa_column=Column(String(63), primary_key=True))
    key: str = Field(sa_column=Column(String(255), primary_key=True))
    task_id: str = Field(sa_column=Column(String(128), nullable=False))
    target: str = Field(sa_column=Column(String(255), nullable=False))
    requester: str = Field(default="", sa_column=Column(String(255), nullable=False))
    remote: bool = False
    state: str = Field(sa_column=Column(String(32), nullable=False, index=True))
    spec_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    result_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_ms: int = 0
    updated_ms: int = 0


TASKS = TaskRowModel.__table__  # type: ignore[attr-defined]


def _row(model: Any) -> TaskRow:
    return TaskRow(
        origin_org=model.origin_org, key=model.key, task_id=model.task_id, target=model.target,
        requester=model.requester, remote=bool(model.remote), state=TaskState(model.state),
        spec=spec_from_json(json.loads(model.spec_json)) if model.spec_json else None,
        result=result_from_json(json.loads(model.result_json)) if model.result_json else None,
        created_ms=model.created_ms, updated_ms=model.updated_ms,
    )


class SqlTaskStore(TaskStore):
    """The task table in SQLite or PostgreSQL (through SQLModel)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def _db(self) -> Engine:
        with self._lock:
            if self._engine is None:
                engine = create_store_engine(
                    self.url, synchronous="NORMAL" if is_sqlite(self.url) else "FULL"
                )
                SQLModel.metadata.create_all(engine, tables=[TASKS])
                self._engine = engine
            return self._engine

    def _accept(self, origin_org: str, spec: TaskSpec, remote: bool) -> TaskRow | None:
        now = int(time.time() * 1000)
        key = task_key(origin_org, spec)[1]
        with Session(self._db()) as session:
            session.add(TaskRowModel(
                origin_org=origin_org, key=key, task_id=spec.task_id, target=spec.target,
                requester=spec.requester, remote=remote, state=TaskState.WORKING.value,
                spec_json=json.dumps(spec_to_json(spec)), created_ms=now, updated_ms=now,
            ))
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                existing = session.get(TaskRowModel, (origin_org, key))
                return _row(existing) if existing is not None else None
        return None

    def _finish(self, origin_org: str, key: str, result: TaskResult) -> None:
        with Session(self._db()) as session:
            session.execute(
                update(TaskRowModel)
                .where(TaskRowModel.origin_org == origin_org, TaskRowModel.key == key)  # type: ignore[arg-type]
                .values(state=result.state.value, spec_json=None,
                        result_json=json.dumps(result_to_json(result)),
                        updated_ms=int(time.time() * 1000))
            )
            session.commit()

    def _forget(self, origin_org: str, key: str) -> None:
        with Session(self._db()) as session:
            model = session.get(TaskRowModel, (origin_org, key))
            if model is not None:
                session.delete(model)
                session.commit()

    def _get(self, origin_org: str, key: str) -> TaskRow | None:
        with Session(self._db()) as session:
            model = session.get(TaskRowModel, (origin_org, key))
            return _row(model) if model is not None else None

    def _by_task_id(self, origin_org: str, task_id: str) -> TaskRow | None:
        with Session(self._db()) as session:
            model = session.exec(select(TaskRowModel).where(  # type: ignore[call-overload]
                TaskRowModel.origin_org == origin_org, TaskRowModel.task_id == task_id)).first()
            return _row(model[0]) if model is not None else None

    def _unfinished(self) -> list[TaskRow]:
        finals = [s.value for s in TaskState if s.final]
        with Session(self._db()) as session:
            models = session.exec(select(TaskRowModel).where(  # type: ignore[call-overload]
                TaskRowModel.state.not_in(finals))).all()  # type: ignore[attr-defined]
            return [_row(m[0]) for m in models]

    async def accept(self, origin_org: str, spec: TaskSpec, *, remote: bool) -> TaskRow | None:
        return await asyncio.to_thread(self._accept, origin_org, spec, remote)

    async def finish(self, origin_org: str, key: str, result: TaskResult) -> None:
        await asyncio.to_thread(self._finish, origin_org, key, result)

    async def forget(self, origin_org: str, key: str) -> None:
        await asyncio.to_thread(self._forget, origin_org, key)

    async def get(self, origin_org: str, key: str) -> TaskRow | None:
        return await asyncio.to_thread(self._get, origin_org, key)

    async def by_task_id(self, origin_org: str, task_id: str) -> TaskRow | None:
        return await asyncio.to_thread(self._by_task_id, origin_org, task_id)

    async def unfinished(self) -> list[TaskRow]:
        return await asyncio.to_thread(self._unfinished)

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
