"""Chaos harness: real `fedgate serve` subprocesses (hospital, insurer), counting agents, audits.

Every process a test starts goes through `ChaosFederation`, whose fixture stops it in a finally
(SIGTERM, then SIGKILL after a timeout). All listeners bind 127.0.0.1 on ports picked up front,
so a gateway restarts on the same ports and its peer and agents find it again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.audit.store import open_store
from gateway.identity.signing import Verifier
from participant_sdk import Agent, Client, FedgateError, NotFound, RetryPolicy, TaskContext
from tests.conftest import Pki
from tests.integration.federation import HOSPITAL_RULES, INSURER_RULES
from tests.processes import fixed_port_config, free_port, spawn_gateway

REPO = Path(__file__).resolve().parents[2]
FINAL = frozenset({"completed", "failed", "canceled", "rejected"})
# What each side must hold for an exchange the requester saw complete.
COMPLETED_RECORDS = {
    "hospital": {"request_received", "result_released"},
    "insurer": {"request_sent", "result_received"},
}
T = TypeVar("T")


async def bounded(awaitable: Awaitable[T], seconds: float, what: str) -> T:
    """Await with a hard bound: a hang fails the test, naming what hung."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        pytest.fail(f"{what} did not end within {seconds:.1f}s (hung)")


async def stop_process(process: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: the process is gone when this returns."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), grace)
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def kill_9(process: asyncio.subprocess.Process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    await asyncio.wait_for(process.wait(), 10)


# ---- gateways -----------------------------------------------------------------------------


@dataclass
class Gateway:
    """One organization's gateway, run as `fedgate serve` in its own process."""

    org: str
    directory: Path
    config: Path
    federation_port: int
    participant_port: int
    process: asyncio.subprocess.Process | None = None
    starts: int = 0
    log: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=200))
    drain: asyncio.Future[None] | None = None

    @property
    def participant(self) -> str:
        return f"127.0.0.1:{self.participant_port}"

    @property
    def audit_db(self) -> Path:
        return self.directory / "data" / "audit.db"

    @property
    def audit_url(self) -> str:
        return f"sqlite:///{self.audit_db}"

    async def start(self) -> None:
        assert self.process is None or self.process.returncode is not None, "already running"
        process, _, _ = await spawn_gateway(
            self.config, on_line=self.log.append, cwd=REPO, drain=False
        )
        self.process = process
        self.starts += 1
        assert process.stderr is not None
        # Keep draining stderr (into the log) so the process never blocks on a full pipe.
        self.drain = asyncio.ensure_future(self._drain(process.stderr))

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while line := await stream.readline():
                self.log.append(line.decode(errors="replace").rstrip())

    async def kill_9(self) -> None:
        assert self.process is not None and self.process.returncode is None
        await kill_9(self.process)

    async def restart(self) -> None:
        await self.start()

    async def stop(self) -> None:
        if self.process is not None:
            await stop_process(self.process)
        if self.drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.drain, 5)


def _gateway(
    tmp: Path, pki: Pki, org: str, peer: str, rules: str, ports: dict[str, tuple[int, int]]
) -> Gateway:
    path = fixed_port_config(tmp, pki, org, peer, ports, rules)
    fed_port, part_port = ports[org]
    return Gateway(org, tmp / org, path, fed_port, part_port)


# ---- agents -------------------------------------------------------------------------------


@dataclass
class Executions:
    """What the counting agent did, per idempotency key (the key travels in the input)."""

    runs: collections.Counter[str] = field(default_factory=collections.Counter)
    cancelled: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    def twice(self) -> dict[str, int]:
        return {key: n for key, n in self.runs.items() if n > 1}


