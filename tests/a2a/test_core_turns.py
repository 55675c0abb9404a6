"""Turns through the paths the A2A edge uses and the core's own tests do not: a partner's turn
over a streaming call, and a local agent's turn (fixes in gateway/exchange/steps.py and
routes.py, named in the A2A report)."""

from __future__ import annotations

import grpc
from fedgate.convert import struct_to_dict
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.local import LocalFederation
from tests.integration.test_turns import RawAgent, _request, two  # noqa: F401 (the fixture)


async def _stream(stub: pb_grpc.ParticipantStub, request: pb.TaskRequest) -> list[pb.TaskUpdate]:
    return [update async for update in stub.StreamTask(request, timeout=10)]


async def test_a_partners_turn_reaches_a_streaming_requester_with_its_result(
    two: LocalFederation,  # noqa: F811
) -> None:
    async with (
        RawAgent(two.participant("hospital")),
        grpc.aio.insecure_channel(two.participant("insurer")) as channel,
    ):
        stub = pb_grpc.ParticipantStub(channel)
        first = await _stream(stub, _request("stream-1", {"topic": "admission"}))
        ended = first[-1]
        assert ended.state == pb.TASK_STATE_INPUT_REQUIRED
        assert struct_to_dict(ended.result.output) == {"question": "which ward?"}
        assert ended.result.HasField("receipt")
        second = await _stream(stub, _request("stream-1", {"answer": "cardiology"}, turn=1))
    assert second[-1].state == pb.TASK_STATE_COMPLETED
    assert struct_to_dict(second[-1].result.output) == {"summary": "booked in cardiology"}


async def test_a_local_agents_turn_reaches_our_requester_with_its_output(
    two: LocalFederation,  # noqa: F811
) -> None:
    async with (
        RawAgent(two.participant("hospital")) as agent,
        grpc.aio.insecure_channel(two.participant("hospital")) as channel,
    ):
        stub = pb_grpc.ParticipantStub(channel)
        first = await stub.SubmitTask(_request("local-1", {"topic": "admission"}), timeout=10)
        assert first.state == pb.TASK_STATE_INPUT_REQUIRED and first.turn == 0
        # Inside the organization nothing is filtered: the notes are ours.
        assert struct_to_dict(first.output) == {
            "question": "which ward?",
            "nurse_notes": "patient is anxious",
        }
        second = await _stream(stub, _request("local-1", {"answer": "ward 4"}, turn=1))
    assert second[-1].state == pb.TASK_STATE_COMPLETED
    assert struct_to_dict(second[-1].result.output)["summary"] == "booked in ward 4"
    assert [turn for turn, _ in agent.inputs] == [0, 1]
