"""Fedgate's errors: one tree, one base class, one gRPC status per kind.

    FedgateError                      -> INTERNAL (never raised directly)
    ├── ConfigError                   -> (command line only: one line, exit 2)
    ├── InvalidArgument               -> INVALID_ARGUMENT   malformed target, bad payload
    │   └── PayloadLimitExceeded      -> INVALID_ARGUMENT   deeper or larger than the limits
    ├── Unauthenticated               -> UNAUTHENTICATED    no or unusable credential
    ├── PermissionDenied              -> PERMISSION_DENIED  unknown peer, denied invoke
    ├── NotFound                      -> NOT_FOUND          unknown organization or agent
    ├── ResourceExhausted             -> RESOURCE_EXHAUSTED rate or concurrency limit
    ├── Unavailable                   -> UNAVAILABLE        peer unreachable, no agent instance
    │   ├── PeerUnreachable           -> UNAVAILABLE        a partner's gateway does not answer
    │   └── AuditUnavailable          -> UNAVAILABLE        audit store cannot be written
    ├── DeadlineExceeded              -> DEADLINE_EXCEEDED  the task's deadline passed
    ├── Cancelled                     -> CANCELLED          the requester cancelled
    └── PolicyError                   -> FAILED_PRECONDITION invalid policy (file and line)

A message names the cause and, where there is one, the fix.
"""

from __future__ import annotations

import grpc

# Trailing metadata key a gateway sets on every refusal it sends: a calling gateway can tell
# "the peer answered UNAVAILABLE" from a transport failure that counts against its circuit.
ERROR_MARKER = "fedgate-error"


class FedgateError(Exception):
    """Base of every error the gateway raises on purpose."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(FedgateError):
    """A configuration file or value is wrong; names the file, the key and the problem."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(FedgateError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class PayloadLimitExceeded(InvalidArgument):
    """A payload is nested deeper or has more fields than the gateway evaluates."""


class Unauthenticated(FedgateError):
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FedgateError):
    status = grpc.StatusCode.PERMISSION_DENIED


class NotFound(FedgateError):
    status = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(FedgateError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FedgateError):
    status = grpc.StatusCode.UNAVAILABLE


class PeerUnreachable(Unavailable):
    """A partner's gateway did not answer at the transport level (counts against its circuit)."""


class AuditUnavailable(Unavailable):
    """The audit store cannot be written: the gateway fails closed until it can."""


class DeadlineExceeded(FedgateError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(FedgateError):
    status = grpc.StatusCode.CANCELLED


class PolicyError(FedgateError):
    """A policy file is invalid; the message names the file and the line."""

    status = grpc.StatusCode.FAILED_PRECONDITION
