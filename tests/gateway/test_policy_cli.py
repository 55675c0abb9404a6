"""`fedgate policy check | explain | test`, including their failure paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gateway.cli import main
from gateway.identity.certs import create_ca, issue_gateway_cert, write_pair

POLICIES = Path(__file__).resolve().parents[2] / "policies"

SUMMARY = {
    "patient": {
        "name": "Ada Lovelace",
        "date_of_birth": "1984-05-17",
        "ssn": "123-45-6789",
        "address": {"street": "1 Main St", "city": "Springfield", "zip": "12345"},
        "insurance_id": "INS-99812",
    },
    "diagnoses": [{"code": "J45.909", "description": "Asthma", "date": "2024-02-03"}],
    "treatment_cost": 1830.5,
    "notes": "call back",
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hospital gateway folder: fedgate.toml, certificates and a copy of the demo policies."""
    ca = create_ca()
    write_pair(ca, tmp_path / "certs" / "ca.crt", tmp_path / "certs" / "ca.key")
    write_pair(
        issue_gateway_cert(ca, "hospital"),
        tmp_path / "certs" / "hospital.crt",
        tmp_path / "certs" / "hospital.key",
    )
    shutil.copytree(POLICIES, tmp_path / "policies", ignore=shutil.ignore_patterns("README.md"))
    (tmp_path / "fedgate.toml").write_text(
        '[gateway]\norg = "hospital"\n\n'
        '[federation]\ncert = "certs/hospital.crt"\nkey = "certs/hospital.key"\n'
        'ca = "certs/ca.crt"\n\n'
        '[peers.insurer]\naddress = "127.0.0.1:7444"\n\n'
        '[policy]\nmodel = "policies/model.conf"\nrules = "policies/hospital.csv"\n'
        'tests = "policies/tests"\n'
    )
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDGATE_CONFIG", raising=False)
    return tmp_path


def run(*args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, ["policy", *args], catch_exceptions=False)


def test_check_accepts_the_demo_policy(workdir: Path) -> None:
    result = run("check")
    assert result.exit_code == 0, result.output
    assert "policy ok" in result.output and "0 errors" in result.output


def test_check_lists_every_error_with_file_and_line(workdir: Path) -> None:
    rules = workdir / "policies" / "hospital.csv"
    rules.write_text(
        rules.read_text() + "p, insurer, records, summary, share, x, maskk\np, insurer, records\n"
    )
    lines = len(rules.read_text().splitlines())
    result = run("check")
    assert result.exit_code == 1
    assert f"policies/hospital.csv:{lines - 1}: unknown effect 'maskk'" in result.output
    assert f"policies/hospital.csv:{lines}: expected 6 or 7 fields" in result.output
    assert "policy refused" in result.output


def test_check_warns_about_unknown_peers_but_passes(workdir: Path) -> None:
    rules = workdir / "policies" / "hospital.csv"
    rules.write_text(rules.read_text() + "p, pharmacy, records, summary, invoke, *, allow\n")
    result = run("check")
    assert result.exit_code == 0, result.output
    assert "rule names peer 'pharmacy' which is not a peer of this gateway" in result.output


def test_check_refuses_a_missing_rules_file(workdir: Path) -> None:
    (workdir / "policies" / "hospital.csv").unlink()
    result = run("check")
    assert result.exit_code == 2  # config validation: the file must exist
    assert "policy.rules: file not found" in result.output


def test_check_without_a_policy_section(workdir: Path) -> None:
    config = workdir / "fedgate.toml"
    config.write_text(config.read_text().split("[policy]")[0])
    result = run("check")
    assert result.exit_code == 2
    assert "no [policy] section" in result.output


def test_explain_prints_each_field_and_the_output(workdir: Path) -> None:
    result = run(
        "explain",
        "--peer",
        "insurer",
        "--agent",
        "records",
        "--skill",
        "summary",
        "--direction",
        "share",
        "--payload",
        "summary.json",
    )
    assert result.exit_code == 0, result.output
    for expected in (
        "patient.ssn",
        "masked",
        "*******6789",
        "patient.name",
        "withheld",
        "hospital.csv:20",
        "diagnoses[0].description",
        "default deny",
        '"city": "Springfield"',
    ):
        assert expected in result.output
    assert "Ada Lovelace" not in result.output


