"""The documented mapping between A2A messages, parts and artifacts and the payload (docs/a2a.md §1)."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from a2a.types.a2a_pb2 import Artifact, Message, Part, Role
from google.protobuf import json_format, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.edges.a2a.mapping import (
    PLAIN_OUTPUT_ARTIFACT,
    UnreadablePart,
    derive_context,
    input_to_message,
    is_result_shaped,
    json_to_parts,
    load_or_create_context_key,
    output_artifacts,
    output_reply,
    output_status_message,
    parts_to_json,
    reply_output,
    request_input,
    result_metadata,
    task_output,
)
from gateway.errors import ConfigError
from gateway.exchange.tasks import TaskError, TaskResult, TaskState
from gateway.policy.engine import load_policy

MODEL = Path(__file__).resolve().parents[2] / "policies" / "model.conf"


def _data(value: object) -> struct_pb2.Value:
    return json_format.ParseDict(value, struct_pb2.Value())


def _message(*parts: Part, message_id: str = "m-1") -> Message:
    return Message(message_id=message_id, role=Role.ROLE_USER, parts=list(parts))


def test_every_kind_of_part_is_a_named_field() -> None:
    message = _message(
        Part(text="summarize", media_type="text/markdown"),
        Part(data=_data({"patient_id": "P-1", "visits": 3})),
        Part(raw=b"%PDF-1", filename="scan.pdf", media_type="application/pdf"),
        Part(url="https://example.org/ref.txt", filename="ref.txt"),
    )
    message.metadata.update({"channel": "ward-3"})
    payload = request_input(message, max_file_bytes=1024, context="ctx-1")
    assert payload == {
        "parts": [
            {"text": "summarize", "media_type": "text/markdown"},
            {"data": {"patient_id": "P-1", "visits": 3}},
            {
                "file": {
                    "name": "scan.pdf",
                    "media_type": "application/pdf",
                    "bytes": base64.b64encode(b"%PDF-1").decode(),
                }
            },
            {"file": {"name": "ref.txt", "url": "https://example.org/ref.txt"}},
        ],
        "metadata": {"channel": "ward-3"},
        "message_id": "m-1",
        "context": "ctx-1",
    }
    # Integers stay integers: a policy and a digest see what the client sent.
    assert isinstance(payload["parts"][1]["data"]["visits"], int)


def test_a_file_over_the_limit_is_refused_naming_the_limit_and_the_fix() -> None:
    message = _message(Part(text="x"), Part(raw=b"x" * 11, filename="big.bin"))
    with pytest.raises(UnreadablePart) as refused:
        request_input(message, max_file_bytes=10)
    assert "message part 1" in refused.value.message
    assert "[a2a] max_file_bytes" in refused.value.message


def test_a_part_without_content_is_invalid_input() -> None:
    with pytest.raises(UnreadablePart, match="no content"):
        request_input(_message(Part()), max_file_bytes=10)


def test_the_share_policy_sees_text_and_files_not_only_data(tmp_path: Path) -> None:
    """A text part or a file never slips past `share` because only data parts were looked at."""
    rules = _rules(tmp_path, "p, insurer, a, s, share, artifacts[].parts[].data.total, allow")
    policy = load_policy(MODEL, rules, pseudonym_key=b"p" * 32)
    output = task_output(
        [
            Artifact(
                artifact_id="a-1",
                name="report",
                parts=[
                    Part(text="the diagnosis is confidential"),
                    Part(data=_data({"total": 42, "ssn": "123-45-6789"})),
                    Part(raw=b"secret scan", filename="scan.png"),
                ],
            )
        ],
        _message(Part(text="done, see the scan")),
        max_file_bytes=1024,
    )
    filtered = policy.filter("insurer", "a", "s", "share", output)
    assert filtered.output == {"artifacts": [{"parts": [{"data": {"total": 42}}]}]}
    # Reported paths name only keys a rule names (the policy engine's rule): the text, the ssn,
    # the file and the status message each show where they were withheld.
    assert set(filtered.withheld) == {
        "artifacts[0].*",
        "artifacts[0].parts[0].*",
        "artifacts[0].parts[1].data.*",
        "artifacts[0].parts[2].*",
        "*",
    }
    assert "secret" not in json.dumps(filtered.output)


def _rules(folder: Path, *lines: str) -> Path:
    path = folder / "rules.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_result_shaped_output_becomes_artifacts_and_a_status_message() -> None:
    output = task_output(
        [Artifact(artifact_id="x", name="out", parts=[Part(text="hello")])],
        _message(Part(text="Hello from TCK")),
        max_file_bytes=10,
    )
    assert is_result_shaped(output)
    [(name, description, parts, metadata)] = output_artifacts(output)
    assert (name, description, metadata) == ("out", "", {})
    assert [p.text for p in parts] == ["hello"]
    assert output_status_message(output) == {"parts": [{"text": "Hello from TCK"}]}
    assert output_reply(output) is None


def test_a_reply_is_shown_as_a_message() -> None:
    reply = _message(Part(text="Direct message response"))
    output = reply_output(reply, max_file_bytes=10)
    assert output_reply(output) == {"parts": [{"text": "Direct message response"}]}
    assert output_artifacts(output) == []


def test_an_sdk_agents_plain_output_is_one_data_artifact() -> None:
    for output in ({"approved": True}, {"message": "hi"}, {"artifacts": "x"}):
        assert not is_result_shaped(output)
        [(name, _, parts, _)] = output_artifacts(output)
        assert name == PLAIN_OUTPUT_ARTIFACT
        assert json_format.MessageToDict(parts[0].data) == output


def test_a_part_the_policy_emptied_keeps_the_shape_and_is_left_out() -> None:
    output = {
        "artifacts": [
            {
                "name": "r",
                "parts": [{"metadata": {"k": "v"}}, {"file": {"name": "a.bin"}}, {"text": "t"}],
            }
        ]
    }
    assert is_result_shaped(output)
    [(_, _, parts, _)] = output_artifacts(output)
    assert [p.text for p in parts] == ["t"]


def test_an_sdk_requesters_input_reaches_an_a2a_agent_as_one_data_part() -> None:
    message = input_to_message({"claim": {"amount": 420}, "context": "ctx-1"}, message_id="m")
    assert len(message.parts) == 1
    assert json_format.MessageToDict(message.parts[0].data) == {"claim": {"amount": 420}}


def test_an_a2a_input_keeps_its_parts_and_message_id() -> None:
    payload = {"parts": [{"text": "hi"}], "message_id": "tck-complete-task-1", "context": "c"}
    message = input_to_message(payload, message_id="generated")
    assert message.message_id == "tck-complete-task-1"
    assert [p.text for p in message.parts] == ["hi"]
    assert input_to_message({"parts": [{"text": "hi"}]}, message_id="generated").message_id == (
        "generated"
    )


def test_invalid_base64_from_a_partner_is_refused() -> None:
    with pytest.raises(UnreadablePart, match="base64"):
        json_to_parts([{"file": {"name": "x", "bytes": "***"}}])


_part = st.one_of(
    st.builds(lambda t: Part(text=t), st.text(min_size=1, max_size=20)),
    st.builds(
        lambda v: Part(data=_data(v)),
        st.dictionaries(
            st.text(min_size=1, max_size=5),
            st.one_of(st.integers(-1000, 1000), st.text(max_size=5), st.booleans()),
            max_size=3,
        ),
    ),
    st.builds(
        lambda b, n, m: Part(raw=b, filename=n, media_type=m),
        st.binary(max_size=30),
        st.text(max_size=8),
        st.sampled_from(["", "text/plain", "image/png"]),
    ),
    st.builds(lambda u: Part(url=u), st.text(min_size=1, max_size=20)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_part, max_size=6))
def test_parts_round_trip(parts: list[Part]) -> None:
    """Property: a part becomes a payload entry and comes back the same (A2A out and in)."""
    back = json_to_parts(parts_to_json(parts, max_file_bytes=1024))
    assert [json_format.MessageToDict(p) for p in back] == [
        json_format.MessageToDict(p) for p in parts
    ]


def test_receipts_and_field_actions_go_in_camel_case_metadata() -> None:
    receipt = {"task_id": "t", "signed_at_unix_ms": 1796162464307, "signature": "c2ln"}
    result = TaskResult(
        "t",
        TaskState.COMPLETED,
        field_actions=(("parts[0].file", "withheld"),),
        receipt=receipt,
        responder_org="hospital",
        policy_version="sha256:ab",
    )
    meta = result_metadata(result)["fedgate"]
    assert meta["fieldActions"] == [{"path": "parts[0].file", "action": "withheld"}]
    assert json.loads(meta["receipt"]) == receipt  # exact: no integer turned into a float
    assert meta["responderOrg"] == "hospital" and meta["policyVersion"] == "sha256:ab"
    failed = TaskResult("t", TaskState.FAILED, error=TaskError("skill_error", "x"))
    assert result_metadata(failed) == {
        "fedgate": {"error": {"code": "skill_error", "message": "x"}}
    }


def test_context_ids_are_stable_per_scope_and_unlinkable_across_scopes() -> None:
    key = b"k" * 32
    a = derive_context(key, "insurer", "conversation-7")
    assert a == derive_context(key, "insurer", "conversation-7")
    assert a != derive_context(key, "lab", "conversation-7")
    assert a != derive_context(b"j" * 32, "insurer", "conversation-7")
    assert "conversation-7" not in a and a.startswith("ctx-") and len(a) == 36


def test_the_context_key_is_private_and_refused_when_others_can_read_it(tmp_path: Path) -> None:
    path = tmp_path / "data" / "a2a-context.key"
    key = load_or_create_context_key(path)
    assert len(key) == 32 and load_or_create_context_key(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_context_key(path)
