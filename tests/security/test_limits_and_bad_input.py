"""Limits and malformed input: each refused with a clear status, audited, and nobody else starves."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fedgate.convert import dict_to_struct
from fedgate.v1 import fedgate_pb2 as pb

from gateway.local import LocalFederation
from participant_sdk import Client
from tests.conftest import Pki
from tests.integration.federation import delegation, echo_agent, federation_channel, serving
from tests.security.conftest import hospital_tokens


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint((number << 3) | wire_type)
    return key + (_varint(len(payload)) + payload if wire_type == 2 else payload)


def _nested_struct(depth: int) -> bytes:
    """A google.protobuf.Struct nested `depth` levels deep, built as raw bytes."""
    struct = b""
    for _ in range(depth):
        value = _field(5, 2, struct)  # Value.struct_value
        entry = _field(1, 2, b"x") + _field(2, 2, value)  # map entry: key, value
        struct = _field(1, 2, entry)  # Struct.fields
    return struct


def _request_bytes(
    pki: Pki, task_id: str, *, input_bytes: bytes = b"", extra: bytes = b""
) -> bytes:
    base = pb.TaskRequest(
        task_id=task_id,
        target_org="hospital",
        agent="echo",
        skill="say",
        delegation=delegation(pki, "lab", "hospital", task_id),
    ).SerializeToString()
    return base + (_field(5, 2, input_bytes) if input_bytes else b"") + extra


async def _raw_submit(pki: Pki, fed: LocalFederation, payload: bytes) -> grpc.aio.AioRpcError:
    channel = federation_channel(pki, fed.federation("hospital"), cert="lab", target_org="hospital")
    call = channel.unary_unary(
        "/fedgate.v1.Federation/SubmitTask",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(payload, timeout=10)
        return info.value
    finally:
        await channel.close()


async def test_payload_nested_ten_thousand_deep(secure_fed: LocalFederation, pki: Pki) -> None:
    error = await _raw_submit(
        pki, secure_fed, _request_bytes(pki, "deep-1", input_bytes=_nested_struct(10_000))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "TaskRequest message could not be decoded" in (error.details() or "")
    # Undecodable, so it has no task id: the rejection is recorded against the peer.
    (record,) = secure_fed["hospital"].audit.query(peer="lab", kind="rejected")
    assert record.status == "INVALID_ARGUMENT" and "could not be decoded" in record.detail


async def test_payload_nested_past_the_gateway_limit_but_decodable(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    error = await _raw_submit(
        pki, secure_fed, _request_bytes(pki, "deep-2", input_bytes=_nested_struct(40))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_payload_with_a_hundred_thousand_fields(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    wide = dict_to_struct({f"f{i}": i for i in range(100_000)}).SerializeToString()
    token = hospital_tokens(secure_fed).issue("echo", agents=["echo"])
    async with serving(secure_fed.participant("hospital"), echo_agent(), token=token):
        error = await _raw_submit(pki, secure_fed, _request_bytes(pki, "wide-1", input_bytes=wide))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 10000 fields" in (error.details() or "")
    (record,) = secure_fed["hospital"].audit.query(task_id="wide-1")
    assert record.kind == "rejected" and record.status == "INVALID_ARGUMENT"


async def test_oversized_message_is_resource_exhausted(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    big = dict_to_struct({"blob": "x" * (5 * 1024 * 1024)}).SerializeToString()
    error = await _raw_submit(pki, secure_fed, _request_bytes(pki, "big-1", input_bytes=big))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_invalid_utf8_in_a_string_field(secure_fed: LocalFederation, pki: Pki) -> None:
    bad_agent = _field(3, 2, b"\xff\xfe\xfd")  # TaskRequest.agent
    error = await _raw_submit(pki, secure_fed, _request_bytes(pki, "utf8-1", extra=bad_agent))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be decoded" in (error.details() or "")


async def test_wrong_wire_type_for_a_protocol_field(secure_fed: LocalFederation, pki: Pki) -> None:
    # task_id (a string, field 1) sent as a varint, and the deadline (int64) as bytes: the
    # decoder keeps them as unknown fields, so the task has no id and the gateway says so.
    payload = (
        _field(1, 0, _varint(7))
        + _field(8, 2, b"soon")
        + pb.TaskRequest(
            target_org="hospital",
            agent="echo",
            skill="say",
            delegation=delegation(pki, "lab", "hospital", "x"),
        ).SerializeToString()
    )
    error = await _raw_submit(pki, secure_fed, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must carry its task id" in (error.details() or "")


async def test_a_flooding_peer_is_limited_and_the_other_peer_is_served(
    secure_fed: LocalFederation,
) -> None:
    token = hospital_tokens(secure_fed).issue("echo", agents=["echo"])
    flood_outcomes: list[str] = []
    insurer_outcomes: list[str] = []
    async with (
        serving(secure_fed.participant("hospital"), echo_agent(), token=token),
        Client(secure_fed.participant("lab")) as lab,
        Client(secure_fed.participant("insurer")) as insurer,
    ):

        async def flood(n: int) -> None:
            try:
                await lab.call("hospital/echo.say", {"n": n}, timeout=10, retry=None)
                flood_outcomes.append("ok")
            except Exception as exc:
                flood_outcomes.append(type(exc).__name__ + ": " + str(exc))

        async def steady() -> None:
            for n in range(6):
                result = await insurer.call("hospital/echo.say", {"n": n}, timeout=10)
                insurer_outcomes.append("ok" if result.ok else "failed")
                await asyncio.sleep(0.25)

        await asyncio.gather(*(flood(n) for n in range(60)), steady())
    refused = [o for o in flood_outcomes if "ResourceExhausted" in o]
    assert refused, "the flooding peer was limited"
    assert any("organization 'lab'" in o for o in refused)
    assert insurer_outcomes == ["ok"] * 6, "the other peer was served throughout"
    statuses = {
        r.status for r in secure_fed["hospital"].audit.query(peer="lab", kind="rejected", limit=500)
    }
    assert "RESOURCE_EXHAUSTED" in statuses


async def test_non_finite_numbers_are_refused_not_crashed_on(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    """NaN and infinity are not JSON: a request carrying one is INVALID_ARGUMENT, and audited."""
    nan_input = pb.TaskRequest(
        input=dict_to_struct({"dose": float("nan")})
    ).input.SerializeToString()
    error = await _raw_submit(pki, secure_fed, _request_bytes(pki, "nan-1", input_bytes=nan_input))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not finite" in (error.details() or "")


async def test_agent_output_with_nan_fails_the_task_cleanly(secure_fed: LocalFederation) -> None:
    from participant_sdk import Agent, TaskFailed

    odd = Agent("echo")

    @odd.skill
    async def say(task, data):  # type: ignore[no-untyped-def]
        return {"dose": float("inf")}

    token = hospital_tokens(secure_fed).issue("echo", agents=["echo"])
    async with (
        serving(secure_fed.participant("hospital"), odd, token=token),
        Client(secure_fed.participant("insurer")) as client,
    ):
        with pytest.raises(TaskFailed) as info:
            await client.call("hospital/echo.say", {}, timeout=10)
    assert info.value.result.error is not None and info.value.result.error.code == "skill_error"


async def test_agent_card_with_a_non_finite_schema_is_refused(secure_fed: LocalFederation) -> None:
    from participant_sdk import Agent, AgentWorker, InvalidArgument

    odd = Agent("echo")

    @odd.skill(input_schema={"maximum": float("nan")})
    async def say(task, data):  # type: ignore[no-untyped-def]
        return {}

    token = hospital_tokens(secure_fed).issue("echo", agents=["echo"])
    worker = AgentWorker([odd], secure_fed.participant("hospital"), token=token)
    with pytest.raises(InvalidArgument, match="schema is not valid JSON"):
        await asyncio.wait_for(worker.run(), 10)


async def test_huge_names_in_a_refused_request_are_bounded_in_the_audit_log(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    huge = "a" * 200_000
    payload = pb.TaskRequest(
        task_id="huge-1",
        target_org="hospital",
        agent=huge,
        skill="say",
        requester=huge,
        delegation=delegation(pki, "lab", "hospital", "huge-1"),
    ).SerializeToString()
    error = await _raw_submit(pki, secure_fed, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    (record,) = secure_fed["hospital"].audit.query(task_id="huge-1")
    assert len(record.agent) <= 64 and len(record.requester) <= 256 and len(record.detail) <= 1000
