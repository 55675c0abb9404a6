"""Write the protocol test vectors in docs/vectors/, or check (--check) that they are current.

The vectors are computed from fixed inputs and the published TEST VECTOR key in docs/vectors/
(made once with --new-pki; never a gateway's real key). Signatures are deterministic (RFC 6979),
so writing twice gives the same files. tests/protocol/test_vectors.py checks the implementation
against the files; another implementation can run the same checks against them.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from fedgate.v1 import fedgate_pb2 as pb

from gateway.audit.chain import GENESIS_HASH, AuditEvent, chain_events
from gateway.edges.wire import result_to_pb
from gateway.exchange.tasks import TaskResult, TaskState
from gateway.identity.certs import create_ca, issue_gateway_cert
from gateway.identity.signing import (
    CHECKPOINT_TYPE,
    RECEIPT_TYPE,
    ReceiptBody,
    SignedCheckpoint,
    SignedReceipt,
    commit_result,
)
from gateway.payload import CANONICAL_V1, canonical_json, hmac_digest, jcs, sha256_digest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "docs" / "vectors"
ORG, AUDIENCE = "beta", "alpha"
NOT_BEFORE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
VALID_DAYS = 20 * 366
SIGNED_AT_MS = int(dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC).timestamp() * 1000)
RECEIVED_AT_MS = SIGNED_AT_MS + 250
WARNING = (
    "TEST VECTORS, NOT SECRETS: this key is published so that anyone can check an implementation "
    "against these files. Never trust it, never configure it in a gateway."
)
ECDSA_DETERMINISTIC = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)

SALT = bytes(range(32))  # fixed for the vectors; a gateway draws 32 random bytes per receipt
DIGEST_KEY = bytes.fromhex("f0" * 32)
OUTPUT: dict[str, Any] = {
    "diagnosis": "J45.909",
    "patient": {"age": 41, "city": "Zürich", "sex": "F"},
    "billing": {"treatment_cost": 1830.5, "currency": "EUR", "tax": 1e-7, "units": 3},
    "ratio": 0.30000000000000004,
    "large": 1e21,
    "flags": [True, False, None],
    "notes": 'line 1\nline 2\t"quoted"',
    "\U0001f600": "a key outside the BMP sorts by its UTF-16 surrogates",
    "\ufb33": "a BMP key above the surrogates sorts after them",
}


def _hex(data: bytes) -> str:
    return data.hex()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Pki:
    def __init__(self, directory: Path) -> None:
        self.ca_pem = (directory / "ca.crt").read_bytes()
        self.cert_pem = (directory / "gateway-beta.crt").read_bytes()
        key = serialization.load_pem_private_key(
            (directory / "gateway-beta.key").read_bytes(), password=None
        )
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.key = key
        self.cert_der = x509.load_pem_x509_certificate(self.cert_pem).public_bytes(
            serialization.Encoding.DER
        )

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ECDSA_DETERMINISTIC)


def new_pki(directory: Path) -> None:
    """A throwaway CA and a gateway certificate and key for `beta` (the CA key is not kept)."""
    ca = create_ca(
        "Fedgate TEST VECTOR CA - published key, trust nothing it signs",
        days=VALID_DAYS,
        not_before=NOT_BEFORE,
    )
    gateway = issue_gateway_cert(ca, ORG, days=VALID_DAYS, not_before=NOT_BEFORE)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(ca.cert_pem)
    (directory / "gateway-beta.crt").write_bytes(gateway.cert_pem)
    (directory / "gateway-beta.key").write_bytes(b"# " + WARNING.encode() + b"\n" + gateway.key_pem)


# ---- the vectors ----


def jcs_vectors() -> dict[str, Any]:
    """RFC 8785's own examples, then cases of ours; inputs are JSON texts, outputs UTF-8 hex."""
    cases = [
        (
            "rfc8785 section 3.2.2 (numbers, escapes, literals)",
            '{\n  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
            '\n  "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
            '\n  "literals": [null, true, false]\n}',
        ),
        (
            "rfc8785 section 3.2.3 (sorting by UTF-16 code units)",
            '{\n  "\\u20ac": "Euro Sign",\n  "\\r": "Carriage Return",\n  "\\ufb33": '
            '"Hebrew Letter Dalet With Dagesh",\n  "1": "One",\n  "\\ud83d\\ude00": "Emoji: '
            'Grinning Face",\n  "\\u0080": "Control",\n  "\\u00f6": "Latin Small Letter O With '
            'Diaeresis"\n}',
        ),
        ("empty object and array", '{"b": [], "a": {}}'),
        ("nested objects sort at every level", '{"z": {"b": 1, "a": [{"d": 2, "c": 3}]}, "a": 0}'),
        ("integral floats print as integers", "[1.0, -0.0, 0.0, 100.0, 1e2, 9007199254740991]"),
        ("exponent thresholds", "[1e20, 1e21, 1e-6, 1e-7, 123e-9, 0.1, 1e16]"),
        ("control characters and non-ASCII text", '["\\u0000\\u001f\\u007f\\b\\f", "é€😀"]'),
        ("the receipt vector's output", json.dumps(OUTPUT)),
    ]
    out = []
    for name, text in cases:
        encoded = jcs(json.loads(text))
        out.append(
            {
                "name": name,
                "input": text,
                "canonical": encoded.decode("utf-8"),
                "canonical_hex": _hex(encoded),
                "sha256": sha256_digest(encoded),
            }
        )
    numbers = [
        "0000000000000000",
        "8000000000000000",
        "0000000000000001",
        "8000000000000001",
        "7fefffffffffffff",
        "ffefffffffffffff",
        "4340000000000000",
        "c340000000000000",
        "4430000000000000",
        "44b52d02c7e14af5",
        "44b52d02c7e14af6",
        "44b52d02c7e14af7",
        "444b1ae4d6e2ef4e",
        "444b1ae4d6e2ef4f",
        "444b1ae4d6e2ef50",
        "3eb0c6f7a0b5ed8c",
        "3eb0c6f7a0b5ed8d",
        "41b3de4355555553",
        "41b3de4355555554",
        "41b3de4355555555",
        "41b3de4355555556",
        "41b3de4355555557",
        "becbf647612f3696",
        "43143ff3c1cb0959",
    ]
    number_cases = [
        {"ieee754": bits, "canonical": jcs(_double(bits)).decode("ascii")} for bits in numbers
    ]
    refused = [
        {"name": "NaN (IEEE 7fffffffffffffff)", "ieee754": "7fffffffffffffff"},
        {"name": "Infinity (IEEE 7ff0000000000000)", "ieee754": "7ff0000000000000"},
        {"name": "an integer beyond 2**53 - 1", "input": "[9007199254740992]"},
    ]
    return {
        "about": "Canonical JSON version 2 = RFC 8785 (JCS). Each input is a JSON text; its "
        "canonical form is given as text and as the hex of its UTF-8 bytes. Numbers are IEEE 754 "
        "doubles given by their bits (big-endian hex), as in RFC 8785 appendix B. Integers "
        "beyond +-(2**53 - 1) are refused (RFC 7493), like NaN and infinities.",
        "cases": out,
        "numbers": number_cases,
        "refused": refused,
    }


