"""Certificate facts: parsed once per certificate, yet every refusal is as fresh as the first."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.errors import PermissionDenied, Unauthenticated
from gateway.identity.certs import (
    certificate_facts,
    is_development_ca,
    load_cert,
    load_private_key,
    pem_certificate_facts,
    revoked_serials,
)
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


# ---- the federation CA tool: `fedgate certs ca | request | issue --csr | revoke` ----------------

PASSPHRASE = "correct horse battery staple"


def _cli(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from gateway.cli import main

    return CliRunner().invoke(main, list(args), env=env or {})


@pytest.fixture
def federation_ca(tmp_path: Path) -> Path:
    result = _cli(
        "certs",
        "ca",
        "--out",
        str(tmp_path / "fedca"),
        "--name",
        "Northwind Health Federation CA",
        "--days",
        "1000",
        env={"FEDGATE_CA_PASSPHRASE": PASSPHRASE},
    )
    assert result.exit_code == 0, result.output
    return tmp_path / "fedca"


def test_certs_ca_is_a_real_ca_with_an_encrypted_key(federation_ca: Path) -> None:
    cert = load_cert((federation_ca / "ca.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=Northwind Health Federation CA"
    assert not is_development_ca(cert.public_bytes(serialization.Encoding.PEM))
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 1000
    key_pem = (federation_ca / "ca.key").read_bytes()
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert (federation_ca / "ca.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key_pem, password=None)
    serialization.load_pem_private_key(key_pem, password=PASSPHRASE.encode())


def test_certs_ca_needs_a_passphrase_of_some_length(tmp_path: Path) -> None:
    without = _cli("certs", "ca", "--out", str(tmp_path / "a"))
    assert without.exit_code == 2
    assert without.output.strip().splitlines() == [
        "fedgate: the federation CA key needs its passphrase: set FEDGATE_CA_PASSPHRASE, or run "
        "this in a terminal to be asked"
    ]
    short = _cli("certs", "ca", "--out", str(tmp_path / "b"), env={"FEDGATE_CA_PASSPHRASE": "x"})
    assert short.exit_code == 2 and "at least 12 characters" in short.output
    assert not (tmp_path / "a" / "ca.key").exists() and not (tmp_path / "b" / "ca.key").exists()


def test_a_request_is_signed_by_the_federation_ca_and_the_key_stays_home(
    tmp_path: Path, federation_ca: Path
) -> None:
    certs = tmp_path / "hospital-certs"
    requested = _cli("certs", "request", "--org", "hospital", "--out", str(certs))
    assert requested.exit_code == 0, requested.output
    assert (certs / "hospital.key").stat().st_mode & 0o777 == 0o600
    issued = _cli(
        *("certs", "issue", "--org", "hospital", "--csr", str(certs / "hospital.csr")),
        *("--ca-dir", str(federation_ca), "--out", str(tmp_path / "outbox")),
        *("--san", "gw.hospital.example", "--san", "10.0.0.7", "--days", "90"),
        env={"FEDGATE_CA_PASSPHRASE": PASSPHRASE},
    )
    assert issued.exit_code == 0, issued.output
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == ["hospital.crt"]
    pem = (tmp_path / "outbox" / "hospital.crt").read_bytes()
    cert = load_cert(pem)
    cert.verify_directly_issued_by(load_cert((federation_ca / "ca.crt").read_bytes()))
    assert cert.public_key() == load_private_key((certs / "hospital.key").read_bytes()).public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hospital.fedgate", "gw.hospital.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert certificate_facts(cert.public_bytes(serialization.Encoding.DER)).organization() == (
        "hospital"
    )
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 90
    # The pair works for a gateway that trusts that CA (the check serve runs).
    from gateway.identity.tls import TlsFiles, read_material

    (certs / "hospital.crt").write_bytes(pem)
    read_material(
        TlsFiles(
            certs / "hospital.crt", certs / "hospital.key", federation_ca / "ca.crt", org="hospital"
        )
    )


def test_a_request_naming_another_organization_and_a_wrong_passphrase_are_refused(
    tmp_path: Path, federation_ca: Path
) -> None:
    assert _cli("certs", "request", "--org", "mallory", "--out", str(tmp_path)).exit_code == 0
    env = {"FEDGATE_CA_PASSPHRASE": PASSPHRASE}
    args = (
        "certs",
        "issue",
        "--csr",
        str(tmp_path / "mallory.csr"),
        "--ca-dir",
        str(federation_ca),
    )
    wrong_org = _cli(*args, "--org", "hospital", "--out", str(tmp_path / "x"), env=env)
    assert wrong_org.exit_code == 2
    assert "the request names organization 'mallory', not 'hospital'" in wrong_org.output
    wrong = _cli(*args, "--org", "mallory", env={"FEDGATE_CA_PASSPHRASE": "not the passphrase"})
    assert wrong.exit_code == 2
    assert wrong.output.strip() == (
        f"fedgate: {federation_ca / 'ca.key'}: cannot decrypt the CA key: wrong passphrase"
    )
    assert not (tmp_path / "x").exists()


def test_revoking_with_the_encrypted_ca(tmp_path: Path, federation_ca: Path) -> None:
    env = {"FEDGATE_CA_PASSPHRASE": PASSPHRASE}
    issued = _cli("certs", "issue", "--org", "lab", "--ca-dir", str(federation_ca), env=env)
    assert issued.exit_code == 0, issued.output
    cert = load_cert((federation_ca / "lab.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["lab.fedgate"], "no localhost on a real CA"
    revoked = _cli(
        "certs",
        "revoke",
        "--cert",
        str(federation_ca / "lab.crt"),
        "--ca-dir",
        str(federation_ca),
        env=env,
    )
    assert revoked.exit_code == 0, revoked.output
    assert revoked_serials((federation_ca / "federation.crl").read_bytes()) == [cert.serial_number]
