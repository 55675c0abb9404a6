"""The audit store's tables (SQLModel) and the conversions between rows and records.

List and dict fields are stored as JSON text. Both directions are positional, in AuditRecord field
order: writing is on every exchange's path (the audit writer inserts `record_row` tuples with
INSERT_RECORD_SQL on a DB-API cursor), reading on the verify path (100,000 records in a few
seconds).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import BigInteger, Column, Integer, LargeBinary, Text, inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Field, SQLModel

from gateway.audit.chain import AuditRecord
from gateway.identity.signing import SignedCheckpoint


class AuditRecordRow(SQLModel, table=True):
    """One audit record; list and dict fields are JSON text."""

    __tablename__ = "audit_record"

    sequence: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    time_ms: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    kind: str = Field(index=True)
    task_id: str = Field(index=True)
    peer_org: str = Field(index=True)
    agent: str = Field(index=True)
    skill: str
    direction: str
    decision: str = Field(index=True)
    requester: str
    status: str
    duration_ms: float
    withheld_paths: str = Field(sa_column=Column(Text, nullable=False))
    transformed: str = Field(sa_column=Column(Text, nullable=False))
    digest_before: str | None = None
    digest_after: str | None = None
    policy_version: str | None = None
    detail: str = Field(sa_column=Column(Text, nullable=False))
    receipt: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    payload: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    prev_hash: str
    record_hash: str
    # Audit record version 2 (gateway.audit.chain): NULL in records written before it (version 1).
    canonical: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    turn: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    evidence: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class AuditCheckpointRow(SQLModel, table=True):
    """A signed chain head: ours, a retention anchor, or a peer's."""

    __tablename__ = "audit_checkpoint"

    id: int | None = Field(default=None, primary_key=True)
    role: str = Field(index=True)
    org: str = Field(index=True)
    sequence: int = Field(sa_column=Column(BigInteger, nullable=False))
    head_hash: str
    signed_at_unix_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    signer_certificate: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


RECORDS = AuditRecordRow.__table__  # type: ignore[attr-defined]
CHECKPOINTS = AuditCheckpointRow.__table__  # type: ignore[attr-defined]


_FIELDS = [f.name for f in dataclasses.fields(AuditRecord)]
_WITHHELD, _TRANSFORMED, _DURATION = (
    _FIELDS.index("withheld_paths"),
    _FIELDS.index("transformed"),
    _FIELDS.index("duration_ms"),
)
_RECEIPT, _PAYLOAD = _FIELDS.index("receipt"), _FIELDS.index("payload")
_CANONICAL, _TURN, _EVIDENCE = (
    _FIELDS.index("canonical"),
    _FIELDS.index("turn"),
    _FIELDS.index("evidence"),
)
# Columns added after the table was first created: (name, SQL type), added by upgrade_schema.
ADDED_COLUMNS = (("canonical", "INTEGER"), ("turn", "INTEGER"), ("evidence", "TEXT"))
SELECTED_COLUMNS = [RECORDS.c[name] for name in _FIELDS]
assert _FIELDS[0] == "sequence"

# One record's insert, with `?` markers (gateway.store.db.driver_sql adapts them to the driver).
INSERT_RECORD_SQL = (
    f"INSERT INTO {RECORDS.name} ({', '.join(_FIELDS)}) "  # noqa: S608 - names from the model
    f"VALUES ({', '.join('?' for _ in _FIELDS)})"
)


def _dump(value: dict[str, Any]) -> str:
    """JSON text of a receipt, payload or evidence (orjson: several times json's speed; what it
    writes, json and orjson read back alike)."""
    return orjson.dumps(value).decode("utf-8")


# JSON text of paths and actions, cached like the parses below (they repeat across records).
@functools.lru_cache(maxsize=4096)
def _dump_paths(paths: tuple[str, ...]) -> str:
    return json.dumps(list(paths))


@functools.lru_cache(maxsize=4096)
def _dump_pairs(pairs: tuple[tuple[str, str], ...]) -> str:
    return json.dumps([list(pair) for pair in pairs])


