"""The implementation against the written protocol: every file in docs/vectors/.

Each check here is one another implementation can make against the same files (docs/vectors/
README.md lists them): canonical bytes, digests and commitments, the exact signed bytes of each
structure, deterministic (RFC 6979) signatures that the published TEST VECTOR key reproduces,
signatures that must verify and tampered ones that must not, and the protobuf encodings.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fedgate.convert import receipt_json
from fedgate.v1 import fedgate_pb2 as pb

from gateway.audit.chain import AuditRecord, verify_chain
from gateway.edges.wire import checkpoint_from_pb, result_from_pb, result_to_pb
from gateway.errors import PermissionDenied, Unauthenticated
from gateway.identity.certs import load_cert
from gateway.identity.delegation import DelegationVerifier
from gateway.identity.signing import (
    ReceiptBody,
    SignedCheckpoint,
    SignedReceipt,
    Verifier,
    commit_result,
    verify_checkpoint,
    verify_provenance_receipt,
    verify_receipt,
)
from gateway.payload import canonical_json, hmac_digest, jcs, sha256_digest

VECTORS = Path(__file__).resolve().parents[2] / "docs" / "vectors"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def double(bits: str) -> float:
    return float(struct.unpack(">d", bytes.fromhex(bits))[0])


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier.from_file(VECTORS / "ca.crt")


@pytest.fixture(scope="module")
def vector_key() -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(
        (VECTORS / "gateway-beta.key").read_bytes(), password=None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def deterministic_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    try:
        return key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    except (UnsupportedAlgorithm, TypeError):
        pytest.skip("this cryptography/OpenSSL build has no deterministic ECDSA (RFC 6979)")


def test_the_vector_material_is_marked_as_such() -> None:
    assert b"TEST VECTORS, NOT SECRETS" in (VECTORS / "gateway-beta.key").read_bytes()
    ca = load_cert((VECTORS / "ca.crt").read_bytes())
    assert "TEST VECTOR" in ca.subject.rfc4514_string()


# -- canonical JSON (version 2 = RFC 8785) -----------------------------------------------------


@pytest.mark.parametrize("case", load("jcs.json")["cases"], ids=lambda case: case["name"])
def test_jcs_cases(case: dict[str, Any]) -> None:
    encoded = jcs(json.loads(case["input"]))
    assert encoded.hex() == case["canonical_hex"]
    assert encoded.decode("utf-8") == case["canonical"]
    assert sha256_digest(encoded) == case["sha256"]


@pytest.mark.parametrize("case", load("jcs.json")["numbers"], ids=lambda case: case["ieee754"])
def test_jcs_numbers(case: dict[str, str]) -> None:
    assert jcs(double(case["ieee754"])).decode("ascii") == case["canonical"]


@pytest.mark.parametrize("case", load("jcs.json")["refused"], ids=lambda case: case["name"])
def test_jcs_refusals(case: dict[str, str]) -> None:
    value = double(case["ieee754"]) if "ieee754" in case else json.loads(case["input"])
    with pytest.raises(ValueError):
        jcs(value)


def test_digest_vectors() -> None:
    vector = load("digests.json")
    value = json.loads(vector["value_json"])
    assert canonical_json(value).hex() == vector["canonical_v1_hex"]
    assert jcs(value).hex() == vector["canonical_v2_hex"]
    assert sha256_digest(canonical_json(value)) == vector["sha256_v1"]
    assert sha256_digest(jcs(value)) == vector["sha256_v2"]
    key, salt = bytes.fromhex(vector["digest_key_hex"]), bytes.fromhex(vector["salt_hex"])
    assert hmac_digest(key, jcs(value)) == vector["keyed_v2"]
    assert commit_result(salt, value) == vector["result_commitment_v2"]


# -- receipts ------------------------------------------------------------------------------


def test_receipt_v2_signed_bytes_commitment_and_signature(
    verifier: Verifier, vector_key: ec.EllipticCurvePrivateKey
) -> None:
    vectors = load("receipts.json")
    vector, output = vectors["v2"], json.loads(vectors["output_json"])
    receipt = SignedReceipt.from_json(vector["receipt_json"])
    signed = receipt.body.signed_bytes()
    assert signed.hex() == vector["signed_bytes_hex"]
    assert signed.decode("utf-8") == vector["signed_bytes"]
    assert receipt.salt.hex() == vector["salt_hex"]
    assert receipt.body.result_commitment == commit_result(receipt.salt, output)
    signature = base64.b64decode(vector["signature_der_b64"])
    assert receipt.signature == signature
    assert deterministic_signature(vector_key, signed) == signature
    verify_receipt(
        verifier,
        receipt,
        expected_org="beta",
        released_output=output,
        task_id=receipt.body.task_id,
        turn=0,
        state="completed",
        received_at_unix_ms=vectors["received_at_unix_ms"],
    )
    verify_provenance_receipt(
        verifier,
        SignedReceipt.from_json(receipt.provenance_json()),
        received_at_unix_ms=vectors["received_at_unix_ms"],
    )


def test_receipt_v2_tampered_is_refused(verifier: Verifier) -> None:
    vectors = load("receipts.json")
    tampered = SignedReceipt.from_json(vectors["v2"]["tampered_receipt_json"])
    with pytest.raises(Unauthenticated, match="does not verify"):
        verify_receipt(
            verifier,
            tampered,
            expected_org="beta",
            received_at_unix_ms=vectors["received_at_unix_ms"],
        )


def test_receipt_v2_wrong_output_or_org_is_refused(verifier: Verifier) -> None:
    vectors = load("receipts.json")
    receipt = SignedReceipt.from_json(vectors["v2"]["receipt_json"])
    output = json.loads(vectors["output_json"])
    at = vectors["received_at_unix_ms"]
    with pytest.raises(Unauthenticated, match="commits to another result"):
        verify_receipt(
            verifier,
            receipt,
            expected_org="beta",
            released_output={**output, "ratio": 0.3},
            received_at_unix_ms=at,
        )
    with pytest.raises(PermissionDenied, match="expected 'alpha'"):
        verify_receipt(verifier, receipt, expected_org="alpha", received_at_unix_ms=at)


def test_receipt_v2_on_the_wire() -> None:
    """The TaskResult bytes carry the receipt with its salt beside it, never inside it."""
    vectors = load("receipts.json")
    vector = vectors["v2"]
    message = pb.TaskResult.FromString(bytes.fromhex(vector["task_result_pb_hex"]))
    assert message.receipt.version == 2 and message.receipt.canonical == 2
    assert message.receipt.result_digest == b""
    assert message.receipt.state == pb.TASK_STATE_COMPLETED
    assert message.receipt_salt.hex() == vector["salt_hex"]
    assert "salt" not in pb.Receipt.DESCRIPTOR.fields_by_name
    result = result_from_pb(message)
    assert result.receipt == vector["receipt_json"]
    assert result.output == json.loads(vectors["output_json"])
    assert (
        result_to_pb(result).SerializeToString(deterministic=True).hex()
        == (vector["task_result_pb_hex"])
    )


def test_receipt_v1_still_verifies(
    verifier: Verifier, vector_key: ec.EllipticCurvePrivateKey
) -> None:
    vectors = load("receipts.json")
    vector, output = vectors["v1"], json.loads(vectors["output_json"])
    message = pb.Receipt.FromString(bytes.fromhex(vector["receipt_pb_hex"]))
    assert message.version == 0  # a version 1 receipt, as every gateway before v2 sent it
    assert message.result_digest.decode("ascii") == vector["receipt_json"]["result_digest"]
    assert receipt_json(message) == vector["receipt_json"]
    receipt = SignedReceipt.from_json(vector["receipt_json"])
    signed = receipt.body.signed_bytes()
    assert signed.hex() == vector["signed_bytes_hex"]
    assert json.loads(signed)["type"] == vector["type_tag"]
    assert deterministic_signature(vector_key, signed) == receipt.signature
    verify_receipt(
        verifier,
        receipt,
        expected_org="beta",
        released_output=output,
        received_at_unix_ms=vectors["received_at_unix_ms"],
    )


def test_receipt_signature_never_passes_as_another_version(verifier: Verifier) -> None:
    """The v1 body under the v2 signature (and back) does not verify: the type tags differ."""
    vectors = load("receipts.json")
    v1 = SignedReceipt.from_json(vectors["v1"]["receipt_json"])
    v2 = SignedReceipt.from_json(vectors["v2"]["receipt_json"])
    for body, signature in ((v1.body, v2.signature), (v2.body, v1.signature)):
        with pytest.raises(Unauthenticated, match="does not verify"):
            verify_receipt(
                verifier,
                SignedReceipt(body, v1.signer_certificate, signature),
                expected_org="beta",
                received_at_unix_ms=vectors["received_at_unix_ms"],
            )
    assert isinstance(ReceiptBody.from_json(vectors["v1"]["receipt_json"]), ReceiptBody)


# -- checkpoint ----------------------------------------------------------------------------


def test_checkpoint_vector(verifier: Verifier, vector_key: ec.EllipticCurvePrivateKey) -> None:
    vector = load("checkpoint.json")
    at = vector["received_at_unix_ms"]
    checkpoint = SignedCheckpoint.from_json(vector["checkpoint_json"])
    signed = checkpoint.signed_bytes()
    assert signed.hex() == vector["signed_bytes_hex"]
    assert signed == jcs(json.loads(signed))  # the same bytes under canonical versions 1 and 2
    assert deterministic_signature(vector_key, signed) == checkpoint.signature
    verify_checkpoint(verifier, checkpoint, expected_org="beta", received_at_unix_ms=at)
    wire = checkpoint_from_pb(
        pb.SignedCheckpoint.FromString(bytes.fromhex(vector["checkpoint_pb_hex"]))
    )
    assert wire == checkpoint
    tampered = SignedCheckpoint.from_json(vector["tampered_checkpoint_json"])
    with pytest.raises(Unauthenticated, match="does not verify"):
        verify_checkpoint(verifier, tampered, received_at_unix_ms=at)


# -- delegation statement ------------------------------------------------------------------


def _delegations(verifier: Verifier, at: float) -> DelegationVerifier:
    return DelegationVerifier("alpha", verifier, clock=lambda: at)


def test_delegation_vector(verifier: Verifier, vector_key: ec.EllipticCurvePrivateKey) -> None:
    vector = load("delegation.json")
    header_segment, claims_segment, signature_segment = vector["token"].split(".")
    assert f"{header_segment}.{claims_segment}" == vector["signing_input"]
    raw = base64.urlsafe_b64decode(signature_segment + "=" * (-len(signature_segment) % 4))
    assert len(raw) == 64
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(
        deterministic_signature(vector_key, vector["signing_input"].encode("ascii"))
    )
    assert raw == r.to_bytes(32, "big") + s.to_bytes(32, "big")
    claims = vector["claims"]
    delegation = _delegations(verifier, vector["verify_at_unix"]).verify(
        vector["token"], peer_org=vector["peer_org"], task_id=claims["task_id"]
    )
    assert (delegation.issuer_org, delegation.subject, delegation.roles) == (
        "beta",
        claims["sub"],
        tuple(claims["roles"]),
    )
    assert (delegation.chain_sequence, delegation.chain_head) == (claims["chs"], claims["chh"])


def test_delegation_vector_tampered_or_from_another_connection_is_refused(
    verifier: Verifier,
) -> None:
    vector = load("delegation.json")
    task_id = vector["claims"]["task_id"]
    with pytest.raises(Unauthenticated, match="does not verify"):
        _delegations(verifier, vector["verify_at_unix"]).verify(
            vector["tampered_token"], peer_org="beta", task_id=task_id
        )
    with pytest.raises(PermissionDenied, match="signed by organization 'beta', expected 'gamma'"):
        _delegations(verifier, vector["verify_at_unix"]).verify(
            vector["token"], peer_org="gamma", task_id=task_id
        )
    with pytest.raises(Unauthenticated, match="expired"):
        _delegations(verifier, vector["claims"]["exp"] + 3600).verify(
            vector["token"], peer_org="beta", task_id=task_id
        )


# -- audit records -------------------------------------------------------------------------


def test_audit_record_vectors() -> None:
    vector = load("audit-records.json")
    records = []
    for entry in vector["v2_chain"]:
        record = AuditRecord.from_json(entry["record"])
        assert record.canonical == 2
        assert (record.prev_hash.encode("ascii") + jcs(record.body())).hex() == (
            entry["hashed_bytes_hex"]
        )
        assert record.computed_hash() == record.record_hash
        records.append(record)
    report = verify_chain(records, org="beta", verifier=None)
    assert report.ok and report.records == 2
    v1 = AuditRecord.from_json(vector["v1_record"]["record"])
    assert v1.canonical == 1 and "canonical" not in v1.body()
    assert (v1.prev_hash.encode("ascii") + canonical_json(v1.body())).hex() == (
        vector["v1_record"]["hashed_bytes_hex"]
    )
    assert v1.computed_hash() == v1.record_hash


def test_vectors_are_current() -> None:
    """The files are what scripts/gen_vectors.py writes today (inputs and code agree)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_vectors.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr
