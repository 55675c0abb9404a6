"""A2A messages, parts and artifacts as the payload the policy sees, and back (docs/a2a.md §1).

    request (input)  {"parts": [PART, ...], "metadata": {...}, "message_id": str,
                      "context": "ctx-..."}
    result (output)  {"artifacts": [{"name", "description", "parts": [PART, ...], "metadata"}],
                      "status": {"message": MESSAGE}, "message": MESSAGE}
    MESSAGE          {"parts": [PART, ...], "metadata": {...}}
    PART             {"text": str}  |  {"data": any JSON}  |
                     {"file": {"name", "media_type", "bytes": base64 | "url": str}}
                     (+ "media_type", "name" beside a text or data part, + "metadata")

Every part is an entry of a list the `send` and `share` policies walk like any other payload, so
no part leaves unless a rule names it. Task, artifact and reference ids never enter the payload
(the gateway makes new ones on the far side); `message_id` and `context` are fields like any other.
Only empty keys are left out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from a2a.types.a2a_pb2 import Artifact, Message, Part, Role
from fedgate.convert import struct_to_dict
from google.protobuf import struct_pb2

from gateway.data_folder import private_secret
from gateway.errors import ConfigError, InvalidArgument
from gateway.exchange.tasks import TaskResult
from gateway.payload import canonical_json

DEFAULT_MAX_FILE_BYTES = 1024 * 1024
CONTEXT_KEY_FILE = "a2a-context.key"
RESULT_KEYS = frozenset({"artifacts", "status", "message"})
# The name of the one artifact that carries an output not shaped like an A2A result.
PLAIN_OUTPUT_ARTIFACT = "result"


class UnreadablePart(InvalidArgument):
    """A part (from a client, or from an agent's answer) that the gateway cannot carry."""


# ---- A2A -> payload ----------------------------------------------------------------------


def _value_to_json(value: struct_pb2.Value) -> Any:
    """A protobuf Value as JSON-like Python (integers stay integers), NaN refused."""
    holder = struct_pb2.Struct()
    holder.fields["v"].CopyFrom(value)
    try:
        return struct_to_dict(holder)["v"]
    except ValueError as exc:
        raise UnreadablePart(f"a data part cannot be carried: {exc}") from None


def part_to_json(part: Part, *, max_file_bytes: int, where: str = "part") -> dict[str, Any]:
    """One A2A part as a payload entry; files over `max_file_bytes` are refused."""
    kind = part.WhichOneof("content")
    entry: dict[str, Any]
    if kind == "text":
        entry = {"text": part.text}
    elif kind == "data":
        entry = {"data": _value_to_json(part.data)}
    elif kind in ("raw", "url"):
        file: dict[str, Any] = {}
        if part.filename:
            file["name"] = part.filename
        if part.media_type:
            file["media_type"] = part.media_type
        if kind == "raw":
            if len(part.raw) > max_file_bytes:
                raise UnreadablePart(
                    f"{where} is a file of {len(part.raw)} bytes, over the gateway's limit of "
                    f"{max_file_bytes}: send a smaller file or raise [a2a] max_file_bytes"
                )
            file["bytes"] = base64.b64encode(part.raw).decode("ascii")
        else:
            file["url"] = part.url
        entry = {"file": file}
    else:
        raise UnreadablePart(f"{where} has no content: a part holds text, data, raw or url")
    if kind in ("text", "data"):
        if part.media_type:
            entry["media_type"] = part.media_type
        if part.filename:
            entry["name"] = part.filename
    if part.HasField("metadata") and part.metadata.fields:
        entry["metadata"] = _struct_json(part.metadata, where)
    return entry


def _struct_json(struct: struct_pb2.Struct, where: str) -> dict[str, Any]:
    try:
        return struct_to_dict(struct)
    except ValueError as exc:
        raise UnreadablePart(f"the metadata of {where} cannot be carried: {exc}") from None


def parts_to_json(
    parts: Iterable[Part], *, max_file_bytes: int, where: str = "message"
) -> list[dict[str, Any]]:
    return [
        part_to_json(p, max_file_bytes=max_file_bytes, where=f"{where} part {i}")
        for i, p in enumerate(parts)
    ]


def message_to_json(message: Message, *, max_file_bytes: int, where: str) -> dict[str, Any]:
    """A message's parts and metadata (no ids, no role) as a payload object."""
    body: dict[str, Any] = {
        "parts": parts_to_json(message.parts, max_file_bytes=max_file_bytes, where=where)
    }
    if message.HasField("metadata") and message.metadata.fields:
        body["metadata"] = _struct_json(message.metadata, where)
    return body


def request_input(
    message: Message, *, max_file_bytes: int, context: str | None = None
) -> dict[str, Any]:
    """The task input for a client's message; `context` is the context id as it may leave."""
    payload = message_to_json(message, max_file_bytes=max_file_bytes, where="the message")
    if message.message_id:
        payload["message_id"] = message.message_id
    if context:
        payload["context"] = context
    return payload


def artifact_to_json(artifact: Artifact, *, max_file_bytes: int, where: str) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if artifact.name:
        body["name"] = artifact.name
    if artifact.description:
        body["description"] = artifact.description
    body["parts"] = parts_to_json(artifact.parts, max_file_bytes=max_file_bytes, where=where)
    if artifact.HasField("metadata") and artifact.metadata.fields:
        body["metadata"] = _struct_json(artifact.metadata, where)
    return body


def task_output(
    artifacts: Iterable[Artifact], status_message: Message | None, *, max_file_bytes: int
) -> dict[str, Any]:
    """The output of a task an A2A agent ended: its artifacts and final status message."""
    output: dict[str, Any] = {}
    entries = [
        artifact_to_json(a, max_file_bytes=max_file_bytes, where=f"artifact {i}")
        for i, a in enumerate(artifacts)
    ]
    if entries:
        output["artifacts"] = entries
    if status_message is not None and (status_message.parts or status_message.metadata.fields):
        output["status"] = {
            "message": message_to_json(
                status_message, max_file_bytes=max_file_bytes, where="the status message"
            )
        }
    return output


def reply_output(message: Message, *, max_file_bytes: int) -> dict[str, Any]:
    """The output of an A2A agent that answered with a message instead of a task."""
    return {"message": message_to_json(message, max_file_bytes=max_file_bytes, where="the reply")}


# ---- payload -> A2A ----------------------------------------------------------------------


PART_KEYS = frozenset({"text", "data", "file", "media_type", "name", "metadata"})
FILE_KEYS = frozenset({"name", "media_type", "bytes", "url"})


def _is_parts(value: Any) -> bool:
    return isinstance(value, list) and all(_is_part(p) for p in value)


def _is_part(entry: Any) -> bool:
    """Shaped like a part: at most one content kind of the right type, no other keys.

    A part the policy emptied (its text withheld, its metadata kept; a file without its bytes)
    still has the shape; it has no content and is left out when the message is rebuilt.
    """
    if not isinstance(entry, dict) or not set(entry) <= PART_KEYS:
        return False
    kinds = [k for k in ("text", "data", "file") if k in entry]
    if len(kinds) > 1:
        return False
    if "text" in entry and not isinstance(entry["text"], str):
        return False
    if "file" in entry:
        file = entry["file"]
        if not isinstance(file, dict) or not set(file) <= FILE_KEYS:
            return False
        if "bytes" in file and "url" in file:
            return False
        if not all(isinstance(file.get(k, ""), str) for k in FILE_KEYS):
            return False
    return all(isinstance(entry.get(k, ""), str) for k in ("media_type", "name")) and isinstance(
        entry.get("metadata", {}), dict
    )


def _is_message(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) <= {"parts", "metadata"}
        and _is_parts(value.get("parts", []))
        and isinstance(value.get("metadata", {}), dict)
    )


def is_result_shaped(output: Mapping[str, Any]) -> bool:
    """Whether an output is an A2A result (section 1) rather than an SDK agent's plain object."""
    if not output or not set(output) <= RESULT_KEYS:
        return False
    artifacts = output.get("artifacts", [])
    if not isinstance(artifacts, list) or not all(
        isinstance(a, dict)
        and set(a) <= {"name", "description", "parts", "metadata"}
        and _is_parts(a.get("parts", []))
        for a in artifacts
    ):
        return False
    status = output.get("status", {})
    if not isinstance(status, dict) or not set(status) <= {"message"}:
        return False
    if "message" in status and not _is_message(status["message"]):
        return False
    return "message" not in output or _is_message(output["message"])


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(value))
    return struct


def json_to_part(entry: Mapping[str, Any]) -> Part | None:
    """A part-shaped payload entry as an A2A part; None for one left without content."""
    part = Part()
    if "text" in entry:
        part.text = entry["text"]
    elif "data" in entry:
        part.data.CopyFrom(_value(entry["data"]))
    elif "file" in entry and ("bytes" in entry["file"] or "url" in entry["file"]):
        file = entry["file"]
        part.filename = file.get("name", "")
        part.media_type = file.get("media_type", "")
        if "bytes" in file:
            try:
                part.raw = base64.b64decode(file["bytes"], validate=True)
            except (binascii.Error, ValueError):
                raise UnreadablePart("a file's bytes are not valid base64") from None
        else:
            part.url = file["url"]
    else:
        return None
    if "file" not in entry:
        part.media_type = entry.get("media_type", "")
        part.filename = entry.get("name", "")
    if entry.get("metadata"):
        part.metadata.CopyFrom(_struct(entry["metadata"]))
    return part


