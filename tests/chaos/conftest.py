"""Chaos harness: real `fedgate serve` subprocesses (hospital, insurer), counting agents, audits.

Every process a test starts goes through `ChaosFederation`, whose fixture stops it in a finally
(SIGTERM, then SIGKILL after a timeout). All listeners bind 127.0.0.1 on ports picked up front,
so a gateway restarts on the same ports and its peer and agents find it again.

After the chaos, `check_histories` holds each logical request to one consistent history on both
sides (issue 15, "Done when"), and `ChaosFederation.reconcile` runs `fedgate audit export` on both
data folders and `fedgate audit reconcile` on the two bundles, as an auditor would.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.audit.bundle import Bundle
from gateway.audit.chain import AuditRecord
from gateway.audit.reconcile import open_requests
from gateway.audit.store import open_store
from gateway.identity.signing import SignedReceipt, Verifier, verify_receipt
from participant_sdk import (
    Agent,
    Client,
    FedgateError,
    NotFound,
    RetryPolicy,
    TaskContext,
    TaskResult,
)
from tests.conftest import Pki
from tests.integration.federation import HOSPITAL_RULES, INSURER_RULES, eventually
from tests.processes import fixed_port_config, free_port, spawn_gateway

REPO = Path(__file__).resolve().parents[2]
TARGET = "hospital/slow.wait"
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
    # The scoped key (TaskContext.idempotency_key) each execution of a key saw.
    scoped: dict[str, set[str]] = field(default_factory=dict)

    def twice(self) -> dict[str, int]:
        return {key: n for key, n in self.runs.items() if n > 1}

    def finished_twice(self) -> dict[str, int]:
        counts = collections.Counter(self.finished)
        return {key: n for key, n in counts.items() if n > 1}


def counting_agent(
    executions: Executions, on_event: Callable[[str, str, str], None] | None = None
) -> Agent:
    """Agent `slow` (shared with the insurer by HOSPITAL_RULES): skill `wait` sleeps and counts.

    Input: {"key": idempotency key, "seconds": how long to work}. `on_event(event, key, scoped)`
    hears "run", "cancelled" and "finished" with the task's scoped key (an agent subprocess
    writes them to its run log).
    """
    slow = Agent("slow")

    @slow.skill
    async def wait(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        key = str(data["key"])
        executions.runs[key] += 1
        executions.scoped.setdefault(key, set()).add(task.idempotency_key)

        def event(name: str) -> None:
            if on_event is not None:
                on_event(name, key, task.idempotency_key)

        event("run")
        try:
            await asyncio.sleep(float(data.get("seconds", 0.0)))
        except asyncio.CancelledError:
            executions.cancelled.append(key)
            event("cancelled")
            raise
        executions.finished.append(key)
        event("finished")
        return {"key": key, "waited": data.get("seconds", 0.0)}

    return slow


# Run by `spawn_agent`: serve the counting agent, appending one line per execution to a file.
_AGENT_MAIN = """
import asyncio, sys
from participant_sdk import AgentWorker
from tests.chaos.conftest import Executions, counting_agent

