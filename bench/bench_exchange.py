"""Full Fedgate exchange against a bare grpcio mTLS relay over the same three hops, in one run.

    python -m bench.bench_exchange [--quick | --smoke] [--profile]

Both paths run as separate processes per hop, on loopback, with the same certificates:

    baseline  requester ─► relay front ══ mTLS ══► relay back ─► relay agent      (bench/relay.py)
    fedgate   requester ─► gateway alpha ══ mTLS ══► gateway beta ─► SDK agent

The relay hops forward bytes and nothing else (generic bytes methods, no protobuf parsing); the
relay agent answers a fixed reply of the size of the Fedgate agent's result, and the requests are
the size of the SDK's TaskRequest. Fedgate runs with everything on: two `fedgate serve`
processes, a sharing policy of 1,000+ rules on each side filtering a 20-field payload (fields
withheld, one pseudonymized, one generalized), durable SQLite audit on both sides, signed receipts.

Measured alternately (baseline, fedgate, baseline, fedgate ... in rounds) so that the ratios hold
on a noisy machine: throughput and latency at 1 and at 32 tasks in flight, CPU per exchange of
every process, 1,000 tasks in flight at once (each agent holds every task until all 1,000 are
held, so they pile up on every hop) with the peak RSS (VmHWM) of every hop, and a 1 MiB payload
each way. Targets (DESIGN.md, "Performance targets"):
throughput at 32 in flight >= 0.5x the relay (aim 0.7x); p50 latency at 1 in flight <= 2x the
relay; each gateway <= 200 MB RSS with 1,000 tasks in flight.

--profile runs the Fedgate path once more with both gateways under py-spy (cProfile when py-spy
is not installed) and prints where the gateways spend their CPU per exchange.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from fedgate.convert import dict_to_struct
from fedgate.v1 import fedgate_pb2 as pb

from bench import relay
from gateway.identity.certs import org_dns_name

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "policies" / "model.conf"
PYTHON = sys.executable
REQUESTER_ORG, RESPONDER_ORG = "alpha", "beta"
AGENT = "records"
TARGET_32_MIN, TARGET_32_AIM = 0.5, 0.7
TARGET_P50_MAX = 2.0
TARGET_RSS_MB = 200.0
BIG_BYTES = 1024 * 1024
READY_TIMEOUT = 60.0
CALL_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0

# ---- payloads ------------------------------------------------------------------------------

# The requester's input: 20 fields. Its gateway's `send` policy withholds member.name (no rule)
# and context.note (deny), pseudonymizes member.insurance_id and generalizes member.date_of_birth.
REQUEST: dict[str, Any] = {
    "patient_id": "P-0012345",
    "purpose": "claims",
    "claim": {
        "id": "C-778812",
        "amount": 1830.5,
        "currency": "EUR",
        "procedure_code": "99213",
        "diagnosis_code": "J45.909",
        "date_of_service": "2024-02-03",
    },
    "member": {
        "insurance_id": "INS-99812",
        "name": "Ada Lovelace",
        "date_of_birth": "1984-05-17",
        "plan": "gold",
    },
    "provider": {
        "id": "PR-55",
        "name": "Springfield General",
        "country": "DE",
        "npi": "1234567890",
    },
    "context": {
        "channel": "api",
        "priority": "normal",
        "locale": "en-GB",
        "note": "internal: call back after 5pm",
    },
}

# The agent's result: 20 fields. The responder's `share` policy withholds patient.name (deny),
# patient.ssn (no rule), patient.address.street (deny), notes (deny) and physician (no rule),
# pseudonymizes patient.insurance_id and generalizes patient.date_of_birth to its year.
RESULT: dict[str, Any] = {
    "patient": {
        "name": "Ada Lovelace",
        "ssn": "123-45-6789",
        "insurance_id": "INS-99812",
        "date_of_birth": "1984-05-17",
        "sex": "F",
        "address": {"street": "1 Main St", "city": "Springfield", "zip": "12345", "country": "US"},
    },
    "visit": {"id": "V-1", "ward": "B2", "admitted": "2024-02-01", "discharged": "2024-02-05"},
    "billing": {"treatment_cost": 1830.5, "currency": "EUR", "payer": "INS-CO-7"},
    "diagnosis_code": "J45.909",
    "procedure_code": "99213",
    "notes": "call back after 5pm",
    "physician": "Dr. J. Watson",
}
# Reported paths name only keys a rule names: patient.ssn and physician have no rule of their own.
RESULT_WITHHELD = {"patient.name", "patient.*", "patient.address.street", "notes", "*"}

REQUESTER_RULES = [
    f"p, {RESPONDER_ORG}, {AGENT}, *, send, patient_id, allow",
    f"p, {RESPONDER_ORG}, {AGENT}, *, send, purpose, allow",
    f"p, {RESPONDER_ORG}, {AGENT}, *, send, claim, allow",
    f"p, {RESPONDER_ORG}, {AGENT}, *, send, member.insurance_id, pseudonymize",
    f"p, {RESPONDER_ORG}, {AGENT}, *, send, member.date_of_birth, generalize:year",
    f"p, {RESPONDER_ORG}, {AGENT}, *, send, member.plan, allow",
    f"p, {RESPONDER_ORG}, {AGENT}, *, send, provider, allow",
    f"p, {RESPONDER_ORG}, {AGENT}, *, send, context, allow",
    f"p, {RESPONDER_ORG}, {AGENT}, *, send, context.note, deny",
    f"p, {RESPONDER_ORG}, {AGENT}, big, send, blob, allow",
]
RESPONDER_RULES = [
    f"p, {REQUESTER_ORG}, {AGENT}, *, invoke, *, allow",
    f"p, {REQUESTER_ORG}, {AGENT}, *, share, patient.name, deny",
    f"p, {REQUESTER_ORG}, {AGENT}, *, share, patient.insurance_id, pseudonymize",
    f"p, {REQUESTER_ORG}, {AGENT}, *, share, patient.date_of_birth, generalize:year",
    f"p, {REQUESTER_ORG}, {AGENT}, *, share, patient.sex, allow",
    f"p, {REQUESTER_ORG}, {AGENT}, *, share, patient.address, allow",
    f"p, {REQUESTER_ORG}, {AGENT}, *, share, patient.address.street, deny",
    f"p, {REQUESTER_ORG}, {AGENT}, *, share, visit.*, allow",
    f"p, {REQUESTER_ORG}, {AGENT}, *, share, billing, allow",
    f"p, {REQUESTER_ORG}, {AGENT}, *, share, diagnosis_code, allow",
    f"p, {REQUESTER_ORG}, {AGENT}, *, share, procedure_code, allow",
    f"p, {REQUESTER_ORG}, {AGENT}, *, share, notes, deny",
    f"p, {REQUESTER_ORG}, {AGENT}, big, share, blob, allow",
]


def filler_rules(count: int, peer: str, salt: int) -> list[str]:
    """`count` rules that never decide the measured exchange: other peers, agents and skills,
    some for the measured peer (other agents) and some for every peer (`*`)."""
    fields = [
        "patient.name",
        "patient.ssn",
        "items[].price",
        "order.*",
        "**.secret",
        "claim.amount",
        "result.score",
        "meta",
    ]
    effects = ["allow", "deny", "mask:4", "pseudonymize", "generalize:year", "generalize:10"]
    lines = []
    for i in range(count):
        n = i + salt
        who = peer if n % 10 == 0 else "*" if n % 10 == 1 else f"org-{n % 97:03d}"
        agent, skill = f"agent{n % 41}", f"skill{n % 7}"
        direction = ("share", "send", "invoke")[n % 3]
        if direction == "invoke":
            lines.append(f"p, {who}, {agent}, {skill}, invoke, *, allow")
        else:
            lines.append(
                f"p, {who}, {agent}, {skill}, {direction}, "
                f"{fields[n % len(fields)]}.f{n}, {effects[n % len(effects)]}"
            )
    return lines


def rules_csv(relevant: list[str], filler: int, peer: str, salt: int) -> str:
    lines = ["# generated by bench/bench_exchange.py", *relevant, *filler_rules(filler, peer, salt)]
    return "\n".join(lines) + "\n"


def _request_pb(skill: str, data: dict[str, Any]) -> pb.TaskRequest:
    """The TaskRequest the SDK sends (same fields as participant_sdk.Client._request)."""
    return pb.TaskRequest(
        task_id=str(uuid.uuid4()),
        target_org=RESPONDER_ORG,
        agent=AGENT,
        skill=skill,
        input=dict_to_struct(data),
        requester="bench",
        deadline_unix_ms=int((time.time() + CALL_TIMEOUT) * 1000),
    )


def _result_pb(data: dict[str, Any]) -> pb.TaskResult:
    """The TaskResult the SDK agent sends back to its gateway."""
    return pb.TaskResult(
        task_id=str(uuid.uuid4()), state=pb.TASK_STATE_COMPLETED, output=dict_to_struct(data)
    )


@dataclass(frozen=True)
class Sizes:
    request: int
    result: int
    big_request: int
    big_result: int

    @classmethod
    def compute(cls, blob: str) -> Sizes:
        return cls(
            request=_request_pb("summary", REQUEST).ByteSize(),
            result=_result_pb(RESULT).ByteSize(),
            big_request=_request_pb("big", {"blob": blob}).ByteSize(),
            big_result=_result_pb({"blob": blob}).ByteSize(),
        )


# ---- settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    mode: str
    rounds: int
    seconds_1: float  # per phase at 1 in flight
    seconds_32: float  # per phase at 32 in flight
    max_calls: int  # per phase, a bound on top of the time
    warmup: int
    in_flight: int  # the pile-up run
    slow_ms: float  # the pile-up run: the agent holds each task until all are held, or this
    big_calls: int  # per side per round
    filler: int  # filler rules per gateway


SETTINGS = {
    "full": Settings(
        "full",
        rounds=4,
        seconds_1=1.5,
        seconds_32=2.5,
        max_calls=20_000,
        warmup=200,
        in_flight=1000,
        slow_ms=30_000,
        big_calls=3,
        filler=1000,
    ),
    "quick": Settings(
        "quick",
        rounds=2,
        seconds_1=0.6,
        seconds_32=1.0,
        max_calls=5_000,
        warmup=100,
        in_flight=1000,
        slow_ms=20_000,
        big_calls=2,
        filler=1000,
    ),
    "smoke": Settings(
        "smoke",
        rounds=1,
        seconds_1=0.25,
        seconds_32=0.4,
        max_calls=500,
        warmup=20,
        in_flight=100,
        slow_ms=5_000,
        big_calls=1,
        filler=1000,
    ),
}


# ---- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A process this benchmark started; `pid` is the measured one (py-spy's child if profiled)."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    pid: int = 0
    data_dir: Path | None = None
    stdout_lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pid = self.pid or self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Processes:
    """Every process started by the benchmark; `stop()` ends each of them, by its id."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[Proc] = []
        self._files: list[TextIO] = []

    async def spawn(self, name: str, *argv: str, env: dict[str, str] | None = None) -> Proc:
        log = self.folder / f"{name}.log"
        handle = log.open("w")
        self._files.append(handle)
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=handle,
            cwd=str(ROOT),
            env={**os.environ, **(env or {})},
            start_new_session=True,  # a Ctrl-C in the terminal reaches us only; we stop them
        )
        proc = Proc(name, process, log)
        self.procs.append(proc)
        return proc

    async def read_ready(self, proc: Proc, prefix: str) -> str:
        """The first stdout line starting with `prefix` (relays and agents announce themselves)."""
        assert proc.process.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                raw = await asyncio.wait_for(
                    proc.process.stdout.readline(), max(0.1, deadline - time.monotonic())
                )
            except TimeoutError:
                break
            if not raw:
                raise RuntimeError(f"{proc.name} exited before it was ready:\n{proc.log_tail()}")
            line = raw.decode().strip()
            proc.stdout_lines.append(line)
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"{proc.name} not ready after {READY_TIMEOUT:.0f} s:\n{proc.log_tail()}")

    async def wait_log(self, proc: Proc, marker: str) -> str:
        """Wait until `marker` appears in the process's log (a gateway logs it when serving)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            text = proc.log.read_text(errors="replace")
            for line in text.splitlines():
                if marker in line:
                    return line
            if proc.process.returncode is not None:
                raise RuntimeError(
                    f"{proc.name} exited ({proc.process.returncode}) before it was "
                    f"ready:\n{proc.log_tail()}"
                )
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{proc.name} not ready after {READY_TIMEOUT:.0f} s:\n{proc.log_tail()}")

    async def stop(self, procs: Sequence[Proc] | None = None) -> None:
        """SIGTERM (to the measured pid, which for py-spy is its child), then SIGKILL after a
        timeout; each process by its own id."""
        chosen = list(self.procs if procs is None else procs)
        for proc in reversed(chosen):
            if proc.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        await asyncio.gather(*(self._finish(proc) for proc in chosen))
        for proc in chosen:
            if proc in self.procs:
                self.procs.remove(proc)
        if procs is None:
            for handle in self._files:
                handle.close()
            self._files.clear()

    async def _finish(self, proc: Proc) -> None:
        if proc.process.stdout is not None:
            with contextlib.suppress(Exception):
                rest = await asyncio.wait_for(proc.process.stdout.read(), STOP_TIMEOUT)
                proc.stdout_lines += rest.decode(errors="replace").splitlines()
        try:
            await asyncio.wait_for(proc.process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            for pid in {proc.pid, proc.process.pid}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.process.wait(), STOP_TIMEOUT)


def proc_status(pid: int, key: str) -> float:
    """A /proc/PID/status value in MB (VmHWM, VmRSS); 0 when the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    if pid == os.getpid():
        return time.process_time()
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    return 0.0


