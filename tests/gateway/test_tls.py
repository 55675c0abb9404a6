"""The organization of an mTLS peer: parsed once per certificate, revocation checked every call."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import PermissionDenied, Unauthenticated
from gateway.identity.certs import load_cert
from gateway.identity.tls import peer_identity
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
