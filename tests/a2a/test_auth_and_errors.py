"""Callers authenticate with participant tokens; refusals follow the error table (docs/a2a.md §4)."""

from __future__ import annotations

import httpx
import pytest
from a2a.client.errors import A2AClientError
from a2a.types.a2a_pb2 import GetTaskRequest, ListTasksRequest, TaskState
from a2a.utils.errors import TaskNotFoundError

from gateway.edges.a2a.errors import GatewayUnauthenticated
from gateway.identity.tokens import token_authority
from tests.a2a.agents import a2a_client, call_context, send, text_message
from tests.a2a.conftest import StartFederation
from tests.a2a.federation import A2AFederation

RPC_HEADERS = {"A2A-Version": "1.0", "content-type": "application/json"}


def _tokens(fed: A2AFederation, org: str = "insurer"):  # type: ignore[no-untyped-def]
    return token_authority(fed.federation[org].config)


def _rpc(method: str, params: dict, request_id: int = 1) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


SEND = {
    "message": {"role": "ROLE_USER", "messageId": "tck-complete-task-1", "parts": [{"text": "hi"}]}
}


async def test_cards_and_calls_need_a_token_that_may_call_the_agent(
    start_a2a: StartFederation,
) -> None:
    fed = await start_a2a(require_tokens=True)
    base = fed.card_host("insurer")
    card_url = f"{base}/.well-known/agent-card.json"
    allowed = _tokens(fed).issue("adjuster-7", calls=["hospital/scenario.tck"])
    elsewhere = _tokens(fed).issue("billing", calls=["hospital/records.*"])
    async with httpx.AsyncClient() as http:
        missing = await http.get(card_url)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["details"][0]["reason"] == "UNAUTHENTICATED"
        forged = await http.get(card_url, headers={"Authorization": "Bearer not-a-token"})
        assert forged.status_code == 401
        # A token that may not call the agent: the agent does not exist for it.
        hidden = await http.get(card_url, headers={"Authorization": f"Bearer {elsewhere}"})
        assert hidden.status_code == 404
        listed = await http.get(
            f"{fed.a2a_base('insurer')}/a2a/agents",
            headers={"Authorization": f"Bearer {elsewhere}"},
        )
        assert listed.json() == {"agents": []}
        card = await http.get(card_url, headers={"Authorization": f"Bearer {allowed}"})
        assert card.status_code == 200
        schemes = card.json()["securitySchemes"]
        assert schemes["fedgate-participant-token"]["httpAuthSecurityScheme"]["scheme"] == "bearer"
        # Calls: no token is UNAUTHENTICATED, a token for other agents finds nothing.
        rpc = f"{base}/jsonrpc"
        unauthenticated = (
            await http.post(rpc, json=_rpc("SendMessage", SEND), headers=RPC_HEADERS)
        ).json()
        assert unauthenticated["error"]["code"] == -32041
        assert unauthenticated["error"]["data"][0]["reason"] == "UNAUTHENTICATED"
        other = (
            await http.post(
                rpc,
                json=_rpc("SendMessage", SEND),
                headers={**RPC_HEADERS, "Authorization": f"Bearer {elsewhere}"},
            )
        ).json()
        assert other["error"]["code"] == -32040
        assert other["error"]["data"][0]["reason"] == "NOT_FOUND"
    async with a2a_client(card_url, "GRPC", token=allowed, streaming=False) as (client, _):
        [response] = await send(
            client, text_message("hi", message_id="tck-complete-task-2"), allowed
        )
        assert response.task.status.state == TaskState.TASK_STATE_COMPLETED
        # The same call over gRPC without the token is refused there too.
        # (the SDK's client maps the ErrorInfo reason back to the gateway's error class)
        with pytest.raises(GatewayUnauthenticated, match="no participant token"):
            await send(client, text_message("hi", message_id="tck-complete-task-3"))


async def test_a_callers_tasks_are_its_own(start_a2a: StartFederation) -> None:
    fed = await start_a2a(require_tokens=True)
    card_url = f"{fed.card_host('insurer')}/.well-known/agent-card.json"
    ada = _tokens(fed).issue("ada", calls=["hospital/*"])
    bob = _tokens(fed).issue("bob", calls=["hospital/*"])
    async with a2a_client(card_url, "HTTP+JSON", token=ada, streaming=False) as (client, _):
        [response] = await send(client, text_message("hi", message_id="tck-complete-task-3"), ada)
        task_id = response.task.id
        mine = await client.list_tasks(ListTasksRequest(), context=call_context(ada))
        assert [t.id for t in mine.tasks] == [task_id]
        theirs = await client.list_tasks(ListTasksRequest(), context=call_context(bob))
        assert list(theirs.tasks) == []
        with pytest.raises(TaskNotFoundError):
            await client.get_task(GetTaskRequest(id=task_id), context=call_context(bob))
    # The router records who asked: the token's subject.
    [sent] = [
        r
        for r in fed.federation["insurer"].audit.query(task_id=task_id)
        if r.kind == "request_sent"
    ]
    assert sent.requester == "ada"


