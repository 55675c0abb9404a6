"""`fedgate audit …` through click's CliRunner, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
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
from gateway.identity.signing import (
    ReceiptBody,
    SignedCheckpoint,
    SignedReceipt,
    Signer,
    sign_checkpoint,
    sign_receipt,
)
from gateway.payload import canonical_json, digest

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


def keyed(value: Any) -> str:
    """A pre-filter digest as the gateway keys it: HMAC-SHA256 under a secret of its writer."""
    return "hmac-sha256:" + hmac.new(b"alpha-secret", canonical_json(value), "sha256").hexdigest()


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
    plain_prefilter: bool = False,
    released_withheld: tuple[str, ...] = ("name",),
    released_decision: str = "partial",
    detail: str = "",
) -> tuple[list[AuditEvent], list[AuditEvent]]:
    """The events of one exchange on the requester's and the responder's side.

    Pre-filter digests are keyed (hmac-sha256, as the gateway writes them), or with
    `plain_prefilter` plain SHA-256 ones as older records have.
    """
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
    before = digest if plain_prefilter else keyed
    ours = [
        AuditEvent(
            "request_sent",
            peer_org=responder.org,
            direction="outbound",
            decision="partial",
            withheld_paths=("ssn",),
            digest_before=before(request_full),
            digest_after=digest(request_sent),
            detail=detail,
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
            policy_version="p1",
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
            decision=released_decision,
            status="completed",
            withheld_paths=released_withheld,
            digest_before=before(output_full),
            digest_after=digest(released),
            policy_version="p1",
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
    report = json.loads(run("verify", "--config", str(config), "--json").stdout)
    assert report["ok"] is False and report["problems"][0]["sequence"] == 3


def test_verify_against_a_partner_held_head(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    config, url = orgs["alpha"]
    head = run("checkpoint", "--config", str(config))
    assert head.exit_code == 0
    head_file = tmp_path / "alpha-head.json"
    head_file.write_text(head.stdout)
    assert json.loads(head.stdout)["sequence"] == 6
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
    rogue = run(
        "verify", "--bundle", str(bundle), "--ca", str(audit_pki.directory / "rogue-ca.crt")
    )
    assert rogue.exit_code == 1 and "not issued by the federation CA" in rogue.output
    # change one record in the file
    record = json.loads(lines[2])
    record["withheld_paths"] = []
    lines[2] = json.dumps(record)
    bundle.write_text("\n".join(lines) + "\n")
    tampered = run("verify", "--bundle", str(bundle), "--ca", str(audit_pki.ca_path))
    assert tampered.exit_code == 1 and "at record 2: record 2 was changed" in tampered.output
    # stdout export works too
    assert json.loads(run("export", "--config", str(orgs["alpha"][0])).stdout.splitlines()[0])


def test_bundle_with_cut_tail_and_garbage(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    bundle = tmp_path / "alpha.jsonl"
    run("export", "--config", str(orgs["alpha"][0]), "--out", str(bundle))
    lines = bundle.read_text().splitlines()
    bundle.write_text("\n".join(lines[:4] + lines[-1:]) + "\n")  # records 4..6 dropped
    result = run("verify", "--bundle", str(bundle), "--ca", str(audit_pki.ca_path))
    assert result.exit_code == 1 and "records 4..6 were cut off" in result.output
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("hello\n")
    result = run("verify", "--bundle", str(garbage), "--ca", str(audit_pki.ca_path))
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
    result = run("reconcile", ours, theirs, "--ca", str(audit_pki.ca_path))
    assert result.exit_code == 0, result.output
    assert "alpha and beta agree on all 3 exchanges" in result.output
    assert run("reconcile", theirs, ours, "--ca", str(audit_pki.ca_path)).exit_code == 0


def test_reconcile_reports_every_mismatch(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=True)
    ours, theirs = _export_both(orgs, tmp_path)
    result = run("reconcile", ours, theirs, "--json", "--ca", str(audit_pki.ca_path))
    assert result.exit_code == 1
    report = json.loads(result.stdout)
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
    table = run("reconcile", ours, theirs, "--ca", str(audit_pki.ca_path))
    assert table.exit_code == 1 and "mismatches between alpha and beta" in table.output


def test_reconcile_flags_a_tampered_partner_log(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    ours, theirs = _export_both(orgs, tmp_path)
    lines = Path(theirs).read_text().splitlines()
    record = json.loads(lines[1])
    record["digest_before"] = digest({"forged": True})
    lines[1] = json.dumps(record)
    Path(theirs).write_text("\n".join(lines) + "\n")
    result = run("reconcile", ours, theirs, "--json", "--ca", str(audit_pki.ca_path))
    assert result.exit_code == 1
    messages = [m["message"] for m in json.loads(result.stdout)["mismatches"]]
    assert any(m.startswith("beta's log does not verify at record 1") for m in messages)
    assert any("request digests differ" in m for m in messages)


def test_reconcile_same_org_is_refused(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    ours, _ = _export_both(orgs, tmp_path)
    result = run("reconcile", ours, ours, "--ca", str(audit_pki.ca_path))
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
    assert run("verify", "--bundle", str(bundle), "--ca", str(audit_pki.ca_path)).exit_code == 0
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


# ---- export verifies first (issue 12, defect 4) ----


def _sql(url: str, statement: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(statement))
    engine.dispose()


def _checkpoint_rows(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        count = connection.execute(sa.text("SELECT count(*) FROM audit_checkpoint")).scalar()
    engine.dispose()
    return int(count or 0)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_refuses_a_log_that_does_not_verify(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    config, url = orgs["alpha"]
    assert run("checkpoint", "--config", str(config)).exit_code == 0
    _sql(url, "DELETE FROM audit_record WHERE sequence > 4")  # a tail cut after the checkpoint
    signed_before = _checkpoint_rows(url)
    bundle = tmp_path / "alpha.jsonl"
    result = run("export", "--config", str(config), "--out", str(bundle))
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert "does not verify at record 5" in result.output
    assert "records 5..6 were cut off" in result.output
    assert "pass --allow-broken" in result.output
    assert not bundle.exists() and not (tmp_path / "alpha.jsonl.partial").exists()
    assert _checkpoint_rows(url) == signed_before  # nothing was signed over the broken head

    forced = run("export", "--config", str(config), "--out", str(bundle), "--allow-broken")
    assert forced.exit_code == 0, forced.output
    assert "MARKED BROKEN" in forced.output
    lines = _lines(bundle)
    assert lines[0]["broken"]["sequence"] == 5
    assert [line["sequence"] for line in lines if line["type"] == "checkpoint"] == [6]
    assert _checkpoint_rows(url) == signed_before
    verified = run("verify", "--bundle", str(bundle), "--ca", str(audit_pki.ca_path))
    assert verified.exit_code == 1
    assert "records 5..6 were cut off" in verified.output
    assert "exported with --allow-broken" in verified.output


def test_export_refuses_a_changed_record(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    config, url = orgs["alpha"]
    _sql(url, "UPDATE audit_record SET decision = 'allowed' WHERE sequence = 3")
    result = run("export", "--config", str(config), "--out", str(tmp_path / "a.jsonl"))
    assert result.exit_code == 2
    assert "does not verify at record 3 (record 3 was changed" in result.output
    assert _checkpoint_rows(url) == 0


# ---- an export for one partner (issue 11 #5) ----


def _fill_two_partners(orgs, audit_pki) -> None:
    """alpha's exchanges with beta (b-*) and with gamma (g-*), one legacy record, one payload."""
    beta = audit_pki.signer("beta")
    events: list[AuditEvent] = []
    for name in ("b-0", "g-0", "b-1", "g-1"):
        ours, _ = exchange(name, beta)
        if name.startswith("g"):
            ours = [dataclasses.replace(e, peer_org="gamma") for e in ours]
        events += ours
    legacy, _ = exchange("b-old", beta, plain_prefilter=True)
    with_payload, _ = exchange("b-payload", beta)
    events += legacy
    events += [dataclasses.replace(with_payload[0], payload={"q": "b-payload", "ssn": "1"})]
    _append_all(orgs["alpha"][1], events)


