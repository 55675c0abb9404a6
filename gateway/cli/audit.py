"""`fedgate audit …`: review, verify, export, reconcile, checkpoint and prune the audit log."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from gateway.audit.bundle import (
    Bundle,
    ExportProblem,
    distinct_heads,
    read_bundle,
    verify_bundle,
    write_bundle,
)
from gateway.audit.chain import AuditRecord, VerifyReport, verify_chain
from gateway.audit.evidence import (
    Evidence,
    EvidenceCheck,
    check_evidence_files,
    collect_positions,
    write_evidence,
)
from gateway.audit.reconcile import receipt_problem, reconcile
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
from gateway.identity.signing import (
    SignedCheckpoint,
    Signer,
    Verifier,
    now_unix_ms,
    sign_checkpoint,
)

T = TypeVar("T")


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


@dataclass(frozen=True)
class _Trust:
    """The CA signatures are checked against, and how the auditor chose it."""

    verifier: Verifier
    described: str
    source: str  # "option", "config" or "bundle"


def _fingerprint(pem: bytes) -> str:
    certificate = x509.load_pem_x509_certificates(pem)[0]
    subject = certificate.subject.rfc4514_string()
    return f"subject {subject!r}, SHA-256 {certificate.fingerprint(hashes.SHA256()).hex()}"


def _bundle_trust(ca: str | None, trust_bundle_ca: bool, path: str, bundle: Bundle) -> _Trust:
    """--ca, or with --trust-bundle-ca (and a warning) the CA the bundle carries."""
    if ca is not None and trust_bundle_ca:
        raise InvalidArgument("give --ca or --trust-bundle-ca, not both")
    if ca is not None:
        return _Trust(Verifier.from_file(ca), f"the CA in {ca}", "option")
    if not trust_bundle_ca:
        raise InvalidArgument(
            f"{path}: pass --ca FILE, the federation CA you trust: the CA inside a bundle is "
            "whatever its maker put there, so a bundle signed under a self-made CA would "
            "verify (--trust-bundle-ca uses it anyway, reported as such)"
        )
    verifier = Verifier.from_pem(bundle.ca_pem, label=f"{path} (CA in the bundle)")
    described = f"the CA inside {path} ({_fingerprint(bundle.ca_pem)})"
    click.echo(
        f"WARNING: trusting {described}, chosen by the bundle's maker: this shows the bundle is "
        "consistent, not who wrote it; pass --ca with the federation CA to prove that",
        err=True,
    )
    return _Trust(verifier, described + ", not an independent trust anchor", "bundle")


def _verify_store(
    store: SqlAuditStore, org: str, verifier: Verifier, heads: Sequence[SignedCheckpoint]
) -> tuple[VerifyReport, list[SignedCheckpoint]]:
    """Walk the stored chain against our checkpoints and `heads`, each distinct head once."""
    anchor = store.retention_anchor()
    start = anchor.sequence + 1 if anchor is not None else 1
    newest = store.query(limit=1, newest_first=True)
    last = newest[0].sequence if newest else (anchor.sequence if anchor is not None else 0)
    checkpoints = distinct_heads([*store.own_checkpoints(), *heads], last)
    report = verify_chain(
        store.records(start), org=org, verifier=verifier, anchor=anchor, checkpoints=checkpoints
    )
    return report, checkpoints


def _hash_at(store: SqlAuditStore, sequence: int) -> str | None:
    record = next(store.records(sequence), None)
    return record.record_hash if record is not None and record.sequence == sequence else None


def _proved(
    report: VerifyReport,
    checkpoints: Sequence[SignedCheckpoint],
    evidence: EvidenceCheck,
    trust: _Trust,
    stubs: int,
) -> str:
    """One sentence: what an intact verification proves, and what it cannot."""
    signed = max([0, *(cp.sequence for cp in checkpoints), evidence.highest])
    chain = "every record links to the one before and matches its hash"
    if stubs:
        chain += f" ({stubs} stubs: linked, content not shown)"
    reach = f"the log reaches every signed head checked ({len(checkpoints)} distinct"
    if evidence.checked:
        reach += f", and {evidence.checked} positions held by {', '.join(evidence.holders)}"
    reach += f", highest {signed})" if signed else ")"
    cannot = (
        "a partner's evidence (--evidence) shows whether anything after that was cut"
        if not evidence.checked
        else "records written after the newest position a partner holds could still be cut "
        "unnoticed"
    )
    return (
        f"proved: {chain}, {reach}, signatures checked against {trust.described}; not proved: "
        f"that nothing after sequence {signed} was removed: {cannot}"
    )


def _print_report(
    report: VerifyReport,
    org: str,
    as_json: bool,
    *,
    proved: str,
    trust: _Trust,
    evidence: EvidenceCheck,
) -> None:
    for line in evidence.rejected:
        click.echo(f"note: {line}", err=True)
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
                "evidence_positions_checked": evidence.checked,
                "evidence_rejected": evidence.rejected,
                "trusted_ca": {"source": trust.source, "described": trust.described},
                "proved": proved if report.ok else None,
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
            f"{report.head_sequence} {report.head_hash}; {proved}"
        )
    else:
        first = report.problems[0]
        click.echo(
            f"audit log of {org} FAILED verification at record {first.sequence}: {first.message}"
        )
        seen = {first.message}
        for problem in report.problems[1:]:
            if problem.message not in seen:
                seen.add(problem.message)
                click.echo(f"  also at record {problem.sequence}: {problem.message}")
    if not report.ok:
        sys.exit(1)


@audit.command("verify")
@config_option
@click.option(
    "--bundle",
    type=click.Path(dir_okay=False),
    help="Verify an exported bundle offline instead of the configured store (needs --ca).",
)
@click.option(
    "--ca",
    type=click.Path(dir_okay=False),
    help="Federation CA to check signatures with (default for the store: [federation] ca).",
)
@click.option(
    "--trust-bundle-ca",
    is_flag=True,
    help="With --bundle and no --ca: trust the CA the bundle carries (warns; proves little).",
)
@click.option(
    "--head",
    "heads",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A signed head of ours kept by a partner (JSON): detects a cut tail. Repeatable.",
)
@click.option(
    "--evidence",
    "evidence_paths",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="What a partner holds about our log (`fedgate audit evidence` there): names a cut "
    "tail or a rewrite. Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(
    config_path: str,
    bundle: str | None,
    ca: str | None,
    trust_bundle_ca: bool,
    heads: tuple[str, ...],
    evidence_paths: tuple[str, ...],
    as_json: bool,
) -> None:
    """Walk the hash chain, check every signed head and position; exit 1 on tampering."""
    signed_heads = _read_heads(heads)
    if bundle is not None:
        exported = read_bundle(bundle)
        trust = _bundle_trust(ca, trust_bundle_ca, bundle, exported)
        report = verify_bundle(exported, trust.verifier, heads=signed_heads)
        last = exported.chain[-1].sequence if exported.chain else 0
        checkpoints = distinct_heads([*exported.checkpoints, *signed_heads], last)
        hashes = {entry.sequence: entry.record_hash for entry in exported.chain}
        evidence = check_evidence_files(
            report, evidence_paths, trust.verifier, exported.org, hashes.get, exported.anchor
        )
        proved = _proved(report, checkpoints, evidence, trust, len(exported.stubs))
        _print_report(report, exported.org, as_json, proved=proved, trust=trust, evidence=evidence)
        return
    if trust_bundle_ca:
        raise InvalidArgument("--trust-bundle-ca applies to --bundle only")
    config = read_config(config_path)
    trust = (
        _Trust(Verifier.from_file(ca), f"the CA in {ca}", "option")
        if ca is not None
        else _Trust(_verifier(config), f"[federation] ca {config.federation.ca}", "config")
    )
    with _open(config) as store:
        report, checkpoints = _verify_store(store, config.org, trust.verifier, signed_heads)
        evidence = check_evidence_files(
            report,
            evidence_paths,
            trust.verifier,
            config.org,
            lambda sequence: _hash_at(store, sequence),
            store.retention_anchor(),
        )
    proved = _proved(report, checkpoints, evidence, trust, 0)
    _print_report(report, config.org, as_json, proved=proved, trust=trust, evidence=evidence)


# ---- checkpoint / export / evidence ----


@audit.command("checkpoint")
@config_option
def checkpoint(config_path: str) -> None:
    """Sign and keep the current head; print it as JSON (what a partner keeps)."""
    config = read_config(config_path)
    signer = _signer(config)
    with _open(config) as store:
        signed = asyncio.run(store.checkpoint(signer))
    _echo_json(signed.to_json())
    click.echo(
        f"signed head {signed.sequence} {signed.head_hash} of {config.org}: whoever keeps it can "
        f"show with `fedgate audit verify --head FILE` that records 1..{signed.sequence} "
        "existed as they are now",
        err=True,
    )


def _write_out(out: str | None, write: Callable[[TextIO], T]) -> T:
    """Run write(handle) to stdout or atomically to the file `out`."""
    if out is None:
        return write(sys.stdout)
    target = Path(out)
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            result = write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"{out}: cannot write: {exc.strerror}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return result


@audit.command("export")
@config_option
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="File to write (default: stdout).")
@click.option(
    "--peer",
    help="For this partner: its exchanges in full, every other record as a stub (sequence and "
    "hashes only), still verifiable against our chain.",
)
@click.option(
    "--allow-broken",
    is_flag=True,
    help="Export a log that fails verification, marked as broken in the bundle, with no head "
    "signed for it.",
)
@click.option(
    "--include-plain-digests",
    is_flag=True,
    help="With --peer: export in full the partner's records whose pre-filter digest is a plain "
    "SHA-256 (older records; they let the partner test guesses of withheld values).",
)
def export(
    config_path: str,
    fmt: str,
    out: str | None,
    peer: str | None,
    allow_broken: bool,
    include_plain_digests: bool,
) -> None:
    """Verify the log, then export a bundle that `fedgate audit verify --bundle` checks offline."""
    config = read_config(config_path)
    if peer == config.org:
        raise InvalidArgument(f"--peer {peer} is this gateway's own organization: name a partner")
    if include_plain_digests and peer is None:
        raise InvalidArgument("--include-plain-digests applies to --peer exports only")
    signer = _signer(config)
    ca_pem = Path(config.federation.ca).read_bytes()
    cert_pem = Path(config.federation.cert).read_bytes()
    with _open(config) as store:
        report, checkpoints = _verify_store(store, config.org, _verifier(config), ())
        anchor = store.retention_anchor()
        start = anchor.sequence + 1 if anchor is not None else 1
        broken: ExportProblem | None = None
        if report.ok:
            # Sign exactly the head just verified: records appended since are not in this bundle.
            heads = [sign_checkpoint(signer, report.head_sequence, report.head_hash)]
            records: Iterable[AuditRecord] = itertools.takewhile(
                lambda record: record.sequence <= report.head_sequence, store.records(start)
            )
        else:
            first = report.problems[0]
            if not allow_broken:
                raise InvalidArgument(
                    f"the audit log of {config.org} does not verify at record {first.sequence} "
                    f"({first.message}): nothing exported; investigate with `fedgate audit "
                    "verify`, or pass --allow-broken to export it marked as broken (no head is "
                    "signed for it)"
                )
            broken = ExportProblem(first.sequence, first.message)
            heads, records = checkpoints, store.records(start)  # the heads as signed before
        written = _write_out(
            out,
            lambda handle: write_bundle(
                handle,
                org=config.org,
                ca_pem=ca_pem,
                gateway_cert_pem=cert_pem,
                records=records,
                anchor=anchor,
                checkpoints=heads,
                peer=peer,
                broken=broken,
                include_plain_digests=include_plain_digests,
            ),
        )
    where = out or "stdout"
    if broken is not None:
        click.echo(
            f"WARNING: exported {written.records} records of {config.org} to {where} MARKED "
            f"BROKEN: the log fails verification at record {broken.sequence}, and no head was "
            "signed for it; `fedgate audit verify --bundle` reports it failed",
            err=True,
        )
        return
    scope = "" if peer is None else f" of exchanges with {peer}"
    stubs = f" and {written.stubs} stubs of other records" if peer is not None else ""
    click.echo(
        f"exported {written.records} records{scope}{stubs} of {config.org} to {where} (head "
        f"{report.head_sequence} {report.head_hash}); proved before export: the chain is intact "
        f"through {report.head_sequence} and reaches all {len(checkpoints)} distinct signed "
        "heads, and the bundle's head is signed only now",
        err=True,
    )
    if written.sealed:
        click.echo(
            f"note: {written.sealed} records of exchanges with {peer} are sealed (stubs with "
            "task id and kind only): they hold a payload before filtering or a plain SHA-256 "
            f"pre-filter digest that would let {peer} test guesses of withheld values "
            "(--include-plain-digests exports the latter in full)",
            err=True,
        )


@audit.command("evidence")
@config_option
@click.option("--peer", required=True, help="The partner whose log the evidence is about.")
@click.option("--out", type=click.Path(dir_okay=False), help="File to write (default: stdout).")
def evidence_command(config_path: str, peer: str, out: str | None) -> None:
    """Write what we hold about a partner's log: its highest signed chain positions."""
    config = read_config(config_path)
    if peer == config.org:
        raise InvalidArgument(f"--peer {peer} is this gateway's own organization: name a partner")
    verifier = _verifier(config)
    with _open(config) as store:
        positions = collect_positions(
            store.peer_checkpoints(peer),
            (record for record in store.records() if record.peer_org == peer),
            verifier,
            org=peer,
            holder=config.org,
        )
    if not positions:
        raise NotFound(
            f"this log holds no signed chain position of {peer!r}: it has none until a "
            f"checkpoint exchange with {peer} or a receipt that carries one (receipt v2)"
        )
    held = Evidence(config.org, peer, now_unix_ms(), positions)
    count = _write_out(out, lambda handle: write_evidence(handle, held))
    top = max(positions, key=lambda p: p.sequence)
    click.echo(
        f"wrote {count} signed positions of {peer}'s log to {out or 'stdout'} (highest: "
        f"sequence {top.sequence}, {top.describe()}): each proves, under {peer}'s signature, "
        f"that its log held that record; {peer} checks its log against them with `fedgate "
        "audit verify --evidence FILE`",
        err=True,
    )


