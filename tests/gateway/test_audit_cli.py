"""`fedgate audit …` through click's CliRunner, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

import gateway.audit.store as audit_module
from gateway.audit.store import AuditEvent, SqlAuditStore
from gateway.cli import main
from gateway.identity.signing import ReceiptBody, Signer, sign_receipt
from gateway.payload import digest

OLD_MS = 1_577_836_800_000  # 2020-01-01


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """Makes the URL of a fresh database for an organization."""
    if request.param == "sqlite":
        return lambda org: f"sqlite:///{tmp_path / (org + '-audit.db')}"
    make: Callable[[], str] = request.getfixturevalue("audit_pg_url")
    return lambda org: make()


@pytest.fixture
def orgs(
    tmp_path: Path, new_db_url: Callable[[str], str], audit_make_config: Any
) -> dict[str, tuple[Path, str]]:
    """Config path and database URL of 'alpha' and 'beta'."""
    result = {}
    for org in ("alpha", "beta"):
        url = new_db_url(org)
        result[org] = (audit_make_config(tmp_path, org, url), url)
    return result


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["audit", *args], catch_exceptions=False)


def _append_all(url: str, events: list[AuditEvent]) -> None:
    async def go() -> None:
        store = SqlAuditStore(url)
        for event in events:
            await store.append(event)
        await store.close()

    asyncio.run(go())


def exchange(
    task_id: str,
    responder: Signer,
    *,
    requester: str = "alpha",
    received_digest: str | None = None,
    receipt_signer: Signer | None = None,
    drop: tuple[str, ...] = (),
) -> tuple[list[AuditEvent], list[AuditEvent]]:
    """The events of one exchange on the requester's and the responder's side."""
    request_full, request_sent = {"q": task_id, "ssn": "1"}, {"q": task_id}
    output_full, released = {"a": task_id, "name": "x"}, {"a": task_id}
    receipt = sign_receipt(
        receipt_signer or responder,
        ReceiptBody(
            task_id,
            (receipt_signer or responder).org,
            digest(released),
            withheld_paths=("name",),
            policy_version="p1",
        ),
    ).to_json()
    base = {"task_id": task_id, "agent": "triage", "skill": "assess", "requester": "nurse"}
    ours = [
        AuditEvent(
            "request_sent",
            peer_org=responder.org,
            direction="outbound",
            decision="partial",
            withheld_paths=("ssn",),
            digest_before=digest(request_full),
            digest_after=digest(request_sent),
            **base,
        ),
        AuditEvent(
            "result_received",
            peer_org=responder.org,
            direction="outbound",
            decision="allowed",
            status="completed",
            digest_after=digest(released),
            receipt=receipt,
            withheld_paths=("name",),
            **base,
        ),
    ]
    theirs = [
        AuditEvent(
            "request_received",
            peer_org=requester,
            direction="inbound",
            decision="allowed",
            digest_before=received_digest or digest(request_sent),
            digest_after=digest(request_sent),
            **base,
        ),
        AuditEvent(
            "result_released",
            peer_org=requester,
            direction="inbound",
            decision="partial",
            status="completed",
            withheld_paths=("name",),
            digest_before=digest(output_full),
            digest_after=digest(released),
            receipt=receipt,
            **base,
        ),
    ]
    return ([e for e in ours if e.kind not in drop], [e for e in theirs if e.kind not in drop])


def _fill(orgs: dict[str, tuple[Path, str]], audit_pki: Any, *, mismatched: bool) -> None:
    beta = audit_pki.signer("beta")
    alpha_events: list[AuditEvent] = []
    beta_events: list[AuditEvent] = []
    plans: list[dict[str, Any]] = [{} for _ in range(3)]
    if mismatched:
        plans += [
            {"received_digest": digest({"other": 1})},  # task-3: request digests differ
            {"receipt_signer": audit_pki.signer("alpha")},  # task-4: receipt of the wrong org
            {"drop": ("request_received", "result_released")},  # task-5: missing at beta
            {"drop": ("result_received",)},  # task-6: result never received
        ]
    for i, plan in enumerate(plans):
        ours, theirs = exchange(f"task-{i}", beta, **plan)
        alpha_events += ours
        beta_events += theirs
    _append_all(orgs["alpha"][1], alpha_events)
    _append_all(orgs["beta"][1], beta_events)


# ---- list / show ----


def test_list_table_json_filters_and_paging(orgs, audit_pki) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    config = str(orgs["alpha"][0])
    result = run("list", "--config", config)
    assert result.exit_code == 0, result.output
    assert "request_sent" in result.output and "task-2" in result.output
    data = json.loads(run("list", "--config", config, "--json", "--kind", "result_received").output)
    assert [r["task_id"] for r in data] == ["task-0", "task-1", "task-2"]
    page = json.loads(
        run("list", "--config", config, "--json", "--limit", "2", "--page", "2").output
    )
    assert [r["sequence"] for r in page] == [3, 4]
    assert json.loads(run("list", "--config", config, "--json", "--peer", "gamma").output) == []
    recent = run(
        "list",
        "--config",
        config,
        "--json",
        "--since",
        "2020-01-01",
        "--until",
        "2999-01-01T00:00:00Z",
        "--task",
        "task-1",
        "--decision",
        "partial",
    )
    assert [r["kind"] for r in json.loads(recent.output)] == ["request_sent"]


def test_list_bad_time_is_one_line_exit_2(orgs) -> None:
    result = run("list", "--config", str(orgs["alpha"][0]), "--since", "yesterday")
    assert result.exit_code == 2
    assert "--since 'yesterday' is not a date or time: use ISO 8601" in result.output


def test_missing_config_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run("list", "--config", str(tmp_path / "nope.toml"))
    assert result.exit_code == 2
    assert "file not found" in result.output


def test_missing_sqlite_log_is_one_line_exit_2(tmp_path: Path, audit_make_config) -> None:
    config = audit_make_config(tmp_path, "alpha", f"sqlite:///{tmp_path}/nowhere/audit.db")
    result = run("verify", "--config", str(config))
    assert result.exit_code == 2
    assert f"no audit log at {tmp_path}/nowhere/audit.db: check [audit] database_url" in (
        result.output
    )
    assert not (tmp_path / "nowhere").exists()


def test_unreachable_store_is_one_line_exit_2(tmp_path: Path, audit_make_config) -> None:
    config = audit_make_config(tmp_path, "alpha", "postgresql+psycopg://nobody@127.0.0.1:1/x")
    result = run("list", "--config", str(config))
    assert result.exit_code == 2
    assert "cannot read the audit store at postgresql+psycopg://nobody@127.0.0.1:1/x" in (
        result.output
    )
    assert "check [audit] database_url" in result.output


def test_show_an_exchange_with_its_receipt(orgs, audit_pki) -> None:
    _fill(orgs, audit_pki, mismatched=True)
    config = str(orgs["alpha"][0])
    result = run("show", "--config", config, "task-1")
    assert result.exit_code == 0, result.output
    assert "request_sent" in result.output and "result_received" in result.output
    assert digest({"q": "task-1"}) in result.output
    assert "ssn" in result.output and "valid" in result.output
    shown = json.loads(run("show", "--config", config, "task-4", "--json").output)
    checks = {r["kind"]: r["receipt_check"] for r in shown}
    assert checks["request_sent"] is None
    assert checks["result_received"].startswith("is invalid: ")
    beta = json.loads(run("show", "--config", str(orgs["beta"][0]), "task-0", "--json").output)
    assert {r["kind"]: r["receipt_check"] for r in beta}["result_released"] == "valid"


def test_show_unknown_task(orgs, audit_pki) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    result = run("show", "--config", str(orgs["alpha"][0]), "task-nope")
    assert result.exit_code == 2
    assert "no audit records for task 'task-nope'" in result.output


# ---- verify / checkpoint / export ----


def test_verify_intact_and_tampered(orgs, audit_pki) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    config, url = orgs["alpha"]
    assert run("checkpoint", "--config", str(config)).exit_code == 0
    result = run("verify", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "audit log of alpha is intact: 6 records (sequence 1..6)" in result.output
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE audit_record SET detail = 'x' WHERE sequence = 3"))
    engine.dispose()
    result = run("verify", "--config", str(config))
    assert result.exit_code == 1
    assert "FAILED verification at record 3: record 3 was changed" in result.output
    report = json.loads(run("verify", "--config", str(config), "--json").output)
    assert report["ok"] is False and report["problems"][0]["sequence"] == 3


def test_verify_against_a_partner_held_head(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    config, url = orgs["alpha"]
    head = run("checkpoint", "--config", str(config))
    assert head.exit_code == 0
    head_file = tmp_path / "alpha-head.json"
    head_file.write_text(head.output)
    assert json.loads(head.output)["sequence"] == 6
    engine = sa.create_engine(url)
    with engine.begin() as connection:  # cut the tail and remove our own checkpoints too
        connection.execute(sa.text("DELETE FROM audit_record WHERE sequence > 4"))
        connection.execute(sa.text("DELETE FROM audit_checkpoint"))
    engine.dispose()
    assert run("verify", "--config", str(config)).exit_code == 0
    result = run("verify", "--config", str(config), "--head", str(head_file))
    assert result.exit_code == 1
    assert "at record 5" in result.output and "records 5..6 were cut off" in result.output


def test_export_then_verify_bundle_offline(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    bundle = tmp_path / "alpha.jsonl"
    result = run("export", "--config", str(orgs["alpha"][0]), "--out", str(bundle))
    assert result.exit_code == 0, result.output
    lines = bundle.read_text().splitlines()
    header, last = json.loads(lines[0]), json.loads(lines[-1])
    assert header["type"] == "header" and header["org"] == "alpha"
    assert "BEGIN CERTIFICATE" in header["ca_certificate"]
    assert last["type"] == "checkpoint" and last["sequence"] == 6
    assert len(lines) == 8
    verified = run("verify", "--bundle", str(bundle), "--ca", str(audit_pki.ca_path))
    assert verified.exit_code == 0, verified.output
    assert "intact: 6 records" in verified.output
    assert run("verify", "--bundle", str(bundle)).exit_code == 0  # CA carried in the bundle
    rogue = run(
        "verify", "--bundle", str(bundle), "--ca", str(audit_pki.directory / "rogue-ca.crt")
    )
    assert rogue.exit_code == 1 and "not issued by the federation CA" in rogue.output
    # change one record in the file
    record = json.loads(lines[2])
    record["withheld_paths"] = []
    lines[2] = json.dumps(record)
    bundle.write_text("\n".join(lines) + "\n")
    tampered = run("verify", "--bundle", str(bundle))
    assert tampered.exit_code == 1 and "at record 2: record 2 was changed" in tampered.output
    # stdout export works too
    assert json.loads(run("export", "--config", str(orgs["alpha"][0])).output.splitlines()[0])


def test_bundle_with_cut_tail_and_garbage(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    bundle = tmp_path / "alpha.jsonl"
    run("export", "--config", str(orgs["alpha"][0]), "--out", str(bundle))
    lines = bundle.read_text().splitlines()
    bundle.write_text("\n".join(lines[:4] + lines[-1:]) + "\n")  # records 4..6 dropped
    result = run("verify", "--bundle", str(bundle))
    assert result.exit_code == 1 and "records 4..6 were cut off" in result.output
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("hello\n")
    result = run("verify", "--bundle", str(garbage))
    assert result.exit_code == 2 and "garbage.jsonl:1: not a JSON line" in result.output


# ---- reconcile ----


def _export_both(orgs, tmp_path: Path) -> tuple[str, str]:
    paths = []
    for org in ("alpha", "beta"):
        path = tmp_path / f"{org}.jsonl"
        assert run("export", "--config", str(orgs[org][0]), "--out", str(path)).exit_code == 0
        paths.append(str(path))
    return paths[0], paths[1]


def test_reconcile_matching_logs(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    ours, theirs = _export_both(orgs, tmp_path)
    result = run("reconcile", ours, theirs)
    assert result.exit_code == 0, result.output
    assert "alpha and beta agree on all 3 exchanges" in result.output
    assert run("reconcile", theirs, ours, "--ca", str(audit_pki.ca_path)).exit_code == 0


def test_reconcile_reports_every_mismatch(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=True)
    ours, theirs = _export_both(orgs, tmp_path)
    result = run("reconcile", ours, theirs, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    by_task: dict[str, list[str]] = {}
    for mismatch in report["mismatches"]:
        by_task.setdefault(mismatch["task_id"], []).append(mismatch["message"])
    assert set(by_task) == {"task-3", "task-4", "task-5", "task-6"}
    assert "request digests differ" in by_task["task-3"][0]
    assert "receipt kept by alpha" in by_task["task-4"][0] and "is invalid" in by_task["task-4"][0]
    assert any("beta has no record of receiving it" in m for m in by_task["task-5"])
    assert any("alpha received a result" in m for m in by_task["task-5"])
    assert any(
        "released a result" in m and "no record of receiving" in m for m in by_task["task-6"]
    )
    table = run("reconcile", ours, theirs)
    assert table.exit_code == 1 and "mismatches between alpha and beta" in table.output


def test_reconcile_flags_a_tampered_partner_log(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    ours, theirs = _export_both(orgs, tmp_path)
    lines = Path(theirs).read_text().splitlines()
    record = json.loads(lines[1])
    record["digest_before"] = digest({"forged": True})
    lines[1] = json.dumps(record)
    Path(theirs).write_text("\n".join(lines) + "\n")
    result = run("reconcile", ours, theirs, "--json")
    assert result.exit_code == 1
    messages = [m["message"] for m in json.loads(result.output)["mismatches"]]
    assert any(m.startswith("beta's log does not verify at record 1") for m in messages)
    assert any("request digests differ" in m for m in messages)


def test_reconcile_same_org_is_refused(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    ours, _ = _export_both(orgs, tmp_path)
    result = run("reconcile", ours, ours)
    assert result.exit_code == 2 and "both bundles are of organization 'alpha'" in result.output


# ---- prune ----


def test_prune_archives_and_the_log_still_verifies(
    orgs, audit_pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, url = orgs["alpha"]
    beta = audit_pki.signer("beta")
    old_events = [e for i in range(3) for e in exchange(f"old-{i}", beta)[0]]
    clock = iter(range(OLD_MS, OLD_MS + 1000 * len(old_events), 1000))
    with monkeypatch.context() as patch:
        patch.setattr(audit_module, "_now_ms", lambda: next(clock))
        _append_all(url, old_events)
    _append_all(url, [e for i in range(2) for e in exchange(f"new-{i}", beta)[0]])
    assert run("checkpoint", "--config", str(config)).exit_code == 0
    archive = tmp_path / "archive-2020.jsonl"
    result = run(
        "prune", "--config", str(config), "--before", "2021-01-01", "--archive", str(archive)
    )
    assert result.exit_code == 0, result.output
    assert "archived and removed 6 records (sequence 1..6)" in result.output
    verified = run("verify", "--config", str(config))
    assert verified.exit_code == 0, verified.output
    assert "4 records (sequence 7..10)" in verified.output
    archived = run("verify", "--bundle", str(archive), "--ca", str(audit_pki.ca_path))
    assert archived.exit_code == 0 and "6 records" in archived.output
    # the remaining log exports and verifies offline, anchored by the retention checkpoint
    bundle = tmp_path / "after.jsonl"
    assert run("export", "--config", str(config), "--out", str(bundle)).exit_code == 0
    assert run("verify", "--bundle", str(bundle)).exit_code == 0
    again = run(
        "prune",
        "--config",
        str(config),
        "--before",
        "2021-01-01",
        "--archive",
        str(tmp_path / "second.jsonl"),
    )
    assert again.exit_code == 0 and "nothing to prune" in again.output
    exists = run(
        "prune", "--config", str(config), "--older-than-days", "1", "--archive", str(archive)
    )
    assert exists.exit_code == 2 and "already exists" in exists.output


def test_prune_needs_a_cut(orgs, tmp_path: Path) -> None:
    result = run("prune", "--config", str(orgs["alpha"][0]), "--archive", str(tmp_path / "a.jsonl"))
    assert result.exit_code == 2 and "no cut given" in result.output


def test_prune_refuses_a_tampered_log(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    config, url = orgs["alpha"]
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM audit_record WHERE sequence = 2"))
    engine.dispose()
    result = run(
        "prune",
        "--config",
        str(config),
        "--before",
        "2999-01-01",
        "--archive",
        str(tmp_path / "a.jsonl"),
    )
    assert result.exit_code == 2 and "does not verify (record 2" in result.output


def test_receipt_fixture_sanity(audit_pki) -> None:
    """The mismatched receipt of task-4 is a real signature of the wrong organization."""
    _, theirs = exchange("t", audit_pki.signer("beta"), receipt_signer=audit_pki.signer("alpha"))
    released = next(e for e in theirs if e.kind == "result_released")
    assert released.receipt is not None and released.receipt["responder_org"] == "alpha"
    assert dataclasses.is_dataclass(released)
