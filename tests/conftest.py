"""Shared fixtures: a throwaway federation PKI and real gateways on port 0."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.identity.certs import IssuedCert, create_ca, issue_gateway_cert, write_pair
from gateway.local import LocalFederation


@dataclass(frozen=True)
class Pki:
    """A federation CA, gateway certificates, and the bad certificates the failure tests need."""

    root: Path

    def cert(self, name: str) -> Path:
        return self.root / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.root / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    def pem(self, name: str) -> tuple[bytes, bytes]:
        return self.cert(name).read_bytes(), self.key(name).read_bytes()


def build_pki(root: Path) -> Pki:
    ca = create_ca()
    write_pair(ca, root / "ca.crt", root / "ca.key")
    for org in ("hospital", "insurer", "lab", "mallory"):
        write_pair(issue_gateway_cert(ca, org), root / f"{org}.crt", root / f"{org}.key")
    rogue = create_ca("Rogue CA")
    write_pair(rogue, root / "rogue-ca.crt", root / "rogue-ca.key")
    write_pair(
        issue_gateway_cert(rogue, "insurer"), root / "rogue-insurer.crt", root / "rogue-insurer.key"
    )
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    write_pair(
        issue_gateway_cert(ca, "insurer", days=1, not_before=past),
        root / "expired-insurer.crt",
        root / "expired-insurer.key",
    )
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    write_pair(
        issue_gateway_cert(ca, "insurer", not_before=future),
        root / "future-insurer.crt",
        root / "future-insurer.key",
    )
    write_pair(
        issue_gateway_cert(ca, "insurer", san_org="hospital"),
        root / "mismatch-insurer.crt",
        root / "mismatch-insurer.key",
    )
    return Pki(root)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


def ca_pair(pki: Pki) -> IssuedCert:
    return IssuedCert(pki.ca.read_bytes(), (pki.root / "ca.key").read_bytes())


@pytest.fixture
async def fed(tmp_path: Path, pki: Pki) -> AsyncIterator[LocalFederation]:
    """hospital and insurer gateways, peers of each other, on loopback port 0."""
    from tests.integration.federation import configs

    federation = LocalFederation(configs(tmp_path, pki))
    await federation.start()
    try:
        yield federation
    finally:
        await federation.stop()
