"""Config validation: a bad file fails at start with one line naming the file, the key and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.config import load_config
from gateway.errors import ConfigError
from tests.conftest import Pki

MODEL = Path(__file__).resolve().parents[2] / "policies" / "model.conf"


def _write(tmp: Path, pki: Pki, **overrides: str) -> Path:
    values = {
        "org": '"hospital"',
        "cert": f'"{pki.cert("hospital")}"',
        "key": f'"{pki.key("hospital")}"',
        "ca": f'"{pki.ca}"',
        "listen": '"127.0.0.1:0"',
        "deadline": "30",
    }
    values.update(overrides)
    path = tmp / "fedgate.toml"
    path.write_text(
        f"""[gateway]
org = {values["org"]}
default_deadline_seconds = {values["deadline"]}
[federation]
listen = {values["listen"]}
cert = {values["cert"]}
key = {values["key"]}
ca = {values["ca"]}
"""
    )
    return path


def test_valid_config_resolves_paths_relative_to_the_file(tmp_path: Path, pki: Pki) -> None:
    path = _write(tmp_path, pki)
    config = load_config(path)
    assert config.org == "hospital"
    assert config.data_dir == (tmp_path / "data").resolve()
    assert config.audit_database_url == f"sqlite:///{(tmp_path / 'data' / 'audit.db').resolve()}"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"cert": '"missing.crt"'}, "federation.cert: file not found:"),
        ({"org": '"Hospital!"'}, "gateway.org: 'Hospital!' is not a valid organization name"),
        ({"listen": '"nowhere"'}, "federation.listen: expected HOST:PORT"),
        ({"deadline": "-1"}, "gateway.default_deadline_seconds: Input should be greater than 0"),
        (
            {"deadline": '"soon"'},
            "gateway.default_deadline_seconds: Input should be a valid number",
        ),
    ],
)
def test_bad_values_name_file_key_and_problem(
    tmp_path: Path, pki: Pki, overrides: dict[str, str], expected: str
) -> None:
    path = _write(tmp_path, pki, **overrides)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.message
    assert expected in info.value.message


def test_missing_key_and_unknown_key(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "fedgate.toml"
    path.write_text('[gateway]\norg = "x"\n[federation]\ncert = "a"\nkey = "b"\n')
    with pytest.raises(ConfigError, match=r"federation\.ca: required key is missing"):
        load_config(path)
    path = _write(tmp_path, pki)
    path.write_text(path.read_text() + "colour = 'blue'\n")
    with pytest.raises(ConfigError, match=r"federation\.colour: unknown key"):
        load_config(path)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "fedgate.toml"
    path.write_text("[gateway\norg=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="file not found: create one with `fedgate init`"):
        load_config(tmp_path / "nope.toml")


def test_environment_overrides_a_key(tmp_path: Path, pki: Pki) -> None:
    path = _write(tmp_path, pki)
    config = load_config(
        path,
        environ={
            "FEDGATE_AUDIT_DATABASE_URL": "sqlite:////tmp/x.db",
            "FEDGATE_GATEWAY_DEFAULT_DEADLINE_SECONDS": "5",
        },
    )
    assert config.audit_database_url == "sqlite:////tmp/x.db"
    assert config.gateway.default_deadline_seconds == 5


def test_serve_with_a_missing_certificate_exits_nonzero_with_one_line(
    tmp_path: Path, pki: Pki
) -> None:
    path = _write(tmp_path, pki, key='"certs/nope.key"')
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and "federation.key: file not found" in lines[0]


def test_init_then_config_loads(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["init", "--org", "clinic", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    config = load_config(tmp_path / "fedgate.toml")
    assert config.org == "clinic"
    assert (tmp_path / "certs" / "clinic.crt").is_file()
    assert (tmp_path / "data" / "pseudonym.key").stat().st_mode & 0o777 == 0o600
    again = runner.invoke(main, ["init", "--org", "clinic", "--dir", str(tmp_path)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_init_refuses_a_bad_org_name(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["init", "--org", "Bad Name", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a valid organization name" in result.output


def test_packaged_model_is_the_repository_model() -> None:
    """`fedgate init` writes the packaged copy of the Casbin model; it must not drift."""
    packaged = Path(__file__).resolve().parents[2] / "gateway" / "resources" / "model.conf"
    assert packaged.read_text() == MODEL.read_text()


PASSPHRASE = {"FEDGATE_CA_PASSPHRASE": "correct horse battery staple"}


def _run(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), env=env or {})


def _serve_once(config: Path) -> subprocess.CompletedProcess[str]:
    """`fedgate serve` that must refuse to start (a gateway that starts times out here)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_refuses_a_certificate_of_another_ca_than_the_one_it_trusts(tmp_path: Path) -> None:
    """init (a trial's development CA), then a certificate from the federation's CA: serve says
    so at once, instead of starting and failing at every partner's handshake."""
    assert _run("init", "--org", "hospital", "--dir", str(tmp_path)).exit_code == 0
    assert _run("certs", "ca", "--out", str(tmp_path / "fedca"), env=PASSPHRASE).exit_code == 0
    issued = _run(
        *("certs", "issue", "--org", "hospital", "--ca-dir", str(tmp_path / "fedca")),
        *("--out", str(tmp_path / "certs")),
        env=PASSPHRASE,
    )
    assert issued.exit_code == 0, issued.output
    result = _serve_once(tmp_path / "fedgate.toml")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"{tmp_path / 'certs' / 'hospital.crt'}: this gateway's certificate" in line
    assert f"is not issued by the CA in {tmp_path / 'certs' / 'ca.crt'}" in line
    assert "put the federation's CA certificate in [federation] ca" in line


