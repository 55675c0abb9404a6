"""The A2A edge's parts that need no socket: the task book, the card directory, the config,
the audit view of files, and what the SDK may log."""

from __future__ import annotations

import base64
import hashlib
import logging
from pathlib import Path

import pytest
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import ListTasksRequest, Task, TaskState, TaskStatus

from gateway.config import load_config
from gateway.edges.a2a.cards import CardDirectory, Target
from gateway.edges.a2a.errors import GatewayUnavailable
from gateway.edges.a2a.inbound import STATE_OWNER, BoundedTaskStore
from gateway.edges.a2a.listener import quiet_sdk_logging
from gateway.edges.wire import AgentCard, SkillCard
from gateway.errors import ConfigError, PeerUnreachable
from gateway.local import write_gateway_config
from gateway.payload import files_as_digests
from tests.conftest import Pki


def _context(owner: str) -> ServerCallContext:
    return ServerCallContext(state={STATE_OWNER: owner})


def _task(task_id: str, state: int) -> Task:
    return Task(id=task_id, context_id="c", status=TaskStatus(state=state))


async def test_the_task_book_keeps_a_bounded_number_of_finished_tasks() -> None:
    store = BoundedTaskStore(capacity=2)
    ada, bob = _context("ada\x00hospital/records"), _context("bob\x00hospital/records")
    await store.save(_task("running", TaskState.TASK_STATE_WORKING), ada)
    for task_id in ("t1", "t2", "t3"):
        await store.save(_task(task_id, TaskState.TASK_STATE_COMPLETED), ada)
    assert await store.get("t1", ada) is None  # the oldest finished task went first
    assert await store.get("t3", ada) is not None
    assert await store.get("running", ada) is not None  # a running task is never dropped
    assert await store.get("t3", bob) is None  # and a task is its owner's alone
    listed = await store.list(ListTasksRequest(), ada)
    assert sorted(t.id for t in listed.tasks) == ["running", "t2", "t3"]


class _Port:
    org = "insurer"
    peers = ["hospital"]

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def local_card(self, agent: str) -> AgentCard | None:
        return None

    def local_cards(self) -> list[AgentCard]:
        return []

    async def partner_cards(self, peer: str, *, within: float) -> list[AgentCard]:
        self.calls += 1
        if self.fail:
            raise PeerUnreachable("organization 'hospital' did not list its agents")
        return [AgentCard("hospital", "records", skills=(SkillCard("summary"),))]


async def test_probing_card_urls_does_not_flood_a_partner() -> None:
    now = [0.0]
    port = _Port()
    directory = CardDirectory(port, refresh_seconds=30, clock=lambda: now[0])  # type: ignore[arg-type]
    assert await directory.find(Target("hospital", "records")) is not None
    for name in ("a", "b", "c", "records"):
        await directory.find(Target("hospital", name))
    assert port.calls == 1  # asked once per refresh period, whatever is asked for
    assert await directory.find(Target("mallory", "records")) is None  # not a peer: not asked
    now[0] = 31.0
    port.fail = True
    # A partner that does not answer keeps the cards it showed last (calls then say why).
    assert await directory.find(Target("hospital", "records")) is not None
    assert port.calls == 2


def test_files_are_kept_as_digests_in_an_audit_view() -> None:
    payload = {
        "parts": [
            {"text": "kept"},
            {"file": {"name": "scan.png", "bytes": base64.b64encode(b"scan").decode()}},
            {"file": {"name": "ref", "url": "https://example.org/x"}},
        ],
        "artifacts": [{"parts": [{"file": {"bytes": base64.b64encode(b"out").decode()}}]}],
    }
    view = files_as_digests(payload)
    assert view["parts"][0] == {"text": "kept"}
    assert view["parts"][1]["file"] == {
        "name": "scan.png",
        "bytes": "sha256:" + hashlib.sha256(b"scan").hexdigest(),
    }
    assert view["parts"][2] == payload["parts"][2]
    assert view["artifacts"][0]["parts"][0]["file"]["bytes"] == (
        "sha256:" + hashlib.sha256(b"out").hexdigest()
    )
    assert payload["parts"][1]["file"]["bytes"] == base64.b64encode(b"scan").decode()


