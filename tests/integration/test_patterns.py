"""Retries, fallback routes and fan-out against real gateways (hospital and insurer, over mTLS)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.local import LocalFederation
from participant_sdk import (
    AllRoutesFailed,
    Client,
    NoAgreement,
    NotFound,
    PermissionDenied,
    RetryPolicy,
    TaskFailed,
    Unavailable,
    majority,
    quorum,
)
from tests.conftest import Pki
from tests.integration.federation import (
    HOSPITAL_RULES,
    claims_agent,
    configs,
    echo_agent,
    eventually,
    serving,
    slow_agent,
    stock_agent,
)

# `lab` is a peer of both gateways whose gateway is not running: nothing listens at its address.
UNREACHABLE_PEER = '[peers.lab]\naddress = "127.0.0.1:1"\n'

# The hospital shares three stock agents with the insurer: `in_stock` from each; from `ledger`
# only the price, so its `in_stock` is withheld.
STOCK_RULES = HOSPITAL_RULES + "".join(
    f"p, insurer, {agent}, check, invoke, *, allow\n"
    f"p, insurer, {agent}, check, send, item, allow\n"
    f"p, insurer, {agent}, check, share, {fields}, allow\n"
    for agent, fields in (
        ("pricing", "in_stock"),
        ("inventory", "in_stock"),
        ("warehouse", "in_stock"),
        ("ledger", "price"),
    )
)
PATIENCE = RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.3)


@pytest.fixture
async def lab_fed(tmp_path: Path, pki: Pki) -> AsyncIterator[LocalFederation]:
    """hospital and insurer, plus a peer `lab` that is configured but down, and stock agents."""
    async with LocalFederation(
        configs(tmp_path, pki, hospital_rules=STOCK_RULES, extra=UNREACHABLE_PEER)
    ) as fed:
        yield fed


# ---- fallback routes --------------------------------------------------------------------


async def test_fallback_from_a_denied_target_to_a_shared_one(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), echo_agent(), echo_agent("triage")),
        Client(fed.participant("insurer")) as client,
    ):
        outcome = await client.call_first(
            ["hospital/triage.say", "hospital/echo.say"], {"q": 1}, timeout=10
        )
    assert outcome.target == "hospital/echo.say"
    assert outcome.output["echo"] == {"q": 1}
    ((target, error),) = outcome.attempts
    assert target == "hospital/triage.say" and isinstance(error, PermissionDenied)
    assert (
        "agent skill triage.say of 'hospital' does not exist or is not shared with organization "
        "'insurer'" in error.message
    )


async def test_fallback_from_an_unknown_local_agent_to_a_partner(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("insurer"), echo_agent()),
        Client(fed.participant("hospital")) as client,
    ):
        outcome = await client.call_first(
            ["hospital/ghost.walk", "pharmacy/stock.check", "insurer/echo.say"],
            {"n": 2},
            timeout=10,
        )
    assert outcome.target == "insurer/echo.say"
    assert outcome.output == {"echo": {"n": 2}, "requester_org": "hospital", "instance": "echo"}
    (ghost, ghost_error), (pharmacy, pharmacy_error) = outcome.attempts
    assert (ghost, type(ghost_error)) == ("hospital/ghost.walk", NotFound)
    assert "agent 'ghost' is not connected" in ghost_error.message
    assert (pharmacy, type(pharmacy_error)) == ("pharmacy/stock.check", NotFound)
    assert "'pharmacy' is not a peer" in pharmacy_error.message


async def test_fallback_from_an_unreachable_peer_to_a_working_one(lab_fed: LocalFederation) -> None:
    async with (
        serving(lab_fed.participant("insurer"), claims_agent()),
        Client(lab_fed.participant("hospital")) as client,
    ):
        outcome = await client.call_first(
            ["lab/claims.check", "insurer/claims.check"], {"claim": {"amount": 420}}, timeout=10
        )
    assert outcome.target == "insurer/claims.check"
    assert outcome.output == {"approved": True, "covered_amount": 420}
    ((target, error),) = outcome.attempts
    assert target == "lab/claims.check" and isinstance(error, Unavailable)
    assert "organization 'lab' at 127.0.0.1:1 is unreachable" in error.message


async def test_fallback_from_a_failing_agent_to_a_working_one(fed: LocalFederation) -> None:
    from tests.integration.federation import boom_agent

    async with (
        serving(fed.participant("hospital"), boom_agent(), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        outcome = await client.call_first(
            ["hospital/boom.fail", "hospital/echo.say"], {}, timeout=10
        )
    ((target, error),) = outcome.attempts
    assert target == "hospital/boom.fail" and isinstance(error, TaskFailed)
    assert error.result.state == "failed"
    assert error.result.error is not None and error.result.error.code == "skill_error"
    assert outcome.target == "hospital/echo.say"


async def test_all_routes_failed_carries_every_attempt(lab_fed: LocalFederation) -> None:
    async with Client(lab_fed.participant("hospital")) as client:
        with pytest.raises(AllRoutesFailed) as info:
            await client.call_first(["lab/claims.check", "insurer/claims.check"], {}, timeout=10)
    (lab, lab_error), (insurer, insurer_error) = info.value.attempts
    assert (lab, type(lab_error)) == ("lab/claims.check", Unavailable)
    assert (insurer, type(insurer_error)) == ("insurer/claims.check", PermissionDenied)
    assert (
        "agent skill claims.check of 'insurer' does not exist or is not shared"
        in insurer_error.message
    )
    assert info.value.message.startswith(
        "all 2 routes failed: lab/claims.check: Unavailable: organization 'lab' at 127.0.0.1:1 is "
        "unreachable"
    )


# ---- fan-out ----------------------------------------------------------------------------


async def test_first_success_cancels_the_slow_agent(fed: LocalFederation) -> None:
    cancelled: list[str] = []
    async with (
        serving(fed.participant("hospital"), slow_agent(cancelled), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        report = await client.fan_out(
            ["hospital/slow.wait", "hospital/echo.say"],
            {"seconds": 30},
            strategy="first_success",
            timeout=20,
        )
        await eventually(lambda: cancelled)
    assert report.winner == "hospital/echo.say"
    assert report.results["hospital/echo.say"].output["echo"] == {"seconds": 30}
    error = report.errors["hospital/slow.wait"]
    assert isinstance(error, TaskFailed) and error.result.state == "canceled"
    assert cancelled == [error.result.task_id], "the slow agent's skill was told to stop"
    await eventually(lambda: "canceled" in kinds(fed, "hospital", cancelled[0]))
    assert kinds(fed, "hospital", cancelled[0]) == ["request_received", "canceled"]
    # the record commits, then the task-table row, then the task leaves the count
    await eventually(
        lambda: not (fed["hospital"].router.in_flight or fed["insurer"].router.in_flight)
    )
    assert fed["hospital"].router.in_flight == 0 and fed["insurer"].router.in_flight == 0


async def test_all_reports_each_outcome(lab_fed: LocalFederation) -> None:
    async with (
        serving(lab_fed.participant("hospital"), echo_agent()),
        Client(lab_fed.participant("insurer")) as client,
    ):
        report = await client.fan_out(
            ["hospital/echo.say", "lab/echo.say", "hospital/nosuch.say"],
            {"x": 1},
            strategy="all",
            timeout=10,
        )
    assert list(report.results) == ["hospital/echo.say"]
    assert isinstance(report.errors["lab/echo.say"], Unavailable)
    assert isinstance(report.errors["hospital/nosuch.say"], PermissionDenied)
    assert not report.ok


async def test_majority_with_one_dissenter_reports_the_conflict(lab_fed: LocalFederation) -> None:
    async with (
        serving(
            lab_fed.participant("hospital"),
            stock_agent("pricing", in_stock=True),
            stock_agent("inventory", in_stock=False),
        ),
        serving(lab_fed.participant("insurer"), stock_agent("warehouse", in_stock=True)),
        Client(lab_fed.participant("insurer")) as client,
    ):
        report = await client.fan_out(
            ["hospital/pricing.check", "hospital/inventory.check", "insurer/warehouse.check"],
            {"item": "inhaler"},
            strategy=majority("in_stock"),
            timeout=10,
        )
    assert report.agreed and report.value is True
    assert report.conflicts == {
        "true": ("hospital/pricing.check", "insurer/warehouse.check"),
        "false": ("hospital/inventory.check",),
    }
    # The hospital's share policy let only `in_stock` leave; our own warehouse answered in full.
    assert report.results["hospital/pricing.check"].output == {"in_stock": True}
    assert report.results["insurer/warehouse.check"].output["source"] == "warehouse"
    assert report.errors == {}


async def test_pricing_and_inventory_disagreeing_is_no_agreement(lab_fed: LocalFederation) -> None:
    async with (
        serving(
            lab_fed.participant("hospital"),
            stock_agent("pricing", in_stock=True),
            stock_agent("inventory", in_stock=False),
        ),
        Client(lab_fed.participant("insurer")) as client,
    ):
        with pytest.raises(NoAgreement) as info:
            await client.fan_out(
                ["hospital/pricing.check", "hospital/inventory.check"],
                {"item": "inhaler"},
                strategy=majority("in_stock"),
                timeout=10,
            )
    assert str(info.value).splitlines() == [
        "majority(in_stock): no value reached 2 of 2 targets (best: 1, a tie; 0 failed, "
        "0 without the field)",
        "majority(in_stock): no agreement",
        "  true from hospital/pricing.check",
        "  false from hospital/inventory.check",
    ]
    assert info.value.report.conflicts == {
        "true": ("hospital/pricing.check",),
        "false": ("hospital/inventory.check",),
    }


async def test_a_withheld_field_does_not_vote(lab_fed: LocalFederation) -> None:
    async with (
        serving(
            lab_fed.participant("hospital"),
            stock_agent("pricing", in_stock=True),
            stock_agent("ledger", in_stock=False),
        ),
        Client(lab_fed.participant("insurer")) as client,
    ):
        with pytest.raises(NoAgreement) as info:
            await client.fan_out(
                ["hospital/pricing.check", "hospital/ledger.check", "lab/stock.check"],
                {"item": "inhaler"},
                strategy=quorum("in_stock", 2),
                timeout=10,
            )
    report = info.value.report
    assert "no value reached 2 of 3 targets (best: 1; 1 failed, 1 without the field)" in str(
        info.value
    )
    assert report.missing == ("hospital/ledger.check",)
    # No ledger rule names in_stock, so the withheld path does not either (issue 11 #3).
    assert report.results["hospital/ledger.check"].withheld == ("*",)
    assert isinstance(report.errors["lab/stock.check"], Unavailable)


# ---- retries ----------------------------------------------------------------------------


def kinds(fed: LocalFederation, org: str, task_id: str) -> list[str]:
    return [r.kind for r in sorted(fed[org].audit.query(task_id=task_id), key=lambda r: r.sequence)]


async def test_an_agent_that_is_not_connected_is_not_retried(fed: LocalFederation) -> None:
    """PERMISSION_DENIED from the partner is an answer, not an outage: one attempt, not fifty."""
    async with Client(fed.participant("insurer"), retry=PATIENCE) as client:
        started = time.monotonic()
        with pytest.raises(PermissionDenied) as info:
            await client.call("hospital/echo.say", {}, timeout=10, task_id="early-1")
    assert time.monotonic() - started < 2
    assert (
        "agent skill echo.say of 'hospital' does not exist or is not shared" in info.value.message
    )
    assert "gave up" not in info.value.message
    assert kinds(fed, "hospital", "early-1") == ["invoke_denied"]


async def test_an_unknown_local_agent_is_not_retried(fed: LocalFederation) -> None:
    async with Client(fed.participant("hospital"), retry=PATIENCE) as client:
        with pytest.raises(
            NotFound, match=r"^agent 'echo' is not connected to the gateway of 'hospital'$"
        ):
            await client.call("hospital/echo.say", {}, timeout=10)


async def test_a_call_outlives_a_restart_of_its_gateway(tmp_path: Path, pki: Pki) -> None:
    """The local gateway goes away and comes back on the same port: the call is retried through."""
    from gateway.config import load_config
    from gateway.server import Gateway

    paths = configs(tmp_path, pki)
    async with LocalFederation(paths) as fed:
        participant = fed.participant("hospital")
        text = paths[0].read_text()
        insurer = fed.federation("insurer")
        fixed = {
            '[participant]\nlisten = "127.0.0.1:0"': f'[participant]\nlisten = "{participant}"',
            '[peers.insurer]\naddress = "127.0.0.1:1"': f'[peers.insurer]\naddress = "{insurer}"',
        }
        for old, new in fixed.items():
            assert old in text, f"the test's config no longer has {old!r}"
            text = text.replace(old, new)
        paths[0].write_text(text)
        await fed["hospital"].stop(grace=0)
        second: Gateway | None = None
        try:
            async with (
                serving(fed.participant("insurer"), echo_agent()),
                Client(participant, retry=PATIENCE) as client,
            ):
                call = asyncio.ensure_future(
                    client.call(
                        "insurer/echo.say", {"after": "restart"}, timeout=15, task_id="restart-1"
                    )
                )
                await asyncio.sleep(0.5)
                assert not call.done(), "the call keeps retrying while the gateway is down"
                second = Gateway(load_config(paths[0]))
                await second.start()
                result = await asyncio.wait_for(call, 15)
            assert result.output["echo"] == {"after": "restart"}
            assert [r.kind for r in second.audit.query(task_id="restart-1")].count(
                "request_sent"
            ) == 1
        finally:
            if second is not None:
                with contextlib.suppress(Exception):
                    await second.stop(grace=0)


async def test_retries_give_up_at_the_deadline_against_a_gateway_that_stays_down(
    tmp_path: Path,
) -> None:
    async with Client("127.0.0.1:1", retry=PATIENCE) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await client.call("insurer/echo.say", {}, timeout=1.0)
    # within the deadline, but for how late a busy machine wakes the last backoff
    assert time.monotonic() - started < 1.0 + 0.5
    assert "the deadline leaves no time for another" in info.value.message
