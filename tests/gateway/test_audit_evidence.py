"""Evidence of a partner's log (gateway.audit.evidence): the signed chain positions a partner
holds, read from checkpoints, receipts and delegation statements, and a log checked against them.

Records carry the counterpart's signed position in their `evidence` field once the core writes
it; these tests build such records themselves.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.chain import GENESIS_HASH, AuditEvent, AuditRecord, VerifyReport, chain_events
from gateway.audit.evidence import (
    Evidence,
    SignedPosition,
    check_positions,
    collect_positions,
    from_checkpoint,
    from_receipt,
    from_statement,
    positions_of_record,
    read_evidence,
    verify_position,
    write_evidence,
)
from gateway.errors import FedgateError
from gateway.identity import delegation
from gateway.identity.signing import ReceiptBody, Signer, sign_checkpoint, sign_receipt


@dataclasses.dataclass(frozen=True)
class RecordWithEvidence(AuditRecord):
    """An audit record with the `evidence` field the core adds (decision 3 of the brief)."""

    evidence: Any = None


def _statement(signer: Signer, *, audience: str, task_id: str, **claims: Any) -> str:
    """A delegation statement as the requesting gateway signs it, with extra claims."""
    now = int(time.time())
    payload = {
        "iss": signer.org,
        "aud": audience,
        "sub": "nurse",
        "roles": [],
        "purpose": "",
        "task_id": task_id,
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + 300,
        **claims,
    }
    return delegation._sign_jws(signer, delegation._header_segment(signer.cert_der), payload)


def _records(count: int, org_peer: str = "alpha") -> list[AuditRecord]:
    events = [AuditEvent("request_received", f"t-{i}", org_peer) for i in range(count)]
    return chain_events(events, 0, GENESIS_HASH, 1_700_000_000_000)


def _with_evidence(record: AuditRecord, evidence: dict[str, Any]) -> AuditRecord:
    """The record with `evidence` ({"checkpoint": …} or {"delegation": JWS}), in the record's
    own field once chain.py has it, else in the test's subclass."""
    if "evidence" in {f.name for f in dataclasses.fields(AuditRecord)}:
        return dataclasses.replace(record, evidence=evidence)  # type: ignore[call-arg]
    values = {f.name: getattr(record, f.name) for f in dataclasses.fields(AuditRecord)}
    return RecordWithEvidence(**values, evidence=evidence)


def _walked(records: list[AuditRecord]) -> VerifyReport:
    report = VerifyReport(records=len(records), first_sequence=1)
    report.head_sequence, report.head_hash = records[-1].sequence, records[-1].record_hash
    return report


def test_a_delegation_statement_with_the_requesters_position_names_a_cut(audit_pki) -> None:
    alpha = audit_pki.signer("alpha")
    alphas_log = _records(6)
    head = alphas_log[5]
    token = _statement(alpha, audience="beta", task_id="t-9", chs=6, chh=head.record_hash)
    # beta's record of the request keeps alpha's statement as its evidence
    betas_record = _with_evidence(_records(1)[0], {"delegation": token})
    positions = positions_of_record(betas_record)
    assert [(p.source, p.org, p.sequence, p.task_id) for p in positions] == [
        ("delegation", "alpha", 6, "t-9")
    ]
    verify_position(positions[0], audit_pki.verifier(), holder="beta")
    # alpha's log was cut after record 4
    report = _walked(alphas_log[:4])
    hashes = {r.sequence: r.record_hash for r in alphas_log[:4]}
    assert check_positions(report, positions, hashes.get, holder="beta") == 1
    assert positions[0].describe().startswith("a delegation statement (task t-9, ")
    assert [p.message for p in report.problems] == [
        f"records 5-6 are missing: beta holds {positions[0].describe()} signed at sequence 6 "
        f"with head {head.record_hash}"
    ]


def test_statements_and_receipts_without_a_position_hold_none(audit_pki) -> None:
    alpha = audit_pki.signer("alpha")
    assert from_statement(_statement(alpha, audience="beta", task_id="t")) is None
    assert from_statement("not.a.jws") is None
    v1 = sign_receipt(alpha, ReceiptBody("t", "alpha", "sha256:" + "0" * 64)).to_json()
    assert from_receipt(v1) is None  # a v1 receipt signs no chain position
    bad_head = _statement(alpha, audience="beta", task_id="t", chs=3, chh="nothex")
    assert from_statement(bad_head) is None


@pytest.mark.skipif(
    "chain_sequence" not in {f.name for f in dataclasses.fields(ReceiptBody)},
    reason="receipt v2 (chain_sequence, chain_head in the signed body) is not in signing.py yet",
)
def test_a_v2_receipt_carries_the_responders_position(audit_pki) -> None:
    alpha = audit_pki.signer("alpha")
    log = _records(3)
    body = ReceiptBody(  # type: ignore[call-arg]
        "t-1",
        "alpha",
        version=2,
        result_commitment="hmac-sha256:" + "0" * 64,
        chain_sequence=3,
        chain_head=log[2].record_hash,
    )
    position = from_receipt(sign_receipt(alpha, body).to_json(), record=7)
    assert position is not None and (position.sequence, position.record) == (3, 7)
    verify_position(position, audit_pki.verifier(), holder="beta")


