"""The gateway's store on PostgreSQL: a batch's task writes in one pipeline vs one round trip each.

    python -m bench.bench_task_store [--quick] [--delay-ms 0.25]

Each exchange commits two steps on each gateway, each an audit record and a task-table write in
one transaction (request_received + accept, then result_released + finish); concurrent
exchanges share a batch. Both stores run in the same process against the same database,
alternately: directly on loopback, and through a proxy that delays each direction by
`--delay-ms`, as a database across a network would (the proxy, being Python, adds some delay
of its own, the same for both). The database is FEDGATE_BENCH_DATABASE_URL, else
FEDGATE_TEST_DATABASE_URL; without either the benchmark says so and measures nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import create_engine, make_url, text

from gateway.audit.store import AuditEvent, SqlAuditStore
from gateway.exchange.tasks import TaskResult, TaskSpec, TaskState
from gateway.store.task_table import Accept, Finish, task_key

CALLERS = 64


def database_url() -> str | None:
    return os.environ.get("FEDGATE_BENCH_DATABASE_URL") or os.environ.get(
        "FEDGATE_TEST_DATABASE_URL"
    )


class OneRoundTripEach(SqlAuditStore):
    """The baseline: the same batches, but each task write waits for its own answer."""

    def _ops_pipelined(
        self, connection: Any, params: list[tuple[str, tuple[Any, ...]]]
    ) -> list[bool | None]:
        with connection.cursor() as cursor:
            return self._ops_each(cursor, params)


@contextlib.asynccontextmanager
async def delayed(host: str, port: int, delay_s: float) -> AsyncIterator[int]:
    """A local TCP proxy to host:port that delays each direction by `delay_s`; yields its port."""

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                at, data = await due.get()
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(65536):
                due.put_nowait((time.monotonic() + delay_s, data))
            due.put_nowait((time.monotonic() + delay_s, b""))
            await sender
        finally:
            sender.cancel()

    streams: list[asyncio.StreamWriter] = []
    handlers: set[asyncio.Task[Any]] = set()

    async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
        streams.extend((writer, upstream_writer))
        await asyncio.gather(
            pump(reader, upstream_writer), pump(upstream_reader, writer), return_exceptions=True
        )

    server = await asyncio.start_server(connect, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for stream in streams:  # the pumps see the end of their streams and finish
            stream.close()
        if handlers:
            await asyncio.wait(handlers, timeout=5)


async def _rate(store: SqlAuditStore, tasks: int, tag: str) -> float:
    """Tasks per second (two steps each) with CALLERS concurrent callers."""
    per_caller = max(1, tasks // CALLERS)

    async def caller(k: int) -> None:
        for i in range(per_caller):
            spec = TaskSpec(
                task_id=f"{tag}-{k}-{i}",
                target_org="hospital",
                agent="records",
                skill="summary",
                input={"patient": k, "i": i},
                requester="nurse",
                deadline=time.time() + 60,
            )
            received = AuditEvent("request_received", spec.task_id, "insurer", "records")
            written = await store.write(received, Accept("insurer", spec, False))
            if written.existing is not None:
                raise SystemExit(f"task {spec.task_id} was already in the table")
            result = TaskResult(spec.task_id, TaskState.COMPLETED, output={"ok": True})
            released = AuditEvent("result_released", spec.task_id, "insurer", "records")
            await store.write(released, Finish("insurer", task_key("insurer", spec)[1], result))

    await caller(-1)  # connect and warm up outside the clock
    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(CALLERS)))
    return per_caller * CALLERS / (time.perf_counter() - started)


async def _measure(url: str, tasks: int, rounds: int, delay_ms: float) -> None:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    parsed = make_url(url)
    try:
        print(
            f"{'database':<34} {'pipelined':>12} {'1 round trip each':>18} {'ratio':>6}"
            f"   ({CALLERS} callers, two steps per task)"
        )
        async with delayed(
            parsed.host or "127.0.0.1", parsed.port or 5432, delay_ms / 1000
        ) as port:
            for label, target in (
                ("loopback", parsed),
                (f"+{delay_ms:g} ms each way (proxy)", parsed.set(host="127.0.0.1", port=port)),
            ):
                dsn = target.update_query_dict({"options": f"-csearch_path={schema}"})
                found: dict[str, list[float]] = {"pipelined": [], "each": []}
                for r in range(rounds):  # alternate, so both see the same machine
                    for name, kind in (("pipelined", SqlAuditStore), ("each", OneRoundTripEach)):
                        store = kind(dsn.render_as_string(hide_password=False))
                        try:
                            found[name].append(await _rate(store, tasks, f"{name}-{label}-{r}"))
                        finally:
                            await store.close()
                pipelined, each = max(found["pipelined"]), max(found["each"])
                print(
                    f"{label:<34} {pipelined:>10,.0f}/s {each:>16,.0f}/s {pipelined / each:>5.1f}x"
                )
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="Small counts: a few seconds.")
    parser.add_argument(
        "--delay-ms", type=float, default=0.25, help="One-way delay to the database (proxy)."
    )
    args = parser.parse_args(argv)
    url = database_url()
    if url is None:
        print(
            "task table on PostgreSQL: not measured (set FEDGATE_BENCH_DATABASE_URL or "
            "FEDGATE_TEST_DATABASE_URL)"
        )
        return 0
    print(f"task table on PostgreSQL{' [quick]' if args.quick else ''}")
    asyncio.run(_measure(url, 640 if args.quick else 6_400, 1 if args.quick else 3, args.delay_ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
