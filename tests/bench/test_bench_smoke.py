"""The benchmarks keep working: each runs in its smallest mode and produces its figures.

Never a timing assertion (DESIGN.md: benchmarks, never timed tests): only that numbers came out,
that they are positive, and that the ratios against the baselines were computed.
"""

from __future__ import annotations

import math
import re

import pytest

from bench import __main__ as bench_all
from bench import bench_audit, bench_exchange, bench_policy, bench_steps, bench_task_store


def test_policy_benchmark_reports_every_rule_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_policy.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for count in ("10", "1,000", "10,000"):
        assert re.search(rf"\b{count}\b", out), out
    ratio = re.search(r"10,000 / 10 rules: ([\d.]+)x", out)
    assert ratio is not None and float(ratio.group(1)) > 0, out
    assert len(bench_all.verdict_lines(out)) >= 4, out


def test_audit_benchmark_reports_throughput_and_verify(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_audit.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rates = re.findall(r"^\s+(\d+)\s+([\d,]+)/s", out, re.MULTILINE)
    assert [appenders for appenders, _ in rates] == ["1", "32", "256"], out
    assert all(float(rate.replace(",", "")) > 0 for _, rate in rates), out
    assert re.search(r"verify [\d,]+ records: [\d.]+ s", out), out


def test_task_table_benchmark_compares_pipelined_and_one_round_trip_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if bench_task_store.database_url() is None:
        pytest.skip("the task-table benchmark needs FEDGATE_TEST_DATABASE_URL (PostgreSQL)")
    assert bench_task_store.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(
        r"^(loopback|\+[\d.]+ ms each way \(proxy\))\s+([\d,]+)/s\s+([\d,]+)/s\s+([\d.]+)x",
        out,
        re.MULTILINE,
    )
    assert [row[0] for row in rows] == ["loopback", "+0.25 ms each way (proxy)"], out
    for _, pipelined, each, ratio in rows:
        assert float(pipelined.replace(",", "")) > 0 and float(each.replace(",", "")) > 0
        assert float(ratio) > 0


def test_exchange_benchmark_measures_both_paths(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_exchange.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    outcome = bench_exchange.LAST
    assert outcome is not None
    figures = outcome.figures
    for concurrency in (1, 32):
        assert figures[f"throughput_{concurrency}_baseline"] > 0
        assert figures[f"throughput_{concurrency}_fedgate"] > 0
        ratio = figures[f"throughput_{concurrency}_ratio"]
        assert math.isfinite(ratio) and ratio > 0
    for key in ("latency_p50_1_ratio", "latency_p99_32_ratio", "big_p50_ratio"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    # Both gateways were alive to be measured, and the report names the targets and the machine.
    assert figures["rss_hop_A_pileup_mb"] > 0 and figures["rss_hop_B_pileup_mb"] > 0
    assert "throughput, 32 in flight" in out and "machine:" in out
    assert re.search(r"p50 at 1 in flight [\d.]+x", out), out


_US = r"\s+([\d,]+(?:\.\d+)?)"  # a figure of bench_steps' table


def test_steps_benchmark_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_steps.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = (
        *bench_steps.REQUESTER_STEPS,
        *bench_steps.RESPONDER_STEPS,
        bench_steps.GRPC_STEP,
        bench_steps.REQUESTER_TOTAL,
        bench_steps.RESPONDER_TOTAL,
    )
    for row in rows:
        found = re.search(rf"^\s*{re.escape(row)}{_US * 3}$", out, re.MULTILINE)
        assert found is not None, f"no row {row!r} in:\n{out}"
        assert all(float(figure.replace(",", "")) > 0 for figure in found.groups()), found
    header = re.search(r"^µs of CPU per exchange\s+1 KB\s+64 KB\s+1 MiB$", out, re.MULTILINE)
    assert header is not None, out
    counts = re.findall(rf"^\s*share filter, ([\d,]+) rules{_US * 3}$", out, re.MULTILINE)
    assert [row[0] for row in counts] == ["13", "1,013", "10,000"], out
    assert re.search(rf"^\s*10,000 / 13 rules \(x\){_US * 3}$", out, re.MULTILINE), out
    assert "orchestration" in out and "machine:" in out
    # Each total is its gateway's steps and the gRPC call, at every size.
    report = bench_steps.LAST
    assert report is not None
    for total, steps in (
        (bench_steps.REQUESTER_TOTAL, bench_steps.REQUESTER_STEPS),
        (bench_steps.RESPONDER_TOTAL, bench_steps.RESPONDER_STEPS),
    ):
        for size in report.rows[total]:
            parts = [report.rows[row][size] for row in (*steps, bench_steps.GRPC_STEP)]
            assert math.isclose(report.rows[total][size], sum(parts)), (total, size)


def test_steps_benchmark_reads_each_gateways_cpu_from_the_full_bench(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bench_steps finds bench_exchange's CPU per exchange of each gateway in its printed table
    (so `python -m bench` shows the orchestration that no step owns)."""
    base, fed = bench_exchange.SideFigures(), bench_exchange.SideFigures()
    for figures, cpu in ((base, (0.5, 0.6)), (fed, (2.5, 2.25))):
        for concurrency in (1, 32):
            cpu_by_process = {"requester": 1.0, "hop A": cpu[0], "hop B": cpu[1], "agent": 1.0}
            figures.phases[concurrency].append(
                bench_exchange.Phase(1000, 1.0, [0.001] * 10, cpu_by_process)
            )
        figures.pileup_wall = 1.0
    sizes = bench_exchange.Sizes(request=1, result=1, big_request=1, big_result=1)
    settings = bench_exchange.SETTINGS["smoke"]
    text, figures = bench_exchange.render(base, fed, settings, sizes, [], "-")
    monkeypatch.setattr(bench_exchange, "LAST", bench_exchange.Outcome(text, figures))
    assert bench_steps.full_bench_cpu() == {
        bench_steps.REQUESTER_TOTAL: 2.5,
        bench_steps.RESPONDER_TOTAL: 2.25,
    }


def test_verdict_lines_are_found_in_rich_and_plain_output() -> None:
    text = "│  1,000 │  25.8 │ [green]met[/green] │\nno verdict here\ntarget: 0.4x: MISSED\n"
    assert bench_all.verdict_lines(text) == ["1,000 25.8 met", "target: 0.4x: MISSED"]
