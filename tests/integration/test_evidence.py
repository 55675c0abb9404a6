"""A cut tail shows at once (issue 12): every exchange leaves the partner a signed lower bound
of our log (the receipt's chain position, the signed head on an answer without a receipt, the
requester's position in its delegation statement), and `fedgate audit verify --evidence`
names a cut from what the partner holds, with no checkpoint interval involved.

Also the receipt v2 on the live path: a salted commitment (the salt beside the receipt, never in
provenance), the task, turn and state it is for; and pre-filter digests keyed by a local secret.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.identity.signing import SignedReceipt
from gateway.local import LocalFederation
from participant_sdk import Client, TaskFailed
from tests.integration.federation import boom_agent, echo_agent, records_agent, serving


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


async def test_every_answer_leaves_a_signed_lower_bound_of_the_responders_log(
    fed: LocalFederation,
) -> None:
    async with (
        serving(fed.participant("hospital"), records_agent(), echo_agent(), boom_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        first = await client.call("hospital/echo.say", {"n": 1}, timeout=10, task_id="ev-1")
        head_before = fed["hospital"].audit.committed_head
        second = await client.call("hospital/records.summary", {}, timeout=10, task_id="ev-2")
        with pytest.raises(TaskFailed):
            await client.call("hospital/boom.fail", {}, timeout=10, task_id="ev-3")
    for result in (first, second):
        receipt = SignedReceipt.from_json(result.receipt)
        assert receipt.body.version == 2 and receipt.body.task_id == result.task_id
        assert receipt.body.state == "completed" and receipt.body.turn == 0
        assert receipt.body.result_commitment.startswith("hmac-sha256:")
        assert len(receipt.salt) == 32, "the salt came beside the receipt, to the requester"
    body = SignedReceipt.from_json(second.receipt).body
    # Signed after request_received of ev-2 committed: at least that far.
    assert body.chain_sequence >= head_before[0] + 1
    hospital = {r.sequence: r for r in fed["hospital"].audit.records()}
    assert hospital[body.chain_sequence].record_hash == body.chain_head
    # The failed answer carried the hospital's signed head; the insurer kept it as evidence.
    (failed,) = fed["insurer"].audit.query(task_id="ev-3", kind="failed")
    assert failed.evidence is not None and failed.evidence["checkpoint"]["org"] == "hospital"
    # The insurer's position came with each request; the hospital kept the statement.
    (received,) = fed["hospital"].audit.query(task_id="ev-2", kind="request_received")
    assert received.evidence is not None and "delegation" in received.evidence
    # Pre-filter digests are keyed: an export of them is no dictionary oracle.
    (released,) = fed["hospital"].audit.query(task_id="ev-2", kind="result_released")
    assert released.digest_before is not None and released.digest_before.startswith("hmac-sha256:")
    assert released.digest_after is not None and released.digest_after.startswith("sha256:")


async def test_a_partners_holdings_name_a_cut_tail(fed: LocalFederation, tmp_path: Path) -> None:
    async with (
        serving(fed.participant("hospital"), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        for n in range(4):
            await client.call("hospital/echo.say", {"n": n}, timeout=10, task_id=f"cut-{n}")
    hospital_config = str(fed["hospital"].config.source)
    insurer_config = str(fed["insurer"].config.source)
    await fed.stop()
    held = tmp_path / "insurer-holds.json"
    code, output = _run(
        "audit", "evidence", "--config", insurer_config, "--peer", "hospital", "--out", str(held)
    )
    assert code == 0, output
    code, output = _run("audit", "verify", "--config", hospital_config, "--evidence", str(held))
    assert code == 0, output
    # The hospital's operator cuts the last records of its log (no checkpoint exchanged since).
    database = fed["hospital"].config.data_dir / "audit.db"
    with sqlite3.connect(database) as connection:
        (last,) = connection.execute("SELECT max(sequence) FROM audit_record").fetchone()
        connection.execute("DELETE FROM audit_record WHERE sequence > ?", (last - 3,))
    code, output = _run("audit", "verify", "--config", hospital_config)
    assert code == 0, "the chain alone cannot show a cut tail: " + output
    code, output = _run("audit", "verify", "--config", hospital_config, "--evidence", str(held))
    assert code == 1, output
    assert "missing" in output and "insurer holds" in output, output
