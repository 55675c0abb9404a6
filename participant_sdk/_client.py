"""Requesters: call a local or a partner's agent skill through the local gateway."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from fedgate.convert import dict_to_struct, parse_target
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from participant_sdk._errors import FedgateError, InvalidArgument, TaskFailed, from_rpc_error
from participant_sdk._types import TaskResult, TaskUpdate


class Client:
    """A connection to the local gateway's participant listener.

        async with Client("127.0.0.1:7400") as client:
            result = await client.call("insurer/claims.check", {"claim": {...}}, timeout=10)
    """

    def __init__(self, gateway: str = "127.0.0.1:7400", *, requester: str = "", token: str | None = None) -> None:
        self.gateway = gateway
        self.requester = requester
        self.token = token
        self._channel = grpc.aio.insecure_channel(gateway)
        self._stub = pb_grpc.ParticipantStub(self._channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _request(self, target: str, data: dict[str, Any], timeout: float | None,
                 task_id: str | None, idempotency_key: str | None) -> pb.TaskRequest:
        try:
            org, agent, skill = parse_target(target)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if not isinstance(data, dict):
            raise InvalidArgument(f"task input must be a dict, not {type(data).__name__}")
        try:
            return pb.TaskRequest(
                task_id=task_id or str(uuid.uuid4()),
                target_org=org,
                agent=agent,
                skill=skill,
                input=dict_to_struct(data),
                requester=self.requester,
                deadline_unix_ms=int((time.time() + timeout) * 1000) if timeout else 0,
                idempotency_key=idempotency_key or "",
            )
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"task input is not JSON-serializable: {exc}") from None
        except (DecodeError, RecursionError):
            raise InvalidArgument(
                "task input is nested too deeply to encode (a protobuf Struct carries at most 33 levels of nested objects)"
            ) from None

    async def call(
        self,
        target: str,
        data: dict[str, Any],
        *,
        timeout: float | None = 30.0,
        task_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> TaskResult:
        """Run `org/agent.skill` with `data`; returns the completed result or raises.

        Raises TaskFailed when the task ends FAILED, CANCELED or REJECTED, and a FedgateError
        subclass (NotFound, PermissionDenied, DeadlineExceeded, ...) when the gateway refuses.
        """
        request = self._request(target, data, timeout, task_id, idempotency_key)
        try:
            message = await self._stub.SubmitTask(request, timeout=timeout, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        result = TaskResult.from_pb(message)
        if not result.ok:
            raise TaskFailed(result)
        return result

    async def stream(
        self,
        target: str,
        data: dict[str, Any],
        *,
        timeout: float | None = 30.0,
        task_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncIterator[TaskUpdate]:
        """Run `org/agent.skill` and yield its state updates; the last one carries the result."""
        request = self._request(target, data, timeout, task_id, idempotency_key)
        call = self._stub.StreamTask(request, timeout=timeout, metadata=self._metadata())
        try:
            async for message in call:
                yield TaskUpdate.from_pb(message)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def cancel(self, task_id: str, reason: str = "") -> str:
        """Cancel a running task; returns its state afterwards."""
        try:
            response = await self._stub.CancelTask(
                pb.CancelTaskRequest(task_id=task_id, reason=reason), timeout=10, metadata=self._metadata()
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        from fedgate.convert import state_name

        return state_name(response.state)

    async def get(self, task_id: str) -> TaskResult:
        try:
            message = await self._stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=10, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return TaskResult.from_pb(message)


__all__ = ["Client", "FedgateError"]