def _value(value: Any) -> struct_pb2.Value:
    holder = struct_pb2.Struct()
    holder.update({"v": value})
    return holder.fields["v"]


def json_to_parts(entries: Any) -> list[Part]:
    """The parts of a part-shaped list (see `is_result_shaped`), those without content left out."""
    parts = [json_to_part(e) for e in entries] if _is_parts(entries) else []
    return [p for p in parts if p is not None]


def json_to_message(body: Mapping[str, Any], *, role: Role, message_id: str) -> Message:
    message = Message(message_id=message_id, role=role, parts=json_to_parts(body.get("parts")))
    if isinstance(body.get("metadata"), dict) and body["metadata"]:
        message.metadata.CopyFrom(_struct(body["metadata"]))
    return message


REQUEST_KEYS = frozenset({"parts", "metadata", "message_id", "context"})


def input_to_message(payload: Mapping[str, Any], *, message_id: str) -> Message:
    """The message an A2A agent receives for a task input (A2A out).

    An input shaped as section 1 says gives its parts, metadata and message id (`message_id`
    when the policies let it through, else `message_id` given here); any other input (from an
    SDK requester) goes as one data part. `context` never becomes a part: it is the context id.
    """
    sent_id = payload.get("message_id")
    if isinstance(sent_id, str) and sent_id:
        message_id = sent_id
    if _is_parts(payload.get("parts")) and set(payload) <= REQUEST_KEYS:
        return json_to_message(payload, role=Role.ROLE_USER, message_id=message_id)
    body = {key: value for key, value in payload.items() if key not in ("context", "message_id")}
    return Message(message_id=message_id, role=Role.ROLE_USER, parts=[Part(data=_value(body))])


def output_artifacts(
    output: Mapping[str, Any],
) -> list[tuple[str, str, list[Part], dict[str, Any]]]:
    """(name, description, parts, metadata) of each artifact an output shows an A2A client."""
    if not is_result_shaped(output):
        return (
            [(PLAIN_OUTPUT_ARTIFACT, "", [Part(data=_value(dict(output)))], {})] if output else []
        )
    shown = []
    for artifact in output.get("artifacts", []):
        shown.append(
            (
                str(artifact.get("name", "")),
                str(artifact.get("description", "")),
                json_to_parts(artifact.get("parts")),
                dict(artifact.get("metadata") or {}),
            )
        )
    return shown


def output_status_message(output: Mapping[str, Any]) -> Mapping[str, Any] | None:
    if not is_result_shaped(output):
        return None
    status = output.get("status") or {}
    message = status.get("message")
    return message if isinstance(message, dict) else None


def output_reply(output: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The message an agent answered with, when the output says it answered with one alone."""
    if not is_result_shaped(output) or "message" not in output:
        return None
    if output.get("artifacts") or output.get("status"):
        return None
    message = output["message"]
    return message if isinstance(message, dict) else None


# ---- receipts, field actions, errors in metadata (docs/a2a.md §2) --------------------------


def result_metadata(result: TaskResult) -> dict[str, Any]:
    """What a final task or reply carries in `metadata.fedgate` (camelCase keys, as A2A's JSON).

    A receipt goes as its JSON text, exactly as signed and kept in the audit logs: a JSON number
    in a protobuf Struct would come back as a float, and the text is what a verifier reads.
    """
    meta: dict[str, Any] = {}
    if result.responder_org:
        meta["responderOrg"] = result.responder_org
    if result.policy_version:
        meta["policyVersion"] = result.policy_version
    if result.field_actions:
        meta["fieldActions"] = [{"path": p, "action": a} for p, a in result.field_actions]
    if result.receipt is not None:
        meta["receipt"] = canonical_json(result.receipt).decode()
    if result.provenance:
        meta["provenance"] = [canonical_json(r).decode() for r in result.provenance]
    if result.error is not None:
        meta["error"] = {"code": result.error.code, "message": result.error.message}
    return {"fedgate": meta} if meta else {}


# ---- context ids (docs/a2a.md §3) ----------------------------------------------------------


def derive_context(key: bytes, scope: str, context_id: str) -> str:
    """An opaque context id for `scope` (a peer, or the organization that asked): stable per
    scope and context, unlinkable across scopes without the key."""
    mac = hmac.new(key, f"a2a-context\x00{scope}\x00{context_id}".encode(), hashlib.sha256)
    return "ctx-" + mac.hexdigest()[:32]


def load_or_create_context_key(path: Path) -> bytes:
    """The gateway's A2A context key: 32 random bytes, created 0600 when missing."""
    data = private_secret(path, lambda: secrets.token_bytes(32), "A2A context key")
    if len(data) < 32:
        raise ConfigError(f"{path}: the A2A context key is shorter than 32 bytes: delete it")
    return data
