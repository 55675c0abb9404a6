"""The audit store on SQLite and PostgreSQL (and its in-memory twin): append, query, group commit,
reopen, outage and recovery, checkpoints."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.audit.chain import GENESIS_HASH, chain_hash
from gateway.audit.store import AuditEvent, AuditStore, MemoryAuditStore, SqlAuditStore, open_store
from gateway.errors import (
    AuditUnavailable,
    ConfigError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from gateway.identity.signing import sign_checkpoint
from gateway.payload import digest


def _event(i: int = 0, **fields: object) -> AuditEvent:
    values: dict[str, object] = {
        "kind": "request_sent",
        "task_id": f"task-{i}",
        "peer_org": "beta",
        "agent": "triage",
        "skill": "assess",
        "direction": "outbound",
        "decision": "allowed",
        "requester": "alpha/nurse",
        "status": "OK",
        "duration_ms": 1.5,
        "withheld_paths": ("patient.name",),
        "transformed": (("patient.zip", "masked"),),
        "digest_before": digest({"i": i, "secret": 1}),
        "digest_after": digest({"i": i}),
        "policy_version": "sha256:p1",
        "detail": "",
    }
    values.update(fields)
    return AuditEvent(**values)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def any_store(
    request: pytest.FixtureRequest, audit_pki: object, tmp_path: Path
) -> AsyncIterator[AuditStore]:
    """The memory twin, and the SQL store on SQLite and PostgreSQL."""
    verifier = audit_pki.verifier()  # type: ignore[attr-defined]
    store: AuditStore
    if request.param == "memory":
        store = MemoryAuditStore(verifier=verifier)
    elif request.param == "sqlite":
        store = SqlAuditStore(f"sqlite:///{tmp_path / 'audit.db'}", verifier=verifier)
    else:
        store = SqlAuditStore(request.getfixturevalue("audit_pg_url")(), verifier=verifier)
    await store.start()
    yield store
    await store.close()


# ---- append and read ----


async def test_append_returns_chained_record(any_store: AuditStore) -> None:
    first = await any_store.append(_event(1, receipt={"x": 1}, payload={"a": [1, 2.5]}))
    second = await any_store.append(_event(2))
    assert (first.sequence, second.sequence) == (1, 2)
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.record_hash
    assert first.record_hash == chain_hash(GENESIS_HASH, first.body())
    assert first.withheld_paths == ("patient.name",)
    assert first.transformed == (("patient.zip", "masked"),)
    assert list(any_store.records()) == [first, second]
    assert any_store.healthy


async def test_records_round_trip_exactly(any_store: AuditStore) -> None:
    """What append returned is what a read gives back, so the stored hash verifies."""
    written = await any_store.append(
        _event(
            1,
            duration_ms=3,
            receipt={"n": 1.0, "nested": {"k": [True, None]}},
            payload=None,
            digest_before=None,
            policy_version=None,
        )
    )
    (read,) = any_store.records()
    assert read == written
    assert read.computed_hash() == read.record_hash
    assert isinstance(read.duration_ms, float)


async def test_query_filters_and_paging(any_store: AuditStore) -> None:
    for i in range(30):
        await any_store.append(
            _event(
                i,
                peer_org="beta" if i % 2 else "gamma",
                agent="triage" if i % 3 else "billing",
                decision="denied" if i % 5 == 0 else "allowed",
                kind="invoke_denied" if i % 5 == 0 else "request_sent",
            )
        )
    assert len(any_store.query(limit=1000)) == 30
    assert all(r.peer_org == "beta" for r in any_store.query(peer="beta"))
    assert len(any_store.query(peer="beta")) == 15
    assert len(any_store.query(agent="billing")) == 10
    assert len(any_store.query(decision="denied")) == 6
    assert len(any_store.query(kind="invoke_denied", peer="gamma")) == 3
    assert [r.task_id for r in any_store.query(task_id="task-7")] == ["task-7"]
    page1 = any_store.query(limit=10)
    page2 = any_store.query(limit=10, offset=10)
    assert [r.sequence for r in page1] == list(range(1, 11))
    assert [r.sequence for r in page2] == list(range(11, 21))
    assert [r.sequence for r in any_store.query(limit=3, newest_first=True)] == [30, 29, 28]
    now = dt.datetime.now(dt.UTC)
    assert len(any_store.query(since=now - dt.timedelta(minutes=5), limit=100)) == 30
    assert any_store.query(since=now + dt.timedelta(minutes=5)) == []
    assert any_store.query(until=now - dt.timedelta(minutes=5)) == []
    naive = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=5)
    assert len(any_store.query(since=naive, limit=100)) == 30  # naive means UTC


async def test_records_streams_from_a_start_sequence(audit_store: SqlAuditStore) -> None:
    import gateway.audit.store as audit_module

    original = audit_module._READ_BATCH
    audit_module._READ_BATCH = 7  # force several batches
    try:
        await asyncio.gather(*(audit_store.append(_event(i)) for i in range(40)))
        assert [r.sequence for r in audit_store.records()] == list(range(1, 41))
        assert [r.sequence for r in audit_store.records(33)] == list(range(33, 41))
    finally:
        audit_module._READ_BATCH = original


async def test_group_commit_batches_concurrent_appends(any_store: AuditStore) -> None:
    records = await asyncio.gather(*(any_store.append(_event(i)) for i in range(300)))
    assert sorted(r.sequence for r in records) == list(range(1, 301))
    assert any_store.commits < 300 / 4, any_store.commits
    assert any_store.verify("alpha", None).ok


async def test_batch_max_bounds_a_transaction(audit_pki: object) -> None:
    store = MemoryAuditStore(batch_max=10)
    await asyncio.gather(*(store.append(_event(i)) for i in range(100)))
    assert store.commits >= 10
    await store.close()


async def test_close_flushes_pending_appends(any_store: AuditStore) -> None:
    pending = [asyncio.ensure_future(any_store.append(_event(i))) for i in range(50)]
    await asyncio.sleep(0)
    await any_store.close()
    results = await asyncio.gather(*pending)
    assert sorted(r.sequence for r in results) == list(range(1, 51))
    with pytest.raises(AuditUnavailable, match="the store is closed"):
        await any_store.append(_event(99))


async def test_an_append_while_closing_is_refused_not_left_waiting(any_store: AuditStore) -> None:
    first = asyncio.ensure_future(any_store.append(_event(1)))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(any_store.close())
    await asyncio.sleep(0)  # close has queued the writer's stop
    with pytest.raises(AuditUnavailable, match="the store is closed"):
        await asyncio.wait_for(any_store.append(_event(2)), 5)
    await closing
    assert (await first).sequence == 1


async def test_survives_close_and_reopen_and_the_chain_continues(audit_db_url: str) -> None:
    store = open_store(audit_db_url)
    await store.start()
    before = [await store.append(_event(i)) for i in range(5)]
    await store.close()

    reopened = open_store(audit_db_url)
    await reopened.start()
    assert list(reopened.records()) == before
    after = await reopened.append(_event(5))
    assert after.sequence == 6 and after.prev_hash == before[-1].record_hash
    report = reopened.verify("alpha", None)
    assert report.ok and report.records == 6 and report.head_hash == after.record_hash
    await reopened.close()


async def test_append_without_start_opens_the_store(audit_db_url: str) -> None:
    store = SqlAuditStore(audit_db_url)
    record = await store.append(_event(1))
    assert record.sequence == 1
    await store.close()


async def test_bad_events_are_refused_before_they_reach_the_log(any_store: AuditStore) -> None:
    with pytest.raises(InvalidArgument, match="unknown audit event kind 'sent'"):
        await any_store.append(_event(kind="sent"))
    with pytest.raises(InvalidArgument, match="inbound or outbound"):
        await any_store.append(_event(direction="sideways"))
    with pytest.raises(InvalidArgument, match="finite"):
        await any_store.append(_event(duration_ms=float("nan")))
    with pytest.raises(InvalidArgument, match="payload is not a JSON object"):
        await any_store.append(_event(payload={"s": {1, 2}}))
    with pytest.raises(InvalidArgument, match="NUL"):
        await any_store.append(_event(task_id="t\x00"))
    record = await any_store.append(_event(1))
    assert record.sequence == 1  # nothing was consumed by the refused events


# ---- outage and recovery ----


@contextlib.contextmanager
def _writes_blocked(url: str) -> Iterator[None]:
    """Hold a write lock on the audit table from another connection (a store outage)."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            connection.execute("ROLLBACK")
            connection.close()
        return
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        transaction = connection.begin()
        connection.execute(sa.text("LOCK TABLE audit_record IN ACCESS EXCLUSIVE MODE"))
        try:
            yield
        finally:
            transaction.rollback()
    engine.dispose()


