"""Signed receipts and signed audit checkpoints, made with the gateway's own TLS key.

A responder signs a receipt over what it released (the digest of the released output and the
paths it withheld or transformed); the requester keeps it in its audit log. A gateway signs
checkpoints of its audit chain head and gives them to its peers, so a cut-off tail is detectable.

Signatures are ECDSA P-256 / SHA-256 over the canonical JSON of the body (every field except the
signature and the certificate) plus a `type` tag, so that a receipt signature can never pass as a
checkpoint signature or the other way round. A signature is trusted when the signer's certificate
was issued by the federation CA, was valid when it signed, and names the expected organization.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.errors import ConfigError, InvalidArgument, PermissionDenied, Unauthenticated
from gateway.identity.certs import (
    CertificateFacts,
    certificate_facts,
    load_cert,
    load_private_key,
    organization_of,
)
from gateway.payload import canonical_json, digest

RECEIPT_TYPE = "fedgate/receipt/v1"
CHECKPOINT_TYPE = "fedgate/checkpoint/v1"
# Stateless, so one instance serves every signature (building one per call shows in profiles).
ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def now_unix_ms() -> int:
    """The current time in milliseconds since the Unix epoch (UTC)."""
    return time.time_ns() // 1_000_000


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror}") from None


class Signer:
    """The gateway's own key and certificate (the TLS pair of [federation] cert and key)."""

    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError("gateway keys are ECDSA P-256: reissue the key with `fedgate certs`")
        public_key = certificate.public_key()
        if (
            not isinstance(public_key, ec.EllipticCurvePublicKey)
            or public_key.public_numbers() != key.public_key().public_numbers()
        ):
            raise ConfigError(
                "the gateway key does not belong to the gateway certificate: check [federation] "
                "cert and key in fedgate.toml"
            )
        self.certificate = certificate
        self.org: str = organization_of(certificate)
        self.cert_der: bytes = certificate.public_bytes(serialization.Encoding.DER)
        self._key = key

    @classmethod
    def from_files(cls, cert_path: str | Path, key_path: str | Path) -> Signer:
        """Load the gateway's PEM certificate and key."""
        cert_pem = _read(cert_path, "gateway certificate")
        key_pem = _read(key_path, "gateway key")
        try:
            certificate = load_cert(cert_pem)
        except ValueError:
            raise ConfigError(f"{cert_path}: not a PEM certificate") from None
        try:
            key = load_private_key(key_pem)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{key_path}: not an unencrypted ECDSA P-256 PEM key: {exc}"
            ) from None
        return cls(certificate, key)

    def sign(self, data: bytes) -> bytes:
        """A DER ECDSA P-256 / SHA-256 signature over `data`."""
        return self._key.sign(data, ECDSA_SHA256)


