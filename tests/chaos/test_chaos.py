"""Chaos: kill gateways mid-stream, stall an agent past its deadline, lock the audit store.

Each scenario runs two real `fedgate serve` subprocesses (hospital responds, insurer requests)
and checks the promises that must survive the fault:

* a defined state: every call returns a result or raises a typed SDK error in bounded time, and
  afterwards `get` on the requester's gateway reports a final state for each task (NotFound is
  allowed only where noted: a task the insurer forgot because its call ended UNAVAILABLE, so that
  a retry with the same key can run it);
* at most once: the agent counts its executions per idempotency key, and none ran twice;
* no audit record lost: an exchange the requester saw complete has request_sent and
  result_received in the insurer's log, request_received and result_released in the hospital's,
  and both hash chains verify after the chaos, restarts included.

Product bugs this suite found (each now fixed, and kept here as a regression test):
test_requester_gateway_keeps_a_task_its_partner_accepted,
test_deadline_exceeded_task_reaches_a_final_state.

What a crash of the requesting gateway does to the partner's work (it ran to its end, not
cancelled) is in test_once_across_crashes.py, with the rest of issue 15: the earlier
test_kill_9_requester_gateway_mid_stream and test_responder_cancels_the_skill_when_the_requesting_
gateway_dies asserted the cancel that issue 15 #2 reverses, and were removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any

import pytest

from participant_sdk import (
    DeadlineExceeded,
    FedgateError,
    NotFound,
    RetryPolicy,
    TaskFailed,
    Unavailable,
)
from tests.chaos.conftest import (
    FINAL,
    TARGET,
    ChaosFederation,
    Executions,
    bounded,
    counting_agent,
    drain,
    final_states,
    stream_until_working,
)
from tests.integration.federation import eventually, serving

pytestmark = pytest.mark.slow


async def _until(predicate: Any, seconds: float, what: str) -> None:
    if not await eventually(predicate, seconds):
        pytest.fail(f"{what}: not reached within {seconds}s")


async def _state_after(client: Any, task_id: str, seconds: float) -> str:
    """`get` until the task is final or `seconds` pass: its state, or 'not_found'."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        try:
            state = (await bounded(client.get(task_id), 10, f"get {task_id}")).state
        except NotFound:
            return "not_found"
        if state in FINAL or loop.time() > deadline:
            return state
        await asyncio.sleep(0.1)


async def test_kill_9_responder_gateway_mid_stream(chaos: ChaosFederation) -> None:
    """kill -9 the hospital's gateway while 4 streamed tasks run on its agent; restart it.

    Each stream ends UNAVAILABLE at once. The insurer keeps the tasks open (its `get` says
    "working": the partner accepted them and is unreachable). The restarted hospital recovers the accepted tasks
    from its task table and dispatches them again; the agent, still running the skills,
    re-attaches by idempotency key. `call` with the same task id and key then collects each
    result: every task completes, each skill ran once, and every exchange is in both logs.
    """
    executions = Executions()
    keys = [f"s1-key-{n}" for n in range(4)]  # < 5: the insurer's circuit to hospital stays closed
    task_ids = [f"s1-task-{n}" for n in range(4)]
    async with (
        serving(chaos.hospital.participant, counting_agent(executions)) as worker,
        chaos.client() as client,
    ):
        streams = await stream_until_working(
            client, keys, task_ids, executions.runs.__contains__, 2.5
        )
        await chaos.hospital.kill_9()
        broken = await bounded(asyncio.gather(*(drain(s) for s in streams)), 10, "broken streams")
        for outcome, value in broken:
            assert outcome == "error" and isinstance(value, Unavailable), (outcome, value)
        # The partner accepted these tasks and may still run them: while it is unreachable the
        # requester's gateway keeps them open ("working"), so a retry with the key resumes them.
        for task_id in task_ids:
            assert (await bounded(client.get(task_id), 10, "get")).state == "working"

        await chaos.hospital.restart()
        await _until(lambda: worker.connections >= 2, 10, "agent reconnected")
        # Collect with `call` under the same task id and key: the retry the SDK documents.
        results = await bounded(
            asyncio.gather(
                *(
                    client.call(
                        TARGET,
                        {"key": key, "seconds": 2.5},
                        timeout=8,
                        task_id=task_id,
                        idempotency_key=key,
                        retry=RetryPolicy(max_attempts=10, max_backoff=0.5),
                    )
                    for task_id, key in zip(task_ids, keys, strict=True)
                ),
                return_exceptions=True,
            ),
            12,
            "collect after restart",
        )
        for task_id, key, result in zip(task_ids, keys, results, strict=True):
            assert not isinstance(result, BaseException), (task_id, result)
            assert result.state == "completed" and result.output["key"] == key
        assert await final_states(client, task_ids) == {t: "completed" for t in task_ids}
    assert set(executions.runs) == set(keys)
    assert not executions.twice(), f"ran twice for one key: {executions.twice()}"
    assert sorted(executions.finished) == keys, "each skill ran to its end once, not cancelled"
    chaos.assert_audit(task_ids)


