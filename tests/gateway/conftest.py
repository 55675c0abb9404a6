"""Fixtures of the audit tests (named audit_*): a throwaway federation PKI and fresh stores.

Every store fixture runs on SQLite (a file in tmp_path) and on PostgreSQL (a fresh schema per
test, dropped afterwards), the latter skipped when FEDGATE_TEST_DATABASE_URL is unset.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.identity.certs import IssuedCert, create_ca, issue_gateway_cert, write_pair
from gateway.identity.signing import Signer, Verifier

AUDIT_PG_ENV = "FEDGATE_TEST_DATABASE_URL"


@dataclass(frozen=True)
class AuditPki:
    """A federation CA, gateway certificates of orgs 'alpha' and 'beta', and a rogue CA's 'beta'."""

    directory: Path
    ca: IssuedCert

    def paths(self, org: str) -> tuple[Path, Path]:
        return self.directory / f"{org}.crt", self.directory / f"{org}.key"

    def signer(self, org: str) -> Signer:
        cert, key = self.paths(org)
        return Signer.from_files(cert, key)

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.crt"

    def verifier(self) -> Verifier:
        return Verifier.from_file(self.ca_path)


@pytest.fixture(scope="session")
def audit_pki(tmp_path_factory: pytest.TempPathFactory) -> AuditPki:
    directory = tmp_path_factory.mktemp("audit-pki")
    ca = create_ca()
    write_pair(ca, directory / "ca.crt", directory / "ca.key")
    for org in ("alpha", "beta"):
        write_pair(issue_gateway_cert(ca, org), directory / f"{org}.crt", directory / f"{org}.key")
    rogue = create_ca("Rogue CA")
    write_pair(rogue, directory / "rogue-ca.crt", directory / "rogue-ca.key")
    write_pair(issue_gateway_cert(rogue, "beta"), directory / "rogue.crt", directory / "rogue.key")
    return AuditPki(directory, ca)


def _postgres_url() -> str:
    url = os.environ.get(AUDIT_PG_ENV)
    if not url:
        pytest.skip(
            f"PostgreSQL tests need {AUDIT_PG_ENV} (e.g. "
            "postgresql+psycopg://postgres@127.0.0.1:5432/test)"
        )
    return url


@pytest.fixture
def audit_pg_url() -> Iterator[Callable[[], str]]:
    """Makes URLs of fresh PostgreSQL schemas (search_path), dropped at teardown."""
    base = _postgres_url()
    admin = sa.create_engine(base)
    schemas: list[str] = []

    def make() -> str:
        schema = f"audit_test_{uuid.uuid4().hex[:12]}"
        with admin.begin() as connection:
            connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        schemas.append(schema)
        separator = "&" if "?" in base else "?"
        return f"{base}{separator}options=-csearch_path%3D{schema}"

    yield make
    with admin.begin() as connection:
        for schema in schemas:
            connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def audit_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty audit database: SQLite in tmp_path, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    make: Callable[[], str] = request.getfixturevalue("audit_pg_url")
    return make()


@pytest.fixture
async def audit_store(audit_db_url: str, audit_pki: AuditPki) -> AsyncIterator[object]:
    """A started SqlAuditStore on each database, closed afterwards."""
    from gateway.audit.store import SqlAuditStore

    store = SqlAuditStore(audit_db_url, verifier=audit_pki.verifier(), busy_timeout_ms=300)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
def audit_make_config(audit_pki: AuditPki) -> Callable[[Path, str, str], Path]:
    """Writes a minimal fedgate.toml: audit_make_config(directory, org, database_url)."""

    def make(directory: Path, org: str, database_url: str) -> Path:
        return _write_config(directory, audit_pki, org, database_url)

    return make


def _write_config(directory: Path, pki: AuditPki, org: str, database_url: str) -> Path:
    """A minimal fedgate.toml for `org` using the test PKI and `database_url`."""
    cert, key = pki.paths(org)
    path = directory / f"{org}.toml"
    path.write_text(
        f"""
[gateway]
org = "{org}"
data_dir = "{directory / (org + "-data")}"

[federation]
cert = "{cert}"
key = "{key}"
ca = "{pki.ca_path}"

[audit]
database_url = "{database_url}"
""",
        encoding="utf-8",
    )
    return path
