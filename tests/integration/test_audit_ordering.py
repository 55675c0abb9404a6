"""A step of an exchange commits its audit record and its task-table write in one transaction,
and a task does not end because its caller went away.

1. A task's result is never in the task table before its `result_released` record is committed,
   and never the record without the row: a crash in between would leave a result that GetTask
   (and a restart) could release unaudited, or a record of a release the table does not know.
2. A requester that leaves while `request_received` commits does not cancel the task: it runs,
   its result is kept for collection (`result_kept`), and a re-call with its key collects it
   under the same task id, recorded on both sides (issue 15 #2).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.audit.store import AuditEvent
from gateway.local import LocalFederation
from participant_sdk import Client
from tests.integration.federation import echo_agent, eventually, serving


def _hold(
    fed: LocalFederation,
    kind: str,
    gate: asyncio.Event,
    held: asyncio.Event,
    org: str = "hospital",
) -> None:
    """Make `org`'s store wait on `gate` before committing a step with a `kind` record."""
    store = fed[org].audit
    write = store.write

    async def wait(events: AuditEvent | Sequence[AuditEvent] | None, op: Any = None) -> Any:
        listed = [events] if isinstance(events, AuditEvent) else list(events or ())
        if any(event.kind == kind for event in listed):
            held.set()
            await gate.wait()
        return await write(events, op)

    store.write = wait  # type: ignore[method-assign]


def _kinds(fed: LocalFederation, org: str, task_id: str) -> list[str]:
    return [r.kind for r in sorted(fed[org].audit.query(task_id=task_id), key=lambda r: r.sequence)]


@pytest.mark.parametrize(
    ("org", "kind"), [("hospital", "result_released"), ("insurer", "result_received")]
)
async def test_a_result_and_its_record_commit_together(
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
            # Both gateways key the task by its origin, the insurer.
            row = await fed[org].router.tasks.by_task_id("insurer", "order-1")
            assert row is not None and row.result is None, (
                f"the result is in the task table while its {kind} record is not committed"
            )
            assert kind not in _kinds(fed, org, "order-1")
        finally:
            gate.set()
        result = await call
    row = await fed[org].router.tasks.by_task_id("insurer", "order-1")
    assert row is not None and row.result is not None and result.ok
    assert kind in _kinds(fed, org, "order-1")


@pytest.mark.parametrize(
    ("org", "kind"), [("hospital", "request_received"), ("insurer", "request_sent")]
)
async def test_a_requester_leaving_does_not_end_the_task_and_a_recall_collects_it(
    fed: LocalFederation, org: str, kind: str
) -> None:
    gate, held = asyncio.Event(), asyncio.Event()
    _hold(fed, kind, gate, held, org)
    async with (
        serving(fed.participant("hospital"), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        call = asyncio.ensure_future(
            client.call(
                "hospital/echo.say",
                {"n": 1},
                timeout=30,
                task_id="order-2",
                idempotency_key="order-key-2",
            )
        )
        await asyncio.wait_for(held.wait(), 5)
        call.cancel()  # the requester goes away while the record commits
        await asyncio.gather(call, return_exceptions=True)
        gate.set()
        assert await eventually(lambda: fed["insurer"].router.in_flight == 0, 10)
        assert await eventually(lambda: fed["hospital"].router.in_flight == 0, 10)
        # A re-call with the key, and a new task id, collects what ran.
        again = await client.call(
            "hospital/echo.say",
            {"n": 1},
            timeout=10,
            task_id="order-2-again",
            idempotency_key="order-key-2",
        )
    assert again.ok and again.task_id == "order-2" and again.output["echo"] == {"n": 1}
    insurer = _kinds(fed, "insurer", "order-2")
    hospital = _kinds(fed, "hospital", "order-2")
    assert insurer == ["request_sent", "result_received"]
    assert hospital[:2] in (
        ["request_received", "result_released"],
        ["request_received", "result_kept"],
    )
    assert not fed["insurer"].audit.query(task_id="order-2-again")
    assert not fed["hospital"].audit.query(task_id="order-2-again")
    for each in ("hospital", "insurer"):
        assert fed[each].audit.verify(each, fed[each].router.verifier).ok