def test_init_with_the_federation_ca_makes_a_request_and_serve_says_what_is_missing(
    tmp_path: Path,
) -> None:
    assert _run("certs", "ca", "--out", str(tmp_path / "fedca"), env=PASSPHRASE).exit_code == 0
    site = tmp_path / "hospital"
    joined = _run(
        "init",
        "--org",
        "hospital",
        "--dir",
        str(site),
        "--ca-cert",
        str(tmp_path / "fedca" / "ca.crt"),
    )
    assert joined.exit_code == 0, joined.output
    certs = site / "certs"
    assert sorted(p.name for p in certs.iterdir()) == ["ca.crt", "hospital.csr", "hospital.key"]
    assert (certs / "ca.crt").read_bytes() == (tmp_path / "fedca" / "ca.crt").read_bytes()
    assert f"send {certs / 'hospital.csr'} to the federation CA's operator" in joined.output
    assert (site / "data").stat().st_mode & 0o777 == 0o700
    # Before the certificate is back, serve says what is missing and what to do.
    waiting = _serve_once(site / "fedgate.toml")
    assert waiting.returncode == 2
    (line,) = waiting.stderr.strip().splitlines()
    assert "federation.cert: file not found" in line
    assert f"the federation CA has not issued it yet: send {certs / 'hospital.csr'}" in line
    # The CA operator signs the request; the certificate goes beside the key.
    issued = _run(
        *("certs", "issue", "--org", "hospital", "--csr", str(certs / "hospital.csr")),
        *("--ca-dir", str(tmp_path / "fedca"), "--out", str(certs)),
        env=PASSPHRASE,
    )
    assert issued.exit_code == 0, issued.output
    config = load_config(site / "fedgate.toml")
    from gateway.identity.tls import TlsFiles, read_material

    fed = config.federation
    read_material(TlsFiles(fed.cert, fed.key, fed.ca, org=config.org))


