"""Failure paths added after review: ownership of tasks, the breaker under bad input, recovery."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.audit.store import MemoryAuditStore, SqlAuditStore
from gateway.errors import Unavailable
from gateway.exchange.tasks import TaskSpec
from gateway.local import LocalFederation
from participant_sdk import Client, InvalidArgument, NotFound
from tests.integration.federation import echo_agent, serving
from tests.security.conftest import hospital_tokens


async def test_a_requester_cannot_read_or_cancel_anothers_task(secure_fed: LocalFederation) -> None:
    authority = hospital_tokens(secure_fed)
    clerk = authority.issue("clerk", calls=["insurer/echo.say"])
    other = authority.issue("weather-bot", calls=["insurer/echo.say"])
    async with (
        serving(secure_fed.participant("insurer"), echo_agent()),
        Client(secure_fed.participant("hospital"), token=clerk) as mine,
        Client(secure_fed.participant("hospital"), token=other) as theirs,
    ):
        await mine.call("insurer/echo.say", {"n": 1}, timeout=10, task_id="own-1")
        assert (await mine.get("own-1")).state == "completed"
        with pytest.raises(NotFound, match="task 'own-1' is not known"):
            await theirs.get("own-1")
        with pytest.raises(NotFound, match="task 'own-1' is not known"):
            await theirs.cancel("own-1")


async def test_a_reused_key_from_another_requester_is_another_task(
    secure_fed: LocalFederation,
) -> None:
    authority = hospital_tokens(secure_fed)
    clerk = authority.issue("clerk", calls=["insurer/echo.say"])
    other = authority.issue("weather-bot", calls=["insurer/echo.say"])
    async with (
        serving(secure_fed.participant("insurer"), echo_agent()),
        Client(secure_fed.participant("hospital"), token=clerk) as mine,
        Client(secure_fed.participant("hospital"), token=other) as theirs,
    ):
        first = await mine.call(
            "insurer/echo.say", {"who": "clerk"}, timeout=10, idempotency_key="order-42"
        )
        second = await theirs.call(
            "insurer/echo.say", {"who": "bot"}, timeout=10, idempotency_key="order-42"
        )
    assert first.output["echo"] == {"who": "clerk"}
    assert second.output["echo"] == {"who": "bot"}, "not the clerk's stored result"


async def test_a_bad_purpose_is_refused_audited_and_leaves_the_circuit_alone(
    secure_fed: LocalFederation,
) -> None:
    token = hospital_tokens(secure_fed).issue("clerk", calls=["insurer/echo.say"])
    peers = secure_fed["hospital"].peers
    peers.health["insurer"].circuit = "half-open"  # as after any outage
    async with (
        serving(secure_fed.participant("insurer"), echo_agent()),
        Client(secure_fed.participant("hospital"), token=token) as client,
    ):
        with pytest.raises(InvalidArgument, match="purpose is longer than 256 characters"):
            await client.call(
                "insurer/echo.say", {}, timeout=5, purpose="x" * 300, task_id="bad-purpose-1"
            )
        assert not peers.health["insurer"].probing and peers.health["insurer"].in_flight == 0
        assert (await client.call("insurer/echo.say", {}, timeout=10)).ok
    (record,) = secure_fed["hospital"].audit.query(task_id="bad-purpose-1")
    assert record.kind == "rejected" and record.status == "INVALID_ARGUMENT"


async def test_task_table_write_failure_is_unavailable(tmp_path: Path) -> None:
    store = SqlAuditStore(f"sqlite:///{tmp_path / 'fedgate.db'}")
    spec = TaskSpec(
        task_id="t-1",
        target_org="hospital",
        agent="echo",
        skill="say",
        input={},
        deadline=time.time() + 60,
    )
    store._write_step_batch = lambda *_: (_ for _ in ()).throw(OSError("disk full"))  # type: ignore[method-assign]
    with pytest.raises(Unavailable, match="task table cannot be written: OSError"):
        await store.tasks.accept("insurer", spec, remote=False)
    await store.close()


async def test_a_recovered_task_is_released_under_the_claims_it_arrived_with() -> None:
    """The claims saved with a task are the ones its release is filtered under after a restart."""
    from gateway.exchange.router import claims_of
    from gateway.store.task_table import spec_from_json, spec_to_json

    spec = TaskSpec(
        task_id="t-1",
        target_org="hospital",
        agent="records",
        skill="summary",
        input={},
        requester="adjuster",
        purpose="marketing",
        roles=("clerk",),
        deadline=time.time() + 60,
    )
    stored = spec_from_json(spec_to_json(spec))
    assert claims_of(stored) == {"role": ("clerk",), "purpose": "marketing", "subject": "adjuster"}
    store = MemoryAuditStore()
    await store.tasks.accept("insurer", spec, remote=False)
    (row,) = await store.tasks.unfinished()
    assert row.spec is not None and claims_of(row.spec) == claims_of(spec)