async def test_outage_fails_closed_then_recovers(
    audit_store: SqlAuditStore, audit_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    committed = [await audit_store.append(_event(i)) for i in range(3)]
    caplog.set_level(logging.INFO, logger="fedgate.audit")
    with _writes_blocked(audit_db_url):
        results = await asyncio.gather(
            *(
                audit_store.append(_event(10 + i, payload={"ssn": "s3cr3t-value"}))
                for i in range(5)
            ),
            return_exceptions=True,
        )
        assert all(isinstance(r, AuditUnavailable) for r in results), results
        assert "audit store cannot be written" in str(results[0])
        assert "exchanges are refused until it recovers" in str(results[0])
        assert not audit_store.healthy
    assert any("cannot be written" in m for m in caplog.messages)
    assert "s3cr3t-value" not in caplog.text  # never a value in a log line
    assert not any("s3cr3t-value" in str(r) for r in results)  # nor in the error
    recovered = await audit_store.append(_event(20))
    assert audit_store.healthy
    assert recovered.sequence == 4 and recovered.prev_hash == committed[-1].record_hash
    more = await asyncio.gather(*(audit_store.append(_event(30 + i)) for i in range(10)))
    assert [r.sequence for r in sorted(more, key=lambda r: r.sequence)] == list(range(5, 15))
    records = list(audit_store.records())
    assert [r.sequence for r in records] == list(range(1, 15))  # no gap, no duplicate
    assert {r.task_id for r in records}.isdisjoint({f"task-{10 + i}" for i in range(5)})
    assert audit_store.verify("alpha", None).ok


async def test_memory_twin_outage_and_recovery() -> None:
    store = MemoryAuditStore()
    await store.append(_event(1))
    store.fail_writes = True
    with pytest.raises(AuditUnavailable, match="cannot be written"):
        await store.append(_event(2))
    assert not store.healthy
    store.fail_writes = False
    record = await store.append(_event(3))
    assert store.healthy and record.sequence == 2
    assert store.verify("alpha", None).ok
    await store.close()


async def test_unreachable_database_fails_closed_with_a_clear_error() -> None:
    store = SqlAuditStore("postgresql+psycopg://postgres@127.0.0.1:1/none", busy_timeout_ms=1000)
    with pytest.raises(AuditUnavailable, match=r"audit store cannot be written: .*refused until"):
        await store.start()
    assert not store.healthy
    with pytest.raises(AuditUnavailable):
        await store.append(_event(1))
    await store.close()


def test_bad_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="is not a database URL"):
        SqlAuditStore("not a url")


