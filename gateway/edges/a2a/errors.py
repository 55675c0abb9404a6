"""The one mapping from the gateway's error tree onto A2A errors (docs/a2a.md §4).

    FedgateError (gateway/errors.py)   A2A error (reason)          gRPC / HTTP / JSON-RPC
    ├── InvalidArgument                InvalidParamsError          INVALID_ARGUMENT 400 -32602
    ├── NotFound                       GatewayNotFound             NOT_FOUND        404 -32040
    ├── Unauthenticated                GatewayUnauthenticated      UNAUTHENTICATED  401 -32041
    ├── PermissionDenied               GatewayPermissionDenied     PERMISSION_DENIED 403 -32042
    ├── ResourceExhausted              GatewayResourceExhausted    RESOURCE_EXHAUSTED 429 -32043
    ├── Unavailable (and below)        GatewayUnavailable          UNAVAILABLE      503 -32044
    ├── DeadlineExceeded               GatewayDeadlineExceeded     DEADLINE_EXCEEDED 504 -32045
    └── anything else                  InternalError               INTERNAL         500 -32603

A2A itself has no words for the gateway's refusals (authentication, authorization, limits,
availability), so they are A2AError subclasses of our own, each with its `google.rpc.ErrorInfo`
reason, registered once with the SDK's tables (`register_with_sdk`) so that its JSON-RPC and
HTTP+JSON bindings render them like the SDK's own errors; the gRPC binding renders them in
`GatewayGrpcHandler.abort_context`. The A2A-specific errors (TASK_NOT_FOUND, ...) stay the SDK's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import grpc
from a2a.server.jsonrpc_models import JSONRPCError
from a2a.server.request_handlers import GrpcHandler, response_helpers
from a2a.utils import errors as sdk_errors
from a2a.utils.errors import (
    A2A_ERROR_REASONS,
    A2AError,
    ErrorMapping,
    InternalError,
    InvalidParamsError,
    PushNotificationNotSupportedError,
    UnsupportedOperationError,
    VersionNotSupportedError,
)
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from gateway import errors as gw

A2A_DOMAIN = "a2a-protocol.org"
# gRPC carries the message in metadata (16 KiB at most): keep messages well below.
_MAX_MESSAGE = 2000


class GatewayError(A2AError):
    """A gateway refusal in A2A terms; subclasses fix the reason and the three codes."""

    reason: ClassVar[str] = "INTERNAL_ERROR"
    grpc_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500
    jsonrpc_code: ClassVar[int] = -32603


class GatewayNotFound(GatewayError):
    message = "Not found"
    reason = "NOT_FOUND"
    grpc_status = grpc.StatusCode.NOT_FOUND
    http_status = 404
    jsonrpc_code = -32040


class GatewayUnauthenticated(GatewayError):
    message = "Unauthenticated"
    reason = "UNAUTHENTICATED"
    grpc_status = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    jsonrpc_code = -32041


class GatewayPermissionDenied(GatewayError):
    message = "Permission denied"
    reason = "PERMISSION_DENIED"
    grpc_status = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    jsonrpc_code = -32042


class GatewayResourceExhausted(GatewayError):
    message = "Resource exhausted"
    reason = "RESOURCE_EXHAUSTED"
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    jsonrpc_code = -32043


class GatewayUnavailable(GatewayError):
    message = "Unavailable"
    reason = "UNAVAILABLE"
    grpc_status = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    jsonrpc_code = -32044


class GatewayDeadlineExceeded(GatewayError):
    message = "Deadline exceeded"
    reason = "DEADLINE_EXCEEDED"
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    jsonrpc_code = -32045


GATEWAY_ERRORS: tuple[type[GatewayError], ...] = (
    GatewayNotFound,
    GatewayUnauthenticated,
    GatewayPermissionDenied,
    GatewayResourceExhausted,
    GatewayUnavailable,
    GatewayDeadlineExceeded,
)


# Most specific first: the first class the error is an instance of decides.
_FROM_FEDGATE: tuple[tuple[type[gw.FedgateError], type[A2AError]], ...] = (
    (gw.InvalidArgument, InvalidParamsError),
    (gw.NotFound, GatewayNotFound),
    (gw.Unauthenticated, GatewayUnauthenticated),
    (gw.PermissionDenied, GatewayPermissionDenied),
    (gw.ResourceExhausted, GatewayResourceExhausted),
    (gw.Unavailable, GatewayUnavailable),
    (gw.DeadlineExceeded, GatewayDeadlineExceeded),
)


def bounded(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + "…"


def to_a2a(exc: gw.FedgateError) -> A2AError:
    """The A2A error for a gateway error, with the gateway's message (cause and fix)."""
    for kind, a2a_kind in _FROM_FEDGATE:
        if isinstance(exc, kind):
            return a2a_kind(bounded(exc.message))
    return InternalError(bounded(exc.message))


def register_with_sdk() -> None:
    """Teach the SDK's JSON-RPC and HTTP+JSON error rendering (and its clients' reason lookup)
    the gateway's errors; idempotent."""
    for kind in GATEWAY_ERRORS:
        sdk_errors.A2A_ERROR_MAPPING[kind] = ErrorMapping(
            kind.http_status, kind.grpc_status.name, kind.reason
        )
        sdk_errors.A2A_ERROR_REASONS[kind] = kind.reason
        sdk_errors.A2A_REASON_TO_ERROR.setdefault(kind.reason, kind)
        sdk_errors.JSON_RPC_ERROR_CODE_MAP[kind] = kind.jsonrpc_code
        response_helpers.EXCEPTION_MAP[kind] = JSONRPCError


# The A2A spec's gRPC codes (specification §5.4) where the SDK's table differs from them.
_SPEC_GRPC_STATUS: dict[type[A2AError], grpc.StatusCode] = {
    PushNotificationNotSupportedError: grpc.StatusCode.UNIMPLEMENTED,
    UnsupportedOperationError: grpc.StatusCode.UNIMPLEMENTED,
    VersionNotSupportedError: grpc.StatusCode.UNIMPLEMENTED,
}


class GatewayGrpcHandler(GrpcHandler):
    """The SDK's gRPC servicer, rendering the gateway's errors, and the A2A errors whose gRPC
    code the SDK's table gets wrong, as the spec says: a rich status with its ErrorInfo."""

    async def abort_context(self, error: A2AError, context: grpc.aio.ServicerContext) -> None:
        if isinstance(error, GatewayError):
            code, reason = error.grpc_status, error.reason
        elif type(error) in _SPEC_GRPC_STATUS:
            code, reason = _SPEC_GRPC_STATUS[type(error)], A2A_ERROR_REASONS[type(error)]
        else:
            await super().abort_context(error, context)
            return
        message = bounded(error.message)
        status = status_pb2.Status(code=code.value[0], message=message)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=A2A_DOMAIN))
        status.details.append(detail)
        context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
        await context.abort(code, message)


def describe(error: Any) -> str:
    """A short text for an error an A2A agent answered with (kept in our own records only)."""
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    return bounded(f"{type(error).__name__}: {message}")
