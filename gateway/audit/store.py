"""The audit store: a durable, hash-chained record of every event of every exchange.

`AuditStore` is the contract the gateway core calls; `SqlAuditStore` keeps the log in SQLite
(WAL, synchronous=FULL: the embedded default) or PostgreSQL, and `MemoryAuditStore` is its
in-memory twin for tests (it can be told to fail, to simulate an outage). Tables and row
conversions live in gateway.audit.rows, the records and the hash chain in gateway.audit.chain,
exported bundles and reconciliation in gateway.audit.bundle.

Group commit: `append` puts (event, future) on a queue; one writer task drains it, numbers and
chains a batch and writes it in one transaction, and resolves the futures only after the commit.
So durability costs one fsync per batch, not per record, and the event loop never blocks on the
disk. If a commit fails, every waiting append raises AuditUnavailable, the chain head is
forgotten (re-read from the store on the next attempt) and `healthy` goes False; the next append
tries again, so the gateway recovers by itself when the store is back.

In `SqlAuditStore` the batch is chained and written on the store's one writer thread
(gateway.store.db.WriterThread): one executemany of prebuilt SQL on a persistent DB-API connection,
then commit, then one hand-off back to the event loop for the whole batch. A failed transaction
discards that connection; the next batch connects again. Reads, checkpoints and the command
line go through the SQLAlchemy engine.

Single writer: sequence numbers and the chain head are owned by the one writer task of one
process. Several gateway replicas on one PostgreSQL (later work) would each need to take the head
under a lock inside the write transaction — e.g. `SELECT ... FROM audit_head FOR UPDATE` on a
one-row head table updated in the same transaction — instead of trusting the cached head.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import (
    Engine,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.sql import ColumnElement
from sqlmodel import SQLModel

from gateway.audit.chain import (
    GENESIS_HASH,
    AuditEvent,
    AuditRecord,
    VerifyReport,
    chain_events,
    normalize_event,
    verify_chain,
)
from gateway.audit.rows import (
    CHECKPOINTS,
    INSERT_RECORD_SQL,
    RECORDS,
    SELECTED_COLUMNS,
    checkpoint_from_row,
    checkpoint_values,
    record_from_row,
    record_row,
    record_values,
    upgrade_schema,
)
from gateway.errors import (
    AuditUnavailable,
    ConfigError,
    FedgateError,
    PermissionDenied,
    Unavailable,
)
from gateway.exchange.tasks import TaskState
from gateway.identity.signing import (
    SignedCheckpoint,
    Signer,
    Verifier,
    sign_checkpoint,
    verify_checkpoint,
)
from gateway.store.db import WriterThread, create_store_engine, driver_sql, group_commit
from gateway.store.task_table import (
    TASKS,
    WRITE_SQL,
    Accept,
    Finish,
    Forget,
    TaskKey,
    TaskOp,
    TaskRow,
    TaskTable,
    finished_row,
    new_row,
    op_sql_params,
    row_from_sql,
    task_key,
)

__all__ = [
    "AuditEvent",
    "AuditRecord",
    "AuditStore",
    "MemoryAuditStore",
    "SqlAuditStore",
    "Written",
    "open_store",
]

log = logging.getLogger("fedgate.audit")

T = TypeVar("T")

# Roles of a stored checkpoint: a signed head of our own chain, the signed head at a retention
# cut (the anchor the first remaining record chains from), or a peer's signed head we keep.
OWN, RETENTION, PEER = "own", "retention", "peer"


def _unavailable(cause: str) -> AuditUnavailable:
    return AuditUnavailable(
        f"audit store cannot be written: {cause}; exchanges are refused until it recovers"
    )


def _to_ms(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp() * 1000)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Written:
    """What one step's transaction wrote: its audit record, or the row that held its key."""

    record: AuditRecord | None = None  # the last of the step's records
    # An Accept whose key was taken: the row holding it (and nothing of the step was written).
    existing: TaskRow | None = None


# A step queued for the writer: its audit events and task-table write (either may be empty).
_Step = tuple[tuple[AuditEvent, ...], TaskOp | None, "asyncio.Future[Written]"]


def _table_unavailable(cause: str) -> Unavailable:
    return Unavailable(
        f"the task table cannot be written: {cause}; tasks are refused until it recovers"
    )


