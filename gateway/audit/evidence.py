"""Evidence about a partner's log: the signed chain positions we received, and checking a log
against what a partner holds.

Whatever an organization signs and hands to a partner can carry its audit chain position: a signed
checkpoint (`ExchangeCheckpoint`, and the one every receipt-less final answer carries), a receipt
(v2: `chain_sequence` and `chain_head` in the signed body), a delegation statement (claims `chs`
and `chh`). Each says, under its signer's key, "my log held record `sequence` with hash `head`
when I signed this": a lower bound on that log. A tail cut after the signer's last checkpoint
exchange is then visible with the next exchange, not the next checkpoint interval.

`fedgate audit evidence --peer ORG` writes what we hold about ORG's log (the highest position of
each kind, with its signature material); ORG runs `fedgate audit verify --evidence FILE` on its own
log, which checks every position's signature and names the cut ("records 1041-1187 are missing:
insurer holds a receipt (…) signed at sequence 1187 with head …") or the rewrite.

The file is one JSON object:

    {"format": "fedgate-audit-evidence", "version": 1, "holder": <who holds it>,
     "about": <whose log>, "written_at_unix_ms": ...,
     "positions": [{"source": "checkpoint" | "receipt" | "delegation",
                    "sequence", "head_hash", "signed_at_unix_ms", "task_id",
                    "record": the holder's record it came with (0: the checkpoint table),
                    "material": the signed checkpoint or receipt (JSON) or the statement (JWT)}]}

A reader trusts only the signed material: sequence, head and time are read from it again, and a
position whose signature does not verify is set aside (named, never used).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import heapq
import itertools
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gateway.audit.chain import AuditRecord, VerifyReport
from gateway.errors import FedgateError, InvalidArgument
from gateway.identity.delegation import DelegationVerifier
from gateway.identity.signing import (
    SignedCheckpoint,
    SignedReceipt,
    Verifier,
    now_unix_ms,
    verify_checkpoint,
    verify_receipt,
)

EVIDENCE_FORMAT = "fedgate-audit-evidence"
EVIDENCE_VERSION = 1
SOURCES = ("checkpoint", "receipt", "delegation")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class SignedPosition:
    """A chain position (sequence, head hash) that `org` signed, with what it signed."""

    source: str
    org: str
    sequence: int
    head_hash: str
    signed_at_unix_ms: int
    material: Any
    task_id: str = ""
    record: int = 0

    def describe(self) -> str:
        """'a receipt (task t-1, 2026-05-01T12:00:00Z)' and the like."""
        when = _iso(self.signed_at_unix_ms)
        if self.source == "checkpoint":
            return f"a checkpoint ({when})"
        what = "a receipt" if self.source == "receipt" else "a delegation statement"
        return f"{what} (task {self.task_id}, {when})"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sequence": self.sequence,
            "head_hash": self.head_hash,
            "signed_at_unix_ms": self.signed_at_unix_ms,
            "task_id": self.task_id,
            "record": self.record,
            "material": self.material,
        }


def _iso(unix_ms: int) -> str:
    try:
        when = dt.datetime.fromtimestamp(unix_ms / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{unix_ms} ms"
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _head(sequence: Any, head_hash: Any) -> tuple[int, str] | None:
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        return None
    if not isinstance(head_hash, str) or not _HEX64.match(head_hash):
        return None
    return sequence, head_hash


# ---- reading positions out of signed material (not yet verified) ----


def from_checkpoint(checkpoint: SignedCheckpoint, *, record: int = 0) -> SignedPosition:
    return SignedPosition(
        "checkpoint",
        checkpoint.org,
        checkpoint.sequence,
        checkpoint.head_hash,
        checkpoint.signed_at_unix_ms,
        checkpoint.to_json(),
        record=record,
    )


def from_receipt(data: Any, *, record: int = 0) -> SignedPosition | None:
    """The position a receipt carries (receipt v2), None for a receipt without one (v1)."""
    try:
        receipt = SignedReceipt.from_json(data)
    except FedgateError:
        return None
    if getattr(receipt.body, "version", 1) < 2:
        return None  # receipt v1 signs no chain position
    # Read from the parsed body, never from the JSON: only what the body holds is signed.
    head = _head(
        getattr(receipt.body, "chain_sequence", None), getattr(receipt.body, "chain_head", None)
    )
    if head is None or head[0] == 0:
        return None  # signed before the signer's log held a record: a bound of nothing
    return SignedPosition(
        "receipt",
        receipt.body.responder_org,
        head[0],
        head[1],
        receipt.body.signed_at_unix_ms,
        data,
        task_id=receipt.body.task_id,
        record=record,
    )


def statement_claims(token: str) -> dict[str, Any] | None:
    """The (unverified) claims of a compact JWS, None if it is not one."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def from_statement(token: str, *, record: int = 0) -> SignedPosition | None:
    """The position a delegation statement carries (claims chs, chh), None without one."""
    claims = statement_claims(token)
    if claims is None:
        return None
    head = _head(claims.get("chs"), claims.get("chh"))
    issuer, issued = claims.get("iss"), claims.get("iat")
    if head is None or not isinstance(issuer, str) or not isinstance(issued, int | float):
        return None
    if isinstance(issued, bool) or not math.isfinite(issued):
        return None
    task_id = claims.get("task_id")
    return SignedPosition(
        "delegation",
        issuer,
        head[0],
        head[1],
        int(issued * 1000),
        token,
        task_id=task_id if isinstance(task_id, str) else "",
        record=record,
    )


