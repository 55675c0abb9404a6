"""Issue 11 #7: whose data a call onward carries comes from what the caller serves, not from what
the call says.

* An agent serving the insurer's task that calls the lab with a plain `Client` (no parent task
  named) still carries the insurer's origin: `origin!=insurer` keeps the patient id home.
* A local process that names a running task it does not serve as its parent is refused, and the
  refusal is recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.identity.tokens import token_authority
from gateway.local import LocalFederation
from participant_sdk import Agent, Client, PermissionDenied, TaskContext
from tests.conftest import Pki
from tests.integration.federation import echo_agent, eventually, org_config, serving

HOSPITAL = """\
p, insurer, records, relay, invoke, *, allow
p, insurer, records, relay, share, **, allow
p, lab, echo, *, send, sample, allow
p, lab, echo, *, send, patient_id, allow, origin!=insurer
"""
INSURER = "p, hospital, records, relay, send, **, allow\n"
LAB = "p, hospital, echo, *, invoke, *, allow\np, hospital, echo, *, share, **, allow\n"


@pytest.fixture
async def three(tmp_path: Path, pki: Pki) -> AsyncIterator[LocalFederation]:
    paths = [
        org_config(tmp_path, pki, "hospital", HOSPITAL, ["insurer", "lab"], require_tokens=True),
        org_config(tmp_path, pki, "insurer", INSURER, ["hospital"]),
        org_config(tmp_path, pki, "lab", LAB, ["hospital"]),
    ]
    async with LocalFederation(paths) as fed:
        yield fed


def relay_agent(address: str, token: str, started: asyncio.Event, release: asyncio.Event) -> Agent:
    """`records.relay`: calls the lab with a plain Client, under its own token, no parent."""
    records = Agent("records")

    @records.skill
    async def relay(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        started.set()
        await release.wait()
        async with Client(address, token=token, requester="relay") as client:
            lab = await client.call("lab/echo.say", data, timeout=10)
        return {"lab": lab.output["echo"]}

    return records


async def test_origin_comes_from_the_task_the_caller_serves(three: LocalFederation) -> None:
    tokens = token_authority(three["hospital"].config)
    agent_token = tokens.issue("records-svc", agents=["records"], calls=["lab/echo.*"])
    started, release = asyncio.Event(), asyncio.Event()
    release.set()
    async with (
        serving(three.participant("lab"), echo_agent()),
        serving(
            three.participant("hospital"),
            relay_agent(three.participant("hospital"), agent_token, started, release),
            token=agent_token,
        ),
        Client(three.participant("insurer")) as insurer,
        Client(three.participant("hospital"), token=agent_token) as own,
    ):
        result = await insurer.call(
            "hospital/records.relay", {"sample": "S-1", "patient_id": "P-9"}, timeout=15
        )
        # The same call with no task of the insurer running: our own data, the id may go.
        mine = await own.call("lab/echo.say", {"sample": "S-2", "patient_id": "P-1"}, timeout=10)
    assert result.output["lab"] == {"sample": "S-1"}, "the insurer's patient id stayed home"
    assert mine.output["echo"] == {"sample": "S-2", "patient_id": "P-1"}


async def test_a_parent_task_the_caller_does_not_serve_is_refused_and_recorded(
    three: LocalFederation,
) -> None:
    tokens = token_authority(three["hospital"].config)
    agent_token = tokens.issue("records-svc", agents=["records"], calls=["lab/echo.*"])
    other = tokens.issue("billing", calls=["lab/echo.*"])
    started, release = asyncio.Event(), asyncio.Event()
    async with (
        serving(three.participant("lab"), echo_agent()),
        serving(
            three.participant("hospital"),
            relay_agent(three.participant("hospital"), agent_token, started, release),
            token=agent_token,
        ),
        Client(three.participant("insurer")) as insurer,
        Client(three.participant("hospital"), token=other) as billing,
    ):
        running = asyncio.ensure_future(
            insurer.call(
                "hospital/records.relay",
                {"sample": "S", "patient_id": "P"},
                timeout=15,
                task_id="served-1",
            )
        )
        await asyncio.wait_for(started.wait(), 10)
        with pytest.raises(PermissionDenied, match="not a task that the caller's agent"):
            await billing.call(
                "lab/echo.say",
                {"patient_id": "P"},
                timeout=10,
                parent_task_id="served-1",
                task_id="sneak-1",
            )
        release.set()
        await running
    assert await eventually(lambda: three["hospital"].audit.query(task_id="sneak-1"), 5)
    (record,) = three["hospital"].audit.query(task_id="sneak-1")
    assert record.kind == "rejected" and record.status == "PERMISSION_DENIED"
    assert not three["lab"].audit.query(task_id="sneak-1"), "nothing went to the lab"
