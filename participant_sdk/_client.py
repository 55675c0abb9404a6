"""Requesters: call a local or a partner's agent skill through the local gateway."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import grpc
from fedgate.convert import dict_to_struct, parse_target, state_name
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc
from google.protobuf.message import DecodeError

from participant_sdk import _patterns
from participant_sdk._channel import TlsCa, ca_pem, open_channel
from participant_sdk._errors import FedgateError, InvalidArgument, TaskFailed, from_rpc_error
from participant_sdk._patterns import FallbackResult, FanOutResult, RetryPolicy, Strategy
from participant_sdk._types import TaskResult, TaskUpdate


class Client:
    """A connection to the local gateway's participant listener.

        async with Client("127.0.0.1:7400") as client:
            result = await client.call("insurer/claims.check", {"claim": {...}}, timeout=10)

    `retry` is the default RetryPolicy of `call`, `call_first` and `fan_out`: by default
    `RetryPolicy()`, a few attempts on UNAVAILABLE; `RetryPolicy(max_attempts=1)` turns it off.
    `tls_ca` (the CA certificate, PEM bytes or a file's path) connects with TLS, for a gateway
    whose participant listener has a certificate ([participant] cert); plaintext otherwise.
    """

    def __init__(
        self,
        gateway: str = "127.0.0.1:7400",
        *,
        requester: str = "",
        token: str | None = None,
        retry: RetryPolicy | None = None,
        tls_ca: TlsCa = None,
    ) -> None:
        self.gateway = gateway
        self.requester = requester
        self.token = token
        self.retry = retry if retry is not None else RetryPolicy()
        self.tls_ca = ca_pem(tls_ca)
        self._channel = open_channel(gateway, self.tls_ca)
        self._stub = pb_grpc.ParticipantStub(self._channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _request(
        self,
        target: str,
        data: dict[str, Any],
        timeout: float | None,
        task_id: str | None,
        idempotency_key: str | None,
        purpose: str = "",
        roles: Sequence[str] = (),
        parent_task_id: str = "",
        turn: int = 0,
    ) -> pb.TaskRequest:
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
                purpose=purpose,
                roles=list(roles),
                parent_task_id=parent_task_id,
                turn=turn,
            )
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"task input is not JSON-serializable: {exc}") from None
        except (DecodeError, RecursionError):
            raise InvalidArgument(
                "task input is nested too deeply to encode "
                "(a protobuf Struct carries at most 33 levels of nested objects)"
            ) from None

    async def call(
        self,
        target: str,
        data: dict[str, Any],
        *,
        timeout: float | None = 30.0,  # noqa: ASYNC109 - the deadline travels to the gateways
        task_id: str | None = None,
        idempotency_key: str | None = None,
        retry: RetryPolicy | None = None,
        purpose: str = "",
        roles: Sequence[str] = (),
        parent_task_id: str = "",
    ) -> TaskResult:
        """Run `org/agent.skill` with `data`; returns the completed result or raises.

        A result that `awaiting_input` (the agent asked a question: its output) is returned too;
        answer it with `reply`. Raises TaskFailed when the task ends FAILED, CANCELED or
        REJECTED, and a FedgateError
        subclass (NotFound, PermissionDenied, DeadlineExceeded, ...) when the gateway refuses.
        Transient failures (UNAVAILABLE) are retried by `retry` (default: the client's policy)
        within `timeout`, with the same task id and idempotency key (the task id if none given).
        `purpose` and `roles` are the requester's claims; our gateway signs them into the
        delegation statement that the partner's policy conditions read.
        """
        task_id = task_id or str(uuid.uuid4())
        # Every attempt carries the same key; without one, the task id is the key (as the
        # gateway would take it), so a caller's own retry with the same task id is deduplicated.
        key = idempotency_key or task_id
        request = self._request(target, data, timeout, task_id, key, purpose, roles, parent_task_id)
        return await self._submit(request, target, key, timeout, retry)

    async def reply(
        self,
        result: TaskResult,
        data: dict[str, Any],
        *,
        timeout: float | None = 30.0,  # noqa: ASYNC109 - the deadline travels to the gateways
        retry: RetryPolicy | None = None,
    ) -> TaskResult:
        """Answer a result that is `awaiting_input` (multi-turn): `data` is the next message of
        the same task, under the same policies and records; returns the next turn's result, as
        `call` does (it may ask again)."""
        if not result.awaiting_input or not result.target:
            raise InvalidArgument(
                f"task {result.task_id!r} is {result.state}, not waiting for input from a "
                "call of this client: reply answers a result of call() or reply()"
            )
        request = self._request(
            result.target,
            data,
            timeout,
            result.task_id,
            result.idempotency_key or result.task_id,
            turn=result.turn + 1,
        )
        return await self._submit(request, result.target, result.idempotency_key, timeout, retry)

    async def _submit(
        self,
        request: pb.TaskRequest,
        target: str,
        key: str,
        seconds: float | None,
        retry: RetryPolicy | None,
    ) -> TaskResult:
        deadline = None if seconds is None else time.monotonic() + seconds

        async def attempt(remaining: float | None) -> TaskResult:
            try:
                message = await self._stub.SubmitTask(
                    request, timeout=remaining, metadata=self._metadata()
                )
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None
            return TaskResult.from_pb(message)

        result: TaskResult = await _patterns.call_with_retry(
            attempt, retry or self.retry, deadline=deadline
        )
        result = replace(result, target=target, idempotency_key=key)
        if not result.ok and not result.awaiting_input:
            raise TaskFailed(result)
        return result

    async def call_first(
        self,
        targets: Sequence[str],
        data: dict[str, Any],
        *,
        timeout: float | None = 30.0,  # noqa: ASYNC109 - the deadline travels to the gateways
        route_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
    ) -> FallbackResult:
        """Try each `org/agent.skill` in order, sharing `timeout`; the first that completes wins.

        Moves on when a route is unavailable or refuses (UNAVAILABLE, PERMISSION_DENIED,
        NOT_FOUND, RESOURCE_EXHAUSTED, or the task ended failed or rejected), and when a route
        overruns `route_timeout` while the overall deadline still has time. Raises
        AllRoutesFailed (carrying each (target, error)) when every route failed.
        """
        return await _patterns.call_first(
            self,
            targets,
            data,
            timeout=timeout,
            route_timeout=route_timeout,
            retry=retry,
            idempotency_key=idempotency_key,
        )

    async def fan_out(
        self,
        targets: Sequence[str],
        data: dict[str, Any],
        *,
        strategy: Strategy = "all",
        timeout: float | None = 30.0,  # noqa: ASYNC109 - the deadline travels to the gateways
        retry: RetryPolicy | None = None,
    ) -> FanOutResult:
        """Call every target at once with `data` and resolve the answers with `strategy`.

        Strategies: "first_success" (cancel the rest once one completes), "all" (report every
        outcome), quorum(field, n) and majority(field) (agree on the value of an output field;
        NoAgreement reports who said what when no single value reaches the quorum).
        """
        return await _patterns.fan_out(
            self, targets, data, strategy=strategy, timeout=timeout, retry=retry
        )

    async def stream(
        self,
        target: str,
        data: dict[str, Any],
        *,
        timeout: float | None = 30.0,  # noqa: ASYNC109 - the deadline travels to the gateways
        task_id: str | None = None,
        idempotency_key: str | None = None,
        purpose: str = "",
        roles: Sequence[str] = (),
        parent_task_id: str = "",
    ) -> AsyncIterator[TaskUpdate]:
        """Run `org/agent.skill` and yield its state updates; the last one carries the result.

        Not retried: updates already yielded cannot be taken back (use `call` for retries).
        """
        request = self._request(
            target, data, timeout, task_id, idempotency_key, purpose, roles, parent_task_id
        )
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
                pb.CancelTaskRequest(task_id=task_id, reason=reason),
                timeout=10,
                metadata=self._metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return str(state_name(response.state))

    async def get(self, task_id: str) -> TaskResult:
        """A task's state and, once it ended, its result."""
        try:
            message = await self._stub.GetTask(
                pb.GetTaskRequest(task_id=task_id), timeout=10, metadata=self._metadata()
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return TaskResult.from_pb(message)


__all__ = ["Client", "FedgateError"]
