"""Several organizations' gateways in one process on loopback: for the demo, tests and benchmarks.

Each gateway is the real thing (mTLS federation listener, participant listener, policy, audit);
only the addresses are wired here, because every listener binds port 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from gateway.audit.store import AuditStore
from gateway.config import GatewayConfig, load_config
from gateway.server import Gateway


def write_gateway_config(
    directory: Path,
    org: str,
    *,
    cert: Path,
    key: Path,
    ca: Path,
    model: Path | None,
    rules: Path | None,
    peers: Iterable[str] = (),
    extra: str = "",
    require_tokens: bool = False,
) -> Path:
    """Write a fedgate.toml for `org` listening on loopback port 0; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[gateway]",
        f'org = "{org}"',
        'data_dir = "data"',
        "shutdown_grace_seconds = 5",
        "",
        "[federation]",
        'listen = "127.0.0.1:0"',
        f'cert = "{cert}"',
        f'key = "{key}"',
        f'ca = "{ca}"',
        "",
        "[participant]",
        'listen = "127.0.0.1:0"',
        f"require_tokens = {'true' if require_tokens else 'false'}",
        "",
    ]
    if model is not None and rules is not None:
        lines += ["[policy]", f'model = "{model}"', f'rules = "{rules}"', "watch = false", ""]
    for peer in peers:
        # The real port is wired in by LocalFederation.start once the peer has bound one.
        lines += [f"[peers.{peer}]", 'address = "127.0.0.1:1"', ""]
    path = directory / "fedgate.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


class LocalFederation:
    """Start, wire and stop several gateways in this event loop."""

    def __init__(
        self,
        configs: Iterable[GatewayConfig | Path],
        *,
        audits: dict[str, AuditStore] | None = None,
    ) -> None:
        loaded = [c if isinstance(c, GatewayConfig) else load_config(c) for c in configs]
        audits = audits or {}
        self.gateways = {c.org: Gateway(c, audit=audits.get(c.org)) for c in loaded}

    def __getitem__(self, org: str) -> Gateway:
        return self.gateways[org]

    async def start(self) -> LocalFederation:
        started: list[Gateway] = []
        try:
            for gateway in self.gateways.values():
                await gateway.start()
                started.append(gateway)
        except BaseException:
            for gateway in started:
                await gateway.stop(grace=0)
            raise
        for gateway in self.gateways.values():
            for name in gateway.peers.names:
                peer = self.gateways.get(name)
                if peer is not None and peer.ports is not None:
                    gateway.peers.set_address(name, f"127.0.0.1:{peer.ports.federation}")
        return self

    def participant(self, org: str) -> str:
        ports = self.gateways[org].ports
        assert ports is not None, "start the federation first"
        return f"127.0.0.1:{ports.participant}"

    def federation(self, org: str) -> str:
        ports = self.gateways[org].ports
        assert ports is not None, "start the federation first"
        return f"127.0.0.1:{ports.federation}"

    async def stop(self, grace: float = 0.0) -> None:
        for gateway in self.gateways.values():
            await gateway.stop(grace=grace)

    async def __aenter__(self) -> LocalFederation:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
