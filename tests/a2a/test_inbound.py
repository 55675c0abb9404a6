"""A2A in: an A2A client calls a local agent and a partner's agent through its own gateway."""

from __future__ import annotations

import json

import pytest
from a2a.types.a2a_pb2 import TaskState

from gateway.identity.signing import SignedReceipt, verify_receipt
from tests.a2a.agents import RecordingExecutor, a2a_client, send, text_message
from tests.a2a.conftest import StartFederation

TRANSPORTS = ["JSONRPC", "HTTP+JSON", "GRPC"]


def _final_task(responses):  # type: ignore[no-untyped-def]
    """The task as the last response leaves it (a non-streaming send gives the task at once)."""
    last = responses[-1]
    assert last.WhichOneof("payload") in ("task", "status_update"), last
    return last


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_partners_a2a_agent_answers_through_both_gateways(
    start_a2a: StartFederation, transport: str
) -> None:
    fed = await start_a2a()
    card_url = f"{fed.card_host('insurer')}/.well-known/agent-card.json"
    async with a2a_client(card_url, transport, streaming=False) as (client, card):
        assert card.name == "hospital/scenario"
        assert all(card.name in i.url or i.tenant == card.name for i in card.supported_interfaces)
        responses = await send(client, text_message("hi", message_id="tck-artifact-text-1"))
    task = responses[-1].task
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert [p.text for a in task.artifacts for p in a.parts] == ["Generated text content"]
    meta = json.loads(json.dumps(dict(task.metadata["fedgate"])))  # a Struct, as JSON
    assert meta["responderOrg"] == "hospital"
    receipt = SignedReceipt.from_json(json.loads(meta["receipt"]))
    assert receipt.body.task_id == task.id and receipt.body.responder_org == "hospital"
    verify_receipt(fed.federation["insurer"].router.verifier, receipt, expected_org="hospital")


def _json(message) -> str:  # type: ignore[no-untyped-def]
    from google.protobuf import json_format

    return json.dumps(json_format.MessageToDict(message))


def _meta(task) -> dict:  # type: ignore[no-untyped-def]
    from google.protobuf import json_format

    return json_format.MessageToDict(task.metadata).get("fedgate", {})


async def test_streaming_through_the_hop_shows_progress_states_then_the_filtered_result(
    start_a2a: StartFederation,
) -> None:
    fed = await start_a2a()
    card_url = f"{fed.card_host('insurer')}/.well-known/agent-card.json"
    async with a2a_client(card_url) as (client, _):
        responses = await send(client, text_message("go", message_id="tck-stream-001-x"))
    kinds = [r.WhichOneof("payload") for r in responses]
    assert kinds[0] == "task" and kinds[-1] == "status_update", kinds
    first_artifact = kinds.index("artifact_update")
    # Before the result, states only: no parts, no text of the agent (guarantee 8).
    for response in responses[:first_artifact]:
        if response.HasField("status_update"):
            assert response.status_update.status.state == TaskState.TASK_STATE_WORKING
            assert not response.status_update.status.message.parts
        else:
            assert not response.task.artifacts
    assert responses[first_artifact].artifact_update.artifact.parts[0].text == (
        "Stream hello from TCK"
    )
    final = responses[-1].status_update
    assert final.status.state == TaskState.TASK_STATE_COMPLETED
    assert "receipt" in _meta(final)


async def test_a_local_a2a_agent_answers_our_own_a2a_client_without_a_receipt(
    start_a2a: StartFederation,
) -> None:
    fed = await start_a2a()
    card_url = f"{fed.card_host('hospital')}/.well-known/agent-card.json"
    async with a2a_client(card_url, "HTTP+JSON", streaming=False) as (client, _):
        [response] = await send(client, text_message("hi", message_id="tck-artifact-data-7"))
    task = response.task
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    from google.protobuf import json_format

    assert json_format.MessageToDict(task.artifacts[0].parts[0].data) == {
        "key": "value",
        "count": 42,
    }
    assert "receipt" not in _meta(task)  # nothing crossed a boundary


async def test_an_agent_that_answers_with_a_message_answers_our_client_with_a_message(
    start_a2a: StartFederation,
) -> None:
    fed = await start_a2a()
    async with a2a_client(
        f"{fed.card_host('insurer')}/.well-known/agent-card.json", streaming=False
    ) as (client, _):
        [response] = await send(client, text_message("hi", message_id="tck-message-response-1"))
    assert response.WhichOneof("payload") == "message"
    assert [p.text for p in response.message.parts] == ["Direct message response"]
    assert "receipt" in _meta(response.message)


HOSPITAL_SHARES_ONLY_THE_TOTAL = """\
p, insurer, scenario, *, invoke, *, allow
p, insurer, scenario, *, share, artifacts[].parts[].data.total, allow
"""


