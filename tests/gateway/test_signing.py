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
    EMPTY_CHAIN_HEAD,
    SALT_BYTES,
    ReceiptBody,
    SignedCheckpoint,
    SignedReceipt,
    Signer,
    Verifier,
    commit_result,
    now_unix_ms,
    sign_checkpoint,
    sign_receipt,
    sign_result,
    verify_checkpoint,
    verify_provenance_receipt,
    verify_receipt,
    without_salt,
)
from gateway.payload import CANONICAL_V1, canonical_bytes, digest

OUTPUT = {"diagnosis": "flu", "patient": {"age": 41}}


def _body(org: str = "beta", output: dict[str, object] = OUTPUT) -> ReceiptBody:
    return ReceiptBody(
        task_id="task-1",
        responder_org=org,
        result_digest=digest(output, CANONICAL_V1),
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


def test_signature_received_while_valid_still_verifies_later_offline(
    tmp_path: Path, audit_pki
) -> None:
    """A stored receipt is checked at the time it was received (the record's time), not now."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    write_pair(
        issue_gateway_cert(audit_pki.ca, "beta", days=1, not_before=start),
        tmp_path / "old.crt",
        tmp_path / "old.key",
    )
    signer = Signer.from_files(tmp_path / "old.crt", tmp_path / "old.key")
    signed_then = int((start + dt.timedelta(hours=1)).timestamp() * 1000)
    receipt = sign_receipt(signer, dataclasses.replace(_body(), signed_at_unix_ms=signed_then))
    verify_receipt(
        audit_pki.verifier(),
        receipt,
        expected_org="beta",
        received_at_unix_ms=signed_then + 1000,
    )
    with pytest.raises(Unauthenticated, match="was not valid at"):
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


# -- receipt version 2: salted commitment, state, turn, chain position ---------------------------

HEAD = "ab" * 32


def _v2(signer: Signer, output: dict[str, object] = OUTPUT, **overrides: object) -> SignedReceipt:
    fields: dict[str, object] = {
        "task_id": "task-1",
        "output": output,
        "withheld_paths": ("patient.name",),
        "field_actions": (("patient.zip", "masked"),),
        "policy_version": "sha256:policy",
        "chain_sequence": 7,
        "chain_head": HEAD,
    }
    fields.update(overrides)
    return sign_result(signer, **fields)  # type: ignore[arg-type]


def test_v2_receipt_signs_and_verifies_with_its_salt(audit_pki) -> None:
    receipt = _v2(audit_pki.signer("beta"))
    body = receipt.body
    assert (body.version, body.canonical, body.state, body.turn) == (2, 2, "completed", 0)
    assert (body.chain_sequence, body.chain_head, body.result_digest) == (7, HEAD, "")
    assert len(receipt.salt) == SALT_BYTES
    assert body.result_commitment == commit_result(receipt.salt, OUTPUT)
    verify_receipt(
        audit_pki.verifier(),
        receipt,
        expected_org="beta",
        released_output=OUTPUT,
        task_id="task-1",
        turn=0,
        state="completed",
    )


def test_v2_salt_is_fresh_per_receipt_and_not_signed(audit_pki) -> None:
    signer = audit_pki.signer("beta")
    first, second = _v2(signer), _v2(signer)
    assert first.salt != second.salt
    assert first.body.result_commitment != second.body.result_commitment
    assert first.salt not in first.body.signed_bytes()
    assert first.salt.hex() not in first.body.signed_bytes().decode()


def test_v2_commitment_is_no_dictionary_oracle(audit_pki) -> None:
    """Issue 11 #2: the plain digest of a guessed output no longer matches anything signed."""
    receipt = _v2(audit_pki.signer("beta"), {"hiv": "negative"})
    signed = receipt.body.signed_bytes().decode()
    for guess in ({"hiv": "negative"}, {"hiv": "positive"}):
        assert digest(guess) not in signed
        assert digest(guess, CANONICAL_V1) not in signed
    assert "negative" not in signed


def test_v2_json_round_trip_keeps_the_salt_beside_the_signed_fields(audit_pki) -> None:
    receipt = _v2(audit_pki.signer("beta"))
    data = receipt.to_json()
    assert data["type"] == "fedgate/receipt/v2" and "salt" in data
    again = SignedReceipt.from_json(data)
    assert again == receipt
    verify_receipt(audit_pki.verifier(), again, expected_org="beta", released_output=OUTPUT)


def test_provenance_form_has_no_salt_and_cannot_prove_content(audit_pki) -> None:
    receipt = _v2(audit_pki.signer("beta"))
    for form in (receipt.provenance_json(), without_salt(receipt.to_json())):
        assert "salt" not in form
        passed_on = SignedReceipt.from_json(form)
        verify_provenance_receipt(audit_pki.verifier(), passed_on)
        verify_receipt(audit_pki.verifier(), passed_on, expected_org="beta")  # signer, no content
        with pytest.raises(Unauthenticated, match="came without its 32-byte salt"):
            verify_receipt(
                audit_pki.verifier(), passed_on, expected_org="beta", released_output=OUTPUT
            )


def test_v2_changed_output_is_refused(audit_pki) -> None:
    receipt = _v2(audit_pki.signer("beta"))
    with pytest.raises(Unauthenticated, match="commits to another result"):
        verify_receipt(
            audit_pki.verifier(),
            receipt,
            expected_org="beta",
            released_output={**OUTPUT, "diagnosis": "cold"},
        )
    with pytest.raises(Unauthenticated, match="commits to another result"):
        verify_receipt(
            audit_pki.verifier(),
            receipt,
            expected_org="beta",
            released_output=OUTPUT,
            salt=bytes(SALT_BYTES),
        )


@pytest.mark.parametrize(
    "change",
    [
        {"result_commitment": "hmac-sha256:" + "00" * 32},
        {"state": "input-required"},
        {"turn": 1},
        {"chain_sequence": 6},
        {"chain_head": EMPTY_CHAIN_HEAD},
        {"canonical": 1},
        {"withheld_paths": ()},
    ],
)
def test_v2_every_signed_field_is_covered(audit_pki, change: dict[str, object]) -> None:
    receipt = _v2(audit_pki.signer("beta"))
    changed = dataclasses.replace(receipt, body=dataclasses.replace(receipt.body, **change))
    with pytest.raises(Unauthenticated, match="does not verify"):
        verify_receipt(audit_pki.verifier(), changed, expected_org="beta")


def test_receipt_of_another_task_is_refused(audit_pki) -> None:
    """Issue 11 (online receipt checks): the receipt's task id must be the task's."""
    receipt = _v2(audit_pki.signer("beta"))
    with pytest.raises(Unauthenticated, match="is for task 'task-1', not for task 'task-2'"):
        verify_receipt(audit_pki.verifier(), receipt, expected_org="beta", task_id="task-2")
    v1 = sign_receipt(audit_pki.signer("beta"), _body())
    with pytest.raises(Unauthenticated, match="not for task 'task-2'"):
        verify_receipt(audit_pki.verifier(), v1, expected_org="beta", task_id="task-2")


def test_receipt_of_another_turn_or_state_is_refused(audit_pki) -> None:
    receipt = _v2(audit_pki.signer("beta"), turn=2, state="input-required")
    verify_receipt(
        audit_pki.verifier(), receipt, expected_org="beta", turn=2, state="input-required"
    )
    with pytest.raises(Unauthenticated, match="is for turn 2, not for turn 1"):
        verify_receipt(audit_pki.verifier(), receipt, expected_org="beta", turn=1)
    with pytest.raises(Unauthenticated, match="says the task is 'input-required'"):
        verify_receipt(audit_pki.verifier(), receipt, expected_org="beta", state="completed")


def test_certificate_validity_is_checked_at_receipt_not_at_the_chosen_signing_time(
    tmp_path: Path, audit_pki
) -> None:
    """Issue 11: an expired gateway certificate cannot sign by backdating signed_at."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    write_pair(
        issue_gateway_cert(audit_pki.ca, "beta", days=1, not_before=start),
        tmp_path / "old.crt",
        tmp_path / "old.key",
    )
    expired = Signer.from_files(tmp_path / "old.crt", tmp_path / "old.key")
    backdated = int((start + dt.timedelta(hours=1)).timestamp() * 1000)
    for receipt in (
        _v2(expired, signed_at_unix_ms=backdated),
        sign_receipt(expired, dataclasses.replace(_body(), signed_at_unix_ms=backdated)),
    ):
        with pytest.raises(Unauthenticated, match="was not valid at"):
            verify_receipt(audit_pki.verifier(), receipt, expected_org="beta")
        with pytest.raises(Unauthenticated, match="was not valid at"):
            verify_provenance_receipt(audit_pki.verifier(), receipt)


def test_receipt_signed_after_it_was_received_is_refused(audit_pki) -> None:
    future = now_unix_ms() + 3_600_000
    receipt = _v2(audit_pki.signer("beta"), signed_at_unix_ms=future)
    with pytest.raises(Unauthenticated, match="ms after it was received"):
        verify_receipt(audit_pki.verifier(), receipt, expected_org="beta")


def test_provenance_receipt_is_checked_against_the_org_it_names(audit_pki) -> None:
    alpha = audit_pki.signer("alpha")
    body = _v2(audit_pki.signer("beta")).body
    forged = SignedReceipt(body, alpha.cert_der, alpha.sign(body.signed_bytes()))
    with pytest.raises(PermissionDenied, match="signed by organization 'alpha', expected 'beta'"):
        verify_provenance_receipt(audit_pki.verifier(), forged)
    rogue = Signer.from_files(audit_pki.directory / "rogue.crt", audit_pki.directory / "rogue.key")
    with pytest.raises(Unauthenticated, match="not issued by the federation CA"):
        verify_provenance_receipt(audit_pki.verifier(), _v2(rogue))


def test_v2_receipt_under_canonical_version_1_verifies(audit_pki) -> None:
    receipt = _v2(audit_pki.signer("beta"), canonical=1)
    assert receipt.body.signed_bytes() == canonical_bytes(receipt.body.to_json(), 1)
    verify_receipt(audit_pki.verifier(), receipt, expected_org="beta", released_output=OUTPUT)


def test_precomputed_output_bytes_give_the_same_commitment(audit_pki) -> None:
    salt = bytes(range(32))
    receipt = _v2(audit_pki.signer("beta"), salt=salt, encoded_output=canonical_bytes(OUTPUT))
    assert receipt.body.result_commitment == commit_result(salt, OUTPUT)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "fedgate/receipt/v9"}, "receipt type 'fedgate/receipt/v9' is unknown"),
        ({"canonical": 3}, "canonical JSON version 3 is unknown"),
        ({"state": "working"}, "state 'working' is not one a receipt ends"),
        ({"chain_head": "xyz"}, "chain_head must be 64 lowercase hex digits"),
        ({"result_commitment": "sha256:" + "0" * 64}, "result_commitment must be"),
        ({"turn": -1}, r"'turn' must be between 0 and 2\*\*53 - 1"),
        ({"salt": "AAAA"}, "the salt is 32 bytes, got 3"),
    ],
)
def test_malformed_v2_receipt_json_is_invalid_argument(
    audit_pki, change: dict[str, object], message: str
) -> None:
    data = {**_v2(audit_pki.signer("beta")).to_json(), **change}
    with pytest.raises(InvalidArgument, match=message):
        SignedReceipt.from_json(data)


def test_v1_receipt_with_a_salt_is_invalid(audit_pki) -> None:
    data = {**sign_receipt(audit_pki.signer("beta"), _body()).to_json(), "salt": "AA=="}
    with pytest.raises(InvalidArgument, match="version 1 receipt has no salt"):
        SignedReceipt.from_json(data)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"state": "failed"}, "ends a turn in state completed or input-required"),
        ({"turn": -1}, "turn must be a non-negative integer"),
        ({"chain_head": "short"}, "chain position must be"),
        ({"canonical": 7}, "canonical JSON version 7 is unknown"),
        ({"salt": b"short"}, "a receipt salt is 32 bytes"),
    ],
)
def test_sign_result_refuses_what_it_cannot_sign(
    audit_pki, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _v2(audit_pki.signer("beta"), **fields)


# -- checkpoints: online checks ----------------------------------------------------------------


def test_checkpoint_of_another_org_than_expected_is_refused(audit_pki) -> None:
    checkpoint = sign_checkpoint(audit_pki.signer("alpha"), 3, HEAD)
    verify_checkpoint(audit_pki.verifier(), checkpoint, expected_org="alpha")
    with pytest.raises(PermissionDenied, match="checkpoint of organization 'alpha', expected"):
        verify_checkpoint(audit_pki.verifier(), checkpoint, expected_org="beta")


def test_checkpoint_certificate_is_checked_when_received(tmp_path: Path, audit_pki) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    write_pair(
        issue_gateway_cert(audit_pki.ca, "alpha", days=1, not_before=start),
        tmp_path / "old.crt",
        tmp_path / "old.key",
    )
    expired = Signer.from_files(tmp_path / "old.crt", tmp_path / "old.key")
    backdated = int((start + dt.timedelta(hours=1)).timestamp() * 1000)
    checkpoint = sign_checkpoint(expired, 3, HEAD, signed_at_unix_ms=backdated)
    with pytest.raises(Unauthenticated, match="was not valid at"):
        verify_checkpoint(audit_pki.verifier(), checkpoint)
    verify_checkpoint(audit_pki.verifier(), checkpoint, received_at_unix_ms=backdated)


@pytest.mark.parametrize(
    "change", [{"head_hash": "AB" * 32}, {"sequence": -1}, {"sequence": 2**60}, {"org": "Alpha"}]
)
def test_malformed_checkpoint_is_refused_before_its_signature(
    audit_pki, change: dict[str, object]
) -> None:
    checkpoint = dataclasses.replace(sign_checkpoint(audit_pki.signer("alpha"), 3, HEAD), **change)
    with pytest.raises(Unauthenticated, match="malformed checkpoint"):
        verify_checkpoint(audit_pki.verifier(), checkpoint)


def test_sign_checkpoint_refuses_a_malformed_head(audit_pki) -> None:
    with pytest.raises(InvalidArgument, match="64-hex-digit head hash"):
        sign_checkpoint(audit_pki.signer("alpha"), 3, "not a hash")
