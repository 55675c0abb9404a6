"""`fedgate policy check | explain | test`, including their failure paths."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path
from typing import Any

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
    assert report["provenance"] == {"allowed": False, "rule": None}


def test_explain_shows_what_leaves_about_paths_and_provenance(workdir: Path) -> None:
    (workdir / "lab.json").write_text(
        json.dumps({"lab": {"test": "hba1c", "result": 6.1, "by_ssn": {"078-05-1120": 1}}})
    )
    result = run(
        "explain", "--peer", "insurer", "--agent", "records", "--skill", "lab_summary",
        "--payload", "lab.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "paths that leave with it (withheld, transformed): lab.*" in result.output
    assert "receipts of sub-tasks (@provenance): leave; rule: policies/hospital.csv:" in (
        result.output
    )


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
    assert "13 passed, 0 failed" in result.output


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


def test_check_warns_about_a_rule_a_broader_allow_makes_dead(workdir: Path) -> None:
    """Issue 12: `policy check` said nothing about a `**.x, deny` that a broader allow makes
    dead, nor about a rule that can never decide."""
    rules = workdir / "policies" / "hospital.csv"
    rules.write_text(
        "p, insurer, records, summary, share, patient, allow\n"
        "p, *, *, *, share, **.hiv_status, deny\n"
        "p, *, records, summary, share, notes, allow\n"
        "p, insurer, records, summary, share, notes, allow\n"
    )
    result = run("check")
    assert result.exit_code == 0, result.output  # warnings do not refuse a policy
    assert (
        "policies/hospital.csv:2: `**.hiv_status, deny` does not decide where a broader, less "
        "strict rule covers the field first: patient.hiv_status (line 1, `patient, allow`: "
        "allowed), notes.hiv_status (line 3, `notes, allow`: allowed); to have such a field "
        "withheld, add a rule for it itself (e.g. `patient.hiv_status, deny`)"
    ) in result.output
    assert (
        "policies/hospital.csv:4: rule never decides: line 3 (`notes, allow`) decides first "
        "wherever it applies, with the same effect, so this line is redundant"
    ) in result.output
    assert "policy ok: 4 rules, 0 errors, 2 warnings" in result.output
    rules.write_text(rules.read_text() + "p, *, *, *, share, patient.hiv_status, deny\n")
    after = run("check")
    assert "patient.hiv_status (line" not in after.output


def test_test_without_configured_tests_says_how_to_add_one(workdir: Path) -> None:
    """Issue 12: `fedgate init` writes no tests folder, and `policy test` exited 2."""
    config = workdir / "fedgate.toml"
    config.write_text(config.read_text().replace('tests = "policies/tests"\n', ""))
    result = run("test")
    assert result.exit_code == 0, result.output
    assert "no policy tests: none are configured" in result.output
    assert "policies/tests/NAME.toml" in result.output


def test_test_with_an_empty_tests_folder(workdir: Path) -> None:
    shutil.rmtree(workdir / "policies" / "tests")
    (workdir / "policies" / "tests").mkdir()
    result = run("test")
    assert result.exit_code == 0, result.output
    assert "no policy tests in" in result.output and "[[case]]" in result.output


def test_test_with_a_configured_folder_that_is_missing(workdir: Path) -> None:
    shutil.rmtree(workdir / "policies" / "tests")
    result = CliRunner().invoke(main, ["policy", "test"])
    assert result.exit_code == 2
    assert "[policy] tests names" in result.output and "which is not a folder" in result.output


def test_after_init_policy_test_exits_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["init", "--org", "clinic", "--dir", str(tmp_path)]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDGATE_CONFIG", raising=False)
    result = runner.invoke(main, ["policy", "test"])
    assert result.exit_code == 0, result.output
    assert "no policy tests" in result.output


def _key_ring(workdir: Path) -> dict[str, Any]:
    return json.loads((workdir / "data" / "pseudonym.key").read_text())


def test_rotate_pseudonym_key_changes_pseudonyms_and_keeps_the_old_key(workdir: Path) -> None:
    from gateway.policy.keys import load_or_create_pseudonym_key

    key_file = workdir / "data" / "pseudonym.key"
    first = load_or_create_pseudonym_key(key_file)
    args = [
        "pseudonym", "--peer", "insurer", "--agent", "records", "--skill", "summary",
        "--field", "patient.insurance_id", "--value", "INS-99812",
    ]  # fmt: skip
    before = run(*args)
    assert before.exit_code == 0, before.output
    result = run("rotate-pseudonym-key")
    assert result.exit_code == 0, result.output
    assert "pseudonym key k2 is now current" in result.output
    assert "`fedgate policy reload`" in result.output
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    ring = _key_ring(workdir)
    assert ring["current"] == "k2" and [k["id"] for k in ring["keys"]] == ["k2", "k1"]
    assert "retired" in ring["keys"][1] and bytes.fromhex(ring["keys"][1]["key"]) == first
    assert load_or_create_pseudonym_key(key_file) != first
    after = run(*args)
    old = run(*args, "--key-id", "k1")
    assert after.output.split()[0] != before.output.split()[0]  # pseudonyms changed
    assert old.output.split()[0] == before.output.split()[0]  # the old one can be recomputed
    dropped = run("rotate-pseudonym-key", "--drop-retired")
    assert dropped.exit_code == 0 and "deleted retired keys k2, k1" in dropped.output
    assert [k["id"] for k in _key_ring(workdir)["keys"]] == ["k3"]
    gone = run(*args, "--key-id", "k1")
    assert gone.exit_code == 2 and "--key-id 'k1' is not in" in gone.output


def test_a_key_file_of_the_old_format_is_key_k1_and_rotates(workdir: Path) -> None:
    from gateway.policy.keys import load_or_create_pseudonym_key

    key_file = workdir / "data" / "pseudonym.key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_bytes(bytes(range(32)))
    assert load_or_create_pseudonym_key(key_file) == bytes(range(32))
    assert run("rotate-pseudonym-key").exit_code == 0
    ring = _key_ring(workdir)
    assert [k["id"] for k in ring["keys"]] == ["k2", "k1"]
    assert bytes.fromhex(ring["keys"][1]["key"]) == bytes(range(32))


def test_rotate_refuses_a_broken_key_file(workdir: Path) -> None:
    key_file = workdir / "data" / "pseudonym.key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text('{"format": "something else"}')
    result = run("rotate-pseudonym-key")
    assert result.exit_code == 2
    assert "pseudonym key file is not fedgate-pseudonym-keys version 1" in result.output
    assert key_file.read_text() == '{"format": "something else"}'  # left as it was


def test_pseudonym_of_a_field_that_is_not_pseudonymized(workdir: Path) -> None:
    from gateway.policy.keys import load_or_create_pseudonym_key

    load_or_create_pseudonym_key(workdir / "data" / "pseudonym.key")
    result = run(
        "pseudonym", "--peer", "insurer", "--agent", "records", "--skill", "summary",
        "--field", "patient.name", "--value", "Ada",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "patient.name is not pseudonymized for insurer" in result.output


def test_a_gateway_reload_picks_up_a_rotated_key_and_refuses_a_missing_one(
    workdir: Path,
) -> None:
    from gateway.config import load_config
    from gateway.errors import PolicyError
    from gateway.server import build_policy

    holder = build_policy(load_config(workdir / "fedgate.toml"))
    assert holder is not None
    payload = {"patient": {"insurance_id": "INS-99812"}}

    def pseudonym() -> str:
        result = holder.current.filter("insurer", "records", "summary", "share", payload)
        return str(result.output["patient"]["insurance_id"])

    before = pseudonym()
    assert run("rotate-pseudonym-key").exit_code == 0
    assert pseudonym() == before  # until the gateway reloads
    holder.reload()
    rotated = pseudonym()
    assert rotated != before
    (workdir / "data" / "pseudonym.key").unlink()
    with pytest.raises(PolicyError, match="no pseudonym key file"):
        holder.reload()  # a reload never makes a new key behind the operator's back
    assert pseudonym() == rotated
    assert not (workdir / "data" / "pseudonym.key").exists()