async def test_requester_gateway_keeps_a_task_its_partner_accepted(
    chaos: ChaosFederation,
) -> None:
    executions = Executions()
    async with (
        serving(chaos.hospital.participant, counting_agent(executions)),
        chaos.client() as client,
    ):
        streams = await stream_until_working(
            client, ["s1x-key"], ["s1x-task"], executions.runs.__contains__, 5
        )
        await chaos.hospital.kill_9()
        outcome, _ = await bounded(drain(streams[0]), 10, "broken stream")
        assert outcome == "error"
        state = await _state_after(client, "s1x-task", 0)
        assert state != "not_found", "the partner accepted this task and is running it"


async def _stall(
    chaos: ChaosFederation, client: Any, executions: Executions, key: str, task_id: str
) -> None:
    """One call whose skill sleeps 30 s under a 4 s deadline: DeadlineExceeded, in time.

    The deadline leaves room for the first call across two fresh processes to reach the hospital
    in time (one that arrives late is rejected without running the skill); the skill outlasts
    the deadline and every wait here, so only the deadline stops it.
    """
    timeout = 4.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeadlineExceeded):
        await bounded(
            client.call(
                TARGET,
                {"key": key, "seconds": 30},
                timeout=timeout,
                task_id=task_id,
                idempotency_key=key,
            ),
            timeout + 5,
            "stalled call",
        )
    assert loop.time() - started < timeout + 3
    await _until(lambda: key in executions.cancelled, 10, "the stalled skill was cancelled")


async def _retry_same_key(client: Any, key: str, task_id: str) -> Any:
    """The same call again (same task id and key): its result, or the SDK error it raised."""
    try:
        return await bounded(
            client.call(
                TARGET, {"key": key, "seconds": 6}, timeout=3, task_id=task_id, idempotency_key=key
            ),
            8,
            "retry",
        )
    except FedgateError as exc:
        return exc


async def test_agent_stalls_past_its_deadline(chaos: ChaosFederation) -> None:
    """A skill that outlives the deadline: DeadlineExceeded, cancelled, audited, not run again."""
    executions = Executions()
    key, task_id = "s3-key", "s3-task"
    async with (
        serving(chaos.hospital.participant, counting_agent(executions)),
        chaos.client() as client,
    ):
        await _stall(chaos, client, executions, key, task_id)

        def failure_recorded() -> bool:
            kinds = {
                org: chaos.audit_kinds(org).get(task_id, set()) for org in ("hospital", "insurer")
            }
            return "failed" in kinds["hospital"] and "failed" in kinds["insurer"]

        await _until(failure_recorded, 5, "both sides recorded the failure")
        # A retry with the same key never runs the skill again: it gets the stored failure.
        outcome = await _retry_same_key(client, key, task_id)
        assert isinstance(outcome, TaskFailed), outcome
        await asyncio.sleep(0.3)
    assert executions.runs[key] == 1, executions.runs
    assert not executions.finished
    kinds = chaos.assert_audit([])
    assert {"request_received", "failed"} <= kinds["hospital"][task_id]
    assert {"request_sent", "failed"} <= kinds["insurer"][task_id]
    assert "result_released" not in kinds["hospital"][task_id]
    assert "result_received" not in kinds["insurer"][task_id]


