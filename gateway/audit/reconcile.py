"""Reconciling two organizations' exported audit logs, exchange by exchange.

Reconciling matches two bundles exchange by exchange (task id): the requester's `request_sent`
against the responder's `request_received`, the responder's `result_released` against the
requester's `result_received`; it compares digests of what left with digests of what arrived
(never a pre-filter digest: those are keyed by a secret of their writer), checks the responder's
signed receipt and that both logs agree with it (decision, withheld paths, field actions, policy
version), and lists every request that no record closes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.audit.bundle import (
    SEALED_PAYLOAD,
    SEALED_PLAIN_DIGEST,
    Bundle,
    ChainStub,
    is_keyed,
    verify_bundle,
)
from gateway.audit.chain import AuditRecord
from gateway.errors import FedgateError, InvalidArgument
from gateway.identity.signing import SignedReceipt, Verifier, verify_receipt


@dataclass(frozen=True)
class Mismatch:
    """One disagreement between two organizations' logs."""

    task_id: str
    message: str


@dataclass(frozen=True)
class OpenRequest:
    """A request that no record of its log closes (no result, failure, cancel or retry)."""

    org: str
    task_id: str
    sequence: int
    kind: str
    peer_org: str


@dataclass
class Reconciliation:
    """What reconciling two logs found."""

    exchanges: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    open: list[OpenRequest] = field(default_factory=list)


def received_digest(record: AuditRecord) -> str | None:
    """The digest of what arrived, comparable with the sender's digest of what left.

    digest_before, or digest_after when only that was recorded or when digest_before is keyed
    (a keyed digest is its writer's alone: nobody else can compute it).
    """
    before = record.digest_before
    return before if before is not None and not is_keyed(before) else record.digest_after


def _first(records: list[AuditRecord], kind: str) -> AuditRecord | None:
    return next((record for record in records if record.kind == kind), None)


def _by_task(bundle: Bundle, peer: str) -> dict[str, list[AuditRecord]]:
    tasks: dict[str, list[AuditRecord]] = defaultdict(list)
    for record in bundle.records:
        if record.peer_org == peer:
            tasks[record.task_id].append(record)
    return tasks


def _sealed_by_task(bundle: Bundle) -> dict[str, list[ChainStub]]:
    tasks: dict[str, list[ChainStub]] = defaultdict(list)
    for stub in bundle.stubs:
        if stub.sealed:
            tasks[stub.task_id].append(stub)
    return tasks


def reconcile(ours: Bundle, theirs: Bundle, verifier: Verifier | None) -> Reconciliation:
    """Every mismatch between two organizations' logs, exchange by exchange, and what is open."""
    if ours.org == theirs.org:
        raise InvalidArgument(
            f"both bundles are of organization {ours.org!r}: reconcile ours against a partner's"
        )
    result = Reconciliation()
    mismatches = result.mismatches
    for bundle, other in ((ours, theirs), (theirs, ours)):
        if bundle.peer is not None and bundle.peer != other.org:
            mismatches.append(
                Mismatch(
                    "",
                    f"{bundle.org}'s bundle was exported for {bundle.peer}, so it holds none of "
                    f"{other.org}'s exchanges: ask for one exported with --peer {other.org}",
                )
            )
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
    sealed = {ours.org: _sealed_by_task(ours), theirs.org: _sealed_by_task(theirs)}
    superseded = superseded_requests(ours, theirs.org) | superseded_requests(theirs, ours.org)
    tasks = sorted(our_tasks.keys() | their_tasks.keys())
    result.exchanges = len(tasks)
    for task_id in tasks:
        a, b = our_tasks.get(task_id, []), their_tasks.get(task_id, [])
        for requester, req, responder, resp in ((ours, a, theirs, b), (theirs, b, ours, a)):
            hidden = [
                f"{org}'s record {stub.sequence} ({stub.kind}) is sealed in its bundle "
                f"({_SEALED_WHY.get(stub.sealed, stub.sealed)}), so it cannot be compared"
                for org in (requester.org, responder.org)
                for stub in sealed[org].get(task_id, [])
            ]
            found = _exchange(
                task_id,
                requester.org,
                req,
                responder.org,
                resp,
                verifier,
                superseded=(requester.org, task_id) in superseded,
            )
            if hidden and found:
                found = [Mismatch(task_id, message) for message in hidden] + found
            mismatches += found
    result.open = open_requests(ours, theirs.org) + open_requests(theirs, ours.org)
    return result