def _double(bits: str) -> float:
    import struct

    return float(struct.unpack(">d", bytes.fromhex(bits))[0])


def digest_vectors() -> dict[str, Any]:
    v1, v2 = canonical_json(OUTPUT), jcs(OUTPUT)
    return {
        "about": "Digests of the receipt vector's output: plain SHA-256 and keyed HMAC-SHA256 of "
        "its canonical bytes under both canonical versions (1: sorted-keys json.dumps, 2: JCS). "
        "The result commitment of a version 2 receipt is the keyed digest under the receipt's "
        "salt.",
        "value_json": json.dumps(OUTPUT),
        "canonical_v1_hex": _hex(v1),
        "canonical_v2_hex": _hex(v2),
        "sha256_v1": sha256_digest(v1),
        "sha256_v2": sha256_digest(v2),
        "digest_key_hex": _hex(DIGEST_KEY),
        "keyed_v2": hmac_digest(DIGEST_KEY, v2),
        "salt_hex": _hex(SALT),
        "result_commitment_v2": commit_result(SALT, OUTPUT),
    }


def receipt_vectors(pki: Pki) -> dict[str, Any]:
    withheld = ("patient.name", "patient.ssn")
    transformed = (
        ("patient.insurance_id", "pseudonymized"),
        ("patient.date_of_birth", "generalized"),
    )
    body = ReceiptBody(
        task_id="0b7e7c4e-3f0e-4a8e-9c55-1d2b6c3f4a10",
        responder_org=ORG,
        withheld_paths=withheld,
        field_actions=transformed,
        policy_version="sha256:" + hashlib.sha256(b"vector policy").hexdigest(),
        signed_at_unix_ms=SIGNED_AT_MS,
        version=2,
        result_commitment=commit_result(SALT, OUTPUT),
        state="completed",
        turn=0,
        chain_sequence=41,
        chain_head=hashlib.sha256(b"record 41").hexdigest(),
        canonical=2,
    )
    signed = body.signed_bytes()
    receipt = SignedReceipt(body, pki.cert_der, pki.sign(signed), SALT)
    tampered = SignedReceipt(
        replace(body, withheld_paths=("patient.name",)),
        receipt.signer_certificate,
        receipt.signature,
        SALT,
    )
    result = TaskResult(
        body.task_id,
        TaskState.COMPLETED,
        output=OUTPUT,
        field_actions=tuple((p, "withheld") for p in withheld) + transformed,
        receipt=receipt.to_json(),
        responder_org=ORG,
        policy_version=body.policy_version,
    )
    v1_body = ReceiptBody(
        task_id=body.task_id,
        responder_org=ORG,
        result_digest=sha256_digest(canonical_json(OUTPUT)),
        withheld_paths=withheld,
        field_actions=transformed,
        policy_version=body.policy_version,
        signed_at_unix_ms=SIGNED_AT_MS,
    )
    v1_signed = v1_body.signed_bytes()
    v1 = SignedReceipt(v1_body, pki.cert_der, pki.sign(v1_signed))
    return {
        "about": "Receipts signed by the TEST VECTOR gateway of 'beta' (docs/vectors/"
        "gateway-beta.crt) with deterministic ECDSA (RFC 6979), P-256, SHA-256, DER signature. "
        "Verify at received_at_unix_ms against docs/vectors/ca.crt. 'tampered' carries the "
        "signature of 'receipt' over a changed body and must be refused.",
        "received_at_unix_ms": RECEIVED_AT_MS,
        "output_json": json.dumps(OUTPUT),
        "v2": {
            "signed_bytes": signed.decode("utf-8"),
            "signed_bytes_hex": _hex(signed),
            "signature_der_b64": _b64(receipt.signature),
            "salt_hex": _hex(SALT),
            "receipt_json": receipt.to_json(),
            "tampered_receipt_json": tampered.to_json(),
            "task_result_pb_hex": _hex(result_to_pb(result).SerializeToString(deterministic=True)),
        },
        "v1": {
            "type_tag": RECEIPT_TYPE,
            "signed_bytes": v1_signed.decode("utf-8"),
            "signed_bytes_hex": _hex(v1_signed),
            "signature_der_b64": _b64(v1.signature),
            "receipt_json": v1.to_json(),
            "receipt_pb_hex": _hex(
                pb.Receipt(
                    task_id=v1_body.task_id,
                    responder_org=ORG,
                    result_digest=v1_body.result_digest.encode("ascii"),
                    withheld_paths=list(withheld),
                    field_actions=[
                        pb.FieldAction(path=path, action=kind)
                        for path, kind in (
                            ("patient.insurance_id", pb.FIELD_ACTION_KIND_PSEUDONYMIZED),
                            ("patient.date_of_birth", pb.FIELD_ACTION_KIND_GENERALIZED),
                        )
                    ],
                    policy_version=v1_body.policy_version,
                    signed_at_unix_ms=SIGNED_AT_MS,
                    signer_certificate=pki.cert_der,
                    signature=v1.signature,
                ).SerializeToString(deterministic=True)
            ),
        },
    }


