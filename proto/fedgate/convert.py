"""Conversions between wire messages and plain Python values, shared by the gateway and the SDK."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable
from typing import Any

from google.protobuf import struct_pb2

from fedgate.v1 import fedgate_pb2 as pb

STATE_NAMES: dict[int, str] = {
    pb.TASK_STATE_UNSPECIFIED: "unspecified",
    pb.TASK_STATE_SUBMITTED: "submitted",
    pb.TASK_STATE_WORKING: "working",
    pb.TASK_STATE_COMPLETED: "completed",
    pb.TASK_STATE_FAILED: "failed",
    pb.TASK_STATE_CANCELED: "canceled",
    pb.TASK_STATE_INPUT_REQUIRED: "input-required",
    pb.TASK_STATE_REJECTED: "rejected",
    pb.TASK_STATE_AUTH_REQUIRED: "auth-required",
}

ACTION_NAMES: dict[pb.FieldActionKind, str] = {
    pb.FIELD_ACTION_KIND_WITHHELD: "withheld",
    pb.FIELD_ACTION_KIND_MASKED: "masked",
    pb.FIELD_ACTION_KIND_PSEUDONYMIZED: "pseudonymized",
    pb.FIELD_ACTION_KIND_GENERALIZED: "generalized",
}
ACTION_KINDS = {name: kind for kind, name in ACTION_NAMES.items()}


def _from_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {key: _from_value(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_from_value(item) for item in value.list_value.values]
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise ValueError(
                f"a number in the payload is not finite ({number}): JSON cannot carry it"
            )
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "bool_value":
        return value.bool_value
    return None


def field_actions_from_pb(actions: Iterable[pb.FieldAction]) -> tuple[tuple[str, str], ...]:
    """(path, action) pairs; an action this version does not know counts as withheld."""
    return tuple((a.path, ACTION_NAMES.get(a.action, "withheld")) for a in actions)


RECEIPT_V2_TYPE = "fedgate/receipt/v2"


def receipt_json(message: pb.Receipt, *, salt: bytes = b"") -> dict[str, Any]:
    """A receipt in the JSON form the gateways keep in their audit logs (bytes as base64).

    The form follows the receipt's version (docs/protocol.md, "Receipt"); `salt` is the
    TaskResult's receipt_salt, kept beside the signed fields as "salt" (version 2 only).
    A version this code does not know keeps its number in "type", so verification refuses it.
    """
    actions = [list(pair) for pair in field_actions_from_pb(message.field_actions)]
    certificate = base64.b64encode(message.signer_certificate).decode("ascii")
    signature = base64.b64encode(message.signature).decode("ascii")
    if message.version <= 1:
        return {
            "task_id": message.task_id,
            "responder_org": message.responder_org,
            "result_digest": message.result_digest.decode("ascii", "replace"),
            "withheld_paths": list(message.withheld_paths),
            "field_actions": actions,
            "policy_version": message.policy_version,
            "signed_at_unix_ms": message.signed_at_unix_ms,
            "signer_certificate": certificate,
            "signature": signature,
        }
    data: dict[str, Any] = {
        "type": RECEIPT_V2_TYPE if message.version == 2 else f"fedgate/receipt/v{message.version}",
        "canonical": message.canonical,
        "task_id": message.task_id,
        "responder_org": message.responder_org,
        "result_commitment": message.result_commitment,
        "withheld_paths": list(message.withheld_paths),
        "field_actions": actions,
        "policy_version": message.policy_version,
        "signed_at_unix_ms": message.signed_at_unix_ms,
        "state": state_name(message.state),
        "turn": message.turn,
        "chain_sequence": message.chain_sequence,
        "chain_head": message.chain_head,
        "signer_certificate": certificate,
        "signature": signature,
    }
    if salt:
        data["salt"] = base64.b64encode(salt).decode("ascii")
    return data


def struct_to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict with JSON-like numbers; ValueError for NaN or infinity."""
    return {key: _from_value(item) for key, item in message.fields.items()}


def dict_to_struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    """A plain dict as a Struct; raises TypeError or ValueError for values JSON cannot carry."""
    message = struct_pb2.Struct()
    if value:
        message.update(value)
    return message


def state_name(state: int) -> str:
    return STATE_NAMES.get(state, f"unknown({state})")


def parse_target(target: str) -> tuple[str, str, str]:
    """Split 'org/agent.skill' into its parts; raises ValueError naming what is wrong."""
    org, slash, rest = target.partition("/")
    agent, dot, skill = rest.partition(".")
    if not slash or not dot or not org or not agent or not skill:
        raise ValueError(f"malformed target {target!r}: expected 'org/agent.skill'")
    return org, agent, skill
