"""The task table contract, on the memory twin, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from gateway.errors import Unavailable
from gateway.exchange.tasks import TaskError, TaskResult, TaskSpec, TaskState
from gateway.store.task_table import MemoryTaskStore, SqlTaskStore, TaskStore, task_key

PG = os.environ.get("FEDGATE_TEST_DATABASE_URL")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskStore]:
    if request.param == "memory":
        yield MemoryTaskStore()
        return
    if request.param == "sqlite":
        sql = SqlTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}")
        yield sql
        await sql.close()
        return
    if not PG:
        pytest.skip("PostgreSQL tests need FEDGATE_TEST_DATABASE_URL")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    sql = SqlTaskStore(f"{PG}?options=-csearch_path%3D{schema}")
    try:
        yield sql
    finally:
        await sql.close()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


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


async def test_a_task_sent_to_a_partner_is_kept_without_its_input(store: TaskStore) -> None:
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


async def test_accept_once_then_conflict_returns_the_existing_row(store: TaskStore) -> None:
    assert await store.accept("insurer", _spec("t-1", "k-1"), remote=False) is None
    existing = await store.accept("insurer", _spec("t-2", "k-1"), remote=False)
    assert existing is not None and existing.task_id == "t-1" and not existing.final
    assert existing.spec is not None and existing.spec.input == {"n": 1, "who": "ada"}
    assert await store.accept("lab", _spec("t-3", "k-1"), remote=False) is None, (
        "keys are per origin"
    )


async def test_finish_keeps_the_result_and_drops_the_input(store: TaskStore) -> None:
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


async def test_unfinished_and_forget(store: TaskStore) -> None:
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


async def test_concurrent_accepts_of_one_key_let_exactly_one_through(store: TaskStore) -> None:
    outcomes = await asyncio.gather(
        *(store.accept("insurer", _spec(f"t-{i}", "same"), remote=False) for i in range(20))
    )
    assert sum(o is None for o in outcomes) == 1


async def test_close_writes_what_is_queued(store: TaskStore) -> None:
    pending = [
        asyncio.ensure_future(store.accept("insurer", _spec(f"t-{i}"), remote=False))
        for i in range(50)
    ]
    await asyncio.sleep(0)
    await store.close()
    assert await asyncio.gather(*pending) == [None] * 50
    assert len(await store.unfinished()) == 50  # read back after close: all were committed


async def test_one_bad_write_does_not_fail_the_others_in_its_batch(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not isinstance(store, SqlTaskStore):
        pytest.skip("batches are the SQL store's")
    original = store._write_batch

    def refuse_t13(ops: list[tuple[str, tuple[object, ...]]]) -> list[bool | None]:
        if any(kind == "accept" and params[2] == "t-13" for kind, params in ops):
            raise OSError("disk full")
        return original(ops)

    monkeypatch.setattr(store, "_write_batch", refuse_t13)
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
    store: TaskStore,
) -> None:
    """On PostgreSQL a batch is one pipeline: a write the server refuses aborts the rest of
    it, so each is tried again on its own and only the refused one fails."""
    if not (isinstance(store, SqlTaskStore) and store.url.startswith("postgresql")):
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


def test_a_key_is_per_requester_and_target() -> None:
    """The same idempotency key from another requester, or for another skill, is another task."""
    base = _spec("t-1", "order-42")
    other_requester = TaskSpec(**{**base.__dict__, "requester": "weather-bot"})
    other_target = TaskSpec(**{**base.__dict__, "skill": "shout"})
    same_subject = TaskSpec(**{**base.__dict__, "requester": "tester/clerk-3"})
    keys = {task_key("hospital", s)[1] for s in (base, other_requester, other_target)}
    assert len(keys) == 3
    assert task_key("hospital", same_subject) == task_key("hospital", base), "by token subject"
