"""`fedgate audit …`: review, verify, export, reconcile, checkpoint and prune the audit log."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from gateway.audit.bundle import (
    read_bundle,
    receipt_problem,
    reconcile,
    verify_bundle,
    write_bundle,
)
from gateway.audit.chain import AuditRecord, VerifyReport
from gateway.audit.store import SqlAuditStore, open_store
from gateway.cli._common import config_option, read_config
from gateway.config import GatewayConfig
from gateway.errors import (
    AuditUnavailable,
    ConfigError,
    FedgateError,
    InvalidArgument,
    NotFound,
)
from gateway.identity.signing import SignedCheckpoint, Signer, Verifier


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _console() -> Console:
    return Console(width=max(120, Console().width), soft_wrap=False)


def _iso(time_ms: int) -> str:
    return dt.datetime.fromtimestamp(time_ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def _parse_time(value: str | None, option: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(
            f"{option} {value!r} is not a date or time: use ISO 8601, e.g. 2026-05-01 or "
            "2026-05-01T12:00:00Z"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparsable URL)"


@contextmanager
def _open(config: GatewayConfig) -> Iterator[SqlAuditStore]:
    """The configured store; database errors become one line naming the store and the fix."""
    url = config.audit_database_url
    parsed = make_url(url)
    database = parsed.database or ""
    if (
        parsed.get_backend_name() == "sqlite"
        and database not in ("", ":memory:")
        and not Path(database).is_file()
    ):
        raise NotFound(
            f"no audit log at {database}: check [audit] database_url and [gateway] "
            f"data_dir in {config.source} (the gateway creates the log when it first serves)"
        )
    store = open_store(url)
    try:
        yield store
    except (SQLAlchemyError, OSError) as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise AuditUnavailable(
            f"cannot read the audit store at {_safe_url(url)}: "
            f"{cause[0] if cause else type(exc).__name__}; check [audit] database_url in "
            f"{config.source} and that the database is reachable"
        ) from None
    finally:
        store.dispose()


def _signer(config: GatewayConfig) -> Signer:
    return Signer.from_files(config.federation.cert, config.federation.key)


def _verifier(config: GatewayConfig) -> Verifier:
    return Verifier.from_file(config.federation.ca)


def _read_heads(paths: tuple[str, ...]) -> list[SignedCheckpoint]:
    heads = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise InvalidArgument(f"{path}: cannot read the signed head: {exc.strerror}") from None
        except ValueError:
            raise InvalidArgument(
                f"{path}: not JSON: pass a checkpoint printed by `fedgate audit checkpoint`"
            ) from None
        try:
            heads.append(SignedCheckpoint.from_json(data))
        except FedgateError as exc:
            raise InvalidArgument(f"{path}: {exc.message}") from None
    return heads


@click.group("audit")
def audit() -> None:
    """Review, verify, export and reconcile the audit log."""


# ---- list / show ----


@audit.command("list")
@config_option
@click.option("--peer", help="Only exchanges with this organization.")
@click.option("--agent", help="Only this agent.")
@click.option("--since", help="From this time (ISO 8601, UTC unless an offset is given).")
@click.option("--until", help="Before this time (ISO 8601).")
@click.option("--decision", help="Only this decision (allowed, denied, partial, error, …).")
@click.option("--task", "task_id", help="Only this task id.")
@click.option("--kind", help="Only this event kind (request_sent, result_released, …).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--page", default=1, show_default=True, type=click.IntRange(1))
@click.option("--newest-first", is_flag=True, help="Show the latest records first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_records(
    config_path: str,
    peer: str | None,
    agent: str | None,
    since: str | None,
    until: str | None,
    decision: str | None,
    task_id: str | None,
    kind: str | None,
    limit: int,
    page: int,
    newest_first: bool,
    as_json: bool,
) -> None:
    """List audit records, filtered and paged."""
    config = read_config(config_path)
    since_time, until_time = _parse_time(since, "--since"), _parse_time(until, "--until")
    with _open(config) as store:
        records = store.query(
            peer=peer,
            agent=agent,
            since=since_time,
            until=until_time,
            decision=decision,
            task_id=task_id,
            kind=kind,
            limit=limit,
            offset=(page - 1) * limit,
            newest_first=newest_first,
        )
    if as_json:
        _echo_json([record.to_json() for record in records])
        return
    if not records:
        click.echo("no audit records match" + (f" on page {page}" if page > 1 else ""))
        return
    table = Table(title=f"audit log of {config.org} (page {page})")
    for column in (
        "seq",
        "time (UTC)",
        "event",
        "peer",
        "agent.skill",
        "decision",
        "status",
        "task",
        "withheld",
    ):
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(
            str(record.sequence),
            _iso(record.time_ms),
            record.kind,
            record.peer_org,
            f"{record.agent}.{record.skill}" if record.skill else record.agent,
            record.decision,
            record.status,
            record.task_id,
            str(len(record.withheld_paths)),
        )
    _console().print(table)


def _receipt_check(record: AuditRecord, org: str, verifier: Verifier) -> str | None:
    if record.kind not in ("result_released", "result_received") and record.receipt is None:
        return None
    responder = org if record.kind == "result_released" else record.peer_org
    problem = receipt_problem(record, responder, verifier)
    return "valid" if problem is None else problem


@audit.command("show")
@config_option
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(config_path: str, task_id: str, as_json: bool) -> None:
    """Every event of one exchange: digests, withheld and transformed paths, the receipt."""
    config = read_config(config_path)
    verifier = _verifier(config)
    with _open(config) as store:
        records = store.query(task_id=task_id, limit=10_000)
    if not records:
        raise NotFound(
            f"no audit records for task {task_id!r}: find the id with `fedgate audit list`"
        )
    checks = [_receipt_check(record, config.org, verifier) for record in records]
    if as_json:
        _echo_json(
            [
                {**record.to_json(), "receipt_check": check}
                for record, check in zip(records, checks, strict=True)
            ]
        )
        return
    console = _console()
    console.print(f"[bold]task {task_id}[/bold]: {len(records)} events in the log of {config.org}")
    for record, check in zip(records, checks, strict=True):
        table = Table(
            show_header=False, title=f"#{record.sequence} {record.kind}", title_justify="left"
        )
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        rows: list[tuple[str, str]] = [
            ("time (UTC)", _iso(record.time_ms)),
            ("peer", f"{record.peer_org} ({record.direction})"),
            ("agent.skill", f"{record.agent}.{record.skill}"),
            ("requester", record.requester),
            ("decision / status", f"{record.decision} / {record.status}"),
            ("duration", f"{record.duration_ms:.1f} ms"),
            ("digest before", record.digest_before or "-"),
            ("digest after (left)", record.digest_after or "-"),
            ("withheld", ", ".join(record.withheld_paths) or "-"),
            ("transformed", ", ".join(f"{p} ({a})" for p, a in record.transformed) or "-"),
            ("policy version", record.policy_version or "-"),
        ]
        if record.detail:
            rows.append(("detail", record.detail))
        if check is not None:
            rows.append(("receipt", check))
        if record.payload is not None:
            rows.append(("payload", json.dumps(record.payload, sort_keys=True)))
        for name, value in rows:
            table.add_row(name, value)
        console.print(table)


# ---- verify ----


def _print_report(report: VerifyReport, org: str, as_json: bool) -> None:
    if as_json:
        _echo_json(
            {
                "org": org,
                "ok": report.ok,
                "records": report.records,
                "first_sequence": report.first_sequence,
                "head_sequence": report.head_sequence,
                "head_hash": report.head_hash,
                "checkpoints_checked": report.checkpoints_checked,
                "problems": [
                    {"sequence": p.sequence, "message": p.message} for p in report.problems
                ],
            }
        )
    elif report.ok:
        span = (
            f" (sequence {report.first_sequence}..{report.head_sequence})" if report.records else ""
        )
        click.echo(
            f"audit log of {org} is intact: {report.records} records{span}, head "
            f"{report.head_sequence} {report.head_hash}, {report.checkpoints_checked} signed "
            "checkpoints checked"
        )
    else:
        first = report.problems[0]
        click.echo(
            f"audit log of {org} FAILED verification at record {first.sequence}: {first.message}"
        )
        for problem in report.problems[1:]:
            click.echo(f"  also at record {problem.sequence}: {problem.message}")
    if not report.ok:
        sys.exit(1)


@audit.command("verify")
@config_option
@click.option(
    "--bundle",
    type=click.Path(dir_okay=False),
    help="Verify an exported bundle offline instead of the configured store.",
)
@click.option(
    "--ca",
    type=click.Path(dir_okay=False),
    help="Federation CA to check signatures with (default: [federation] ca, or for a "
    "bundle the CA it carries).",
)
@click.option(
    "--head",
    "heads",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A signed head of ours kept by a partner (JSON): detects a cut tail. Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(
    config_path: str, bundle: str | None, ca: str | None, heads: tuple[str, ...], as_json: bool
) -> None:
    """Walk the hash chain and check every signed checkpoint; exit 1 on tampering."""
    signed_heads = _read_heads(heads)
    if bundle is not None:
        exported = read_bundle(bundle)
        if ca is not None:
            verifier = Verifier.from_file(ca)
        else:
            verifier = Verifier.from_pem(exported.ca_pem, label=f"{bundle} (CA in the bundle)")
            if not as_json:
                click.echo(
                    "note: signatures checked against the CA carried in the bundle; pass "
                    "--ca with the federation CA you trust",
                    err=True,
                )
        report = verify_bundle(exported, verifier, heads=signed_heads)
        _print_report(report, exported.org, as_json)
        return
    config = read_config(config_path)
    verifier = Verifier.from_file(ca) if ca is not None else _verifier(config)
    with _open(config) as store:
        report = store.verify(config.org, verifier, heads=signed_heads)
    _print_report(report, config.org, as_json)


# ---- checkpoint / export ----


@audit.command("checkpoint")
@config_option
def checkpoint(config_path: str) -> None:
    """Sign and keep the current head; print it as JSON (what a partner keeps)."""
    config = read_config(config_path)
    signer = _signer(config)
    with _open(config) as store:
        signed = asyncio.run(store.checkpoint(signer))
    _echo_json(signed.to_json())


def _write_out(out: str | None, write: Any) -> int:
    """Run write(handle) to stdout or atomically to the file `out`."""
    if out is None:
        return int(write(sys.stdout))
    target = Path(out)
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            count = int(write(handle))
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"{out}: cannot write: {exc.strerror}") from None
    return count


@audit.command("export")
@config_option
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="File to write (default: stdout).")
def export(config_path: str, fmt: str, out: str | None) -> None:
    """Export a bundle that `fedgate audit verify --bundle` checks offline."""
    config = read_config(config_path)
    signer = _signer(config)
    ca_pem = Path(config.federation.ca).read_bytes()
    cert_pem = Path(config.federation.cert).read_bytes()
    with _open(config) as store:
        head = asyncio.run(store.checkpoint(signer))
        anchor = store.retention_anchor()
        start = anchor.sequence + 1 if anchor is not None else 1
        records = (r for r in store.records(start) if r.sequence <= head.sequence)
        count = _write_out(
            out,
            lambda handle: write_bundle(
                handle,
                org=config.org,
                ca_pem=ca_pem,
                gateway_cert_pem=cert_pem,
                records=records,
                anchor=anchor,
                checkpoint=head,
            ),
        )
    if out is not None:
        click.echo(
            f"exported {count} records of {config.org} to {out} (head {head.sequence} "
            f"{head.head_hash})",
            err=True,
        )


# ---- reconcile ----


@audit.command("reconcile")
@click.argument("ours", type=click.Path(dir_okay=False))
@click.argument("theirs", type=click.Path(dir_okay=False))
@click.option(
    "--ca", type=click.Path(dir_okay=False), help="Federation CA (default: the CA carried in OURS)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def reconcile_command(ours: str, theirs: str, ca: str | None, as_json: bool) -> None:
    """Match two organizations' exported logs exchange by exchange; exit 1 on any mismatch."""
    our_bundle, their_bundle = read_bundle(ours), read_bundle(theirs)
    verifier = (
        Verifier.from_file(ca)
        if ca is not None
        else Verifier.from_pem(our_bundle.ca_pem, label=f"{ours} (CA in the bundle)")
    )
    mismatches = reconcile(our_bundle, their_bundle, verifier)
    tasks = {r.task_id for r in our_bundle.records if r.peer_org == their_bundle.org}
    tasks |= {r.task_id for r in their_bundle.records if r.peer_org == our_bundle.org}
    if as_json:
        _echo_json(
            {
                "ours": our_bundle.org,
                "theirs": their_bundle.org,
                "exchanges": len(tasks),
                "mismatches": [{"task_id": m.task_id, "message": m.message} for m in mismatches],
            }
        )
    elif not mismatches:
        click.echo(f"{our_bundle.org} and {their_bundle.org} agree on all {len(tasks)} exchanges")
    else:
        table = Table(
            title=f"{len(mismatches)} mismatches between {our_bundle.org} and "
            f"{their_bundle.org} ({len(tasks)} exchanges)"
        )
        table.add_column("task", overflow="fold")
        table.add_column("mismatch", overflow="fold")
        for mismatch in mismatches:
            table.add_row(mismatch.task_id or "(log)", mismatch.message)
        _console().print(table)
    if mismatches:
        sys.exit(1)