def test_export_for_one_partner_holds_only_its_exchanges(orgs, audit_pki, tmp_path) -> None:
    _fill_two_partners(orgs, audit_pki)
    config = str(orgs["alpha"][0])
    bundle = tmp_path / "for-beta.jsonl"
    result = run("export", "--config", config, "--peer", "beta", "--out", str(bundle))
    assert result.exit_code == 0, result.output
    assert "5 records of exchanges with beta and 6 stubs" in result.output
    assert "note: 2 records of exchanges with beta are sealed" in result.output
    lines = _lines(bundle)
    assert lines[0]["peer"] == "beta"
    chain = [line for line in lines if line["type"] in ("record", "stub")]
    assert [line["sequence"] for line in chain] == list(range(1, 12))
    assert "gamma" not in bundle.read_text() and "g-0" not in bundle.read_text()
    records = [line for line in chain if line["type"] == "record"]
    stubs = [line for line in chain if line["type"] == "stub"]
    assert {r["task_id"] for r in records} == {"b-0", "b-1", "b-old"}
    assert {r["peer_org"] for r in records} == {"beta"}
    plain = [s for s in stubs if "sealed" not in s]
    assert len(plain) == 4
    assert all(set(s) == {"type", "sequence", "prev_hash", "record_hash"} for s in plain)
    # no record in the bundle hands beta a plain pre-filter digest or a payload
    for record in records:
        if record["kind"] not in ("request_received", "result_received"):
            before = record["digest_before"]
            assert before is None or before.startswith("hmac-sha256:")
            assert record["payload"] is None
    ca = str(audit_pki.ca_path)
    verified = run("verify", "--bundle", str(bundle), "--ca", ca)
    assert verified.exit_code == 0, verified.output
    assert "intact: 11 records" in verified.output
    assert "6 stubs: linked, content not shown" in verified.output
    # a stub's hash is bound by the record after it; a full record's content by its hash
    kinds = [line["type"] for line in lines]
    for kind, change, value in (
        ("stub", "record_hash", "ab" * 32),
        ("record", "withheld_paths", []),
    ):
        tampered = [dict(line) for line in lines]
        at = kinds.index(kind)
        tampered[at][change] = value
        copy = tmp_path / f"tampered-{kind}.jsonl"
        copy.write_text("".join(json.dumps(line) + "\n" for line in tampered))
        failed = run("verify", "--bundle", str(copy), "--ca", ca)
        assert failed.exit_code == 1
        sequence = tampered[at]["sequence"]
        expected = (
            f"record {sequence + 1} does not link to record {sequence}"
            if kind == "stub"
            else f"record {sequence} was changed"
        )
        assert expected in failed.output