def from_material(source: str, material: Any, *, record: int = 0) -> SignedPosition | None:
    """A position from its signed material, as written in an evidence file."""
    if source == "checkpoint":
        try:
            return from_checkpoint(SignedCheckpoint.from_json(material), record=record)
        except FedgateError:
            return None
    if source == "receipt":
        return from_receipt(material, record=record)
    if source == "delegation" and isinstance(material, str):
        return from_statement(material, record=record)
    return None


def positions_of_record(record: AuditRecord) -> list[SignedPosition]:
    """The positions of the counterpart's chain that came with one of our records.

    The receipt it kept, and its `evidence` (a signed checkpoint, or the delegation statement;
    read when the record has that field): a checkpoint is a JSON object, a statement a JWT
    string; either may also sit under "checkpoint" / "delegation", or several in a list.
    """
    found: list[SignedPosition] = []
    if record.receipt is not None:
        position = from_receipt(record.receipt, record=record.sequence)
        if position is not None:
            found.append(position)
    for item in _evidence_items(getattr(record, "evidence", None)):
        position = None
        if isinstance(item, str):
            position = from_statement(item, record=record.sequence)
        elif isinstance(item, dict):
            position = from_material("checkpoint", item, record=record.sequence)
        if position is not None:
            found.append(position)
    return found


