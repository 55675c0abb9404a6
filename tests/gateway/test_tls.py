"""The organization of an mTLS peer: parsed once per certificate, revocation checked every call."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.errors import ConfigError, PermissionDenied, Unauthenticated
from gateway.identity.certs import IssuedCert, create_ca, issue_gateway_cert, load_cert
from gateway.identity.tls import ReloadingTls, TlsFiles, peer_identity, read_material
from tests.conftest import Pki


class _Context:
    """What peer_identity reads of a grpc servicer context: the verified peer certificate."""

    def __init__(self, pem: bytes | None) -> None:
        self._pem = pem

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._pem]} if self._pem else {}


def _identity(pem: bytes | None, revoked: frozenset[int] = frozenset()) -> str:
    context: Any = _Context(pem)
    return peer_identity(context, revoked)


def test_certificate_revoked_after_it_was_remembered_is_refused_at_once(pki: Pki) -> None:
    pem = pki.cert("lab").read_bytes()
    serial = load_cert(pem).serial_number
    assert _identity(pem) == "lab"
    with pytest.raises(Unauthenticated, match=f"'lab' \\(serial {serial:x}\\) is revoked"):
        _identity(pem, frozenset({serial}))
    assert _identity(pem, frozenset({serial + 1})) == "lab", "an updated list lets it back"


def test_refusals_repeat_for_a_remembered_certificate(pki: Pki) -> None:
    for _ in range(2):
        with pytest.raises(PermissionDenied, match="subjectAltName lacks"):
            _identity(pki.cert("mismatch-insurer").read_bytes())
        with pytest.raises(Unauthenticated, match="need mutual TLS"):
            _identity(None)
        with pytest.raises(Unauthenticated, match="cannot be parsed"):
            _identity(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


# ---- the gateway's own certificate, checked when the files are read ------------------------------


def _files(pki: Pki, cert: str, *, key: str | None = None, ca: Path | None = None, org="insurer"):  # type: ignore[no-untyped-def]
    return TlsFiles(pki.cert(cert), pki.key(key or cert), ca or pki.ca, org=org)


def test_own_certificate_of_the_configured_ca_is_read(pki: Pki) -> None:
    material = read_material(_files(pki, "insurer"))
    assert material.cert_pem == pki.cert("insurer").read_bytes()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            lambda pki: _files(pki, "rogue-insurer"),
            "rogue-insurer.crt: this gateway's certificate (issuer 'OU=INSECURE DEVELOPMENT "
            "CERTIFICATE - local use only,CN=Rogue CA') is not issued by the CA in {ca}",
        ),
        (
            lambda pki: _files(pki, "insurer", key="hospital"),
            "hospital.key: this key is not the key of the certificate in {root}/insurer.crt",
        ),
        (
            lambda pki: _files(pki, "insurer", org="hospital"),
            "insurer.crt: the certificate names organization 'insurer', but this gateway is "
            "'hospital' ([gateway] org)",
        ),
        (lambda pki: _files(pki, "expired-insurer"), "this gateway's certificate expired on"),
        (lambda pki: _files(pki, "future-insurer"), "is valid only from"),
    ],
    ids=["other-ca", "other-key", "other-org", "expired", "not-yet-valid"],
)
def test_own_certificate_that_partners_would_refuse_is_one_line_with_the_fix(
    pki: Pki, files: Any, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        read_material(files(pki))
    text = info.value.message
    assert message.format(ca=pki.ca, root=pki.root) in text, text
    assert "\n" not in text


def test_other_ca_message_names_the_ca_and_the_fix(pki: Pki) -> None:
    with pytest.raises(ConfigError) as info:
        read_material(_files(pki, "rogue-insurer"))
    assert "put the federation's CA certificate in [federation] ca" in info.value.message
    assert "`fedgate certs request`" in info.value.message


def test_own_certificate_through_an_intermediate_and_a_ca_bundle(tmp_path: Path, pki: Pki) -> None:
    """cert file = leaf + intermediate; CA file = another CA + the root: both are found."""
    root = create_ca("Root CA", development=False)
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    root_cert = load_cert(root.cert_pem)
    root_key = serialization.load_pem_private_key(root.key_pem, password=None)
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Issuing CA")])
    intermediate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root_cert.subject)
        .public_key(intermediate_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    issuing = IssuedCert(
        intermediate.public_bytes(serialization.Encoding.PEM),
        intermediate_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    leaf = issue_gateway_cert(issuing, "insurer")
    (tmp_path / "insurer.crt").write_bytes(leaf.cert_pem + issuing.cert_pem)
    (tmp_path / "insurer.key").write_bytes(leaf.key_pem)
    (tmp_path / "bundle.crt").write_bytes(pki.ca.read_bytes() + root.cert_pem)
    read_material(
        TlsFiles(tmp_path / "insurer.crt", tmp_path / "insurer.key", tmp_path / "bundle.crt")
    )
    (tmp_path / "insurer.crt").write_bytes(leaf.cert_pem)  # the intermediate left out
    with pytest.raises(ConfigError, match="is not issued by the CA in"):
        read_material(
            TlsFiles(tmp_path / "insurer.crt", tmp_path / "insurer.key", tmp_path / "bundle.crt")
        )


def test_a_rotated_certificate_of_another_ca_is_refused_and_the_old_one_kept(
    tmp_path: Path, pki: Pki
) -> None:
    cert, key = tmp_path / "insurer.crt", tmp_path / "insurer.key"
    cert.write_bytes(pki.cert("insurer").read_bytes())
    key.write_bytes(pki.key("insurer").read_bytes())
    tls = ReloadingTls(TlsFiles(cert, key, pki.ca, org="insurer"))
    cert.write_bytes(pki.cert("rogue-insurer").read_bytes())
    key.write_bytes(pki.key("rogue-insurer").read_bytes())
    os.utime(cert, ns=(time.time_ns() + 10**9,) * 2)
    assert not tls.refresh()
    assert tls.material.cert_pem == pki.cert("insurer").read_bytes()
