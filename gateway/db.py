"""Database engines for the gateway's stores: SQLite (WAL) by default, PostgreSQL for production."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, event, make_url
from sqlalchemy.engine import Engine


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_store_engine(
    url: str, *, busy_timeout_ms: int = 5_000, synchronous: str = "FULL"
) -> Engine:
    """An engine whose writes fail (so the gateway fails closed) rather than hang when blocked.

    SQLite gets WAL mode, the given `synchronous` level and a busy timeout; PostgreSQL keeps the
    options given in its URL (e.g. a search_path) and gets a lock timeout.
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
