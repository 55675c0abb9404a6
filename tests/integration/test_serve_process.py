"""`fedgate serve` as a real process: it serves, and on SIGTERM drains in-flight tasks and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
import pytest

from participant_sdk import Agent, Client, RetryPolicy, TaskContext, Unavailable
from tests.conftest import Pki
from tests.integration.federation import configs, eventually, serving, slow_agent
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


async def _serve_until_exit(config: Path, *, within: float = 60.0) -> tuple[int, str]:
    """Run `fedgate serve` expecting it to refuse: its exit status and its stderr.

    A gateway that starts serving instead of exiting is killed, and the test fails.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"fedgate serve kept running on {config} instead of refusing to start")
    assert process.returncode is not None
    return process.returncode, err.decode()


def _listen_on(config: Path, listener: str, address: str) -> None:
    """Point the [listener] listen key of a config written by write_gateway_config at address."""
    text = config.read_text()
    section = text.index(f"[{listener}]")
    start = text.index('listen = "127.0.0.1:0"', section)
    config.write_text(text[:start] + f'listen = "{address}"' + text[start + 22 :])


@pytest.mark.slow
@pytest.mark.parametrize("listener", ["federation", "participant"])
async def test_a_port_in_use_is_one_line_naming_the_listener_and_exit_2(
    tmp_path: Path, pki: Pki, listener: str
) -> None:
    config = configs(tmp_path, pki)[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        _listen_on(config, listener, address)
        status, err = await _serve_until_exit(config)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"the {listener} listener cannot listen on {address}" in lines[0]
    assert "already in use" in lines[0] and f"[{listener}] listen" in lines[0]
    # Nothing is left behind: the data folder is free for the next start.
    assert not (config.parent / "data" / "fedgate.pid").exists()


@pytest.mark.slow
async def test_a_second_gateway_on_the_same_data_folder_refuses_and_the_first_keeps_it(
    tmp_path: Path, pki: Pki
) -> None:
    config = configs(tmp_path, pki)[0]
    pid_file = config.parent / "data" / "fedgate.pid"
    first, _, _ = await spawn_gateway(config)
    try:
        assert await eventually(pid_file.exists, 10)
        status, err = await _serve_until_exit(config)
        assert status == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert f"the data folder is in use by another gateway (pid {first.pid})" in lines[0]
        assert "[gateway] data_dir" in lines[0]
        # The refused one removed nothing: the first gateway's pid file is still there...
        assert pid_file.read_text().strip() == str(first.pid)
        # ...so `fedgate policy reload` still reaches it.
        reload = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "policy",
            "reload",
            "--config",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err_bytes = await asyncio.wait_for(reload.communicate(), 30)
        assert reload.returncode == 0, err_bytes.decode()
        assert f"asked gateway (pid {first.pid})" in out.decode()
    finally:
        first.terminate()
        assert await asyncio.wait_for(first.wait(), 30) == 0
    assert not pid_file.exists(), "the holder removes its pid file when it stops"


@pytest.mark.slow
async def test_policy_reload_never_signals_the_pid_a_crashed_gateway_left(
    tmp_path: Path, pki: Pki
) -> None:
    config = configs(tmp_path, pki)[0]
    first, _, _ = await spawn_gateway(config)
    data = config.parent / "data"
    assert await eventually((data / "fedgate.pid").exists, 10)
    first.kill()  # a crash: no clean-up, the pid file stays
    await first.wait()
    # The pid is reused by an unrelated process (SIGHUP would end it).
    bystander = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        (data / "fedgate.pid").write_text(f"{bystander.pid}\n")
        reload = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "policy",
            "reload",
            "--config",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(reload.communicate(), 30)
        assert reload.returncode == 2
        assert "no running gateway holds this data folder" in err.decode()
        assert bystander.returncode is None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bystander.wait(), 0.5)
        assert bystander.returncode is None, "an unrelated process got the gateway's SIGHUP"
        # And a new gateway starts on the folder the crashed one left: the lock died with it.
        again, _, _ = await spawn_gateway(config)
        again.terminate()
        assert await asyncio.wait_for(again.wait(), 30) == 0
    finally:
        bystander.kill()
        await bystander.wait()


