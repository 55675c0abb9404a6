"""Certificate facts: parsed once per certificate, yet every refusal is as fresh as the first."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.errors import PermissionDenied, Unauthenticated
from gateway.identity.certs import certificate_facts, load_cert, pem_certificate_facts
from tests.conftest import Pki


def _der(pki: Pki, name: str) -> bytes:
    return load_cert(pki.cert(name).read_bytes()).public_bytes(serialization.Encoding.DER)


def test_facts_are_parsed_once_per_certificate(pki: Pki) -> None:
    der = _der(pki, "hospital")
    facts = certificate_facts(der)
    assert certificate_facts(bytes(der)) is facts, "equal bytes from the wire hit the cache"
    assert pem_certificate_facts(pki.cert("hospital").read_bytes()) == facts
    cert = facts.certificate
    assert facts.organization() == "hospital"
    assert facts.serial == cert.serial_number
    assert (facts.not_before, facts.not_after) == (
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )
    assert facts.public_key == cert.public_key()
    assert not facts.is_ca
    ca = load_cert(pki.ca.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert certificate_facts(ca).is_ca


def test_a_remembered_organization_refusal_is_raised_afresh_each_time(pki: Pki) -> None:
    facts = certificate_facts(_der(pki, "mismatch-insurer"))
    errors = []
    for _ in range(2):
        with pytest.raises(
            PermissionDenied, match="subjectAltName lacks 'insurer.fedgate'"
        ) as info:
            facts.organization()
        errors.append(info.value)
    assert errors[0] is not errors[1], "a shared exception would grow its traceback on every raise"
    ca = load_cert(pki.ca.read_bytes()).public_bytes(serialization.Encoding.DER)
    with pytest.raises(Unauthenticated, match="names no single organization"):
        certificate_facts(ca).organization()


def test_malformed_certificate_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        certificate_facts(b"not a certificate")
    with pytest.raises(ValueError):
        pem_certificate_facts(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
