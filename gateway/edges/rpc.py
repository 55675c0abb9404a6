"""What every gRPC servicer of the gateway shares: error mapping, safe decoding, registration.

A servicer is thin: it turns protobuf messages into domain objects, calls the router, and maps
errors to statuses. The services themselves are in gateway.edges.federation (gateway to gateway)
and gateway.edges.participant (local agents and requesters).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from fedgate.v1 import fedgate_pb2 as pb

from gateway.config import GatewayConfig
from gateway.edges.wire import result_to_pb, spec_from_pb
from gateway.errors import ERROR_MARKER, FedgateError, InvalidArgument
from gateway.exchange.router import Router
from gateway.exchange.tasks import TaskResult, TaskSpec, TaskUpdate

log = logging.getLogger("fedgate.servicers")


async def abort(context: grpc.aio.ServicerContext, exc: FedgateError) -> None:
    context.set_trailing_metadata(((ERROR_MARKER, type(exc).__name__),))
    # gRPC carries the message in metadata (16 KiB at most): a message quoting unverified
    # input must never grow past that and turn a clear refusal into a broken stream.
    message = exc.message if len(exc.message) <= 2000 else exc.message[:2000] + "…"
    await context.abort(exc.status, message)


async def _fail(servicer: Any, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """The one place an error becomes a status: a FedgateError as the service shows it to its
    callers (`public_error`); anything else, logged with its traceback, as INTERNAL with a stable
    message and no marker (the caller treats it as a gateway that is not working)."""
    if isinstance(exc, FedgateError):
        await abort(context, servicer.public_error(exc))
        return
    log.error("%s failed", type(servicer).__name__, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, servicer.internal_error_message(exc))


def refused_spec(request: Any) -> TaskSpec:
    """What a refused request names (unverified, possibly undecodable), for its audit record."""
    return TaskSpec(
        task_id=getattr(request, "task_id", "") or "-",
        target_org=getattr(request, "target_org", ""),
        agent=getattr(request, "agent", ""),
        skill=getattr(request, "skill", ""),
        input={},
        requester=getattr(request, "requester", ""),
    )


async def result_of(updates: AsyncIterator[TaskUpdate]) -> pb.TaskResult:
    """Run a task to its end for a unary call: the result of its last (final) update."""
    last: TaskUpdate | None = None
    async for update in updates:
        last = update
    assert last is not None, "a task's updates end with a final one"
    return result_to_pb(last.result or TaskResult(last.task_id, last.state))


def maps_errors(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A unary handler's errors become its gRPC status and message (see `_fail`)."""

    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(self, context, exc)
            raise  # abort raises; this keeps type checkers honest

    return handler


def maps_stream_errors(
    method: Callable[..., AsyncIterator[Any]],
) -> Callable[..., AsyncIterator[Any]]:
    """A streaming handler's errors become its gRPC status and message (see `_fail`)."""

    @functools.wraps(method)
    async def handler(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        try:
            async for message in method(self, request, context):
                yield message
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(self, context, exc)

    return handler


class ServicerBase:
    def __init__(self, config: GatewayConfig, router: Router) -> None:
        self.config = config
        self.router = router

    def public_error(self, exc: FedgateError) -> FedgateError:
        """The error as this service's callers see it (the participant service: as it is)."""
        return exc

    def internal_error_message(self, exc: BaseException) -> str:
        return (
            f"the gateway of {self.router.org!r} failed while handling this call "
            f"({type(exc).__name__}): its log has the detail"
        )

    def _spec(self, request: pb.TaskRequest, context: grpc.aio.ServicerContext) -> TaskSpec:
        check_decoded(request)
        try:
            return spec_from_pb(
                request,
                default_deadline=self.config.gateway.default_deadline_seconds,
                max_deadline=self.config.gateway.max_deadline_seconds,
                time_remaining=context.time_remaining(),
            )
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"task input is not a valid JSON object: {exc}") from None


class Malformed:
    """A request whose bytes did not decode: it reaches the servicer, which answers clearly."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def check_decoded(request: object) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgument(request.reason)


def _safe_decoder(message_type: Any) -> Any:
    def decode(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as exc:  # DecodeError, RecursionError, invalid UTF-8, wrong wire types
            cause = str(exc).split("\n")[0][:200] or type(exc).__name__
            return Malformed(
                f"the {message_type.DESCRIPTOR.name} message could not be decoded ({cause}): "
                "check the field types and nesting (at most 33 levels in a Struct)"
            )

    return decode


def add_servicer(server: grpc.aio.Server, service_name: str, servicer: object) -> None:
    """Register a fedgate.v1 service with decoders that never fail: bad bytes become Malformed."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_safe_decoder(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