async def test_text_parts_and_files_do_not_slip_past_the_partners_share_policy(
    start_a2a: StartFederation,
) -> None:
    agent = RecordingExecutor()
    fed = await start_a2a(executor=agent, hospital_rules=HOSPITAL_SHARES_ONLY_THE_TOTAL)
    async with a2a_client(
        f"{fed.card_host('insurer')}/.well-known/agent-card.json", streaming=False
    ) as (client, _):
        [response] = await send(client, text_message("report"))
    task = response.task
    from google.protobuf import json_format

    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert [json_format.MessageToDict(p) for a in task.artifacts for p in a.parts] == [
        {"data": {"total": 42}}
    ]
    assert not task.status.message.parts  # "report ready" is a field the policy did not name
    withheld = {a["path"] for a in _meta(task)["fieldActions"] if a["action"] == "withheld"}
    # Each withheld part is reported, at the first key no rule names (the text, the ssn, the file).
    assert {
        "artifacts[0].parts[0].*",
        "artifacts[0].parts[1].data.*",
        "artifacts[0].parts[2].*",
    } <= withheld
    shown = _json(task)
    for secret in ("confidential", "078-05-1120", "c2NhbiBieXRlcw==", "report ready"):
        assert secret not in shown


INSURER_SENDS_ONLY_DATA = """\
p, hospital, scenario, *, send, parts[].data, allow
"""


async def test_our_send_policy_filters_each_part_before_it_leaves(
    start_a2a: StartFederation,
) -> None:
    agent = RecordingExecutor()
    fed = await start_a2a(executor=agent, insurer_rules=INSURER_SENDS_ONLY_DATA)
    from a2a.types.a2a_pb2 import Part
    from google.protobuf import json_format
    from google.protobuf.struct_pb2 import Value

    message = text_message("report", message_id="our-message-7", context_id="conv-1")
    message.parts.append(Part(data=json_format.ParseDict({"claim": 420}, Value())))
    message.parts.append(Part(raw=b"private file", filename="id.png"))
    async with a2a_client(
        f"{fed.card_host('insurer')}/.well-known/agent-card.json", streaming=False
    ) as (client, _):
        [response] = await send(client, message)
    assert response.task.status.state == TaskState.TASK_STATE_COMPLETED
    [received] = agent.received
    assert [json_format.MessageToDict(p) for p in received.parts] == [{"data": {"claim": 420}}]
    assert received.message_id != "our-message-7"  # the id is a field the policy did not allow
    assert received.context_id != "conv-1"


async def test_context_ids_link_what_we_linked_and_no_more(start_a2a: StartFederation) -> None:
    agent = RecordingExecutor()
    fed = await start_a2a(executor=agent)
    async with a2a_client(
        f"{fed.card_host('insurer')}/.well-known/agent-card.json", streaming=False
    ) as (client, _):
        for message_id, context_id in (
            ("a", "conv-1"),
            ("b", "conv-1"),
            ("c", "conv-2"),
            ("d", ""),
        ):
            await send(client, text_message("hi", message_id=message_id, context_id=context_id))
    seen = [m.context_id for m in agent.received]
    assert seen[0] == seen[1]  # one conversation of ours stays one at the partner's agent
    assert len(set(seen)) == 4 - 1  # and others stay apart, a message without one on its own
    assert not {"conv-1", "conv-2"} & set(seen)  # our own ids never leave
    assert all(s.startswith("ctx-") for s in seen[:3])


async def test_an_agents_error_text_stays_with_its_organization(start_a2a: StartFederation) -> None:
    from tests.a2a.agents import SECRET

    agent = RecordingExecutor()
    fed = await start_a2a(executor=agent)
    async with a2a_client(
        f"{fed.card_host('insurer')}/.well-known/agent-card.json", streaming=False
    ) as (client, _):
        [response] = await send(client, text_message("fail"))
    task = response.task
    assert task.status.state == TaskState.TASK_STATE_FAILED
    assert _meta(task)["error"]["code"] == "skill_error"
    assert SECRET not in _json(task)
    # Our own client, calling the same agent locally, is told what went wrong.
    async with a2a_client(
        f"{fed.card_host('hospital')}/.well-known/agent-card.json", streaming=False
    ) as (client, _):
        [response] = await send(client, text_message("fail"))
    assert SECRET in _json(response.task)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_unknown_task_is_task_not_found(
    start_a2a: StartFederation, transport: str
) -> None:
    from a2a.types.a2a_pb2 import GetTaskRequest
    from a2a.utils.errors import TaskNotFoundError

    fed = await start_a2a()
    async with a2a_client(f"{fed.card_host('insurer')}/.well-known/agent-card.json", transport) as (
        client,
        _,
    ):
        with pytest.raises(TaskNotFoundError):
            await client.get_task(GetTaskRequest(id="no-such-task"))


