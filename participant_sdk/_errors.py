"""Errors the SDK raises: one per gRPC status a gateway answers with, plus TaskFailed.

FedgateError
├── InvalidArgument      INVALID_ARGUMENT
├── NotFound             NOT_FOUND
├── PermissionDenied     PERMISSION_DENIED
├── Unauthenticated      UNAUTHENTICATED
├── ResourceExhausted    RESOURCE_EXHAUSTED
├── Unavailable          UNAVAILABLE
├── DeadlineExceeded     DEADLINE_EXCEEDED
├── Cancelled            CANCELLED
├── SkillDefinitionError (at decoration time: a bad skill signature or a duplicate name)
└── TaskFailed           the task ended FAILED, CANCELED or REJECTED (carries the result)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from participant_sdk._types import TaskResult


class FedgateError(Exception):
    """Base of every error the SDK raises."""

    status: grpc.StatusCode | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(FedgateError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(FedgateError):
    status = grpc.StatusCode.NOT_FOUND


class PermissionDenied(FedgateError):
    status = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(FedgateError):
    status = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(FedgateError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FedgateError):
    status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FedgateError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(FedgateError):
    status = grpc.StatusCode.CANCELLED


class SkillDefinitionError(FedgateError, TypeError):
    """A skill is defined wrongly; raised where it is defined, not at the first task."""


class TaskFailed(FedgateError):
    """The task ended without completing; `result` says how (state, error code and message)."""

    def __init__(self, result: TaskResult) -> None:
        error = result.error
        detail = f"{error.code}: {error.message}" if error else result.state
        super().__init__(f"task {result.task_id} {result.state}: {detail}")
        self.result = result


_BY_STATUS: dict[grpc.StatusCode, type[FedgateError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
    )
    if cls.status is not None
}


def from_rpc_error(exc: grpc.aio.AioRpcError) -> FedgateError:
    """The SDK error for a gRPC error, keeping the gateway's message."""
    error_type = _BY_STATUS.get(exc.code(), FedgateError)
    error = error_type(exc.details() or exc.code().name)
    error.status = exc.code()
    return error
