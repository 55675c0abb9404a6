"""An outsider's tools: raw gRPC clients built from the generated fedgate.v1 stubs (not our SDK),
presenting a real certificate of the tests' federation."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.local import LocalFederation
from tests.conftest import Pki
from tests.integration.federation import delegation, federation_channel


@contextlib.asynccontextmanager
async def federation_client(
    pki: Pki, fed: LocalFederation, cert: str, target: str = "hospital"
) -> AsyncIterator[pb_grpc.FederationStub]:
    """A Federation stub to `target`'s gateway, presenting `cert`'s certificate."""
    channel = federation_channel(pki, fed.federation(target), cert=cert, target_org=target)
    try:
        yield pb_grpc.FederationStub(channel)
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def raw_federation_call(
    pki: Pki, fed: LocalFederation, cert: str, method: str, target: str = "hospital"
) -> AsyncIterator[Any]:
    """A unary Federation call that sends and receives raw bytes (for undecodable requests)."""
    channel = federation_channel(pki, fed.federation(target), cert=cert, target_org=target)
    try:
        yield channel.unary_unary(
            f"/fedgate.v1.Federation/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def participant_client(
    fed: LocalFederation, org: str = "hospital"
) -> AsyncIterator[pb_grpc.ParticipantStub]:
    """A Participant stub on `org`'s participant listener, as any local process could open."""
    async with grpc.aio.insecure_channel(fed.participant(org)) as channel:
        yield pb_grpc.ParticipantStub(channel)


def task_request(
    pki: Pki, sender: str, task_id: str, *, target: str = "hospital", **fields: Any
) -> pb.TaskRequest:
    """A task for target/echo.say carrying a valid delegation statement signed by `sender`."""
    values: dict[str, Any] = {
        "task_id": task_id,
        "target_org": target,
        "agent": "echo",
        "skill": "say",
        "delegation": delegation(pki, sender, target, task_id),
    }
    values.update(fields)
    return pb.TaskRequest(**values)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    """The error a call ends with (the call must fail)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call was expected to be refused")


async def stream_refusal(call: Any) -> tuple[list[Any], grpc.aio.AioRpcError | None]:
    """Every message of a server stream and the error it ended with, if any."""
    messages = []
    try:
        async for message in call:
            messages.append(message)
    except grpc.aio.AioRpcError as exc:
        return messages, exc
    return messages, None
