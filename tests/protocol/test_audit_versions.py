"""Audit record versions: version 1 records keep verifying, new ones are version 2 (JCS, with
canonical, turn and evidence), and a database made before version 2 gains its columns."""

from __future__ import annotations

import dataclasses
import math

import pytest
import sqlalchemy as sa

from gateway.audit.chain import (
    GENESIS_HASH,
    MAX_EVIDENCE_BYTES,
    AuditEvent,
    AuditRecord,
    chain_events,
    normalize_event,
    verify_chain,
)
from gateway.audit.rows import ADDED_COLUMNS, RECORDS, record_row
from gateway.audit.store import SqlAuditStore
from gateway.errors import InvalidArgument
from gateway.payload import CANONICAL_V1, canonical_json, jcs
from gateway.store.db import create_store_engine, driver_sql

EVIDENCE = {
    "checkpoint": {
        "org": "alpha",
        "sequence": 9,
        "head_hash": "ab" * 32,
        "signed_at_unix_ms": 1,
        "signer_certificate": "AA==",
        "signature": "AA==",
    }
}


def _event(i: int, **fields: object) -> AuditEvent:
    values: dict[str, object] = {
        "kind": "request_received",
        "task_id": f"task-{i}",
        "peer_org": "alpha",
        "agent": "records",
        "skill": "lookup",
        "decision": "allowed",
        "status": "submitted",
        "duration_ms": 1.25 + i,
        "digest_before": "sha256:" + "00" * 32,
        "digest_after": "sha256:" + "00" * 32,
        "policy_version": "sha256:p",
        "receipt": {"score": 1.0, "n": [1e16, 1e-7]},
    }
    values.update(fields)
    return AuditEvent(**values)  # type: ignore[arg-type]


def _as_version_1(events: list[AuditEvent]) -> list[AuditRecord]:
    """Records as a gateway wrote them before canonical versions existed."""
    records, prev = [], GENESIS_HASH
    for sequence, event in enumerate(events, start=1):
        record = dataclasses.replace(
            chain_events([normalize_event(event)], sequence - 1, prev, 1_000 + sequence)[0],
            canonical=CANONICAL_V1,
            turn=0,
            evidence=None,
        )
        record = dataclasses.replace(record, record_hash=record.computed_hash())
        records.append(record)
        prev = record.record_hash
    return records


def test_new_records_are_version_2_and_hash_under_jcs() -> None:
    event = normalize_event(_event(1, turn=2, evidence=EVIDENCE))
    (record,) = chain_events([event], 0, GENESIS_HASH, 1_000)
    assert record.canonical == 2 and record.turn == 2 and record.evidence == EVIDENCE
    body = record.body()
    assert (body["canonical"], body["turn"], body["evidence"]) == (2, 2, EVIDENCE)
    import hashlib

    assert record.record_hash == hashlib.sha256(GENESIS_HASH.encode() + jcs(body)).hexdigest()
    assert (
        record.record_hash
        != hashlib.sha256(GENESIS_HASH.encode() + canonical_json(body)).hexdigest()
    )  # this body differs under version 1 (its floats)
    again = AuditRecord.from_json(record.to_json())
    assert again == record and again.computed_hash() == record.record_hash


def test_version_1_records_keep_their_body_and_hash() -> None:
    (record,) = _as_version_1([_event(1)])
    body = record.body()
    assert "canonical" not in body and "turn" not in body and "evidence" not in body
    data = record.to_json()
    assert "canonical" not in data
    again = AuditRecord.from_json(data)
    assert again.canonical == 1 and again.computed_hash() == record.record_hash