_SEALED_WHY = {
    SEALED_PAYLOAD: "it holds a payload before filtering",
    SEALED_PLAIN_DIGEST: "its pre-filter digest is a plain SHA-256; the exporter can re-export "
    "it with --include-plain-digests",
}


def _exchange(
    task_id: str,
    requester: str,
    req: list[AuditRecord],
    responder: str,
    resp: list[AuditRecord],
    verifier: Verifier | None,
    *,
    superseded: bool = False,
) -> list[Mismatch]:
    """The mismatches of one exchange; `superseded`: a later attempt with the same key carried
    the request on, so an attempt the responder never received is no mismatch."""
    found: list[Mismatch] = []

    def add(message: str) -> None:
        found.append(Mismatch(task_id, message))

    sent, received = _first(req, "request_sent"), _first(resp, "request_received")
    if sent is None and received is None:
        return found  # this task is not a request from `requester` to `responder`
    refused = _first(resp, "invoke_denied") or _first(resp, "rejected")
    if sent is not None and received is None and refused is None and not superseded:
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
    receipt: SignedReceipt | None = None
    if got is not None:
        problem = receipt_problem(got, responder, verifier)
        if problem:
            add(f"receipt kept by {requester} (record {got.sequence}) {problem}")
        else:
            receipt = _receipt(got)
    if (
        released is not None
        and got is not None
        and got.receipt is not None
        and _signature(released.receipt) != _signature(got.receipt)
    ):
        add(
            f"receipts differ: {requester} kept (record {got.sequence}) another receipt than "
            f"the one {responder} released (record {released.sequence})"
        )
    if receipt is not None:
        for record, side in ((got, requester), (released, responder)):
            if record is not None:
                found += [
                    Mismatch(task_id, f"{side}'s record {record.sequence} ({record.kind}) {m}")
                    for m in receipt_disagreements(record, receipt)
                ]
    return found


def _signature(receipt: dict[str, Any] | None) -> Any:
    """What identifies a signed receipt (a salt kept beside it may differ between the logs)."""
    return None if receipt is None else receipt.get("signature")


def _receipt(record: AuditRecord) -> SignedReceipt | None:
    try:
        return None if record.receipt is None else SignedReceipt.from_json(record.receipt)
    except FedgateError:
        return None


def receipt_disagreements(record: AuditRecord, receipt: SignedReceipt) -> list[str]:
    """How a result record differs from the signed receipt of its exchange.

    The receipt is what the responder signed it released: the paths it withheld, the fields it
    transformed and how, the policy version. Both sides' records must say the same; the
    responder's decision is `partial` exactly when the receipt names a withheld or transformed
    field.
    """
    body = receipt.body
    found = []
    if sorted(record.withheld_paths) != sorted(body.withheld_paths):
        found.append(
            f"says withheld {_paths(record.withheld_paths)}, the signed receipt "
            f"{_paths(body.withheld_paths)}"
        )
    if sorted(record.transformed) != sorted(body.field_actions):
        found.append(
            f"says transformed {_pairs(record.transformed)}, the signed receipt "
            f"{_pairs(body.field_actions)}"
        )
    if body.policy_version and (record.policy_version or "") != body.policy_version:
        found.append(
            f"names policy version {record.policy_version or '(none)'}, the signed receipt "
            f"{body.policy_version}"
        )
    if record.kind == "result_released":
        expected = "partial" if body.withheld_paths or body.field_actions else "allowed"
        if record.decision != expected:
            found.append(
                f"has decision {record.decision!r}, but the signed receipt makes it {expected!r}"
            )
    return found


def _paths(paths: Iterable[str]) -> str:
    listed = sorted(paths)
    return "[" + ", ".join(listed) + "]" if listed else "nothing"


def _pairs(pairs: Iterable[tuple[str, str]]) -> str:
    listed = sorted(pairs)
    return "[" + ", ".join(f"{p} ({a})" for p, a in listed) + "]" if listed else "nothing"