log = open(sys.argv[2], "a", buffering=1)
agent = counting_agent(
    Executions(), on_event=lambda event, key, scoped: log.write(f"{event} {key} {scoped}\\n")
)

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
    for line in lines:
        parts = line.split(" ")
        if len(parts) != 3:
            continue  # the last line of a process killed while it wrote
        event, key, scoped = parts
        if event == "run":
            executions.runs[key] += 1
            executions.scoped.setdefault(key, set()).add(scoped)
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

    async def kill_agent(self, process: asyncio.subprocess.Process) -> None:
        """kill -9 an agent subprocess; returns once the hospital no longer counts it."""
        await kill_9(process)

        async def gone() -> bool:
            return await self.agent_instances() == 0

        await until(gone, 10, "the hospital saw the agent go")

    async def agent_instances(self, agent: str = "slow") -> int:
        """How many instances of `agent` the hospital's gateway has connected (-1: no answer)."""
        try:
            async with grpc.aio.insecure_channel(self.hospital.participant) as channel:
                answer = await pb_grpc.ParticipantStub(channel).ListConnectedAgents(
                    pb.ListAgentsRequest(), timeout=5
                )
        except grpc.aio.AioRpcError:
            return -1
        return sum(a.instances for a in answer.agents if a.card.name == agent)

    def client(self, *, retry: RetryPolicy | None = None) -> Client:
        """A requester on the insurer's participant listener."""
        return Client(self.insurer.participant, requester="chaos-tester", retry=retry)

    def gateway(self, org: str) -> Gateway:
        return self.hospital if org == "hospital" else self.insurer

    # ---- after the chaos ----

    def records(self, org: str) -> list[AuditRecord]:
        """One organization's audit records, in order (read from its file)."""
        store = open_store(self.gateway(org).audit_url)
        try:
            return list(store.records())
        finally:
            store.dispose()

    def records_by_task(self, org: str) -> dict[str, list[AuditRecord]]:
        by_task: dict[str, list[AuditRecord]] = {}
        for record in self.records(org):
            by_task.setdefault(record.task_id, []).append(record)
        return by_task

    def audit_kinds(self, org: str) -> dict[str, set[str]]:
        """Record kinds per task id in one organization's audit log (read from its file)."""
        return {t: {r.kind for r in rs} for t, rs in self.records_by_task(org).items()}

    def open_requests(self, org: str) -> dict[str, list[str]]:
        """Requests in `org`'s log that no record closes, by the rule `fedgate audit reconcile`
        applies (a final record of the task, or a later attempt that carried its key on): task
        id -> the kinds of its records."""
        records = self.records(org)
        bundle = Bundle(org, b"", b"", 0, None, chain=list(records))
        peer = "insurer" if org == "hospital" else "hospital"
        kinds: dict[str, list[str]] = {}
        for record in records:
            kinds.setdefault(record.task_id, []).append(record.kind)
        return {o.task_id: kinds[o.task_id] for o in open_requests(bundle, peer)}

    async def reconcile(self) -> Reconciliation:
        """Stop both gateways, export both logs, and reconcile them with `fedgate audit`."""
        await asyncio.gather(self.hospital.stop(), self.insurer.stop())
        bundles = {org: self.tmp / f"{org}-bundle.jsonl" for org in ("hospital", "insurer")}
        exports = await asyncio.gather(
            *(
                fedgate(
                    "audit", "export", "--config", str(self.gateway(org).config), "--out", str(path)
                )
                for org, path in bundles.items()
            )
        )
        for org, (code, _, err) in zip(bundles, exports, strict=True):
            assert code == 0, f"fedgate audit export of {org} failed: {err}"
        code, out, err = await fedgate(
            "audit",
            "reconcile",
            str(bundles["insurer"]),
            str(bundles["hospital"]),
            "--ca",
            str(self.pki.ca),
            "--json",
        )
        assert code in (0, 1), f"fedgate audit reconcile failed (exit {code}): {err}"
        return Reconciliation(code, json.loads(out), out)

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


@dataclass(frozen=True)
class Reconciliation:
    """What `fedgate audit reconcile --json` said: its exit code, the report, the raw text."""

    exit_code: int
    report: dict[str, Any]
    text: str

    @property
    def mismatches(self) -> list[dict[str, str]]:
        return list(self.report.get("mismatches", []))

    @property
    def open(self) -> list[dict[str, Any]]:
        """The requests reconcile lists as open (no record closes them)."""
        return list(self.report.get("open", []))

    def assert_agreed(self) -> None:
        """0 mismatches, and no request left open."""
        assert self.exit_code == 0 and not self.mismatches, (
            f"reconcile found {len(self.mismatches)} mismatches: "
            + "; ".join(f"{m['task_id']}: {m['message']}" for m in self.mismatches[:12])
        )
        assert not self.open, f"reconcile lists {len(self.open)} open requests: {self.open[:12]}"


async def fedgate(*args: str) -> tuple[int, str, str]:
    """Run the `fedgate` command line; returns exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"fedgate {' '.join(args)} did not end within 60s")
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def until(predicate: Callable[[], Any], seconds: float, what: str) -> None:
    """Wait for an observable state (a sync or async predicate); fail the test if it never comes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            pytest.fail(f"{what}: not reached within {seconds}s")
        await asyncio.sleep(0.05)


