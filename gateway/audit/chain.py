"""The audit log's records and hash chain: what an event is, how it is hashed, how a chain verifies.

    record_hash = SHA-256( prev_hash (64 hex, ASCII) || canonical(body) )

`body` is every field but the two hashes. A record names the canonical JSON version it was hashed
with (`canonical`): version 1 records (written before versions existed) have no `canonical`,
`turn` or `evidence` in their body and hash under canonical JSON version 1, exactly as they always
did; version 2 records add those three fields and hash under RFC 8785 (JCS). New records are
version 2. docs/protocol.md ("Audit record") gives the exact body.

The first record's prev_hash is 64 zeros, or, after retention pruned the start of the log, the
head hash of a signed retention checkpoint at the cut. Signed checkpoints of our head, ours or
supplied by a partner, detect a cut-off tail and a rewritten log; a changed, removed, inserted or
reordered record breaks the chain at that record.

Nothing here touches a database: the stores (gateway.audit.store) and the offline bundle checks
(gateway.audit.bundle) share this code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import FedgateError, InvalidArgument
from gateway.identity.signing import SignedCheckpoint, Verifier, verify_checkpoint
from gateway.payload import (
    CANONICAL_V1,
    CANONICAL_VERSION,
    CANONICAL_VERSIONS,
    canonical_bytes,
    jcs,
    unknown_canonical_version,
)

GENESIS_HASH = "0" * 64

EVENT_KINDS = frozenset(
    {
        "request_sent",
        "request_received",
        "invoke_denied",
        "result_released",
        # A result filtered and signed while no call followed its task: kept for collection,
        # released (result_released) when a retry with its key collects it.
        "result_kept",
        "result_received",
        "failed",
        "canceled",
        "rejected",
    }
)
DIRECTIONS = frozenset({"outbound", "inbound"})
# A counterpart's evidence (a checkpoint or a delegation statement) is small; more is refused.
MAX_EVIDENCE_BYTES = 32 * 1024


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One event of an exchange, as the gateway core reports it.

    Digests: on an event that sends (request_sent, result_released) digest_before is the payload
    before the policy filter and digest_after what left; on an event that receives
    (request_received, result_received) digest_before is what arrived (reconciliation falls back
    to digest_after when only that is set). `detail` is a reason,
    never a field value; `payload` is set only when the organization opted in, own side only.
    `turn` is the task's turn (0 for the first). `evidence` is the counterpart's signed chain
    position received with this exchange, as a JSON object: {"checkpoint": <SignedCheckpoint
    JSON>} or {"delegation": "<compact JWS>"} (a receipt already sits in `receipt`).
    """

    kind: str
    task_id: str
    peer_org: str
    agent: str = ""
    skill: str = ""
    direction: str = "inbound"
    decision: str = ""
    requester: str = ""
    status: str = ""
    duration_ms: float = 0.0
    withheld_paths: tuple[str, ...] = ()
    transformed: tuple[tuple[str, str], ...] = ()
    digest_before: str | None = None
    digest_after: str | None = None
    policy_version: str | None = None
    detail: str = ""
    receipt: dict[str, Any] | None = None
    payload: dict[str, Any] | None = None
    turn: int = 0
    evidence: dict[str, Any] | None = None