async def test_cancel_reaches_the_partners_agent_and_both_audit_logs(
    start_a2a: StartFederation,
) -> None:
    import asyncio

    from a2a.types.a2a_pb2 import CancelTaskRequest

    from tests.integration.federation import eventually

    agent = RecordingExecutor()
    fed = await start_a2a(executor=agent)
    async with a2a_client(f"{fed.card_host('insurer')}/.well-known/agent-card.json") as (client, _):
        stream = client.send_message(
            __import__("tests.a2a.agents", fromlist=["request"]).request(text_message("wait"))
        )
        first = await anext(stream)
        task_id = first.task.id
        await asyncio.wait_for(agent.started.wait(), 10)
        canceled = await client.cancel_task(CancelTaskRequest(id=task_id))
        assert canceled.status.state == TaskState.TASK_STATE_CANCELED
        await stream.aclose()
    assert await eventually(lambda: len(agent.canceled) == 1, 10), agent.canceled
    for org in ("insurer", "hospital"):
        assert await eventually(
            lambda org=org: (
                "canceled" in [r.kind for r in fed.federation[org].audit.query(task_id=task_id)]
            ),
            10,
        ), org
    insurer = [r.kind for r in fed.federation["insurer"].audit.query(task_id=task_id)]
    assert "request_sent" in insurer and "canceled" in insurer


async def test_a_call_leaves_its_records_in_both_audit_logs(start_a2a: StartFederation) -> None:
    fed = await start_a2a()
    async with a2a_client(
        f"{fed.card_host('insurer')}/.well-known/agent-card.json", streaming=False
    ) as (client, _):
        [response] = await send(client, text_message("hi", message_id="tck-complete-task-1"))
    task_id = response.task.id
    insurer = [r.kind for r in fed.federation["insurer"].audit.query(task_id=task_id)]
    hospital = [r.kind for r in fed.federation["hospital"].audit.query(task_id=task_id)]
    assert sorted(insurer) == ["request_sent", "result_received"]
    assert sorted(hospital) == ["request_received", "result_released"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tls_can_be_put_on_the_a2a_listeners(
    start_a2a: StartFederation,
    pki,
    transport: str,  # type: ignore[no-untyped-def]
) -> None:
    import httpx

    tls = f'tls_cert = "{pki.cert("insurer")}"\ntls_key = "{pki.key("insurer")}"'
    fed = await start_a2a(a2a_extra=tls)
    base = fed.a2a_base("insurer")
    assert base.startswith("https://")
    async with httpx.AsyncClient() as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(f"{base}/a2a/agents")  # a client that does not trust the CA
    async with a2a_client(
        f"{fed.card_host('insurer')}/.well-known/agent-card.json",
        transport,
        streaming=False,
        ca=str(pki.ca),
    ) as (client, _):
        [response] = await send(client, text_message("hi", message_id="tck-complete-task-1"))
    assert response.task.status.state == TaskState.TASK_STATE_COMPLETED


@pytest.mark.parametrize("transport", ["JSONRPC", "GRPC"])
async def test_an_agent_that_asks_for_input_gets_the_next_message_in_the_same_task(
    start_a2a: StartFederation, transport: str
) -> None:
    """Multi-turn across organizations: each turn filtered, recorded and signed."""
    agent = RecordingExecutor()
    fed = await start_a2a(executor=agent)
    card_url = f"{fed.card_host('insurer')}/.well-known/agent-card.json"
    async with a2a_client(card_url, transport, streaming=False) as (client, _):
        [asked] = await send(client, text_message("ask", message_id="m-1", context_id="conv-9"))
        task = asked.task
        assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        assert [p.text for p in task.status.message.parts] == ["which patient?"]
        assert "receipt" in _meta(task)  # the turn's result is signed like a final one
        follow_up = text_message("report", message_id="m-2")
        follow_up.task_id = task.id  # only the task id: the context is inferred
        [answered] = await send(client, follow_up)
    done = answered.task
    assert done.id == task.id and done.context_id == task.context_id
    assert done.status.state == TaskState.TASK_STATE_COMPLETED
    assert [p.text for a in done.artifacts for p in a.parts][:1] == [
        "the diagnosis is confidential"
    ]
    # The agent got the next message in its own task and context.
    assert len(agent.task_ids) == 2 and agent.task_ids[0] == agent.task_ids[1]
    assert agent.received[0].context_id == agent.received[1].context_id
    hospital = [r.kind for r in fed.federation["hospital"].audit.query(task_id=task.id)]
    assert hospital.count("request_received") == 2 and hospital.count("result_released") == 2


async def test_canceling_a_task_that_waits_for_input_cancels_it_everywhere(
    start_a2a: StartFederation,
) -> None:
    from a2a.types.a2a_pb2 import CancelTaskRequest

    from tests.integration.federation import eventually

    agent = RecordingExecutor()
    fed = await start_a2a(executor=agent)
    async with a2a_client(
        f"{fed.card_host('insurer')}/.well-known/agent-card.json", streaming=False
    ) as (client, _):
        [asked] = await send(client, text_message("ask"))
        task_id = asked.task.id
        canceled = await client.cancel_task(CancelTaskRequest(id=task_id))
    assert canceled.status.state == TaskState.TASK_STATE_CANCELED
    assert await eventually(lambda: agent.canceled == [agent.task_ids[0]], 10), agent.canceled
    for org in ("insurer", "hospital"):
        assert await eventually(
            lambda org=org: (
                "canceled" in [r.kind for r in fed.federation[org].audit.query(task_id=task_id)]
            ),
            10,
        ), org
