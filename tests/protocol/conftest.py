"""The protocol tests reuse the audit fixtures: a throwaway PKI and SQLite/PostgreSQL stores."""

from tests.gateway.conftest import (  # noqa: F401 - fixtures, registered by being imported here
    audit_db_url,
    audit_pg_url,
    audit_pki,
)