def receipt_problem(result: TaskResult, verifier: Verifier) -> str | None:
    """Why the receipt a requester was handed does not hold for the result's task and output."""
    if result.receipt is None:
        return "no receipt"
    try:
        receipt = SignedReceipt.from_json(result.receipt)
        verify_receipt(verifier, receipt, expected_org="hospital", released_output=result.output)
    except Exception as exc:
        return f"does not verify: {getattr(exc, 'message', exc)}"
    if receipt.body.task_id != result.task_id:
        return f"names task {receipt.body.task_id!r}, the result {result.task_id!r}"
    return None


async def check_histories(
    chaos: ChaosFederation, client: Client, results: Iterable[TaskResult]
) -> None:
    """One consistent history per completed request, on both sides (issue 15, "Done when").

    For each result the requester was handed: its receipt verifies and names its task id, `get`
    on that id says completed, and both logs hold the whole exchange under that id. In both logs
    every receipt kept names the task of its record, and no request is left open (each opening
    record is followed by a record of the same task that closes it: a final state, or whatever
    supersedes it). Run `chaos.reconcile()` afterwards for the auditor's view.
    """
    results = list(results)
    verifier = Verifier.from_file(chaos.pki.ca)
    problems: list[str] = []
    bad_receipts = {r.task_id: p for r in results if (p := receipt_problem(r, verifier))}
    if bad_receipts:
        problems.append(f"receipts handed to the requester do not hold: {bad_receipts}")
    states = {}
    for result in results:
        try:
            states[result.task_id] = (await bounded(client.get(result.task_id), 15, "get")).state
        except NotFound:
            states[result.task_id] = "not_found"
    unknown = {t: s for t, s in states.items() if s != "completed"}
    if unknown:
        problems.append(f"`get` on the task ids the requester was handed: {unknown}")
    for org, want in COMPLETED_RECORDS.items():
        by_task = chaos.records_by_task(org)
        missing = {
            r.task_id: sorted({x.kind for x in by_task.get(r.task_id, [])})
            for r in results
            if not want <= {x.kind for x in by_task.get(r.task_id, [])}
        }
        if missing:
            problems.append(f"{org}'s log lacks part of these completed exchanges: {missing}")
        foreign = {
            (record.task_id, record.kind): record.receipt.get("task_id")
            for records in by_task.values()
            for record in records
            if record.receipt is not None and record.receipt.get("task_id") != record.task_id
        }
        if foreign:
            problems.append(f"{org} keeps receipts of other tasks (record: receipt): {foreign}")
        # A record that closes an abandoned attempt may be written just after the answer.
        await eventually(lambda org=org: not chaos.open_requests(org), 5)
        left_open = chaos.open_requests(org)
        if left_open:
            problems.append(f"{org} left requests open (task: its records): {left_open}")
    assert not problems, "no consistent history:\n" + "\n".join(problems)


async def stream_until_working(
    client: Client,
    keys: list[str],
    task_ids: list[str],
    is_running: Callable[[str], bool],
    seconds: float,
    *,
    timeout: float = 12,  # noqa: ASYNC109 - the streams' deadline, sent to the gateways
) -> list[Any]:
    """Open one stream per key and wait until both gateways accepted it and its skill runs."""
    streams = [
        client.stream(
            TARGET,
            {"key": key, "seconds": seconds},
            timeout=timeout,
            task_id=task_id,
            idempotency_key=key,
        )
        for task_id, key in zip(task_ids, keys, strict=True)
    ]
    for updates in streams:
        first = await bounded(anext(updates), 10, "first update")
        assert first.state == "working"
    await until(lambda: all(is_running(key) for key in keys), 10, "every skill started")
    return streams


async def drain(updates: Any) -> tuple[str, Any]:
    """Read a stream to its end: ('completed'|state, result) or ('error', the SDK error)."""
    last = None
    try:
        async for update in updates:
            last = update
    except FedgateError as exc:
        return "error", exc
    assert last is not None and last.final, f"stream ended without a final update: {last}"
    return last.state, last.result


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
