"""Two gateways and their agents exchange tasks in both directions over real mTLS."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from fedgate.convert import dict_to_struct
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.local import LocalFederation
from participant_sdk import (
    Client,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TaskFailed,
)
from tests.integration.federation import (
    boom_agent,
    claims_agent,
    echo_agent,
    eventually,
    records_agent,
    serving,
    slow_agent,
)


async def test_insurer_calls_hospital_and_policy_shapes_the_result(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), records_agent()),
        Client(fed.participant("insurer"), requester="adjuster-7") as client,
    ):
        result = await client.call("hospital/records.summary", {"patient_id": "P-1"}, timeout=10)
    patient = result.output["patient"]
    assert result.responder_org == "hospital"
    assert "name" not in patient and "street" not in patient["address"]
    assert patient["ssn"] == "*******6789"
    assert patient["insurance_id"].startswith("pseu_") and patient["insurance_id"] != "INS-99887766"
    assert patient["date_of_birth"] == "1985"
    assert result.output["diagnoses"] == [{"code": "J45"}]
    assert "notes" not in result.output and "requested_by" not in result.output
    actions = dict(result.field_actions)
    assert actions["patient.name"] == "withheld"
    assert actions["patient.ssn"] == "masked"
    assert actions["patient.insurance_id"] == "pseudonymized"
    assert actions["patient.date_of_birth"] == "generalized"
    assert result.receipt is not None and result.receipt["responder_org"] == "hospital"
    assert result.policy_version.startswith("sha256:")


async def test_hospital_calls_insurer_with_filtered_request(fed: LocalFederation) -> None:
    seen: list[dict] = []
    claims = claims_agent()

    @claims.skill
    async def inspect(task, data):  # type: ignore[no-untyped-def]
        seen.append(data)
        return {}

    rules_allow_inspect = fed["hospital"].policy
    assert rules_allow_inspect is not None
    async with (
        serving(fed.participant("insurer"), claims),
        Client(fed.participant("hospital")) as client,
    ):
        result = await client.call(
            "insurer/claims.check",
            {"claim": {"amount": 420}, "patient": {"name": "Ada", "insurance_id": "INS-1"}},
            timeout=10,
        )
    assert result.output == {"approved": True, "covered_amount": 420}
    # No rule names fraud_score, so the path that leaves does not either (issue 11 #3).
    assert dict(result.field_actions) == {"*": "withheld"}


async def test_agent_sees_only_what_the_send_policy_lets_out(fed: LocalFederation) -> None:
    received: list[dict] = []
    from participant_sdk import Agent

    claims = Agent("claims")

    @claims.skill
    async def check(task, data):  # type: ignore[no-untyped-def]
        received.append({"data": data, "org": task.requester_org})
        return {"approved": True}

    async with (
        serving(fed.participant("insurer"), claims),
        Client(fed.participant("hospital")) as client,
    ):
        await client.call(
            "insurer/claims.check",
            {"claim": {"amount": 1}, "patient": {"name": "Ada Lovelace", "insurance_id": "INS-1"}},
            timeout=10,
        )
    (got,) = received
    assert got["org"] == "hospital"
    assert got["data"]["claim"] == {"amount": 1}
    assert "name" not in got["data"]["patient"]
    assert got["data"]["patient"]["insurance_id"].startswith("pseu_")


async def test_both_directions_and_streamed_state_updates(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), echo_agent()),
        serving(fed.participant("insurer"), echo_agent()),
        Client(fed.participant("hospital")) as h,
        Client(fed.participant("insurer")) as i,
    ):
        states = [u.state async for u in i.stream("hospital/echo.say", {"x": 1}, timeout=10)]
        back = await h.call("insurer/echo.say", {"y": 2}, timeout=10)
        local = [u async for u in h.stream("hospital/echo.say", {"z": 3}, timeout=10)]
    assert states[0] == "working" and states[-1] == "completed"
    assert back.output == {"echo": {"y": 2}, "requester_org": "hospital", "instance": "echo"}
    # A local requester sees the agent's progress note; a peer sees the state only.
    assert any(u.message == "echoing" for u in local)
    assert local[-1].result is not None and local[-1].result.output["echo"] == {"z": 3}


async def test_peer_never_sees_agent_progress_text(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        updates = [u async for u in client.stream("hospital/echo.say", {}, timeout=10)]
    assert all(u.message == "" for u in updates)


async def test_deadline_that_passes_across_hops(fed: LocalFederation) -> None:
    cancelled: list[str] = []
    async with (
        serving(fed.participant("hospital"), slow_agent(cancelled)),
        Client(fed.participant("insurer")) as client,
    ):
        with pytest.raises(DeadlineExceeded):
            await client.call("hospital/slow.wait", {"seconds": 30}, timeout=3.0)
        await eventually(lambda: cancelled)
    assert len(cancelled) == 1, "the agent's skill is told to stop when the deadline passes"
    # each gateway records the deadline, then its task leaves the count
    await eventually(
        lambda: not (fed["hospital"].router.in_flight or fed["insurer"].router.in_flight)
    )
    assert fed["hospital"].router.in_flight == 0 and fed["insurer"].router.in_flight == 0


async def test_deadline_in_the_request_body_travels(fed: LocalFederation) -> None:
    """A deadline set only in the message (no gRPC timeout) is enforced by the gateways."""
    import time

    async with serving(fed.participant("hospital"), slow_agent()):
        channel = grpc.aio.insecure_channel(fed.participant("insurer"))
        stub = pb_grpc.ParticipantStub(channel)
        request = pb.TaskRequest(
            target_org="hospital",
            agent="slow",
            skill="wait",
            input=dict_to_struct({"seconds": 30}),
            deadline_unix_ms=int((time.time() + 1.0) * 1000),
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitTask(request)
        await channel.close()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in (info.value.details() or "")


async def test_a_task_whose_only_agent_died_fails_at_its_deadline_if_none_comes_back(
    fed: LocalFederation,
) -> None:
    """The task waits for an instance to take it over (the agent may be restarting); when none
    comes before its deadline, it fails naming the disconnect, not only the time."""
    async with Client(fed.participant("insurer")) as client:
        async with serving(fed.participant("hospital"), slow_agent()) as worker:
            call = asyncio.ensure_future(
                client.call("hospital/slow.wait", {"seconds": 30}, timeout=3)
            )
            assert await eventually(lambda: fed["hospital"].agents.in_flight("slow"), 10)
            worker.stop()
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(call, 10)
    assert info.value.result.state == "failed"
    assert info.value.result.error is not None
    assert info.value.result.error.code == "agent_disconnected"
    assert "disconnected" in info.value.result.error.message


async def test_a_task_whose_only_agent_died_goes_to_it_again_when_it_reconnects(
    fed: LocalFederation,
) -> None:
    """Issue 15 #4: the instance coming back is treated like another instance."""
    async with Client(fed.participant("insurer")) as client:
        async with serving(fed.participant("hospital"), slow_agent()) as worker:
            call = asyncio.ensure_future(
                client.call("hospital/slow.wait", {"seconds": 0.5}, timeout=20, task_id="back-1")
            )
            assert await eventually(lambda: fed["hospital"].agents.in_flight("slow"), 10)
            worker.stop()
        assert await eventually(lambda: not fed["hospital"].agents.instance_count("slow"), 10)
        async with serving(fed.participant("hospital"), slow_agent()):
            result = await asyncio.wait_for(call, 15)
    assert result.ok and result.task_id == "back-1"