@dataclass(frozen=True)
class AuditRecord:
    """An AuditEvent as stored: numbered, timed and chained (under canonical version `canonical`).

    The three fields after record_hash are version 2's; a version 1 record has the defaults.
    """

    sequence: int
    time_ms: int
    kind: str
    task_id: str
    peer_org: str
    agent: str
    skill: str
    direction: str
    decision: str
    requester: str
    status: str
    duration_ms: float
    withheld_paths: tuple[str, ...]
    transformed: tuple[tuple[str, str], ...]
    digest_before: str | None
    digest_after: str | None
    policy_version: str | None
    detail: str
    receipt: dict[str, Any] | None
    payload: dict[str, Any] | None
    prev_hash: str
    record_hash: str
    canonical: int = CANONICAL_V1
    turn: int = 0
    evidence: dict[str, Any] | None = None

    @property
    def time(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.time_ms / 1000, dt.UTC)

    def body(self) -> dict[str, Any]:
        """Every field except the two hashes: what the record hash covers.

        A version 1 body is exactly what version 1 hashed (no canonical, turn or evidence).
        """
        body = {
            "sequence": self.sequence,
            "time_ms": self.time_ms,
            "kind": self.kind,
            "task_id": self.task_id,
            "peer_org": self.peer_org,
            "agent": self.agent,
            "skill": self.skill,
            "direction": self.direction,
            "decision": self.decision,
            "requester": self.requester,
            "status": self.status,
            "duration_ms": self.duration_ms,
            "withheld_paths": list(self.withheld_paths),
            "transformed": [[path, action] for path, action in self.transformed],
            "digest_before": self.digest_before,
            "digest_after": self.digest_after,
            "policy_version": self.policy_version,
            "detail": self.detail,
            "receipt": self.receipt,
            "payload": self.payload,
        }
        if self.canonical != CANONICAL_V1:
            body["canonical"] = self.canonical
            body["turn"] = self.turn
            body["evidence"] = self.evidence
        return body

    def computed_hash(self) -> str:
        try:
            return chain_hash(self.prev_hash, self.body())
        except (TypeError, ValueError, InvalidArgument):
            return "<not canonical JSON>"  # a stored body that cannot be hashed never matches

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "prev_hash": self.prev_hash, "record_hash": self.record_hash}

    @classmethod
    def from_json(cls, data: Any) -> AuditRecord:
        """Read a record from its JSON form; raises InvalidArgument naming what is wrong."""
        if not isinstance(data, dict):
            raise InvalidArgument("an audit record must be a JSON object")
        canonical = CANONICAL_V1 if "canonical" not in data else _typed(data, "canonical", int)
        if canonical not in CANONICAL_VERSIONS:
            raise InvalidArgument(f"audit record: {unknown_canonical_version(canonical)}")
        try:
            return cls(
                sequence=_typed(data, "sequence", int),
                time_ms=_typed(data, "time_ms", int),
                kind=_typed(data, "kind", str),
                task_id=_typed(data, "task_id", str),
                peer_org=_typed(data, "peer_org", str),
                agent=_typed(data, "agent", str),
                skill=_typed(data, "skill", str),
                direction=_typed(data, "direction", str),
                decision=_typed(data, "decision", str),
                requester=_typed(data, "requester", str),
                status=_typed(data, "status", str),
                duration_ms=float(_typed(data, "duration_ms", (int, float))),
                withheld_paths=tuple(str(path) for path in _typed(data, "withheld_paths", list)),
                transformed=tuple(
                    (str(pair[0]), str(pair[1])) for pair in _typed(data, "transformed", list)
                ),
                digest_before=_optional(data, "digest_before", str),
                digest_after=_optional(data, "digest_after", str),
                policy_version=_optional(data, "policy_version", str),
                detail=_typed(data, "detail", str),
                receipt=_optional(data, "receipt", dict),
                payload=_optional(data, "payload", dict),
                prev_hash=_typed(data, "prev_hash", str),
                record_hash=_typed(data, "record_hash", str),
                canonical=canonical,
                turn=0 if canonical == CANONICAL_V1 else _typed(data, "turn", int),
                evidence=None if canonical == CANONICAL_V1 else _optional(data, "evidence", dict),
            )
        except (IndexError, TypeError) as exc:
            raise InvalidArgument(f"malformed audit record: {exc}") from None


