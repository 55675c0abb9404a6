"""Database engines for the gateway's stores: SQLite (WAL) by default, PostgreSQL for production;
and the writer thread both stores write through.

Reads and the command line go through SQLAlchemy engines. The hot writes (audit records, task
rows) do not: each store has one `WriterThread` that holds one persistent DB-API connection and
runs prebuilt SQL on its cursor. A thread hop per batch through asyncio.to_thread, a pool
checkout per batch and SQLAlchemy's statement execution cost more CPU than the inserts did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, make_url
from sqlalchemy.engine import Engine

T = TypeVar("T")
log = logging.getLogger("fedgate.db")

# A connection idle for longer than this is checked (SELECT 1) before it is written on, as the
# pool's pre-ping did: a PostgreSQL restart, or a firewall that dropped an idle connection, then
# costs a reconnect instead of a failed batch. Under load the connection is never idle that long.
_IDLE_CHECK_SECONDS = 1.0


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_store_engine(
    url: str, *, busy_timeout_ms: int = 5_000, synchronous: str = "FULL"
) -> Engine:
    """An engine whose writes fail (so the gateway fails closed) rather than hang when blocked.

    SQLite gets WAL mode, the given `synchronous` level and a busy timeout; PostgreSQL keeps the
    options given in its URL (e.g. a search_path) and gets a lock timeout. The pragmas are set on
    every new connection, including the writer threads' raw ones.
    """
    if is_sqlite(url):
        engine = create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000})

        @event.listens_for(engine, "connect")
        def _pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.close()

        return engine
    given = make_url(url).query.get("options", "")
    options = " ".join(
        [*([given] if isinstance(given, str) else given), f"-c lock_timeout={int(busy_timeout_ms)}"]
    ).strip()
    return create_engine(
        url,
        pool_pre_ping=True,
        connect_args={"connect_timeout": max(1, busy_timeout_ms // 1000), "options": options},
    )


def driver_sql(engine: Engine, sql: str) -> str:
    """`sql`, written with `?` markers, in the parameter style of the engine's DB-API driver.

    sqlite3 takes `?` (qmark); psycopg takes `%s` (format). The statements given contain no
    other `?` or `%`.
    """
    return sql if engine.dialect.paramstyle == "qmark" else sql.replace("?", "%s")


async def group_commit(
    queue: asyncio.Queue[T | None], batch_max: int, commit: Callable[[list[T]], Awaitable[None]]
) -> None:
    """A store's writer task: hand what is queued to `commit` in batches of at most
    `batch_max`, until None arrives (what was queued before it is committed first)."""
    stopping = False
    while not stopping:
        first = await queue.get()
        if first is None:
            return
        batch = [first]
        while len(batch) < batch_max and not queue.empty():
            item = queue.get_nowait()
            if item is None:
                stopping = True
                break
            batch.append(item)
        await commit(batch)


_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, asyncio.Future[Any]]


_NOTHING = object()


class _Item:
    """A write queued for the thread's batch handler (see WriterThread.put)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class WriterThread:
    """A store's one writer: a long-lived thread that runs its jobs in order on one connection.

    `run` hands a job (a function) to the thread and awaits its result, which comes back to the
    event loop with one call_soon_threadsafe. Jobs call `transaction()` for a cursor on the
    thread's persistent DB-API connection. That connection lives in a thread-local and is used
    and closed by the writer thread only (a sqlite3 connection belongs to one thread); other
    threads read through the engine's pool. The thread starts on the first job and again after
    `stop`.
    """

    def __init__(
        self,
        name: str,
        engine: Callable[[], Engine],
        *,
        batch: Callable[[list[Any]], None] | None = None,
        batch_max: int = 512,
    ) -> None:
        self._name = name
        self._engine = engine
        self._lock = threading.Lock()  # orders starting, stopping and queueing jobs
        self._worker: tuple[threading.Thread, queue.SimpleQueue[Any]] | None = None
        self._local = threading.local()  # .connection and .used_at, on the writer thread
        # Group commit without a hop through the event loop: items put() while the thread
        # commits are handed to `batch` together (at most batch_max), on the thread.
        self._batch = batch
        self._batch_max = batch_max

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` run on the writer thread, after the jobs queued before it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._enqueue((function, args, loop, future))
        return await future

    def put(self, item: Any) -> None:
        """Queue `item` for the batch handler (which settles whatever the item carries)."""
        self._enqueue(_Item(item))

    def _enqueue(self, job: Any) -> None:
        with self._lock:
            if self._worker is None:
                jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
                thread = threading.Thread(
                    target=self._serve, args=(jobs,), name=self._name, daemon=True
                )
                thread.start()
                self._worker = (thread, jobs)
            self._worker[1].put(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Run the queued jobs, close the connection and end the thread; returns when it ended,
        or after `timeout` seconds with a warning (a statement stuck on a dead database
        connection must not hang the gateway's shutdown; the thread is a daemon)."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            thread, jobs = worker
            jobs.put(None)
            thread.join(timeout)
            if thread.is_alive():
                log.warning(
                    "%s did not finish its writes within %g s; shutting down without it",
                    self._name,
                    timeout,
                )

    def _serve(self, jobs: queue.SimpleQueue[Any]) -> None:
        try:
            job = jobs.get()
            while job is not None:
                if type(job) is not _Item:
                    function, args, loop, future = job
                    try:
                        result, error = function(*args), None
                    except BaseException as exc:  # handed to the waiter, as an executor would
                        result, error = None, exc
                    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                        loop.call_soon_threadsafe(_settle, future, result, error)
                    job = jobs.get()
                    continue
                # Every item queued by now goes into this batch: one transaction, one fsync.
                batch, pending = [job.value], _NOTHING
                while len(batch) < self._batch_max:
                    try:
                        following = jobs.get_nowait()
                    except queue.Empty:
                        break
                    if type(following) is not _Item:
                        pending = following  # a job, or the stop: after this batch
                        break
                    batch.append(following.value)
                assert self._batch is not None, "put() needs a batch handler"
                self._batch(batch)
                job = jobs.get() if pending is _NOTHING else pending
        finally:
            self._discard()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor in one transaction on the writer's connection, committed at the end.

        Called by jobs, on the writer thread. A transaction that fails discards the connection
        (it may be broken, or still inside the failed transaction); the next one connects again.
        """
        connection = self._connection()
        try:
            cursor = connection.cursor()
            try:
                yield cursor
            finally:
                cursor.close()
            connection.commit()
        except BaseException:
            self._discard()
            raise

    def _connection(self) -> Any:
        """The thread's connection: checked first if it sat idle, made if there is none."""
        now = time.monotonic()
        connection = getattr(self._local, "connection", None)
        if connection is not None and now - self._local.used_at > _IDLE_CHECK_SECONDS:
            try:
                self._engine().dialect.do_ping(connection)
            except Exception:
                self._discard()
                connection = None
        if connection is None:
            pooled = self._engine().raw_connection()  # runs the engine's connect hooks (pragmas)
            connection = pooled.driver_connection
            pooled.detach()  # ours for good: closed by _discard, never returned to the pool
            self._local.connection = connection
        self._local.used_at = now
        return connection

    def _discard(self) -> None:
        """Roll back and close the thread's connection, if any.

        Rolled back explicitly: a sqlite3 connection still referenced (by a traceback, say)
        would otherwise keep its failed transaction, and the write lock, until collected.
        """
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.rollback()
            with contextlib.suppress(Exception):
                connection.close()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the waiter was cancelled
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
