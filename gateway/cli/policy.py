"""`fedgate policy …`: check, preview (explain) and test the sharing policy.

Policy test cases (for `fedgate policy test`) are TOML or JSON files:

    model = "../model.conf"      # optional, relative to this file; default: [policy] model
    rules = "../hospital.csv"    # optional, relative to this file; default: [policy] rules

    [[case]]
    name = "insurer gets a redacted summary"
    peer = "insurer"
    agent = "records"
    skill = "summary"
    direction = "share"          # invoke | send | share | provenance
    claims = { purpose = "treatment" }        # optional
    payload = { ... }            # send / share: the payload in
    expect = { ... }             # send / share: exactly what leaves; "<pseudonym>" matches any
    withheld = ["patient.name"]  # optional: exactly these concrete paths are withheld
    allowed = true               # invoke, provenance: the expected answer

With no PATH, `fedgate policy test` runs the folder named by [policy] tests; when none is
configured, or the folder holds no case files, it says so and how to add one, and exits 0 (a
gateway fresh from `fedgate init` has no tests yet). A PATH or configured folder that does not
exist is an error (exit 2).

`fedgate policy rotate-pseudonym-key` makes a new pseudonym key current (gateway.policy.keys);
`fedgate policy pseudonym` recomputes the pseudonym a value had under a key, so that an old
pseudonym a partner asks about can be matched to a value.

(`fedgate policy reload` talks to a running gateway and is added with the server.)
"""

from __future__ import annotations

import difflib
import json
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.cli._common import config_option, read_config
from gateway.config import GatewayConfig, PolicySection
from gateway.errors import ConfigError, FedgateError, InvalidArgument, PolicyError
from gateway.policy import paths, transforms
from gateway.policy.engine import (
    DIRECTIONS,
    Policy,
    Rule,
    _build_enforcer,
    check_policy,
    load_or_create_pseudonym_key,
    load_policy,
)
from gateway.policy.keys import load_pseudonym_keys, rotate_pseudonym_key

# Test cases must not depend on a gateway's real key: "<pseudonym>" stands for any pseudonym.
TEST_KEY = b"fedgate policy test key, not secret"[:32]
PSEUDONYM_PLACEHOLDER = "<pseudonym>"


def _policy_section(config: GatewayConfig) -> PolicySection:
    if config.policy is None:
        raise ConfigError(
            f"{config.source}: no [policy] section: add model and rules paths (see "
            "policies/README.md)"
        )
    return config.policy


@click.group("policy")
def policy() -> None:
    """Check, preview and test the sharing policy."""


@policy.command("check")
@config_option
def check(config_path: str) -> None:
    """Validate the model and rules; list problems and warnings with file:line."""
    config = read_config(config_path)
    section = _policy_section(config)
    console = Console(highlight=False, soft_wrap=True)
    errors: list[str] = []
    warnings: tuple[str, ...] = ()
    rules: tuple[Any, ...] = ()
    try:
        report, rules, _ = check_policy(section.model, section.rules, known_peers=set(config.peers))
        errors += report.errors
        warnings = report.warnings
        if not errors:
            _build_enforcer(section.model, rules)
    except PolicyError as exc:
        errors.append(exc.message)
    for message in errors:
        console.print(f"[red]error[/red]   {escape(message)}")
    for message in warnings:
        console.print(f"[yellow]warning[/yellow] {escape(message)}")
    summary = f"{len(rules)} rules, {len(errors)} errors, {len(warnings)} warnings"
    if errors:
        console.print(f"[red]policy refused[/red]: {summary}")
        raise SystemExit(1)
    console.print(f"[green]policy ok[/green]: {summary}")


def _parse_claims(claims: Iterable[str]) -> dict[str, str | list[str]]:
    parsed: dict[str, list[str]] = {}
    for item in claims:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise InvalidArgument(f"--claim {item!r}: use NAME=VALUE (e.g. purpose=treatment)")
        parsed.setdefault(name.strip(), []).append(value.strip())
    return {name: values[0] if len(values) == 1 else values for name, values in parsed.items()}


