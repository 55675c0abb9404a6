"""Offline checks of stored signatures use the time they were received, not today: a receipt or
checkpoint signed while its certificate was valid still verifies after the certificate expired.

(Online checks use the time of receipt, which is now; see tests/gateway/test_signing.py.)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from gateway.audit.chain import GENESIS_HASH, AuditEvent, chain_events, normalize_event
from gateway.audit.evidence import SignedPosition, verify_position
from gateway.audit.reconcile import receipt_problem
from gateway.identity.certs import issue_gateway_cert, write_pair
from gateway.identity.signing import Signer, sign_checkpoint, sign_result

HEAD = "ab" * 32


def _expired_signer(tmp_path: Path, audit_pki) -> tuple[Signer, int]:
    """A certificate of 'beta' valid for one day, two days ago; and a time inside that day."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    write_pair(
        issue_gateway_cert(audit_pki.ca, "beta", days=1, not_before=start),
        tmp_path / "old.crt",
        tmp_path / "old.key",
    )
    return Signer.from_files(tmp_path / "old.crt", tmp_path / "old.key"), int(
        (start + dt.timedelta(hours=1)).timestamp() * 1000
    )


def test_reconcile_checks_a_stored_receipt_at_the_time_of_its_record(
    tmp_path: Path, audit_pki
) -> None:
    signer, then = _expired_signer(tmp_path, audit_pki)
    receipt = sign_result(
        signer,
        task_id="t-1",
        output={"a": 1},
        chain_sequence=3,
        chain_head=HEAD,
        signed_at_unix_ms=then,
    )
    event = AuditEvent(
        kind="result_received",
        task_id="t-1",
        peer_org="beta",
        direction="outbound",
        decision="allowed",
        status="completed",
        digest_after="sha256:" + "00" * 32,
        receipt=receipt.to_json(),
    )
    (record,) = chain_events([normalize_event(event)], 0, GENESIS_HASH, then + 50)
    assert receipt_problem(record, "beta", audit_pki.verifier()) is None
    late = dataclasses.replace(record, time_ms=then + 3 * 86_400_000)  # received after expiry
    assert "was not valid at" in (receipt_problem(late, "beta", audit_pki.verifier()) or "")


def test_evidence_positions_are_checked_at_their_signing_time(tmp_path: Path, audit_pki) -> None:
    signer, then = _expired_signer(tmp_path, audit_pki)
    checkpoint = sign_checkpoint(signer, 3, HEAD, signed_at_unix_ms=then)
    receipt = sign_result(
        signer, task_id="t-1", output={}, chain_sequence=3, chain_head=HEAD, signed_at_unix_ms=then
    )
    for position in (
        SignedPosition("checkpoint", "beta", 3, HEAD, then, checkpoint.to_json()),
        SignedPosition("receipt", "beta", 3, HEAD, then, receipt.provenance_json(), task_id="t-1"),
    ):
        verify_position(position, audit_pki.verifier(), holder="alpha")
