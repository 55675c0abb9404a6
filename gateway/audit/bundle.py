"""Audit bundles: an exported log that verifies offline, and reconciling two organizations' logs.

A bundle is JSON lines:

    {"type": "header", "format": "fedgate-audit-bundle", "version": 1, "org": ...,
     "ca_certificate": PEM, "gateway_certificate": PEM, "exported_at_unix_ms": ...,
     "anchor": the signed retention checkpoint the first record chains from, or null}
    {"type": "record", ...}          one per record, in sequence order
    {"type": "checkpoint", ...}      the signed head the records end at

Reconciling matches two bundles exchange by exchange (task id): the requester's `request_sent`
against the responder's `request_received`, the responder's `result_released` against the
requester's `result_received`, and checks digests and the responder's signed receipt.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gateway.audit.chain import AuditRecord, VerifyReport, verify_chain
from gateway.errors import FedgateError, InvalidArgument
from gateway.identity.signing import (
    SignedCheckpoint,
    SignedReceipt,
    Verifier,
    now_unix_ms,
    verify_receipt,
)

BUNDLE_FORMAT = "fedgate-audit-bundle"
BUNDLE_VERSION = 1


@dataclass
class Bundle:
    """An exported audit log, read back."""

    org: str
    ca_pem: bytes
    gateway_cert_pem: bytes
    exported_at_unix_ms: int
    anchor: SignedCheckpoint | None
    records: list[AuditRecord] = field(default_factory=list)
    checkpoints: list[SignedCheckpoint] = field(default_factory=list)


def write_bundle(
    out: TextIO,
    *,
    org: str,
    ca_pem: bytes,
    gateway_cert_pem: bytes,
    records: Iterable[AuditRecord],
    anchor: SignedCheckpoint | None,
    checkpoint: SignedCheckpoint | None,
) -> int:
    """Write a bundle; returns the number of records written."""
    header = {
        "type": "header",
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "org": org,
        "ca_certificate": ca_pem.decode("ascii"),
        "gateway_certificate": gateway_cert_pem.decode("ascii"),
        "exported_at_unix_ms": now_unix_ms(),
        "anchor": None if anchor is None else anchor.to_json(),
    }
    out.write(json.dumps(header, sort_keys=True) + "\n")
    count = 0
    for record in records:
        out.write(json.dumps({"type": "record", **record.to_json()}, sort_keys=True) + "\n")
        count += 1
    if checkpoint is not None:
        out.write(json.dumps({"type": "checkpoint", **checkpoint.to_json()}, sort_keys=True) + "\n")
    return count


def read_bundle(path: str | Path) -> Bundle:
    """Read a bundle file; raises InvalidArgument naming the line that is wrong."""
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read the audit bundle: {exc.strerror}") from None
    with handle:
        bundle: Bundle | None = None
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except ValueError:
                raise InvalidArgument(f"{where}: not a JSON line of an audit bundle") from None
            if not isinstance(data, dict):
                raise InvalidArgument(f"{where}: not a JSON object")
            kind = data.pop("type", None)
            try:
                if bundle is None:
                    bundle = _header(data, kind, where)
                elif kind == "record":
                    bundle.records.append(AuditRecord.from_json(data))
                elif kind == "checkpoint":
                    bundle.checkpoints.append(SignedCheckpoint.from_json(data))
                else:
                    raise InvalidArgument(f"unknown line type {kind!r}")
            except InvalidArgument as exc:
                raise InvalidArgument(f"{where}: {exc.message}") from None
    if bundle is None:
        raise InvalidArgument(
            f"{path}: empty file, not an audit bundle (export one with `fedgate audit export`)"
        )
    return bundle


def _header(data: dict[str, Any], kind: Any, where: str) -> Bundle:
    if kind != "header" or data.get("format") != BUNDLE_FORMAT:
        raise InvalidArgument(
            "not an audit bundle (no header line): export one with `fedgate audit export`"
        )
    if data.get("version") != BUNDLE_VERSION:
        raise InvalidArgument(
            f"audit bundle version {data.get('version')!r} is not supported (expected "
            f"{BUNDLE_VERSION}): export it again with this version of fedgate"
        )
    org, ca, cert = data.get("org"), data.get("ca_certificate"), data.get("gateway_certificate")
    if not isinstance(org, str) or not isinstance(ca, str) or not isinstance(cert, str):
        raise InvalidArgument("bundle header lacks org, ca_certificate or gateway_certificate")
    exported = data.get("exported_at_unix_ms")
    anchor = data.get("anchor")
    return Bundle(
        org=org,
        ca_pem=ca.encode("ascii"),
        gateway_cert_pem=cert.encode("ascii"),
        exported_at_unix_ms=exported if isinstance(exported, int) else 0,
        anchor=None if anchor is None else SignedCheckpoint.from_json(anchor),
    )


def verify_bundle(
    bundle: Bundle, verifier: Verifier | None, *, heads: Sequence[SignedCheckpoint] = ()
) -> VerifyReport:
    """Walk the bundle's chain and check its checkpoints (and any `heads` of the same org)."""
    report = verify_chain(
        bundle.records,
        org=bundle.org,
        verifier=verifier,
        anchor=bundle.anchor,
        checkpoints=[*bundle.checkpoints, *heads],
    )
    if not bundle.checkpoints:
        report.add(
            report.head_sequence,
            "the bundle holds no signed checkpoint, so nothing proves who wrote it: export it "
            "again with `fedgate audit export`",
        )
        report.problems.sort(key=lambda problem: problem.sequence)
    return report


