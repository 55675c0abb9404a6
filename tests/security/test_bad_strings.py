"""Issue 11 (low): a NUL in what a peer or a local process sends is INVALID_ARGUMENT, never an
audit outage; and a store's error text (which can name internal hosts) never reaches a peer."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from fedgate.convert import dict_to_struct
from fedgate.v1 import fedgate_pb2 as pb

from gateway.audit.store import MemoryAuditStore
from gateway.local import LocalFederation
from participant_sdk import Agent
from tests.conftest import Pki
from tests.integration.federation import (
    HOSPITAL_RULES,
    delegation,
    echo_agent,
    org_config,
    serving,
)
from tests.security.conftest import hospital_tokens
from tests.security.raw import federation_client, participant_client, refusal, task_request


@pytest.mark.parametrize(
    "claims",
    [{"subject": "dr\x00house"}, {"purpose": "treat\x00ment"}, {"roles": ("physician\x00",)}],
    ids=["subject", "purpose", "role"],
)
async def test_a_nul_in_a_peers_delegated_names_is_invalid_argument(
    secure_fed: LocalFederation, pki: Pki, claims: dict[str, object]
) -> None:
    token = hospital_tokens(secure_fed).issue("echo", agents=["echo"])
    async with (
        serving(secure_fed.participant("hospital"), echo_agent(), token=token),
        federation_client(pki, secure_fed, "lab") as lab,
    ):
        statement = delegation(pki, "lab", "hospital", "nul-1", **claims)  # type: ignore[arg-type]
        error = await refusal(
            lab.SubmitTask(task_request(pki, "lab", "nul-1", delegation=statement), timeout=10)
        )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contains a NUL character" in (error.details() or "")
    (record,) = secure_fed["hospital"].audit.query(task_id="nul-1")
    assert record.kind == "rejected" and record.status == "INVALID_ARGUMENT"
    assert secure_fed["hospital"].audit.healthy


@pytest.mark.parametrize(
    ("fields", "cause"),
    [
        (
            {"requester": "clerk\x00x", "input": dict_to_struct({"patient_id": "p-1"})},
            "requester contains a NUL",
        ),
        (
            {"requester": "clerk", "purpose": "billing\x00", "input": dict_to_struct({})},
            "purpose contains a NUL",
        ),
    ],
    ids=["requester", "purpose"],
)
async def test_a_nul_from_a_local_requester_is_invalid_argument(
    secure_fed: LocalFederation, fields: dict[str, object], cause: str
) -> None:
    """insurer's participant listener: a local process calls hospital's records agent."""
    async with participant_client(secure_fed, "insurer") as insurer:
        request = pb.TaskRequest(target_org="hospital", agent="records", skill="summary", **fields)  # type: ignore[arg-type]
        error = await refusal(insurer.SubmitTask(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cause in (error.details() or "")
    assert secure_fed["insurer"].audit.healthy


# -- a store's error text stays inside -------------------------------------------------------------

INTERNAL = 'could not connect to server "pg-7.corp.internal" (10.20.30.40), port 5432'


class _FailingStore(MemoryAuditStore):
    """An audit store whose outage names an internal host, as a database driver's error does."""

    def _fail_if_told(self) -> None:
        if self.fail_writes:
            raise OSError(INTERNAL)


@pytest.fixture
async def failing_fed(tmp_path: Path, pki: Pki) -> AsyncIterator[LocalFederation]:
    store = _FailingStore()
    rules = (
        HOSPITAL_RULES + "p, lab, echo, *, invoke, *, allow\np, lab, echo, *, share, **, allow\n"
    )
    paths = [
        org_config(tmp_path, pki, "hospital", rules, ["insurer", "lab"]),
        org_config(tmp_path, pki, "lab", "", ["hospital"]),
    ]
    async with LocalFederation(paths, audits={"hospital": store}) as federation:
        yield federation


async def test_a_peer_never_sees_our_stores_error_text(
    failing_fed: LocalFederation, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    store = failing_fed["hospital"].audit
    assert isinstance(store, _FailingStore)
    caplog.set_level(logging.ERROR)
    echo = Agent("echo")

    @echo.skill
    async def say(task, data):  # type: ignore[no-untyped-def]
        store.fail_writes = True  # the store goes down while the skill runs: the release fails
        return {"ok": True}

    async with (
        serving(failing_fed.participant("hospital"), echo),
        federation_client(pki, failing_fed, "lab") as lab,
    ):
        first = await refusal(
            lab.SubmitTask(task_request(pki, "lab", "db-1", idempotency_key="k-1"), timeout=10)
        )
        store.fail_writes = False
        # The same key again: the result waited for its record, and goes out with it now.
        again = await lab.SubmitTask(
            task_request(pki, "lab", "db-1", idempotency_key="k-1"), timeout=10
        )
        status = await lab.GetTask(pb.GetTaskRequest(task_id="db-1"), timeout=10)
    assert first.code() == grpc.StatusCode.UNAVAILABLE
    assert "audit store cannot be written at the gateway of 'hospital'" in (first.details() or "")
    for text in (first.details() or "", again.error.message, status.error.message):
        assert "pg-7" not in text and "10.20.30.40" not in text, text
    assert again.state == pb.TASK_STATE_COMPLETED and again.task_id == "db-1"
    assert status.state == pb.TASK_STATE_COMPLETED and not status.output.fields
    assert INTERNAL in caplog.text, "the detail goes to our own log"