def test_a_chain_of_both_versions_verifies_and_each_change_is_found() -> None:
    old = _as_version_1([_event(1), _event(2)])
    new = chain_events(
        [normalize_event(_event(3, evidence=EVIDENCE, turn=1))], 2, old[-1].record_hash, 5_000
    )
    records = [*old, *new]
    assert verify_chain(records, org="beta", verifier=None).ok
    for index, change in ((1, {"detail": "changed"}), (2, {"turn": 0}), (2, {"evidence": None})):
        tampered = list(records)
        tampered[index] = dataclasses.replace(records[index], **change)
        report = verify_chain(tampered, org="beta", verifier=None)
        assert [p.sequence for p in report.problems][:1] == [index + 1]
    # A version 1 record cannot be passed off as version 2 (or back): the body changes.
    relabelled = [*records[:1], dataclasses.replace(records[1], canonical=2), *records[2:]]
    assert not verify_chain(relabelled, org="beta", verifier=None).ok


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"turn": -1}, "turn must be an integer >= 0"),
        ({"turn": True}, "turn must be an integer >= 0"),
        ({"evidence": {"x": math.nan}}, "evidence is not a JSON object"),
        ({"evidence": {"x": 2**60}}, "evidence is not a JSON object"),
        ({"evidence": {"jws": "x" * MAX_EVIDENCE_BYTES}}, "more than the 32768 allowed"),
        ({"evidence": ["not", "an", "object"]}, "evidence must be a JSON object"),
        ({"payload": {1: "int key"}}, "payload is not a JSON object"),
        ({"detail": "lone \ud800 surrogate"}, "valid Unicode text"),
    ],
)
def test_events_that_cannot_be_hashed_are_refused_alone(
    fields: dict[str, object], message: str
) -> None:
    """Refused when the event is handed in, never later in the batch it would be written with."""
    with pytest.raises(InvalidArgument, match=message):
        normalize_event(_event(1, **fields))


def _old_table(engine: sa.engine.Engine) -> None:
    """The audit_record table as gateways created it before version 2."""
    metadata = sa.MetaData()
    new = {name for name, _ in ADDED_COLUMNS}
    sa.Table(RECORDS.name, metadata, *[c._copy() for c in RECORDS.columns if c.name not in new])
    metadata.create_all(engine)


async def test_a_database_from_before_version_2_is_upgraded(audit_db_url: str, audit_pki) -> None:
    engine = create_store_engine(audit_db_url)
    try:
        _old_table(engine)
        old = _as_version_1([_event(1), _event(2)])
        columns = [c.name for c in RECORDS.columns if c.name not in dict(ADDED_COLUMNS)]
        insert = driver_sql(
            engine,
            f"INSERT INTO {RECORDS.name} ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)})",
        )
        with engine.begin() as connection:
            cursor = connection.connection.cursor()
            cursor.executemany(insert, [record_row(r)[: len(columns)] for r in old])
    finally:
        engine.dispose()

    store = SqlAuditStore(audit_db_url, verifier=audit_pki.verifier(), busy_timeout_ms=1000)
    await store.start()
    try:
        appended = await store.append(_event(3, turn=1, evidence=EVIDENCE))
        assert appended.canonical == 2 and appended.prev_hash == old[-1].record_hash
        records = list(store.records())
        assert [r.canonical for r in records] == [1, 1, 2]
        assert records[:2] == old
        assert records[2].evidence == EVIDENCE and records[2].turn == 1
        report = store.verify("beta", audit_pki.verifier())
        assert report.ok and report.records == 3, report.problems
        with store.engine.begin() as connection:
            connection.execute(
                sa.text(f"UPDATE {RECORDS.name} SET evidence = :e WHERE sequence = 3"),
                {"e": '{"delegation": "forged"}'},
            )
        report = store.verify("beta", audit_pki.verifier())
        assert [p.sequence for p in report.problems] == [3]
    finally:
        await store.close()
    # Opening the upgraded database again changes nothing.
    again = SqlAuditStore(audit_db_url, verifier=audit_pki.verifier(), busy_timeout_ms=1000)
    await again.start()
    try:
        assert len(list(again.records())) == 3
    finally:
        await again.close()
