"""The task table, in the gateway's one store, on the memory twin, SQLite and PostgreSQL.

A step's audit record and its task-table write commit in one transaction: both or neither.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from gateway.audit.store import AuditEvent, AuditStore, MemoryAuditStore, SqlAuditStore
from gateway.errors import AuditUnavailable, Unavailable
from gateway.exchange.tasks import TaskError, TaskResult, TaskSpec, TaskState
from gateway.store.task_table import Accept, Finish, TaskTable, task_key

PG = os.environ.get("FEDGATE_TEST_DATABASE_URL")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def one_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AuditStore]:
    if request.param == "memory":
        yield MemoryAuditStore()
        return
    if request.param == "sqlite":
        sql = SqlAuditStore(f"sqlite:///{tmp_path / 'fedgate.db'}")
        yield sql
        await sql.close()
        return
    if not PG:
        pytest.skip("PostgreSQL tests need FEDGATE_TEST_DATABASE_URL")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    sql = SqlAuditStore(f"{PG}?options=-csearch_path%3D{schema}")
    try:
        yield sql
    finally:
        await sql.close()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def store(one_store: AuditStore) -> TaskTable:
    return one_store.tasks


def _spec(task_id: str, key: str = "") -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        target_org="hospital",
        agent="echo",
        skill="say",
        input={"n": 1, "who": "ada"},
        requester="tester",
        deadline=time.time() + 60,
        idempotency_key=key,
    )


async def test_a_task_sent_to_a_partner_is_kept_without_its_input(store: TaskTable) -> None:
    """The partner holds a task we sent (a retry brings the input again): our table keeps no
    copy of the payload, while a task for one of our own agents keeps it until it ends."""
    sent = _spec("t-sent", "k-sent")
    assert await store.accept("insurer", sent, remote=True) is None
    assert await store.accept("insurer", _spec("t-own", "k-own"), remote=False) is None
    kept = await store.get(*task_key("insurer", sent))
    own = await store.get(*task_key("insurer", _spec("t-own", "k-own")))
    assert kept is not None and kept.spec is not None and kept.remote
    assert kept.spec.input == {} and kept.spec.task_id == "t-sent"
    assert kept.spec.deadline == sent.deadline, "a retry still resumes it before its deadline"
    assert own is not None and own.spec is not None and own.spec.input == {"n": 1, "who": "ada"}


async def test_accept_once_then_conflict_returns_the_existing_row(store: TaskTable) -> None:
    assert await store.accept("insurer", _spec("t-1", "k-1"), remote=False) is None
    existing = await store.accept("insurer", _spec("t-2", "k-1"), remote=False)
    assert existing is not None and existing.task_id == "t-1" and not existing.final
    assert existing.spec is not None and existing.spec.input == {"n": 1, "who": "ada"}
    assert await store.accept("lab", _spec("t-3", "k-1"), remote=False) is None, (
        "keys are per origin"
    )


async def test_finish_keeps_the_result_and_drops_the_input(store: TaskTable) -> None:
    await store.accept("insurer", _spec("t-1"), remote=True)
    key = task_key("insurer", _spec("t-1"))[1]
    result = TaskResult(
        "t-1",
        TaskState.COMPLETED,
        output={"ok": True},
        field_actions=(("a.b", "withheld"),),
        receipt={"sig": "x"},
        responder_org="hospital",
        policy_version="sha256:1",
    )
    await store.finish("insurer", key, result)
    row = await store.get("insurer", key)
    assert row is not None and row.final and row.spec is None and row.result == result
    assert (await store.by_task_id("insurer", "t-1")) == row
    assert await store.unfinished() == []


async def test_unfinished_and_forget(store: TaskTable) -> None:
    await store.accept("insurer", _spec("t-1"), remote=False)
    await store.accept("insurer", _spec("t-2"), remote=True)
    await store.finish(
        "insurer",
        task_key("insurer", _spec("t-2"))[1],
        TaskResult("t-2", TaskState.FAILED, error=TaskError("x", "y")),
    )
    assert [r.task_id for r in await store.unfinished()] == ["t-1"]
    await store.forget("insurer", task_key("insurer", _spec("t-1"))[1])
    assert await store.get("insurer", task_key("insurer", _spec("t-1"))[1]) is None
    assert await store.accept("insurer", _spec("t-1"), remote=False) is None


async def test_concurrent_accepts_of_one_key_let_exactly_one_through(store: TaskTable) -> None:
    outcomes = await asyncio.gather(
        *(store.accept("insurer", _spec(f"t-{i}", "same"), remote=False) for i in range(20))
    )
    assert sum(o is None for o in outcomes) == 1


async def test_close_writes_what_is_queued(one_store: AuditStore, store: TaskTable) -> None:
    pending = [
        asyncio.ensure_future(store.accept("insurer", _spec(f"t-{i}"), remote=False))
        for i in range(50)
    ]
    await asyncio.sleep(0)
    await one_store.close()
    assert await asyncio.gather(*pending) == [None] * 50
    assert len(await store.unfinished()) == 50  # read back after close: all were committed


async def test_one_bad_write_does_not_fail_the_others_in_its_batch(
    one_store: AuditStore, store: TaskTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = one_store._write_step_batch

    def refuse_t13(ops, records_for, now_ms):  # type: ignore[no-untyped-def]
        if any(isinstance(op, Accept) and op.spec.task_id == "t-13" for op in ops):
            raise OSError("disk full")
        return original(ops, records_for, now_ms)

    monkeypatch.setattr(one_store, "_write_step_batch", refuse_t13)
    outcomes = await asyncio.gather(
        *(store.accept("insurer", _spec(f"t-{i}"), remote=False) for i in range(20)),
        return_exceptions=True,
    )
    assert [i for i, o in enumerate(outcomes) if o is not None] == [13]
    assert isinstance(outcomes[13], Unavailable)
    assert sorted(r.task_id for r in await store.unfinished()) == sorted(
        f"t-{i}" for i in range(20) if i != 13
    )


async def test_a_write_the_database_refuses_fails_alone_in_its_pipelined_batch(
    one_store: AuditStore, store: TaskTable
) -> None:
    """On PostgreSQL a batch's task writes are one pipeline: a write the server refuses aborts
    the transaction, so each step is tried again on its own and only the refused one fails."""
    if not (isinstance(one_store, SqlAuditStore) and one_store.url.startswith("postgresql")):
        pytest.skip("the pipeline is the PostgreSQL store's")
    too_long = "t-" + "x" * 200  # task_id is VARCHAR(128): refused by the server, not the driver
    outcomes = await asyncio.gather(
        *(store.accept("insurer", _spec(f"t-{i}"), remote=False) for i in range(10)),
        store.accept("insurer", _spec(too_long), remote=False),
        *(store.accept("insurer", _spec(f"t-{i}"), remote=False) for i in range(10, 20)),
        return_exceptions=True,
    )
    assert [i for i, o in enumerate(outcomes) if o is not None] == [10]
    assert isinstance(outcomes[10], Unavailable)
    assert outcomes[10].status.name == "UNAVAILABLE"
    assert outcomes[10].message.startswith("the task table cannot be written: StringDataRight")
    assert sorted(r.task_id for r in await store.unfinished()) == sorted(
        f"t-{i}" for i in range(20)
    )
    # and the writer goes on: a later batch, with a conflict in it, is answered in order
    again = await asyncio.gather(
        store.accept("insurer", _spec("t-3"), remote=False),
        store.accept("insurer", _spec("t-new"), remote=False),
    )
    assert again[0] is not None and again[0].task_id == "t-3"
    assert again[1] is None


def _received(task_id: str) -> AuditEvent:
    return AuditEvent(kind="request_received", task_id=task_id, peer_org="insurer")


async def test_a_step_commits_its_record_and_its_row_together(one_store: AuditStore) -> None:
    """Both or neither: no moment when the record is durable and the row is not."""
    spec = _spec("t-step", "k-step")
    written = await one_store.write(_received("t-step"), Accept("insurer", spec, False))
    assert written.existing is None and written.record is not None
    assert written.record.kind == "request_received"
    row = await one_store.tasks.get(*task_key("insurer", spec))
    assert row is not None and row.task_id == "t-step"
    # A duplicate's step writes nothing: no second record, and the row that holds the key.
    again = await one_store.write(
        _received("t-other"), Accept("insurer", _spec("t-other", "k-step"), False)
    )
    assert again.existing is not None and again.existing.task_id == "t-step"
    assert again.record is None
    assert one_store.query(task_id="t-other") == []
    result = TaskResult("t-step", TaskState.COMPLETED, output={"ok": True})
    released = AuditEvent(kind="result_released", task_id="t-step", peer_org="insurer")
    written = await one_store.write(
        released, Finish("insurer", task_key("insurer", spec)[1], result)
    )
    assert written.record is not None and written.record.sequence == 2
    row = await one_store.tasks.get(*task_key("insurer", spec))
    assert row is not None and row.result == result
    assert one_store.verify("x", None).records == 2


async def test_a_step_that_fails_writes_neither_its_record_nor_its_row(
    one_store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec("t-fail", "k-fail")

    def fail(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(one_store, "_write_step_batch", fail)
    with pytest.raises(AuditUnavailable, match="audit store cannot be written: OSError"):
        await one_store.write(_received("t-fail"), Accept("insurer", spec, False))
    monkeypatch.undo()
    assert await one_store.tasks.get(*task_key("insurer", spec)) is None
    assert one_store.query(task_id="t-fail") == []
    # the store recovers by itself: the same step now commits, numbered from the real head
    written = await one_store.write(_received("t-fail"), Accept("insurer", spec, False))
    assert written.record is not None and written.record.sequence == 1


def test_a_key_is_per_requester_and_target() -> None:
    """The same idempotency key from another requester, or for another skill, is another task."""
    base = _spec("t-1", "order-42")
    other_requester = replace(base, requester="weather-bot")
    other_target = replace(base, skill="shout")
    same_subject = replace(base, requester="tester/clerk-3")
    keys = {task_key("hospital", s)[1] for s in (base, other_requester, other_target)}
    assert len(keys) == 3
    assert task_key("hospital", same_subject) == task_key("hospital", base), "by token subject"