async def test_skill_error_reaches_a_peer_as_a_code_not_its_text(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), boom_agent()),
        Client(fed.participant("insurer")) as peer,
        Client(fed.participant("hospital")) as local,
    ):
        with pytest.raises(TaskFailed) as remote_info:
            await peer.call("hospital/boom.fail", {}, timeout=10)
        with pytest.raises(TaskFailed) as local_info:
            await local.call("hospital/boom.fail", {}, timeout=10)
    remote_error = remote_info.value.result.error
    assert remote_error is not None and remote_error.code == "skill_error"
    assert "4242" not in remote_error.message
    local_error = local_info.value.result.error
    assert local_error is not None and "secret internal detail 4242" in local_error.message


async def test_instances_of_one_agent_share_its_tasks(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), echo_agent(), instance_id="a"),
        serving(fed.participant("hospital"), echo_agent(), instance_id="b"),
        Client(fed.participant("insurer")) as client,
    ):
        assert fed["hospital"].agents.instance_count("echo") == 2
        slow = [client.call("hospital/echo.say", {"n": n}, timeout=10) for n in range(20)]
        results = await asyncio.gather(*slow)
    assert len(results) == 20
    assert all(r.output["requester_org"] == "insurer" for r in results)


async def test_tasks_are_spread_over_instances(fed: LocalFederation) -> None:
    hits: dict[str, int] = {"a": 0, "b": 0}
    from participant_sdk import Agent

    def counting(instance: str) -> Agent:
        agent = Agent("echo")

        @agent.skill
        async def say(task, data):  # type: ignore[no-untyped-def]
            hits[instance] += 1
            await asyncio.sleep(0.05)
            return {}

        return agent

    async with (
        serving(fed.participant("hospital"), counting("a"), instance_id="a"),
        serving(fed.participant("hospital"), counting("b"), instance_id="b"),
        Client(fed.participant("hospital")) as client,
    ):
        await asyncio.gather(*(client.call("hospital/echo.say", {}, timeout=10) for _ in range(10)))
    assert hits["a"] >= 3 and hits["b"] >= 3, hits