# ---- the two paths -------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    cert: dict[str, Path]
    key: dict[str, Path]


def make_pki(folder: Path) -> Pki:
    from gateway.identity.certs import create_ca, issue_gateway_cert, write_pair

    ca = create_ca("fedgate bench CA")
    folder.mkdir(parents=True, exist_ok=True)
    ca_path = folder / "ca.crt"
    ca_path.write_bytes(ca.cert_pem)
    certs, keys = {}, {}
    for org in (REQUESTER_ORG, RESPONDER_ORG):
        certs[org], keys[org] = folder / f"{org}.crt", folder / f"{org}.key"
        write_pair(issue_gateway_cert(ca, org), certs[org], keys[org])
    return Pki(ca_path, certs, keys)


@dataclass
class Path3:
    """One path's processes: requester-side hop, responder-side hop, agent."""

    front: Proc
    back: Proc
    agent: Proc


@dataclass
class Federation:
    path: Path3
    participant: str  # where the requester connects
    requester_token: str | None
    features: list[str]


def tokens_supported() -> bool:
    from gateway.config import ParticipantSection

    return "require_tokens" in ParticipantSection.model_fields


def delegation_in_path() -> bool:
    """Whether the requesting gateway issues delegation statements (read from its source, in
    every subpackage: the code moved out of the flat gateway/ folder)."""
    sources = [p for p in (ROOT / "gateway").glob("**/*.py") if p.name != "delegation.py"]
    return any("issue_delegation(" in p.read_text() for p in sources)