class AuditStore(ABC):
    """The one store of a gateway: its audit log (append events, read them back, sign and keep
    checkpoints) and, in the same database, its task table (`tasks`).

    `write(event, op)` commits a step of an exchange: its audit record and its task-table write
    in one transaction. Every write goes through one writer, which group-commits the steps
    queued while the previous transaction ran.
    """

    def __init__(self, *, batch_max: int = 512, verifier: Verifier | None = None) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        self.batch_max = batch_max
        self.verifier = verifier
        # Number of committed batches (transactions); lets tests and benchmarks see batching.
        self.commits = 0
        self._queue: asyncio.Queue[_Step | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._head: tuple[int, str] | None = None  # (sequence, hash) of the last committed record
        self._last_head: tuple[int, str] = (0, GENESIS_HASH)  # the same, kept across a failure
        self._last_time_ms = 0
        self._healthy = True
        self._closed = False
        self.tasks = TaskTable(self)

    # ---- the contract ----

    async def start(self) -> None:
        """Open the store and start the writer task; raises AuditUnavailable if unreachable.

        Appending without start() works too: the writer then opens the store on first commit.
        """
        self._start_writer()
        try:
            await self._run(self._open)
            self._head = await self._run(self._read_head)
        except Exception as exc:
            self._healthy = False
            raise _unavailable(_cause(exc)) from None
        self._last_head = self._head

    def _start_writer(self) -> None:
        if self._writer is None:
            self._closed = False
            self._queue = asyncio.Queue()
            self._writer = asyncio.get_running_loop().create_task(
                group_commit(self._queue, self.batch_max, self._commit), name="fedgate-audit-writer"
            )

    async def append(self, event: AuditEvent) -> AuditRecord:
        """Record `event`; returns once it is durably committed, else raises AuditUnavailable."""
        written = await self.write(event, None)
        assert written.record is not None
        return written.record

    async def write(
        self, events: AuditEvent | Sequence[AuditEvent] | None, op: TaskOp | None = None
    ) -> Written:
        """Commit `events` (audit records, in order) and `op` (a task-table write) in one
        transaction.

        An Accept whose key is taken writes nothing: `existing` is the row holding the key.
        Raises AuditUnavailable (with events) or Unavailable (a task-table write alone) if the
        transaction does not commit.
        """
        if self._closed:
            raise _unavailable("the store is closed")
        if events is None:
            normalized: tuple[AuditEvent, ...] = ()
        elif isinstance(events, AuditEvent):
            normalized = (normalize_event(events),)
        else:
            normalized = tuple(normalize_event(event) for event in events)
        future: asyncio.Future[Written] = asyncio.get_running_loop().create_future()
        self._submit((normalized, op, future))
        return await future

    def _submit(self, step: _Step) -> None:
        """Queue a step for the writer (here an asyncio task; SqlAuditStore's thread)."""
        self._start_writer()
        assert self._queue is not None
        self._queue.put_nowait(step)

    async def write_task(self, op: TaskOp) -> TaskRow | None:
        """A task-table write alone (TaskTable's writes); returns the row holding a taken key."""
        return (await self.write(None, op)).existing

    async def close(self) -> None:
        """Commit what is queued, stop the writer and release the store.

        Appends from the moment close begins are refused: one queued behind the writer's stop
        would wait forever.
        """
        self._closed = True
        if self._writer is not None and self._queue is not None:
            self._queue.put_nowait(None)
            await self._writer
            self._writer = None
            self._queue = None
        await self._release()

    @property
    def committed_head(self) -> tuple[int, str]:
        """(sequence, hash) of the last record committed by this process (or read at start):
        what a receipt or a delegation statement states as a lower bound of our log."""
        return self._last_head

    @property
    def healthy(self) -> bool:
        """False after a failed commit, until a commit succeeds again."""
        return self._healthy

    @abstractmethod
    def query(
        self,
        *,
        peer: str | None = None,
        agent: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        decision: str | None = None,
        task_id: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = False,
    ) -> list[AuditRecord]:
        """Records matching every given filter (since inclusive, until exclusive), paged."""

    @abstractmethod
    def records(self, start_sequence: int = 1) -> Iterator[AuditRecord]:
        """Every record from `start_sequence` on, in sequence order, read in batches."""

    async def checkpoint(self, signer: Signer) -> SignedCheckpoint:
        """Sign the committed head (sequence, hash) and keep the checkpoint."""
        try:
            sequence, head_hash = await self._run(self._read_head)
            checkpoint = sign_checkpoint(signer, sequence, head_hash)
            await self._run(self._add_checkpoint, OWN, checkpoint)
        except FedgateError:
            raise
        except Exception as exc:
            raise _unavailable(_cause(exc)) from None
        return checkpoint

    async def store_peer_checkpoint(
        self, checkpoint: SignedCheckpoint, *, verifier: Verifier | None = None
    ) -> None:
        """Keep a peer's signed head after checking its signature against the federation CA.

        Refuses (PermissionDenied) a head behind or diverging from the latest one kept for that
        peer: the peer's log lost its tail or was rewritten.
        """
        trust = verifier or self.verifier
        if trust is None:
            raise ConfigError(
                "no federation CA to verify peer checkpoints with: open the store with a verifier"
            )
        verify_checkpoint(trust, checkpoint)
        kept = self.peer_checkpoints(checkpoint.org)
        if kept:
            latest = kept[-1]
            if checkpoint.sequence < latest.sequence or (
                checkpoint.sequence == latest.sequence and checkpoint.head_hash != latest.head_hash
            ):
                log.warning(
                    "peer %s presented an audit head at sequence %d that contradicts its signed "
                    "head at sequence %d",
                    checkpoint.org,
                    checkpoint.sequence,
                    latest.sequence,
                )
                raise PermissionDenied(
                    f"peer {checkpoint.org!r} signed head {checkpoint.sequence}, behind or "
                    f"diverging from its earlier signed head {latest.sequence}: its audit log "
                    "lost records or was rewritten; keep both checkpoints as evidence"
                )
            if checkpoint.sequence == latest.sequence:
                return
        try:
            await self._run(self._add_checkpoint, PEER, checkpoint)
        except Exception as exc:
            raise _unavailable(_cause(exc)) from None

    def peer_checkpoints(self, org: str | None = None) -> list[SignedCheckpoint]:
        """Peers' signed heads we keep, oldest first."""
        return self._checkpoints(PEER, org)

    # ---- beyond the core contract: used by the auditor's commands ----

    def own_checkpoints(self) -> list[SignedCheckpoint]:
        """Our own signed heads (not retention anchors), oldest first."""
        return self._checkpoints(OWN, None)

    def retention_anchor(self) -> SignedCheckpoint | None:
        """The signed checkpoint at the last retention cut, which the first record chains from."""
        anchors = self._checkpoints(RETENTION, None)
        return anchors[-1] if anchors else None

    def verify(
        self,
        org: str,
        verifier: Verifier | None,
        *,
        heads: Sequence[SignedCheckpoint] = (),
    ) -> VerifyReport:
        """Walk the whole chain and check our stored checkpoints plus any `heads` given."""
        anchor = self.retention_anchor()
        start = anchor.sequence + 1 if anchor is not None else 1
        return verify_chain(
            self.records(start),
            org=org,
            verifier=verifier,
            anchor=anchor,
            checkpoints=[*self.own_checkpoints(), *heads],
        )

    def cut_sequence(self, before: dt.datetime) -> int:
        """The last sequence that a retention cut at `before` removes (0: nothing to remove)."""
        first_kept = self._first_sequence_at(_to_ms(before))
        head_sequence = self._read_head()[0]
        return head_sequence if first_kept is None else first_kept - 1

    def sign_cut(self, through_sequence: int, signer: Signer) -> SignedCheckpoint:
        """A signed retention checkpoint at record `through_sequence` (not yet applied)."""
        record = next(self.records(through_sequence), None)
        if record is None or record.sequence != through_sequence:
            raise ConfigError(f"there is no record {through_sequence} to cut the log at")
        return sign_checkpoint(signer, through_sequence, record.record_hash)

    def prune(self, anchor: SignedCheckpoint) -> int:
        """Delete the records up to `anchor` (from sign_cut), keeping it as the retention anchor.

        Archive them first (gateway.audit.bundle.write_bundle with `anchor` as its checkpoint):
        the remaining log then chains from the anchor and still verifies. Returns the number of
        records deleted.
        """
        record = next(self.records(anchor.sequence), None)
        if record is None or record.sequence != anchor.sequence:
            raise ConfigError(f"there is no record {anchor.sequence} to cut the log at")
        if record.record_hash != anchor.head_hash:
            raise ConfigError(
                f"record {anchor.sequence} does not match the retention checkpoint: run "
                "`fedgate audit verify` before pruning"
            )
        return self._prune(anchor.sequence, anchor)

    # ---- the writer ----

    async def _commit(self, batch: list[_Step]) -> None:
        """The asyncio writer's batch (the in-memory store's; SqlAuditStore commits on its
        writer thread instead, without this hop)."""
        time_ms = max(_now_ms(), self._last_time_ms)
        outcomes = await self._run(self._commit_steps, [step[:2] for step in batch], time_ms)
        self._settle(batch, outcomes)

    def _commit_steps(
        self, steps: list[tuple[tuple[AuditEvent, ...], TaskOp | None]], time_ms: int
    ) -> list[Written | BaseException]:
        """Commit a batch of steps in one transaction (where the store writes); if it fails,
        each step is tried again on its own, so one bad step does not fail the others.
        `time_ms` never goes back, so a time cut of the log is a prefix of it."""
        try:
            outcomes: list[Written | BaseException] = list(self._apply(steps, time_ms))
        except Exception as exc:
            self._head = None  # re-read from the store on the next attempt
            if len(steps) == 1:
                return [exc]
            outcomes = []
            for step in steps:
                try:
                    (outcome,) = self._apply([step], time_ms)
                except Exception as alone:
                    self._head = None
                    outcomes.append(alone)
                    continue
                outcomes.append(outcome)
        if any(not isinstance(o, BaseException) for o in outcomes):
            self._last_time_ms = time_ms
        return outcomes

    def _settle(self, batch: list[_Step], outcomes: list[Written | BaseException]) -> None:
        """On the event loop: the waiters of a committed batch resume (one hand-off for all)."""
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if len(failed) < len(outcomes):
            # Something committed: the store is writable (a step refused alone is its own).
            self.commits += 1
            if not self._healthy:
                log.warning("audit store writable again: accepting exchanges")
            self._healthy = True
        elif self._healthy:
            log.error("audit store cannot be written (%s): refusing exchanges", _cause(failed[0]))
            self._healthy = False
        for (events, _, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                cause = _cause(outcome)
                future.set_exception(_unavailable(cause) if events else _table_unavailable(cause))
            else:
                future.set_result(outcome)

    def _apply(
        self, steps: list[tuple[tuple[AuditEvent, ...], TaskOp | None]], time_ms: int
    ) -> list[Written]:
        """Apply the steps in order, in one transaction (run through _run): the task-table
        writes first, so that a step whose Accept found its key taken adds no record; then
        the records, numbered and chained from the committed head."""
        head = self._head if self._head is not None else self._read_head()
        ops = [op for _, op in steps if op is not None]
        applied: dict[int, TaskRow | None] = {}

        def write_records(taken: list[TaskRow | None]) -> list[AuditRecord]:
            # `taken`: per op, in order, the row that held an Accept's key (None otherwise).
            events: list[AuditEvent] = []
            index = 0
            for number, (step_events, op) in enumerate(steps):
                existing = None
                if op is not None:
                    existing = taken[index]
                    index += 1
                applied[number] = existing
                if existing is None:
                    events.extend(step_events)
            return chain_events(events, head[0], head[1], time_ms) if events else []

        records = self._write_step_batch(ops, write_records, time_ms)
        if records:
            self._head = self._last_head = (records[-1].sequence, records[-1].record_hash)
        outcomes: list[Written] = []
        chained = iter(records)
        for number, (step_events, _) in enumerate(steps):
            existing = applied[number]
            record = None
            if existing is None:
                for _ in step_events:
                    record = next(chained)
            outcomes.append(Written(record, existing))
        return outcomes

    # ---- storage primitives, implemented by each store ----

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        """Run a storage primitive where the store does its writes."""
        return function(*args)

    def _open(self) -> None:  # noqa: B027 - optional hook, nothing to open in memory
        """Connect and create the tables if they are missing."""

    async def _release(self) -> None:  # noqa: B027 - optional hook, nothing to release in memory
        """Release connections and the writer."""

    @abstractmethod
    def _read_head(self) -> tuple[int, str]:
        """The committed head: last record, else the retention anchor, else (0, 64 zeros)."""

    @abstractmethod
    def _write_step_batch(
        self,
        ops: list[TaskOp],
        records_for: Callable[[list[TaskRow | None]], list[AuditRecord]],
        now_ms: int,
    ) -> list[AuditRecord]:
        """In one durable transaction: apply `ops` in order, then insert the records that
        `records_for` makes from their outcomes (per op, the row that held an Accept's key, or
        None); return those records. Raise, writing nothing, if it does not commit."""

    @abstractmethod
    async def task_row(self, origin_org: str, key: str) -> TaskRow | None: ...

    @abstractmethod
    async def task_by_id(self, origin_org: str, task_id: str) -> TaskRow | None: ...

    @abstractmethod
    async def unfinished_tasks(self) -> list[TaskRow]: ...

    @abstractmethod
    def prune_tasks(self, before_ms: int) -> int:
        """Delete the finished tasks last updated before `before_ms` (retention); running
        tasks are kept whatever their age. Returns how many rows went."""

    @abstractmethod
    def task_overview(self, *, state: str | None = None, limit: int = 50) -> list[TaskRow]:
        """Tasks of every origin, newest first (for the operator: `fedgate tasks list`)."""

    @abstractmethod
    def task_counts(self) -> dict[str, int]:
        """How many rows the task table holds, per state."""

    @abstractmethod
    def _add_checkpoint(self, role: str, checkpoint: SignedCheckpoint) -> None: ...

    @abstractmethod
    def _checkpoints(self, role: str, org: str | None) -> list[SignedCheckpoint]: ...

    @abstractmethod
    def _first_sequence_at(self, time_ms: int) -> int | None:
        """The first sequence with time at or after `time_ms`, None if there is none."""

    @abstractmethod
    def _prune(self, through_sequence: int, anchor: SignedCheckpoint) -> int:
        """Atomically keep `anchor` as a retention checkpoint and delete records through it."""


def _cause(exc: BaseException) -> str:
    """A short cause for logs and errors: the exception type and first line, never values."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()[0] if str(original).strip() else ""
    return f"{type(original).__name__}: {text}" if text else type(original).__name__


# ---- the in-memory twin ----


class MemoryAuditStore(AuditStore):
    """The store in memory, with identical behaviour; set `fail_writes` to simulate an outage."""

    def __init__(self, *, batch_max: int = 512, verifier: Verifier | None = None) -> None:
        super().__init__(batch_max=batch_max, verifier=verifier)
        self.fail_writes = False
        self.rows: list[AuditRecord] = []
        self.checkpoint_rows: list[tuple[str, SignedCheckpoint]] = []
        self.task_rows: dict[TaskKey, TaskRow] = {}

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        await asyncio.sleep(0)  # yield like a real write, so concurrent appends share a batch
        return function(*args)

    def _fail_if_told(self) -> None:
        if self.fail_writes:
            raise OSError("memory audit store told to fail (fail_writes = True)")

    def _read_head(self) -> tuple[int, str]:
        if self.rows:
            return self.rows[-1].sequence, self.rows[-1].record_hash
        anchor = self.retention_anchor()
        return (anchor.sequence, anchor.head_hash) if anchor else (0, GENESIS_HASH)

    def _write_step_batch(
        self,
        ops: list[TaskOp],
        records_for: Callable[[list[TaskRow | None]], list[AuditRecord]],
        now_ms: int,
    ) -> list[AuditRecord]:
        self._fail_if_told()
        rows = dict(self.task_rows)  # applied only if the whole batch is
        taken: list[TaskRow | None] = []
        for op in ops:
            existing = None
            if isinstance(op, Accept):
                key = task_key(op.origin_org, op.spec)
                existing = rows.get(key)
                if existing is None:
                    rows[key] = new_row(op, now_ms)
            elif isinstance(op, Finish):
                row = rows.get((op.origin_org, op.key))
                if row is not None:
                    rows[(op.origin_org, op.key)] = finished_row(row, op.result, now_ms)
            elif isinstance(op, Forget):
                rows.pop((op.origin_org, op.key), None)
            taken.append(existing)
        records = records_for(taken)
        self.task_rows = rows
        self.rows.extend(records)
        return records

    async def task_row(self, origin_org: str, key: str) -> TaskRow | None:
        return self.task_rows.get((origin_org, key))

    async def task_by_id(self, origin_org: str, task_id: str) -> TaskRow | None:
        return next(
            (
                r
                for r in self.task_rows.values()
                if r.origin_org == origin_org and r.task_id == task_id
            ),
            None,
        )

    async def unfinished_tasks(self) -> list[TaskRow]:
        return [r for r in self.task_rows.values() if not r.final]

    def prune_tasks(self, before_ms: int) -> int:
        self._fail_if_told()
        gone = [k for k, r in self.task_rows.items() if r.final and r.updated_ms < before_ms]
        for key in gone:
            del self.task_rows[key]
        return len(gone)

    def task_overview(self, *, state: str | None = None, limit: int = 50) -> list[TaskRow]:
        rows = [r for r in self.task_rows.values() if state is None or r.state.value == state]
        rows.sort(key=lambda r: (r.created_ms, r.task_id), reverse=True)
        return rows[:limit]

    def task_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.task_rows.values():
            counts[row.state.value] = counts.get(row.state.value, 0) + 1
        return counts

    def _add_checkpoint(self, role: str, checkpoint: SignedCheckpoint) -> None:
        self._fail_if_told()
        self.checkpoint_rows.append((role, checkpoint))

    def _checkpoints(self, role: str, org: str | None) -> list[SignedCheckpoint]:
        return [
            cp for r, cp in self.checkpoint_rows if r == role and (org is None or cp.org == org)
        ]

    def _first_sequence_at(self, time_ms: int) -> int | None:
        return next((r.sequence for r in self.rows if r.time_ms >= time_ms), None)

    def _prune(self, through_sequence: int, anchor: SignedCheckpoint) -> int:
        self._fail_if_told()
        self.checkpoint_rows.append((RETENTION, anchor))
        before = len(self.rows)
        self.rows = [r for r in self.rows if r.sequence > through_sequence]
        return before - len(self.rows)

    def query(
        self,
        *,
        peer: str | None = None,
        agent: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        decision: str | None = None,
        task_id: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = False,
    ) -> list[AuditRecord]:
        since_ms = _to_ms(since) if since is not None else None
        until_ms = _to_ms(until) if until is not None else None
        matches = [
            r
            for r in self.rows
            if (peer is None or r.peer_org == peer)
            and (agent is None or r.agent == agent)
            and (since_ms is None or r.time_ms >= since_ms)
            and (until_ms is None or r.time_ms < until_ms)
            and (decision is None or r.decision == decision)
            and (task_id is None or r.task_id == task_id)
            and (kind is None or r.kind == kind)
        ]
        if newest_first:
            matches.reverse()
        return matches[offset : offset + limit]

    def records(self, start_sequence: int = 1) -> Iterator[AuditRecord]:
        for record in list(self.rows):
            if record.sequence >= start_sequence:
                yield record


# ---- SQL (SQLite or PostgreSQL) ----

_READ_BATCH = 5_000
_TASK_COLUMNS = tuple(column.name for column in TASKS.columns)


class _Columns:
    """A DB-API row read by column name, as row_from_sql reads SQLAlchemy rows."""

    def __init__(self, names: tuple[str, ...], values: Sequence[Any]) -> None:
        for name, value in zip(names, values, strict=True):
            setattr(self, name, value)


class SqlAuditStore(AuditStore):
    """The audit log in SQLite (WAL, synchronous=FULL) or PostgreSQL, written by one thread."""

    def __init__(
        self,
        url: str,
        *,
        batch_max: int = 512,
        verifier: Verifier | None = None,
        busy_timeout_ms: int = 5_000,
    ) -> None:
        super().__init__(batch_max=batch_max, verifier=verifier)
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ConfigError(
                f"audit.database_url {url!r} is not a database URL: use sqlite:///PATH or "
                "postgresql+psycopg://USER@HOST:PORT/DB"
            ) from None
        self.url = url
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.busy_timeout_ms = busy_timeout_ms
        self._engine: Engine | None = None
        self._open_lock = threading.Lock()
        self._writer_thread = WriterThread(
            "fedgate-audit-writer",
            lambda: self.engine,
            batch=self._commit_on_thread,
            batch_max=batch_max,
        )

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, created (with the tables) on first use."""
        if self._engine is None:
            self._open()
        assert self._engine is not None
        return self._engine

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await self._writer_thread.run(function, *args)

    def _start_writer(self) -> None:
        self._closed = False  # the writer is the thread: no asyncio task to start

    def _submit(self, step: _Step) -> None:
        """Straight to the writer thread: the steps queued while it commits form its next
        batch, and their waiters resume with one hand-off back to the event loop."""
        self._writer_thread.put((step, asyncio.get_running_loop()))

    def _commit_on_thread(self, items: list[tuple[_Step, asyncio.AbstractEventLoop]]) -> None:
        """The writer thread's batch: commit, then settle the waiters on their event loop."""
        time_ms = max(_now_ms(), self._last_time_ms)
        outcomes = self._commit_steps([step[:2] for step, _ in items], time_ms)
        by_loop: dict[asyncio.AbstractEventLoop, tuple[list[_Step], list[Any]]] = {}
        for (step, loop), outcome in zip(items, outcomes, strict=True):
            steps, results = by_loop.setdefault(loop, ([], []))
            steps.append(step)
            results.append(outcome)
        for loop, (steps, results) in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._settle, steps, results)

    def _open(self) -> None:
        with self._open_lock:
            if self._engine is None:
                self._engine = self._create_engine()

    def _create_engine(self) -> Engine:
        engine = create_store_engine(self.url, busy_timeout_ms=self.busy_timeout_ms)
        try:
            SQLModel.metadata.create_all(engine, tables=[RECORDS, CHECKPOINTS, TASKS])
            upgrade_schema(engine)
        except Exception:
            engine.dispose()
            raise
        return engine

    async def _release(self) -> None:
        await asyncio.to_thread(self.dispose)  # waits for the writer thread to end

    def _read_head(self) -> tuple[int, str]:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(RECORDS.c.sequence, RECORDS.c.record_hash)
                .order_by(RECORDS.c.sequence.desc())
                .limit(1)
            ).first()
        if row is not None:
            return int(row.sequence), str(row.record_hash)
        anchor = self.retention_anchor()
        return (anchor.sequence, anchor.head_hash) if anchor else (0, GENESIS_HASH)

    def _write_step_batch(
        self,
        ops: list[TaskOp],
        records_for: Callable[[list[TaskRow | None]], list[AuditRecord]],
        now_ms: int,
    ) -> list[AuditRecord]:
        """On the writer thread, in one transaction on its connection: the task-table writes
        (on PostgreSQL in one pipeline, one round trip), then one executemany of the records."""
        with self._writer_thread.transaction() as cursor:
            params = [op_sql_params(op, now_ms) for op in ops]
            if len(params) > 1 and not self.is_sqlite:
                inserted = self._ops_pipelined(cursor.connection, params)
            else:
                inserted = self._ops_each(cursor, params)
            taken = [
                self._row_in_transaction(cursor, op) if was is False else None
                for op, was in zip(ops, inserted, strict=True)
            ]
            records = records_for(taken)
            if records:
                cursor.executemany(self._insert_sql, [record_row(r) for r in records])
        return records

    def _ops_each(
        self, cursor: Any, params: list[tuple[str, tuple[Any, ...]]]
    ) -> list[bool | None]:
        statements = self._task_sql
        outcomes: list[bool | None] = []
        for kind, values in params:
            cursor.execute(statements[kind], values)
            # A row back means inserted (psycopg's rowcount is -1 after ON CONFLICT).
            outcomes.append(bool(cursor.fetchall()) if kind == "accept" else None)
        return outcomes

    def _ops_pipelined(
        self, connection: Any, params: list[tuple[str, tuple[Any, ...]]]
    ) -> list[bool | None]:
        """PostgreSQL: the writes in one pipeline, one round trip to the database instead of one
        per write (across a network the round trips, not the database, bound the task rate:
        bench.bench_task_store). A write that fails aborts the transaction, and the error is
        raised when the pipeline syncs; the writer then tries each step on its own."""
        statements = self._task_sql
        pending: list[Any] = []
        try:
            with connection.pipeline():
                for kind, values in params:
                    pending.append(connection.cursor())
                    pending[-1].execute(statements[kind], values)
            return [
                bool(each.fetchall()) if kind == "accept" else None
                for (kind, _), each in zip(params, pending, strict=True)
            ]
        finally:
            for each in pending:
                each.close()

    def _row_in_transaction(self, cursor: Any, op: TaskOp) -> TaskRow | None:
        """The row that held an Accept's key, read inside the writer's transaction."""
        assert isinstance(op, Accept)
        key = task_key(op.origin_org, op.spec)
        cursor.execute(self._task_sql["select"], key)
        found = cursor.fetchone()
        return row_from_sql(_Columns(_TASK_COLUMNS, found)) if found is not None else None

    @functools.cached_property
    def _insert_sql(self) -> str:
        return driver_sql(self.engine, INSERT_RECORD_SQL)

    @functools.cached_property
    def _task_sql(self) -> dict[str, str]:
        """The SQL of each kind of task-table write, for the driver's parameter style."""
        statements = dict(WRITE_SQL)
        statements["select"] = (
            f"SELECT {', '.join(_TASK_COLUMNS)} FROM {TASKS.name} "  # noqa: S608 - model names
            "WHERE origin_org = ? AND key = ?"
        )
        return {kind: driver_sql(self.engine, sql) for kind, sql in statements.items()}

    def _select_task(self, *conditions: Any) -> TaskRow | None:
        with self.engine.connect() as connection:
            found = connection.execute(select(TASKS).where(*conditions).limit(1)).first()
        return row_from_sql(found) if found is not None else None

    async def _read_tasks(self, function: Callable[..., T], *args: Any) -> T:
        """A read of the task table, off the event loop; a database out of reach is
        Unavailable (a clear status for the caller), as it is for a write."""
        try:
            return await asyncio.to_thread(function, *args)
        except FedgateError:
            raise
        except Exception as exc:
            raise Unavailable(
                f"the task table cannot be read: {_cause(exc)}; retry when it recovers"
            ) from None

    async def task_row(self, origin_org: str, key: str) -> TaskRow | None:
        return await self._read_tasks(
            self._select_task, TASKS.c.origin_org == origin_org, TASKS.c.key == key
        )

    async def task_by_id(self, origin_org: str, task_id: str) -> TaskRow | None:
        return await self._read_tasks(
            self._select_task, TASKS.c.origin_org == origin_org, TASKS.c.task_id == task_id
        )

    def _unfinished(self) -> list[TaskRow]:
        finals = [s.value for s in TaskState if s.final]
        with self.engine.connect() as connection:
            rows = connection.execute(select(TASKS).where(TASKS.c.state.not_in(finals))).all()
        return [row_from_sql(r) for r in rows]

    async def unfinished_tasks(self) -> list[TaskRow]:
        return await self._read_tasks(self._unfinished)

    def prune_tasks(self, before_ms: int) -> int:
        finals = [s.value for s in TaskState if s.final]
        with self.engine.begin() as connection:
            result = connection.execute(
                delete(TASKS).where(TASKS.c.state.in_(finals), TASKS.c.updated_ms < before_ms)
            )
        return int(result.rowcount)

    def task_overview(self, *, state: str | None = None, limit: int = 50) -> list[TaskRow]:
        statement = select(TASKS)
        if state is not None:
            statement = statement.where(TASKS.c.state == state)
        statement = statement.order_by(TASKS.c.created_ms.desc(), TASKS.c.task_id.desc())
        with self.engine.connect() as connection:
            rows = connection.execute(statement.limit(limit)).all()
        return [row_from_sql(r) for r in rows]

    def task_counts(self) -> dict[str, int]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(TASKS.c.state, func.count()).group_by(TASKS.c.state)
            ).all()
        return {str(state): int(count) for state, count in rows}

    def _add_checkpoint(self, role: str, checkpoint: SignedCheckpoint) -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(CHECKPOINTS), [checkpoint_values(role, checkpoint)])

    def _checkpoints(self, role: str, org: str | None) -> list[SignedCheckpoint]:
        statement = select(CHECKPOINTS).where(CHECKPOINTS.c.role == role)
        if org is not None:
            statement = statement.where(CHECKPOINTS.c.org == org)
        with self.engine.connect() as connection:
            rows = connection.execute(statement.order_by(CHECKPOINTS.c.id)).all()
        return [checkpoint_from_row(row) for row in rows]

    def _first_sequence_at(self, time_ms: int) -> int | None:
        with self.engine.connect() as connection:
            value = connection.execute(
                select(func.min(RECORDS.c.sequence)).where(RECORDS.c.time_ms >= time_ms)
            ).scalar()
        return None if value is None else int(value)

    def _prune(self, through_sequence: int, anchor: SignedCheckpoint) -> int:
        with self.engine.begin() as connection:
            connection.execute(insert(CHECKPOINTS), [checkpoint_values(RETENTION, anchor)])
            result = connection.execute(
                delete(RECORDS).where(RECORDS.c.sequence <= through_sequence)
            )
        return int(result.rowcount)

    def dispose(self) -> None:
        """End the writer thread and release connections (synchronous users call this)."""
        self._writer_thread.stop()
        with self._open_lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def insert_records(self, records: Sequence[AuditRecord]) -> None:
        """Write already chained records in one transaction (benchmarks and imports only)."""
        with self.engine.begin() as connection:
            connection.execute(insert(RECORDS), [record_values(r) for r in records])

    def query(
        self,
        *,
        peer: str | None = None,
        agent: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        decision: str | None = None,
        task_id: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = False,
    ) -> list[AuditRecord]:
        c = RECORDS.c
        conditions: list[ColumnElement[bool]] = []
        for column, value in (
            (c.peer_org, peer),
            (c.agent, agent),
            (c.decision, decision),
            (c.task_id, task_id),
            (c.kind, kind),
        ):
            if value is not None:
                conditions.append(column == value)
        if since is not None:
            conditions.append(c.time_ms >= _to_ms(since))
        if until is not None:
            conditions.append(c.time_ms < _to_ms(until))
        order = c.sequence.desc() if newest_first else c.sequence
        statement = (
            select(*SELECTED_COLUMNS).where(*conditions).order_by(order).limit(limit).offset(offset)
        )
        with self.engine.connect() as connection:
            return [record_from_row(row) for row in connection.execute(statement)]

    def records(self, start_sequence: int = 1) -> Iterator[AuditRecord]:
        next_sequence = start_sequence
        while True:
            with self.engine.connect() as connection:
                rows = connection.execute(
                    select(*SELECTED_COLUMNS)
                    .where(RECORDS.c.sequence >= next_sequence)
                    .order_by(RECORDS.c.sequence)
                    .limit(_READ_BATCH)
                ).all()
            for row in rows:
                yield record_from_row(row)
            if len(rows) < _READ_BATCH:
                return
            next_sequence = int(rows[-1][0]) + 1


def open_store(url: str, *, verifier: Verifier | None = None, **options: Any) -> SqlAuditStore:
    """The SQL audit store at `url` (not yet opened: `await store.start()`, or read from it)."""
    return SqlAuditStore(url, verifier=verifier, **options)
