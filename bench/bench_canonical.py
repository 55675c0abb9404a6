"""Canonical JSON encoders on the gateway's payloads: version 1 against RFC 8785 (JCS) candidates.

    python -m bench.bench_canonical [--quick]

Payloads: the 20-field result of bench_exchange, 64 KiB and 1 MiB of structured records (numbers
as a Struct gives them: integral values are ints, the rest floats), and bench_exchange's 1 MiB
string. Each candidate's bytes are compared with Trail of Bits' rfc8785 (the reference): a
candidate that differs is shown as such. Candidates that are not installed are skipped
(`pip install rfc8785 jcs json-canonical` for the full table).
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from bench.bench_exchange import BIG_BYTES, RESULT
from gateway.payload import canonical_json, jcs


def _records(size: int) -> dict[str, Any]:
    rnd = random.Random(1)
    items: list[dict[str, Any]] = []
    total = 0
    while total < size:
        amount = round(rnd.uniform(0, 5000), 2)
        item = {
            "id": f"R-{len(items)}",
            "amount": int(amount) if amount.is_integer() else amount,
            "count": rnd.randint(0, 1000),
            "code": "J45.909",
            "note": "Überweisung " + "x" * rnd.randint(0, 40),
            "ok": bool(len(items) % 2),
            "tags": ["a", "b"],
        }
        total += len(json.dumps(item))
        items.append(item)
    return {"items": items}


def _record_body() -> dict[str, Any]:
    """The body a result_released record hashes (receipt included, no payload)."""
    from gateway.audit.chain import AuditEvent, chain_events, normalize_event
    from gateway.identity.signing import RECEIPT_V2_TYPE

    receipt = {
        "type": RECEIPT_V2_TYPE,
        "canonical": 2,
        "task_id": "0b7e7c4e-3f0e-4a8e-9c55-1d2b6c3f4a10",
        "responder_org": "beta",
        "result_commitment": "hmac-sha256:" + "ab" * 32,
        "withheld_paths": ["patient.name", "patient.ssn", "notes"],
        "field_actions": [["patient.insurance_id", "pseudonymized"]],
        "policy_version": "sha256:" + "cd" * 32,
        "signed_at_unix_ms": 1_780_315_200_000,
        "state": "completed",
        "turn": 0,
        "chain_sequence": 41,
        "chain_head": "ef" * 32,
        "signer_certificate": "A" * 800,
        "signature": "B" * 96,
        "salt": "C" * 44,
    }
    event = AuditEvent(
        kind="result_released",
        task_id=receipt["task_id"],
        peer_org="alpha",
        agent="records",
        skill="lookup",
        decision="partial",
        status="completed",
        duration_ms=3.217,
        withheld_paths=("patient.name", "patient.ssn", "notes"),
        transformed=(("patient.insurance_id", "pseudonymized"),),
        digest_before="hmac-sha256:" + "01" * 32,
        digest_after="sha256:" + "02" * 32,
        policy_version=receipt["policy_version"],
        receipt=receipt,
    )
    return chain_events([normalize_event(event)], 0, "0" * 64, 1_780_315_200_000)[0].body()


def _optional(module: str, function: str) -> Callable[[Any], bytes] | None:
    try:
        encoder: Callable[[Any], Any] = getattr(importlib.import_module(module), function)
    except ImportError:
        return None

    def encode(value: Any) -> bytes:
        out = encoder(value)
        return out if isinstance(out, bytes) else str(out).encode("utf-8")

    return encode


def candidates() -> dict[str, Callable[[Any], bytes] | None]:
    return {
        "json.dumps(sort_keys=True) (version 1)": canonical_json,
        "orjson OPT_SORT_KEYS alone (not JCS)": lambda v: orjson.dumps(
            v, option=orjson.OPT_SORT_KEYS
        ),
        "gateway.payload.jcs, orjson-based (version 2)": jcs,
        "rfc8785 0.1 (Trail of Bits, pure Python)": _optional("rfc8785", "dumps"),
        "jcs 0.2 (pure Python)": _optional("jcs", "canonicalize"),
        "json-canonical 2.0 (pure Python)": _optional("json_canonical", "canonicalize"),
    }


def _time(encode: Callable[[Any], bytes], value: Any, budget: float) -> float:
    """The best of 5 runs: on a shared machine the minimum is the cost, the rest is waiting."""
    start = time.perf_counter()
    encode(value)
    once = max(time.perf_counter() - start, 1e-7)
    number = max(1, int(budget / once))
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(number):
            encode(value)
        runs.append((time.perf_counter() - start) / number)
    return min(runs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a shorter time per measurement")
    args = parser.parse_args(argv)
    budget = 0.05 if args.quick else 0.3
    payloads = {
        "20 fields": RESULT,
        "64 KiB records": _records(64 * 1024),
        "1 MiB records": _records(1024 * 1024),
        "1 MiB string": {"blob": "x" * BIG_BYTES},
        "audit record body": _record_body(),
    }
    reference = _optional("rfc8785", "dumps")
    console = Console()
    table = Table(title="Canonical JSON: time per encode (µs, best of 5), and x version 1's time")
    table.add_column("encoder")
    for name in payloads:
        table.add_column(name, justify="right")
    baseline: dict[str, float] = {}
    for name, encode in candidates().items():
        if encode is None:
            table.add_row(name, *["not installed"] * len(payloads))
            continue
        cells = []
        for payload_name, value in payloads.items():
            seconds = _time(encode, value, budget)
            baseline.setdefault(payload_name, seconds)
            same = reference is None or encode(value) == reference(value)
            ratio = seconds / baseline[payload_name]
            cells.append(
                f"{seconds * 1e6:,.1f} ({ratio:.2f}x)" + ("" if same else " differs from JCS")
            )
        table.add_row(name, *cells)
    console.print(table)
    if reference is None:
        console.print("rfc8785 is not installed: the bytes were not compared with JCS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