async def test_unknown_organization_is_not_found(fed: LocalFederation) -> None:
    async with Client(fed.participant("hospital")) as client:
        with pytest.raises(NotFound, match="'pharmacy' is not a peer"):
            await client.call("pharmacy/stock.check", {}, timeout=5)


async def test_unknown_local_agent_is_not_found(fed: LocalFederation) -> None:
    async with Client(fed.participant("hospital")) as client:
        with pytest.raises(NotFound, match="agent 'ghost' is not connected"):
            await client.call("hospital/ghost.walk", {}, timeout=5)


async def test_unknown_skill_of_a_local_agent_is_not_found(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), echo_agent()),
        Client(fed.participant("hospital")) as client,
    ):
        with pytest.raises(NotFound, match="has no skill 'shout'"):
            await client.call("hospital/echo.shout", {}, timeout=5)


@pytest.mark.parametrize(
    ("target_org", "agent", "skill", "fragment"),
    [
        ("Hospital!", "echo", "say", "malformed target organization"),
        ("hospital", "", "say", "malformed agent name"),
        ("hospital", "echo", "s ay", "malformed skill name"),
    ],
)
async def test_malformed_target_is_invalid_argument(
    fed: LocalFederation, target_org: str, agent: str, skill: str, fragment: str
) -> None:
    async with grpc.aio.insecure_channel(fed.participant("hospital")) as channel:
        stub = pb_grpc.ParticipantStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitTask(
                pb.TaskRequest(target_org=target_org, agent=agent, skill=skill), timeout=5
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (info.value.details() or "")


async def test_sdk_refuses_a_malformed_target_before_sending(fed: LocalFederation) -> None:
    async with Client(fed.participant("hospital")) as client:
        with pytest.raises(InvalidArgument, match="expected 'org/agent.skill'"):
            await client.call("hospital-echo-say", {}, timeout=5)


async def test_remote_unknown_agent_and_denied_invoke_look_the_same(fed: LocalFederation) -> None:
    """Seen from a peer, an agent that is not shared and one that does not exist are one answer."""
    async with (
        serving(fed.participant("hospital"), echo_agent("triage")),
        Client(fed.participant("insurer")) as client,
    ):
        with pytest.raises(PermissionDenied) as denied:
            await client.call("hospital/triage.say", {}, timeout=5)
        with pytest.raises(PermissionDenied) as missing:
            await client.call("hospital/nosuch.say", {}, timeout=5)
    normalize = lambda text: text.replace("triage", "X").replace("nosuch", "X")  # noqa: E731
    assert normalize(denied.value.message) == normalize(missing.value.message)
    assert "does not exist or is not shared with organization 'insurer'" in denied.value.message


async def test_discovery_lists_only_the_cards_a_peer_may_invoke(fed: LocalFederation, pki) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.federation import federation_channel

    async with serving(fed.participant("hospital"), records_agent(), echo_agent("triage")):
        channel = federation_channel(
            pki, fed.federation("hospital"), cert="insurer", target_org="hospital"
        )
        response = await pb_grpc.FederationStub(channel).ListAgents(
            pb.ListAgentsRequest(), timeout=5
        )
        await channel.close()
    names = {card.name: [s.name for s in card.skills] for card in response.agents}
    assert names == {"records": ["summary"]}
    assert response.agents[0].org == "hospital"
    assert response.agents[0].skills[0].input_schema["type"] == "object"


async def test_cancel_travels_to_the_remote_agent(fed: LocalFederation) -> None:
    cancelled: list[str] = []
    async with (
        serving(fed.participant("hospital"), slow_agent(cancelled)),
        Client(fed.participant("insurer")) as client,
    ):
        updates = client.stream(
            "hospital/slow.wait", {"seconds": 30}, timeout=20, task_id="task-cancel-1"
        )
        first = await anext(updates)
        assert first.state == "working"
        assert await client.cancel("task-cancel-1", "changed my mind") == "canceled"
        rest = [u async for u in updates]
        for _ in range(100):
            if cancelled:
                break
            await asyncio.sleep(0.05)
    assert rest[-1].state == "canceled"
    assert cancelled == ["task-cancel-1"]


async def test_get_task_returns_the_final_result(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        await client.call("hospital/echo.say", {"a": 1}, timeout=10, task_id="task-get-1")
        result = await client.get("task-get-1")
        with pytest.raises(NotFound):
            await client.get("task-never-was")
    assert result.state == "completed" and result.output["echo"] == {"a": 1}


async def test_health_service_reports_serving(fed: LocalFederation) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(fed.participant("hospital")) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="fedgate.v1.Participant"), timeout=5
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_agent_reconnects_after_gateway_restart(tmp_path, pki) -> None:  # type: ignore[no-untyped-def]
    from gateway.config import load_config
    from gateway.server import Gateway
    from tests.integration.federation import configs

    paths = configs(tmp_path, pki)
    first = Gateway(load_config(paths[0]))
    ports = await first.start()
    address = f"127.0.0.1:{ports.participant}"
    text = (
        paths[0]
        .read_text()
        .replace('[participant]\nlisten = "127.0.0.1:0"', f'[participant]\nlisten = "{address}"')
    )
    paths[0].write_text(text)
    second: Gateway | None = None
    try:
        async with serving(address, echo_agent()) as worker:
            assert worker.connections == 1
            await first.stop(grace=0)
            second = Gateway(load_config(paths[0]))
            await second.start()
            for _ in range(200):
                if worker.connections == 2 and second.agents.instance_count("echo") == 1:
                    break
                await asyncio.sleep(0.05)
            assert worker.connections == 2
            async with Client(address) as client:
                result = await client.call("hospital/echo.say", {"after": "restart"}, timeout=10)
            assert result.output["echo"] == {"after": "restart"}
    finally:
        with contextlib.suppress(Exception):
            await first.stop(grace=0)
        if second is not None:
            await second.stop(grace=0)
