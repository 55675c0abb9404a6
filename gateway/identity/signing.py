"""Signed receipts and signed audit checkpoints, made with the gateway's own TLS key.

A responder signs a receipt over what it released (a commitment to the released output and the
paths it withheld or transformed); the requester keeps it in its audit log. A gateway signs
checkpoints of its audit chain head and gives them to its peers, with every answer that carries
no receipt and on each checkpoint exchange, so a cut-off tail is detectable.

Signatures are ECDSA P-256 / SHA-256 (DER) over the canonical JSON of the body (every field
except the signature, the certificate and a receipt's salt) plus a `type` tag, so that a receipt
signature can never pass as a checkpoint signature or the other way round. A signature is
trusted when the signer's certificate was issued by the federation CA, is not revoked, names the
expected organization and is valid when the signature is received (not at the signing time the
signer chose). docs/protocol.md gives the exact bytes; docs/vectors/ has test vectors.

Receipt versions: 1 signs a plain SHA-256 of the output (`result_digest`, canonical JSON version
1); 2 signs a salted commitment (`result_commitment`), the task state and turn, the signer's
chain position and its canonical JSON version. Both verify; new receipts are version 2.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import ORG_NAME
from gateway.errors import ConfigError, InvalidArgument, PermissionDenied, Unauthenticated
from gateway.identity.certs import (
    CertificateFacts,
    certificate_facts,
    load_cert,
    load_private_key,
    organization_of,
)
from gateway.payload import (
    CANONICAL_V1,
    CANONICAL_VERSION,
    CANONICAL_VERSIONS,
    MAX_SAFE_INTEGER,
    canonical_bytes,
    canonical_json,
    digest,
    hmac_digest,
    unknown_canonical_version,
)

RECEIPT_TYPE = "fedgate/receipt/v1"
RECEIPT_V2_TYPE = "fedgate/receipt/v2"
# The states a receipt can end a turn in: only these carry a (filtered, signed) result.
RECEIPT_STATES = ("completed", "input-required")
SALT_BYTES = 32
# The head of an empty audit chain (the genesis prev_hash).
EMPTY_CHAIN_HEAD = "0" * 64
# How far a signing time may lie after the time of receipt (the two gateways' clocks differ).
MAX_CLOCK_SKEW_MS = 300_000
_HEAD = re.compile(r"^[0-9a-f]{64}$")
_COMMITMENT = re.compile(r"^hmac-sha256:[0-9a-f]{64}$")
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


def _count(data: dict[str, Any], name: str, what: str) -> int:
    value = _field(data, name, int, what)
    if not 0 <= value <= MAX_SAFE_INTEGER:
        raise InvalidArgument(f"{what}: field {name!r} must be between 0 and 2**53 - 1")
    return int(value)


def _strings(data: dict[str, Any], name: str, what: str) -> tuple[str, ...]:
    values = _field(data, name, list, what)
    if not all(isinstance(value, str) for value in values):
        raise InvalidArgument(f"{what}: {name} must be strings")
    return tuple(values)


def _pairs(data: dict[str, Any], name: str, what: str) -> tuple[tuple[str, str], ...]:
    values = _field(data, name, list, what)
    if not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)
        for pair in values
    ):
        raise InvalidArgument(f"{what}: {name} must be [path, action] pairs")
    return tuple((path, action) for path, action in values)


@dataclass(frozen=True)
class ReceiptBody:
    """What a responder vouches for: a commitment to what it released and what it held back.

    Version 1 (the fields up to signed_at_unix_ms) signs `result_digest`, a plain SHA-256 of
    the released output under canonical JSON version 1. Version 2 signs `result_commitment`
    (HMAC-SHA256 of the output's canonical JSON under a fresh 32-byte salt that travels beside
    the receipt, never inside it), the task `state` it ends (completed or input-required), the
    `turn`, the signer's committed audit chain position (`chain_sequence`, `chain_head`: a lower
    bound on its log) and the `canonical` JSON version of its signed bytes and commitment.
    Build version 2 bodies with sign_result; this class keeps both readable.
    """

    task_id: str
    responder_org: str
    result_digest: str = ""
    withheld_paths: tuple[str, ...] = ()
    field_actions: tuple[tuple[str, str], ...] = ()
    policy_version: str = ""
    signed_at_unix_ms: int = 0
    version: int = 1
    result_commitment: str = ""
    state: str = "completed"
    turn: int = 0
    chain_sequence: int = 0
    chain_head: str = EMPTY_CHAIN_HEAD
    canonical: int = CANONICAL_V1

    def to_json(self) -> dict[str, Any]:
        """The signed fields as JSON (version 2 names its type and canonical version)."""
        if self.version == 1:
            return {
                "task_id": self.task_id,
                "responder_org": self.responder_org,
                "result_digest": self.result_digest,
                "withheld_paths": list(self.withheld_paths),
                "field_actions": [[path, action] for path, action in self.field_actions],
                "policy_version": self.policy_version,
                "signed_at_unix_ms": self.signed_at_unix_ms,
            }
        return {
            "type": RECEIPT_V2_TYPE,
            "canonical": self.canonical,
            "task_id": self.task_id,
            "responder_org": self.responder_org,
            "result_commitment": self.result_commitment,
            "withheld_paths": list(self.withheld_paths),
            "field_actions": [[path, action] for path, action in self.field_actions],
            "policy_version": self.policy_version,
            "signed_at_unix_ms": self.signed_at_unix_ms,
            "state": self.state,
            "turn": self.turn,
            "chain_sequence": self.chain_sequence,
            "chain_head": self.chain_head,
        }

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers (see docs/protocol.md, "Receipt")."""
        if self.version == 1:
            return canonical_json({"type": RECEIPT_TYPE, **self.to_json()})
        if self.version != 2:
            raise InvalidArgument(f"receipt version {self.version} is unknown")
        try:
            return canonical_bytes(self.to_json(), self.canonical)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"receipt body is not canonical JSON: {exc}") from None

    @classmethod
    def from_json(cls, data: Any) -> ReceiptBody:
        """Read the signed fields of either version; raises InvalidArgument naming what is wrong."""
        what = "receipt"
        if not isinstance(data, dict):
            raise InvalidArgument("receipt must be a JSON object")
        kind = data.get("type", RECEIPT_TYPE)
        if kind == RECEIPT_TYPE:
            return cls(
                task_id=_field(data, "task_id", str, what),
                responder_org=_field(data, "responder_org", str, what),
                result_digest=_field(data, "result_digest", str, what),
                withheld_paths=_strings(data, "withheld_paths", what),
                field_actions=_pairs(data, "field_actions", what),
                policy_version=_field(data, "policy_version", str, what),
                signed_at_unix_ms=_field(data, "signed_at_unix_ms", int, what),
            )
        if kind != RECEIPT_V2_TYPE:
            raise InvalidArgument(
                f"receipt type {kind!r} is unknown (this gateway reads {RECEIPT_TYPE!r} and "
                f"{RECEIPT_V2_TYPE!r}): upgrade the gateway"
            )
        canonical = _field(data, "canonical", int, what)
        if canonical not in CANONICAL_VERSIONS:
            raise InvalidArgument(f"receipt: {unknown_canonical_version(canonical)}")
        commitment = _field(data, "result_commitment", str, what)
        if not _COMMITMENT.match(commitment):
            raise InvalidArgument(
                "receipt: result_commitment must be 'hmac-sha256:' and 64 lowercase hex digits"
            )
        state = _field(data, "state", str, what)
        if state not in RECEIPT_STATES:
            raise InvalidArgument(
                f"receipt: state {state!r} is not one a receipt ends "
                f"({' or '.join(RECEIPT_STATES)})"
            )
        chain_head = _field(data, "chain_head", str, what)
        if not _HEAD.match(chain_head):
            raise InvalidArgument("receipt: chain_head must be 64 lowercase hex digits")
        return cls(
            task_id=_field(data, "task_id", str, what),
            responder_org=_field(data, "responder_org", str, what),
            withheld_paths=_strings(data, "withheld_paths", what),
            field_actions=_pairs(data, "field_actions", what),
            policy_version=_field(data, "policy_version", str, what),
            signed_at_unix_ms=_count(data, "signed_at_unix_ms", what),
            version=2,
            result_commitment=commitment,
            state=state,
            turn=_count(data, "turn", what),
            chain_sequence=_count(data, "chain_sequence", what),
            chain_head=chain_head,
            canonical=canonical,
        )


