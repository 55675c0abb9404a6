"""Receipts and checkpoints: what verifies, and each forgery refused with a clear message."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.errors import ConfigError, InvalidArgument, PermissionDenied, Unauthenticated
from gateway.identity.certs import (
    create_ca,
    issue_gateway_cert,
    load_cert,
    load_private_key,
    write_pair,
)
from gateway.identity.signing import (
    ECDSA_SHA256,
    ReceiptBody,
    SignedCheckpoint,
    SignedReceipt,
    Signer,
    Verifier,
    now_unix_ms,
    sign_checkpoint,
    sign_receipt,
    verify_checkpoint,
    verify_receipt,
)
from gateway.payload import digest

OUTPUT = {"diagnosis": "flu", "patient": {"age": 41}}


def _body(org: str = "beta", output: dict[str, object] = OUTPUT) -> ReceiptBody:
    return ReceiptBody(
        task_id="task-1",
        responder_org=org,
        result_digest=digest(output),
        withheld_paths=("patient.name",),
        field_actions=(("patient.zip", "masked"),),
        policy_version="sha256:policy",
    )


def test_receipt_signs_and_verifies(audit_pki) -> None:
    receipt = sign_receipt(audit_pki.signer("beta"), _body())
    assert receipt.body.signed_at_unix_ms > 0
    verify_receipt(audit_pki.verifier(), receipt, expected_org="beta", released_output=OUTPUT)


def test_receipt_json_round_trip(audit_pki) -> None:
    receipt = sign_receipt(audit_pki.signer("beta"), _body())
    again = SignedReceipt.from_json(receipt.to_json())
    assert again == receipt
    verify_receipt(audit_pki.verifier(), again, expected_org="beta", released_output=OUTPUT)


def test_receipt_of_another_org_is_refused(audit_pki) -> None:
    receipt = sign_receipt(audit_pki.signer("alpha"), _body("alpha"))
    with pytest.raises(PermissionDenied, match="names responder 'alpha', expected 'beta'"):
        verify_receipt(audit_pki.verifier(), receipt, expected_org="beta")


def test_receipt_naming_beta_but_signed_by_alpha_is_refused(audit_pki) -> None:
    alpha = audit_pki.signer("alpha")
    body = dataclasses.replace(_body("beta"), signed_at_unix_ms=now_unix_ms())
    forged = SignedReceipt(body, alpha.cert_der, alpha.sign(body.signed_bytes()))
    with pytest.raises(PermissionDenied, match="signed by organization 'alpha', expected 'beta'"):
        verify_receipt(audit_pki.verifier(), forged, expected_org="beta")


def test_receipt_from_rogue_ca_is_refused(audit_pki) -> None:
    rogue = Signer.from_files(audit_pki.directory / "rogue.crt", audit_pki.directory / "rogue.key")
    receipt = sign_receipt(rogue, _body())
    with pytest.raises(Unauthenticated, match="not issued by the federation CA"):
        verify_receipt(audit_pki.verifier(), receipt, expected_org="beta")


def test_modified_receipt_body_is_refused(audit_pki) -> None:
    receipt = sign_receipt(audit_pki.signer("beta"), _body())
    changed = dataclasses.replace(
        receipt, body=dataclasses.replace(receipt.body, withheld_paths=())
    )
    with pytest.raises(Unauthenticated, match="does not verify: the signed content was changed"):
        verify_receipt(audit_pki.verifier(), changed, expected_org="beta")


def test_wrong_output_digest_is_refused(audit_pki) -> None:
    receipt = sign_receipt(audit_pki.signer("beta"), _body())
    with pytest.raises(Unauthenticated, match="result was changed after the responder released"):
        verify_receipt(
            audit_pki.verifier(),
            receipt,
            expected_org="beta",
            released_output={**OUTPUT, "diagnosis": "cold"},
        )


def test_signer_refuses_to_sign_as_another_org(audit_pki) -> None:
    with pytest.raises(PermissionDenied, match="signs as 'alpha'"):
        sign_receipt(audit_pki.signer("alpha"), _body("beta"))


def test_expired_certificate_is_refused(tmp_path: Path, audit_pki) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    write_pair(
        issue_gateway_cert(audit_pki.ca, "beta", days=1, not_before=old),
        tmp_path / "old.crt",
        tmp_path / "old.key",
    )
    signer = Signer.from_files(tmp_path / "old.crt", tmp_path / "old.key")
    receipt = sign_receipt(signer, _body())  # signed now, after the certificate expired
    with pytest.raises(Unauthenticated, match="was not valid at"):
        verify_receipt(audit_pki.verifier(), receipt, expected_org="beta")


def test_signature_made_while_valid_still_verifies_later(tmp_path: Path, audit_pki) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    write_pair(
        issue_gateway_cert(audit_pki.ca, "beta", days=1, not_before=start),
        tmp_path / "old.crt",
        tmp_path / "old.key",
    )
    signer = Signer.from_files(tmp_path / "old.crt", tmp_path / "old.key")
    signed_then = int((start + dt.timedelta(hours=1)).timestamp() * 1000)
    receipt = sign_receipt(signer, dataclasses.replace(_body(), signed_at_unix_ms=signed_then))
    verify_receipt(audit_pki.verifier(), receipt, expected_org="beta")


def test_malformed_receipt_json_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match=r"receipt: field .* is missing"):
        SignedReceipt.from_json({"responder_org": "beta"})
    with pytest.raises(InvalidArgument, match="must be a JSON object"):
        SignedReceipt.from_json([1, 2])


def test_garbage_certificate_is_refused(audit_pki) -> None:
    receipt = sign_receipt(audit_pki.signer("beta"), _body())
    broken = dataclasses.replace(receipt, signer_certificate=b"not a certificate")
    with pytest.raises(Unauthenticated, match="not a valid DER certificate"):
        verify_receipt(audit_pki.verifier(), broken, expected_org="beta")


def test_checkpoint_signs_and_verifies(audit_pki) -> None:
    checkpoint = sign_checkpoint(audit_pki.signer("alpha"), 42, "ab" * 32)
    assert checkpoint.org == "alpha"
    verify_checkpoint(audit_pki.verifier(), checkpoint)
    assert SignedCheckpoint.from_json(checkpoint.to_json()) == checkpoint


def test_checkpoint_with_changed_head_is_refused(audit_pki) -> None:
    checkpoint = sign_checkpoint(audit_pki.signer("alpha"), 42, "ab" * 32)
    with pytest.raises(Unauthenticated, match="does not verify"):
        verify_checkpoint(audit_pki.verifier(), dataclasses.replace(checkpoint, sequence=41))


def test_checkpoint_claiming_another_org_is_refused(audit_pki) -> None:
    checkpoint = sign_checkpoint(audit_pki.signer("alpha"), 42, "ab" * 32)
    with pytest.raises(PermissionDenied, match="signed by organization 'alpha', expected 'beta'"):
        verify_checkpoint(audit_pki.verifier(), dataclasses.replace(checkpoint, org="beta"))


def test_checkpoint_from_rogue_ca_is_refused(audit_pki) -> None:
    rogue = Signer.from_files(audit_pki.directory / "rogue.crt", audit_pki.directory / "rogue.key")
    with pytest.raises(Unauthenticated, match="not issued by the federation CA"):
        verify_checkpoint(audit_pki.verifier(), sign_checkpoint(rogue, 1, "00" * 32))


def test_receipt_signature_cannot_pass_as_checkpoint_signature(audit_pki) -> None:
    """The signed bytes carry a type tag, so one kind of signature never verifies as the other."""
    signer = audit_pki.signer("alpha")
    checkpoint = sign_checkpoint(signer, 1, "00" * 32)
    body = ReceiptBody("t", "alpha", "sha256:x", signed_at_unix_ms=checkpoint.signed_at_unix_ms)
    assert body.signed_bytes() != checkpoint.signed_bytes()


def test_ca_rotation_file_with_two_cas(tmp_path: Path, audit_pki) -> None:
    other = create_ca("Next CA")
    (tmp_path / "both.crt").write_bytes(other.cert_pem + audit_pki.ca.cert_pem)
    receipt = sign_receipt(audit_pki.signer("beta"), _body())
    verify_receipt(Verifier.from_file(tmp_path / "both.crt"), receipt, expected_org="beta")


def test_signer_with_mismatched_key_is_a_config_error(audit_pki) -> None:
    cert, _ = audit_pki.paths("alpha")
    _, other_key = audit_pki.paths("beta")
    with pytest.raises(ConfigError, match="does not belong to the gateway certificate"):
        Signer.from_files(cert, other_key)


def test_missing_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the federation CA"):
        Verifier.from_file(tmp_path / "nope.crt")
    with pytest.raises(ConfigError, match="cannot read the gateway certificate"):
        Signer.from_files(tmp_path / "nope.crt", tmp_path / "nope.key")


# -- what the verifier remembers, and what it checks on every call ----------------------------


def test_ca_rotation_drops_remembered_trust_at_once(audit_pki) -> None:
    """A certificate that verified before a rotation away from its CA is refused right after."""
    verifier = audit_pki.verifier()
    receipt = sign_receipt(audit_pki.signer("beta"), _body())
    verify_receipt(verifier, receipt, expected_org="beta")
    rogue_ca = load_cert((audit_pki.directory / "rogue-ca.crt").read_bytes())
    verifier.trust([rogue_ca])
    with pytest.raises(Unauthenticated, match="not issued by the federation CA"):
        verify_receipt(verifier, receipt, expected_org="beta")
    verifier.trust([load_cert(audit_pki.ca.cert_pem)])
    verify_receipt(verifier, receipt, expected_org="beta")


def test_rotation_to_a_new_ca_trusts_its_certificates_at_once(tmp_path: Path, audit_pki) -> None:
    new_ca = create_ca("Next CA")
    write_pair(issue_gateway_cert(new_ca, "beta"), tmp_path / "b.crt", tmp_path / "b.key")
    receipt = sign_receipt(Signer.from_files(tmp_path / "b.crt", tmp_path / "b.key"), _body())
    verifier = audit_pki.verifier()
    with pytest.raises(Unauthenticated, match="not issued by the federation CA"):
        verify_receipt(verifier, receipt, expected_org="beta")
    verifier.trust([load_cert(audit_pki.ca.cert_pem), load_cert(new_ca.cert_pem)])
    verify_receipt(verifier, receipt, expected_org="beta")


def test_validity_of_a_remembered_certificate_is_checked_on_every_call(
    tmp_path: Path, audit_pki
) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    write_pair(
        issue_gateway_cert(audit_pki.ca, "beta", days=1, not_before=start),
        tmp_path / "short.crt",
        tmp_path / "short.key",
    )
    signer = Signer.from_files(tmp_path / "short.crt", tmp_path / "short.key")
    verifier = audit_pki.verifier()
    data = b"checked every time"
    signature = signer.sign(data)
    verifier.verify(data, signature, signer.cert_der, "beta")
    for late in (start + dt.timedelta(days=2), start - dt.timedelta(minutes=1)):
        with pytest.raises(Unauthenticated, match="was not valid at"):
            verifier.verify(data, signature, signer.cert_der, "beta", at=late)
    verifier.verify(data, signature, signer.cert_der, "beta")


def test_remembered_certificate_still_refuses_other_orgs_and_bad_signatures(audit_pki) -> None:
    verifier = audit_pki.verifier()
    beta = audit_pki.signer("beta")
    data = b"signed by beta"
    verifier.verify(data, beta.sign(data), beta.cert_der, "beta")
    for _ in range(2):
        with pytest.raises(PermissionDenied, match="signed by organization 'beta', expected 'a"):
            verifier.verify(data, beta.sign(data), beta.cert_der, "alpha")
        with pytest.raises(Unauthenticated, match="does not verify"):
            verifier.verify(b"changed", beta.sign(data), beta.cert_der, "beta")


def test_ca_certificate_cannot_sign_as_a_gateway(audit_pki) -> None:
    ca_cert = load_cert(audit_pki.ca.cert_pem)
    ca_key = load_private_key(audit_pki.ca.key_pem)
    data = b"signed by the CA key"
    der = ca_cert.public_bytes(serialization.Encoding.DER)
    for _ in range(2):
        with pytest.raises(Unauthenticated, match="is a CA certificate, not a gateway's"):
            audit_pki.verifier().verify(data, ca_key.sign(data, ECDSA_SHA256), der, "beta")