def checkpoint_vectors(pki: Pki) -> dict[str, Any]:
    unsigned = SignedCheckpoint(
        ORG, 41, hashlib.sha256(b"record 41").hexdigest(), SIGNED_AT_MS, b"", b""
    )
    signed = unsigned.signed_bytes()
    checkpoint = SignedCheckpoint(
        ORG, 41, unsigned.head_hash, SIGNED_AT_MS, pki.cert_der, pki.sign(signed)
    )
    tampered = SignedCheckpoint(
        ORG, 40, unsigned.head_hash, SIGNED_AT_MS, pki.cert_der, checkpoint.signature
    )
    return {
        "about": f"A signed checkpoint ({CHECKPOINT_TYPE}) of the TEST VECTOR gateway of 'beta'; "
        "'tampered' names another sequence under the same signature and must be refused.",
        "received_at_unix_ms": RECEIVED_AT_MS,
        "signed_bytes": signed.decode("ascii"),
        "signed_bytes_hex": _hex(signed),
        "checkpoint_json": checkpoint.to_json(),
        "tampered_checkpoint_json": tampered.to_json(),
        "checkpoint_pb_hex": _hex(
            pb.SignedCheckpoint(
                org=ORG,
                sequence=41,
                head_hash=unsigned.head_hash,
                signed_at_unix_ms=SIGNED_AT_MS,
                signer_certificate=pki.cert_der,
                signature=checkpoint.signature,
            ).SerializeToString(deterministic=True)
        ),
    }


