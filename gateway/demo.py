"""`fedgate demo`: a hospital and an insurer, their gateways, agents, policies and audit trails.

Everything is real: both gateways listen on loopback with mutual TLS from the development
certificates in certs_dev/, agents register through the participant SDK, the policies in
policies/ decide what leaves, and both sides write and verify their audit logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from gateway.audit import AuditRecord
from gateway.local import LocalFederation, write_gateway_config
from gateway.payload import digest
from gateway.signing import SignedReceipt, verify_receipt
from participant_sdk import Agent, AgentWorker, Client, TaskContext

PATIENT_RECORD: dict[str, Any] = {
    "patient": {
        "name": "Ada Lovelace",
        "date_of_birth": "1985-12-10",
        "ssn": "123-45-6789",
        "insurance_id": "INS-99887766",
        "address": {"street": "12 Analytical Row", "city": "London", "zip": "NW1 6XE"},
    },
    "diagnoses": [
        {"code": "J45.20", "description": "mild intermittent asthma", "date": "2026-03-14"},
        {"code": "E11.9", "description": "type 2 diabetes", "date": "2025-11-02"},
    ],
    "treatment_cost": 1840.5,
    "notes": "prefers morning appointments; daughter is emergency contact",
}

CLAIM: dict[str, Any] = {
    "claim": {"amount": 1840.5, "procedure_code": "99214", "diagnosis_code": "J45.20",
              "date_of_service": "2026-03-14"},
    "patient": {"name": "Ada Lovelace", "ssn": "123-45-6789", "insurance_id": "INS-99887766",
                "date_of_birth": "1985-12-10"},
}


def _repository_root() -> Path:
    """The folder holding certs_dev/ and policies/: the source checkout, else the current one."""
    for candidate in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (candidate / "certs_dev" / "ca.crt").is_file() and (candidate / "policies" / "model.conf").is_file():
            return candidate
    raise FileNotFoundError(
        "certs_dev/ and policies/ not found: run `fedgate demo` from a clone of the Fedgate "
        "repository (pip install -e .)"
    )


def _hospital_agents() -> list[Agent]:
    records = Agent("records", description="Patient records of the hospital")

    @records.skill(
        input_schema={"type": "object", "properties": {"patient_id": {"type": "string"}}},
        output_schema={"type": "object"},
    )
    async def summary(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        """A patient's summary record."""
        await task.progress("looking up the patient record")
        return PATIENT_RECORD

    return [records]


def _insurer_agents() -> list[Agent]:
    claims = Agent("claims", description="Claims decisions of the insurer")

    @claims.skill(output_schema={"type": "object", "properties": {"approved": {"type": "boolean"}}})
    async def check(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        """Decide whether a claim is covered."""
        amount = float(data.get("claim", {}).get("amount", 0))
        return {
            "approved": amount <= 5000,
            "covered_amount": min(amount, 5000),
            "reason_code": "COVERED" if amount <= 5000 else "OVER_LIMIT",
            "fraud_score": 0.07,
        }

    return [claims]


def _short_rule(rule: str | None) -> str:
    """'…/policies/hospital.csv:19: p, insurer, records, summary, share, patient.name, deny'
    becomes 'hospital.csv:19  patient.name -> deny'."""
    if not rule:
        return "no rule: default deny"
    source, _, text = rule.partition(": ")
    columns = [c.strip() for c in text.split(",")]
    where = Path(source.rpartition(":")[0]).name + ":" + source.rpartition(":")[2]
    if len(columns) >= 7:
        condition = f" if {columns[7]}" if len(columns) > 7 and columns[7] else ""
        return f"{where}  {columns[5]} -> {columns[6]}{condition}"
    return f"{where}  {text}"


def _show(value: Any) -> str:
    return "—" if value is None else json.dumps(value) if not isinstance(value, str) else value


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(value, list):
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{index}]"))
        return out
    return {prefix: value}


