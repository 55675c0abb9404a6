"""TLS on the participant listener: the SDK and the operator commands connect with it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from gateway.local import LocalFederation
from participant_sdk import AgentWorker, Client, RetryPolicy, Unavailable
from tests.conftest import Pki
from tests.integration.federation import configs, echo_agent


def _with_participant_tls(config: Path, pki: Pki) -> None:
    config.write_text(
        config.read_text().replace(
            "[participant]\n",
            f'[participant]\ncert = "{pki.cert("hospital")}"\nkey = "{pki.key("hospital")}"\n',
        )
    )


@contextlib.asynccontextmanager
async def _echo_over_tls(address: str, ca: Path) -> AsyncIterator[AgentWorker]:
    worker = AgentWorker([echo_agent()], address, tls_ca=ca, max_backoff=0.2)
    task = asyncio.ensure_future(worker.run())
    try:
        await asyncio.wait_for(worker.connected.wait(), 10)
        yield worker
    finally:
        worker.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task


async def test_sdk_and_cli_connect_with_tls_and_plaintext_is_refused(
    tmp_path: Path, pki: Pki
) -> None:
    paths = configs(tmp_path, pki)
    _with_participant_tls(paths[0], pki)
    async with LocalFederation(paths) as fed:
        address = fed.participant("hospital")
        # The worker gets the CA as a path, the client as PEM bytes.
        async with (
            _echo_over_tls(address, pki.ca),
            Client(address, tls_ca=pki.ca.read_bytes()) as client,
        ):
            result = await client.call("hospital/echo.say", {"x": 1}, timeout=10)
            assert result.output["echo"] == {"x": 1}
            # The operator command reads the config and connects with TLS as well.
            listed = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "gateway.cli", "agents", "--json"),
                *("--config", str(paths[0]), "--address", address),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(listed.communicate(), 30)
            assert listed.returncode == 0, err.decode()
            assert [a["agent"] for a in json.loads(out)] == ["echo"]
        async with Client(address, retry=RetryPolicy(max_attempts=1)) as plaintext:
            with pytest.raises(Unavailable):
                await plaintext.call("hospital/echo.say", {"x": 1}, timeout=3)
