"""A three-organization federation for the security suite: hospital requires tokens and checks a
CRL; insurer and lab are its peers. After every test the gateways still serve and their audit
logs verify."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.identity.certs import revocation_list
from gateway.identity.tokens import token_authority
from gateway.local import LocalFederation
from participant_sdk import Client
from tests.conftest import Pki, ca_pair
from tests.integration.federation import (
    HOSPITAL_RULES,
    INSURER_RULES,
    echo_agent,
    org_config,
    serving,
)

LAB_RULES = "p, hospital, echo, *, send, **, allow\n"
SECURE_HOSPITAL_RULES = (
    HOSPITAL_RULES
    + """\
p, lab, echo, *, invoke, *, allow
p, lab, echo, *, share, **, allow
p, insurer, records, summary, share, diagnoses[].description, allow, purpose=treatment
"""
)


async def assert_still_serving_and_audit_intact(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("insurer"), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        result = await client.call("insurer/echo.say", {"still": "serving"}, timeout=10)
    assert result.output["echo"] == {"still": "serving"}
    for org, gateway in fed.gateways.items():
        report = gateway.audit.verify(org, gateway.router.verifier)
        assert report.ok, (org, report.problems)


@pytest.fixture
async def secure_fed(tmp_path: Path, pki: Pki) -> AsyncIterator[LocalFederation]:
    crl = tmp_path / "federation.crl"
    crl.write_bytes(revocation_list(ca_pair(pki), []))
    paths = []
    for org, rules, peers, extra in (
        (
            "hospital",
            SECURE_HOSPITAL_RULES,
            ["insurer", "lab"],
            "[limits]\npeer_rate_per_second = 5\npeer_burst = 10\npeer_max_concurrent_tasks = 8\n",
        ),
        ("insurer", INSURER_RULES, ["hospital"], ""),
        ("lab", LAB_RULES, ["hospital"], ""),
    ):
        path = org_config(
            tmp_path, pki, org, rules, peers, extra=extra, require_tokens=(org == "hospital")
        )
        if org == "hospital":
            text = path.read_text().replace(f'ca = "{pki.ca}"', f'ca = "{pki.ca}"\ncrl = "{crl}"')
            path.write_text(text)
        paths.append(path)
    federation = LocalFederation(paths)
    await federation.start()
    try:
        yield federation
        await assert_still_serving_and_audit_intact(federation)
    finally:
        await federation.stop()


def hospital_tokens(fed: LocalFederation):  # type: ignore[no-untyped-def]
    return token_authority(fed["hospital"].config)
