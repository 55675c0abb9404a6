"""A2A out: an A2A server that knows nothing of Fedgate serves our partners as a local agent."""

from __future__ import annotations

import pytest
from a2a.types.a2a_pb2 import AgentSkill, TaskState
from google.protobuf import json_format

from participant_sdk import Client, TaskFailed
from tests.a2a.agents import RecordingExecutor, a2a_client, send, text_message
from tests.a2a.conftest import StartFederation
from tests.integration.federation import echo_agent, eventually, serving

SHARE_ALL = """\
p, insurer, scenario, *, invoke, *, allow
p, insurer, scenario, *, share, artifacts, allow
p, insurer, scenario, *, share, status, allow
p, insurer, scenario, *, share, message, allow
p, insurer, echo, *, invoke, *, allow
p, insurer, echo, *, share, **, allow
"""
INSURER_SENDS = """\
p, hospital, scenario, *, send, parts, allow
p, hospital, scenario, *, send, message_id, allow
p, hospital, echo, *, send, **, allow
"""


async def test_an_sdk_requester_calls_a_partners_a2a_agent(start_a2a: StartFederation) -> None:
    fed = await start_a2a()
    async with Client(fed.federation.participant("insurer"), requester="adjuster-7") as client:
        result = await client.call(
            "hospital/scenario.tck",
            {"parts": [{"text": "hi"}], "message_id": "tck-artifact-data-1"},
            timeout=10,
        )
    assert result.output == {"artifacts": [{"parts": [{"data": {"key": "value", "count": 42}}]}]}
    assert result.receipt is not None and result.receipt["responder_org"] == "hospital"


async def test_an_sdk_requesters_plain_input_reaches_the_a2a_agent_as_a_data_part(
    start_a2a: StartFederation,
) -> None:
    agent = RecordingExecutor()
    fed = await start_a2a(
        executor=agent, insurer_rules="p, hospital, scenario, *, send, **, allow\n"
    )
    async with Client(fed.federation.participant("insurer")) as client:
        await client.call("hospital/scenario.tck", {"claim": {"amount": 420}}, timeout=10)
    [received] = agent.received
    assert [json_format.MessageToDict(p) for p in received.parts] == [
        {"data": {"claim": {"amount": 420}}}
    ]
    [metadata] = agent.metadata
    assert metadata["fedgate"]["requesterOrg"] == "insurer"
    assert metadata["fedgate"]["skill"] == "tck"


async def test_an_a2a_client_calls_a_partners_sdk_agent(start_a2a: StartFederation) -> None:
    fed = await start_a2a(hospital_rules=SHARE_ALL, insurer_rules=INSURER_SENDS)
    async with (
        serving(fed.federation.participant("hospital"), echo_agent()),
        a2a_client(f"{fed.a2a_base('insurer')}/a2a/hospital/echo/.well-known/agent-card.json") as (
            client,
            card,
        ),
    ):
        assert [s.id for s in card.skills] == ["say"]
        responses = await send(client, text_message("hello"))
    final = responses[-1].status_update
    assert final.status.state == TaskState.TASK_STATE_COMPLETED
    [artifact] = [r.artifact_update.artifact for r in responses if r.HasField("artifact_update")]
    assert artifact.name == "result"
    output = json_format.MessageToDict(artifact.parts[0].data)
    assert output["echo"]["parts"] == [{"text": "hello"}] and output["requester_org"] == "insurer"


async def test_a_changed_card_is_picked_up(start_a2a: StartFederation) -> None:
    fed = await start_a2a()
    hospital = fed.federation["hospital"]
    assert [s.name for s in hospital.agents.card("scenario").skills] == ["tck"]  # type: ignore[union-attr]
    fed.agent.card.skills.append(AgentSkill(id="triage", name="triage", description="t", tags=[]))
    fed.agent.card.skills.append(AgentSkill(id="not a name", name="x", description="x", tags=[]))
    assert hospital.a2a is not None
    [backend] = hospital.a2a.backends
    assert await backend.refresh()
    assert [s.name for s in hospital.agents.card("scenario").skills] == ["tck", "triage"]  # type: ignore[union-attr]
    assert not await backend.refresh()  # unchanged: the agent answers 304 to the ETag


