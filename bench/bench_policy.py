"""Policy filter cost per payload, flat from 10 to 10,000 rules, against Casbin enforce per field.

    python -m bench.bench_policy [--quick]

Targets (docs/DESIGN.md, "Performance targets"): a 20-field payload costs <= 50 µs, and the cost
at 10,000 rules is <= 1.5x the cost at 10 rules. The baseline asks Casbin's own `enforce` for each
field, as a gateway without the compiled index would (it walks every rule, so it runs fewer times
and, with --quick, on a sample of the fields, scaled to 20).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gateway.policy import paths
from gateway.policy.engine import Policy, load_policy

MODEL = Path(__file__).resolve().parents[1] / "policies" / "model.conf"
KEY = bytes(range(32))
PEER, AGENT, SKILL = "insurer", "records", "summary"
TARGET_US = 50.0
TARGET_RATIO = 1.5

# The rules that apply to the measured request: redactions of every kind, and default deny for
# the fields no rule names (patient.name, diagnoses[].description, visit.ward).
RELEVANT = [
    "p, insurer, records, summary, share, patient.ssn, mask:4",
    "p, insurer, records, summary, share, patient.insurance_id, pseudonymize",
    "p, insurer, records, summary, share, patient.date_of_birth, generalize:year",
    "p, insurer, records, summary, share, patient.address, allow",
    "p, insurer, records, summary, share, patient.address.street, deny",
    "p, insurer, records, summary, share, diagnoses[].code, allow",
    "p, insurer, records, summary, share, diagnoses[].date, generalize:year",
    "p, insurer, records, summary, share, treatment_cost, generalize:100",
    "p, insurer, records, summary, share, visit.*, allow",
    "p, *, records, *, share, notes, deny",
]

PAYLOAD: dict[str, Any] = {
    "patient": {
        "name": "Ada Lovelace",
        "date_of_birth": "1984-05-17",
        "ssn": "123-45-6789",
        "insurance_id": "INS-99812",
        "address": {"street": "1 Main St", "city": "Springfield", "zip": "12345", "country": "US"},
    },
    "diagnoses": [
        {"code": "J45.909", "description": "Asthma", "date": "2024-02-03"},
        {"code": "E11.9", "description": "Type 2 diabetes", "date": "2023-11-30"},
    ],
    "treatment_cost": 1830.5,
    "notes": "call back after 5pm",
    "visit": {"id": "V-1", "ward": "B2", "admitted": "2024-02-01", "discharged": "2024-02-05"},
}


def synthetic_rules(count: int) -> str:
    """`count` rules: the relevant ones plus rules for many other peers, agents and skills."""
    lines = list(RELEVANT)
    fields = [
        "patient.name",
        "patient.ssn",
        "items[].price",
        "order.*",
        "**.secret",
        "claim.amount",
        "result.score",
        "meta",
    ]
    effects = ["allow", "deny", "mask:4", "pseudonymize", "generalize:year", "generalize:10"]
    index = 0
    while len(lines) < count:
        peer = f"org-{index % 97}"
        agent = f"agent{index % 31}"
        skill = f"skill{index % 7}"
        direction = ("share", "send", "invoke")[index % 3]
        if direction == "invoke":
            lines.append(f"p, {peer}, {agent}, {skill}, invoke, *, allow")
        else:
            field = f"{fields[index % len(fields)]}.f{index}"
            lines.append(
                f"p, {peer}, {agent}, {skill}, {direction}, {field}, "
                f"{effects[index % len(effects)]}"
            )
        index += 1
    return "\n".join(lines[:count]) + "\n"


def _batch_us(call: Any, batch: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(batch):
        call()
    return (time.perf_counter_ns() - started) / batch / 1000


def measure_filter(policies: dict[int, Policy], *, quick: bool) -> dict[int, float]:
    """Median µs per payload for each policy, measured round-robin so drift hits all alike."""
    calls = {
        count: (lambda p=policy: p.filter(PEER, AGENT, SKILL, "share", PAYLOAD))
        for count, policy in policies.items()
    }
    for call in calls.values():  # warm-up: index, memo, caches
        _batch_us(call, 500)
    samples: dict[int, list[float]] = {count: [] for count in calls}
    for _ in range(20 if quick else 100):
        for count, call in calls.items():
            samples[count].append(_batch_us(call, 100 if quick else 300))
    return {count: statistics.median(values) for count, values in samples.items()}


def measure_casbin(policy: Policy, *, quick: bool) -> float:
    """µs per payload when Casbin's enforce decides each field (a sample of fields if quick)."""
    fields = [
        paths.normalize(d.path)
        for d in policy.filter(PEER, AGENT, SKILL, "share", PAYLOAD).decisions
    ]
    sample = fields[:: 5 if quick and len(policy.rules) > 1000 else 1]
    rounds = 1 if quick or len(policy.rules) > 1000 else 3

    def enforce_sample() -> None:
        for path in sample:
            policy.casbin_rule_for(PEER, AGENT, SKILL, "share", path)

    timings = [_batch_us(enforce_sample, 1) for _ in range(rounds)]
    return statistics.median(timings) * len(fields) / len(sample)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_policy", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer runs (a few seconds)")
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    policies: dict[int, Policy] = {}
    with tempfile.TemporaryDirectory() as folder:
        for count in (10, 1_000, 10_000):
            rules = Path(folder) / f"rules-{count}.csv"
            rules.write_text(synthetic_rules(count))
            policies[count] = load_policy(MODEL, rules, pseudonym_key=KEY)
    filter_us = measure_filter(policies, quick=args.quick)
    results = {
        count: (
            filter_us[count],
            measure_casbin(policy, quick=args.quick),
            len(policy.filter(PEER, AGENT, SKILL, "share", PAYLOAD).decisions),
        )
        for count, policy in policies.items()
    }
    table = Table(
        title=f"policy filter, {results[10][2]}-field payload" + (" (quick)" if args.quick else "")
    )
    for column in (
        "rules",
        "filter µs/payload",
        "Casbin enforce per field µs/payload",
        "speed-up",
        f"≤ {TARGET_US:.0f} µs",
    ):
        table.add_column(column, justify="right")
    for count, (filter_us, casbin_us, _) in results.items():
        met = "[green]met[/green]" if filter_us <= TARGET_US else "[red]missed[/red]"
        table.add_row(
            f"{count:,}",
            f"{filter_us:.1f}",
            f"{casbin_us:,.0f}",
            f"{casbin_us / filter_us:,.0f}x",
            met,
        )
    console.print(table)
    ratio = results[10_000][0] / results[10][0]
    verdict = "[green]met[/green]" if ratio <= TARGET_RATIO else "[red]missed[/red]"
    console.print(f"10,000 / 10 rules: {ratio:.2f}x (target ≤ {TARGET_RATIO}x): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