@dataclass(frozen=True)
class SignedReceipt:
    """A receipt body, its signer's DER certificate and signature; `salt` (version 2) opens the
    result commitment and is not signed: it goes to the direct requester only."""

    body: ReceiptBody
    signer_certificate: bytes
    signature: bytes
    salt: bytes = b""

    def to_json(self, *, with_salt: bool = True) -> dict[str, Any]:
        """A JSON object (bytes as base64), as kept in the audit log.

        The salt (version 2) sits beside the signed fields as "salt"; with_salt=False leaves it
        out, as a receipt must be when it joins another task's provenance.
        """
        data = {
            **self.body.to_json(),
            "signer_certificate": _b64(self.signer_certificate),
            "signature": _b64(self.signature),
        }
        if self.salt and with_salt:
            data["salt"] = _b64(self.salt)
        return data

    def provenance_json(self) -> dict[str, Any]:
        """The form that may travel in another task's provenance: no salt."""
        return self.to_json(with_salt=False)

    @classmethod
    def from_json(cls, data: Any) -> SignedReceipt:
        body = ReceiptBody.from_json(data)
        assert isinstance(data, dict)
        salt = b""
        if data.get("salt") is not None:
            if body.version == 1:
                raise InvalidArgument("receipt: a version 1 receipt has no salt")
            salt = _unb64(data["salt"], "receipt salt")
            if len(salt) != SALT_BYTES:
                raise InvalidArgument(f"receipt: the salt is {SALT_BYTES} bytes, got {len(salt)}")
        return cls(
            body,
            _unb64(data.get("signer_certificate"), "receipt signer_certificate"),
            _unb64(data.get("signature"), "receipt signature"),
            salt,
        )