class Verifier:
    """Trust in the federation CA: checks who signed what."""

    def __init__(self, ca_certificates: list[x509.Certificate]) -> None:
        if not ca_certificates:
            raise ConfigError("the federation CA file holds no certificate")
        self.ca_certificates = ca_certificates
        self._issued_by_ca: set[tuple[bytes, int]] = set()
        self._generation = 0
        # The serials the federation's revocation list names, asked on every verification
        # (a running gateway follows its CRL file; offline tools check none).
        self.revoked_serials: Callable[[], frozenset[int]] = frozenset

    def trust(self, ca_certificates: list[x509.Certificate]) -> None:
        """Replace the trusted CA set (a rotation); earlier chain checks no longer count."""
        if not ca_certificates:
            raise ConfigError("the federation CA file holds no certificate")
        self.ca_certificates = ca_certificates
        self._generation += 1
        self._issued_by_ca = set()

    @classmethod
    def from_file(cls, ca_path: str | Path) -> Verifier:
        """Load the federation CA (one PEM file; several certificates while a CA is rotated)."""
        return cls.from_pem(_read(ca_path, "federation CA"), label=str(ca_path))

    @classmethod
    def from_pem(cls, pem: bytes, *, label: str = "CA") -> Verifier:
        try:
            certificates = x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise ConfigError(f"{label}: not a PEM certificate") from None
        return cls(certificates)

    def verify(
        self,
        data: bytes,
        signature: bytes,
        signer_cert_der: bytes,
        expected_org: str,
        *,
        at: dt.datetime | None = None,
    ) -> None:
        """Accept only a signature by a certificate of `expected_org` from the federation CA.

        The certificate must be valid at `at` (the signing time; default now). Raises
        Unauthenticated (not from the CA, out of validity, bad signature) or PermissionDenied
        (a valid certificate of another organization).
        """
        try:
            facts = certificate_facts(signer_cert_der)
        except ValueError:
            raise Unauthenticated("the signer certificate is not a valid DER certificate") from None
        # The chain check is the costly part and depends only on the certificate and the CA
        # set, so it is remembered (and forgotten when the CA set is rotated).
        trusted = (signer_cert_der, self._generation)
        if trusted not in self._issued_by_ca:
            self._check_issued_by_ca(facts)
            if len(self._issued_by_ca) > 1024:
                self._issued_by_ca.clear()
            self._issued_by_ca.add(trusted)
        when = at or dt.datetime.now(dt.UTC)
        if not facts.not_before <= when <= facts.not_after:
            raise Unauthenticated(
                f"the signer certificate was not valid at {when.isoformat(timespec='seconds')} "
                f"(valid {facts.not_before.isoformat(timespec='seconds')} to "
                f"{facts.not_after.isoformat(timespec='seconds')})"
            )
        org = facts.organization()
        if facts.serial in self.revoked_serials():
            raise Unauthenticated(
                f"the signer certificate of {org!r} (serial {facts.serial:x}) is revoked"
            )
        if org != expected_org:
            raise PermissionDenied(
                f"signed by organization {org!r}, expected {expected_org!r}: only a gateway of "
                f"{expected_org!r} may sign this"
            )
        if facts.public_key is None:
            raise Unauthenticated(f"the certificate of {org!r} does not hold an ECDSA key")
        try:
            facts.public_key.verify(signature, data, ECDSA_SHA256)
        except InvalidSignature:
            raise Unauthenticated(
                f"the signature of {org!r} does not verify: the signed content was changed "
                "after signing or signed with another key"
            ) from None

    def _check_issued_by_ca(self, facts: CertificateFacts) -> None:
        if facts.is_ca:
            raise Unauthenticated("the signer certificate is a CA certificate, not a gateway's")
        cert = facts.certificate
        for ca in self.ca_certificates:
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return
        raise Unauthenticated(
            "the signer certificate was not issued by the federation CA (issuer "
            f"{cert.issuer.rfc4514_string()!r}): only certificates of the federation are trusted"
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{name} is not valid base64") from None


def _field(data: dict[str, Any], name: str, kind: type, what: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(f"{what}: field {name!r} is missing or not a {kind.__name__}")
    return value


@dataclass(frozen=True)
class ReceiptBody:
    """What a responder vouches for: the digest of what it released and what it held back."""

    task_id: str
    responder_org: str
    result_digest: str
    withheld_paths: tuple[str, ...] = ()
    field_actions: tuple[tuple[str, str], ...] = ()
    policy_version: str = ""
    signed_at_unix_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "responder_org": self.responder_org,
            "result_digest": self.result_digest,
            "withheld_paths": list(self.withheld_paths),
            "field_actions": [[path, action] for path, action in self.field_actions],
            "policy_version": self.policy_version,
            "signed_at_unix_ms": self.signed_at_unix_ms,
        }

    def signed_bytes(self) -> bytes:
        return canonical_json({"type": RECEIPT_TYPE, **self.to_json()})


@dataclass(frozen=True)
class SignedReceipt:
    body: ReceiptBody
    signer_certificate: bytes
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        """A JSON object (bytes as base64), as kept in the audit log."""
        return {
            **self.body.to_json(),
            "signer_certificate": _b64(self.signer_certificate),
            "signature": _b64(self.signature),
        }

    @classmethod
    def from_json(cls, data: Any) -> SignedReceipt:
        what = "receipt"
        if not isinstance(data, dict):
            raise InvalidArgument("receipt must be a JSON object")
        withheld = _field(data, "withheld_paths", list, what)
        actions = _field(data, "field_actions", list, what)
        if not all(isinstance(path, str) for path in withheld):
            raise InvalidArgument("receipt: withheld_paths must be strings")
        if not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)
            for pair in actions
        ):
            raise InvalidArgument("receipt: field_actions must be [path, action] pairs")
        body = ReceiptBody(
            task_id=_field(data, "task_id", str, what),
            responder_org=_field(data, "responder_org", str, what),
            result_digest=_field(data, "result_digest", str, what),
            withheld_paths=tuple(withheld),
            field_actions=tuple((path, action) for path, action in actions),
            policy_version=_field(data, "policy_version", str, what),
            signed_at_unix_ms=_field(data, "signed_at_unix_ms", int, what),
        )
        return cls(
            body,
            _unb64(data.get("signer_certificate"), "receipt signer_certificate"),
            _unb64(data.get("signature"), "receipt signature"),
        )


