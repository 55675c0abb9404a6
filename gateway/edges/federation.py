"""The federation service: gateway to gateway, over mutual TLS.

The caller is the organization its certificate names, nothing else (guarantee 1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.config import GatewayConfig
from gateway.edges.rpc import (
    ServicerBase,
    check_decoded,
    maps_errors,
    maps_stream_errors,
    refused_spec,
    result_of,
)
from gateway.edges.wire import (
    card_to_pb,
    checkpoint_from_pb,
    checkpoint_to_pb,
    result_to_pb,
    state_to_pb,
    update_to_pb,
)
from gateway.errors import FedgateError, InvalidArgument, PermissionDenied, Unauthenticated
from gateway.exchange.limits import PeerLimiter
from gateway.exchange.router import Router
from gateway.exchange.tasks import TaskSpec
from gateway.identity.delegation import DelegationVerifier
from gateway.identity.tls import ReloadingTls, peer_identity

log = logging.getLogger("fedgate.servicers")


class FederationServicer(ServicerBase, pb_grpc.FederationServicer):
    """Gateway to gateway. The caller is the organization its certificate names, nothing else."""

    def __init__(
        self,
        config: GatewayConfig,
        router: Router,
        tls: ReloadingTls,
        limiter: PeerLimiter,
        delegations: DelegationVerifier,
    ) -> None:
        super().__init__(config, router)
        self.tls = tls
        self.limiter = limiter
        self.delegations = delegations

    async def _admit(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> tuple[str, TaskSpec, Any, Any]:
        """Identity, limits, request shape and the delegation statement of an inbound task.

        Returns the peer, the task, the permit (release it when the task ends) and the claims.
        """
        org = await self._peer(context, request)
        started = time.monotonic()
        spec = refused_spec(request)
        try:
            check_decoded(request)
            permit = self.limiter.acquire(org)
        except FedgateError as exc:
            await self.router.audit_rejection(spec, org, exc, started=started)
            raise
        try:
            if not request.task_id:
                raise InvalidArgument("a task from a peer gateway must carry its task id")
            if not request.delegation:
                raise Unauthenticated(
                    "the task carries no delegation statement of who asked: the sending gateway "
                    "must sign one (Fedgate 0.1 and later do)"
                )
            delegation = self.delegations.verify(
                request.delegation, peer_org=org, task_id=request.task_id
            )
            spec = self._spec(request, context)
        except FedgateError as exc:
            permit.release()
            await self.router.audit_rejection(spec, org, exc, started=started)
            raise
        # Who asked is what the signed statement says, not the request body.
        spec = replace(
            spec, requester=delegation.subject, purpose=delegation.purpose, roles=delegation.roles
        )
        return org, spec, permit, delegation.claims()

    async def _peer(self, context: grpc.aio.ServicerContext, request: Any = None) -> str:
        try:
            org = peer_identity(context, self.tls.material.revoked_serials)
        except FedgateError as exc:
            # A revoked or inconsistent certificate: refused, and recorded (the organization it
            # names is in the message; it is not proven, so the record's peer is "-").
            await self.router.audit_rejection(
                refused_spec(None), "-", exc, started=time.monotonic()
            )
            raise
        if org not in self.router.peers:
            error = PermissionDenied(
                f"organization {org!r} is not a peer of {self.router.org!r}: the operator must add "
                f"it under [peers.{org}] in fedgate.toml"
            )
            await self.router.audit_rejection(
                refused_spec(request), org, error, started=time.monotonic()
            )
            raise error
        claimed = getattr(request, "sender_org", "")
        if claimed and claimed != org:
            log.warning(
                "a request from %s claimed sender %r in its body; ignored", org, claimed[:64]
            )
        return org

    @maps_errors
    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        org = await self._peer(context)
        return pb.ListAgentsResponse(
            agents=[card_to_pb(c) for c in self.router.cards_for_peer(org)]
        )

    @maps_stream_errors
    async def StreamTask(
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TaskUpdate]:
        org, spec, permit, claims = await self._admit(request, context)
        with permit:
            async for update in self.router.serve_peer(spec, org, claims):
                yield update_to_pb(update)

    @maps_errors
    async def SubmitTask(
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskResult:
        org, spec, permit, claims = await self._admit(request, context)
        with permit:
            return await result_of(self.router.serve_peer(spec, org, claims))

    @maps_errors
    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelTaskResponse:
        org = await self._peer(context)
        check_decoded(request)
        state = await self.router.cancel(request.task_id, request.reason, origin_org=org)
        return pb.CancelTaskResponse(state=state_to_pb(state))

    @maps_errors
    async def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskResult:
        org = await self._peer(context)
        check_decoded(request)
        return result_to_pb(await self.router.get_for_peer(request.task_id, org))

    @maps_errors
    async def ExchangeCheckpoint(
        self, request: pb.SignedCheckpoint, context: grpc.aio.ServicerContext
    ) -> pb.SignedCheckpoint:
        org = await self._peer(context)
        check_decoded(request)
        theirs = checkpoint_from_pb(request)
        if theirs.org != org:
            raise PermissionDenied(
                f"checkpoint names organization {theirs.org!r} but the caller is {org!r}"
            )
        await self.router.audit.store_peer_checkpoint(theirs)
        ours = await self.router.audit.checkpoint(self.router.signer)
        return checkpoint_to_pb(ours)