def test_a_partner_export_seals_what_would_recover_withheld_values(
    orgs, audit_pki, tmp_path
) -> None:
    _fill_two_partners(orgs, audit_pki)
    config = str(orgs["alpha"][0])
    bundle = tmp_path / "for-beta.jsonl"
    result = run("export", "--config", config, "--peer", "beta", "--out", str(bundle))
    assert result.exit_code == 0
    sealed = {(s["task_id"], s["kind"], s["sealed"]) for s in _lines(bundle) if "sealed" in s}
    # the legacy exchange's two sending-side records with a plain pre-filter digest (its
    # result_received has none), and the request whose payload was stored before filtering
    assert sealed == {
        ("b-old", "request_sent", "plain-prefilter-digest"),
        ("b-payload", "request_sent", "payload"),
    }
    full = tmp_path / "full.jsonl"
    result = run(
        "export",
        "--config",
        config,
        "--peer",
        "beta",
        "--out",
        str(full),
        "--include-plain-digests",
    )
    assert result.exit_code == 0
    sealed = {(s["task_id"], s["sealed"]) for s in _lines(full) if "sealed" in s}
    assert sealed == {("b-payload", "payload")}  # a payload before filtering never goes
    wrong = run("export", "--config", config, "--include-plain-digests")
    assert wrong.exit_code == 2 and "applies to --peer exports only" in wrong.output
    own = run("export", "--config", config, "--peer", "alpha")
    assert own.exit_code == 2 and "own organization" in own.output


