"""No token, key or payload value is ever logged, at any level, on success or failure paths."""

from __future__ import annotations

import logging

import pytest

from gateway.local import LocalFederation
from participant_sdk import Client, TaskFailed, Unauthenticated
from tests.integration.federation import PATIENT, boom_agent, records_agent, serving
from tests.security.conftest import hospital_tokens


async def test_logs_hold_no_secret(
    secure_fed: LocalFederation, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    authority = hospital_tokens(secure_fed)
    token = authority.issue("records-service", agents=["records", "boom"])
    async with (
        serving(secure_fed.participant("hospital"), records_agent(), boom_agent(), token=token),
        Client(secure_fed.participant("insurer")) as client,
    ):
        await client.call("hospital/records.summary", {"patient_id": "P-77-SECRET"}, timeout=10)
        with pytest.raises(TaskFailed):
            await client.call("hospital/boom.fail", {"card": "4111-1111-1111-1111"}, timeout=10)
    async with Client(secure_fed.participant("hospital"), token=token + "x") as bad:
        with pytest.raises(Unauthenticated):
            await bad.call("insurer/claims.check", {"ssn": "999-88-7777"}, timeout=5)
    authority.revoke(authority.list()[-1].token_id)
    secrets = [
        token,
        token.split(".")[2],
        "P-77-SECRET",
        "4111-1111-1111-1111",
        "999-88-7777",
        "secret internal detail 4242",
        PATIENT["patient"]["ssn"],
        PATIENT["patient"]["name"],
        authority.key_path.read_text().splitlines()[1],
        secure_fed["hospital"].config.federation.key.read_text().splitlines()[1],
    ]
    logged = "\n".join(f"{r.name} {r.levelname} {r.getMessage()}" for r in caplog.records)
    assert logged, "the gateways logged something"
    for secret in secrets:
        assert secret not in logged, f"a secret reached the log: {secret[:12]}…"
