"""`fedgate demo` runs end to end and checks what it shows (receipts, no leak, verified chains)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_exits_zero_and_reports_ok() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("fedgate demo: ok")


@pytest.mark.slow
def test_demo_output_shows_the_story() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for expected in (
        "*******6789",
        "pseudonymized",
        "withheld",
        "provenance: lab",
        "decision: approved = True",
        "chain intact",
        "demo complete",
    ):
        assert expected in out, expected
    # Withheld values appear only in the "inside the organization" column: the street in the
    # patient record, the insurance id in the record and in the claim.
    for secret, tables in (("12 Analytical Row", 1), ("INS-99887766", 2)):
        assert out.count(secret) == tables, secret


def _source_tree(destination: Path) -> Path:
    """The repository's files as a fresh clone would have them (tracked, plus new untracked)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.mark.slow
def test_demo_runs_from_a_wheel_installed_outside_the_repository(tmp_path: Path) -> None:
    """`pip install .` (not editable), then `fedgate demo` from another folder.

    The sdist is built from a copy of the tree and the wheel from the sdist, as `python -m
    build` does, so a file the sdist forgets fails here. The wheel goes into a new venv; its
    dependencies come from this environment (a .pth to its site-packages, whose editable
    install of Fedgate is not loaded from there).
    """
    source = _source_tree(tmp_path / "source")
    subprocess.run(
        [sys.executable, "-c", "from setuptools import build_meta as b; b.build_sdist('dist')"],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (sdist,) = (source / "dist").glob("fedgate-*.tar.gz")
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
            *("--wheel-dir", str(wheels), str(sdist)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("fedgate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "gateway/resources/demo_policies/hospital.csv" in names
    assert not [n for n in names if n.endswith(".key")], "no private key ships in the wheel"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "-q"),
            *("--no-deps", "--no-index", str(wheel)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "zz-fedgate-test-dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [str(python), "-c", "import gateway; print(gateway.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), f"gateway imported from {where}, not the installed copy"
    result = subprocess.run(
        [str(venv / "bin" / "fedgate"), "demo", "--quiet"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("fedgate demo: ok")