def record_row(record: AuditRecord) -> tuple[Any, ...]:
    """The record's column values in AuditRecord field order, the order of INSERT_RECORD_SQL."""
    return (
        record.sequence,
        record.time_ms,
        record.kind,
        record.task_id,
        record.peer_org,
        record.agent,
        record.skill,
        record.direction,
        record.decision,
        record.requester,
        record.status,
        record.duration_ms,
        _dump_paths(record.withheld_paths),
        _dump_pairs(record.transformed),
        record.digest_before,
        record.digest_after,
        record.policy_version,
        record.detail,
        None if record.receipt is None else _dump(record.receipt),
        None if record.payload is None else _dump(record.payload),
        record.prev_hash,
        record.record_hash,
        record.canonical,
        record.turn,
        None if record.evidence is None else _dump(record.evidence),
    )


def upgrade_schema(engine: Engine) -> None:
    """Add the columns of audit record version 2 to an audit table created before them.

    Additive only (nullable columns, no rewrite of a row): records written before keep NULL
    there and are read as version 1.
    """
    present = {column["name"] for column in inspect(engine).get_columns(RECORDS.name)}
    missing = [(name, kind) for name, kind in ADDED_COLUMNS if name not in present]
    if not missing:
        return
    # IF NOT EXISTS on PostgreSQL: replicas of one organization may start at the same moment.
    guard = "" if engine.dialect.name == "sqlite" else "IF NOT EXISTS "
    with engine.begin() as connection:
        for name, kind in missing:
            connection.execute(text(f"ALTER TABLE {RECORDS.name} ADD COLUMN {guard}{name} {kind}"))


def record_values(record: AuditRecord) -> dict[str, Any]:
    """The record's column values by name, for SQLAlchemy statements."""
    return dict(zip(_FIELDS, record_row(record), strict=True))


# Paths repeat across records (the same policy withholds the same fields): cache the parses.
@functools.lru_cache(maxsize=4096)
def _parse_paths(text: str) -> tuple[str, ...]:
    if text == "[]":
        return ()
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(path, str) for path in value):
        raise ValueError("not a list of paths")
    return tuple(value)


@functools.lru_cache(maxsize=4096)
def _parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
    if text == "[]":
        return ()
    value = json.loads(text)
    if not isinstance(value, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)
        for pair in value
    ):
        raise ValueError("not a list of [path, action] pairs")
    return tuple((pair[0], pair[1]) for pair in value)


def _parse_object(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = orjson.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def record_from_row(row: Sequence[Any]) -> AuditRecord:
    """A record from a row selected in _FIELDS order (positional: reading is on the verify path).

    Stored text that does not parse to the expected shape is replaced by a marker, so the record
    hash no longer matches and verify names the record.
    """
    values = list(row)
    try:
        values[_WITHHELD] = _parse_paths(values[_WITHHELD])
        values[_TRANSFORMED] = _parse_pairs(values[_TRANSFORMED])
        values[_RECEIPT] = _parse_object(values[_RECEIPT])
        values[_PAYLOAD] = _parse_object(values[_PAYLOAD])
        values[_EVIDENCE] = _parse_object(values[_EVIDENCE])
    except (ValueError, TypeError):
        values[_WITHHELD] = ("<unreadable stored value>",)
        values[_TRANSFORMED] = ()
        values[_RECEIPT] = values[_PAYLOAD] = values[_EVIDENCE] = None
    values[_DURATION] = float(values[_DURATION])
    if values[_CANONICAL] is None:  # written before version 2
        values[_CANONICAL] = 1
    if values[_TURN] is None:
        values[_TURN] = 0
    return AuditRecord(*values)


def checkpoint_from_row(row: Any) -> SignedCheckpoint:
    return SignedCheckpoint(
        org=row.org,
        sequence=row.sequence,
        head_hash=row.head_hash,
        signed_at_unix_ms=row.signed_at_unix_ms,
        signer_certificate=bytes(row.signer_certificate),
        signature=bytes(row.signature),
    )


def checkpoint_values(role: str, checkpoint: SignedCheckpoint) -> dict[str, Any]:
    return {
        "role": role,
        "org": checkpoint.org,
        "sequence": checkpoint.sequence,
        "head_hash": checkpoint.head_hash,
        "signed_at_unix_ms": checkpoint.signed_at_unix_ms,
        "signer_certificate": checkpoint.signer_certificate,
        "signature": checkpoint.signature,
    }