def _exchange_table(title: str, inside: dict[str, Any], left: dict[str, Any],
                    actions: dict[str, str], rules: dict[str, str]) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("field")
    table.add_column("inside the organization")
    table.add_column("what left")
    table.add_column("action")
    table.add_column("rule that decided", overflow="fold")
    released = _flatten(left)
    for path, value in _flatten(inside).items():
        action = actions.get(path, "as is" if path in released else "withheld")
        style = {"withheld": "red", "as is": "green"}.get(action, "yellow")
        table.add_row(path, _show(value), _show(released.get(path)) if path in released else "—",
                      f"[{style}]{action}[/]", rules.get(path, "no rule: default deny"))
    return table


def _audit_table(org: str, records: list[AuditRecord]) -> Table:
    table = Table(title=f"audit log of {org}", title_justify="left")
    for column in ("#", "event", "peer", "agent.skill", "decision", "fields withheld / transformed",
                   "payload digest after policy", "receipt"):
        table.add_column(column)
    for r in records:
        table.add_row(
            str(r.sequence), r.kind, r.peer_org, f"{r.agent}.{r.skill}", r.decision,
            f"{len(r.withheld_paths)} / {len(r.transformed)}",
            (r.digest_after or "—")[:23] + ("…" if r.digest_after else ""),
            "signed" if r.receipt else "—",
        )
    return table


