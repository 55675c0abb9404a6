"""Durable audit throughput on SQLite (group commit vs one commit per record) and verify speed.

    python -m bench.bench_audit [--quick]

Both sides run in the same process on the same disk, so the ratio holds on a noisy machine.
Targets (DESIGN.md): >= 5,000 durable records/s with concurrent appenders; verify 100,000 records
in <= 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from gateway.audit.chain import GENESIS_HASH, chain_events
from gateway.audit.store import AuditEvent, SqlAuditStore
from gateway.payload import digest

RATE_TARGET = 5_000.0
VERIFY_TARGET_S = 5.0
VERIFY_TARGET_RECORDS = 100_000


def _event(i: int) -> AuditEvent:
    return AuditEvent(
        kind="result_released",
        task_id=f"task-{i:08d}",
        peer_org="beta",
        agent="triage",
        skill="assess",
        direction="inbound",
        decision="partial",
        requester="alpha/nurse",
        status="completed",
        duration_ms=12.5,
        withheld_paths=("patient.name", "patient.ssn"),
        transformed=(("patient.zip", "generalized"),),
        digest_before=digest({"i": i, "secret": True}),
        digest_after=digest({"i": i}),
        policy_version="sha256:" + "ab" * 32,
    )


async def _throughput(path: Path, appenders: int, total: int, batch_max: int) -> tuple[float, int]:
    """Durable records per second with `appenders` concurrent callers; and the commit count."""
    store = SqlAuditStore(f"sqlite:///{path}", batch_max=batch_max)
    await store.start()
    per_appender = max(1, total // appenders)
    events = [_event(i) for i in range(per_appender * appenders)]

    async def appender(k: int) -> None:
        for i in range(k * per_appender, (k + 1) * per_appender):
            await store.append(events[i])

    started = time.perf_counter()
    await asyncio.gather(*(appender(k) for k in range(appenders)))
    elapsed = time.perf_counter() - started
    commits = store.commits
    await store.close()
    return len(events) / elapsed, commits


def _verify_time(path: Path, count: int) -> float:
    """Build `count` chained records quickly, then time a full verify."""
    store = SqlAuditStore(f"sqlite:///{path}")
    head, prev = 0, GENESIS_HASH
    now = time.time_ns() // 1_000_000
    step = 10_000
    for start in range(0, count, step):
        records = chain_events(
            [_event(i) for i in range(start, min(count, start + step))], head, prev, now
        )
        store.insert_records(records)
        head, prev = records[-1].sequence, records[-1].record_hash
    started = time.perf_counter()
    report = store.verify("alpha", None)
    elapsed = time.perf_counter() - started
    store.dispose()
    if not report.ok or report.records != count:
        raise SystemExit(f"verify failed on a clean log: {report.problems[:1]}")
    return elapsed


def _mark(met: bool) -> str:
    return "met" if met else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="Small counts: a few seconds.")
    args = parser.parse_args(argv)
    group_total = 3_000 if args.quick else 30_000
    baseline_total = 200 if args.quick else 2_000
    verify_count = 10_000 if args.quick else VERIFY_TARGET_RECORDS

    print(f"durable audit on SQLite (WAL, synchronous=FULL){' [quick]' if args.quick else ''}")
    print(
        f"{'appenders':>9}  {'group commit':>14}  {'commits':>8}  {'1 commit/record':>16}"
        f"  {'ratio':>6}  target >= {RATE_TARGET:,.0f}/s"
    )
    with tempfile.TemporaryDirectory(prefix="fedgate-bench-audit-") as tmp:
        directory = Path(tmp)
        for appenders in (1, 32, 256):
            rate, commits = asyncio.run(
                _throughput(directory / f"group-{appenders}.db", appenders, group_total, 512)
            )
            baseline, _ = asyncio.run(
                _throughput(directory / f"single-{appenders}.db", appenders, baseline_total, 1)
            )
            verdict = (
                "- (one caller waits for each fsync)"
                if appenders == 1
                else _mark(rate >= RATE_TARGET)
            )
            print(
                f"{appenders:>9}  {rate:>12,.0f}/s  {commits:>8}  {baseline:>14,.0f}/s"
                f"  {rate / baseline:>5.1f}x  {verdict}"
            )
        elapsed = _verify_time(directory / "verify.db", verify_count)
    scaled = elapsed * VERIFY_TARGET_RECORDS / verify_count
    note = (
        ""
        if verify_count == VERIFY_TARGET_RECORDS
        else (
            f" (measured on {verify_count:,}, scaled to {VERIFY_TARGET_RECORDS:,}: {scaled:.2f} s)"
        )
    )
    print(
        f"verify {verify_count:,} records: {elapsed:.2f} s{note}; target "
        f"{VERIFY_TARGET_RECORDS:,} in <= {VERIFY_TARGET_S:.0f} s: "
        f"{_mark(scaled <= VERIFY_TARGET_S)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
