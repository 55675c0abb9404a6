"""`fedgate tokens issue|list|revoke` through click's CliRunner, on a minimal fedgate.toml."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gateway.cli import main
from gateway.cli.tokens import COMMANDS, tokens
from gateway.config import load_config
from gateway.errors import Unauthenticated
from gateway.identity.certs import create_ca, issue_gateway_cert, write_pair
from gateway.identity.tokens import TokenAuthority, token_authority


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`tokens` under the main group (one line, exit 2 on errors), as the lead wires it."""
    assert [tokens] == COMMANDS
    monkeypatch.setitem(main.commands, "tokens", tokens)
    yield


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    ca = create_ca()
    write_pair(ca, tmp_path / "ca.crt", tmp_path / "ca.key")
    write_pair(issue_gateway_cert(ca, "hospital"), tmp_path / "gw.crt", tmp_path / "gw.key")
    path = tmp_path / "fedgate.toml"
    path.write_text(
        """
[gateway]
org = "hospital"
data_dir = "data"

[federation]
cert = "gw.crt"
key = "gw.key"
ca = "ca.crt"
""",
        encoding="utf-8",
    )
    return path


def run(config_path: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["tokens", *args, "--config", str(config_path)])


def authority(config_path: Path) -> TokenAuthority:
    return token_authority(load_config(config_path))


def test_issue_prints_only_the_token(config_path: Path, tmp_path: Path) -> None:
    result = run(
        config_path,
        "issue",
        "--subject",
        "records-service",
        "--agent",
        "records",
        "--call",
        "insurer/claims.check",
        "--call",
        "lab/*",
        "--ttl-days",
        "7",
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    assert token.count(".") == 2
    claims = authority(config_path).verify(token)
    assert claims.subject == "records-service"
    assert claims.agents == ("records",)
    assert claims.calls == ("insurer/claims.check", "lab/*.*")
    assert f"issued token {claims.token_id} for 'records-service', expires " in result.stderr
    key = tmp_path / "data" / "token.key"
    assert key.stat().st_mode & 0o777 == 0o600


def test_list_and_revoke(config_path: Path) -> None:
    token = run(config_path, "issue", "--subject", "records-service", "--agent", "records").stdout
    run(config_path, "issue", "--subject", "billing-bot", "--call", "*")
    token_id = authority(config_path).verify(token.strip()).token_id

    table = run(config_path, "list")
    assert table.exit_code == 0, table.output
    assert token_id in table.stdout
    assert "records-service" in table.stdout and "billing-bot" in table.stdout
    assert "*/*.*" in table.stdout
    assert token.strip() not in table.stdout

    gateway_side = authority(config_path)  # a running gateway, already serving
    gateway_side.verify(token.strip())
    revoked = run(config_path, "revoke", token_id)
    assert revoked.exit_code == 0, revoked.output
    assert revoked.stdout == f"revoked token {token_id}: a running gateway refuses it at once\n"
    with pytest.raises(Unauthenticated, match="was revoked at"):
        gateway_side.verify(token.strip())

    listed = run(config_path, "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(row["subject"], row["status"]) for row in rows] == [
        ("records-service", "revoked"),
        ("billing-bot", "active"),
    ]
    assert rows[0]["token_id"] == token_id and rows[0]["revoked_at"] is not None
    assert rows[1]["calls"] == ["*/*.*"]


def test_list_of_a_fresh_gateway_is_empty(config_path: Path) -> None:
    result = run(config_path, "list", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("revoke", "nope"),
            "fedgate: no token 'nope' in the ledger",
        ),
        (
            ("issue", "--subject", "svc", "--call", "insurer/claims-*"),
            "fedgate: call pattern 'insurer/claims-*' is malformed: use ORG/AGENT.SKILL",
        ),
        (
            ("issue", "--subject", "svc"),
            "fedgate: a token for 'svc' would grant nothing: pass --agent NAME",
        ),
        (
            ("issue", "--subject", "svc", "--agent", "x", "--ttl-days", "400"),
            "fedgate: token lifetime of 400 days is out of range: more than 0 and at most 366 days",
        ),
    ],
)
def test_errors_are_one_line_and_exit_2(
    config_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = run(config_path, *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1


def test_missing_config_is_one_line(tmp_path: Path) -> None:
    result = run(tmp_path / "absent.toml", "list")
    assert result.exit_code == 2
    assert result.stderr == (
        f"fedgate: {tmp_path / 'absent.toml'}: file not found: create one with `fedgate init` "
        "or pass --config\n"
    )


def test_issue_an_operator_token(config_path: Path) -> None:
    result = run(config_path, "issue", "--subject", "ops", "--operator")
    assert result.exit_code == 0, result.output
    claims = authority(config_path).verify(result.stdout.strip())
    assert claims.operator and claims.agents == () and claims.calls == ()
    rows = json.loads(run(config_path, "list", "--json").stdout)
    assert [(row["subject"], row["operator"]) for row in rows] == [("ops", True)]
    assert "operator" in run(config_path, "list").stdout


def test_a_token_that_grants_nothing_names_the_operator_flag(config_path: Path) -> None:
    result = run(config_path, "issue", "--subject", "nobody")
    assert result.exit_code == 2
    assert "--operator to let it read `fedgate agents` and `fedgate peers`" in result.output
