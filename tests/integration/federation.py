"""Helpers for tests that run real gateways and agents in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.identity.certs import org_dns_name
from gateway.local import LocalFederation, write_gateway_config
from participant_sdk import Agent, AgentWorker, TaskContext
from tests.conftest import Pki

MODEL = Path(__file__).resolve().parents[2] / "policies" / "model.conf"

HOSPITAL_RULES = """\
p, insurer, records, summary, invoke, *, allow
p, insurer, echo, *, invoke, *, allow
p, insurer, slow, *, invoke, *, allow
p, insurer, boom, *, invoke, *, allow
p, insurer, records, summary, share, patient.name, deny
p, insurer, records, summary, share, patient.ssn, mask:4
p, insurer, records, summary, share, patient.insurance_id, pseudonymize
p, insurer, records, summary, share, patient.date_of_birth, generalize:year
p, insurer, records, summary, share, patient.address.city, allow
p, insurer, records, summary, share, diagnoses[].code, allow
p, insurer, echo, *, share, **, allow
p, insurer, slow, *, share, **, allow
p, insurer, claims, check, send, claim, allow
p, insurer, claims, check, send, patient.insurance_id, pseudonymize
p, insurer, echo, *, send, **, allow
"""

INSURER_RULES = """\
p, hospital, claims, check, invoke, *, allow
p, hospital, echo, *, invoke, *, allow
p, hospital, claims, check, share, approved, allow
p, hospital, claims, check, share, covered_amount, allow
p, hospital, echo, *, share, **, allow
p, hospital, records, summary, send, patient_id, allow
p, hospital, echo, *, send, **, allow
p, hospital, slow, *, send, **, allow
p, hospital, boom, *, send, **, allow
"""

PATIENT = {
    "patient": {
        "name": "Ada Lovelace",
        "ssn": "123-45-6789",
        "insurance_id": "INS-99887766",
        "date_of_birth": "1985-12-10",
        "address": {"street": "12 Analytical Row", "city": "London", "zip": "NW1"},
    },
    "diagnoses": [{"code": "J45", "description": "asthma, mild"}],
    "notes": "prefers morning appointments",
}


def records_agent() -> Agent:
    records = Agent("records", description="Patient records")

    @records.skill(input_schema={"type": "object"}, output_schema={"type": "object"})
    async def summary(task: TaskContext, data: dict) -> dict:
        return {**PATIENT, "requested_by": task.requester_org}

    return records


def echo_agent(name: str = "echo") -> Agent:
    echo = Agent(name)

    @echo.skill
    async def say(task: TaskContext, data: dict) -> dict:
        await task.progress("echoing")
        return {"echo": data, "requester_org": task.requester_org, "instance": name}

    return echo


def slow_agent(seen: list[str] | None = None) -> Agent:
    slow = Agent("slow")

    @slow.skill
    async def wait(task: TaskContext, data: dict) -> dict:
        try:
            await asyncio.sleep(float(data.get("seconds", 30)))
        except asyncio.CancelledError:
            if seen is not None:
                seen.append(task.task_id)
            raise
        return {"waited": data.get("seconds")}

    return slow


def boom_agent() -> Agent:
    boom = Agent("boom")

    @boom.skill
    async def fail(task: TaskContext, data: dict) -> dict:
        raise RuntimeError("secret internal detail 4242")

    return boom


def claims_agent() -> Agent:
    claims = Agent("claims")

    @claims.skill
    async def check(task: TaskContext, data: dict) -> dict:
        amount = float(data.get("claim", {}).get("amount", 0))
        return {"approved": amount < 1000, "covered_amount": min(amount, 1000), "fraud_score": 0.12}

    return claims


def org_config(
    tmp: Path,
    pki: Pki,
    org: str,
    rules: str,
    peers: list[str],
    *,
    extra: str = "",
    require_tokens: bool = False,
) -> Path:
    """Write `org`'s sharing rules and its fedgate.toml (loopback, port 0); returns its path."""
    rules_path = tmp / f"{org}.csv"
    rules_path.write_text(rules)
    return write_gateway_config(
        tmp / org,
        org,
        cert=pki.cert(org),
        key=pki.key(org),
        ca=pki.ca,
        model=MODEL,
        rules=rules_path,
        peers=peers,
        extra=extra,
        require_tokens=require_tokens,
    )


def configs(
    tmp: Path,
    pki: Pki,
    *,
    hospital_rules: str = HOSPITAL_RULES,
    insurer_rules: str = INSURER_RULES,
    extra: str = "",
) -> list[Path]:
    return [
        org_config(tmp, pki, "hospital", hospital_rules, ["insurer"], extra=extra),
        org_config(tmp, pki, "insurer", insurer_rules, ["hospital"], extra=extra),
    ]


@contextlib.asynccontextmanager
async def serving(
    address: str, *agents: Agent, instance_id: str | None = None, token: str | None = None
) -> AsyncIterator[AgentWorker]:
    """Serve agents against a gateway for the duration of the block."""
    worker = AgentWorker(agents, address, instance_id=instance_id, max_backoff=0.2, token=token)
    task = asyncio.ensure_future(worker.run())
    try:
        await asyncio.wait_for(worker.connected.wait(), 10)
        yield worker
    finally:
        worker.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def federation_channel(
    pki: Pki, address: str, *, cert: str | None, target_org: str, ca: Path | None = None
) -> grpc.aio.Channel:
    """A raw federation channel presenting `cert` (or none) to a gateway of `target_org`."""
    root = (ca or pki.ca).read_bytes()
    if cert is None:
        creds = grpc.ssl_channel_credentials(root_certificates=root)
    else:
        cert_pem, key_pem = pki.pem(cert)
        creds = grpc.ssl_channel_credentials(
            root_certificates=root, private_key=key_pem, certificate_chain=cert_pem
        )
    return grpc.aio.secure_channel(
        address, creds, [("grpc.ssl_target_name_override", org_dns_name(target_org))]
    )


def federation_stub(channel: grpc.aio.Channel) -> pb_grpc.FederationStub:
    return pb_grpc.FederationStub(channel)


__all__ = ["LocalFederation"]


def stock_agent(name: str, *, in_stock: bool, price: float = 10.0) -> Agent:
    """An agent whose `check` skill answers `in_stock` and `price` for an item (fan-out tests)."""
    stock = Agent(name)

    @stock.skill
    async def check(task: TaskContext, data: dict) -> dict:
        return {"item": data.get("item"), "in_stock": in_stock, "price": price, "source": name}

    return stock


def delegation(
    pki: Pki,
    org: str,
    audience: str,
    task_id: str,
    *,
    subject: str = "tester",
    roles: tuple[str, ...] = (),
    purpose: str = "",
    ttl: float = 300,
) -> str:
    """A signed statement of who asked, as `org`'s gateway would send it."""
    from gateway.identity.delegation import issue_delegation
    from gateway.identity.signing import Signer

    return issue_delegation(
        Signer.from_files(pki.cert(org), pki.key(org)),
        audience_org=audience,
        subject=subject,
        roles=roles,
        purpose=purpose,
        task_id=task_id,
        ttl_seconds=ttl,
    )


async def eventually(condition: Callable[[], object], seconds: float = 5.0) -> bool:
    """Wait until `condition()` holds, at most `seconds`: for what other tasks finish on their
    own time (a record, a count). Returns whether it held; the caller asserts what it needs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