LIMITS = """
[limits]
# Raised for the benchmark: the 1,000-in-flight run is one peer with 1,000 tasks at once.
peer_rate_per_second = 1000000.0
peer_burst = 1000000
peer_max_concurrent_tasks = 4096
"""


def write_configs(folder: Path, pki: Pki, filler: int, *, tokens: bool) -> dict[str, Path]:
    from gateway.local import write_gateway_config

    ports = {org: (free_port(), free_port()) for org in (REQUESTER_ORG, RESPONDER_ORG)}
    peers = {REQUESTER_ORG: RESPONDER_ORG, RESPONDER_ORG: REQUESTER_ORG}
    relevant = {REQUESTER_ORG: REQUESTER_RULES, RESPONDER_ORG: RESPONDER_RULES}
    paths = {}
    for salt, org in enumerate((REQUESTER_ORG, RESPONDER_ORG)):
        rules = folder / f"{org}.csv"
        rules.write_text(rules_csv(relevant[org], filler, peers[org], salt))
        path = write_gateway_config(
            folder / org,
            org,
            cert=pki.cert[org],
            key=pki.key[org],
            ca=pki.ca,
            model=MODEL,
            rules=rules,
            peers=[peers[org]],
            extra=LIMITS,
        )
        fed_port, part_port = ports[org]
        text = re.sub(r"(?m)^require_tokens = \w+\n", "", path.read_text())
        text = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{fed_port}"', 1)
        participant = f'listen = "127.0.0.1:{part_port}"'
        if tokens:
            participant += "\nrequire_tokens = true"
        text = text.replace('listen = "127.0.0.1:0"', participant, 1)
        text = text.replace(
            'address = "127.0.0.1:1"', f'address = "127.0.0.1:{ports[peers[org]][0]}"'
        )
        path.write_text(text)
        paths[org] = path
    return paths


def issue_tokens(configs: dict[str, Path]) -> tuple[str, str]:
    """(requester token on alpha, agent token on beta)."""
    from gateway.config import load_config
    from gateway.identity.tokens import token_authority

    requester = token_authority(load_config(configs[REQUESTER_ORG])).issue(
        "bench-requester", calls=[f"{RESPONDER_ORG}/{AGENT}"], ttl_seconds=3600
    )
    agent = token_authority(load_config(configs[RESPONDER_ORG])).issue(
        "bench-agent", agents=[AGENT], ttl_seconds=3600
    )
    return requester, agent


PROFILE_RATE = 250