@pytest.mark.parametrize(
    ("section", "names"),
    [
        ('[a2a]\ngrpc_default_agent = "hospital"\n', "a2a.grpc_default_agent: expected ORG/AGENT"),
        ('[a2a]\nlisten = "localhost"\n', "a2a.listen: expected HOST:PORT"),
        ('[a2a]\ntls_cert = "x.crt"\n', "tls_cert and tls_key go together"),
        ("[a2a]\nmax_file_bytes = 0\n", "a2a.max_file_bytes"),
        ('[a2a]\nlisten_typo = "x"\n', "a2a.listen_typo: unknown key"),
        ('[[a2a.agents]]\nname = "bad name"\ncard_url = "http://x"\n', "not a valid agent name"),
        ('[[a2a.agents]]\nname = "lab"\ncard_url = "ftp://x"\n', "http:// or https:// URL"),
        (
            '[[a2a.agents]]\nname = "lab"\ncard_url = "http://x"\n'
            '[[a2a.agents]]\nname = "lab"\ncard_url = "http://y"\n',
            "configured twice",
        ),
        ('[a2a]\nlisten = "0.0.0.0:7480"\n', "reachable from other hosts, but the A2A"),
        ('[a2a]\ngrpc_listen = "10.1.2.3:7481"\n', "set [a2a] tls_cert and tls_key"),
    ],
)
def test_a_bad_a2a_section_fails_at_start_naming_the_key(
    tmp_path: Path, pki: Pki, section: str, names: str
) -> None:
    path = write_gateway_config(
        tmp_path,
        "hospital",
        cert=pki.cert("hospital"),
        key=pki.key("hospital"),
        ca=pki.ca,
        model=None,
        rules=None,
        extra=section,
    )
    with pytest.raises(ConfigError) as failed:
        load_config(path)
    assert names in failed.value.message


def test_a2a_off_loopback_needs_tls_and_tokens(tmp_path: Path, pki: Pki) -> None:
    tls = f'tls_cert = "{pki.cert("hospital")}"\ntls_key = "{pki.key("hospital")}"\n'
    path = write_gateway_config(
        tmp_path,
        "hospital",
        cert=pki.cert("hospital"),
        key=pki.key("hospital"),
        ca=pki.ca,
        model=None,
        rules=None,
        extra=f'[a2a]\nlisten = "0.0.0.0:7480"\n{tls}',
    )
    with pytest.raises(ConfigError, match="require_tokens = false would let anyone"):
        load_config(path)
    assert load_config(path, environ={"FEDGATE_PARTICIPANT_REQUIRE_TOKENS": "true"}).a2a


def test_a2a_settings_load_and_take_environment_overrides(tmp_path: Path, pki: Pki) -> None:
    path = write_gateway_config(
        tmp_path,
        "hospital",
        cert=pki.cert("hospital"),
        key=pki.key("hospital"),
        ca=pki.ca,
        model=None,
        rules=None,
        extra='[a2a]\n[[a2a.agents]]\nname = "lab"\ncard_url = "http://127.0.0.1:9/card"\n',
    )
    config = load_config(path, environ={"FEDGATE_A2A_GRPC_LISTEN": '""'})
    assert config.a2a is not None and config.a2a.listen == "127.0.0.1:7480"
    assert config.a2a.grpc_listen == ""
    assert [a.name for a in config.a2a.agents] == ["lab"]
    assert load_config(path).a2a.grpc_listen == "127.0.0.1:7481"  # type: ignore[union-attr]


def test_the_sdk_never_logs_below_info_and_refusals_lose_their_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sdk = logging.getLogger("a2a")
    sdk.setLevel(logging.DEBUG)
    try:
        quiet_sdk_logging()
        assert sdk.getEffectiveLevel() == logging.INFO
        producer = logging.getLogger("a2a.server.agent_execution.active_task")
        with caplog.at_level(logging.INFO, logger="a2a"):
            try:
                raise GatewayUnavailable("organization 'hospital' is unreachable")
            except GatewayUnavailable:
                producer.exception("Producer[t]: Execution failed")
        [record] = caplog.records
        assert record.exc_info is None and "unreachable" in record.getMessage()
    finally:
        sdk.setLevel(logging.NOTSET)
