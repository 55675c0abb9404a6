"""The task table: every accepted task, so that a task runs at most once per idempotency key,
survives a gateway restart, and can be collected later by its requester.

A task is keyed by (origin organization, idempotency key); the key defaults to the task id.
The input of a task for one of our agents is kept while the task runs (a restart dispatches it
again) and dropped when it ends. A task sent to a partner keeps no input at all: the partner
holds it, and a retry brings the input again. The result kept is what was released to the
requester, so a retry gets the same answer.

Writes are group-committed: concurrent accepts, finishes and forgets share one transaction, run
by the store's one writer thread on its persistent DB-API connection
(gateway.store.db.WriterThread), and each caller resumes after the commit. Reads go through the
SQLAlchemy engine.

SQLite uses synchronous=NORMAL here: a row survives a crash of the process (the audit log,
which is FULL, is the record of truth); PostgreSQL is durable either way.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import BigInteger, Column, Index, String, Text, select
from sqlalchemy.engine import Engine
from sqlmodel import Field, SQLModel

from gateway.errors import Unavailable
from gateway.exchange.tasks import TaskError, TaskResult, TaskSpec, TaskState
from gateway.store.db import (
    WriterThread,
    create_store_engine,
    driver_sql,
    group_commit,
    is_sqlite,
)

log = logging.getLogger("fedgate.tasks")

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
    )


def kept_spec(spec: TaskSpec, *, remote: bool) -> TaskSpec:
    """What the table keeps of a task: all of it, or for a task sent to a partner no input."""
    return replace(spec, input={}, input_field_actions=()) if remote else spec


class TaskStore(ABC):
    """Accepted tasks by (origin, key)."""

    @abstractmethod
    async def accept(self, origin_org: str, spec: TaskSpec, *, remote: bool) -> TaskRow | None:
        """Record a newly accepted task; returns the existing row instead if the key is taken.

        A `remote` task (sent to a partner) is kept without its input (see `kept_spec`).
        """

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
        self.rows[key] = TaskRow(
            origin_org,
            key[1],
            spec.task_id,
            spec.target,
            spec.requester,
            remote,
            TaskState.WORKING,
            kept_spec(spec, remote=remote),
            None,
            now,
            now,
        )
        return None

    async def finish(self, origin_org: str, key: str, result: TaskResult) -> None:
        row = self.rows.get((origin_org, key))
        if row is not None:
            self.rows[(origin_org, key)] = replace(
                row,
                state=result.state,
                spec=None,
                result=result,
                updated_ms=int(time.time() * 1000),
            )

    async def forget(self, origin_org: str, key: str) -> None:
        self.rows.pop((origin_org, key), None)

    async def get(self, origin_org: str, key: str) -> TaskRow | None:
        return self.rows.get((origin_org, key))

    async def by_task_id(self, origin_org: str, task_id: str) -> TaskRow | None:
        return next(
            (r for r in self.rows.values() if r.origin_org == origin_org and r.task_id == task_id),
            None,
        )

    async def unfinished(self) -> list[TaskRow]:
        return [r for r in self.rows.values() if not r.final]


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


def _row(model: Any) -> TaskRow:
    return TaskRow(
        origin_org=model.origin_org,
        key=model.key,
        task_id=model.task_id,
        target=model.target,
        requester=model.requester,
        remote=bool(model.remote),
        state=TaskState(model.state),
        spec=spec_from_json(json.loads(model.spec_json)) if model.spec_json else None,
        result=result_from_json(json.loads(model.result_json)) if model.result_json else None,
        created_ms=model.created_ms,
        updated_ms=model.updated_ms,
    )


# The writes, by kind, with `?` markers (gateway.store.db.driver_sql adapts them to the driver);
# their parameters are tuples in marker order. An accept returns the key if it inserted the row.
_WRITE_SQL = {
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

# A queued write: its kind (a key of _WRITE_SQL), its parameters, and the caller's future.
_Write = tuple[str, tuple[Any, ...], asyncio.Future[Any]]


def _unavailable(exc: BaseException) -> Unavailable:
    log.error("task table cannot be written (%s)", type(exc).__name__)
    return Unavailable(
        f"the task table cannot be written: {type(exc).__name__}; tasks are refused until it "
        "recovers"
    )


class SqlTaskStore(TaskStore):
    """The task table in SQLite or PostgreSQL, written by one thread that group-commits.

    The writes are prebuilt SQL on the writer thread's cursor: an ORM session per call, and
    then Core statements with a pool checkout and a thread hop per batch, cost more than the
    rest of an exchange. If a batch fails, each of its writes is tried again on its own, so one
    bad row does not fail the others; a write that still fails raises Unavailable.
    """

    def __init__(self, url: str, *, batch_max: int = 256) -> None:
        self.url = url
        self.batch_max = batch_max
        self._sqlite = is_sqlite(url)  # read per batch: parsed once
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self._queue: asyncio.Queue[_Write | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._writer_thread = WriterThread("fedgate-task-writer", self._db)

    def _db(self) -> Engine:
        with self._lock:
            if self._engine is None:
                engine = create_store_engine(
                    self.url, synchronous="NORMAL" if self._sqlite else "FULL"
                )
                SQLModel.metadata.create_all(engine, tables=[TASKS])
                self._engine = engine
            return self._engine

    # ---- the writer: one transaction per batch -------------------------------------------

    @functools.cached_property
    def _statements(self) -> dict[str, str]:
        """The SQL of each kind of write, for the driver's parameter style."""
        return {kind: driver_sql(self._db(), sql) for kind, sql in _WRITE_SQL.items()}

    def _write_batch(self, ops: list[tuple[str, tuple[Any, ...]]]) -> list[bool | None]:
        """On the writer thread: the writes in order, in one transaction; accept -> inserted?"""
        with self._writer_thread.transaction() as cursor:
            if len(ops) > 1 and not self._sqlite:
                return self._write_pipelined(cursor.connection, ops)
            return self._write_each(cursor, ops)  # SQLite is in process: no round trips to save

    def _write_each(self, cursor: Any, ops: list[tuple[str, tuple[Any, ...]]]) -> list[bool | None]:
        statements = self._statements
        outcomes: list[bool | None] = []
        for kind, params in ops:
            cursor.execute(statements[kind], params)
            # A row back means inserted (psycopg's rowcount is -1 after ON CONFLICT).
            outcomes.append(bool(cursor.fetchall()) if kind == "accept" else None)
        return outcomes

    def _write_pipelined(
        self, connection: Any, ops: list[tuple[str, tuple[Any, ...]]]
    ) -> list[bool | None]:
        """PostgreSQL: the batch in one pipeline, one round trip to the database instead of one
        per write (across a network the round trips, not the database, would bound the task
        rate: bench.bench_task_store). A write that fails aborts the rest of the batch, and
        the error is raised when the pipeline syncs; then each write is tried on its own."""
        statements = self._statements
        pending: list[Any] = []
        try:
            with connection.pipeline():
                for kind, params in ops:
                    pending.append(connection.cursor())
                    pending[-1].execute(statements[kind], params)
            return [
                bool(each.fetchall()) if kind == "accept" else None
                for (kind, _), each in zip(ops, pending, strict=True)
            ]
        finally:
            for each in pending:
                each.close()

    async def _write(self, batch: list[_Write]) -> None:
        run = self._writer_thread.run
        try:
            outcomes = await run(self._write_batch, [(kind, params) for kind, params, _ in batch])
        except Exception:
            # One bad row must not fail the others: write each on its own.
            for kind, params, future in batch:
                try:
                    (outcome,) = await run(self._write_batch, [(kind, params)])
                except Exception as exc:
                    if not future.done():
                        future.set_exception(_unavailable(exc))
                    continue
                if not future.done():
                    future.set_result(outcome)
            return
        for (_, _, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)

    async def _submit(self, kind: str, params: tuple[Any, ...]) -> Any:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                group_commit(self._queue, self.batch_max, self._write), name="fedgate-task-writer"
            )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((kind, params, future))
        return await future

    # ---- the contract --------------------------------------------------------------------

    async def accept(self, origin_org: str, spec: TaskSpec, *, remote: bool) -> TaskRow | None:
        now = int(time.time() * 1000)
        key = task_key(origin_org, spec)[1]
        row = (
            origin_org,
            key,
            spec.task_id,
            spec.target,
            spec.requester,
            remote,
            TaskState.WORKING.value,
            json.dumps(spec_to_json(kept_spec(spec, remote=remote))),
            None,  # result_json
            now,
            now,
        )
        if await self._submit("accept", row):
            return None
        return await self.get(origin_org, key)

    async def finish(self, origin_org: str, key: str, result: TaskResult) -> None:
        await self._submit(
            "finish",
            (
                result.state.value,
                json.dumps(result_to_json(result)),
                int(time.time() * 1000),
                origin_org,
                key,
            ),
        )

    async def forget(self, origin_org: str, key: str) -> None:
        await self._submit("forget", (origin_org, key))

    def _select(self, *conditions: Any) -> TaskRow | None:
        with self._db().connect() as connection:
            found = connection.execute(select(TASKS).where(*conditions).limit(1)).first()
        return _row(found) if found is not None else None

    async def get(self, origin_org: str, key: str) -> TaskRow | None:
        return await asyncio.to_thread(
            self._select, TASKS.c.origin_org == origin_org, TASKS.c.key == key
        )

    async def by_task_id(self, origin_org: str, task_id: str) -> TaskRow | None:
        return await asyncio.to_thread(
            self._select, TASKS.c.origin_org == origin_org, TASKS.c.task_id == task_id
        )

    def _unfinished(self) -> list[TaskRow]:
        finals = [s.value for s in TaskState if s.final]
        with self._db().connect() as connection:
            rows = connection.execute(select(TASKS).where(TASKS.c.state.not_in(finals))).all()
        return [_row(r) for r in rows]

    async def unfinished(self) -> list[TaskRow]:
        return await asyncio.to_thread(self._unfinished)

    async def close(self) -> None:
        """Write what is queued, end the writer thread and release the connections."""
        writer, queue = self._writer, self._queue
        self._writer = self._queue = None  # a write submitted from now on starts a new writer
        if writer is not None and queue is not None and not writer.done():
            queue.put_nowait(None)
            await writer
        await asyncio.to_thread(self._dispose)

    def _dispose(self) -> None:
        self._writer_thread.stop()
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