def _at(unix_ms: int) -> dt.datetime:
    try:
        return dt.datetime.fromtimestamp(unix_ms / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        raise Unauthenticated(f"signing time {unix_ms} is out of range") from None


def sign_receipt(signer: Signer, body: ReceiptBody) -> SignedReceipt:
    """Sign `body` as its responder; fills signed_at_unix_ms when it is 0."""
    if body.responder_org != signer.org:
        raise PermissionDenied(
            f"this gateway signs as {signer.org!r}, not as responder {body.responder_org!r}"
        )
    if not body.signed_at_unix_ms:
        body = replace(body, signed_at_unix_ms=now_unix_ms())
    return SignedReceipt(body, signer.cert_der, signer.sign(body.signed_bytes()))


def verify_receipt(
    verifier: Verifier,
    receipt: SignedReceipt,
    *,
    expected_org: str,
    released_output: dict[str, Any] | None = None,
) -> None:
    """Accept a receipt only if `expected_org` signed it and (if given) it covers this output."""
    if receipt.body.responder_org != expected_org:
        raise PermissionDenied(
            f"receipt of task {receipt.body.task_id!r} names responder "
            f"{receipt.body.responder_org!r}, expected {expected_org!r}"
        )
    verifier.verify(
        receipt.body.signed_bytes(),
        receipt.signature,
        receipt.signer_certificate,
        expected_org,
        at=_at(receipt.body.signed_at_unix_ms),
    )
    if released_output is not None:
        actual = digest(released_output)
        if actual != receipt.body.result_digest:
            raise Unauthenticated(
                f"receipt of task {receipt.body.task_id!r} covers result "
                f"{receipt.body.result_digest}, but the output received digests to {actual}: "
                "the result was changed after the responder released it"
            )


@dataclass(frozen=True)
class SignedCheckpoint:
    """A gateway's signed statement that its audit chain had `head_hash` at `sequence`."""

    org: str
    sequence: int
    head_hash: str
    signed_at_unix_ms: int
    signer_certificate: bytes
    signature: bytes

    def body_json(self) -> dict[str, Any]:
        return {
            "org": self.org,
            "sequence": self.sequence,
            "head_hash": self.head_hash,
            "signed_at_unix_ms": self.signed_at_unix_ms,
        }

    def signed_bytes(self) -> bytes:
        return canonical_json({"type": CHECKPOINT_TYPE, **self.body_json()})

    def to_json(self) -> dict[str, Any]:
        return {
            **self.body_json(),
            "signer_certificate": _b64(self.signer_certificate),
            "signature": _b64(self.signature),
        }

    @classmethod
    def from_json(cls, data: Any) -> SignedCheckpoint:
        what = "checkpoint"
        if not isinstance(data, dict):
            raise InvalidArgument("checkpoint must be a JSON object")
        return cls(
            org=_field(data, "org", str, what),
            sequence=_field(data, "sequence", int, what),
            head_hash=_field(data, "head_hash", str, what),
            signed_at_unix_ms=_field(data, "signed_at_unix_ms", int, what),
            signer_certificate=_unb64(
                data.get("signer_certificate"), "checkpoint signer_certificate"
            ),
            signature=_unb64(data.get("signature"), "checkpoint signature"),
        )


def sign_checkpoint(signer: Signer, sequence: int, head_hash: str) -> SignedCheckpoint:
    """Sign our chain head: the last sequence number and its record hash."""
    unsigned = SignedCheckpoint(signer.org, sequence, head_hash, now_unix_ms(), b"", b"")
    return SignedCheckpoint(
        unsigned.org,
        sequence,
        head_hash,
        unsigned.signed_at_unix_ms,
        signer.cert_der,
        signer.sign(unsigned.signed_bytes()),
    )


def verify_checkpoint(verifier: Verifier, checkpoint: SignedCheckpoint) -> None:
    """Accept a checkpoint only if a gateway of `checkpoint.org` signed it."""
    verifier.verify(
        checkpoint.signed_bytes(),
        checkpoint.signature,
        checkpoint.signer_certificate,
        checkpoint.org,
        at=_at(checkpoint.signed_at_unix_ms),
    )
