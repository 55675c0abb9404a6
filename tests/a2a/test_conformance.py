"""The A2A TCK (spec 1.0.0) at MUST level, over gRPC, JSON-RPC and HTTP+JSON, against the
gateway's A2A edge: (a) a local A2A agent through the edge, (b) a partner's A2A agent across a
real mTLS federation hop, the partner's policy sharing what the scenarios return.

The kit runs in its own virtual environment from a copy of ../shared/a2a-tck (shared/ is
read-only in CI), both targets at once (each run mostly waits out streams that rightly stay open:
about 2 to 3 minutes of wall time, little CPU). The bar is the official a2a-sdk's own server on
this kit: 188 passed, and no failure but the four that are the SDK's or the kit's (NOTES.md).

    FEDGATE_TEST_A2A_TCK=/path/to/a2a-tck    the kit (default: shared/a2a-tck above the repository)
    FEDGATE_TCK_PYTHON=/venv/bin/python  an interpreter with the kit installed (skip the install)
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.a2a.conftest import StartFederation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REFERENCE_PASSED = 188
# The official SDK's server fails these four too: the SDK's or the kit's (../shared/a2a-tck/NOTES.md).
REFERENCE_FAILURES = {
    "tests/compatibility/core_operations/test_transport_behavior.py::TestRestFormat::test_response_content_type",
    "tests/compatibility/grpc/test_status_codes.py::TestGrpcStatusCodes::test_push_not_supported_returns_unimplemented",
    "tests/compatibility/grpc/test_status_codes.py::TestGrpcStatusCodes::test_version_not_supported_returns_unimplemented",
    "tests/compatibility/jsonrpc/test_error_codes.py::TestJsonRpcErrorCodeMappings::test_content_type_not_supported_error",
}


def _kit() -> Path | None:
    configured = os.environ.get("FEDGATE_TEST_A2A_TCK")
    if configured:
        return Path(configured)
    for folder in Path(__file__).resolve().parents:
        candidate = folder / "shared" / "a2a-tck"
        if (candidate / "run_tck.py").is_file():
            return candidate
    return None


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("reports", "__pycache__"))
    for path in [target, *target.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return target


@pytest.fixture(scope="module")
def tck(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a copy of the kit, an interpreter that has it installed)."""
    source = _kit()
    if source is None:
        why = "the A2A TCK is not here: set FEDGATE_TEST_A2A_TCK to a copy of a2aproject/a2a-tck"
        if os.environ.get("FEDGATE_TEST_REQUIRE_TCK"):  # CI: conformance is not optional there
            pytest.fail(why)
        pytest.skip(why)
    root = tmp_path_factory.mktemp("a2a-tck")
    kit = _copy(source, root / "kit")
    configured = os.environ.get("FEDGATE_TCK_PYTHON")
    if configured:
        return kit, Path(configured)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", str(kit)],
        check=True,
    )
    return kit, python


@dataclass(frozen=True)
class Run:
    target: str
    passed: int
    failed: set[str]
    skipped: set[str]
    by_transport: str
    summary: str


async def _run_tck(kit: Path, python: Path, folder: Path, sut_host: str, target: str) -> Run:
    """One MUST-level run of the kit against `sut_host`, from its own copy of the kit."""
    copy = _copy(kit, folder)
    process = await asyncio.create_subprocess_exec(
        str(python),
        "run_tck.py",
        "--sut-host",
        sut_host,
        "--level",
        "must",
        cwd=copy,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    junit = copy / "reports" / "junitreport.xml"
    assert junit.is_file(), f"the TCK wrote no report for {target}:\n{text[-3000:]}"
    failed, skipped, passed = set(), set(), 0
    for case in ET.parse(junit).iter("testcase"):
        # classname: tests.compatibility.<folder>.<module>[.<Class>]
        parts = case.get("classname", "").split(".")
        nodeid = "::".join(["/".join(parts[:4]) + ".py", *parts[4:], case.get("name", "")])
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(nodeid)
        elif case.find("skipped") is not None:
            skipped.add(nodeid)
        else:
            passed += 1
    block = re.search(r"BY TRANSPORT:\n((?:\s+\S+:.*\n)+)", text)
    summary = re.findall(r"^(?:=+ )?(\d+ (?:failed|passed).* in [\d.]+s.*?)(?: =+)?$", text, re.M)
    return Run(
        target=target,
        passed=passed,
        failed=failed,
        skipped=skipped,
        by_transport=block.group(1) if block else "",
        summary=summary[-1] if summary else text[-500:],
    )


async def test_the_tck_passes_at_must_level_through_the_edge_and_a_federation_hop(
    start_a2a: StartFederation, tck: tuple[Path, Path], tmp_path: Path
) -> None:
    kit, python = tck
    fed = await start_a2a()
    runs = await asyncio.gather(
        _run_tck(kit, python, tmp_path / "local", fed.card_host("hospital"), "local agent"),
        _run_tck(kit, python, tmp_path / "federated", fed.card_host("insurer"), "partner's agent"),
    )
    report = "\n".join(f"{run.target}: {run.summary}\n{run.by_transport}" for run in runs)
    print(report)
    for run in runs:
        unexpected = run.failed - REFERENCE_FAILURES
        assert not unexpected, f"{run.target}: {sorted(unexpected)}\n{report}"
        assert run.passed >= REFERENCE_PASSED, (
            f"{run.target}: {run.passed} passed, the reference {REFERENCE_PASSED}\n{report}"
        )