def test_explain_json(workdir: Path) -> None:
    result = run(
        "explain",
        "--peer",
        "insurer",
        "--agent",
        "records",
        "--skill",
        "summary",
        "--payload",
        "summary.json",
        "--claim",
        "purpose=treatment",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["output"]["diagnoses"] == [
        {"code": "J45.909", "description": "Asthma", "date": "2024"}
    ]
    actions = {d["path"]: d["action"] for d in report["decisions"]}
    assert actions["patient.insurance_id"] == "pseudonymized"
    assert "patient.name" in report["withheld"]
    assert report["policy_version"].startswith("sha256:")


def test_explain_invoke(workdir: Path) -> None:
    result = run(
        "explain",
        "--peer",
        "insurer",
        "--agent",
        "triage",
        "--skill",
        "assess",
        "--direction",
        "invoke",
    )
    assert result.exit_code == 0
    assert "denied" in result.output and "hospital.csv:13" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--payload", "bad.json"], "bad.json:1: not valid JSON"),
        (["--payload", "missing.json"], "missing.json: cannot read the payload"),
        (["--payload", "list.json"], "a payload is a JSON object"),
        (["--payload", "summary.json", "--claim", "purpose"], "--claim 'purpose': use NAME=VALUE"),
        ([], "--payload is required"),
    ],
)
def test_explain_failures(workdir: Path, args: list[str], message: str) -> None:
    (workdir / "bad.json").write_text("{nope")
    (workdir / "list.json").write_text("[1]")
    result = run("explain", "--peer", "insurer", "--agent", "records", "--skill", "summary", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1  # one line: cause and fix


def test_explain_refuses_a_broken_policy(workdir: Path) -> None:
    rules = workdir / "policies" / "hospital.csv"
    rules.write_text("p, insurer, records, summary, share, x, maskk\n")
    result = run(
        "explain",
        "--peer",
        "insurer",
        "--agent",
        "records",
        "--skill",
        "summary",
        "--payload",
        "summary.json",
    )
    assert result.exit_code == 2
    assert "policies/hospital.csv:1: unknown effect 'maskk'" in result.output


def test_test_runs_the_configured_cases(workdir: Path) -> None:
    result = run("test")
    assert result.exit_code == 0, result.output
    assert "11 passed, 0 failed" in result.output


def test_test_reports_a_failure_with_a_diff(workdir: Path) -> None:
    case = workdir / "case.toml"
    case.write_text(
        'rules = "policies/hospital.csv"\nmodel = "policies/model.conf"\n'
        '[[case]]\nname = "ssn in the clear"\npeer = "insurer"\nagent = "records"\n'
        'skill = "summary"\ndirection = "share"\n'
        'payload = { patient = { ssn = "123-45-6789" } }\n'
        'expect = { patient = { ssn = "123-45-6789" } }\n'
        '[[case]]\nname = "invoke"\npeer = "insurer"\nagent = "records"\nskill = "summary"\n'
        'direction = "invoke"\nallowed = false\n'
    )
    result = run("test", "case.toml")
    assert result.exit_code == 1
    assert "FAIL case.toml: ssn in the clear" in result.output
    assert '-    "ssn": "123-45-6789"' in result.output
    assert '+    "ssn": "*******6789"' in result.output
    assert "expected allowed=False, got True" in result.output
    assert "0 passed, 2 failed" in result.output


def test_test_reports_a_broken_policy(workdir: Path) -> None:
    (workdir / "policies" / "hospital.csv").write_text("p, insurer, a, s, share, x, maskk\n")
    result = run("test", "policies/tests/hospital.toml")
    assert result.exit_code == 1
    assert "hospital.csv:1: unknown effect 'maskk'" in result.output


def test_test_with_a_missing_path(workdir: Path) -> None:
    result = run("test", "nowhere")
    assert result.exit_code == 2
    assert "nowhere: no such test file or folder" in result.output