def py_spy_path() -> str | None:
    beside = Path(PYTHON).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def _gateway(procs: Processes, name: str, config: Path, profile: Path | None) -> Proc:
    serve = ["-m", "gateway.cli", "serve", "--config", str(config)]
    py_spy = py_spy_path()
    if profile is None:
        argv = [PYTHON, *serve]
    elif py_spy is not None:
        # --gil: only the thread holding the GIL is sampled, so idle pool threads and waits
        # (fsync, epoll) do not count: the samples are the gateway's Python CPU time.
        argv = [
            py_spy,
            "record",
            "--gil",
            "--nonblocking",
            "-r",
            str(PROFILE_RATE),
            "--nolineno",
            "-f",
            "raw",
            "-o",
            str(profile),
            "--",
            PYTHON,
            *serve,
        ]
    else:
        argv = [PYTHON, "-m", "cProfile", "-o", str(profile), *serve]
    proc = await procs.spawn(name, *argv)
    proc.data_dir = config.parent / "data"
    await procs.wait_log(proc, "serving: federation on port")
    pid_file = proc.data_dir / "fedgate.pid"
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            proc.pid = int(pid_file.read_text().strip())
            break
        await asyncio.sleep(0.05)
    return proc


async def start_fedgate(
    procs: Processes, folder: Path, pki: Pki, settings: Settings, profile_dir: Path | None = None
) -> Federation:
    features = [
        "mTLS between gateways",
        "durable SQLite audit on both gateways",
        "signed receipts (verified by the requester's gateway)",
    ]
    tokens = tokens_supported()
    configs = write_configs(folder, pki, settings.filler, tokens=tokens)
    requester_token = agent_token = None
    if tokens:
        requester_token, agent_token = issue_tokens(configs)
        features.append("participant tokens required on both gateways")
    else:
        features.append("participant tokens NOT in the path (no [participant] require_tokens yet)")
    features.append(
        "delegation statements "
        + (
            "in the path"
            if delegation_in_path()
            else "NOT in the path (not wired in the router yet)"
        )
    )
    profiles = {org: (profile_dir / f"{org}.profile" if profile_dir else None) for org in configs}
    beta, alpha = await asyncio.gather(
        _gateway(procs, "gateway-beta", configs[RESPONDER_ORG], profiles[RESPONDER_ORG]),
        _gateway(procs, "gateway-alpha", configs[REQUESTER_ORG], profiles[REQUESTER_ORG]),
    )
    ports = {}
    for proc in (alpha, beta):
        match = re.search(
            r"federation on port (\d+).*participants on port (\d+)", proc.log.read_text()
        )
        assert match, proc.log_tail()
        ports[proc.name] = int(match.group(2))
    agent = await procs.spawn(
        "fedgate-agent",
        PYTHON,
        "-m",
        "bench.bench_exchange",
        "--serve-agent",
        f"127.0.0.1:{ports['gateway-beta']}",
        "--slow-ms",
        str(settings.slow_ms),
        "--pile-up",
        str(settings.in_flight),
        env={"FEDGATE_BENCH_AGENT_TOKEN": agent_token or ""},
    )
    await procs.read_ready(agent, "ready")
    return Federation(
        Path3(alpha, beta, agent), f"127.0.0.1:{ports['gateway-alpha']}", requester_token, features
    )


async def start_relay(
    procs: Processes, pki: Pki, sizes: Sizes, settings: Settings
) -> tuple[Path3, str]:
    module = [PYTHON, "-m", "bench.relay"]
    agent = await procs.spawn(
        "relay-agent",
        *module,
        "agent",
        "--reply-bytes",
        str(sizes.result),
        "--big-reply-bytes",
        str(sizes.big_result),
        "--slow-ms",
        str(settings.slow_ms),
        "--pile-up",
        str(settings.in_flight),
    )
    agent_port = (await procs.read_ready(agent, "ready")).split()[1]
    back = await procs.spawn(
        "relay-back",
        *module,
        "back",
        "--upstream",
        f"127.0.0.1:{agent_port}",
        "--cert",
        str(pki.cert[RESPONDER_ORG]),
        "--key",
        str(pki.key[RESPONDER_ORG]),
        "--ca",
        str(pki.ca),
    )
    back_port = (await procs.read_ready(back, "ready")).split()[1]
    front = await procs.spawn(
        "relay-front",
        *module,
        "front",
        "--upstream",
        f"127.0.0.1:{back_port}",
        "--cert",
        str(pki.cert[REQUESTER_ORG]),
        "--key",
        str(pki.key[REQUESTER_ORG]),
        "--ca",
        str(pki.ca),
        "--server-name",
        org_dns_name(RESPONDER_ORG),
    )
    front_port = (await procs.read_ready(front, "ready")).split()[1]
    return Path3(front, back, agent), f"127.0.0.1:{front_port}"


# ---- the Fedgate agent process ---------------------------------------------------------------


