"""At most once per idempotency key, agent failover, and the per-peer circuit breaker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from fedgate.convert import dict_to_struct
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.local import LocalFederation
from gateway.peers import PeerRegistry
from participant_sdk import Agent, Client, Unavailable
from tests.conftest import Pki
from tests.integration.federation import (
    configs,
    delegation,
    eventually,
    federation_channel,
    serving,
)


def counting_agent(calls: list[str], delay: float = 0.2) -> Agent:
    echo = Agent("echo")

    @echo.skill
    async def say(task, data):  # type: ignore[no-untyped-def]
        calls.append(task.task_id)
        await asyncio.sleep(delay)
        return {"n": data.get("n"), "calls": len(calls)}

    return echo


def _request(pki: Pki, task_id: str, key: str, n: int) -> pb.TaskRequest:
    return pb.TaskRequest(
        task_id=task_id,
        target_org="hospital",
        agent="echo",
        skill="say",
        input=dict_to_struct({"n": n}),
        idempotency_key=key,
        delegation=delegation(pki, "insurer", "hospital", task_id),
    )


async def test_concurrent_duplicates_run_once_and_share_the_result(
    fed: LocalFederation, pki: Pki
) -> None:
    calls: list[str] = []
    async with serving(fed.participant("hospital"), counting_agent(calls)):
        channel = federation_channel(
            pki, fed.federation("hospital"), cert="insurer", target_org="hospital"
        )
        stub = pb_grpc.FederationStub(channel)
        results = await asyncio.gather(
            *(stub.SubmitTask(_request(pki, "dup-1", "key-dup-1", 7), timeout=10) for _ in range(5))
        )
        await channel.close()
    assert calls == ["dup-1"], "the agent ran the task once"
    assert {r.state for r in results} == {pb.TASK_STATE_COMPLETED}
    assert len({r.receipt.signature for r in results}) == 1, "every duplicate gets the same receipt"


async def test_retry_after_completion_gets_the_stored_result(
    fed: LocalFederation, pki: Pki
) -> None:
    calls: list[str] = []
    async with serving(fed.participant("hospital"), counting_agent(calls, delay=0)):
        channel = federation_channel(
            pki, fed.federation("hospital"), cert="insurer", target_org="hospital"
        )
        stub = pb_grpc.FederationStub(channel)
        first = await stub.SubmitTask(_request(pki, "again-1", "key-again-1", 1), timeout=10)
        second = await stub.SubmitTask(_request(pki, "again-1", "key-again-1", 1), timeout=10)
        await channel.close()
    assert calls == ["again-1"]
    assert second.output == first.output and second.receipt == first.receipt
    kinds = [
        r.kind
        for r in sorted(fed["hospital"].audit.query(task_id="again-1"), key=lambda r: r.sequence)
    ]
    assert kinds == ["request_received", "result_released", "request_received", "result_released"]
    received, resent = [
        r for r in fed["hospital"].audit.query(task_id="again-1") if "retry" in r.detail
    ]
    assert received.kind == "request_received" and "retry of task again-1" in received.detail
    assert (
        resent.receipt
        == fed["hospital"].audit.query(task_id="again-1", kind="result_released")[0].receipt
    )


async def test_same_key_from_another_organization_is_another_task(
    fed: LocalFederation, pki: Pki
) -> None:
    """Keys are per origin: a peer cannot read another peer's stored result by guessing a key."""
    calls: list[str] = []
    async with (
        serving(fed.participant("hospital"), counting_agent(calls, delay=0)),
        Client(fed.participant("hospital")) as local,
    ):
        channel = federation_channel(
            pki, fed.federation("hospital"), cert="insurer", target_org="hospital"
        )
        await pb_grpc.FederationStub(channel).SubmitTask(
            _request(pki, "k-1", "shared-key", 1), timeout=10
        )
        await channel.close()
        await local.call(
            "hospital/echo.say", {"n": 2}, timeout=10, task_id="k-2", idempotency_key="shared-key"
        )
    assert calls == ["k-1", "k-2"]


async def test_sdk_retry_reuses_the_key_and_the_agent_runs_once(fed: LocalFederation) -> None:
    calls: list[str] = []
    async with (
        serving(fed.participant("hospital"), counting_agent(calls, delay=0)),
        Client(fed.participant("insurer")) as client,
    ):
        first = await client.call(
            "hospital/echo.say", {"n": 3}, timeout=10, task_id="sdk-1", idempotency_key="sdk-key-1"
        )
        again = await client.call(
            "hospital/echo.say", {"n": 3}, timeout=10, task_id="sdk-1", idempotency_key="sdk-key-1"
        )
    assert calls == ["sdk-1"] and again.output == first.output


async def test_task_fails_over_to_another_instance_when_one_dies(fed: LocalFederation) -> None:
    started: list[str] = []
    release = asyncio.Event()

    def agent(instance: str) -> Agent:
        echo = Agent("echo")

        @echo.skill
        async def say(task, data):  # type: ignore[no-untyped-def]
            started.append(instance)
            if instance == "doomed":
                await asyncio.sleep(60)
            await release.wait()
            return {"served_by": instance}

        return echo

    async with (
        Client(fed.participant("insurer")) as client,
        serving(fed.participant("hospital"), agent("doomed"), instance_id="doomed") as doomed,
    ):
        call = asyncio.ensure_future(
            client.call("hospital/echo.say", {}, timeout=20, task_id="fo-1")
        )
        assert await eventually(lambda: started, 10)
        assert started == ["doomed"]
        async with serving(fed.participant("hospital"), agent("healthy"), instance_id="healthy"):
            release.set()
            doomed.stop()
            result = await asyncio.wait_for(call, 15)
    assert result.output == {"served_by": "healthy"}
    assert started == ["doomed", "healthy"]


