"""The refusal log: every refusal shows, a flood of them costs bounded storage (issue 11 #4)."""

from __future__ import annotations

import re
import time

from gateway.audit.chain import AuditRecord
from gateway.audit.store import MemoryAuditStore
from gateway.errors import PermissionDenied, ResourceExhausted
from gateway.exchange.refusals import RefusalLog
from gateway.exchange.tasks import TaskSpec
from tests.integration.federation import eventually


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spec(n: int = 0, **names: str) -> TaskSpec:
    values = {"task_id": f"t-{n}", "target_org": "hospital", "agent": "echo", "skill": "say"}
    values.update(names)
    return TaskSpec(input={}, **values)  # type: ignore[arg-type]


LIMITED = ResourceExhausted("organization 'lab' exceeded its rate of 5 requests/s: retry later")


def aggregated(records: list[AuditRecord]) -> int:
    total = 0
    for record in records:
        match = re.match(r"^(\d+) more refusals", record.detail)
        total += int(match.group(1)) if match else 1
    return total


async def test_a_flood_costs_the_first_records_and_one_aggregate() -> None:
    audit, clock = MemoryAuditStore(), Clock()
    refusals = RefusalLog(audit, window_seconds=60, full_per_window=3, clock=clock)
    for n in range(1000):
        await refusals.record(spec(n), "lab", LIMITED, started=time.monotonic())
    assert [r.task_id for r in audit.rows] == ["t-0", "t-1", "t-2"]
    await refusals.flush()
    *full, aggregate = audit.rows
    assert len(full) == 3
    assert aggregate.detail.startswith(
        "997 more refusals (RESOURCE_EXHAUSTED) of organization 'lab' in 0 s, not recorded one by "
        "one (the first 3 of every 60 s are); the last: organization 'lab' exceeded its rate"
    )
    assert (aggregate.kind, aggregate.task_id, aggregate.peer_org) == ("rejected", "-", "lab")
    assert aggregate.decision == "denied" and aggregate.status == "RESOURCE_EXHAUSTED"
    assert aggregated(audit.rows) == 1000
    assert (refusals.seen, refusals.recorded) == (1000, 3)


async def test_the_aggregate_is_written_when_the_window_ends() -> None:
    audit, clock = MemoryAuditStore(), Clock()
    refusals = RefusalLog(audit, window_seconds=0.01, full_per_window=1, clock=clock)
    for n in range(5):
        await refusals.record(spec(n), "lab", LIMITED, started=time.monotonic())
    assert await eventually(lambda: len(audit.rows) == 2), "the window's end writes its count"
    assert audit.rows[1].detail.startswith("4 more refusals")
    clock.now += 1  # a new window: its first refusal is recorded in full again
    await refusals.record(spec(9), "lab", LIMITED, started=time.monotonic())
    assert audit.rows[-1].task_id == "t-9"


async def test_each_source_and_status_has_its_own_window() -> None:
    audit, clock = MemoryAuditStore(), Clock()
    refusals = RefusalLog(audit, full_per_window=2, clock=clock)
    denied = PermissionDenied("organization 'mallory' is not a peer of 'hospital'")
    for n in range(50):
        await refusals.record(spec(n), "lab", LIMITED, started=time.monotonic())
        await refusals.record(
            spec(n), "mallory", denied, started=time.monotonic(), source="sha256:aa"
        )
        await refusals.record(
            spec(n), "mallory", denied, started=time.monotonic(), source="sha256:bb"
        )
    await refusals.record(spec(99), "insurer", LIMITED, started=time.monotonic())
    assert any(r.peer_org == "insurer" and r.task_id == "t-99" for r in audit.rows), (
        "lab's flood did not spend insurer's full records"
    )
    await refusals.flush()
    by_source = [r.detail for r in audit.rows if r.detail.startswith("48 more")]
    assert len(by_source) == 3
    assert any("the certificate sha256:aa (organization 'mallory')" in d for d in by_source)
    assert aggregated(audit.rows) == 151


async def test_records_that_close_an_exchange_are_never_sampled() -> None:
    audit = MemoryAuditStore()
    refusals = RefusalLog(audit, full_per_window=1)
    for n in range(20):
        await refusals.record(spec(n), "lab", LIMITED, started=time.monotonic(), kind="failed")
        await refusals.record(spec(n), "lab", LIMITED, started=time.monotonic(), kind="canceled")
    assert len(audit.rows) == 40


async def test_huge_names_and_nul_characters_are_recorded_bounded() -> None:
    audit = MemoryAuditStore()
    refusals = RefusalLog(audit)
    huge = "a\x00" * 100_000
    await refusals.record(
        spec(task_id=huge, agent=huge, skill=huge, requester=huge),
        "lab\x00x",
        PermissionDenied(f"refused {huge}"),
        started=time.monotonic(),
    )
    (record,) = audit.rows
    assert len(record.task_id) <= 256 and len(record.agent) <= 128 and len(record.detail) <= 2000
    assert "\x00" not in record.task_id + record.detail + record.peer_org
    assert record.agent.startswith("a\\0a\\0")


async def test_a_store_outage_does_not_hide_the_refusal() -> None:
    audit = MemoryAuditStore()
    audit.fail_writes = True
    refusals = RefusalLog(audit)
    await refusals.record(spec(), "lab", LIMITED, started=time.monotonic())  # does not raise
    assert audit.rows == []


async def test_one_log_per_store() -> None:
    audit = MemoryAuditStore()
    assert RefusalLog.for_store(audit) is RefusalLog.for_store(audit)
    assert RefusalLog.for_store(MemoryAuditStore()) is not RefusalLog.for_store(audit)


async def test_a_denied_invoke_is_sampled_like_a_rejection() -> None:
    audit = MemoryAuditStore()
    refusals = RefusalLog(audit, full_per_window=2)
    denied = PermissionDenied("agent skill echo.say of 'hospital' is not shared with 'lab'")
    for n in range(30):
        await refusals.record(
            spec(n), "lab", denied, started=time.monotonic(), kind="invoke_denied"
        )
    await refusals.flush()
    assert [r.kind for r in audit.rows] == ["invoke_denied"] * 3
    assert aggregated(audit.rows) == 30