async def test_an_agent_a_partner_does_not_share_has_no_card(start_a2a: StartFederation) -> None:
    fed = await start_a2a(hospital_rules="p, insurer, records, *, invoke, *, allow\n")
    async with httpx.AsyncClient() as http:
        hidden = await http.get(f"{fed.card_host('insurer')}/.well-known/agent-card.json")
        assert hidden.status_code == 404
        assert hidden.json()["error"]["status"] == "NOT_FOUND"
        # The hospital's own clients do reach it.
        local = await http.get(f"{fed.card_host('hospital')}/.well-known/agent-card.json")
        assert local.status_code == 200
        listed = await http.get(f"{fed.a2a_base('insurer')}/a2a/agents")
        assert listed.json() == {"agents": []}
        nonsense = await http.get(
            f"{fed.a2a_base('insurer')}/a2a/Not_An_Org/x/.well-known/agent-card.json"
        )
        assert nonsense.status_code == 404


async def test_bad_input_gets_invalid_params_naming_the_fix(start_a2a: StartFederation) -> None:
    import base64

    fed = await start_a2a(a2a_extra="max_file_bytes = 8")
    rpc = f"{fed.card_host('insurer')}/jsonrpc"
    big = {
        "message": {
            "role": "ROLE_USER",
            "messageId": "m",
            "parts": [{"raw": base64.b64encode(b"123456789").decode(), "filename": "x.bin"}],
        }
    }
    cases = [
        (big, "[a2a] max_file_bytes"),
        ({**SEND, "metadata": {"fedgate": {"skill": "nope"}}}, "one of tck"),
        ({**SEND, "metadata": {"fedgate": {"deadline": 3}}}, "unknown keys"),
        ({**SEND, "metadata": {"fedgate": {"deadlineSeconds": -1}}}, "positive number"),
    ]
    async with httpx.AsyncClient() as http:
        for params, names in cases:
            answer = (
                await http.post(rpc, json=_rpc("SendMessage", params), headers=RPC_HEADERS)
            ).json()
            assert answer["error"]["code"] == -32602, answer
            assert names in answer["error"]["message"]
        too_large = await http.post(rpc, content=b"x" * (4 * 1024 * 1024 + 1), headers=RPC_HEADERS)
        assert too_large.status_code == 413


async def test_a_partner_that_is_down_is_unavailable(start_a2a: StartFederation) -> None:
    fed = await start_a2a()
    card_url = f"{fed.card_host('insurer')}/.well-known/agent-card.json"
    async with a2a_client(card_url, streaming=False) as (client, _):
        hospital = fed.federation["hospital"]
        await hospital._federation.stop(0)  # the partner's federation listener goes away
        with pytest.raises(A2AClientError) as refused:
            await send(client, text_message("hi", message_id="tck-complete-task-9"))
    # The JSON-RPC client names the code it got: the gateway's UNAVAILABLE, with the cause.
    assert "-32044" in refused.value.message
    assert (
        "organization 'hospital'" in refused.value.message
        and "unreachable" in refused.value.message
    )


async def test_grpc_errors_carry_the_specs_codes_and_error_info(start_a2a: StartFederation) -> None:
    """An outsider's raw gRPC client: the spec's codes where the SDK's table differs, with the
    ErrorInfo reason in the rich status; an unsupported A2A-Version is refused on gRPC too."""
    import grpc
    from a2a.types import a2a_pb2, a2a_pb2_grpc
    from google.rpc import error_details_pb2, status_pb2

    fed = await start_a2a()
    async with grpc.aio.insecure_channel(fed.grpc("insurer")) as channel:
        stub = a2a_pb2_grpc.A2AServiceStub(channel)
        message = a2a_pb2.Message(
            message_id="tck-complete-task-1", role=a2a_pb2.ROLE_USER, parts=[a2a_pb2.Part(text="x")]
        )

        async def refusal(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            error = raised.value
            [details] = [v for k, v in error.trailing_metadata() if k == "grpc-status-details-bin"]
            status = status_pb2.Status.FromString(details)
            info = error_details_pb2.ErrorInfo()
            status.details[0].Unpack(info)
            return error.code(), info.reason

        assert await refusal(
            stub.SendMessage(
                a2a_pb2.SendMessageRequest(message=message), metadata=[("a2a-version", "99.0")]
            )
        ) == (grpc.StatusCode.UNIMPLEMENTED, "VERSION_NOT_SUPPORTED")
        assert await refusal(
            stub.CreateTaskPushNotificationConfig(
                a2a_pb2.TaskPushNotificationConfig(task_id="t", url="https://example.org")
            )
        ) == (grpc.StatusCode.UNIMPLEMENTED, "PUSH_NOTIFICATION_NOT_SUPPORTED")
        assert await refusal(stub.GetTask(a2a_pb2.GetTaskRequest(id="nope"))) == (
            grpc.StatusCode.NOT_FOUND,
            "TASK_NOT_FOUND",
        )
        wrong_agent = a2a_pb2.SendMessageRequest(message=message, tenant="hospital/nobody")
        assert await refusal(stub.SendMessage(wrong_agent)) == (
            grpc.StatusCode.NOT_FOUND,
            "NOT_FOUND",
        )
        # The same request as 1.0, to the default agent, goes through.
        reply = await stub.SendMessage(
            a2a_pb2.SendMessageRequest(message=message), metadata=[("a2a-version", "1.0")]
        )
        assert reply.task.status.state == a2a_pb2.TASK_STATE_COMPLETED
