"""Fixtures: an A2A agent behind the hospital's gateway, the insurer's gateway its partner."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.a2a.federation import A2AFederation, a2a_federation
from tests.conftest import Pki

StartFederation = Callable[..., Awaitable[A2AFederation]]


@pytest.fixture
async def start_a2a(tmp_path: Path, pki: Pki) -> AsyncIterator[StartFederation]:
    """Start the agent and both gateways with the given options; all stop at the test's end."""
    counter = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def start(**options: Any) -> A2AFederation:
            root = tmp_path / f"federation-{next(counter)}"
            return await stack.enter_async_context(a2a_federation(root, pki.root, **options))

        yield start