# ---- reconciliation ----


@dataclass(frozen=True)
class Mismatch:
    """One disagreement between two organizations' logs."""

    task_id: str
    message: str


def received_digest(record: AuditRecord) -> str | None:
    """The digest of what arrived: digest_before, or digest_after when only that was recorded."""
    return record.digest_before if record.digest_before is not None else record.digest_after


def _first(records: list[AuditRecord], kind: str) -> AuditRecord | None:
    return next((record for record in records if record.kind == kind), None)


def _by_task(bundle: Bundle, peer: str) -> dict[str, list[AuditRecord]]:
    tasks: dict[str, list[AuditRecord]] = defaultdict(list)
    for record in bundle.records:
        if record.peer_org == peer:
            tasks[record.task_id].append(record)
    return tasks


def reconcile(ours: Bundle, theirs: Bundle, verifier: Verifier | None) -> list[Mismatch]:
    """Every mismatch between two organizations' logs, exchange by exchange."""
    mismatches: list[Mismatch] = []
    if ours.org == theirs.org:
        raise InvalidArgument(
            f"both bundles are of organization {ours.org!r}: reconcile ours against a partner's"
        )
    for bundle in (ours, theirs):
        report = verify_bundle(bundle, verifier)
        if not report.ok:
            problem = report.problems[0]
            mismatches.append(
                Mismatch(
                    "",
                    f"{bundle.org}'s log does not verify at record {problem.sequence}: "
                    f"{problem.message}",
                )
            )
    our_tasks = _by_task(ours, theirs.org)
    their_tasks = _by_task(theirs, ours.org)
    for task_id in sorted(our_tasks.keys() | their_tasks.keys()):
        a, b = our_tasks.get(task_id, []), their_tasks.get(task_id, [])
        for requester, req, responder, resp in ((ours, a, theirs, b), (theirs, b, ours, a)):
            mismatches += _exchange(task_id, requester.org, req, responder.org, resp, verifier)
    return mismatches


def _exchange(
    task_id: str,
    requester: str,
    req: list[AuditRecord],
    responder: str,
    resp: list[AuditRecord],
    verifier: Verifier | None,
) -> list[Mismatch]:
    found: list[Mismatch] = []

    def add(message: str) -> None:
        found.append(Mismatch(task_id, message))

    sent, received = _first(req, "request_sent"), _first(resp, "request_received")
    if sent is None and received is None:
        return found  # this task is not a request from `requester` to `responder`
    refused = _first(resp, "invoke_denied") or _first(resp, "rejected")
    if sent is not None and received is None and refused is None:
        add(
            f"{requester} sent the request (record {sent.sequence}) but {responder} has no "
            "record of receiving it"
        )
    if received is not None and sent is None:
        add(
            f"{responder} received a request from {requester} (record {received.sequence}) "
            f"that {requester} has no record of sending"
        )
    if sent is not None and received is not None and sent.digest_after != received_digest(received):
        add(
            f"request digests differ: {requester} sent {sent.digest_after} (record "
            f"{sent.sequence}), {responder} received {received_digest(received)} (record "
            f"{received.sequence})"
        )
    released, got = _first(resp, "result_released"), _first(req, "result_received")
    if released is not None and got is None:
        add(
            f"{responder} released a result (record {released.sequence}) that {requester} has "
            "no record of receiving"
        )
    if got is not None and released is None:
        add(
            f"{requester} received a result (record {got.sequence}) that {responder} has no "
            "record of releasing"
        )
    if released is not None and got is not None and released.digest_after != received_digest(got):
        add(
            f"result digests differ: {responder} released {released.digest_after} (record "
            f"{released.sequence}), {requester} received {received_digest(got)} (record "
            f"{got.sequence})"
        )
    if got is not None:
        problem = receipt_problem(got, responder, verifier)
        if problem:
            add(f"receipt kept by {requester} (record {got.sequence}) {problem}")
    return found


def receipt_problem(record: AuditRecord, responder: str, verifier: Verifier | None) -> str | None:
    """Why the receipt on a result record does not hold, or None if it does."""
    if record.receipt is None:
        return "is missing: no signed receipt of the responder was kept"
    try:
        receipt = SignedReceipt.from_json(record.receipt)
        if verifier is not None:
            verify_receipt(verifier, receipt, expected_org=responder)
    except FedgateError as exc:
        return f"is invalid: {exc.message}"
    if receipt.body.task_id != record.task_id:
        return f"is invalid: it is for task {receipt.body.task_id!r}, not {record.task_id!r}"
    expected = record.digest_after if record.kind == "result_released" else received_digest(record)
    if expected is not None and receipt.body.result_digest != expected:
        return (
            f"is invalid: it covers {receipt.body.result_digest} but the record's result is "
            f"{expected}"
        )
    return None
