"""Every path of an exchange leaves the expected audit records on both sides, and the chains verify."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.audit import MemoryAuditStore
from gateway.local import LocalFederation
from participant_sdk import Client, DeadlineExceeded, PermissionDenied, TaskFailed, Unavailable
from tests.conftest import Pki
from tests.integration.federation import (
    boom_agent,
    configs,
    echo_agent,
    records_agent,
    serving,
    slow_agent,
)


def kinds(fed: LocalFederation, org: str, task_id: str) -> list[str]:
    return [r.kind for r in sorted(fed[org].audit.query(task_id=task_id), key=lambda r: r.sequence)]


def assert_chains_verify(fed: LocalFederation) -> None:
    for org, gateway in fed.gateways.items():
        report = gateway.audit.verify(org, gateway.router.verifier)
        assert report.ok, report.problems


async def test_success_leaves_four_records_with_matching_digests(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), records_agent()),
        Client(fed.participant("insurer"), requester="adjuster-7") as client,
    ):
        result = await client.call(
            "hospital/records.summary", {"patient_id": "P-1"}, timeout=10, task_id="ok-1"
        )
    assert kinds(fed, "insurer", "ok-1") == ["request_sent", "result_received"]
    assert kinds(fed, "hospital", "ok-1") == ["request_received", "result_released"]
    sent, received = sorted(fed["insurer"].audit.query(task_id="ok-1"), key=lambda r: r.sequence)
    got, released = sorted(fed["hospital"].audit.query(task_id="ok-1"), key=lambda r: r.sequence)
    assert sent.digest_after == got.digest_before, "what left A is what B received"
    assert released.digest_after == received.digest_after, "what B released is what A received"
    assert released.digest_before != released.digest_after
    assert "patient.name" in released.withheld_paths
    assert ("patient.ssn", "masked") in released.transformed
    assert released.receipt is not None and received.receipt == released.receipt
    assert released.requester == "adjuster-7" and received.requester == "adjuster-7"
    assert released.policy_version == result.policy_version
    assert_chains_verify(fed)


async def test_no_withheld_value_reaches_either_audit_log(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), records_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        await client.call(
            "hospital/records.summary", {"patient_id": "P-1"}, timeout=10, task_id="leak-1"
        )
    for org in ("hospital", "insurer"):
        text = repr(fed[org].audit.query(task_id="leak-1"))
        for secret in ("Ada Lovelace", "123-45-6789", "INS-99887766", "12 Analytical Row"):
            assert secret not in text, (org, secret)


async def test_denied_invoke_is_recorded_on_both_sides(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), echo_agent("triage")),
        Client(fed.participant("insurer")) as client,
    ):
        with pytest.raises(PermissionDenied):
            await client.call("hospital/triage.say", {}, timeout=5, task_id="deny-1")
    assert kinds(fed, "hospital", "deny-1") == ["invoke_denied"]
    (denied,) = fed["hospital"].audit.query(task_id="deny-1")
    assert denied.detail == "no invoke rule allows it"
    assert kinds(fed, "insurer", "deny-1") == ["request_sent", "failed"]
    assert_chains_verify(fed)


async def test_unknown_agent_is_recorded_with_its_real_reason(fed: LocalFederation) -> None:
    async with Client(fed.participant("insurer")) as client:
        with pytest.raises(PermissionDenied):
            await client.call("hospital/nosuch.say", {}, timeout=5, task_id="ghost-1")
    (denied,) = fed["hospital"].audit.query(task_id="ghost-1")
    assert denied.kind == "invoke_denied" and denied.detail == "no agent instance has this skill"


async def test_agent_failure_is_recorded_on_both_sides(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), boom_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        with pytest.raises(TaskFailed):
            await client.call("hospital/boom.fail", {}, timeout=5, task_id="boom-1")
    assert kinds(fed, "hospital", "boom-1") == ["request_received", "failed"]
    assert kinds(fed, "insurer", "boom-1") == ["request_sent", "failed"]
    (_, failed) = sorted(fed["hospital"].audit.query(task_id="boom-1"), key=lambda r: r.sequence)
    assert "4242" not in repr(failed)


async def test_cancel_is_recorded_on_both_sides(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), slow_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        updates = client.stream(
            "hospital/slow.wait", {"seconds": 30}, timeout=20, task_id="cancel-1"
        )
        await anext(updates)
        await client.cancel("cancel-1")
        _ = [u async for u in updates]
        for _ in range(100):
            if "canceled" in kinds(fed, "hospital", "cancel-1"):
                break
            await asyncio.sleep(0.05)
    assert kinds(fed, "insurer", "cancel-1") == ["request_sent", "canceled"]
    assert kinds(fed, "hospital", "cancel-1") == ["request_received", "canceled"]


async def test_deadline_is_recorded_on_both_sides(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), slow_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        with pytest.raises(DeadlineExceeded):
            await client.call("hospital/slow.wait", {"seconds": 30}, timeout=1, task_id="late-1")
    for _ in range(100):  # both gateways record the end on their own, each within moments
        if len(kinds(fed, "insurer", "late-1")) == 2 and len(kinds(fed, "hospital", "late-1")) == 2:
            break
        await asyncio.sleep(0.05)
    assert kinds(fed, "insurer", "late-1") == ["request_sent", "failed"]
    assert kinds(fed, "hospital", "late-1") == ["request_received", "failed"]
    statuses = {r.status for r in fed["hospital"].audit.query(task_id="late-1")}
    assert "DEADLINE_EXCEEDED" in statuses


async def test_outbound_over_the_limits_is_refused_and_recorded(fed: LocalFederation) -> None:
    deep: dict = {}
    node = deep
    for _ in range(33):
        node["x"] = {}
        node = node["x"]
    from participant_sdk import InvalidArgument

    async with Client(fed.participant("hospital")) as client:
        with pytest.raises(InvalidArgument, match="nested deeper than 32"):
            await client.call("insurer/echo.say", deep, timeout=5, task_id="deep-1")
    assert kinds(fed, "hospital", "deep-1") == ["rejected"]


async def test_failing_store_refuses_exchanges_then_recovers(tmp_path: Path, pki: Pki) -> None:
    store = MemoryAuditStore()
    async with LocalFederation(configs(tmp_path, pki), audits={"hospital": store}) as fed:
        async with (
            serving(fed.participant("hospital"), echo_agent()),
            Client(fed.participant("insurer")) as client,
        ):
            store.fail_writes = True
            with pytest.raises(Unavailable, match="audit store cannot be written"):
                await client.call("hospital/echo.say", {"n": 1}, timeout=5, task_id="down-1")
            assert not store.healthy
            store.fail_writes = False
            result = await client.call("hospital/echo.say", {"n": 2}, timeout=5, task_id="up-1")
        assert result.output["echo"] == {"n": 2}
        assert store.healthy
        assert kinds(fed, "hospital", "up-1") == ["request_received", "result_released"]
        assert kinds(fed, "hospital", "down-1") == []
        assert_chains_verify(fed)


async def test_failing_requester_store_sends_nothing(tmp_path: Path, pki: Pki) -> None:
    store = MemoryAuditStore()
    seen: list[str] = []
    from participant_sdk import Agent

    echo = Agent("echo")

    @echo.skill
    async def say(task, data):  # type: ignore[no-untyped-def]
        seen.append(task.task_id)
        return {}

    async with (
        LocalFederation(configs(tmp_path, pki), audits={"insurer": store}) as fed,
        serving(fed.participant("hospital"), echo),
        Client(fed.participant("insurer")) as client,
    ):
        store.fail_writes = True
        with pytest.raises(Unavailable, match="audit store cannot be written"):
            await client.call("hospital/echo.say", {}, timeout=5, task_id="quiet-1")
    assert seen == [], "no request leaves without its durable request_sent record"