async def test_circuit_opens_after_failures_and_fails_fast(tmp_path: Path, pki: Pki) -> None:
    from tests.integration.federation import INSURER_RULES

    rules = INSURER_RULES + "p, lab, echo, *, send, **, allow\n"
    paths = configs(tmp_path, pki, insurer_rules=rules)
    text = paths[1].read_text() + '[peers.lab]\naddress = "127.0.0.1:9"\n'
    paths[1].write_text(text)
    async with LocalFederation(paths) as fed, Client(fed.participant("insurer")) as client:
        fed["insurer"].peers.failure_threshold = 2
        for _ in range(2):
            with pytest.raises(Unavailable, match="'lab' at 127.0.0.1:9 is unreachable"):
                await client.call("lab/echo.say", {}, timeout=5)
        with pytest.raises(
            Unavailable, match="circuit to organization 'lab' is open after 2 failures"
        ):
            await client.call("lab/echo.say", {}, timeout=5)
        async with grpc.aio.insecure_channel(fed.participant("insurer")) as channel:
            peers = await pb_grpc.ParticipantStub(channel).ListPeers(
                pb.ListPeersRequest(), timeout=5
            )
    status = {p.org: p for p in peers.peers}
    assert status["lab"].circuit == "open" and status["lab"].consecutive_failures == 2
    assert "unreachable" in status["lab"].last_error
    assert status["hospital"].circuit == "closed"


def test_half_open_probe_closes_or_reopens_the_circuit(pki: Pki) -> None:
    from gateway.config import PeerSection
    from gateway.identity.tls import ReloadingTls, TlsFiles

    now = [100.0]
    tls = ReloadingTls(TlsFiles(pki.cert("hospital"), pki.key("hospital"), pki.ca))
    peers = PeerRegistry(
        "hospital",
        {"lab": PeerSection(address="127.0.0.1:9")},
        tls,
        max_message_bytes=1 << 20,
        failure_threshold=1,
        reset_seconds=5,
        clock=lambda: now[0],
    )
    peers.record("lab", peers.admit("lab"), failure="down")
    with pytest.raises(Exception, match="is open after 1 failures"):
        peers.admit("lab")
    now[0] += 5
    probe = peers.admit("lab")
    assert peers.health["lab"].circuit == "half-open"
    with pytest.raises(Exception, match="half-open and a probe call is under way"):
        peers.admit("lab")
    peers.record("lab", probe, failure="still down")
    assert peers.health["lab"].circuit == "open"
    now[0] += 5
    peers.record("lab", peers.admit("lab"), failure=None)
    assert peers.health["lab"].circuit == "closed" and peers.health["lab"].consecutive_failures == 0


async def test_a_retry_that_outlives_its_deadline_is_deadline_exceeded(
    fed: LocalFederation,
) -> None:
    calls: list[str] = []
    async with (
        serving(fed.participant("hospital"), counting_agent(calls, delay=2.0)),
        Client(fed.participant("insurer")) as client,
    ):
        first = asyncio.ensure_future(
            client.call(
                "hospital/echo.say",
                {"n": 1},
                timeout=10,
                task_id="slow-1",
                idempotency_key="slow-key",
            )
        )
        assert await eventually(lambda: calls)  # the first attempt runs
        # The retry's deadline is in the message only, so the gateway's answer, not the
        # caller's own gRPC timer, is what ends it.
        channel = grpc.aio.insecure_channel(fed.participant("insurer"))
        retry = pb.TaskRequest(
            task_id="slow-1",
            target_org="hospital",
            agent="echo",
            skill="say",
            input=dict_to_struct({"n": 1}),
            idempotency_key="slow-key",
            deadline_unix_ms=int((time.time() + 0.5) * 1000),
        )
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.ParticipantStub(channel).SubmitTask(retry, timeout=5)
        finally:
            await channel.close()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "first attempt still ran" in (info.value.details() or "")
        assert (await first).ok
    assert calls == ["slow-1"]


async def test_our_retry_answered_from_the_task_table_records_nothing_as_inbound(
    tmp_path: Path, pki: Pki
) -> None:
    """Our requester asks again with the key of a task it sent to a partner, after a restart:
    the stored result answers it. Our log must not gain a request received from the partner,
    nor a result released to it: neither happened."""
    calls: list[str] = []
    paths = configs(tmp_path, pki)
    async with (
        LocalFederation(paths) as fed,
        serving(fed.participant("hospital"), counting_agent(calls, delay=0)),
        Client(fed.participant("insurer")) as client,
    ):
        first = await client.call(
            "hospital/echo.say", {"n": 3}, timeout=10, task_id="ours-1", idempotency_key="k-ours"
        )
    async with (
        LocalFederation(paths) as fed,
        Client(fed.participant("insurer")) as client,
    ):
        again = await client.call(
            "hospital/echo.say", {"n": 3}, timeout=10, task_id="ours-2", idempotency_key="k-ours"
        )
        records = sorted(fed["insurer"].audit.query(task_id="ours-1"), key=lambda r: r.sequence)
    assert again.task_id == "ours-1" and again.output == first.output
    assert calls == ["ours-1"]
    assert [(r.kind, r.direction) for r in records] == [
        ("request_sent", "outbound"),
        ("result_received", "outbound"),
    ]