def _typed(data: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidArgument(f"audit record field {name!r} is missing or has the wrong type")
    return value


def _optional(data: dict[str, Any], name: str, kind: type) -> Any:
    return None if data.get(name) is None else _typed(data, name, kind)


def chain_hash(prev_hash: str, body: dict[str, Any]) -> str:
    """The record hash: SHA-256 over the previous hash and the canonical JSON of the body, under
    the version the body names (no `canonical` field: version 1)."""
    version = body.get("canonical", CANONICAL_V1)
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_bytes(body, version)).hexdigest()


def normalize_event(event: AuditEvent) -> AuditEvent:
    """Check an event and bring it to the exact shape it has after a round trip through storage.

    Raises InvalidArgument for an unknown kind or direction, a non-finite duration, a negative
    turn, or a receipt, payload or evidence that is not canonical JSON (version 2: no NaN, no
    integer beyond 2**53, string keys) or evidence over MAX_EVIDENCE_BYTES. Dicts are
    round-tripped through JSON, so what is hashed now is what a later read hashes again.
    """
    if event.kind not in EVENT_KINDS:
        raise InvalidArgument(
            f"unknown audit event kind {event.kind!r}: one of {', '.join(sorted(EVENT_KINDS))}"
        )
    if event.direction not in DIRECTIONS:
        raise InvalidArgument(
            f"audit direction must be inbound or outbound, not {event.direction!r}"
        )
    duration = float(event.duration_ms)
    if not math.isfinite(duration):
        raise InvalidArgument("audit duration_ms must be a finite number")
    if isinstance(event.turn, bool) or not isinstance(event.turn, int) or event.turn < 0:
        raise InvalidArgument(f"audit turn must be an integer >= 0, not {event.turn!r}")
    normalized = AuditEvent(
        kind=event.kind,
        task_id=str(event.task_id),
        peer_org=str(event.peer_org),
        agent=str(event.agent),
        skill=str(event.skill),
        direction=event.direction,
        decision=str(event.decision),
        requester=str(event.requester),
        status=str(event.status),
        duration_ms=duration,
        withheld_paths=tuple(str(path) for path in event.withheld_paths),
        transformed=tuple((str(path), str(action)) for path, action in event.transformed),
        digest_before=event.digest_before,
        digest_after=event.digest_after,
        policy_version=event.policy_version,
        detail=str(event.detail),
        receipt=_json_round_trip(event.receipt, "receipt"),
        payload=_json_round_trip(event.payload, "payload"),
        turn=int(event.turn),
        evidence=_json_round_trip(event.evidence, "evidence", max_bytes=MAX_EVIDENCE_BYTES),
    )
    # A NUL character cannot be stored in PostgreSQL text: refuse it here, for this event alone,
    # rather than fail the whole batch it would be committed with.
    texts = [
        normalized.task_id,
        normalized.peer_org,
        normalized.agent,
        normalized.skill,
        normalized.decision,
        normalized.requester,
        normalized.status,
        normalized.detail,
        normalized.digest_before or "",
        normalized.digest_after or "",
        normalized.policy_version or "",
        *normalized.withheld_paths,
        *(part for pair in normalized.transformed for part in pair),
    ]
    joined = "".join(texts)
    if "\x00" in joined:
        raise InvalidArgument("audit event fields must not contain NUL characters")
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(
            "audit event fields must be valid Unicode text (a lone surrogate is not)"
        ) from None
    return normalized


def _json_round_trip(
    value: dict[str, Any] | None, name: str, *, max_bytes: int | None = None
) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidArgument(f"audit {name} must be a JSON object")
    try:
        # orjson's round trip keeps every float a float, as a later read gets it back, and
        # refuses NaN and non-string keys. JCS refuses what a version 2 record could not hash
        # (integers beyond 2**53 too): checked here for a payload or evidence, which may hold
        # anything; a receipt is typed field by field where it is read (SignedReceipt).
        loaded = orjson.loads(orjson.dumps(value, option=orjson.OPT_STRICT_INTEGER))
        encoded = jcs(value) if name != "receipt" or max_bytes is not None else b""
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"audit {name} is not a JSON object: {exc}") from None
    if max_bytes is not None and len(encoded) > max_bytes:
        raise InvalidArgument(
            f"audit {name} holds {len(encoded)} bytes of JSON, more than the {max_bytes} allowed"
        )
    return loaded  # type: ignore[no-any-return]