# ---- reconcile ----


@audit.command("reconcile")
@click.argument("ours", type=click.Path(dir_okay=False))
@click.argument("theirs", type=click.Path(dir_okay=False))
@click.option("--ca", type=click.Path(dir_okay=False), help="Federation CA you trust.")
@click.option(
    "--trust-bundle-ca",
    is_flag=True,
    help="Without --ca: trust the CA carried in OURS (warns; proves little).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def reconcile_command(
    ours: str, theirs: str, ca: str | None, trust_bundle_ca: bool, as_json: bool
) -> None:
    """Match two organizations' exported logs exchange by exchange; exit 1 on any mismatch."""
    our_bundle, their_bundle = read_bundle(ours), read_bundle(theirs)
    trust = _bundle_trust(ca, trust_bundle_ca, ours, our_bundle)
    found = reconcile(our_bundle, their_bundle, trust.verifier)
    a, b = our_bundle.org, their_bundle.org
    if as_json:
        _echo_json(
            {
                "ours": a,
                "theirs": b,
                "exchanges": found.exchanges,
                "trusted_ca": {"source": trust.source, "described": trust.described},
                "mismatches": [
                    {"task_id": m.task_id, "message": m.message} for m in found.mismatches
                ],
                "open": [
                    {"org": o.org, "task_id": o.task_id, "sequence": o.sequence, "kind": o.kind}
                    for o in found.open
                ],
            }
        )
    elif not found.mismatches:
        agreed = (
            f"{a} and {b} agree on all {found.exchanges} exchanges: both chains verify, every "
            "request and result matches digest for digest, every receipt is signed by its "
            "responder and both logs agree with it (withheld paths, field actions, decision, "
            f"policy version), checked against {trust.described}"
        )
        click.echo(agreed + (f"; {len(found.open)} requests are still open" if found.open else ""))
    else:
        table = Table(
            title=f"{len(found.mismatches)} mismatches between {a} and {b} ({found.exchanges} "
            "exchanges)"
        )
        table.add_column("task", overflow="fold")
        table.add_column("mismatch", overflow="fold")
        for mismatch in found.mismatches:
            table.add_row(mismatch.task_id or "(log)", mismatch.message)
        _console().print(table)
    if found.open and not as_json:
        table = Table(
            title=f"{len(found.open)} requests open: no result, failure, cancel or later attempt "
            "with the same key closes them (in flight at export, or never closed)"
        )
        for column in ("log", "task", "record", "event", "peer"):
            table.add_column(column, overflow="fold")
        for item in found.open:
            table.add_row(item.org, item.task_id, str(item.sequence), item.kind, item.peer_org)
        _console().print(table)
    if found.mismatches:
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
        report, _ = _verify_store(store, config.org, _verifier(config), ())
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
                checkpoints=[cut_checkpoint],
            ),
        )
        removed = store.prune(cut_checkpoint)
    click.echo(
        f"archived and removed {removed} records (sequence {first}..{through}) older than "
        f"{cut.isoformat(timespec='seconds')} to {archive}; the log now chains from the signed "
        f"retention checkpoint at {through} {cut_checkpoint.head_hash}"
    )


COMMANDS: list[click.Command] = [audit]
