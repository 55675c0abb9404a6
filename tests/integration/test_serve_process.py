"""`fedgate serve` as a real process: it serves, and on SIGTERM drains in-flight tasks and exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from participant_sdk import Agent, Client, RetryPolicy, TaskContext, Unavailable
from tests.conftest import Pki
from tests.integration.federation import configs, serving, slow_agent
from tests.processes import spawn_gateway


async def _start(config: Path) -> tuple[asyncio.subprocess.Process, int]:
    process, _, participant_port = await spawn_gateway(config, drain=False)
    return process, participant_port


# What `fedgate serve` logs once SIGTERM has set it draining (gateway/server.py, `serve`).
DRAINING = "stopping: no new tasks"


def gated_agent(started: asyncio.Event, release: asyncio.Event) -> Agent:
    """Agent `slow`, skill `wait`: with {"gate": true} it says it started, then waits for release."""
    slow = Agent("slow")

    @slow.skill
    async def wait(task: TaskContext, data: dict) -> dict:
        if data.get("gate"):
            started.set()
            await release.wait()
        return {"waited": bool(data.get("gate"))}

    return slow


@pytest.mark.slow
async def test_sigterm_lets_in_flight_tasks_finish_then_exits_zero(
    tmp_path: Path, pki: Pki
) -> None:
    hospital_config = configs(tmp_path, pki)[0]
    draining = asyncio.Event()

    def on_line(line: str) -> None:
        if DRAINING in line:
            draining.set()

    # stderr is read in the background (to on_line), so the gateway never blocks writing logs.
    process, _, port = await spawn_gateway(hospital_config, on_line=on_line)
    address = f"127.0.0.1:{port}"
    started, release = asyncio.Event(), asyncio.Event()
    try:
        async with serving(address, gated_agent(started, release)), Client(address) as client:
            in_flight = asyncio.ensure_future(
                client.call("hospital/slow.wait", {"gate": True}, timeout=30)
            )
            # The task runs on the agent (held there) when SIGTERM arrives.
            await asyncio.wait_for(started.wait(), 10)
            os.kill(process.pid, signal.SIGTERM)
            await asyncio.wait_for(draining.wait(), 10)
            # Draining: a new task is refused at once (one attempt, no retries).
            with pytest.raises(Unavailable, match="shutting down"):
                await client.call(
                    "hospital/slow.wait",
                    {"gate": False},
                    timeout=5,
                    retry=RetryPolicy(max_attempts=1),
                )
            assert process.returncode is None, "the gateway exited with a task in flight"
            release.set()
            result = await asyncio.wait_for(in_flight, 20)
            assert result.output == {"waited": True}
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.slow
async def test_policy_reload_command_reaches_the_running_gateway(tmp_path: Path, pki: Pki) -> None:
    hospital_config = configs(tmp_path, pki)[0]
    process, _ = await _start(hospital_config)
    try:
        rules = tmp_path / "hospital.csv"
        rules.write_text(rules.read_text() + "p, insurer, extra, *, invoke, *, allow\n")
        reload = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "policy",
            "reload",
            "--config",
            str(hospital_config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(reload.communicate(), 30)
        assert reload.returncode == 0, err.decode()
        assert "to reload policy sha256:" in out.decode()
        assert process.stderr is not None
        while True:
            line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
            assert line, "gateway exited"
            if "policy reloaded: version sha256:" in line:
                break
        rules.write_text("p, insurer, x, y, invoke, *, frobnicate\n")
        broken = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "policy",
            "reload",
            "--config",
            str(hospital_config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(broken.communicate(), 30)
        assert broken.returncode == 2
        assert "hospital.csv:1" in err.decode() and "frobnicate" in err.decode()
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0


@pytest.mark.slow
async def test_agents_and_peers_commands_read_a_running_gateway(tmp_path: Path, pki: Pki) -> None:
    import json

    hospital_config = configs(tmp_path, pki)[0]
    process, port = await _start(hospital_config)
    address = f"127.0.0.1:{port}"
    try:
        async with serving(address, slow_agent()):
            outputs = {}
            for command in ("agents", "peers"):
                run = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "gateway.cli",
                    command,
                    "--address",
                    address,
                    "--json",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await asyncio.wait_for(run.communicate(), 30)
                assert run.returncode == 0, err.decode()
                outputs[command] = json.loads(out)
        assert outputs["agents"] == [
            {"agent": "slow", "skills": ["wait"], "instances": 1, "tasks_in_flight": 0}
        ]
        (peer,) = outputs["peers"]
        assert peer["org"] == "insurer" and peer["circuit"] == "closed"
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    down = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "peers",
        "--address",
        address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(down.communicate(), 30)
    assert down.returncode == 2 and "is `fedgate serve` running?" in err.decode()
