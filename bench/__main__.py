"""Run every benchmark and print one summary: `python -m bench [--quick]`.

Each benchmark prints its own figures as it goes; the summary at the end repeats, per benchmark,
whether it ran, how long it took, and every target line it reported (met / missed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from bench import bench_audit, bench_exchange, bench_policy, bench_steps, bench_task_store

BENCHMARKS: list[tuple[str, Callable[[list[str]], int]]] = [
    ("policy filter", bench_policy.main),
    ("durable audit", bench_audit.main),
    ("task table, PostgreSQL", bench_task_store.main),
    ("full exchange vs relay", bench_exchange.main),
    # After the full exchange: its CPU per gateway, less the steps' sum, is the orchestration.
    ("CPU per exchange by step", bench_steps.main),
]
_VERDICT = re.compile(r"\b(met|missed)\b", re.IGNORECASE)
_MARKUP = re.compile(r"\[/?[a-z ]+\]")
_BOX = re.compile(r"[│┃┆┊|]+")


class _Tee(io.TextIOBase):
    """Writes through to the real stdout and keeps a copy."""

    def __init__(self, target: io.TextIOBase | None) -> None:
        self.target = target
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        if self.target is not None:
            self.target.write(text)
        return len(text)

    def flush(self) -> None:
        if self.target is not None:
            self.target.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


def verdict_lines(output: str) -> list[str]:
    """The lines of a benchmark's output that state a verdict, cleaned of markup and borders."""
    found = []
    for line in output.splitlines():
        clean = _MARKUP.sub("", line)
        if not _VERDICT.search(clean):
            continue
        clean = " ".join(" ".join(_BOX.split(clean)).split())
        if clean and clean not in found:
            found.append(clean)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="every benchmark in quick mode")
    args = parser.parse_args(argv)
    passed = ["--quick"] if args.quick else []
    summary: list[tuple[str, str, float, list[str]]] = []
    for name, run in BENCHMARKS:
        print(f"\n=== {name} ===", flush=True)
        tee = _Tee(sys.stdout)  # type: ignore[arg-type]
        started = time.perf_counter()
        status = "ok"
        with contextlib.redirect_stdout(tee):  # type: ignore[type-var]
            try:
                code = run(list(passed))
                if code:
                    status = f"exit {code}"
            except Exception as exc:
                status = f"failed: {type(exc).__name__}: {exc}".splitlines()[0]
                traceback.print_exc()
        summary.append(
            (name, status, time.perf_counter() - started, verdict_lines(tee.copy.getvalue()))
        )
    print(f"\n=== summary{' (quick)' if args.quick else ''} ===")
    print(bench_exchange.machine())
    missed = 0
    for name, status, seconds, verdicts in summary:
        print(f"{name:<24} {status:<10} {seconds:6.1f} s")
        for line in verdicts:
            missed += "missed" in line.lower()
            print(f"    {line}")
    failed = sum(1 for _, status, _, _ in summary if status != "ok")
    print(f"{len(summary)} benchmarks, {failed} failed; {missed} verdict line(s) with a miss")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