async def test_an_a2a_agent_that_is_down_fails_its_tasks_with_no_agent_and_back_takes_them(
    start_a2a: StartFederation,
) -> None:
    import asyncio
    from urllib.parse import urlsplit

    from tests.a2a.scenario_agent import serve_scenario_agent

    fed = await start_a2a()
    port = urlsplit(fed.agent.card_url).port
    await fed.agent.stop()  # the gateway still knows its card; the agent is gone
    async with Client(fed.federation.participant("hospital")) as client:
        with pytest.raises(TaskFailed) as failed:
            await client.call("hospital/scenario.tck", {"parts": [{"text": "hi"}]}, timeout=10)
    error = failed.value.result.error
    assert error is not None and error.code == "no_agent"
    assert "could not be reached" in error.message  # our own requester is told why
    # Now known to be down, it counts as no instance: a task waits for it until its deadline.
    async with Client(fed.federation.participant("insurer")) as client:
        with pytest.raises(TaskFailed) as failed:
            await client.call("hospital/scenario.tck", {"parts": [{"text": "hi"}]}, timeout=2)
    error = failed.value.result.error
    assert error is not None and error.code == "no_agent"
    assert error.message == "no agent instance was available before the deadline"  # stable text
    # A task waiting for it goes ahead once the agent is back (its card is read again).
    hospital = fed.federation["hospital"]
    async with Client(fed.federation.participant("insurer")) as client:
        call = asyncio.ensure_future(
            client.call(
                "hospital/scenario.tck",
                {"parts": [{"text": "hi"}], "message_id": "tck-complete-task-1"},
                timeout=30,
            )
        )
        assert await eventually(lambda: hospital.router.in_flight == 1, 10)
        async with serve_scenario_agent(port=port or 0):
            result = await call
    assert result.output["status"]["message"]["parts"] == [{"text": "Hello from TCK"}]


async def test_the_deadline_is_carried_and_the_agents_task_canceled(
    start_a2a: StartFederation,
) -> None:
    agent = RecordingExecutor()
    fed = await start_a2a(executor=agent)
    card_url = f"{fed.card_host('insurer')}/.well-known/agent-card.json"
    async with a2a_client(card_url, streaming=False) as (client, _):
        [response] = await send(client, text_message("wait"), deadlineSeconds=1)
    task = response.task
    assert task.status.state == TaskState.TASK_STATE_FAILED
    assert json_format.MessageToDict(task.metadata)["fedgate"]["error"]["code"] == (
        "deadline_exceeded"
    )
    deadline_ms = agent.metadata[0]["fedgate"]["deadlineUnixMs"]
    assert isinstance(deadline_ms, float | int) and deadline_ms > 0
    assert await eventually(lambda: len(agent.canceled) == 1, 10), agent.canceled


async def test_the_partners_policy_refusal_is_the_policys(start_a2a: StartFederation) -> None:
    """Where the partner's policy withholds what an agent returns, the refusal is the policy's:
    the agent answered, the hospital's share policy decided, and the receipt says so."""
    fed = await start_a2a(
        hospital_rules=(
            "p, insurer, scenario, *, invoke, *, allow\n"
            "p, insurer, scenario, *, share, status, allow\n"
            "p, insurer, scenario, *, share, artifacts[].parts[].text, deny\n"
        )
    )
    async with a2a_client(
        f"{fed.card_host('insurer')}/.well-known/agent-card.json", streaming=False
    ) as (client, _):
        [response] = await send(client, text_message("hi", message_id="tck-artifact-text-5"))
    task = response.task
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert not task.artifacts  # what TestTextArtifact expects is not there...
    meta = json_format.MessageToDict(task.metadata)["fedgate"]
    assert {"path": "artifacts[0].parts[0].text", "action": "withheld"} in meta["fieldActions"]
    import json

    receipt = json.loads(meta["receipt"])
    assert receipt["responder_org"] == "hospital"  # ...because the hospital's policy withheld it
    assert "artifacts[0].parts[0].text" in receipt["withheld_paths"]
    hospital = fed.federation["hospital"]
    [released] = [r for r in hospital.audit.query(task_id=task.id) if r.kind == "result_released"]
    assert "artifacts[0].parts[0].text" in released.withheld_paths


async def test_stopping_the_gateway_stops_the_a2a_listeners(start_a2a: StartFederation) -> None:
    import httpx

    fed = await start_a2a()
    base = fed.a2a_base("insurer")
    await fed.federation["insurer"].stop(grace=0)
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{base}/a2a/agents")