def _read_payload(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read the payload: {exc.strerror}") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}): fix the file"
        ) from None
    if not isinstance(payload, dict):
        raise InvalidArgument(f"{path}: a payload is a JSON object, not a {type(payload).__name__}")
    return payload


def _explain_key(config: GatewayConfig) -> tuple[bytes, bool]:
    """The gateway's pseudonym key if it exists, else a throwaway one (and True)."""
    path = config.pseudonym_key_path
    if path.exists():
        return load_or_create_pseudonym_key(path), False
    return bytes(32), True


@policy.command("explain")
@config_option
@click.option("--peer", required=True, help="Peer organization.")
@click.option("--agent", required=True, help="Agent (ours for invoke/share, theirs for send).")
@click.option("--skill", required=True, help="Skill of that agent.")
@click.option("--direction", type=click.Choice(DIRECTIONS), default="share", show_default=True)
@click.option("--payload", "payload_path", type=click.Path(dir_okay=False), help="JSON file.")
@click.option("--claim", "claims", multiple=True, help="Delegated claim NAME=VALUE (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def explain(
    config_path: str,
    peer: str,
    agent: str,
    skill: str,
    direction: str,
    payload_path: str | None,
    claims: tuple[str, ...],
    as_json: bool,
) -> None:
    """Show field by field what would leave for a peer, and the rule that decides."""
    config = read_config(config_path)
    section = _policy_section(config)
    console = Console(highlight=False, soft_wrap=True)
    claim_values = _parse_claims(claims)
    if direction != "invoke" and payload_path is None:
        raise InvalidArgument(
            f"--payload is required for --direction {direction}: pass a JSON file"
        )
    payload = _read_payload(payload_path) if payload_path is not None else {}
    key, throwaway = _explain_key(config)
    loaded = load_policy(section.model, section.rules, pseudonym_key=key)
    if direction == "invoke":
        invoke_decision = loaded.may_invoke(peer, agent, skill, claim_values)
        by_casbin = loaded.explain_field(peer, agent, skill, "invoke", "", claim_values)
        _check_agreement(invoke_decision.rule, by_casbin, "invoke")
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "policy_version": loaded.version,
                        "allowed": invoke_decision.allowed,
                        "rule": invoke_decision.rule,
                    },
                    indent=2,
                )
            )
        else:
            verdict = "[green]allowed[/green]" if invoke_decision.allowed else "[red]denied[/red]"
            console.print(f"{escape(peer)} may invoke {escape(agent)}.{escape(skill)}: {verdict}")
            console.print(f"rule: {escape(invoke_decision.rule or 'none (default deny)')}")
        return
    result = loaded.filter(
        peer,
        agent,
        skill,
        "send" if direction == "send" else "share",
        payload,
        claim_values,
        max_depth=config.limits.max_payload_depth,
        max_fields=config.limits.max_payload_fields,
    )
    rows = []
    for decision in result.decisions:
        rule = loaded.casbin_rule_for(
            peer, agent, skill, direction, paths.normalize(decision.path), claim_values
        )
        _check_agreement(decision.rule, rule.describe() if rule else None, decision.path)
        leaves = _released(
            loaded,
            peer,
            agent,
            skill,
            direction,
            payload,
            decision.path,
            decision.action,
            claim_values,
        )
        rows.append((decision.path, decision.action, leaves, rule))
    provenance = (
        loaded.may_share_provenance(peer, agent, skill, claim_values)
        if direction == "share"
        else None
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "policy_version": result.policy_version,
                    "decisions": [
                        {"path": d.path, "action": d.action, "rule": d.rule}
                        for d in result.decisions
                    ],
                    "withheld": list(result.withheld),
                    "transformed": [list(item) for item in result.transformed],
                    "output": result.output,
                    **(
                        {"provenance": {"allowed": provenance.allowed, "rule": provenance.rule}}
                        if provenance is not None
                        else {}
                    ),
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return
    if throwaway and any(action == "pseudonymized" for _, action in result.transformed):
        console.print(
            f"[dim]note: {escape(str(config.pseudonym_key_path))} does not exist yet; the "
            "pseudonyms shown use a throwaway key[/dim]"
        )
    table = Table(title=f"{direction} to {peer} ({agent}.{skill}), policy {result.policy_version}")
    for column in ("field", "leaves as", "value that leaves", "rule"):
        table.add_column(column, overflow="fold")
    styles = {"allowed": "green", "withheld": "red"}
    for path, action, leaves, rule in rows:
        style = styles.get(action, "yellow")
        table.add_row(
            escape(path), f"[{style}]{action}[/{style}]", escape(leaves), escape(_short(rule))
        )
    console.print(table)
    console.print(
        "paths that leave with it (withheld, transformed): "
        + escape(
            ", ".join([*result.withheld, *(f"{p} ({a})" for p, a in result.transformed)]) or "none"
        )
    )
    if provenance is not None:
        verdict = "[green]leave[/green]" if provenance.allowed else "[red]stay here[/red]"
        console.print(
            f"receipts of sub-tasks (@provenance): {verdict}; rule: "
            f"{escape(provenance.rule or 'none (default deny)')}"
        )
    console.print("output that would leave:")
    click.echo(json.dumps(result.output, indent=2, ensure_ascii=False))


def _short(rule: Rule | None) -> str:
    """A rule as a table cell: where it is, its pattern, effect and condition."""
    if rule is None:
        return "none (default deny)"
    condition = f" if {rule.values[6]}" if rule.values[6] else ""
    return f"{Path(rule.source).name}: {rule.values[4]} {rule.values[5]}{condition}"


def _check_agreement(compiled: str | None, by_casbin: str | None, where: str) -> None:
    if compiled != by_casbin:
        raise PolicyError(
            f"internal disagreement at {where}: compiled rule {compiled!r}, Casbin {by_casbin!r}: "
            "please report this with the policy file"
        )


def _released(
    loaded: Policy,
    peer: str,
    agent: str,
    skill: str,
    direction: str,
    payload: dict[str, Any],
    path: str,
    action: str,
    claims: dict[str, Any],
) -> str:
    """The value that leaves at a path, as JSON text ('—' when withheld)."""
    if action == "withheld":
        return "—"
    value = loaded.released_value(
        peer, agent, skill, direction, path, paths.lookup(payload, path), claims
    )
    return json.dumps(value, ensure_ascii=False)


# -- policy test ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseOutcome:
    name: str
    passed: bool
    detail: str = ""


def _with_placeholders(expected: Any, actual: Any) -> Any:
    """`actual` with pseudonyms replaced by the placeholder where `expected` has one."""
    if expected == PSEUDONYM_PLACEHOLDER and isinstance(actual, str):
        return PSEUDONYM_PLACEHOLDER if transforms.PSEUDONYM.fullmatch(actual) else actual
    if isinstance(expected, dict) and isinstance(actual, dict):
        return {k: _with_placeholders(expected.get(k), v) for k, v in actual.items()}
    if isinstance(expected, list) and isinstance(actual, list):
        return [_with_placeholders(e, a) for e, a in zip(expected, actual, strict=False)] + actual[
            len(expected) :
        ]
    return actual


def _diff(expected: Any, actual: Any) -> str:
    def lines(value: Any) -> list[str]:
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).splitlines()

    return "\n".join(
        difflib.unified_diff(lines(expected), lines(actual), "expected", "actual", lineterm="")
    )


