from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.local import LocalFederation
from tests.conftest import Pki
from tests.integration.federation import configs


@pytest.fixture
async def fed(tmp_path: Path, pki: Pki) -> AsyncIterator[LocalFederation]:
    federation = LocalFederation(configs(tmp_path, pki))
    await federation.start()
    try:
        yield federation
    finally:
        await federation.stop()