async def test_sqlite_pragmas(tmp_path: object) -> None:
    store = SqlAuditStore(f"sqlite:///{tmp_path}/a.db")  # type: ignore[str-bytes-safe]
    await store.start()
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL

    def writer_pragmas() -> tuple[str, int]:
        """On the writer thread: the settings of the connection records are committed on."""
        with store._writer_thread.transaction() as cursor:
            journal = cursor.execute("PRAGMA journal_mode").fetchone()[0]
            return journal, cursor.execute("PRAGMA synchronous").fetchone()[0]

    assert await store._run(writer_pragmas) == ("wal", 2)
    await store.close()


# ---- checkpoints ----


async def test_checkpoint_signs_the_committed_head(any_store: AuditStore, audit_pki) -> None:
    records = [await any_store.append(_event(i)) for i in range(4)]
    checkpoint = await any_store.checkpoint(audit_pki.signer("alpha"))
    assert (checkpoint.sequence, checkpoint.head_hash) == (4, records[-1].record_hash)
    assert any_store.own_checkpoints() == [checkpoint]
    report = any_store.verify("alpha", audit_pki.verifier())
    assert report.ok and report.checkpoints_checked == 1


async def test_checkpoint_of_an_empty_log(any_store: AuditStore, audit_pki) -> None:
    checkpoint = await any_store.checkpoint(audit_pki.signer("alpha"))
    assert (checkpoint.sequence, checkpoint.head_hash) == (0, GENESIS_HASH)
    assert any_store.verify("alpha", audit_pki.verifier()).ok