async def serve_agent(gateway: str, slow_seconds: float, pile_up: int) -> int:
    """The agent of the Fedgate path: one AgentWorker, in its own process."""
    from participant_sdk import Agent, AgentWorker, TaskContext

    records = Agent(AGENT, description="benchmark agent")
    held = relay.PileUp(pile_up, slow_seconds)

    @records.skill
    async def summary(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        return RESULT

    @records.skill
    async def slow(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        await held.hold()
        return RESULT

    @records.skill
    async def big(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        return {"blob": data.get("blob", "")}

    worker = AgentWorker(
        [records], gateway, token=os.environ.get("FEDGATE_BENCH_AGENT_TOKEN") or None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    running = asyncio.ensure_future(worker.run())
    waiting = asyncio.ensure_future(worker.connected.wait())
    await asyncio.wait(
        {running, waiting}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
    )
    if not worker.connected.is_set():
        waiting.cancel()
        worker.stop()
        running.cancel()
        with contextlib.suppress(BaseException):
            await running  # raises the refusal, if that is what happened
        print("agent could not connect to its gateway", file=sys.stderr)
        return 1
    print("ready", flush=True)
    await stop.wait()
    worker.stop()
    running.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(running, 5)
    print(f"peak_slow_in_flight {held.peak}", flush=True)
    return 0


# ---- load ----------------------------------------------------------------------------------

Call = Callable[[], Awaitable[None]]


@dataclass
class Phase:
    completed: int
    elapsed: float
    latencies: list[float]
    cpu: dict[str, float]  # CPU seconds used per process during the phase


def _rss(path: Path3, key: str) -> dict[str, float]:
    return {"hop A": proc_status(path.front.pid, key), "hop B": proc_status(path.back.pid, key)}


def _pids(path: Path3) -> dict[str, int]:
    return {
        "requester": os.getpid(),
        "hop A": path.front.pid,
        "hop B": path.back.pid,
        "agent": path.agent.pid,
    }


async def closed_loop(
    call: Call, concurrency: int, seconds: float, max_calls: int, pids: dict[str, int]
) -> Phase:
    """`concurrency` workers call back to back until `seconds` pass or `max_calls` are made."""
    latencies: list[float] = []
    issued = 0
    cpu_before = {name: proc_cpu(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    stop_at = started + seconds

    async def worker() -> None:
        nonlocal issued
        while issued < max_calls and time.perf_counter() < stop_at:
            issued += 1
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = {name: proc_cpu(pid) - cpu_before[name] for name, pid in pids.items()}
    return Phase(len(latencies), elapsed, latencies, cpu)


async def burst(call: Call, count: int) -> tuple[float, list[float]]:
    """`count` calls opened at once; (wall time, latencies)."""
    latencies: list[float] = []

    async def one() -> None:
        t0 = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return time.perf_counter() - started, latencies


class BaselineCaller:
    def __init__(self, address: str, sizes: Sizes) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=relay.CHANNEL_OPTIONS)
        self.request = b"q" * sizes.request
        self.big_request = b"q" * sizes.big_request
        self.sizes = sizes
        self._stubs = {m: self.channel.unary_unary(relay.method_path(m)) for m in relay.METHODS}

    async def _call(self, method: str, request: bytes, size: int) -> None:
        reply = await self._stubs[method](request, timeout=CALL_TIMEOUT)
        if len(reply) != size:
            raise RuntimeError(f"relay answered {len(reply)} bytes, expected {size}")

    async def echo(self) -> None:
        await self._call("Echo", self.request, self.sizes.result)

    async def slow(self) -> None:
        await self._call("Slow", self.request, self.sizes.result)

    async def big(self) -> None:
        await self._call("Big", self.big_request, self.sizes.big_result)

    async def close(self) -> None:
        await self.channel.close()


class FedgateCaller:
    def __init__(self, address: str, token: str | None, blob: str) -> None:
        from participant_sdk import Client

        self.client = Client(address, requester="bench", token=token)
        self.target = f"{RESPONDER_ORG}/{AGENT}"
        self.blob = blob

    async def _call(self, skill: str, data: dict[str, Any]) -> Any:
        return await self.client.call(f"{self.target}.{skill}", data, timeout=CALL_TIMEOUT)

    async def echo(self) -> None:
        await self._call("summary", REQUEST)

    async def slow(self) -> None:
        await self._call("slow", REQUEST)

    async def big(self) -> None:
        result = await self._call("big", {"blob": self.blob})
        if len(result.output.get("blob", "")) != len(self.blob):
            raise RuntimeError("the 1 MiB blob did not come back whole")

    async def check(self) -> str:
        """One exchange, checked: what the policy did and that a signed receipt came back."""
        result = await self._call("summary", REQUEST)
        withheld = set(result.withheld)
        if withheld != RESULT_WITHHELD:
            raise RuntimeError(f"unexpected withheld fields: {sorted(withheld)}")
        patient = result.output["patient"]
        if not str(patient.get("insurance_id", "")).startswith("pseu_"):
            raise RuntimeError("patient.insurance_id was not pseudonymized")
        if patient.get("date_of_birth") != "1984":
            raise RuntimeError("patient.date_of_birth was not generalized")
        if not result.receipt or not result.receipt.get("signature"):
            raise RuntimeError("the result carries no signed receipt")
        return (
            f"result: {len(withheld)} fields withheld, 1 pseudonymized, 1 generalized, "
            f"signed receipt; request: 2 withheld, 1 pseudonymized, 1 generalized"
        )

    async def close(self) -> None:
        await self.client.close()


# ---- figures -------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class SideFigures:
    phases: dict[int, list[Phase]] = field(default_factory=lambda: {1: [], 32: []})
    rss_warm: dict[str, float] = field(default_factory=dict)  # VmRSS after the warm-up
    rss_rounds: dict[str, float] = field(default_factory=dict)  # VmRSS after the rounds
    hwm_steady: dict[str, float] = field(default_factory=dict)
    hwm_pileup: dict[str, float] = field(default_factory=dict)
    pileup_wall: float = 0.0
    pileup_latencies: list[float] = field(default_factory=list)
    pileup_peak_at_agent: int = 0
    big_latencies: list[float] = field(default_factory=list)

    def throughput(self, concurrency: int) -> float:
        phases = self.phases[concurrency]
        return sum(p.completed for p in phases) / sum(p.elapsed for p in phases)

    def latencies(self, concurrency: int) -> list[float]:
        return [x for p in self.phases[concurrency] for x in p.latencies]

    def exchanges(self) -> int:
        return sum(p.completed for phases in self.phases.values() for p in phases)

    def cpu_per_exchange_ms(self, concurrency: int) -> dict[str, float]:
        phases = self.phases[concurrency]
        done = sum(p.completed for p in phases)
        names = phases[0].cpu.keys() if phases else ()
        return {n: 1000 * sum(p.cpu[n] for p in phases) / max(1, done) for n in names}


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"machine: {model}, {usable} cores usable ({os.cpu_count()} online), "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}, "
        f"grpcio {importlib.metadata.version('grpcio')}, "
        f"protobuf {importlib.metadata.version('protobuf')}"
    )


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def render(
    base: SideFigures,
    fed: SideFigures,
    settings: Settings,
    sizes: Sizes,
    features: list[str],
    check: str,
) -> tuple[str, dict[str, float]]:
    rows: list[tuple[str, str, str, str, str, str]] = []
    figures: dict[str, float] = {}

    def ms(x: float) -> str:
        return f"{x * 1000:,.2f}"

    for c in (1, 32):
        tb, tf = base.throughput(c), fed.throughput(c)
        figures[f"throughput_{c}_baseline"], figures[f"throughput_{c}_fedgate"] = tb, tf
        figures[f"throughput_{c}_ratio"] = tf / tb
        target, verdict = "", ""
        if c == 32:
            target = f">= {TARGET_32_MIN}x (aim {TARGET_32_AIM}x)"
            verdict = _mark(tf / tb >= TARGET_32_MIN) + (
                ""
                if tf / tb < TARGET_32_MIN
                else ", aim met too"
                if tf / tb >= TARGET_32_AIM
                else f", below the {TARGET_32_AIM}x aim"
            )
        rows.append(
            (
                f"throughput, {c} in flight (exchanges/s)",
                f"{tb:,.0f}",
                f"{tf:,.0f}",
                f"{tf / tb:.2f}x",
                target,
                verdict,
            )
        )
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            lb, lf = pct(base.latencies(c), q), pct(fed.latencies(c), q)
            figures[f"latency_{label}_{c}_ratio"] = lf / lb
            target, verdict = "", ""
            if c == 1 and label == "p50":
                target, verdict = f"<= {TARGET_P50_MAX}x", _mark(lf / lb <= TARGET_P50_MAX)
            rows.append(
                (
                    f"latency {label}, {c} in flight (ms)",
                    ms(lb),
                    ms(lf),
                    f"{lf / lb:.2f}x",
                    target,
                    verdict,
                )
            )
    n = settings.in_flight
    rows.append(
        (
            f"{n:,} in flight at once: wall time (s)",
            f"{base.pileup_wall:.2f}",
            f"{fed.pileup_wall:.2f}",
            f"{fed.pileup_wall / base.pileup_wall:.2f}x",
            "",
            "",
        )
    )
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        lb, lf = pct(base.pileup_latencies, q), pct(fed.pileup_latencies, q)
        rows.append(
            (f"{n:,} in flight: latency {label} (ms)", ms(lb), ms(lf), f"{lf / lb:.2f}x", "", "")
        )
    rows.append(
        (
            f"{n:,} in flight: most held at once by the agent",
            f"{base.pileup_peak_at_agent:,}",
            f"{fed.pileup_peak_at_agent:,}",
            "",
            "",
            "",
        )
    )
    lb, lf = pct(base.big_latencies, 0.5), pct(fed.big_latencies, 0.5)
    figures["big_p50_ratio"] = lf / lb
    rows.append(("1 MiB each way: latency p50 (ms)", ms(lb), ms(lf), f"{lf / lb:.2f}x", "", ""))
    for hop, label in (("hop A", "requester side"), ("hop B", "responder side")):
        rows.append(
            (
                f"RSS {hop}: after warm-up -> after the rounds (MB)",
                f"{base.rss_warm.get(hop, 0):.0f} -> {base.rss_rounds.get(hop, 0):.0f}",
                f"{fed.rss_warm.get(hop, 0):.0f} -> {fed.rss_rounds.get(hop, 0):.0f}",
                "",
                "",
                "",
            )
        )
        sb, sf = base.hwm_steady.get(hop, 0), fed.hwm_steady.get(hop, 0)
        rows.append(
            (
                f"peak RSS {hop} ({label}), after 1/32 in flight (MB)",
                f"{sb:.0f}",
                f"{sf:.0f}",
                f"{sf / sb:.1f}x" if sb else "",
                "",
                "",
            )
        )
        pb_, pf = base.hwm_pileup.get(hop, 0), fed.hwm_pileup.get(hop, 0)
        figures[f"rss_{hop.replace(' ', '_')}_pileup_mb"] = pf
        target = f"<= {TARGET_RSS_MB:.0f} MB" if n >= 1000 else f"(needs {1000:,})"
        verdict = _mark(0 < pf <= TARGET_RSS_MB) if n >= 1000 else "-"
        rows.append(
            (
                f"peak RSS {hop}, after {n:,} in flight (MB)",
                f"{pb_:.0f}",
                f"{pf:.0f}",
                f"{pf / pb_:.1f}x" if pb_ else "",
                target,
                verdict,
            )
        )
    cb, cf = base.cpu_per_exchange_ms(32), fed.cpu_per_exchange_ms(32)
    for name in cb:
        rows.append(
            (
                f"CPU per exchange at 32 in flight, {name} (ms)",
                f"{cb[name]:.3f}",
                f"{cf[name]:.3f}",
                f"{cf[name] / cb[name]:.1f}x" if cb[name] else "",
                "",
                "",
            )
        )
    total_b, total_f = sum(cb.values()), sum(cf.values())
    rows.append(
        (
            "CPU per exchange at 32 in flight, all 4 processes (ms)",
            f"{total_b:.3f}",
            f"{total_f:.3f}",
            f"{total_f / total_b:.1f}x" if total_b else "",
            "",
            "",
        )
    )

    header = ("figure", "bare relay", "fedgate", "ratio", "target", "verdict")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        machine(),
        f"mode: {settings.mode}; {settings.rounds} alternating rounds (baseline, fedgate); "
        f"{settings.seconds_1:g} s at 1 in flight and {settings.seconds_32:g} s at 32 per "
        f"phase; 1 MiB: {settings.big_calls} call(s) per side per round",
        f"exchanges in the rounds: {base.exchanges():,} relay, {fed.exchanges():,} fedgate "
        f"(+ {settings.big_calls * settings.rounds} of 1 MiB each)",
        f"payload: request {sizes.request} B, result {sizes.result} B (20 fields each); "
        f"big: {sizes.big_request:,} B / {sizes.big_result:,} B",
        f"fedgate path: {settings.filler + len(REQUESTER_RULES)} rules on alpha, "
        f"{settings.filler + len(RESPONDER_RULES)} on beta; " + "; ".join(features),
        f"checked on a live exchange: {check}",
        "",
    ]
    sep = "  "
    lines.append(
        sep.join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    )
    lines.append(sep.join("-" * w for w in widths))
    for row in rows:
        lines.append(
            sep.join(
                v.ljust(w) if i == 0 else v.rjust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    lines.append("")
    ratio_32, ratio_p50 = figures["throughput_32_ratio"], figures["latency_p50_1_ratio"]
    rss = (figures["rss_hop_A_pileup_mb"], figures["rss_hop_B_pileup_mb"])
    summary = (
        f"targets (DESIGN.md): throughput at 32 in flight {ratio_32:.2f}x of the relay "
        f"(>= {TARGET_32_MIN}x): {_mark(ratio_32 >= TARGET_32_MIN)}; p50 at 1 in flight "
        f"{ratio_p50:.2f}x (<= {TARGET_P50_MAX}x): {_mark(ratio_p50 <= TARGET_P50_MAX)}"
    )
    if n >= 1000:
        summary += (
            f"; gateway RSS with {n:,} in flight {rss[0]:.0f} / {rss[1]:.0f} MB "
            f"(<= {TARGET_RSS_MB:.0f}): {_mark(0 < max(rss) <= TARGET_RSS_MB)}"
        )
    lines.append(summary)
    return "\n".join(lines), figures


# ---- the run -------------------------------------------------------------------------------


@dataclass
class Outcome:
    text: str
    figures: dict[str, float]


def _progress(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def measure(settings: Settings) -> Outcome:
    blob = "x" * BIG_BYTES
    sizes = Sizes.compute(blob)
    with tempfile.TemporaryDirectory(prefix="fedgate-bench-exchange-") as tmp:
        folder = Path(tmp)
        procs = Processes(folder)
        base_caller: BaselineCaller | None = None
        fed_caller: FedgateCaller | None = None
        try:
            pki = make_pki(folder / "pki")
            _progress("starting 2 gateways, the SDK agent and 3 relay processes")
            (fed, (relay_path, relay_address)) = await asyncio.gather(
                start_fedgate(procs, folder, pki, settings),
                start_relay(procs, pki, sizes, settings),
            )
            base_caller = BaselineCaller(relay_address, sizes)
            fed_caller = FedgateCaller(fed.participant, fed.requester_token, blob)
            check = await fed_caller.check()
            base, fedg = SideFigures(), SideFigures()
            sides = ((base, base_caller, relay_path), (fedg, fed_caller, fed.path))
            _progress("warming up")
            for figures, caller, path in sides:
                await closed_loop(caller.echo, 32, 30.0, settings.warmup, _pids(path))
                await caller.big()
                figures.rss_warm = _rss(path, "VmRSS")
            for r in range(settings.rounds):
                _progress(f"round {r + 1}/{settings.rounds}: 1 and 32 in flight, 1 MiB")
                for concurrency, seconds in ((1, settings.seconds_1), (32, settings.seconds_32)):
                    for figures, caller, path in sides:
                        figures.phases[concurrency].append(
                            await closed_loop(
                                caller.echo, concurrency, seconds, settings.max_calls, _pids(path)
                            )
                        )
                for figures, caller, _ in sides:
                    for _ in range(settings.big_calls):
                        t0 = time.perf_counter()
                        await caller.big()
                        figures.big_latencies.append(time.perf_counter() - t0)
            for figures, _, path in sides:
                figures.hwm_steady = _rss(path, "VmHWM")
                figures.rss_rounds = _rss(path, "VmRSS")
            _progress(f"{settings.in_flight:,} tasks in flight at once")
            for figures, caller, path in sides:
                figures.pileup_wall, figures.pileup_latencies = await burst(
                    caller.slow, settings.in_flight
                )
                figures.hwm_pileup = _rss(path, "VmHWM")
            await base_caller.close()
            await fed_caller.close()
            base_caller = fed_caller = None
            await procs.stop([fed.path.agent, relay_path.agent])
            for figures, path in ((base, relay_path), (fedg, fed.path)):
                for line in path.agent.stdout_lines:
                    if line.startswith("peak_slow_in_flight"):
                        figures.pileup_peak_at_agent = int(line.split()[1])
            text, numbers = render(base, fedg, settings, sizes, fed.features, check)
            return Outcome(text, numbers)
        finally:
            for caller in (base_caller, fed_caller):
                if caller is not None:
                    with contextlib.suppress(Exception):
                        await caller.close()
            await procs.stop()


# ---- profile -------------------------------------------------------------------------------


def _frame_name(frame: str) -> str:
    """'func (path/to/module.py)' -> 'module/path.py:func', shortened to the package path."""
    match = re.match(r"(.*) \((.*)\)$", frame)
    if not match:
        return frame
    func, path = match.groups()
    for marker in ("site-packages/", "/work/main/", str(ROOT) + "/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{func}"


def _area(frame: str) -> str:
    path = frame.split(":", 1)[0]
    for prefix, label in (
        ("gateway/", "gateway/ (ours)"),
        ("fedgate/", "fedgate/ (protocol)"),
        ("grpc/", "grpcio"),
        ("google/protobuf", "protobuf"),
        ("sqlalchemy/", "SQLAlchemy"),
        ("sqlmodel/", "SQLAlchemy"),
        ("cryptography/", "cryptography"),
        ("casbin/", "casbin"),
        ("jwt/", "pyjwt"),
        ("pydantic", "pydantic"),
        ("asyncio/", "asyncio"),
        ("logging/", "logging"),
    ):
        if path.startswith(prefix) or f"/{prefix}" in path:
            return label
    return "other (stdlib, sqlite3 ...)"


def summarize_py_spy(path: Path, exchanges: int, rate: int, top: int) -> str:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            _frame_name(f)
            for f in stack.split(";")
            if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames or any("importlib._bootstrap" in f for f in frames):
            continue  # start-up imports are not per-exchange work
        total += count
        self_time[frames[-1]] += count
        areas[_area(frames[-1])] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return "  (no samples)"
    per_ms = 1000 / rate / max(1, exchanges)
    out = [
        f"  {total:,} samples at {rate}/s = {total / rate:.2f} s of Python CPU time (GIL held), "
        f"{total * per_ms:.3f} ms per exchange"
    ]
    out.append("  by area (self time):")
    out += [
        f"    {100 * n / total:5.1f}%  {n * per_ms:7.3f} ms/ex  {name}"
        for name, n in areas.most_common()
    ]
    out.append(f"  top {top} functions by self time:")
    out += [
        f"    {100 * n / total:5.1f}%  {n * per_ms:7.3f} ms/ex  {name}"
        for name, n in self_time.most_common(top)
    ]
    ours = [(name, n) for name, n in inclusive.most_common() if name.startswith("gateway/")]
    out.append(f"  top {top} gateway/ functions by inclusive time:")
    out += [
        f"    {100 * n / total:5.1f}%  {n * per_ms:7.3f} ms/ex  {name}" for name, n in ours[:top]
    ]
    return "\n".join(out)


def summarize_cprofile(path: Path, exchanges: int, top: int) -> str:
    import io
    import pstats

    stream = io.StringIO()
    stats = pstats.Stats(str(path), stream=stream)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats("gateway/", top)
    return f"  {exchanges} exchanges\n" + stream.getvalue()


async def profile(
    settings: Settings, seconds: float, *, big: bool = False, keep: Path | None = None
) -> str:
    blob = "x" * BIG_BYTES
    with tempfile.TemporaryDirectory(prefix="fedgate-bench-profile-") as tmp:
        folder = Path(tmp)
        procs = Processes(folder)
        caller: FedgateCaller | None = None
        profiles = folder / "profiles"
        profiles.mkdir()
        try:
            pki = make_pki(folder / "pki")
            _progress("starting 2 gateways under the profiler and the SDK agent")
            fed = await start_fedgate(procs, folder, pki, settings, profile_dir=profiles)
            caller = FedgateCaller(fed.participant, fed.requester_token, blob)
            await caller.check()
            call, in_flight = (caller.big, 1) if big else (caller.echo, 32)
            await closed_loop(call, in_flight, 30.0, settings.warmup, {})
            _progress(
                f"profiling {seconds:g} s at {in_flight} in flight"
                + (", 1 MiB each way" if big else "")
            )
            phase = await closed_loop(
                call,
                in_flight,
                seconds,
                1_000_000,
                {REQUESTER_ORG: fed.path.front.pid, RESPONDER_ORG: fed.path.back.pid},
            )
            await caller.close()
            caller = None
            await procs.stop()
        finally:
            if caller is not None:
                with contextlib.suppress(Exception):
                    await caller.close()
            await procs.stop()
        if keep is not None:
            shutil.copytree(profiles, keep, dirs_exist_ok=True)
        # The warm-up exchanges are in the profile too; count them.
        exchanges = phase.completed + settings.warmup + 1
        using_py_spy = py_spy_path() is not None
        out = [
            f"profile: {phase.completed:,} exchanges"
            f"{' of 1 MiB each way' if big else ''} at {in_flight} in flight in "
            f"{phase.elapsed:.1f} s "
            f"({phase.completed / phase.elapsed:,.0f}/s under the profiler) + "
            f"{settings.warmup + 1} warm-up, {'py-spy' if using_py_spy else 'cProfile'}"
        ]
        for org in (REQUESTER_ORG, RESPONDER_ORG):
            path = profiles / f"{org}.profile"
            role = "requester side" if org == REQUESTER_ORG else "responder side"
            out.append(
                f"\ngateway {org} ({role}): process CPU (all threads, profiler "
                f"overhead included) {1000 * phase.cpu[org] / phase.completed:.2f} ms "
                "per exchange during the measured phase"
            )
            if not path.exists():
                out.append("  (no profile written)")
            elif using_py_spy:
                out.append(summarize_py_spy(path, exchanges, PROFILE_RATE, 30))
            else:
                out.append(summarize_cprofile(path, exchanges, 25))
        return "\n".join(out)


# ---- entry point ---------------------------------------------------------------------------

LAST: Outcome | None = None


def main(argv: Sequence[str] | None = None) -> int:
    global LAST
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_exchange",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer, shorter rounds (~30 s)")
    size.add_argument(
        "--smoke", action="store_true", help="a few calls per figure, for the smoke test (~15 s)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only profile both gateways on the full path (py-spy or cProfile)",
    )
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument(
        "--profile-big", action="store_true", help="profile 1 MiB exchanges at 1 in flight instead"
    )
    parser.add_argument(
        "--profile-out",
        type=Path,
        metavar="DIR",
        help="keep the raw profiles (py-spy collapsed stacks) in DIR",
    )
    parser.add_argument("--serve-agent", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--slow-ms", type=float, default=500.0, help=argparse.SUPPRESS)
    parser.add_argument("--pile-up", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_agent:
        return asyncio.run(serve_agent(args.serve_agent, args.slow_ms / 1000, args.pile_up))
    settings = SETTINGS["smoke" if args.smoke else "quick" if args.quick else "full"]
    started = time.perf_counter()
    if args.profile:
        print(
            asyncio.run(
                profile(settings, args.profile_seconds, big=args.profile_big, keep=args.profile_out)
            )
        )
        return 0
    print(f"full exchange vs bare grpcio mTLS relay [{settings.mode}]", flush=True)
    LAST = asyncio.run(measure(settings))
    print(LAST.text)
    print(f"(benchmark took {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