def delegation_vectors(pki: Pki) -> dict[str, Any]:
    header = {"alg": "ES256", "typ": "fedgate-delegation+jwt", "x5c": [_b64(pki.cert_der)]}
    issued = SIGNED_AT_MS // 1000
    claims = {
        "iss": ORG,
        "aud": AUDIENCE,
        "sub": "claims-agent",
        "roles": ["adjuster"],
        "purpose": "claims",
        "task_id": "0b7e7c4e-3f0e-4a8e-9c55-1d2b6c3f4a10",
        "jti": "5f1d0c8f6b3e4d2a9c7b1e0f2a3b4c5d",
        "iat": issued,
        "exp": issued + 300,
        "chs": 41,
        "chh": hashlib.sha256(b"record 41").hexdigest(),
    }

    def segment(value: dict[str, Any]) -> str:
        return _b64url(json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8"))

    signing_input = f"{segment(header)}.{segment(claims)}"
    r, s = decode_dss_signature(pki.sign(signing_input.encode("ascii")))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    token = f"{signing_input}.{_b64url(signature)}"
    forged_claims = {**claims, "roles": ["admin"]}
    tampered = f"{segment(header)}.{segment(forged_claims)}.{_b64url(signature)}"
    return {
        "about": "A delegation statement (compact JWS, ES256: the 64-byte r || s signature over "
        "the ASCII signing input) that 'beta' signs for a task it sends to 'alpha'. Verify as "
        "'alpha', with the connection authenticated as 'beta', at verify_at_unix. 'tampered' "
        "changes the claims under the same signature and must be refused.",
        "verify_at_unix": issued + 10,
        "audience": AUDIENCE,
        "peer_org": ORG,
        "header": header,
        "claims": claims,
        "signing_input": signing_input,
        "signature_b64url": _b64url(signature),
        "token": token,
        "tampered_token": tampered,
    }


def audit_vectors() -> dict[str, Any]:
    base = {
        "task_id": "0b7e7c4e-3f0e-4a8e-9c55-1d2b6c3f4a10",
        "peer_org": AUDIENCE,
        "agent": "records",
        "skill": "lookup",
        "direction": "inbound",
        "requester": "claims-agent",
        "policy_version": "sha256:" + hashlib.sha256(b"vector policy").hexdigest(),
    }
    received = AuditEvent(
        kind="request_received",
        decision="allowed",
        status="submitted",
        duration_ms=0.125,
        digest_before="sha256:" + "ab" * 32,
        digest_after="sha256:" + "ab" * 32,
        evidence={"delegation": "eyJ...a delegation statement..."},
        **base,
    )
    released = AuditEvent(
        kind="result_released",
        decision="partial",
        status="completed",
        duration_ms=12.5,
        withheld_paths=("patient.name",),
        transformed=(("patient.insurance_id", "pseudonymized"),),
        digest_before="hmac-sha256:" + "cd" * 32,
        digest_after=sha256_digest(jcs(OUTPUT)),
        turn=0,
        **base,
    )
    records = chain_events([received, released], 0, GENESIS_HASH, SIGNED_AT_MS)
    # The same first event as a version 1 record (as written before canonical versions).
    v1 = replace(records[0], canonical=CANONICAL_V1, turn=0, evidence=None)
    v1 = replace(v1, record_hash=v1.computed_hash())
    return {
        "about": "Audit records. record_hash = SHA-256(prev_hash as ASCII || canonical(body)), "
        "body = every field but prev_hash and record_hash. A record with 'canonical': 2 hashes "
        "under JCS and its body includes canonical, turn and evidence; a record without "
        "'canonical' is version 1 and hashes its body (without those fields) under canonical "
        "JSON version 1.",
        "v2_chain": [
            {
                "record": record.to_json(),
                "hashed_bytes_hex": _hex(record.prev_hash.encode("ascii") + jcs(record.body())),
            }
            for record in records
        ],
        "v1_record": {
            "record": v1.to_json(),
            "hashed_bytes_hex": _hex(v1.prev_hash.encode("ascii") + canonical_json(v1.body())),
        },
    }


def write_all(directory: Path) -> list[Path]:
    pki = Pki(directory)
    files = {
        "jcs.json": jcs_vectors(),
        "digests.json": digest_vectors(),
        "receipts.json": receipt_vectors(pki),
        "checkpoint.json": checkpoint_vectors(pki),
        "delegation.json": delegation_vectors(pki),
        "audit-records.json": audit_vectors(),
    }
    written = []
    for name, content in files.items():
        path = directory / name
        path.write_text(json.dumps(content, indent=2, ensure_ascii=True) + "\n", encoding="utf-8")
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the vectors are stale")
    parser.add_argument(
        "--new-pki", action="store_true", help="replace the TEST VECTOR CA, certificate and key"
    )
    args = parser.parse_args()
    if args.new_pki:
        new_pki(VECTORS)
    if not args.check:
        written = write_all(VECTORS)
        print("written:", ", ".join(str(p.relative_to(ROOT)) for p in written))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        for name in ("ca.crt", "gateway-beta.crt", "gateway-beta.key"):
            (fresh / name).write_bytes((VECTORS / name).read_bytes())
        stale = [
            path.name
            for path in write_all(fresh)
            if not (VECTORS / path.name).exists()
            or (VECTORS / path.name).read_bytes() != path.read_bytes()
        ]
    if stale:
        print("vectors are stale: " + ", ".join(stale), file=sys.stderr)
        print("fix: python scripts/gen_vectors.py, then commit the result", file=sys.stderr)
        return 1
    print("vectors are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