def _load_cases(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
        document = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise PolicyError(f"{path}: cannot read test cases: {exc}") from None
    cases = document.get("case")
    if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        raise PolicyError(f"{path}: no [[case]] tables: see `fedgate policy test --help`")
    return document, cases


def run_case(loaded: Policy, case: dict[str, Any]) -> CaseOutcome:
    """Run one test case against a loaded policy."""
    name = str(case.get("name", "(unnamed)"))
    try:
        peer, agent, skill, direction = (
            str(case[k]) for k in ("peer", "agent", "skill", "direction")
        )
    except KeyError as exc:
        return CaseOutcome(name, False, f"missing key {exc.args[0]!r}")
    claims = case.get("claims")
    if direction in ("invoke", "provenance"):
        ask = loaded.may_invoke if direction == "invoke" else loaded.may_share_provenance
        decision = ask(peer, agent, skill, claims)
        expected = bool(case.get("allowed", False))
        if decision.allowed == expected:
            return CaseOutcome(name, True)
        return CaseOutcome(
            name,
            False,
            f"expected allowed={expected}, got {decision.allowed} "
            f"(rule: {decision.rule or 'none, default deny'})",
        )
    if direction not in ("send", "share") or "payload" not in case or "expect" not in case:
        return CaseOutcome(
            name, False, "needs direction send/share with payload and expect, or invoke/provenance"
        )
    try:
        result = loaded.filter(
            peer, agent, skill, "send" if direction == "send" else "share", case["payload"], claims
        )
    except FedgateError as exc:
        return CaseOutcome(name, False, f"refused: {exc.message}")
    problems = []
    actual = _with_placeholders(case["expect"], result.output)
    if actual != case["expect"]:
        problems.append(_diff(case["expect"], actual))
    if "withheld" in case and sorted(case["withheld"]) != sorted(result.withheld):
        problems.append(
            _diff({"withheld": sorted(case["withheld"])}, {"withheld": sorted(result.withheld)})
        )
    return CaseOutcome(name, not problems, "\n".join(problems))


def _test_files(targets: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for target in targets:
        if target.is_dir():
            files += sorted(p for p in target.iterdir() if p.suffix in (".toml", ".json"))
        elif target.is_file():
            files.append(target)
        else:
            raise PolicyError(f"{target}: no such test file or folder")
    return files


@policy.command("test")
@config_option
@click.argument("targets", nargs=-1, type=click.Path(path_type=Path))
def run_tests(config_path: str, targets: tuple[Path, ...]) -> None:
    """Run policy test cases (payload in, expected output out); exit 1 on any failure."""
    console = Console(highlight=False, soft_wrap=True)
    config: GatewayConfig | None = None

    def section() -> PolicySection:
        nonlocal config
        if config is None:
            config = read_config(config_path)
        return _policy_section(config)

    if not targets:
        folder = section().tests
        if folder is None:
            console.print(
                "no policy tests: none are configured. Write [[case]] tables in "
                'policies/tests/NAME.toml and set [policy] tests = "policies/tests" in '
                "fedgate.toml (see policies/README.md), or pass PATH"
            )
            return
        if not folder.is_dir():
            raise ConfigError(
                f"[policy] tests names {folder}, which is not a folder: create it with a .toml "
                "file of [[case]] tables, or remove the setting"
            )
        targets = (folder,)
    files = _test_files(targets)
    if not files:
        shown = ", ".join(str(t) for t in targets)
        click.echo(
            f"no policy tests in {shown}: add a .toml or .json file of [[case]] tables "
            "(see policies/README.md)"
        )
        return
    passed = failed = 0
    for file in files:
        try:
            document, cases = _load_cases(file)
            model = file.parent / document["model"] if "model" in document else section().model
            rules = file.parent / document["rules"] if "rules" in document else section().rules
            loaded = load_policy(model, rules, pseudonym_key=TEST_KEY)
        except PolicyError as exc:
            console.print(f"[red]FAIL[/red] {escape(str(file))}: {escape(exc.message)}")
            failed += 1
            continue
        for case in cases:
            outcome = run_case(loaded, case)
            if outcome.passed:
                passed += 1
                console.print(f"[green]PASS[/green] {escape(file.name)}: {escape(outcome.name)}")
            else:
                failed += 1
                console.print(f"[red]FAIL[/red] {escape(file.name)}: {escape(outcome.name)}")
                click.echo(outcome.detail)
    console.print(f"{passed} passed, {failed} failed")
    if failed or not passed:
        raise SystemExit(1)


# -- pseudonym keys ---------------------------------------------------------------------------


@policy.command("rotate-pseudonym-key")
@config_option
@click.option(
    "--drop-retired",
    is_flag=True,
    help="Delete every retired key: old pseudonyms can then never be matched to a value again.",
)
def rotate_key(config_path: str, drop_retired: bool) -> None:
    """Make a new pseudonym key current; every pseudonym changes from the next policy load."""
    config = read_config(config_path)
    path = config.pseudonym_key_path
    new, dropped = rotate_pseudonym_key(path, drop_retired=drop_retired)
    click.echo(
        f"pseudonym key {new.id} is now current in {path}: every pseudonym changes once the "
        "gateway loads it (`fedgate policy reload`, or a restart)"
    )
    if dropped:
        click.echo(
            f"deleted retired keys {', '.join(k.id for k in dropped)}: pseudonyms made with them "
            "can no longer be matched to values by anyone"
        )
    else:
        click.echo(
            "the previous key is kept, retired, so that an old pseudonym can still be matched to "
            "its value (`fedgate policy pseudonym --key-id ...`); --drop-retired deletes it"
        )


@policy.command("pseudonym")
@config_option
@click.option("--peer", required=True, help="Peer organization the pseudonym went to.")
@click.option("--agent", required=True, help="Agent (ours for share, theirs for send).")
@click.option("--skill", required=True, help="Skill of that agent.")
@click.option("--direction", type=click.Choice(["send", "share"]), default="share")
@click.option("--field", "field_path", required=True, help="Concrete path, e.g. patient.ssn.")
@click.option("--value", required=True, help="The value (JSON if it parses, else a string).")
@click.option("--claim", "claims", multiple=True, help="Delegated claim NAME=VALUE (repeatable).")
@click.option("--key-id", help="A key of the ring (default: the current one).")
def pseudonym(
    config_path: str,
    peer: str,
    agent: str,
    skill: str,
    direction: str,
    field_path: str,
    value: str,
    claims: tuple[str, ...],
    key_id: str | None,
) -> None:
    """Print the pseudonym a value leaves as at a field, under the current rules and a key."""
    config = read_config(config_path)
    section = _policy_section(config)
    ring = load_pseudonym_keys(config.pseudonym_key_path)
    key = ring.current if key_id is None else ring.get(key_id)
    if key is None:
        known = ", ".join(k.id for k in ring.keys)
        raise InvalidArgument(
            f"--key-id {key_id!r} is not in {config.pseudonym_key_path} ({known})"
        )
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    loaded = load_policy(section.model, section.rules, pseudonym_key=key.key)
    claim_values = _parse_claims(claims)
    rule = loaded.rule_for(peer, agent, skill, direction, paths.normalize(field_path), claim_values)
    if rule is None or rule.effect.kind != transforms.PSEUDONYMIZE:
        raise InvalidArgument(
            f"{field_path} is not pseudonymized for {peer} ({agent}.{skill}, {direction}) under "
            f"the current rules: check --field, --peer and --claim purpose=..."
        )
    released = loaded.released_value(
        peer, agent, skill, direction, field_path, parsed, claim_values
    )
    if released is None:
        raise InvalidArgument(f"{value!r} cannot be pseudonymized: a string or number is")
    click.echo(f"{released}  (key {key.id}, rule {rule.source})")


COMMANDS: list[click.Command] = [policy]