def make_record(event: AuditEvent, sequence: int, time_ms: int, prev_hash: str) -> AuditRecord:
    """Number, time and chain a normalized event."""
    unhashed = AuditRecord(
        sequence=sequence,
        time_ms=time_ms,
        kind=event.kind,
        task_id=event.task_id,
        peer_org=event.peer_org,
        agent=event.agent,
        skill=event.skill,
        direction=event.direction,
        decision=event.decision,
        requester=event.requester,
        status=event.status,
        duration_ms=event.duration_ms,
        withheld_paths=event.withheld_paths,
        transformed=event.transformed,
        digest_before=event.digest_before,
        digest_after=event.digest_after,
        policy_version=event.policy_version,
        detail=event.detail,
        receipt=event.receipt,
        payload=event.payload,
        prev_hash=prev_hash,
        record_hash="",
        canonical=CANONICAL_VERSION,
        turn=event.turn,
        evidence=event.evidence,
    )
    return _with_hash(unhashed)


def _with_hash(record: AuditRecord) -> AuditRecord:
    object.__setattr__(record, "record_hash", chain_hash(record.prev_hash, record.body()))
    return record


def chain_events(
    events: Sequence[AuditEvent], head_sequence: int, head_hash: str, time_ms: int
) -> list[AuditRecord]:
    """Records for `events` following the head (sequence, hash), in order."""
    records: list[AuditRecord] = []
    sequence, prev = head_sequence, head_hash
    for event in events:
        sequence += 1
        record = make_record(event, sequence, time_ms, prev)
        prev = record.record_hash
        records.append(record)
    return records


# ---- verification ----


@dataclass(frozen=True)
class ChainProblem:
    """Something wrong with the log; `sequence` names the first record concerned."""

    sequence: int
    message: str


@dataclass
class VerifyReport:
    """The outcome of walking a chain and checking its signed checkpoints."""

    records: int = 0
    first_sequence: int = 0
    head_sequence: int = 0
    head_hash: str = GENESIS_HASH
    checkpoints_checked: int = 0
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, sequence: int, message: str) -> None:
        self.problems.append(ChainProblem(sequence, message))


