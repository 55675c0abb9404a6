"""Fedgate participant SDK: register local agents with your gateway, call partners' agents.

It talks only to its own organization's gateway, and never imports the gateway package.
"""

from participant_sdk._agent import Agent, AgentWorker, serve
from participant_sdk._client import Client
from participant_sdk._errors import (
    Cancelled,
    DeadlineExceeded,
    FedgateError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SkillDefinitionError,
    TaskFailed,
    Unauthenticated,
    Unavailable,
)
from participant_sdk._patterns import (
    AllRoutesFailed,
    Answer,
    FallbackResult,
    FanOutFailed,
    FanOutResult,
    NoAgreement,
    Quorum,
    RetryPolicy,
    majority,
    quorum,
)
from participant_sdk._types import TaskContext, TaskError, TaskResult, TaskUpdate

__all__ = [
    "Agent",
    "AgentWorker",
    "AllRoutesFailed",
    "Answer",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FallbackResult",
    "FanOutFailed",
    "FanOutResult",
    "FedgateError",
    "InvalidArgument",
    "NoAgreement",
    "NotFound",
    "PermissionDenied",
    "Quorum",
    "ResourceExhausted",
    "RetryPolicy",
    "SkillDefinitionError",
    "TaskContext",
    "TaskError",
    "TaskFailed",
    "TaskResult",
    "TaskUpdate",
    "Unauthenticated",
    "Unavailable",
    "majority",
    "quorum",
    "serve",
]