async def test_peer_checkpoints_are_verified_and_kept(any_store: AuditStore, audit_pki) -> None:
    beta = audit_pki.signer("beta")
    first = sign_checkpoint(beta, 10, "aa" * 32)
    later = sign_checkpoint(beta, 12, "bb" * 32)
    await any_store.store_peer_checkpoint(first)
    await any_store.store_peer_checkpoint(later)
    await any_store.store_peer_checkpoint(later)  # the same head again is not kept twice
    assert any_store.peer_checkpoints("beta") == [first, later]
    assert any_store.peer_checkpoints("gamma") == []
    assert any_store.peer_checkpoints() == [first, later]


async def test_peer_checkpoint_with_bad_signature_is_refused(
    any_store: AuditStore, audit_pki
) -> None:
    import dataclasses

    forged = dataclasses.replace(
        sign_checkpoint(audit_pki.signer("beta"), 5, "aa" * 32), sequence=6
    )
    with pytest.raises(Unauthenticated, match="does not verify"):
        await any_store.store_peer_checkpoint(forged)
    assert any_store.peer_checkpoints() == []


async def test_peer_head_going_backwards_is_refused(any_store: AuditStore, audit_pki) -> None:
    beta = audit_pki.signer("beta")
    await any_store.store_peer_checkpoint(sign_checkpoint(beta, 10, "aa" * 32))
    with pytest.raises(PermissionDenied, match="lost records or was rewritten"):
        await any_store.store_peer_checkpoint(sign_checkpoint(beta, 9, "cc" * 32))
    with pytest.raises(PermissionDenied, match="lost records or was rewritten"):
        await any_store.store_peer_checkpoint(sign_checkpoint(beta, 10, "dd" * 32))


async def test_peer_checkpoint_needs_a_verifier(audit_pki) -> None:
    store = MemoryAuditStore()
    with pytest.raises(ConfigError, match="no federation CA"):
        await store.store_peer_checkpoint(sign_checkpoint(audit_pki.signer("beta"), 1, "aa" * 32))


# ---- retention ----


async def test_prune_keeps_a_verifiable_chain(
    any_store: AuditStore, audit_pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.audit.store as audit_module

    day = 86_400_000
    clock = iter(range(1_000 * day, 1_000 * day + 100 * day, day))
    monkeypatch.setattr(audit_module, "_now_ms", lambda: next(clock))
    records = [await any_store.append(_event(i)) for i in range(10)]
    signer = audit_pki.signer("alpha")
    await any_store.checkpoint(signer)
    cut = records[6].time  # records 1..6 are older than this
    through = any_store.cut_sequence(cut)
    assert through == 6
    anchor = any_store.sign_cut(through, signer)
    assert any_store.prune(anchor) == 6
    assert [r.sequence for r in any_store.records()] == [7, 8, 9, 10]
    assert any_store.retention_anchor() == anchor
    report = any_store.verify("alpha", audit_pki.verifier())
    assert report.ok, report.problems
    assert report.first_sequence == 7 and report.records == 4
    appended = await any_store.append(_event(11))
    assert appended.sequence == 11
    # prune everything: the next record chains from the retention anchor
    last = any_store.sign_cut(11, signer)
    any_store.prune(last)
    assert list(any_store.records()) == []
    assert any_store.verify("alpha", audit_pki.verifier()).ok
    after = await any_store.append(_event(12))
    assert (after.sequence, after.prev_hash) == (12, last.head_hash)
    assert any_store.verify("alpha", audit_pki.verifier()).ok
