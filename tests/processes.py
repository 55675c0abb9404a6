"""Real `fedgate serve` processes for tests: start one and wait until it serves."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Pki
from tests.integration.federation import org_config

READY = re.compile(r"federation on port (\d+) \(mTLS\), participants on port (\d+)")
_DRAINS: set[asyncio.Future[None]] = set()


async def spawn_gateway(
    config: Path,
    *,
    drain: bool = True,
    on_line: Callable[[str], None] | None = None,
    cwd: Path | None = None,
    ready_within: float = 30.0,
) -> tuple[asyncio.subprocess.Process, int, int]:
    """Start `fedgate serve --config CONFIG`; returns the process and its bound ports.

    With drain=True its stderr is read to the end in the background (passed to `on_line`), so
    the process never blocks on a full pipe; with drain=False the caller reads it.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        cwd=cwd,
    )
    assert process.stderr is not None
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), ready_within)).decode()
        assert line, f"fedgate serve exited before it was ready ({config})"
        if on_line is not None:
            on_line(line.rstrip())
        match = READY.search(line)
        if match:
            break
    if drain:
        _DRAINS.add(asyncio.ensure_future(_drain(process.stderr, on_line)))
    return process, int(match.group(1)), int(match.group(2))


async def _drain(stream: asyncio.StreamReader, on_line: Callable[[str], None] | None) -> None:
    with contextlib.suppress(Exception):
        while line := await stream.readline():
            if on_line is not None:
                on_line(line.decode(errors="replace").rstrip())


def free_port() -> int:
    """A loopback port nobody listens on now (for processes that must restart on the same one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fixed_port_config(
    tmp: Path, pki: Pki, org: str, peer: str, ports: dict[str, tuple[int, int]], rules: str
) -> Path:
    """A fedgate.toml for `org` on fixed (federation, participant) ports, peered with `peer`."""
    path = org_config(tmp, pki, org, rules, [peer])
    fed_port, part_port = ports[org]
    text = path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{fed_port}"', 1)
    text = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{part_port}"', 1)
    text = text.replace('address = "127.0.0.1:1"', f'address = "127.0.0.1:{ports[peer][0]}"')
    path.write_text(text)
    return path
