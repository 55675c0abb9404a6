"""The writer thread both stores write through, on SQLite and PostgreSQL: order, one persistent
connection used by one thread, commit or discard, reconnecting, stopping."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import gateway.store.db
from gateway.store.db import WriterThread, create_store_engine, driver_sql


@pytest.fixture
def engine(audit_db_url: str) -> Iterator[Engine]:
    """A store engine on an empty database (SQLite file or fresh PostgreSQL schema)."""
    engine = create_store_engine(audit_db_url, busy_timeout_ms=300)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE numbers (n INTEGER NOT NULL)"))
    yield engine
    engine.dispose()


@pytest.fixture
def writer(engine: Engine) -> Iterator[WriterThread]:
    writer = WriterThread("test-writer", lambda: engine)
    yield writer
    writer.stop()


def _numbers(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(connection.execute(sa.text("SELECT n FROM numbers ORDER BY n")).scalars())


def _insert(writer: WriterThread, engine: Engine, n: int) -> tuple[threading.Thread, Any]:
    """A job: insert `n` in one transaction; returns the thread and connection it ran on."""
    with writer.transaction() as cursor:
        cursor.execute(driver_sql(engine, "INSERT INTO numbers (n) VALUES (?)"), (n,))
        return threading.current_thread(), cursor.connection


async def test_jobs_run_in_order_on_one_thread_and_one_connection(
    writer: WriterThread, engine: Engine
) -> None:
    order: list[int] = []

    def job(n: int) -> tuple[threading.Thread, Any]:
        order.append(n)
        return _insert(writer, engine, n)

    ran_on = await asyncio.gather(*(writer.run(job, n) for n in range(50)))
    assert order == list(range(50))
    assert _numbers(engine) == list(range(50)), "each transaction is committed"
    assert len({thread for thread, _ in ran_on}) == 1
    assert next(iter(ran_on))[0] is not threading.current_thread()
    assert len({id(connection) for _, connection in ran_on}) == 1, "one persistent connection"


async def test_a_failed_transaction_rolls_back_and_the_next_one_reconnects(
    writer: WriterThread, engine: Engine
) -> None:
    _, first = await writer.run(_insert, writer, engine, 1)

    def fails_inside() -> None:
        with writer.transaction() as cursor:
            cursor.execute(driver_sql(engine, "INSERT INTO numbers (n) VALUES (?)"), (10,))
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await writer.run(fails_inside)
    _, second = await writer.run(_insert, writer, engine, 2)
    assert second is not first, "a connection that failed a transaction is discarded"
    with pytest.raises(Exception, match="(?i)null"):  # sqlite3 and psycopg errors differ
        await writer.run(_insert, writer, engine, None)  # the database refuses it
    _, third = await writer.run(_insert, writer, engine, 3)
    assert third is not second, "also when the database failed it (PostgreSQL: aborted)"
    assert _numbers(engine) == [1, 2, 3], "nothing of a failed transaction is committed"


@pytest.mark.postgres
async def test_an_idle_connection_that_died_is_replaced_before_a_write(
    audit_pg_url: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PostgreSQL restart (here: the server ends the backend) costs a reconnect, not a batch."""
    engine = create_store_engine(audit_pg_url())
    writer = WriterThread("test-writer", lambda: engine)

    def backend_pid() -> int:
        with writer.transaction() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return int(cursor.fetchone()[0])

    try:
        first = await writer.run(backend_pid)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        monkeypatch.setattr(gateway.store.db, "_IDLE_CHECK_SECONDS", 0.0)
        second = await writer.run(backend_pid)
        assert second != first
    finally:
        writer.stop()
        engine.dispose()


async def test_stop_closes_the_connection_and_a_later_job_starts_again(
    writer: WriterThread, engine: Engine
) -> None:
    thread, connection = await writer.run(_insert, writer, engine, 1)
    writer.stop()
    assert not thread.is_alive()
    with pytest.raises(Exception, match="closed"):  # sqlite3 and psycopg errors differ
        connection.cursor()
    again, _ = await writer.run(_insert, writer, engine, 2)
    assert again is not thread and again.is_alive()
    assert _numbers(engine) == [1, 2]


async def test_a_cancelled_waiter_does_not_stop_the_writer(
    writer: WriterThread, engine: Engine
) -> None:
    started = threading.Event()
    release = threading.Event()

    def slow() -> None:
        started.set()
        release.wait(5)

    waiting = asyncio.ensure_future(writer.run(slow))
    await asyncio.to_thread(started.wait, 5)
    waiting.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await writer.run(_insert, writer, engine, 7)
    assert _numbers(engine) == [7]


async def test_stop_gives_up_on_a_stuck_write_after_its_timeout(
    writer: WriterThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A statement stuck on a dead database connection must not hang the gateway's shutdown."""
    started, release = threading.Event(), threading.Event()

    def stuck() -> None:
        started.set()
        release.wait(10)

    waiting = asyncio.ensure_future(writer.run(stuck))
    await asyncio.to_thread(started.wait, 5)
    try:
        await asyncio.to_thread(writer.stop, 0.2)
        assert "did not finish its writes within 0.2 s" in caplog.text
    finally:
        release.set()
        await waiting
