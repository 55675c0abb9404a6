"""Receipts on the wire: version 2 fields, the salt beside the receipt (never in provenance), and
version 1 receipts (result_digest, bytes holding ASCII text) still readable."""

from __future__ import annotations

import pytest
from fedgate.convert import receipt_json
from fedgate.v1 import fedgate_pb2 as pb

from gateway.edges.wire import receipt_to_pb, result_from_pb, result_to_pb
from gateway.errors import InvalidArgument
from gateway.exchange.tasks import TaskResult, TaskState
from gateway.identity.signing import (
    ReceiptBody,
    SignedReceipt,
    sign_receipt,
    sign_result,
    verify_provenance_receipt,
    verify_receipt,
)
from gateway.payload import CANONICAL_V1, digest

OUTPUT = {"diagnosis": "flu", "score": 0.25}


def _result(receipt: SignedReceipt, provenance: tuple[dict[str, object], ...] = ()) -> TaskResult:
    return TaskResult(
        "task-1",
        TaskState.COMPLETED,
        output=OUTPUT,
        receipt=receipt.to_json(),
        responder_org="beta",
        provenance=provenance,
    )


def test_v2_receipt_crosses_the_wire_with_its_salt_beside_it(audit_pki) -> None:
    receipt = sign_result(
        audit_pki.signer("beta"),
        task_id="task-1",
        output=OUTPUT,
        state="input-required",
        turn=3,
        chain_sequence=12,
        chain_head="cd" * 32,
    )
    message = result_to_pb(_result(receipt))
    assert message.receipt_salt == receipt.salt
    assert message.receipt.version == 2
    assert (message.receipt.turn, message.receipt.chain_sequence) == (3, 12)
    assert message.receipt.state == pb.TASK_STATE_INPUT_REQUIRED
    assert message.receipt.result_digest == b""
    assert receipt.salt not in message.receipt.SerializeToString()
    received = result_from_pb(pb.TaskResult.FromString(message.SerializeToString()))
    assert received.receipt == receipt.to_json()
    again = SignedReceipt.from_json(received.receipt)
    verify_receipt(
        audit_pki.verifier(),
        again,
        expected_org="beta",
        released_output=received.output,
        task_id="task-1",
        turn=3,
        state="input-required",
    )


def test_provenance_never_carries_a_salt_even_if_handed_one(audit_pki) -> None:
    """The Receipt message has no salt field: a sub-task's salt cannot leave as provenance."""
    sub = sign_result(audit_pki.signer("alpha"), task_id="sub-1", output={"secret": "x"})
    parent = sign_result(audit_pki.signer("beta"), task_id="task-1", output=OUTPUT)
    message = result_to_pb(_result(parent, provenance=(sub.to_json(),)))
    assert sub.salt not in message.SerializeToString()
    received = result_from_pb(pb.TaskResult.FromString(message.SerializeToString()))
    (passed_on,) = received.provenance
    assert "salt" not in passed_on
    verify_provenance_receipt(audit_pki.verifier(), SignedReceipt.from_json(passed_on))


def test_v1_receipt_keeps_its_ascii_digest_in_bytes(audit_pki) -> None:
    body = ReceiptBody("task-1", "beta", digest(OUTPUT, CANONICAL_V1), ("a.b",))
    receipt = sign_receipt(audit_pki.signer("beta"), body)
    message = receipt_to_pb(receipt.to_json())
    assert message.version == 0 and message.result_digest == body.result_digest.encode("ascii")
    assert message.result_commitment == "" and message.chain_head == ""
    assert receipt_json(message) == receipt.to_json()
    verify_receipt(
        audit_pki.verifier(),
        SignedReceipt.from_json(receipt_json(message)),
        expected_org="beta",
        released_output=OUTPUT,
    )


def test_a_receipt_version_we_do_not_know_is_refused_by_name(audit_pki) -> None:
    message = receipt_to_pb(sign_result(audit_pki.signer("beta"), task_id="t", output={}).to_json())
    message.version = 3
    with pytest.raises(InvalidArgument, match="'fedgate/receipt/v3' is unknown"):
        SignedReceipt.from_json(receipt_json(message))