def verify_chain(
    records: Iterable[AuditRecord],
    *,
    org: str,
    verifier: Verifier | None,
    anchor: SignedCheckpoint | None = None,
    checkpoints: Sequence[SignedCheckpoint] = (),
    max_problems: int = 100,
) -> VerifyReport:
    """Walk `records` (in sequence order) and check every signed checkpoint of `org` against them.

    `anchor` is the signed retention checkpoint the first record chains from (None: the log starts
    at sequence 1 from 64 zeros). `checkpoints` are signed heads of this chain, our own or handed
    back by partners. Without a verifier signatures are not checked (only hashes).
    Problems are sorted by sequence: the first one names the first bad record.
    """
    report = VerifyReport()
    expected_sequence, expected_prev = 1, GENESIS_HASH
    if anchor is not None:
        _check_signature(report, anchor, org, verifier, "retention checkpoint")
        expected_sequence, expected_prev = anchor.sequence + 1, anchor.head_hash
    report.first_sequence = expected_sequence
    report.head_sequence, report.head_hash = expected_sequence - 1, expected_prev
    wanted = {checkpoint.sequence for checkpoint in checkpoints}
    seen: dict[int, str] = {}
    for record in records:
        if len(report.problems) >= max_problems:
            break
        sequence = record.sequence
        if report.records == 0 and sequence != expected_sequence and anchor is None:
            report.add(
                expected_sequence,
                f"records {expected_sequence}..{sequence - 1} are missing at the start of the "
                "log and no signed retention checkpoint anchors it",
            )
        elif sequence > expected_sequence:
            missing = (
                f"record {expected_sequence} is"
                if sequence == expected_sequence + 1
                else f"records {expected_sequence}..{sequence - 1} are"
            )
            report.add(expected_sequence, f"{missing} missing: the sequence jumps to {sequence}")
        elif sequence < expected_sequence:
            report.add(
                sequence,
                f"record {sequence} is out of order or duplicated (it follows record "
                f"{expected_sequence - 1})",
            )
        if record.prev_hash != expected_prev:
            at_anchor = anchor is not None and sequence == report.first_sequence
            before = "the retention checkpoint" if at_anchor else f"record {sequence - 1}"
            report.add(
                sequence,
                f"record {sequence} does not link to {before} (prev_hash differs): {before} was "
                "changed, or a record was inserted, removed or moved here",
            )
        if record.computed_hash() != record.record_hash:
            report.add(
                sequence,
                f"record {sequence} was changed: its content does not match its record hash",
            )
        if sequence in wanted:
            seen[sequence] = record.record_hash
        expected_sequence, expected_prev = sequence + 1, record.record_hash
        report.records += 1
        report.head_sequence, report.head_hash = sequence, record.record_hash
    for checkpoint in checkpoints:
        _check_head(report, checkpoint, org, verifier, seen, anchor)
    report.problems.sort(key=lambda problem: problem.sequence)
    return report


def _check_signature(
    report: VerifyReport,
    checkpoint: SignedCheckpoint,
    org: str,
    verifier: Verifier | None,
    what: str,
) -> bool:
    if checkpoint.org != org:
        report.add(
            checkpoint.sequence,
            f"{what} at sequence {checkpoint.sequence} is of organization {checkpoint.org!r}, "
            f"not {org!r}",
        )
        return False
    if verifier is None:
        return True
    try:
        # A stored checkpoint was checked when it arrived (or is our own): offline, its signing
        # time is the time its certificate must have been valid at.
        verify_checkpoint(verifier, checkpoint, received_at_unix_ms=checkpoint.signed_at_unix_ms)
    except FedgateError as exc:
        report.add(
            checkpoint.sequence,
            f"{what} at sequence {checkpoint.sequence} has a bad signature: {exc.message}",
        )
        return False
    return True


def _check_head(
    report: VerifyReport,
    checkpoint: SignedCheckpoint,
    org: str,
    verifier: Verifier | None,
    seen: dict[int, str],
    anchor: SignedCheckpoint | None,
) -> None:
    if not _check_signature(report, checkpoint, org, verifier, "signed checkpoint"):
        return
    report.checkpoints_checked += 1
    sequence = checkpoint.sequence
    if sequence > report.head_sequence:
        report.add(
            report.head_sequence + 1,
            f"the log ends at sequence {report.head_sequence} but a checkpoint signed at "
            f"{_iso(checkpoint.signed_at_unix_ms)} covers sequence {sequence}: records "
            f"{report.head_sequence + 1}..{sequence} were cut off",
        )
        return
    if anchor is not None and sequence == anchor.sequence:
        actual: str | None = anchor.head_hash
    else:
        actual = seen.get(sequence)
    if actual is None:
        if sequence == 0 or sequence < report.first_sequence:
            return  # before the retention cut: those records are archived, not here
        report.add(sequence, f"record {sequence}, covered by a signed checkpoint, is missing")
    elif actual != checkpoint.head_hash:
        report.add(
            sequence,
            f"record {sequence} does not match the signed checkpoint of "
            f"{_iso(checkpoint.signed_at_unix_ms)} (head hash differs): the log was rewritten",
        )


def _iso(unix_ms: int) -> str:
    try:
        return dt.datetime.fromtimestamp(unix_ms / 1000, dt.UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{unix_ms} ms"
