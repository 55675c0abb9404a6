"""The gRPC edge, by service: gateway.edges.federation, gateway.edges.participant, and what both
share in gateway.edges.rpc. This module keeps the names importable from one place."""

from __future__ import annotations

from gateway.edges.federation import FederationServicer
from gateway.edges.participant import ParticipantServicer
from gateway.edges.rpc import Malformed, add_servicer
from gateway.exchange.tasks import TaskState

__all__ = ["FederationServicer", "Malformed", "ParticipantServicer", "TaskState", "add_servicer"]
