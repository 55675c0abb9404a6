"""Multi-hop: an agent of hospital, serving insurer's task, calls an agent of lab."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.identity.signing import SignedReceipt, Verifier, verify_receipt
from gateway.local import LocalFederation
from participant_sdk import Agent, Client, TaskContext
from tests.conftest import Pki
from tests.integration.federation import eventually, org_config, serving

HOSPITAL = """\
p, insurer, records, relay, invoke, *, allow
p, insurer, records, relay, share, **, allow
# The receipts of the organizations our agent consulted go to the insurer too (default: not).
p, insurer, records, relay, share, @provenance, allow
# What goes on to the lab: the sample always; the patient id only when the data is our own,
# not when we are serving another organization's request.
p, lab, tests, run, send, sample, allow
p, lab, tests, run, send, patient_id, allow, origin!=insurer
"""
INSURER = "p, hospital, records, relay, send, **, allow\n"
LAB = """\
p, hospital, tests, run, invoke, *, allow
p, hospital, tests, run, share, result, allow
"""


@pytest.fixture
async def three(tmp_path: Path, pki: Pki) -> AsyncIterator[LocalFederation]:
    paths = [
        org_config(tmp_path, pki, "hospital", HOSPITAL, ["insurer", "lab"]),
        org_config(tmp_path, pki, "insurer", INSURER, ["hospital"]),
        org_config(tmp_path, pki, "lab", LAB, ["hospital"]),
    ]
    async with LocalFederation(paths) as fed:
        yield fed


def lab_agent(seen: list[dict], cancelled: list[str], delay: float = 0.0) -> Agent:
    tests = Agent("tests")

    @tests.skill
    async def run(task: TaskContext, data: dict) -> dict:
        seen.append({"data": data, "deadline": task.deadline, "org": task.requester_org})
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            cancelled.append(task.task_id)
            raise
        return {"result": "negative", "lab_internal": "machine-7"}

    return tests


def relay_agent() -> Agent:
    records = Agent("records")

    @records.skill
    async def relay(task: TaskContext, data: dict) -> dict:
        lab = await task.call(
            "lab/tests.run", {"sample": data["sample"], "patient_id": data["patient_id"]}
        )
        return {"lab": lab.output, "via": "hospital"}

    return records


async def test_result_carries_provenance_and_policy_sees_the_origin(
    three: LocalFederation, pki: Pki
) -> None:
    seen: list[dict] = []
    async with (
        serving(three.participant("lab"), lab_agent(seen, [])),
        serving(three.participant("hospital"), relay_agent()),
        Client(three.participant("insurer")) as client,
    ):
        deadline = time.time() + 10
        result = await client.call(
            "hospital/records.relay", {"sample": "S-1", "patient_id": "P-9"}, timeout=10
        )
    assert result.output == {"lab": {"result": "negative"}, "via": "hospital"}
    (lab_call,) = seen
    assert lab_call["data"] == {"sample": "S-1"}, (
        "data from insurer did not go on to lab with its id"
    )
    assert lab_call["org"] == "hospital"
    assert lab_call["deadline"] <= deadline + 0.5, "the deadline travelled along"
    assert result.receipt is not None and result.receipt["responder_org"] == "hospital"
    (lab_receipt,) = result.provenance
    # No lab rule names lab_internal, so the withheld path does not either (issue 11 #3).
    assert lab_receipt["responder_org"] == "lab" and lab_receipt["withheld_paths"] == ["*"]
    verify_receipt(
        Verifier.from_file(pki.ca), SignedReceipt.from_json(lab_receipt), expected_org="lab"
    )


async def test_nothing_about_sub_tasks_leaves_without_a_provenance_rule(
    tmp_path: Path, pki: Pki
) -> None:
    """Issue 11 #2: the lab's receipt (and that the lab was consulted at all) stays with the
    hospital unless its share policy lets provenance go to the insurer."""
    without = HOSPITAL.replace("p, insurer, records, relay, share, @provenance, allow\n", "")
    paths = [
        org_config(tmp_path, pki, "hospital", without, ["insurer", "lab"]),
        org_config(tmp_path, pki, "insurer", INSURER, ["hospital"]),
        org_config(tmp_path, pki, "lab", LAB, ["hospital"]),
    ]
    seen: list[dict] = []
    async with (
        LocalFederation(paths) as fed,
        serving(fed.participant("lab"), lab_agent(seen, [])),
        serving(fed.participant("hospital"), relay_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        result = await client.call(
            "hospital/records.relay", {"sample": "S-1", "patient_id": "P-9"}, timeout=10
        )
    assert seen and result.output["lab"] == {"result": "negative"}
    assert result.provenance == ()
    records = fed["insurer"].audit.query(task_id=result.task_id)
    assert all("lab" not in repr(r.receipt) for r in records)


async def test_own_data_may_go_on_with_its_id(three: LocalFederation) -> None:
    seen: list[dict] = []
    async with (
        serving(three.participant("lab"), lab_agent(seen, [])),
        Client(three.participant("hospital")) as client,
    ):
        await client.call("lab/tests.run", {"sample": "S-2", "patient_id": "P-1"}, timeout=10)
    assert seen[0]["data"] == {"sample": "S-2", "patient_id": "P-1"}


async def test_cancel_travels_down_every_hop(three: LocalFederation) -> None:
    started: list[dict] = []
    cancelled: list[str] = []
    async with (
        serving(three.participant("lab"), lab_agent(started, cancelled, delay=30)),
        serving(three.participant("hospital"), relay_agent()),
        Client(three.participant("insurer")) as client,
    ):
        updates = client.stream(
            "hospital/records.relay",
            {"sample": "S", "patient_id": "P"},
            timeout=20,
            task_id="hop-cancel-1",
        )
        await anext(updates)
        for _ in range(100):  # the lab's skill runs: the cancel must reach a running skill
            if started:
                break
            await asyncio.sleep(0.05)
        assert started and three["lab"].router.in_flight
        assert await client.cancel("hop-cancel-1") == "canceled"
        _ = [u async for u in updates]
        for _ in range(100):
            if cancelled:
                break
            await asyncio.sleep(0.05)
    assert len(cancelled) == 1, "the lab's agent saw the cancel"
    # each hop ends its task as the cancel's answer comes back up
    await eventually(
        lambda: not any(three[o].router.in_flight for o in ("insurer", "hospital", "lab"))
    )
    for org in ("insurer", "hospital", "lab"):
        assert three[org].router.in_flight == 0, org