def without_salt(receipt: dict[str, Any]) -> dict[str, Any]:
    """A receipt's JSON form without its salt: what may join another task's provenance."""
    return {key: value for key, value in receipt.items() if key != "salt"}


def _at(unix_ms: int) -> dt.datetime:
    try:
        return dt.datetime.fromtimestamp(unix_ms / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        raise Unauthenticated(f"signing time {unix_ms} is out of range") from None


def commit_result(
    salt: bytes,
    output: Any = None,
    *,
    canonical: int = CANONICAL_VERSION,
    encoded: bytes | None = None,
) -> str:
    """The result commitment 'hmac-sha256:<hex>': HMAC-SHA256(salt, canonical JSON of output).

    `encoded` is the output's canonical bytes when the caller has them already (each payload is
    canonicalized once per gateway).
    """
    if len(salt) != SALT_BYTES:
        raise InvalidArgument(f"a receipt salt is {SALT_BYTES} bytes, got {len(salt)}")
    if encoded is None:
        encoded = canonical_bytes(output, canonical)
    return hmac_digest(salt, encoded)


def sign_result(
    signer: Signer,
    *,
    task_id: str,
    output: Any = None,
    encoded_output: bytes | None = None,
    withheld_paths: tuple[str, ...] = (),
    field_actions: tuple[tuple[str, str], ...] = (),
    policy_version: str = "",
    state: str = "completed",
    turn: int = 0,
    chain_sequence: int = 0,
    chain_head: str = EMPTY_CHAIN_HEAD,
    canonical: int = CANONICAL_VERSION,
    salt: bytes | None = None,
    signed_at_unix_ms: int = 0,
) -> SignedReceipt:
    """Sign a version 2 receipt over a released result, as this gateway's organization.

    A fresh 32-byte salt is drawn unless one is given (tests, vectors); the returned receipt
    carries it in `.salt`. `encoded_output`, if given, must be canonical_bytes(output,
    canonical). `field_actions` are the transformed (not withheld) paths with their actions.
    `chain_sequence`/`chain_head` are this gateway's committed audit head when it signs.
    """
    if state not in RECEIPT_STATES:
        raise InvalidArgument(
            f"a receipt ends a turn in state {' or '.join(RECEIPT_STATES)}, not {state!r}"
        )
    if isinstance(turn, bool) or not 0 <= turn <= MAX_SAFE_INTEGER:
        raise InvalidArgument(f"receipt turn must be a non-negative integer, got {turn!r}")
    if not 0 <= chain_sequence <= MAX_SAFE_INTEGER or not _HEAD.match(chain_head):
        raise InvalidArgument(
            "receipt chain position must be a sequence >= 0 and a 64-hex-digit head hash"
        )
    if canonical not in CANONICAL_VERSIONS:
        raise InvalidArgument(unknown_canonical_version(canonical))
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    body = ReceiptBody(
        task_id=task_id,
        responder_org=signer.org,
        withheld_paths=tuple(withheld_paths),
        field_actions=tuple(field_actions),
        policy_version=policy_version,
        signed_at_unix_ms=signed_at_unix_ms or now_unix_ms(),
        version=2,
        result_commitment=commit_result(salt, output, canonical=canonical, encoded=encoded_output),
        state=state,
        turn=turn,
        chain_sequence=chain_sequence,
        chain_head=chain_head,
        canonical=canonical,
    )
    return replace(sign_receipt(signer, body), salt=salt)


def sign_receipt(signer: Signer, body: ReceiptBody) -> SignedReceipt:
    """Sign `body` (either version) as its responder; fills signed_at_unix_ms when it is 0."""
    if body.responder_org != signer.org:
        raise PermissionDenied(
            f"this gateway signs as {signer.org!r}, not as responder {body.responder_org!r}"
        )
    if not body.signed_at_unix_ms:
        body = replace(body, signed_at_unix_ms=now_unix_ms())
    return SignedReceipt(body, signer.cert_der, signer.sign(body.signed_bytes()))


def _received(received_at_unix_ms: int | None) -> tuple[int, dt.datetime]:
    when = now_unix_ms() if received_at_unix_ms is None else received_at_unix_ms
    return when, _at(when)


def _check_signer(
    verifier: Verifier,
    receipt: SignedReceipt,
    expected_org: str,
    received_at_unix_ms: int | None,
) -> None:
    """Steps 1-3 of every receipt check: responder, signing time, certificate and signature."""
    body = receipt.body
    if body.responder_org != expected_org:
        raise PermissionDenied(
            f"receipt of task {body.task_id!r} names responder {body.responder_org!r}, "
            f"expected {expected_org!r}"
        )
    received_ms, received = _received(received_at_unix_ms)
    if body.signed_at_unix_ms > received_ms + MAX_CLOCK_SKEW_MS:
        raise Unauthenticated(
            f"receipt of task {body.task_id!r} is signed {body.signed_at_unix_ms - received_ms} "
            f"ms after it was received: check the clock of {expected_org!r}"
        )
    # The certificate must be valid when the receipt is received, not at the signing time the
    # signer itself chose: an expired or not yet valid certificate signs nothing new.
    verifier.verify(
        body.signed_bytes(),
        receipt.signature,
        receipt.signer_certificate,
        expected_org,
        at=received,
    )


def verify_receipt(
    verifier: Verifier,
    receipt: SignedReceipt,
    *,
    expected_org: str,
    released_output: Any = None,
    encoded_output: bytes | None = None,
    task_id: str | None = None,
    turn: int | None = None,
    state: str | None = None,
    salt: bytes | None = None,
    received_at_unix_ms: int | None = None,
) -> None:
    """Accept a receipt only if `expected_org` signed it and it is the receipt of this result.

    In order: the body names `expected_org`; it was not signed after it was received (beyond
    MAX_CLOCK_SKEW_MS); the signer certificate is from the federation CA, not revoked, of
    `expected_org` and valid at `received_at_unix_ms` (default now: pass the record's time
    when checking a stored receipt); the signature covers the body; the body is for `task_id`,
    `turn` and `state` (each when given; a version 1 receipt is turn 0, completed); and, when
    `released_output` is given, it is what the receipt covers: for version 1 its digest, for
    version 2 its commitment under `salt` (default the receipt's own salt; without one the
    content cannot be checked and the receipt is refused).

    Raises PermissionDenied (another organization) or Unauthenticated (anything else).
    """
    _check_signer(verifier, receipt, expected_org, received_at_unix_ms)
    body = receipt.body
    if task_id is not None and body.task_id != task_id:
        raise Unauthenticated(
            f"receipt is for task {body.task_id!r}, not for task {task_id!r}: a receipt of "
            "another task cannot vouch for this result"
        )
    if turn is not None and body.turn != turn:
        raise Unauthenticated(
            f"receipt of task {body.task_id!r} is for turn {body.turn}, not for turn {turn}"
        )
    if state is not None and body.state != state:
        raise Unauthenticated(
            f"receipt of task {body.task_id!r} says the task is {body.state!r}, but the result "
            f"says {state!r}"
        )
    if released_output is None:
        return
    if body.version == 1:
        actual = digest(released_output, CANONICAL_V1)
        if actual != body.result_digest:
            raise Unauthenticated(
                f"receipt of task {body.task_id!r} covers result {body.result_digest}, but the "
                f"output received digests to {actual}: the result was changed after the "
                "responder released it"
            )
        return
    opening = receipt.salt if salt is None else salt
    if len(opening) != SALT_BYTES:
        raise Unauthenticated(
            f"receipt of task {body.task_id!r} came without its {SALT_BYTES}-byte salt: the "
            "output cannot be checked against its commitment"
        )
    try:
        actual = commit_result(
            opening,
            released_output,
            canonical=body.canonical,
            # The caller's canonical bytes of the output, if it has them under this version.
            encoded=encoded_output if body.canonical == CANONICAL_VERSION else None,
        )
    except (TypeError, ValueError) as exc:
        raise Unauthenticated(
            f"the output of task {body.task_id!r} is not canonical JSON: {exc}"
        ) from None
    if not hmac.compare_digest(actual, body.result_commitment):
        raise Unauthenticated(
            f"receipt of task {body.task_id!r} commits to another result than the output "
            "received: the result was changed after the responder released it"
        )


def verify_provenance_receipt(
    verifier: Verifier, receipt: SignedReceipt, *, received_at_unix_ms: int | None = None
) -> None:
    """Accept a receipt of a sub-task (multi-hop provenance) signed by the organization it names.

    Without the salt (which never travels in provenance) this proves only who signed, for which
    task id, under which policy version, what was withheld, in which state and at which chain
    position: not the content, which only the direct requester can check.
    """
    _check_signer(verifier, receipt, receipt.body.responder_org, received_at_unix_ms)


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
        """The exact bytes the signature covers: canonical JSON of the body with its type tag.

        A checkpoint has only an organization name, a hex hash and integers within 2**53, for
        which canonical versions 1 and 2 give the same bytes: it needs no version field.
        """
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


def sign_checkpoint(
    signer: Signer, sequence: int, head_hash: str, *, signed_at_unix_ms: int = 0
) -> SignedCheckpoint:
    """Sign our chain head: the last sequence number and its record hash.

    Cheap enough to attach to answers, but an ECDSA signature all the same: a caller that
    attaches one to every final answer keeps the latest and re-signs it at most about once a
    second.
    """
    if not 0 <= sequence <= MAX_SAFE_INTEGER or not _HEAD.match(head_hash):
        raise InvalidArgument(
            "a checkpoint names a sequence >= 0 and a 64-hex-digit head hash, got "
            f"{sequence!r} and {head_hash[:80]!r}"
        )
    unsigned = SignedCheckpoint(
        signer.org, sequence, head_hash, signed_at_unix_ms or now_unix_ms(), b"", b""
    )
    return replace(
        unsigned, signer_certificate=signer.cert_der, signature=signer.sign(unsigned.signed_bytes())
    )


def verify_checkpoint(
    verifier: Verifier,
    checkpoint: SignedCheckpoint,
    *,
    expected_org: str | None = None,
    received_at_unix_ms: int | None = None,
) -> None:
    """Accept a checkpoint only if a gateway of `checkpoint.org` (and of `expected_org`, when
    given) signed it with a certificate valid when it was received (default now).

    Offline checks of stored checkpoints pass the time they trust, for example the signing time
    of a checkpoint that was already checked when it arrived.
    """
    if expected_org is not None and checkpoint.org != expected_org:
        raise PermissionDenied(
            f"checkpoint of organization {checkpoint.org!r}, expected {expected_org!r}"
        )
    if (
        not ORG_NAME.match(checkpoint.org)
        or not 0 <= checkpoint.sequence <= MAX_SAFE_INTEGER
        or not 0 <= checkpoint.signed_at_unix_ms <= MAX_SAFE_INTEGER
        or not _HEAD.match(checkpoint.head_hash)
    ):
        raise Unauthenticated(
            "malformed checkpoint: it names an organization, a sequence and signing time "
            "between 0 and 2**53 - 1, and a head hash of 64 lowercase hex digits"
        )
    received_ms, received = _received(received_at_unix_ms)
    if checkpoint.signed_at_unix_ms > received_ms + MAX_CLOCK_SKEW_MS:
        raise Unauthenticated(
            f"checkpoint of {checkpoint.org!r} is signed "
            f"{checkpoint.signed_at_unix_ms - received_ms} ms after it was received: check the "
            f"clock of {checkpoint.org!r}"
        )
    verifier.verify(
        checkpoint.signed_bytes(),
        checkpoint.signature,
        checkpoint.signer_certificate,
        checkpoint.org,
        at=received,
    )
