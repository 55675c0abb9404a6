"""kill -9 of a gateway under load: what the requester saw complete is in both audit logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest

from gateway.audit.store import open_store
from gateway.identity.signing import Verifier
from participant_sdk import Agent, Client, FedgateError
from tests.conftest import Pki
from tests.integration.federation import HOSPITAL_RULES, INSURER_RULES, serving
from tests.processes import fixed_port_config, free_port, spawn_gateway


async def _spawn(config: Path) -> asyncio.subprocess.Process:
    process, _, _ = await spawn_gateway(config)
    return process


@pytest.mark.slow
async def test_kill_9_under_load_loses_no_completed_exchange(tmp_path: Path, pki: Pki) -> None:
    ports = {org: (free_port(), free_port()) for org in ("hospital", "insurer")}
    hospital_cfg = fixed_port_config(tmp_path, pki, "hospital", "insurer", ports, HOSPITAL_RULES)
    insurer_cfg = fixed_port_config(tmp_path, pki, "insurer", "hospital", ports, INSURER_RULES)
    hospital = await _spawn(hospital_cfg)
    insurer = await _spawn(insurer_cfg)
    processes = [hospital, insurer]
    completed: list[str] = []
    echo = Agent("echo")

    @echo.skill
    async def say(task, data):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.01)
        return {"n": data.get("n")}

    try:
        async with (
            serving(f"127.0.0.1:{ports['hospital'][1]}", echo),
            Client(f"127.0.0.1:{ports['insurer'][1]}") as client,
        ):
            stop = asyncio.Event()

            async def load(worker: int) -> None:
                n = 0
                while not stop.is_set():
                    task_id = f"crash-{worker}-{n}"
                    n += 1
                    with contextlib.suppress(FedgateError):
                        await client.call("hospital/echo.say", {"n": n}, timeout=5, task_id=task_id)
                        completed.append(task_id)

            workers = [asyncio.ensure_future(load(w)) for w in range(16)]
            for _ in range(200):
                if len(completed) >= 100:
                    break
                await asyncio.sleep(0.05)
            os.kill(hospital.pid, signal.SIGKILL)
            await hospital.wait()
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*workers)
        assert len(completed) >= 100
        restarted = await _spawn(hospital_cfg)
        processes.append(restarted)
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(process.wait(), 20)
            if process.returncode is None:
                process.kill()
                await process.wait()

    verifier = Verifier.from_file(pki.ca)
    for org, want in (
        ("hospital", {"request_received", "result_released"}),
        ("insurer", {"request_sent", "result_received"}),
    ):
        store = open_store(f"sqlite:///{tmp_path / org / 'data' / 'audit.db'}")
        kinds: dict[str, set[str]] = {}
        for record in store.records():
            kinds.setdefault(record.task_id, set()).add(record.kind)
        missing = [t for t in completed if not want <= kinds.get(t, set())]
        assert not missing, (
            f"{org} lost records of {len(missing)} completed exchanges: {missing[:5]}"
        )
        report = store.verify(org, verifier)
        assert report.ok, report.problems


@pytest.mark.slow
async def test_accepted_task_survives_kill_9_and_is_collected_later(
    tmp_path: Path, pki: Pki
) -> None:
    ports = {org: (free_port(), free_port()) for org in ("hospital", "insurer")}
    hospital_cfg = fixed_port_config(tmp_path, pki, "hospital", "insurer", ports, HOSPITAL_RULES)
    participant = f"127.0.0.1:{ports['hospital'][1]}"
    runs: list[str] = []
    slow = Agent("slow")

    @slow.skill
    async def wait(task, data):  # type: ignore[no-untyped-def]
        runs.append(task.task_id)
        await asyncio.sleep(1.0)
        return {"done": data["n"]}

    process = await _spawn(hospital_cfg)
    processes = [process]
    try:
        async with serving(participant, slow) as worker, Client(participant) as client:
            updates = client.stream(
                "hospital/slow.wait", {"n": 42}, timeout=60, task_id="durable-1"
            )
            assert (await anext(updates)).state == "working"
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
            with contextlib.suppress(FedgateError):
                async for _ in updates:
                    pass
            processes.append(await _spawn(hospital_cfg))
            result = None
            for _ in range(200):
                with contextlib.suppress(FedgateError):
                    result = await client.get("durable-1")
                    if result.state == "completed":
                        break
                await asyncio.sleep(0.1)
            assert worker.connections >= 2, "the agent reconnected to the restarted gateway"
        assert result is not None and result.state == "completed"
        assert result.output == {"done": 42}
        assert runs == ["durable-1"], (
            "the gateway dispatched it again and the agent re-attached: it ran once"
        )
    finally:
        for p in processes:
            if p.returncode is None:
                p.terminate()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(p.wait(), 20)
            if p.returncode is None:
                p.kill()
                await p.wait()
