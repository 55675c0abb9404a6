"""`fedgate demo`: a hospital, an insurer and a lab, their gateways, agents, policies and logs.

Everything is real: the gateways listen on loopback with mutual TLS from a federation CA made
for this run (and thrown away after it), agents register through the participant SDK, the
policies in policies/ decide what leaves, and every side writes and verifies its audit log.
The policies come from the checkout when run from a clone, and from the copy built into the
package otherwise (setup.py), so `pip install .` then `fedgate demo` works from anywhere.
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

from gateway.audit.store import AuditRecord
from gateway.edges.a2a.demo import a2a_scene
from gateway.errors import ConfigError
from gateway.identity.certs import create_ca, issue_gateway_cert, write_pair
from gateway.identity.signing import SignedReceipt, verify_receipt
from gateway.identity.tokens import token_authority
from gateway.local import LocalFederation, write_gateway_config
from participant_sdk import Agent, AgentWorker, Client, TaskContext, majority

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
    "claim": {
        "amount": 1840.5,
        "procedure_code": "99214",
        "diagnosis_code": "J45.20",
        "date_of_service": "2026-03-14",
    },
    "patient": {
        "name": "Ada Lovelace",
        "ssn": "123-45-6789",
        "insurance_id": "INS-99887766",
        "date_of_birth": "1985-12-10",
    },
}


DEMO_POLICY_FILES = ("model.conf", "hospital.csv", "insurer.csv", "lab.csv")
# Where the package build puts its copy of policies/ (see setup.py).
PACKAGED_POLICIES = Path(__file__).resolve().parent / "resources" / "demo_policies"


def demo_policies() -> Path:
    """The folder of the demo's policies: the checkout's policies/, else the packaged copy."""
    for candidate in (Path(__file__).resolve().parents[1] / "policies", PACKAGED_POLICIES):
        if all((candidate / name).is_file() for name in DEMO_POLICY_FILES):
            return candidate
    raise ConfigError(
        f"the demo's policies are missing from {PACKAGED_POLICIES}: reinstall Fedgate "
        "(`pip install --force-reinstall fedgate`), or run the demo from a clone"
    )


def _throwaway_federation(folder: Path) -> Path:
    """A federation CA and one certificate per organization, made for this run only."""
    ca = create_ca("Fedgate demo CA, made for one run and deleted after it")
    write_pair(ca, folder / "ca.crt", folder / "ca.key")
    for org in ORGS:
        write_pair(issue_gateway_cert(ca, org), folder / f"{org}.crt", folder / f"{org}.key")
    return folder


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

    @records.skill
    async def lab_summary(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        """The latest lab result of a patient: asks the lab while serving the caller."""
        lab = await task.call(
            "lab/tests.latest", {"test": "HbA1c", "patient_id": data.get("patient_id")}
        )
        return {"lab": lab.output, "patient_id": data.get("patient_id")}

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

    @claims.skill
    async def review(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        """A second opinion on a claim."""
        return {"approved": True, "covered_amount": float(data.get("claim", {}).get("amount", 0))}

    return [claims]


def _lab_agents(seen: list[dict[str, Any]]) -> list[Agent]:
    tests = Agent("tests", description="Laboratory results")

    @tests.skill
    async def latest(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        """The latest result of a test."""
        seen.append(data)
        return {"test": data.get("test"), "result": "6.1 %", "instrument": "analyzer-7"}

    coverage = Agent("coverage", description="Coverage estimates")

    @coverage.skill
    async def estimate(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        """A (stricter) estimate of whether a claim is covered."""
        return {"approved": False, "covered_amount": 0}

    return [tests, coverage]


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


def _exchange_table(
    title: str,
    inside: dict[str, Any],
    left: dict[str, Any],
    actions: dict[str, str],
    rules: dict[str, str],
) -> Table:
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
        table.add_row(
            path,
            _show(value),
            _show(released.get(path)) if path in released else "—",
            f"[{style}]{action}[/]",
            rules.get(path, "no rule: default deny"),
        )
    return table


def _audit_table(org: str, records: list[AuditRecord]) -> Table:
    table = Table(title=f"audit log of {org}", title_justify="left")
    for column in (
        "#",
        "event",
        "peer",
        "agent.skill",
        "decision",
        "fields withheld / transformed",
        "payload digest after policy",
        "receipt",
    ):
        table.add_column(column)
    for r in records:
        table.add_row(
            str(r.sequence),
            r.kind,
            r.peer_org,
            f"{r.agent}.{r.skill}",
            r.decision,
            f"{len(r.withheld_paths)} / {len(r.transformed)}",
            (r.digest_after or "—")[:23] + ("…" if r.digest_after else ""),
            "signed" if r.receipt else "—",
        )
    return table


ORGS = ("hospital", "insurer", "lab")
PEERS = {"hospital": ["insurer", "lab"], "insurer": ["hospital"], "lab": ["hospital"]}


async def run_demo(*, quiet: bool = False) -> int:
    console = Console(quiet=quiet, width=None if Console().is_terminal else 150)
    policies = demo_policies()
    with tempfile.TemporaryDirectory(prefix="fedgate-demo-") as tmp:
        certs = _throwaway_federation(Path(tmp) / "pki")
        console.print(
            Panel.fit(
                "[bold]Fedgate demo[/]: a hospital, an insurer and a lab cooperate through their "
                "own gateways.\n"
                "Each gateway enforces its organization's sharing policy and writes its own "
                "audit log.\n"
                "[dim]mTLS with a federation CA made for this run (deleted after it); "
                f"policies from {policies}[/]"
            )
        )
        paths = [
            write_gateway_config(
                Path(tmp) / org,
                org,
                cert=certs / f"{org}.crt",
                key=certs / f"{org}.key",
                ca=certs / "ca.crt",
                model=policies / "model.conf",
                rules=policies / f"{org}.csv",
                peers=PEERS[org],
                require_tokens=True,
            )
            for org in ORGS
        ]
        federation = LocalFederation(paths)
        await federation.start()
        demo = _Demo(console, federation)
        try:
            ok = await demo.run()
            # Scene 9 (the A2A edges, gateway/edges/a2a/demo.py) runs its own two gateways.
            ok = await a2a_scene(console, certs=certs, model=policies / "model.conf", step=9) and ok
        finally:
            await demo.close()
            await federation.stop()
    console.print("[bold green]demo complete[/]" if ok else "[bold red]demo found a problem[/]")
    if quiet:
        print("fedgate demo: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


class _Demo:
    """The scenes of the demo, in order; each returns whether what it showed held."""

    def __init__(self, console: Console, fed: LocalFederation) -> None:
        self.console = console
        self.fed = fed
        self.workers: list[tuple[AgentWorker, asyncio.Task[None]]] = []
        self.clients: list[Client] = []
        self.lab_seen: list[dict[str, Any]] = []

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for worker, task in self.workers:
            worker.stop()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def client(self, org: str, subject: str, calls: list[str]) -> Client:
        """A requester with a real token issued by its own gateway."""
        token = token_authority(self.fed[org].config).issue(subject, calls=calls)
        client = Client(self.fed.participant(org), token=token)
        self.clients.append(client)
        return client

    async def run(self) -> bool:
        await self.start_agents()
        checks = [
            await self.scene_share(),
            await self.scene_send(),
            await self.scene_multi_hop(),
            await self.scene_fallback_and_fan_out(),
        ]
        checks.append(await self.scene_audit())
        return all(checks)

    async def start_agents(self) -> None:
        table = Table(title="1. three gateways on this machine", title_justify="left")
        for column in ("organization", "federation listener (mTLS)", "participant listener (SDK)"):
            table.add_column(column)
        for org in ORGS:
            table.add_row(org, self.fed.federation(org), self.fed.participant(org))
        self.console.print(table)
        for org, agents in (
            ("hospital", _hospital_agents()),
            ("insurer", _insurer_agents()),
            ("lab", _lab_agents(self.lab_seen)),
        ):
            # Each agent process holds a token that names the agents it may register (and, for
            # the hospital's records agent, the lab skill it may call onward).
            token = token_authority(self.fed[org].config).issue(
                f"{org}-agents",
                agents=[a.name for a in agents],
                calls=["lab/tests.latest"] if org == "hospital" else [],
            )
            worker = AgentWorker(
                agents, self.fed.participant(org), token=token, instance_id=f"{org}-demo"
            )
            self.workers.append((worker, asyncio.ensure_future(worker.run())))
            await asyncio.wait_for(worker.connected.wait(), 10)
            self.console.print(
                f"2. [bold]{org}[/] registered agents through the SDK with a signed token: "
                + ", ".join(f"{org}/{a.name}.{s}" for a in agents for s in a.skills)
            )

    async def scene_share(self) -> bool:
        self.console.print(
            "\n3. insurer's claims adjuster calls [bold]hospital/records.summary[/] "
            "for patient P-1001"
        )
        client = self.client("insurer", "claims-adjuster-7", ["hospital/records.*"])
        states = []
        result = None
        async for update in client.stream(
            "hospital/records.summary", {"patient_id": "P-1001"}, timeout=15
        ):
            states.append(update.state)
            if update.final:
                result = update.result
        assert result is not None
        self.console.print(f"   states seen by the insurer: {' -> '.join(states)}")
        policy = self.fed["hospital"].router.current_policy()
        assert policy is not None
        explained = policy.filter("insurer", "records", "summary", "share", PATIENT_RECORD)
        self.console.print(
            _exchange_table(
                "   what the hospital's agent returned, and what its policy let leave",
                PATIENT_RECORD,
                result.output,
                dict(result.field_actions),
                {d.path: _short_rule(d.rule) for d in explained.decisions},
            )
        )
        receipt_ok = self.receipt_ok(result.receipt, "hospital", result.output)
        self.console.print(
            f"   signed receipt from hospital over the released result: "
            f"{'[green]verified[/]' if receipt_ok else '[red]INVALID[/]'}  "
            f"(policy {result.policy_version[:19]}…)"
        )
        self.console.print(
            "   [dim]the same view from the command line: fedgate policy explain --peer insurer "
            "--agent records --skill summary --direction share --payload record.json[/]"
        )
        left = json.dumps(result.output)
        leaked = [
            v
            for v in ("Ada Lovelace", "12 Analytical Row", "INS-99887766", "123-45-6789")
            if v in left
        ]
        if leaked:
            self.console.print(f"[red]withheld values left the hospital: {leaked}[/]")
        return receipt_ok and not leaked

    async def scene_send(self) -> bool:
        self.console.print(
            "\n4. hospital's billing office calls [bold]insurer/claims.check[/] with a claim"
        )
        client = self.client("hospital", "billing-office", ["insurer/claims.*", "lab/*"])
        claim = await client.call("insurer/claims.check", CLAIM, timeout=15)
        policy = self.fed["hospital"].router.current_policy()
        assert policy is not None
        sent = policy.filter("insurer", "claims", "check", "send", CLAIM)
        self.console.print(
            _exchange_table(
                "   the hospital's request, and what its policy let leave",
                CLAIM,
                sent.output,
                dict(sent.transformed),
                {d.path: _short_rule(d.rule) for d in sent.decisions},
            )
        )
        self.console.print(f"   insurer answered: {json.dumps(claim.output)}")
        self.console.print(
            "   insurer's policy withheld from its answer: "
            + (", ".join(claim.withheld) or "nothing")
        )
        return claim.ok and "fraud_score" in claim.withheld

    async def scene_multi_hop(self) -> bool:
        self.console.print(
            "\n5. multi-hop: insurer calls [bold]hospital/records.lab_summary[/]; the hospital's "
            "agent asks [bold]lab/tests.latest[/] while serving it"
        )
        client = self.client("insurer", "claims-adjuster-7", ["hospital/records.*"])
        result = await client.call(
            "hospital/records.lab_summary", {"patient_id": "P-1001"}, timeout=15
        )
        sent_on = self.lab_seen[-1] if self.lab_seen else {}
        self.console.print(
            f"   what reached the lab: {json.dumps(sent_on)}  "
            "[dim](the patient id stays home: the data came from the insurer, "
            "rule origin!=insurer)[/]"
        )
        self.console.print(f"   what the insurer got: {json.dumps(result.output)}")
        chain = [
            f"{r['responder_org']} (signed receipt, withheld: "
            f"{', '.join(r['withheld_paths']) or 'nothing'})"
            for r in (result.provenance + ((result.receipt,) if result.receipt else ()))
        ]
        self.console.print(f"   provenance: {' -> '.join(chain)}")
        verified = all(self.receipt_ok(r, r["responder_org"], None) for r in result.provenance)
        return (
            result.ok and "patient_id" not in sent_on and verified and len(result.provenance) == 1
        )

    async def scene_fallback_and_fan_out(self) -> bool:
        client = self.client("hospital", "billing-office", ["insurer/claims.*", "lab/*"])
        self.console.print(
            "\n6. fallback: hospital tries [bold]lab/claims.check[/], "
            "then [bold]insurer/claims.check[/]"
        )
        routed = await client.call_first(
            ["lab/claims.check", "insurer/claims.check"], CLAIM, timeout=15
        )
        for target, error in routed.attempts:
            self.console.print(f"   {target}: [yellow]{type(error).__name__}[/]: {error}")
        self.console.print(f"   {routed.target}: [green]answered[/] {json.dumps(routed.output)}")
        self.console.print(
            "\n7. fan-out: three agents of two organizations vote on [bold]approved[/] (majority)"
        )
        votes = await client.fan_out(
            ["insurer/claims.check", "insurer/claims.review", "lab/coverage.estimate"],
            CLAIM,
            strategy=majority("approved"),
            timeout=15,
        )
        self.console.print(f"   decision: approved = {votes.value}")
        for value, targets in votes.conflicts.items():
            self.console.print(f"   said {value}: {', '.join(targets)}")
        return (
            routed.target == "insurer/claims.check"
            and votes.value is True
            and bool(votes.conflicts)
        )

    async def scene_audit(self) -> bool:
        self.console.print(
            "\n8. audit trails (paths and digests only: no withheld value is ever recorded)"
        )
        for org in ORGS:
            self.console.print(_audit_table(org, self.fed[org].audit.query(limit=50)))
        for org in ORGS:
            outcome = await self.fed[org].exchange_checkpoints()
            self.console.print(
                f"   {org} exchanged signed chain heads: "
                + "; ".join(f"{peer} {what}" for peer, what in outcome.items())
            )
        verified = True
        for org in ORGS:
            gateway = self.fed[org]
            report = gateway.audit.verify(
                org, gateway.router.verifier, heads=gateway_peer_heads(self.fed, org)
            )
            verified &= report.ok
            state = "[green]intact[/]" if report.ok else f"[red]{report.problems[0]}[/]"
            self.console.print(
                f"   {org}: {report.records} records, chain {state}, "
                f"{report.checkpoints_checked} signed checkpoints checked"
            )
        self.console.print(
            "   [dim]auditors: fedgate audit list | show TASK | verify | export | reconcile[/]"
        )
        return verified

    def receipt_ok(
        self, receipt: dict[str, Any] | None, org: str, output: dict[str, Any] | None
    ) -> bool:
        if receipt is None:
            return False
        try:
            verify_receipt(
                self.fed["insurer"].router.verifier,
                SignedReceipt.from_json(receipt),
                expected_org=org,
                released_output=output,
            )
        except Exception:
            return False
        return True


def gateway_peer_heads(fed: LocalFederation, org: str) -> list[Any]:
    """The signed heads of `org` that its partners keep: what proves no tail was cut."""
    return [
        c
        for other, gw in fed.gateways.items()
        if other != org
        for c in gw.audit.peer_checkpoints(org)
    ]
