"""The demo's A2A scene (`fedgate demo` calls `a2a_scene`): both edges, with real gateways.

The lab runs an A2A server written only with a2a-sdk (demo_agent.py); its gateway offers it to
the hospital under the lab's policy (A2A out). The hospital's assistant is a plain a2a-sdk
client: it finds the lab's agent on its own gateway's A2A listener, with a participant token,
and calls it there (A2A in). In between: the hospital's send policy, the mTLS federation, the
lab's invoke and share policies, both audit logs and the lab's signed receipt.
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path
from typing import Any

import httpx
from a2a.client import ClientCallContext, ClientConfig, ClientFactory
from a2a.client.card_resolver import parse_agent_card
from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest, TaskState
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Value
from rich.console import Console
from rich.table import Table

from gateway.edges.a2a.demo_agent import REPORT_PDF, serve_pathology_agent
from gateway.edges.a2a.mapping import parts_to_json
from gateway.identity.signing import SignedReceipt, verify_receipt
from gateway.identity.tokens import token_authority
from gateway.local import LocalFederation, write_gateway_config

HOSPITAL_RULES = """\
# What of the hospital's A2A messages may go to the lab's pathology agent.
p, lab, pathology, report, send, parts[].text, allow
p, lab, pathology, report, send, parts[].data.test, allow
p, lab, pathology, report, send, parts[].data.patient_id, pseudonymize
"""
LAB_RULES = """\
# The hospital may call the pathology agent; of its report only the values leave.
p, hospital, pathology, report, invoke, *, allow
p, hospital, pathology, report, share, artifacts[].name, allow
p, hospital, pathology, report, share, artifacts[].parts[].data.test, allow
p, hospital, pathology, report, share, artifacts[].parts[].data.result, allow
p, hospital, pathology, report, share, artifacts[].parts[].data.reference_range, allow
p, hospital, pathology, report, share, status, allow
# Named denials, so that the report (and the receipt) say what was withheld.
p, hospital, pathology, report, share, artifacts[].parts[].text, deny
p, hospital, pathology, report, share, artifacts[].parts[].data.technician, deny
p, hospital, pathology, report, share, artifacts[].parts[].file, deny
"""
ASKED = {"test": "HbA1c", "patient_id": "P-1001", "patient_name": "Ada Lovelace"}


def _parts_table(title: str, sent: list[dict[str, Any]], arrived: list[dict[str, Any]]) -> Table:
    """Each part as it was, beside what arrived of it (a withheld part is simply not there)."""
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("inside the organization", overflow="fold")
    table.add_column("what arrived", overflow="fold")
    left = list(arrived)
    for index, part in enumerate(sent):
        kind = next(k for k in ("text", "data", "file") if k in part)
        there = next((p for p in left if kind in p), None)
        if there is not None:
            left.remove(there)
        table.add_row(
            f"{index} ({kind})",
            json.dumps(part[kind])[:120],
            json.dumps(there[kind])[:120] if there else "[red]withheld[/]",
        )
    return table


async def a2a_scene(console: Console, *, certs: Path, model: Path, step: int) -> bool:
    """Run the scene; returns whether what it showed held."""
    console.print(
        f"\n{step}. A2A at both edges: the lab's [bold]pathology[/] agent is an A2A server that "
        "knows nothing of Fedgate;\n   the hospital's assistant, a plain A2A client, calls it "
        "through the hospital's own gateway"
    )
    with tempfile.TemporaryDirectory(prefix="fedgate-demo-a2a-") as tmp:
        async with serve_pathology_agent() as agent:
            paths = []
            for org, peer, rules, agents in (
                ("hospital", "lab", HOSPITAL_RULES, ""),
                ("lab", "hospital", LAB_RULES, agent.card_url),
            ):
                rules_path = Path(tmp) / f"{org}-a2a.csv"
                rules_path.write_text(rules)
                section = '[a2a]\nlisten = "127.0.0.1:0"\ngrpc_listen = ""\n'
                if agents:
                    section += f'\n[[a2a.agents]]\nname = "pathology"\ncard_url = "{agents}"\n'
                paths.append(
                    write_gateway_config(
                        Path(tmp) / org,
                        org,
                        cert=certs / f"{org}.crt",
                        key=certs / f"{org}.key",
                        ca=certs / "ca.crt",
                        model=model,
                        rules=rules_path,
                        peers=[peer],
                        require_tokens=True,
                        extra=section,
                    )
                )
            federation = LocalFederation(paths)
            await federation.start()
            try:
                return await _call(console, federation, agent)
            finally:
                await federation.stop()


async def _call(console: Console, federation: LocalFederation, agent: Any) -> bool:
    hospital = federation["hospital"]
    assert hospital.a2a is not None
    token = token_authority(hospital.config).issue("ward-3-assistant", calls=["lab/pathology.*"])
    card_url = f"{hospital.a2a.base_url()}/a2a/lab/pathology/.well-known/agent-card.json"
    console.print(f"   the assistant reads the card at {card_url}")
    message = Message(
        message_id="ward-3-request-1",
        role=Role.ROLE_USER,
        parts=[
            Part(text="please rush: patient is on the ward"),
            Part(data=json_format.ParseDict(ASKED, Value())),
        ],
    )
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
        card = parse_agent_card((await http.get(card_url)).json())
        client = ClientFactory(
            ClientConfig(
                streaming=False, httpx_client=http, supported_protocol_bindings=["JSONRPC"]
            )
        ).create(card)
        responses = [
            r
            async for r in client.send_message(
                SendMessageRequest(message=message), context=ClientCallContext(timeout=15)
            )
        ]
        await client.close()
    task = responses[-1].task
    [received] = agent.executor.received
    sent_parts = parts_to_json(message.parts, max_file_bytes=1 << 20)
    console.print(
        _parts_table(
            "   the assistant's message, and what of it reached the lab's agent "
            "(the hospital's send policy)",
            sent_parts,
            parts_to_json(received.parts, max_file_bytes=1 << 20),
        )
    )
    returned: list[dict[str, Any]] = [
        {"text": "Elevated HbA1c; patient reports fatigue; recommend follow-up."},
        {
            "data": {
                "test": "HbA1c",
                "result": "6.1 %",
                "reference_range": "4.0-5.6 %",
                "technician": "J. Okafor",
            }
        },
        {"file": {"name": "report.pdf", "media_type": "application/pdf", "bytes": "…"}},
    ]
    arrived: list[dict[str, Any]] = [
        json_format.MessageToDict(p) for a in task.artifacts for p in a.parts
    ]
    console.print(
        _parts_table(
            "   the lab agent's report, and what of it reached the assistant "
            "(the lab's share policy)",
            returned,
            arrived,
        )
    )
    meta = json_format.MessageToDict(task.metadata).get("fedgate", {})
    withheld = [a["path"] for a in meta.get("fieldActions", []) if a["action"] == "withheld"]
    console.print("   withheld by the lab's policy: " + ", ".join(withheld))
    receipt_ok = False
    if "receipt" in meta:
        try:
            verify_receipt(
                hospital.router.verifier,
                SignedReceipt.from_json(json.loads(meta["receipt"])),
                expected_org="lab",
            )
            receipt_ok = True
        except Exception:  # a demo check, reported below
            receipt_ok = False
    console.print(
        "   the lab's signed receipt, in the task's metadata: "
        + ("[green]verified[/]" if receipt_ok else "[red]INVALID[/]")
    )
    at_lab = json.dumps(parts_to_json(received.parts, max_file_bytes=1 << 20))
    at_hospital = json.dumps(json_format.MessageToDict(task))
    leaked = [s for s in ("Ada Lovelace", "P-1001") if s in at_lab] + [
        s
        for s in ("J. Okafor", "fatigue", "report.pdf", base64.b64encode(REPORT_PDF).decode())
        if s in at_hospital
    ]
    if leaked:
        console.print(f"   [red]withheld values left: {leaked}[/]")
    return task.status.state == TaskState.TASK_STATE_COMPLETED and receipt_ok and not leaked