def receipt_problem(record: AuditRecord, responder: str, verifier: Verifier | None) -> str | None:
    """Why the receipt on a result record does not hold, or None if it does."""
    if record.receipt is None:
        return "is missing: no signed receipt of the responder was kept"
    try:
        receipt = SignedReceipt.from_json(record.receipt)
        if verifier is not None:
            # protocol: a stored receipt is checked at the time its record received it.
            verify_receipt(
                verifier, receipt, expected_org=responder, received_at_unix_ms=record.time_ms
            )
    except FedgateError as exc:
        return f"is invalid: {exc.message}"
    if receipt.body.task_id != record.task_id:
        return f"is invalid: it is for task {receipt.body.task_id!r}, not {record.task_id!r}"
    # A receipt that commits to its result with a salt (receipt v2) holds no plain digest to
    # compare with: its signature and the agreement of both logs with it are what is checked.
    covered = getattr(receipt.body, "result_digest", None)
    expected = record.digest_after if record.kind == "result_released" else received_digest(record)
    if covered and expected is not None and covered != expected:
        return f"is invalid: it covers {covered} but the record's result is {expected}"
    return None


# ---- what is open ----

CLOSING_KINDS = frozenset({"result_received", "failed", "canceled", "rejected"})
RESPONDER_CLOSING_KINDS = frozenset({"result_released", "failed", "canceled", "rejected"})
_TOKEN = re.compile(r"(?:^|\s)(idempotency_key|key|supersedes|superseded_by)=(\S+)")


def request_links(record: AuditRecord) -> dict[str, str]:
    """The idempotency key and superseded task a record names, where its writer recorded them.

    Read from record fields of those names when the record has them, else from `key=`,
    `idempotency_key=`, `supersedes=` and `superseded_by=` tokens of its detail.
    """
    links: dict[str, str] = {}
    for name, value in _TOKEN.findall(record.detail):
        links["idempotency_key" if name == "key" else name] = value
    for name in ("idempotency_key", "supersedes", "superseded_by"):
        value = getattr(record, name, None)
        if isinstance(value, str) and value:
            links[name] = value
    return links


def _walk_requests(
    bundle: Bundle, peer: str
) -> tuple[dict[tuple[str, str], AuditRecord], set[str]]:
    """Requests with `peer` left open, and the task ids of request_sent a later attempt
    superseded (see open_requests)."""
    opened: dict[tuple[str, str], AuditRecord] = {}
    superseded: set[str] = set()
    by_key: dict[str, str] = {}

    def supersede(task_id: str) -> None:
        superseded.add(task_id)
        opened.pop(("request_sent", task_id), None)

    for record in bundle.records:
        if record.peer_org != peer:
            continue
        links = request_links(record)
        if record.kind == "request_received":
            opened.setdefault((record.kind, record.task_id), record)
            continue
        if record.kind == "request_sent":
            opened.setdefault((record.kind, record.task_id), record)
            idempotency_key = links.get("idempotency_key")
            if idempotency_key:
                earlier = by_key.get(idempotency_key)
                if earlier is not None and earlier != record.task_id:
                    supersede(earlier)
                by_key[idempotency_key] = record.task_id
            if links.get("supersedes"):
                supersede(links["supersedes"])
            continue
        if links.get("superseded_by"):
            supersede(record.task_id)
        if record.direction == "outbound" and record.kind in CLOSING_KINDS:
            opened.pop(("request_sent", record.task_id), None)
        elif record.direction == "inbound" and record.kind in RESPONDER_CLOSING_KINDS:
            opened.pop(("request_received", record.task_id), None)
    return opened, superseded


def superseded_requests(bundle: Bundle, peer: str) -> set[tuple[str, str]]:
    """(org, task id) of every request_sent to `peer` that a later attempt carried on."""
    return {(bundle.org, task_id) for task_id in _walk_requests(bundle, peer)[1]}


def open_requests(bundle: Bundle, peer: str) -> list[OpenRequest]:
    """Every request with `peer` in the bundle that no record closes.

    A `request_sent` is closed by a later result_received, failed, canceled or rejected record
    of its task, or superseded by a later request_sent that carries the same idempotency key to
    the same peer (or that names it: supersedes=TASK, or a record of it superseded_by=TASK). A
    `request_received` is closed by the responder's result_released, failed, canceled or
    rejected record.
    """
    opened, _ = _walk_requests(bundle, peer)
    return [
        OpenRequest(bundle.org, record.task_id, record.sequence, record.kind, record.peer_org)
        for record in sorted(opened.values(), key=lambda r: r.sequence)
    ]
