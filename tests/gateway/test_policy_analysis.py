"""`policy check` warns about rules that can never decide, and about a stricter rule that a
broader, less strict one overrides where it names a field (issue 12: `**.x, deny` after a broad
allow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy.engine import check_policy

POLICIES = Path(__file__).resolve().parents[2] / "policies"
MODEL = POLICIES / "model.conf"


def warnings_for(tmp_path: Path, *lines: str) -> list[str]:
    rules = tmp_path / "rules.csv"
    rules.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    report, _, _ = check_policy(MODEL, rules)
    assert not report.errors
    return [w.removeprefix(f"{rules}:") for w in report.warnings]


def test_a_deny_at_any_depth_overridden_by_a_broad_allow_is_named_with_file_and_line(
    tmp_path: Path,
) -> None:
    found = warnings_for(
        tmp_path,
        "p, insurer, records, summary, share, patient, allow",
        "p, *, *, *, share, **.ssn, deny",
    )
    assert found == [
        "2: `**.ssn, deny` does not decide where a broader, less strict rule covers the field "
        "first: patient.ssn (line 1, `patient, allow`: allowed); to have such a field withheld, "
        "add a rule for it itself (e.g. `patient.ssn, deny`)"
    ]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        # a conditional allow after an unconditional deny of the same field never decides
        (
            ["p, insurer, a, s, share, x, allow, purpose=a", "p, insurer, a, s, share, x, deny"],
            "1: rule never decides: line 2 (`x, deny`) decides first wherever it applies",
        ),
        # a broad wildcard of the same effect, earlier: the narrower line is redundant
        (
            ["p, *, a, s, share, x, allow", "p, insurer, a, s, share, x, allow"],
            "2: rule never decides: line 1 (`x, allow`) decides first wherever it applies, "
            "with the same effect, so this line is redundant",
        ),
        # equal specificity: the deny wins everywhere the allow would
        (
            ["p, insurer, a, s, share, x, allow", "p, insurer, a, *, share, x, deny"],
            "1: rule never decides: line 2 (`x, deny`) decides first wherever it applies, so "
            "what it names leaves withheld",
        ),
        # equal patterns: the one keeping fewer characters decides
        (
            ["p, insurer, a, s, share, a.*, mask:2", "p, insurer, a, s, share, a.*, mask:4"],
            "2: rule never decides: line 1 (`a.*, mask:2`) decides first",
        ),
        (
            ["p, insurer, a, s, share, x, allow, purpose=a & purpose!=a"],
            "1: rule never decides: its condition asks purpose=a and purpose!=a",
        ),
        (
            ["p, insurer, a, s, invoke, *, allow", "p, insurer, a, *, invoke, *, deny"],
            "1: rule never decides: line 2 (`deny`) decides first wherever it applies, so the "
            "call is denied",
        ),
        (
            [
                "p, insurer, a, s, share, @provenance, allow",
                "p, insurer, a, s, share, @provenance, deny",
            ],
            "1: rule never decides: line 2 (`@provenance, deny`) decides first wherever it "
            "applies, so provenance is withheld",
        ),
        (
            [
                "p, insurer, a, s, share, keys(a.*), pseudonymize",
                "p, insurer, a, s, share, keys(a.b), pseudonymize",
                "p, insurer, a, s, share, keys(a.*), allow",
            ],
            "3: rule never decides: line 1 (`keys(a.*), pseudonymize`) decides first",
        ),
    ],
)
def test_rules_that_never_decide(tmp_path: Path, lines: list[str], expected: str) -> None:
    found = warnings_for(tmp_path, *lines)
    assert len(found) == 1 and found[0].startswith(expected), found


@pytest.mark.parametrize(
    "lines",
    [
        # a specific allow under a broad deny is the documented way to let one field out
        ["p, insurer, a, s, share, patient, deny", "p, insurer, a, s, share, patient.city, allow"],
        # a catch-all deny under specific allows is deliberate
        ["p, insurer, a, s, share, **, deny", "p, insurer, a, s, share, patient.*, allow"],
        # the earlier rule only applies under a condition: the later one still decides otherwise
        ["p, insurer, a, s, share, x, deny, purpose=a", "p, insurer, a, s, share, x, allow"],
        # a narrower peer does not make the wildcard-peer rule dead
        ["p, insurer, a, s, share, x, deny", "p, *, a, s, share, x, allow"],
        # different first keys never meet
        ["p, insurer, a, s, share, a, allow", "p, insurer, a, s, share, b.ssn, deny"],
        # the stricter rule wins where they meet: nothing leaks
        ["p, insurer, a, s, share, patient, deny", "p, insurer, a, s, share, **.name, allow"],
        # keys and provenance rules do not compete with field rules
        [
            "p, insurer, a, s, share, **, allow",
            "p, insurer, a, s, share, keys(**), pseudonymize",
            "p, insurer, a, s, share, @provenance, deny",
        ],
    ],
)
def test_deliberate_layouts_are_not_warned_about(tmp_path: Path, lines: list[str]) -> None:
    assert warnings_for(tmp_path, *lines) == []


def test_the_demo_policies_have_no_dead_rules() -> None:
    for name in ("hospital.csv", "insurer.csv", "lab.csv"):
        report, _, _ = check_policy(MODEL, POLICIES / name)
        assert report.warnings == () and report.errors == (), name


def test_loading_a_policy_skips_the_analysis(tmp_path: Path) -> None:
    rules = tmp_path / "rules.csv"
    rules.write_text("p, *, a, s, share, x, allow\np, insurer, a, s, share, x, allow\n")
    report, _, _ = check_policy(MODEL, rules, shadowing=False)
    assert report.warnings == ()
