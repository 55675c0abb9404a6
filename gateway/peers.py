"""Partner organizations: the configured peers and this gateway's outbound channels to them.

A channel to peer `org` verifies the server certificate as `org.fedgate` against the federation
CA, so only that organization's gateway can answer. Channels are rebuilt when our own TLS
material is rotated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.certs import org_dns_name
from gateway.config import PeerSection
from gateway.errors import NotFound
from gateway.tls import ReloadingTls

log = logging.getLogger("fedgate.peers")


@dataclass
class _Channel:
    channel: grpc.aio.Channel
    stub: pb_grpc.FederationStub
    stamp: tuple[float, ...]


class PeerRegistry:
    """Configured peers and lazily opened, reusable federation channels to them."""

    def __init__(
        self,
        org: str,
        peers: Mapping[str, PeerSection],
        tls: ReloadingTls,
        *,
        max_message_bytes: int,
    ) -> None:
        self.org = org
        self._peers = dict(peers)
        self._tls = tls
        self._max_message_bytes = max_message_bytes
        self._channels: dict[str, _Channel] = {}
        self._retired: list[grpc.aio.Channel] = []

    def __contains__(self, org: str) -> bool:
        return org in self._peers

    @property
    def names(self) -> list[str]:
        return sorted(self._peers)

    def address(self, org: str) -> str:
        return self._require(org).address

    def set_address(self, org: str, address: str) -> None:
        """Point a configured peer at a new address (used when peers bind port 0 in one process)."""
        self._peers[org] = PeerSection(address=address)
        self._channels.pop(org, None)

    def _require(self, org: str) -> PeerSection:
        peer = self._peers.get(org)
        if peer is None:
            raise NotFound(
                f"organization {org!r} is not a peer of {self.org!r}: add it under "
                f"[peers.{org}] in fedgate.toml"
            )
        return peer

    def stub(self, org: str) -> pb_grpc.FederationStub:
        """The federation stub for `org`, on a channel made with our current TLS material."""
        peer = self._require(org)
        material = self._tls.material
        current = self._channels.get(org)
        if current is not None and current.stamp == material.stamp:
            return current.stub
        if current is not None:
            # Keep the old channel open for the calls still using it; closed at shutdown.
            self._retired.append(current.channel)
        options = [
            ("grpc.ssl_target_name_override", org_dns_name(org)),
            ("grpc.max_send_message_length", self._max_message_bytes),
            ("grpc.max_receive_message_length", self._max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.enable_retries", 0),
        ]
        channel = grpc.aio.secure_channel(peer.address, self._tls.channel_credentials(), options)
        entry = _Channel(channel, pb_grpc.FederationStub(channel), material.stamp)
        self._channels[org] = entry
        return entry.stub

    async def close(self) -> None:
        channels = [c.channel for c in self._channels.values()] + self._retired
        self._channels.clear()
        self._retired.clear()
        for channel in channels:
            await channel.close()
