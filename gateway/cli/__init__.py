"""The `fedgate` command: one group, one module per family of subcommands."""

from __future__ import annotations

import sys

from gateway import grpc_log

# Before anything imports grpc, which reads GRPC_TRACE once: `fedgate serve` reads grpc's
# handshake trace to log refused TLS handshakes as its own lines (gateway/grpc_log.py).
if sys.argv[1:2] == ["serve"]:
    grpc_log.prepare_for_serve()

import click

from gateway.errors import FedgateError


class _Group(click.Group):
    """Turns every FedgateError into one line on stderr with exit status 2."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except FedgateError as exc:
            click.echo(f"fedgate: {exc.message}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="fedgate")
def main() -> None:
    """Fedgate: a federated gateway for AI agents across organizations."""


def _register() -> None:
    from gateway.cli import audit, gateway_commands, policy, tasks, tokens

    for module in (gateway_commands, policy, audit, tasks, tokens):
        for command in module.COMMANDS:
            main.add_command(command)
    policy_group = main.commands.get("policy")
    if isinstance(policy_group, click.Group):
        policy_group.add_command(gateway_commands.policy_reload)


_register()