def test_a_position_is_used_only_if_its_signer_made_it(audit_pki) -> None:
    alpha, beta = audit_pki.signer("alpha"), audit_pki.signer("beta")
    verifier = audit_pki.verifier()
    log = _records(8)
    # to gamma, not to beta: beta cannot hold it up as a statement it received
    elsewhere = from_statement(
        _statement(alpha, audience="gamma", task_id="t", chs=8, chh=log[7].record_hash)
    )
    assert elsewhere is not None
    with pytest.raises(FedgateError, match="addressed to 'gamma'"):
        verify_position(elsewhere, verifier, holder="beta")
    # a checkpoint whose sequence was raised after signing
    signed = sign_checkpoint(alpha, 5, log[4].record_hash)
    raised = dataclasses.replace(signed, sequence=8)
    with pytest.raises(FedgateError):
        verify_position(from_checkpoint(raised), verifier, holder="beta")
    # beta's own statement claiming to be a position of alpha's log is not alpha's
    impostor = from_statement(
        _statement(beta, audience="beta", task_id="t", chs=8, chh=log[7].record_hash)
    )
    assert impostor is not None and impostor.org == "beta"
    positions = collect_positions(
        [raised, signed],
        [
            _with_evidence(record, {"delegation": position.material})
            for record, position in zip(_records(2), (elsewhere, impostor), strict=True)
        ],
        verifier,
        org="alpha",
        holder="beta",
    )
    assert [(p.source, p.sequence) for p in positions] == [("checkpoint", 5)]


def test_the_highest_position_counts_even_after_the_signer_rewound(audit_pki) -> None:
    """A partner that cut its log signs lower positions afterwards: the earlier, higher one
    is the evidence."""
    alpha = audit_pki.signer("alpha")
    log = _records(9)
    high = _statement(alpha, audience="beta", task_id="a", chs=9, chh=log[8].record_hash)
    low = _statement(alpha, audience="beta", task_id="b", chs=4, chh=log[3].record_hash)
    ours = _records(2)
    records = [
        _with_evidence(ours[0], {"delegation": high}),
        _with_evidence(ours[1], {"delegation": low}),
    ]
    kept = [sign_checkpoint(alpha, 2, log[1].record_hash)]
    positions = collect_positions(
        kept,
        records,
        audit_pki.verifier(),
        org="alpha",
        holder="beta",
    )
    assert [(p.source, p.sequence, p.record) for p in positions] == [
        ("checkpoint", 2, 0),
        ("delegation", 9, 1),
    ]


def test_a_rewritten_record_and_positions_before_the_retention_cut(audit_pki) -> None:
    alpha = audit_pki.signer("alpha")
    log = _records(6)
    position = from_checkpoint(sign_checkpoint(alpha, 5, "ab" * 32))
    old = from_checkpoint(sign_checkpoint(alpha, 1, "cd" * 32))
    report = _walked(log)
    report.first_sequence = 3  # records 1..2 pruned: position 1 is checked against the archive
    hashes = {r.sequence: r.record_hash for r in log}
    assert check_positions(report, [position, position, old], hashes.get, holder="beta") == 2
    assert len(report.problems) == 1
    assert report.problems[0].message.startswith(
        "record 5 does not match what beta holds: a checkpoint ("
    )
    assert report.problems[0].message.endswith(
        f"but record 5 hashes to {log[4].record_hash}: the log was rewritten"
    )


def test_evidence_file_round_trip_trusts_only_the_signed_material(
    audit_pki, tmp_path: Path
) -> None:
    alpha = audit_pki.signer("alpha")
    log = _records(3)
    token = _statement(alpha, audience="beta", task_id="t-2", chs=3, chh=log[2].record_hash)
    positions: list[SignedPosition] = [
        from_checkpoint(sign_checkpoint(alpha, 2, log[1].record_hash), record=0),
    ]
    statement = from_statement(token, record=11)
    assert statement is not None
    positions.append(statement)
    out = io.StringIO()
    assert write_evidence(out, Evidence("beta", "alpha", 1, positions)) == 2
    data = json.loads(out.getvalue())
    data["positions"][1]["sequence"] = 99  # a convenience field, not what counts
    path = tmp_path / "evidence.json"
    path.write_text(json.dumps(data))
    read = read_evidence(path)
    assert (read.holder, read.about) == ("beta", "alpha")
    assert [(p.source, p.sequence, p.record) for p in read.positions] == [
        ("checkpoint", 2, 0),
        ("delegation", 3, 11),
    ]
    data["positions"][0]["material"] = {"nothing": True}
    path.write_text(json.dumps(data))
    with pytest.raises(FedgateError, match="evidence position 1 holds no readable"):
        read_evidence(path)
    path.write_text("[]")
    with pytest.raises(FedgateError, match="not an evidence file"):
        read_evidence(path)