async def run_demo(*, quiet: bool = False) -> int:
    console = Console(quiet=quiet, width=None if Console().is_terminal else 150)
    root = _repository_root()
    certs, policies = root / "certs_dev", root / "policies"
    console.print(Panel.fit(
        "[bold]Fedgate demo[/]: a hospital and an insurer cooperate through their own gateways.\n"
        "Each gateway enforces its organization's sharing policy and writes its own audit log.\n"
        f"[dim]mTLS with the development certificates in {certs} (insecure, local use only)[/]"))
    with tempfile.TemporaryDirectory(prefix="fedgate-demo-") as tmp:
        paths = [
            write_gateway_config(
                Path(tmp) / org, org, cert=certs / f"{org}.crt", key=certs / f"{org}.key",
                ca=certs / "ca.crt", model=policies / "model.conf", rules=policies / f"{org}.csv",
                peers=[peer],
            )
            for org, peer in (("hospital", "insurer"), ("insurer", "hospital"))
        ]
        federation = LocalFederation(paths)
        await federation.start()
        workers: list[tuple[AgentWorker, asyncio.Task[None]]] = []
        try:
            ok = await _scenes(console, federation, workers)
        finally:
            for worker, task in workers:
                worker.stop()
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await federation.stop()
    console.print("[bold green]demo complete[/]" if ok else "[bold red]demo found a problem[/]")
    if quiet:
        print("fedgate demo: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


async def _scenes(console: Console, fed: LocalFederation, workers: list[tuple[AgentWorker, asyncio.Task[None]]]) -> bool:
    gateways = Table(title="1. two gateways on this machine", title_justify="left")
    for column in ("organization", "federation listener (mTLS)", "participant listener (SDK)"):
        gateways.add_column(column)
    for org in ("hospital", "insurer"):
        gateways.add_row(org, fed.federation(org), fed.participant(org))
    console.print(gateways)

    for org, agents in (("hospital", _hospital_agents()), ("insurer", _insurer_agents())):
        worker = AgentWorker(agents, fed.participant(org), instance_id=f"{org}-demo")
        workers.append((worker, asyncio.ensure_future(worker.run())))
        await asyncio.wait_for(worker.connected.wait(), 10)
        console.print(f"2. [bold]{org}[/] registered agents through the SDK: "
                      + ", ".join(f"{org}/{a.name}.{s}" for a in agents for s in a.skills))

    # Scene 3: the insurer's claims adjuster asks the hospital for a patient summary.
    console.print("\n3. insurer's claims adjuster calls [bold]hospital/records.summary[/] for patient P-1001")
    async with Client(fed.participant("insurer"), requester="claims-adjuster-7") as client:
        states = []
        async for update in client.stream("hospital/records.summary", {"patient_id": "P-1001"}, timeout=15):
            states.append(update.state)
            if update.final:
                result = update.result
    assert result is not None
    console.print(f"   states seen by the insurer: {' -> '.join(states)}")
    hospital_policy = fed["hospital"].router.current_policy()
    assert hospital_policy is not None
    explained = hospital_policy.filter("insurer", "records", "summary", "share", PATIENT_RECORD)
    rules = {d.path: _short_rule(d.rule) for d in explained.decisions}
    console.print(_exchange_table(
        "   what the hospital's agent returned, and what its policy let leave",
        PATIENT_RECORD, result.output, dict(result.field_actions), rules))
    receipt_ok = _check_receipt(fed, result.receipt, result.output)
    console.print(f"   signed receipt from hospital over the released result: "
                  f"{'[green]verified[/]' if receipt_ok else '[red]INVALID[/]'}  "
                  f"(policy {result.policy_version[:19]}…)")
    console.print("   [dim]the same view from the command line: fedgate policy explain --peer insurer "
                  "--agent records --skill summary --direction share --payload record.json[/]")

    # Scene 4: the hospital sends a claim; its send policy filters the request first.
    console.print("\n4. hospital calls [bold]insurer/claims.check[/] with a claim")
    async with Client(fed.participant("hospital"), requester="billing-office") as client:
        claim = await client.call("insurer/claims.check", CLAIM, timeout=15)
    sent = hospital_policy.filter("insurer", "claims", "check", "send", CLAIM)
    console.print(_exchange_table(
        "   the hospital's request, and what its policy let leave", CLAIM, sent.output,
        dict(sent.transformed), {d.path: _short_rule(d.rule) for d in sent.decisions}))
    console.print(f"   insurer answered: {json.dumps(claim.output)}")
    console.print(f"   insurer's policy withheld from its answer: {', '.join(claim.withheld) or 'nothing'}")

    # Scene 5: both audit trails, a checkpoint exchange, and verification.
    console.print("\n5. audit trails (paths and digests only: no withheld value is ever recorded)")
    verified = True
    for org in ("hospital", "insurer"):
        console.print(_audit_table(org, fed[org].audit.query(limit=50)))
    outcome = await fed["hospital"].exchange_checkpoints()
    console.print(f"   signed chain heads exchanged: hospital <-> insurer {outcome['insurer']}")
    for org in ("hospital", "insurer"):
        gateway = fed[org]
        report = gateway.audit.verify(org, gateway.router.verifier, heads=gateway_peer_heads(fed, org))
        verified &= report.ok
        state = "[green]intact[/]" if report.ok else f"[red]{report.problems[0]}[/]"
        console.print(f"   {org}: {report.records} records, chain {state}, "
                      f"{report.checkpoints_checked} signed checkpoints checked")
    console.print("   [dim]auditors: fedgate audit list | show TASK | verify | export | reconcile[/]")

    left = json.dumps(result.output)
    leaked = [v for v in ("Ada Lovelace", "12 Analytical Row", "INS-99887766", "123-45-6789") if v in left]
    if leaked:
        console.print(f"[red]withheld values left the hospital: {leaked}[/]")
    return receipt_ok and verified and not leaked and claim.ok


def gateway_peer_heads(fed: LocalFederation, org: str) -> list[Any]:
    """The signed heads of `org` that its partners keep: what proves no tail was cut."""
    return [c for other, gw in fed.gateways.items() if other != org
            for c in gw.audit.peer_checkpoints(org)]


def _check_receipt(fed: LocalFederation, receipt: dict[str, Any] | None, output: dict[str, Any]) -> bool:
    if receipt is None:
        return False
    try:
        verify_receipt(fed["insurer"].router.verifier, SignedReceipt.from_json(receipt),
                       expected_org="hospital", released_output=output)
    except Exception:
        return False
    return digest(output) == receipt["result_digest"]