def counting_agent(
    executions: Executions, on_event: Callable[[str, str], None] | None = None
) -> Agent:
    """Agent `slow` (shared with the insurer by HOSPITAL_RULES): skill `wait` sleeps and counts.

    Input: {"key": idempotency key, "seconds": how long to work}. `on_event(event, key)` hears
    "run", "cancelled" and "finished" (an agent subprocess writes them to its run log).
    """
    slow = Agent("slow")

    @slow.skill
    async def wait(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        key = str(data["key"])
        executions.runs[key] += 1
        if on_event is not None:
            on_event("run", key)
        try:
            await asyncio.sleep(float(data.get("seconds", 0.0)))
        except asyncio.CancelledError:
            executions.cancelled.append(key)
            if on_event is not None:
                on_event("cancelled", key)
            raise
        executions.finished.append(key)
        if on_event is not None:
            on_event("finished", key)
        return {"key": key, "waited": data.get("seconds", 0.0)}

    return slow


# Run by `spawn_agent`: serve the counting agent, appending one line per execution to a file.
_AGENT_MAIN = """
import asyncio, sys
from participant_sdk import AgentWorker
from tests.chaos.conftest import Executions, counting_agent

log = open(sys.argv[2], "a", buffering=1)
agent = counting_agent(Executions(), on_event=lambda event, key: log.write(f"{event} {key}\\n"))

async def main():
    worker = AgentWorker([agent], sys.argv[1], max_backoff=0.2)
    runner = asyncio.ensure_future(worker.run())
    await worker.connected.wait()
    print("agent connected", flush=True)
    await runner

asyncio.run(main())
"""


def executions_in_file(path: Path) -> Executions:
    """What an agent subprocess wrote to its run log, as Executions."""
    executions = Executions()
    lines = path.read_text().splitlines() if path.exists() else []
    for event, _, key in (line.partition(" ") for line in lines if line):
        if event == "run":
            executions.runs[key] += 1
        elif event == "cancelled":
            executions.cancelled.append(key)
        elif event == "finished":
            executions.finished.append(key)
    return executions


# ---- the federation -----------------------------------------------------------------------


class ChaosFederation:
    """hospital and insurer gateways as subprocesses, plus any agent subprocesses."""

    def __init__(self, tmp: Path, pki: Pki) -> None:
        self.tmp = tmp
        self.pki = pki
        ports = {org: (free_port(), free_port()) for org in ("hospital", "insurer")}
        self.hospital = _gateway(tmp, pki, "hospital", "insurer", HOSPITAL_RULES, ports)
        self.insurer = _gateway(tmp, pki, "insurer", "hospital", INSURER_RULES, ports)
        self.agents: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        await asyncio.gather(self.hospital.start(), self.insurer.start())

    async def stop(self) -> None:
        for process in self.agents:
            await stop_process(process, grace=5)
        await asyncio.gather(self.hospital.stop(), self.insurer.stop())

    async def spawn_agent(self, run_log: Path) -> asyncio.subprocess.Process:
        """The counting agent in its own process, served against the hospital's gateway."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _AGENT_MAIN,
            self.hospital.participant,
            str(run_log),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=REPO,
        )
        self.agents.append(process)
        assert process.stdout is not None
        line = await bounded(process.stdout.readline(), 30, "agent subprocess connect")
        assert line.strip() == b"agent connected", line
        return process

    def client(self, *, retry: RetryPolicy | None = None) -> Client:
        """A requester on the insurer's participant listener."""
        return Client(self.insurer.participant, requester="chaos-tester", retry=retry)

    # ---- after the chaos ----

    def audit_kinds(self, org: str) -> dict[str, set[str]]:
        """Record kinds per task id in one organization's audit log (read from its file)."""
        gateway = self.hospital if org == "hospital" else self.insurer
        store = open_store(gateway.audit_url)
        try:
            kinds: dict[str, set[str]] = {}
            for record in store.records():
                kinds.setdefault(record.task_id, set()).add(record.kind)
            return kinds
        finally:
            store.dispose()

    def assert_audit(self, completed: Iterable[str]) -> dict[str, dict[str, set[str]]]:
        """Every completed exchange is in both logs, and both chains verify."""
        completed = list(completed)
        verifier = Verifier.from_file(self.pki.ca)
        kinds_by_org = {}
        for org, want in COMPLETED_RECORDS.items():
            kinds = self.audit_kinds(org)
            missing = {
                t: sorted(kinds.get(t, set())) for t in completed if not want <= kinds.get(t, set())
            }
            assert not missing, f"{org} lost audit records of completed exchanges: {missing}"
            store = open_store((self.hospital if org == "hospital" else self.insurer).audit_url)
            try:
                report = store.verify(org, verifier)
            finally:
                store.dispose()
            assert report.ok, f"{org} audit chain does not verify: {report.problems}"
            kinds_by_org[org] = kinds
        return kinds_by_org


async def final_states(
    client: Client,
    task_ids: Iterable[str],
    *,
    within: float = 10.0,
) -> dict[str, str]:
    """`get` every task until it reports a final state; 'not_found' if the gateway never knew it.

    Bounded: a task still not final after `within` seconds fails the test. Errors other than
    NotFound (e.g. Unavailable while a gateway restarts) are retried inside the bound.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    states: dict[str, str] = {}
    for task_id in task_ids:
        last = "no answer"
        while True:
            try:
                result = await bounded(client.get(task_id), 15, f"get {task_id}")
                last = result.state
                if result.state in FINAL:
                    states[task_id] = result.state
                    break
            except NotFound:
                states[task_id] = "not_found"
                break
            except FedgateError as exc:
                last = f"{type(exc).__name__}: {exc.message}"
            if loop.time() > deadline:
                pytest.fail(f"task {task_id} has no final state after {within}s (last: {last})")
            await asyncio.sleep(0.1)
    return states


@pytest.fixture
async def chaos(tmp_path: Path, pki: Pki) -> AsyncIterator[ChaosFederation]:
    federation = ChaosFederation(tmp_path, pki)
    try:
        await federation.start()
        yield federation
    finally:
        await federation.stop()
