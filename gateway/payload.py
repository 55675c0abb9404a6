"""Structured payloads: canonical bytes, digests and the limits checked before any policy runs."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from gateway.errors import PayloadLimitExceeded

JsonObject = dict[str, Any]

DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_FIELDS = 10_000


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no spaces, UTF-8) used for every digest."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def digest(value: Any) -> str:
    """SHA-256 of the canonical JSON, as 'sha256:<hex>'."""
    return "sha256:" + hashlib.sha256(canonical_json(value)).hexdigest()


def check_limits(
    payload: Any, *, max_depth: int = DEFAULT_MAX_DEPTH, max_fields: int = DEFAULT_MAX_FIELDS
) -> None:
    """Refuse a payload deeper than max_depth or with more than max_fields values.

    Iterative on purpose: a payload nested 10,000 deep must not exhaust the Python stack.
    """
    stack: list[tuple[Any, int]] = [(payload, 0)]
    fields = 0
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise PayloadLimitExceeded(
                f"payload is nested deeper than {max_depth} levels: flatten it or raise "
                "[limits] max_payload_depth"
            )
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value  # type: ignore[assignment]
        else:
            continue
        for child in children:
            fields += 1
            if fields > max_fields:
                raise PayloadLimitExceeded(
                    f"payload has more than {max_fields} fields: send less or raise "
                    "[limits] max_payload_fields"
                )
            stack.append((child, depth + 1))