async def test_deadline_exceeded_task_reaches_a_final_state(chaos: ChaosFederation) -> None:
    executions = Executions()
    key, task_id = "s3x-key", "s3x-task"
    async with (
        serving(chaos.hospital.participant, counting_agent(executions)),
        chaos.client() as client,
    ):
        await _stall(chaos, client, executions, key, task_id)
        state = await _state_after(client, task_id, 10)
        assert state == "failed", f"insurer's get still says {state!r} 10 s after the deadline"
        outcome = await _retry_same_key(client, key, task_id)
        assert isinstance(outcome, TaskFailed), outcome
        assert outcome.result.state == "failed"
    assert executions.runs[key] == 1


async def test_audit_store_locked_then_released(chaos: ChaosFederation) -> None:
    """The hospital's audit DB is locked for 6 s (longer than its 5 s busy timeout) under load.

    While locked, the hospital fails closed (UNAVAILABLE, "audit store cannot be written") and
    nothing completes; the SDK retries with the same key and the calls complete once the lock is
    gone. A skill that ran while its `result_released` could not be committed keeps its result
    unreleased until the record commits; a retry with the key then collects it, and nothing
    runs twice.
    """
    executions = Executions()
    outcomes: dict[str, tuple[str, float, Any]] = {}
    loop = asyncio.get_running_loop()
    retry = RetryPolicy(max_attempts=6, max_backoff=0.5)
    async with (
        serving(chaos.hospital.participant, counting_agent(executions)),
        chaos.client(retry=retry) as client,
    ):

        async def one(task_id: str) -> None:
            try:
                result = await bounded(
                    client.call(
                        TARGET,
                        {"key": task_id, "seconds": 0.05},
                        timeout=9,
                        task_id=task_id,
                        idempotency_key=task_id,
                    ),
                    14,
                    f"call {task_id}",
                )
                outcomes[task_id] = (result.state, loop.time(), None)
            except FedgateError as exc:
                outcomes[task_id] = (type(exc).__name__, loop.time(), exc)

        await one("s4-warmup")
        assert outcomes["s4-warmup"][0] == "completed"
        stop = asyncio.Event()

        async def load(worker: int) -> None:
            for n in range(1000):
                if stop.is_set():
                    return
                await one(f"s4-w{worker}-{n}")
                await asyncio.sleep(0.05)

        workers = [asyncio.ensure_future(load(w)) for w in range(4)]
        await asyncio.sleep(0.5)
        lock = sqlite3.connect(chaos.hospital.audit_db, timeout=0.1, isolation_level=None)
        try:
            for _ in range(50):  # the gateway may hold the write lock for a moment
                try:
                    lock.execute("BEGIN EXCLUSIVE")
                    break
                except sqlite3.OperationalError:
                    await asyncio.sleep(0.02)
            else:
                pytest.fail("could not lock the hospital's audit database")
            locked_at = loop.time()
            await asyncio.sleep(6.0)
        finally:
            with contextlib.suppress(sqlite3.Error):
                lock.execute("ROLLBACK")
            lock.close()
        released_at = loop.time()
        await asyncio.sleep(1.0)
        stop.set()
        await bounded(asyncio.gather(*workers), 20, "load workers")
        # After the release, new calls complete.
        after = [f"s4-after-{n}" for n in range(4)]
        await bounded(asyncio.gather(*(one(t) for t in after)), 15, "calls after release")
        assert all(outcomes[t][0] == "completed" for t in after), {t: outcomes[t] for t in after}
        # Fail closed: nothing completed while the hospital could not write its audit log.
        during = [
            t
            for t, (state, at, _) in outcomes.items()
            if state == "completed" and locked_at + 0.5 < at < released_at - 0.1
        ]
        assert not during, f"completed while the audit store was locked: {during}"
        assert any("audit store cannot be written" in line for line in chaos.hospital.log)
        for state, _, exc in outcomes.values():
            assert state in ("completed", "Unavailable"), exc
        # A call that heard UNAVAILABLE may still have run: the gateways keep at it until the
        # deadline (the insurer asking again, the hospital writing its record again), so its
        # task ends completed, or failed at its deadline; none is left open.
        states = await final_states(client, list(outcomes))
        for task_id, (state, _, _) in outcomes.items():
            if state == "completed":
                assert states[task_id] == "completed", (task_id, states[task_id])
            else:
                assert states[task_id] in ("completed", "failed", "not_found"), (
                    task_id,
                    states[task_id],
                )
    assert not executions.twice(), f"ran twice for one key: {executions.twice()}"
    chaos.assert_audit([t for t, (state, _, _) in outcomes.items() if state == "completed"])