def _evidence_items(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return [item for element in value for item in _evidence_items(element)]
    if isinstance(value, dict):
        nested = [
            value[name] for name in ("checkpoint", "delegation", "statement") if name in value
        ]
        return [item for element in nested for item in _evidence_items(element)] or [value]
    return [value]


# ---- verifying ----


def verify_position(position: SignedPosition, verifier: Verifier, *, holder: str) -> None:
    """Accept a position only if its material is a valid signature of `position.org`.

    Raises a FedgateError naming why not. A delegation statement must also be addressed to
    `holder` (it is checked as of its issue time: it expired long ago, by design).
    """
    material = position.material
    # protocol: offline, signed material is checked at its signing time (it was checked online
    # at the time of receipt when it arrived).
    signed_at = position.signed_at_unix_ms
    if position.source == "checkpoint":
        verify_checkpoint(
            verifier, SignedCheckpoint.from_json(material), received_at_unix_ms=signed_at
        )
    elif position.source == "receipt":
        verify_receipt(
            verifier,
            SignedReceipt.from_json(material),
            expected_org=position.org,
            received_at_unix_ms=signed_at,
        )
    elif position.source == "delegation":
        issued = position.signed_at_unix_ms / 1000
        DelegationVerifier(holder, verifier, max_ttl_seconds=math.inf, clock=lambda: issued).verify(
            material, peer_org=position.org, task_id=position.task_id
        )
    else:
        raise InvalidArgument(f"unknown kind of evidence {position.source!r}")


def highest_positions(
    candidates: Iterable[SignedPosition], verifier: Verifier, *, org: str, holder: str
) -> list[SignedPosition]:
    """Of each source, the highest position signed by `org` whose signature verifies."""
    best: dict[str, SignedPosition] = {}
    for position in candidates:
        if position.org != org:
            continue
        kept = best.get(position.source)
        if kept is not None and kept.sequence >= position.sequence:
            continue
        try:
            verify_position(position, verifier, holder=holder)
        except FedgateError:
            continue
        best[position.source] = position
    return [best[source] for source in SOURCES if source in best]


# ---- the file ----


@dataclass
class Evidence:
    """What `holder` holds about the log of `about`."""

    holder: str
    about: str
    written_at_unix_ms: int
    positions: list[SignedPosition]


def write_evidence(out: TextIO, evidence: Evidence) -> int:
    """Write an evidence file; returns the number of positions written."""
    document = {
        "format": EVIDENCE_FORMAT,
        "version": EVIDENCE_VERSION,
        "holder": evidence.holder,
        "about": evidence.about,
        "written_at_unix_ms": evidence.written_at_unix_ms or now_unix_ms(),
        "positions": [position.to_json() for position in evidence.positions],
    }
    out.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return len(evidence.positions)


def read_evidence(path: str | Path) -> Evidence:
    """Read an evidence file; positions come from their signed material alone (not verified)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read the evidence file: {exc.strerror}") from None
    except ValueError:
        raise InvalidArgument(
            f"{path}: not JSON: pass a file written by `fedgate audit evidence`"
        ) from None
    if not isinstance(data, dict) or data.get("format") != EVIDENCE_FORMAT:
        raise InvalidArgument(
            f"{path}: not an evidence file: the partner writes one with `fedgate audit evidence "
            "--peer YOUR_ORG --out FILE`"
        )
    if data.get("version") != EVIDENCE_VERSION:
        raise InvalidArgument(
            f"{path}: evidence version {data.get('version')!r} is not supported (expected "
            f"{EVIDENCE_VERSION})"
        )
    holder, about = data.get("holder"), data.get("about")
    items = data.get("positions")
    if not isinstance(holder, str) or not isinstance(about, str) or not isinstance(items, list):
        raise InvalidArgument(f"{path}: evidence lacks holder, about or positions")
    positions = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise InvalidArgument(f"{path}: evidence position {number} is not a JSON object")
        record = item.get("record", 0)
        position = from_material(
            str(item.get("source")),
            item.get("material"),
            record=record if isinstance(record, int) and not isinstance(record, bool) else 0,
        )
        if position is None:
            raise InvalidArgument(
                f"{path}: evidence position {number} holds no readable signed chain position "
                f"(source {item.get('source')!r})"
            )
        positions.append(position)
    written = data.get("written_at_unix_ms")
    return Evidence(holder, about, written if isinstance(written, int) else 0, positions)


# ---- checking a log against it ----


def check_positions(
    report: VerifyReport,
    positions: Iterable[SignedPosition],
    hash_at: Callable[[int], str | None],
    *,
    holder: str,
    anchor: SignedCheckpoint | None = None,
) -> int:
    """Add to `report` every signed position that the walked log does not reach or match.

    `hash_at(sequence)` is the record hash of our record at `sequence` (None: no such record).
    Returns the number of distinct positions checked. A cut tail is named once, by the highest
    position beyond the end of the log.
    """
    distinct: dict[tuple[int, str], SignedPosition] = {}
    for position in positions:
        distinct.setdefault((position.sequence, position.head_hash), position)
    beyond = [p for p in distinct.values() if p.sequence > report.head_sequence]
    if beyond:
        top = max(beyond, key=lambda p: p.sequence)
        first = report.head_sequence + 1
        span = (
            f"record {first} is" if first == top.sequence else f"records {first}-{top.sequence} are"
        )
        report.add(
            first,
            f"{span} missing: {holder} holds {top.describe()} signed at sequence {top.sequence} "
            f"with head {top.head_hash}",
        )
    for position in sorted(distinct.values(), key=lambda p: p.sequence):
        sequence = position.sequence
        if sequence > report.head_sequence or sequence == 0:
            continue
        if anchor is not None and sequence == anchor.sequence:
            actual: str | None = anchor.head_hash
        elif sequence < report.first_sequence:
            continue  # before the retention cut: archived, checked against the archive
        else:
            actual = hash_at(sequence)
        if actual is None:
            report.add(
                sequence,
                f"record {sequence} is missing: {holder} holds {position.describe()} signed at "
                f"sequence {sequence} with head {position.head_hash}",
            )
        elif actual != position.head_hash:
            report.add(
                sequence,
                f"record {sequence} does not match what {holder} holds: {position.describe()} "
                f"signed at sequence {sequence} with head {position.head_hash}, but record "
                f"{sequence} hashes to {actual}: the log was rewritten",
            )
    report.problems.sort(key=lambda problem: problem.sequence)
    return len(distinct)


# ---- gathering what we hold, and checking what a partner holds ----

_CANDIDATES_PER_SOURCE = 16


def collect_positions(
    checkpoints: Iterable[SignedCheckpoint],
    records: Iterable[AuditRecord],
    verifier: Verifier,
    *,
    org: str,
    holder: str,
) -> list[SignedPosition]:
    """The highest valid position of each kind that `org` signed, from its checkpoints we keep
    and our records of exchanges with it.

    The highest few of each kind are kept unverified while scanning and verified at the end: a
    partner that cut its log signs lower positions afterwards, so the highest ever is what counts.
    """
    tops: dict[str, list[tuple[int, int, SignedPosition]]] = defaultdict(list)
    counter = itertools.count()

    def offer(position: SignedPosition) -> None:
        heap = tops[position.source]
        item = (position.sequence, next(counter), position)
        if len(heap) < _CANDIDATES_PER_SOURCE:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)

    for checkpoint in checkpoints:
        offer(from_checkpoint(checkpoint))
    for record in records:
        for position in positions_of_record(record):
            offer(position)
    candidates = sorted(
        (item[2] for heap in tops.values() for item in heap), key=lambda p: -p.sequence
    )
    return highest_positions(candidates, verifier, org=org, holder=holder)


@dataclass
class EvidenceCheck:
    """What the evidence files given to verify held, and what of it was used."""

    checked: int = 0
    highest: int = 0
    holders: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


def check_evidence_files(
    report: VerifyReport,
    paths: Iterable[str],
    verifier: Verifier,
    org: str,
    hash_at: Callable[[int], str | None],
    anchor: SignedCheckpoint | None,
) -> EvidenceCheck:
    """Check a walked log of `org` against evidence files; positions not signed by `org` are
    set aside (named in `rejected`), never used."""
    outcome = EvidenceCheck()
    for path in paths:
        held = read_evidence(path)
        if held.about != org:
            raise InvalidArgument(
                f"{path}: evidence about the log of {held.about!r}, not of {org!r}: "
                f"{held.about} checks it against its own log"
            )
        valid = []
        for position in held.positions:
            try:
                verify_position(position, verifier, holder=held.holder)
            except FedgateError as exc:
                outcome.rejected.append(
                    f"{path}: {position.describe()} at sequence {position.sequence} is not a "
                    f"valid signature of {org}, ignored: {exc.message}"
                )
                continue
            valid.append(position)
        outcome.checked += check_positions(
            report, valid, hash_at, holder=held.holder, anchor=anchor
        )
        outcome.highest = max([outcome.highest, *(p.sequence for p in valid)])
        outcome.holders.append(held.holder)
    return outcome
