"""Options and helpers shared by the command modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from gateway.config import GatewayConfig, load_config

F = TypeVar("F", bound=Callable[..., Any])


def config_option(func: F) -> F:
    """The --config option, defaulting to $FEDGATE_CONFIG or ./fedgate.toml."""
    return click.option(
        "--config",
        "config_path",
        envvar="FEDGATE_CONFIG",
        default="fedgate.toml",
        show_default=True,
        type=click.Path(dir_okay=False),
        help="Gateway configuration file.",
    )(func)


def read_config(config_path: str) -> GatewayConfig:
    """Load and validate the config; a ConfigError becomes one line and exit 2.

    A missing data folder is created here, 0700, whichever command needs it first (a token
    issued before the first `fedgate serve` must not leave it readable by others).
    """
    config = load_config(config_path)
    if not config.data_dir.exists():
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return config