def test_a_trial_joins_the_federation_with_init_ca_cert(tmp_path: Path) -> None:
    """The trial's development CA and certificate are set aside; its config and policy kept."""
    assert _run("init", "--org", "hospital", "--dir", str(tmp_path)).exit_code == 0
    rules = tmp_path / "policies" / "hospital.csv"
    rules.write_text("p, insurer, records, summary, invoke, *, allow\n")
    config = tmp_path / "fedgate.toml"
    config.write_text(config.read_text() + '[peers.insurer]\naddress = "127.0.0.1:1"\n')
    kept = config.read_text()
    assert _run("certs", "ca", "--out", str(tmp_path / "fedca"), env=PASSPHRASE).exit_code == 0
    joined = _run(
        *("init", "--org", "hospital", "--dir", str(tmp_path)),
        *("--ca-cert", str(tmp_path / "fedca" / "ca.crt")),
    )
    assert joined.exit_code == 0, joined.output
    assert config.read_text() == kept
    certs = tmp_path / "certs"
    assert sorted(p.name for p in certs.iterdir()) == [
        "ca.crt",
        "dev-ca.crt",
        "dev-ca.key",
        "dev-hospital.crt",
        "dev-hospital.key",
        "hospital.csr",
        "hospital.key",
    ]
    assert (certs / "ca.crt").read_bytes() == (tmp_path / "fedca" / "ca.crt").read_bytes()
    assert rules.read_text() == "p, insurer, records, summary, invoke, *, allow\n"
    refused = _run(
        *("init", "--org", "hospital", "--dir", str(tmp_path / "other"), "--ca-cert"),
        str(certs / "dev-hospital.crt"),
    )
    assert refused.exit_code == 2
    assert "not a CA certificate" in refused.output


@pytest.mark.parametrize(
    ("listen", "extra", "expected"),
    [
        (
            "0.0.0.0:7400",
            "",
            "participant: listen = '0.0.0.0:7400' is reachable from other hosts, but the "
            "participant listener has no TLS (tokens and payloads would cross the network in "
            "plaintext): set [participant] cert and key (`fedgate certs issue --san HOST`), or "
            "listen on 127.0.0.1",
        ),
        ("gw.hospital.internal:7400", "", "is reachable from other hosts, but the participant"),
        ("[::]:7400", "", "is reachable from other hosts"),
        ("127.0.0.1:7400", 'cert = "{cert}"\n', "participant: cert and key: give both"),
        (
            "0.0.0.0:7400",
            'cert = "{cert}"\nkey = "{key}"\nrequire_tokens = false\n',
            "require_tokens = false would let anyone there call through this gateway",
        ),
    ],
)
def test_a_participant_listener_off_loopback_needs_tls_and_tokens(
    tmp_path: Path, pki: Pki, listen: str, extra: str, expected: str
) -> None:
    path = _write(tmp_path, pki)
    body = extra.format(cert=pki.cert("hospital"), key=pki.key("hospital"))
    path.write_text(path.read_text() + f'[participant]\nlisten = "{listen}"\n{body}')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.message.startswith(f"{path}: ")
    assert expected in info.value.message


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:7400", "127.0.0.2:7400", "[::1]:7400", "localhost:1"]
)
def test_a_loopback_participant_listener_needs_no_tls(
    tmp_path: Path, pki: Pki, listen: str
) -> None:
    path = _write(tmp_path, pki)
    path.write_text(path.read_text() + f'[participant]\nlisten = "{listen}"\n')
    assert load_config(path).participant.cert is None


def test_a_participant_listener_off_loopback_with_tls(tmp_path: Path, pki: Pki) -> None:
    path = _write(tmp_path, pki)
    path.write_text(
        path.read_text()
        + '[participant]\nlisten = "0.0.0.0:7400"\n'
        + f'cert = "{pki.cert("hospital")}"\nkey = "{pki.key("hospital")}"\n'
    )
    config = load_config(path)
    assert config.participant.cert == pki.cert("hospital")
    assert config.participant_ca == pki.ca, "trusted by the CLI: the federation CA by default"
