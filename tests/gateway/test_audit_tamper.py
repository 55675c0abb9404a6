"""Tampering with the stored log by raw SQL, on SQLite and PostgreSQL: each kind is detected and
verify names the first bad record and what is wrong."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.audit.chain import VerifyReport, chain_events, make_record
from gateway.audit.rows import record_values
from gateway.audit.store import AuditEvent, SqlAuditStore
from gateway.identity.signing import SignedCheckpoint
from gateway.payload import digest

COUNT = 10


def _sql(store: SqlAuditStore, statement: str, **params: Any) -> None:
    with store.engine.begin() as connection:
        connection.execute(sa.text(statement), params)


def _event(i: int) -> AuditEvent:
    return AuditEvent(
        kind="result_released",
        task_id=f"task-{i}",
        peer_org="beta",
        agent="triage",
        skill="assess",
        decision="partial",
        withheld_paths=("patient.name",),
        digest_before=digest({"i": i, "name": "x"}),
        digest_after=digest({"i": i}),
        detail="",
    )


@pytest.fixture
async def filled(audit_store: SqlAuditStore, audit_pki) -> tuple[SqlAuditStore, SignedCheckpoint]:
    for i in range(1, COUNT + 1):
        await audit_store.append(_event(i))
    checkpoint = await audit_store.checkpoint(audit_pki.signer("alpha"))
    assert audit_store.verify("alpha", audit_pki.verifier()).ok
    return audit_store, checkpoint


def _verify(store: SqlAuditStore, audit_pki, **kwargs: Any) -> VerifyReport:
    report = store.verify("alpha", audit_pki.verifier(), **kwargs)
    assert not report.ok, "tampering went unnoticed"
    return report


def _insert(store: SqlAuditStore, values: dict[str, Any]) -> None:
    columns = ", ".join(values)
    placeholders = ", ".join(f":{name}" for name in values)
    _sql(store, f"INSERT INTO audit_record ({columns}) VALUES ({placeholders})", **values)


async def test_flipped_byte_in_a_field(filled, audit_pki) -> None:
    store, _ = filled
    record = next(store.records(4))
    assert record.digest_after is not None
    flipped = record.digest_after[:-1] + ("0" if record.digest_after[-1] != "0" else "1")
    _sql(store, "UPDATE audit_record SET digest_after = :v WHERE sequence = 4", v=flipped)
    first = _verify(store, audit_pki).problems[0]
    assert first.sequence == 4
    assert "record 4 was changed" in first.message


async def test_changed_withheld_paths(filled, audit_pki) -> None:
    store, _ = filled
    _sql(store, "UPDATE audit_record SET withheld_paths = '[]' WHERE sequence = 7")
    first = _verify(store, audit_pki).problems[0]
    assert (first.sequence, "record 7 was changed" in first.message) == (7, True)


async def test_deleted_row(filled, audit_pki) -> None:
    store, _ = filled
    _sql(store, "DELETE FROM audit_record WHERE sequence = 5")
    first = _verify(store, audit_pki).problems[0]
    assert first.sequence == 5
    assert "record 5 is missing" in first.message


async def test_inserted_row(filled, audit_pki) -> None:
    """A forged record slipped in at 5 (with a correct hash), later records renumbered."""
    store, _ = filled
    _sql(store, "UPDATE audit_record SET sequence = sequence + 1000 WHERE sequence >= 5")
    _sql(store, "UPDATE audit_record SET sequence = sequence - 999 WHERE sequence > 1000")
    previous = next(store.records(4))
    forged = make_record(_event(99), 5, previous.time_ms, previous.record_hash)
    _insert(store, record_values(forged))
    first = _verify(store, audit_pki).problems[0]
    assert first.sequence == 6
    assert "does not link to record 5" in first.message or "record 6 was changed" in first.message


async def test_reordered_pair(filled, audit_pki) -> None:
    store, _ = filled
    _sql(store, "UPDATE audit_record SET sequence = -1 WHERE sequence = 3")
    _sql(store, "UPDATE audit_record SET sequence = 3 WHERE sequence = 4")
    _sql(store, "UPDATE audit_record SET sequence = 4 WHERE sequence = -1")
    first = _verify(store, audit_pki).problems[0]
    assert first.sequence == 3
    assert "record 3" in first.message


async def test_cut_tail_against_a_stored_checkpoint(filled, audit_pki) -> None:
    store, _ = filled
    _sql(store, "DELETE FROM audit_record WHERE sequence > 7")
    first = _verify(store, audit_pki).problems[0]
    assert first.sequence == 8
    assert "records 8..10 were cut off" in first.message


async def test_cut_tail_against_a_head_kept_by_a_partner(filled, audit_pki) -> None:
    """The attacker also deletes our own checkpoints; the head a partner kept still catches it."""
    store, checkpoint = filled
    _sql(store, "DELETE FROM audit_record WHERE sequence > 7")
    _sql(store, "DELETE FROM audit_checkpoint")
    assert store.verify("alpha", audit_pki.verifier()).ok  # nothing local left to compare with
    first = _verify(store, audit_pki, heads=[checkpoint]).problems[0]
    assert first.sequence == 8 and "cut off" in first.message


async def test_rewritten_chain_is_caught_by_the_signed_checkpoint(filled, audit_pki) -> None:
    """Changing record 3 and recomputing every later hash passes the chain but not the signature."""
    store, _ = filled
    records = list(store.records())
    changed = dataclasses.replace(records[2], detail="never happened")
    events = [_event(r.sequence) for r in records[3:]]
    rewritten = [
        make_record(
            AuditEvent(
                **{f.name: getattr(changed, f.name) for f in dataclasses.fields(AuditEvent)}
            ),
            3,
            changed.time_ms,
            records[1].record_hash,
        )
    ]
    rewritten += chain_events(events, 3, rewritten[0].record_hash, records[3].time_ms)
    _sql(store, "DELETE FROM audit_record WHERE sequence >= 3")
    for record in rewritten:
        _insert(store, record_values(record))
    first = _verify(store, audit_pki).problems[0]
    assert first.sequence == COUNT
    assert "does not match the signed checkpoint" in first.message
    assert "rewritten" in first.message


async def test_bad_checkpoint_signature(filled, audit_pki) -> None:
    store, checkpoint = filled
    signature = bytearray(checkpoint.signature)
    signature[-1] ^= 0x01
    with store.engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE audit_checkpoint SET signature = :s WHERE sequence = :n"),
            {"s": bytes(signature), "n": checkpoint.sequence},
        )
    first = _verify(store, audit_pki).problems[0]
    assert first.sequence == COUNT
    assert "bad signature" in first.message


async def test_changed_checkpoint_head(filled, audit_pki) -> None:
    store, _ = filled
    _sql(store, "UPDATE audit_checkpoint SET head_hash = :h", h="ab" * 32)
    first = _verify(store, audit_pki).problems[0]
    assert "bad signature" in first.message


async def test_changed_prev_hash_of_first_record(filled, audit_pki) -> None:
    store, _ = filled
    _sql(store, "UPDATE audit_record SET prev_hash = :h WHERE sequence = 1", h="11" * 32)
    first = _verify(store, audit_pki).problems[0]
    assert first.sequence == 1


async def test_deleted_first_rows_without_retention_anchor(filled, audit_pki) -> None:
    store, _ = filled
    _sql(store, "DELETE FROM audit_record WHERE sequence <= 2")
    first = _verify(store, audit_pki).problems[0]
    assert first.sequence == 1
    assert "no signed retention checkpoint anchors it" in first.message