def test_reconcile_bundles_exported_for_each_other(orgs, audit_pki, tmp_path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    extra, _ = exchange("g-0", audit_pki.signer("beta"))
    _append_all(orgs["alpha"][1], [dataclasses.replace(e, peer_org="gamma") for e in extra])
    paths = []
    for org, peer in (("alpha", "beta"), ("beta", "alpha")):
        path = tmp_path / f"{org}-for-{peer}.jsonl"
        exported = run("export", "--config", str(orgs[org][0]), "--peer", peer, "--out", str(path))
        assert exported.exit_code == 0, exported.output
        paths.append(str(path))
    ca = str(audit_pki.ca_path)
    result = run("reconcile", *paths, "--ca", ca)
    assert result.exit_code == 0, result.output
    assert "alpha and beta agree on all 3 exchanges" in result.output
    # a bundle exported for someone else holds none of our exchanges: said, not agreed
    other = tmp_path / "alpha-for-gamma.jsonl"
    run("export", "--config", str(orgs["alpha"][0]), "--peer", "gamma", "--out", str(other))
    wrong = run("reconcile", str(other), paths[1], "--ca", ca)
    assert wrong.exit_code == 1 and "alpha's bundle was exported for gamma" in wrong.output


# ---- verify --bundle trusts only a CA it is given (issue 11, low) ----


def _rogue_bundle(orgs, audit_pki, tmp_path: Path) -> Path:
    """beta's log in a bundle made under a self-made CA: its checkpoint signed by a rogue 'beta'."""
    genuine = tmp_path / "beta.jsonl"
    assert run("export", "--config", str(orgs["beta"][0]), "--out", str(genuine)).exit_code == 0
    lines = _lines(genuine)
    rogue_ca = (audit_pki.directory / "rogue-ca.crt").read_text()
    rogue = Signer.from_files(audit_pki.directory / "rogue.crt", audit_pki.directory / "rogue.key")
    head = next(line for line in lines if line["type"] == "checkpoint")
    forged = sign_checkpoint(rogue, head["sequence"], head["head_hash"])
    lines[0]["ca_certificate"] = rogue_ca
    lines = [line for line in lines if line["type"] != "checkpoint"]
    lines.append({"type": "checkpoint", **forged.to_json()})
    path = tmp_path / "beta-forged.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_verify_bundle_needs_the_ca_to_trust(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    forged = _rogue_bundle(orgs, audit_pki, tmp_path)
    result = run("verify", "--bundle", str(forged))
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert "pass --ca FILE, the federation CA you trust" in result.output
    real = run("verify", "--bundle", str(forged), "--ca", str(audit_pki.ca_path))
    assert real.exit_code == 1 and "not issued by the federation CA" in real.output
    # trusting the bundle's own CA is possible, and said loudly: the forgery is consistent
    trusted = run("verify", "--bundle", str(forged), "--trust-bundle-ca")
    assert trusted.exit_code == 0
    assert "WARNING: trusting the CA inside" in trusted.output
    assert "Rogue CA" in trusted.output and "not an independent trust anchor" in trusted.output
    report = json.loads(
        run("verify", "--bundle", str(forged), "--trust-bundle-ca", "--json").stdout
    )
    assert report["trusted_ca"]["source"] == "bundle"
    both = run("verify", "--bundle", str(forged), "--trust-bundle-ca", "--ca", "x")
    assert both.exit_code == 2 and "not both" in both.output
    ours = tmp_path / "alpha.jsonl"
    run("export", "--config", str(orgs["alpha"][0]), "--out", str(ours))
    unsure = run("reconcile", str(ours), str(forged))
    assert unsure.exit_code == 2 and "pass --ca FILE" in unsure.output
    caught = run("reconcile", str(ours), str(forged), "--ca", str(audit_pki.ca_path))
    assert caught.exit_code == 1 and "beta's log does not verify" in caught.output


# ---- verify says each finding once, and what it proved (issue 12) ----


def test_verify_names_a_cut_once_and_says_what_it_proved(orgs, audit_pki, tmp_path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    config, url = orgs["alpha"]
    head = tmp_path / "head.json"
    for _ in range(3):  # the same head signed three times (exports, checkpoint exchanges)
        signed = run("checkpoint", "--config", str(config))
        head.write_text(signed.stdout)
    intact = run("verify", "--config", str(config))
    assert intact.exit_code == 0
    assert intact.output.count("\n") == 1
    assert (
        "proved: every record links to the one before and matches its hash, the log reaches "
        "every signed head checked (1 distinct, highest 6)"
    ) in intact.output
    assert "not proved: that nothing after sequence 6 was removed" in intact.output
    _sql(url, "DELETE FROM audit_record WHERE sequence > 4")
    for extra in ((), ("--head", str(head))):
        cut = run("verify", "--config", str(config), *extra)
        assert cut.exit_code == 1
        assert cut.output.count("cut off") == 1, cut.output
        assert cut.output.count("\n") == 1


def test_export_says_what_it_proved(orgs, audit_pki, tmp_path: Path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    result = run("export", "--config", str(orgs["alpha"][0]), "--out", str(tmp_path / "a.jsonl"))
    assert result.exit_code == 0
    assert result.output.count("\n") == 1
    assert "proved before export: the chain is intact through 6" in result.output


# ---- reconcile against the signed receipts (issue 12) ----


def test_reconcile_checks_withheld_paths_and_decision_against_the_receipt(
    orgs, audit_pki, tmp_path: Path
) -> None:
    beta = audit_pki.signer("beta")
    plans: list[dict[str, Any]] = [
        {},
        {"released_withheld": ()},  # beta's log says nothing was withheld; it signed 'name'
        {"released_decision": "allowed"},  # beta's log says allowed; it withheld 'name'
        {},  # alpha keeps another receipt than the one beta released
    ]
    alpha_events: list[AuditEvent] = []
    beta_events: list[AuditEvent] = []
    for i, plan in enumerate(plans):
        ours, theirs = exchange(f"task-{i}", beta, **plan)
        alpha_events += ours
        beta_events += theirs
    lied = alpha_events[3]  # task-1's result_received: alpha's log drops a transformation too
    alpha_events[3] = dataclasses.replace(lied, transformed=(("zip", "masked"),))
    kept = alpha_events[7]
    assert kept.receipt is not None
    body = SignedReceipt.from_json(kept.receipt).body
    other = sign_receipt(
        beta, dataclasses.replace(body, signed_at_unix_ms=body.signed_at_unix_ms + 1)
    )
    alpha_events[7] = dataclasses.replace(kept, receipt=other.to_json())
    _append_all(orgs["alpha"][1], alpha_events)
    _append_all(orgs["beta"][1], beta_events)
    ours, theirs = _export_both(orgs, tmp_path)
    result = run("reconcile", ours, theirs, "--json", "--ca", str(audit_pki.ca_path))
    assert result.exit_code == 1
    by_task: dict[str, list[str]] = {}
    for mismatch in json.loads(result.stdout)["mismatches"]:
        by_task.setdefault(mismatch["task_id"], []).append(mismatch["message"])
    assert set(by_task) == {"task-1", "task-2", "task-3"}
    assert by_task["task-3"] == [
        "receipts differ: alpha kept (record 8) another receipt than the one beta released "
        "(record 8)"
    ]
    assert (
        "beta's record 4 (result_released) says withheld nothing, the signed receipt [name]"
        in by_task["task-1"]
    )
    assert (
        "alpha's record 4 (result_received) says transformed [zip (masked)], the signed receipt "
        "nothing" in by_task["task-1"]
    )
    assert by_task["task-2"] == [
        "beta's record 6 (result_released) has decision 'allowed', but the signed receipt makes "
        "it 'partial'"
    ]


# ---- reconcile lists what is open (issue 15 #5) ----


def test_reconcile_lists_requests_no_record_closes(orgs, audit_pki, tmp_path: Path) -> None:
    beta = audit_pki.signer("beta")
    alpha_events: list[AuditEvent] = []
    beta_events: list[AuditEvent] = []
    ours, theirs = exchange("done", beta)
    alpha_events += ours
    beta_events += theirs
    # a first attempt that never reached beta, carried on by a retry with the same key
    first, _ = exchange("first", beta, detail="key=k-1")
    alpha_events.append(first[0])
    ours, theirs = exchange("retry", beta, detail="key=k-1")
    alpha_events += ours
    beta_events += theirs
    # a request beta received and never answered: open on both sides
    ours, theirs = exchange("lost", beta)
    alpha_events.append(ours[0])
    beta_events.append(theirs[0])
    # a request that failed on both sides: closed
    ours, theirs = exchange("broke", beta)
    alpha_events += [ours[0], dataclasses.replace(ours[0], kind="failed", decision="error")]
    beta_events += [theirs[0], dataclasses.replace(theirs[0], kind="failed", decision="error")]
    _append_all(orgs["alpha"][1], alpha_events)
    _append_all(orgs["beta"][1], beta_events)
    ours_path, theirs_path = _export_both(orgs, tmp_path)
    ca = str(audit_pki.ca_path)
    report = json.loads(run("reconcile", ours_path, theirs_path, "--json", "--ca", ca).stdout)
    assert report["mismatches"] == []
    assert [(o["org"], o["task_id"], o["kind"]) for o in report["open"]] == [
        ("alpha", "lost", "request_sent"),
        ("beta", "lost", "request_received"),
    ]
    table = run("reconcile", ours_path, theirs_path, "--ca", ca)
    assert table.exit_code == 0
    assert "agree on all 5 exchanges" in table.output and "2 requests are still open" in (
        table.output
    )
    assert "2 requests open" in table.output and "lost" in table.output


# ---- evidence: what a partner holds shows a cut tail (issue 12) ----


def _hold_checkpoint(url: str, checkpoint: Any, audit_pki: Any) -> None:
    async def go() -> None:
        store = SqlAuditStore(url, verifier=audit_pki.verifier())
        await store.store_peer_checkpoint(checkpoint)
        await store.close()

    asyncio.run(go())


def test_a_cut_tail_shows_with_what_the_partner_holds(orgs, audit_pki, tmp_path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    (alpha_config, alpha_url), (beta_config, beta_url) = orgs["alpha"], orgs["beta"]
    signed = run("checkpoint", "--config", str(alpha_config))
    head = json.loads(signed.stdout)

    _hold_checkpoint(beta_url, SignedCheckpoint.from_json(head), audit_pki)
    evidence = tmp_path / "beta-about-alpha.json"
    wrote = run("evidence", "--config", str(beta_config), "--peer", "alpha", "--out", str(evidence))
    assert wrote.exit_code == 0, wrote.output
    assert "wrote 1 signed positions of alpha's log" in wrote.output
    held = json.loads(evidence.read_text())
    assert (held["holder"], held["about"]) == ("beta", "alpha")
    intact = run("verify", "--config", str(alpha_config), "--evidence", str(evidence))
    assert intact.exit_code == 0, intact.output
    assert "1 positions held by beta" in intact.output
    # cut the tail, and the checkpoints alpha kept itself: alpha's own verify sees nothing
    _sql(alpha_url, "DELETE FROM audit_record WHERE sequence > 4")
    _sql(alpha_url, "DELETE FROM audit_checkpoint")
    assert run("verify", "--config", str(alpha_config)).exit_code == 0
    cut = run("verify", "--config", str(alpha_config), "--evidence", str(evidence))
    assert cut.exit_code == 1
    assert "records 5-6 are missing: beta holds a checkpoint (" in cut.output
    assert f"signed at sequence 6 with head {head['head_hash']}" in cut.output
    # write two other records in their place: the rewrite shows
    _append_all(alpha_url, exchange("other", audit_pki.signer("beta"))[0])
    rewritten = run("verify", "--config", str(alpha_config), "--evidence", str(evidence))
    assert rewritten.exit_code == 1
    assert "record 6 does not match what beta holds: a checkpoint (" in rewritten.output


def test_evidence_that_alpha_did_not_sign_is_set_aside(orgs, audit_pki, tmp_path) -> None:
    _fill(orgs, audit_pki, mismatched=False)
    (alpha_config, _), (beta_config, beta_url) = orgs["alpha"], orgs["beta"]

    head = json.loads(run("checkpoint", "--config", str(alpha_config)).stdout)
    _hold_checkpoint(beta_url, SignedCheckpoint.from_json(head), audit_pki)
    evidence = tmp_path / "e.json"
    run("evidence", "--config", str(beta_config), "--peer", "alpha", "--out", str(evidence))
    held = json.loads(evidence.read_text())
    held["positions"][0]["material"]["sequence"] = 9  # claims records alpha never signed
    evidence.write_text(json.dumps(held))
    result = run("verify", "--config", str(alpha_config), "--evidence", str(evidence))
    assert result.exit_code == 0
    assert "note: " in result.output and "is not a valid signature of alpha, ignored" in (
        result.output
    )
    about_beta = run("verify", "--config", str(beta_config), "--evidence", str(evidence))
    assert about_beta.exit_code == 2 and "evidence about the log of 'alpha'" in about_beta.output
    nothing = run("evidence", "--config", str(alpha_config), "--peer", "gamma")
    assert nothing.exit_code == 2 and "holds no signed chain position of 'gamma'" in (
        nothing.output
    )
