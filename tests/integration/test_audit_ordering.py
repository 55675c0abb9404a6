"""The order of an exchange's two writes on a gateway: the audit record, then the task table.

1. A task's result is never in the task table before its `result_released` record is committed:
   a crash in between would leave a result that GetTask (and a restart) could release unaudited.
2. A requester that leaves while `request_received` commits leaves no 'working' row that nothing
   ends (GetTask would say WORKING until a restart, and the restart would run the abandoned task).
3. A request record that commits as its requester leaves is closed by a 'canceled' record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.audit.store import AuditEvent
from gateway.exchange.router import STREAM_CLOSED
from gateway.exchange.router_base import REQUESTER_GONE
from gateway.local import LocalFederation
from participant_sdk import Client
from tests.integration.federation import echo_agent, eventually, serving


def _before(owner: Any, name: str, hook: Callable[..., Awaitable[None]]) -> None:
    """Make the async method `owner.name` await `hook` (given the same arguments) first."""
    method = getattr(owner, name)

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        await hook(*args, **kwargs)
        return await method(*args, **kwargs)

    setattr(owner, name, wrapped)


def _hold(
    fed: LocalFederation,
    kind: str,
    gate: asyncio.Event,
    held: asyncio.Event,
    org: str = "hospital",
) -> None:
    """Make `org`'s audit store wait on `gate` before committing a `kind` record."""

    async def wait(event: AuditEvent) -> None:
        if event.kind == kind:
            held.set()
            await gate.wait()

    _before(fed[org].audit, "append", wait)


def _steps(fed: LocalFederation, org: str) -> list[asyncio.Task[Any]]:
    """The tasks that run `org`'s record-then-accept step, to see when a cancel reaches one."""
    tasks: list[asyncio.Task[Any]] = []

    async def note(*_: Any, **__: Any) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]

    _before(fed[org].router, "_record_then_accept", note)
    return tasks


@pytest.mark.parametrize(
    ("org", "kind"), [("hospital", "result_released"), ("insurer", "result_received")]
)
async def test_result_is_not_kept_before_its_audit_record_commits(
    fed: LocalFederation, org: str, kind: str
) -> None:
    gate, held = asyncio.Event(), asyncio.Event()
    _hold(fed, kind, gate, held, org)
    async with (
        serving(fed.participant("hospital"), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        call = asyncio.ensure_future(
            client.call("hospital/echo.say", {"n": 1}, timeout=10, task_id="order-1")
        )
        try:
            await asyncio.wait_for(held.wait(), 5)
            await asyncio.sleep(0.3)  # the task table's writer has had time to commit
            # Both gateways key the task by its origin, the insurer.
            row = await fed[org].router.tasks.by_task_id("insurer", "order-1")
            assert row is not None
            assert row.result is None, (
                f"the result is in the task table while its {kind} record is not committed: "
                "a crash now leaves it for GetTask or a retry to release unaudited"
            )
        finally:
            gate.set()
            await call


async def test_requester_leaving_during_the_admission_record_leaves_no_working_row(
    fed: LocalFederation,
) -> None:
    gate, held = asyncio.Event(), asyncio.Event()
    _hold(fed, "request_received", gate, held)
    steps = _steps(fed, "hospital")
    async with (
        serving(fed.participant("hospital"), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        call = asyncio.ensure_future(
            client.call("hospital/echo.say", {"n": 1}, timeout=30, task_id="order-2")
        )
        await asyncio.wait_for(held.wait(), 5)
        call.cancel()  # the requester changes its mind while the record commits
        await asyncio.gather(call, return_exceptions=True)
        assert await eventually(lambda: steps[0].cancelling()), "the cancel reached the hospital"
        gate.set()
        deadline = time.monotonic() + 3
        row = await fed["hospital"].router.tasks.by_task_id("insurer", "order-2")
        while row is not None and row.result is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            row = await fed["hospital"].router.tasks.by_task_id("insurer", "order-2")
        assert fed["hospital"].router.in_flight == 0
        assert row is None or row.result is not None, (
            "the task row stays 'working' with nothing running it: GetTask says WORKING until a "
            "restart, and the restart runs the task its requester abandoned"
        )


def _hold_accept(fed: LocalFederation, org: str, gate: asyncio.Event, held: asyncio.Event) -> None:
    """Make `org`'s task table wait on `gate` before it takes a task's key."""

    async def wait(*_: Any, **__: Any) -> None:
        held.set()
        await gate.wait()

    _before(fed[org].router.tasks, "accept", wait)


@pytest.mark.parametrize("step", ["record", "accept"])
@pytest.mark.parametrize(
    ("org", "kind"), [("hospital", "request_received"), ("insurer", "request_sent")]
)
async def test_a_request_record_committed_as_the_requester_leaves_is_closed(
    fed: LocalFederation, org: str, kind: str, step: str
) -> None:
    """The audit writer commits a record whose writer went away (and the table takes the key);
    the task's records must not be left open (a request with no outcome), so a closing
    'canceled' record follows, and the key is given back."""
    gate, held = asyncio.Event(), asyncio.Event()
    if step == "record":
        _hold(fed, kind, gate, held, org)
    else:
        _hold_accept(fed, org, gate, held)
    steps = _steps(fed, org)
    async with (
        serving(fed.participant("hospital"), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        call = asyncio.ensure_future(
            client.call("hospital/echo.say", {"n": 1}, timeout=30, task_id="order-3")
        )
        await asyncio.wait_for(held.wait(), 5)
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        assert await eventually(lambda: steps[0].cancelling()), f"the cancel reached {org}"
        gate.set()
        for _ in range(150):
            if len(fed[org].audit.query(task_id="order-3")) >= 2:
                break
            await asyncio.sleep(0.02)
    records = sorted(fed[org].audit.query(task_id="order-3"), key=lambda r: r.sequence)
    assert [r.kind for r in records] == [kind, "canceled"]
    assert records[-1].status == "CANCELLED"
    assert records[-1].detail == {"hospital": STREAM_CLOSED, "insurer": REQUESTER_GONE}[org]
    assert fed[org].router.in_flight == 0
    assert await fed[org].router.tasks.by_task_id("insurer", "order-3") is None
    assert fed[org].audit.verify(org, fed[org].router.verifier).ok