# ---- prune ----


@audit.command("prune")
@config_option
@click.option("--before", help="Remove records older than this date (ISO 8601).")
@click.option(
    "--older-than-days",
    type=click.FloatRange(min=0, min_open=True),
    help="Remove records older than this many days (default: [audit] retention_days).",
)
@click.option(
    "--archive",
    required=True,
    type=click.Path(dir_okay=False),
    help="Bundle file to archive the removed records to (must not exist).",
)
def prune(
    config_path: str, before: str | None, older_than_days: float | None, archive: str
) -> None:
    """Archive and delete old records, leaving a signed retention checkpoint at the cut."""
    config = read_config(config_path)
    if before is not None and older_than_days is not None:
        raise InvalidArgument("give either --before or --older-than-days, not both")
    cut = _parse_time(before, "--before")
    if cut is None:
        days = older_than_days or config.audit.retention_days
        if not days:
            raise InvalidArgument(
                "no cut given: pass --before DATE or --older-than-days N, or set [audit] "
                "retention_days"
            )
        cut = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    if Path(archive).exists():
        raise InvalidArgument(f"{archive} already exists: choose a new --archive file")
    signer = _signer(config)
    ca_pem = Path(config.federation.ca).read_bytes()
    cert_pem = Path(config.federation.cert).read_bytes()
    with _open(config) as store:
        anchor = store.retention_anchor()
        first = anchor.sequence + 1 if anchor is not None else 1
        through = store.cut_sequence(cut)
        if through < first:
            click.echo(f"nothing to prune: no record is older than {cut.isoformat()}")
            return
        report = store.verify(config.org, _verifier(config))
        if not report.ok:
            raise InvalidArgument(
                f"the audit log does not verify (record {report.problems[0].sequence}: "
                f"{report.problems[0].message}): investigate with `fedgate audit verify` "
                "before pruning"
            )
        cut_checkpoint = store.sign_cut(through, signer)
        records = (r for r in store.records(first) if r.sequence <= through)
        _write_out(
            archive,
            lambda handle: write_bundle(
                handle,
                org=config.org,
                ca_pem=ca_pem,
                gateway_cert_pem=cert_pem,
                records=records,
                anchor=anchor,
                checkpoint=cut_checkpoint,
            ),
        )
        removed = store.prune(cut_checkpoint)
    click.echo(
        f"archived and removed {removed} records (sequence {first}..{through}) older than "
        f"{cut.isoformat(timespec='seconds')} to {archive}; the log now chains from the signed "
        f"retention checkpoint at {through} {cut_checkpoint.head_hash}"
    )


COMMANDS: list[click.Command] = [audit]