async def _refused_handshake(pki: Pki, port: int, cert: str | None) -> None:
    from fedgate.v1 import fedgate_pb2 as pb
    from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

    from tests.integration.federation import federation_channel

    channel = federation_channel(pki, f"127.0.0.1:{port}", cert=cert, target_org="hospital")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.FederationStub(channel).ListAgents(pb.ListAgentsRequest(), timeout=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()


@pytest.mark.slow
async def test_refused_tls_handshakes_are_fedgate_log_lines_with_address_and_reason(
    tmp_path: Path, pki: Pki
) -> None:
    from fedgate.v1 import fedgate_pb2 as pb
    from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

    from gateway.identity.certs import create_ca
    from tests.integration.federation import federation_channel

    own = create_ca("insurer")  # a self-signed certificate
    (tmp_path / "self-insurer.crt").write_bytes(own.cert_pem)
    (tmp_path / "self-insurer.key").write_bytes(own.key_pem)
    (tmp_path / "ca.crt").write_bytes(pki.ca.read_bytes())
    selfsigned = Pki(tmp_path)
    lines: list[str] = []
    config = configs(tmp_path, pki)[0]
    process, port, _ = await spawn_gateway(config, on_line=lines.append)

    def refusals() -> list[str]:
        return [x for x in lines if "TLS handshake refused" in x]

    prefix = "fedgate.tls: TLS handshake refused on the federation listener from 127.0.0.1:"
    try:
        for number, (cert, reason) in enumerate(
            [
                (None, "no client certificate"),
                ("rogue-insurer", "certificate not issued by the federation CA"),
                ("self-insurer", "self-signed certificate"),
                ("expired-insurer", "certificate expired"),
            ],
            start=1,
        ):
            await _refused_handshake(selfsigned if cert == "self-insurer" else pki, port, cert)
            assert await eventually(lambda n=number: len(refusals()) == n, 10), lines[-5:]
            line = refusals()[-1]
            assert prefix in line, line
            assert line.endswith(f": {reason} (refused since start: {number})"), line
        # grpc's own lines about them (and the handshake trace) are not passed on.
        assert not [x for x in lines if "Handshake failed" in x or "handshaker.cc" in x]
        # The same host and reason again within the minute: counted, not logged again...
        for _ in range(3):
            await _refused_handshake(pki, port, None)
        # ...as the next line of another reason shows: 4 + 3 + 1 refused, 5 lines.
        await _refused_handshake(pki, port, "future-insurer")
        assert await eventually(lambda: len(refusals()) == 5, 10), lines[-5:]
        assert refusals()[-1].endswith(": certificate not yet valid (refused since start: 8)")
        # A good handshake still works after the refusals.
        channel = federation_channel(
            pki, f"127.0.0.1:{port}", cert="insurer", target_org="hospital"
        )
        await pb_grpc.FederationStub(channel).ListAgents(pb.ListAgentsRequest(), timeout=5)
        await channel.close()
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.slow
async def test_data_at_rest_is_the_gateway_users_alone(tmp_path: Path, pki: Pki) -> None:
    from tests.integration.federation import HOSPITAL_RULES, org_config

    config = org_config(tmp_path, pki, "hospital", HOSPITAL_RULES, ["insurer"], require_tokens=True)
    data = config.parent / "data"
    issue = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "tokens",
        "issue",
        "--subject",
        "records-service",
        "--agent",
        "slow",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    token, err = await asyncio.wait_for(issue.communicate(), 30)
    assert issue.returncode == 0, err.decode()
    process, _, port = await spawn_gateway(config)
    try:
        # Something is written: the store (audit log and task table) has its WAL files by now.
        async with serving(f"127.0.0.1:{port}", slow_agent(), token=token.decode().strip()):
            pass
        files = {p.name: _mode(p) for p in data.iterdir() if not p.name.startswith(".")}
        assert _mode(data) == 0o700
        for name in (
            "audit.db",
            "audit.db-wal",
            "audit.db-shm",
            "tokens.json",
            "token.key",
            "pseudonym.key",
            "fedgate.pid",
            "fedgate.lock",
        ):
            assert files.get(name) == 0o600, (name, {k: oct(v) for k, v in files.items()})
        assert all(mode & 0o077 == 0 for mode in files.values()), files
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    # A folder others may read: the gateway refuses to start, naming the folder and the fix.
    data.chmod(0o755)
    status, err = await _serve_until_exit(config)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"{data}: the data folder is accessible to other users (mode 755)" in lines[0]
    assert f"run `chmod 700 {data}`" in lines[0]


@pytest.mark.slow
async def test_peers_fits_80_columns_with_its_last_error_below(tmp_path: Path, pki: Pki) -> None:
    hospital_config = configs(tmp_path, pki)[0]
    process, port = await _start(hospital_config)
    address = f"127.0.0.1:{port}"
    try:
        async with Client(address, retry=RetryPolicy(max_attempts=1)) as client:
            with pytest.raises(Unavailable):  # the insurer's gateway does not run: a last error
                await client.call("insurer/claims.check", {}, timeout=5)
        run = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway.cli", "peers", "--address", address),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "COLUMNS": "80"},
        )
        out, err = await asyncio.wait_for(run.communicate(), 30)
        assert run.returncode == 0, err.decode()
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    lines = out.decode().splitlines()
    assert max(len(line) for line in lines) <= 80, out.decode()
    header = next(line for line in lines if line.startswith("peer "))
    assert header.split() == ["peer", "address", "circuit", "latency", "in", "flight", "failures"]
    (row,) = [line for line in lines if line.startswith("insurer ")]
    assert row.split()[1:3] == ["127.0.0.1:1", "closed"], row
    errors = [line for line in lines if line.startswith("insurer: last error: ")]
    assert len(errors) == 1 and "is unreachable" in errors[0], out.decode()
