"""Conversions between wire messages and plain Python values, shared by the gateway and the SDK."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import struct_pb2

from fedgate.v1 import fedgate_pb2 as pb

FINAL_STATES = frozenset(
    {pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELED, pb.TASK_STATE_REJECTED}
)

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


def normalize_numbers(value: Any) -> Any:
    """Turn integral floats into ints, as JSON would, so both sides digest the same bytes.

    google.protobuf.Struct carries every number as a double; without this a 3 sent becomes 3.0
    received and a digest computed on either side would differ.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: normalize_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [normalize_numbers(item) for item in value]
    return value


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
