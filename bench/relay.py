"""The bare baseline: grpcio (asyncio) relay processes over the same three hops as an exchange.

    requester ──► front (plaintext loopback) ══ mTLS ══► back ──► agent (plaintext loopback)

    python -m bench.relay agent --listen 127.0.0.1:0 --reply-bytes N --big-reply-bytes M --slow-ms S
    python -m bench.relay back  --listen 127.0.0.1:0 --upstream 127.0.0.1:AGENT --cert C --key K \
        --ca CA
    python -m bench.relay front --listen 127.0.0.1:0 --upstream 127.0.0.1:BACK --cert C --key K \
        --ca CA --server-name beta.fedgate

Each hop serves generic bytes methods (`grpc.method_handlers_generic_handler`, no serializers)
and forwards the request bytes to the same method of the next hop, then the reply back: nothing
else, so no protobuf is parsed anywhere. The hop between front and back is mutual TLS with the
federation's certificates, like the hop between two gateways; the other two are plaintext on
loopback, like a gateway's participant listener. The agent answers a fixed reply:

    /bench.Relay/Echo   `--reply-bytes` bytes at once
    /bench.Relay/Slow   the same, once `--pile-up` Slow calls are held at once (or after
                        `--slow-ms`), so that a burst is in flight on every hop together
    /bench.Relay/Big    `--big-reply-bytes` bytes at once

Every process binds 127.0.0.1 only, prints `ready PORT` on stdout once it serves, and stops on
SIGTERM or SIGINT (the agent then prints `peak_slow_in_flight N`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc

SERVICE = "bench.Relay"
METHODS = ("Echo", "Slow", "Big")
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the gateway's default [limits] max_message_bytes

# The same transport options as a gateway's listeners and peer channels (gateway/server.py,
# gateway/peers.py), so that only the work done per call differs.
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
]

Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


def method_path(name: str) -> str:
    return f"/{SERVICE}/{name}"


def _generic(handlers: dict[str, Handler]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE, {name: grpc.unary_unary_rpc_method_handler(h) for name, h in handlers.items()}
    )


def _check_loopback(address: str) -> str:
    host, _, _ = address.rpartition(":")
    if host != "127.0.0.1":
        raise SystemExit(f"relay: listen on 127.0.0.1 only, not {address!r}")
    return address


def _forwarders(channel: grpc.aio.Channel) -> dict[str, Handler]:
    """One bytes-in, bytes-out handler per method, calling the same method upstream."""
    handlers: dict[str, Handler] = {}
    for name in METHODS:
        upstream = channel.unary_unary(method_path(name))  # no serializers: bytes pass through

        async def forward(
            request: bytes,
            context: grpc.aio.ServicerContext,
            upstream: grpc.aio.UnaryUnaryMultiCallable = upstream,
        ) -> bytes:
            return await upstream(request, timeout=context.time_remaining())

        handlers[name] = forward
    return handlers


class PileUp:
    """Holds calls until `expected` are held at once or `hold_seconds` pass, then lets all go:
    so that a burst of calls is in flight on every hop at the same time."""

    def __init__(self, expected: int, hold_seconds: float) -> None:
        self.expected, self.hold_seconds = expected, hold_seconds
        self.held = 0
        self.peak = 0
        self._full = asyncio.Event()

    async def hold(self) -> None:
        self.held += 1
        self.peak = max(self.peak, self.held)
        if self.held >= self.expected:
            self._full.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.hold_seconds)
        finally:
            self.held -= 1
            if self.held == 0:
                self._full.clear()


class _AgentHandlers:
    def __init__(self, reply: bytes, big_reply: bytes, pile_up: PileUp) -> None:
        self.reply, self.big_reply, self.pile_up = reply, big_reply, pile_up

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self.reply

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self.pile_up.hold()
        return self.reply

    async def big(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self.big_reply


async def _run(args: argparse.Namespace, pem: dict[str, bytes]) -> int:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    channel: grpc.aio.Channel | None = None
    agent: _AgentHandlers | None = None
    listen = _check_loopback(args.listen)
    if args.role == "agent":
        agent = _AgentHandlers(
            b"r" * args.reply_bytes,
            b"b" * args.big_reply_bytes,
            PileUp(args.pile_up, args.slow_ms / 1000),
        )
        server.add_generic_rpc_handlers(
            (_generic({"Echo": agent.echo, "Slow": agent.slow, "Big": agent.big}),)
        )
        port = server.add_insecure_port(listen)
    elif args.role == "back":
        # Plaintext to the agent; mutual TLS towards the front relay (client certificate required).
        channel = grpc.aio.insecure_channel(args.upstream, options=CHANNEL_OPTIONS)
        server.add_generic_rpc_handlers((_generic(_forwarders(channel)),))
        credentials = grpc.ssl_server_credentials(
            [(pem["key"], pem["cert"])],
            root_certificates=pem["ca"],
            require_client_auth=True,
        )
        port = server.add_secure_port(listen, credentials)
    else:  # front: plaintext from the requester; mutual TLS to the back relay
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pem["ca"],
            private_key=pem["key"],
            certificate_chain=pem["cert"],
        )
        target = ("grpc.ssl_target_name_override", args.server_name)
        options = [*CHANNEL_OPTIONS, target]
        channel = grpc.aio.secure_channel(args.upstream, credentials, options)
        server.add_generic_rpc_handlers((_generic(_forwarders(channel)),))
        port = server.add_insecure_port(listen)
    if not port:
        raise SystemExit(f"relay {args.role}: cannot bind {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"ready {port}", flush=True)
    await stop.wait()
    await server.stop(0.5)
    if channel is not None:
        await channel.close()
    if agent is not None:
        print(f"peak_slow_in_flight {agent.pile_up.peak}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("role", choices=("front", "back", "agent"))
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--upstream", help="HOST:PORT of the next hop (front, back)")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--ca")
    parser.add_argument(
        "--server-name",
        default="beta.fedgate",
        help="name the back relay's certificate must carry (front), as a "
        "gateway verifies its peer (gateway.identity.certs.org_dns_name)",
    )
    parser.add_argument("--reply-bytes", type=int, default=1024)
    parser.add_argument("--big-reply-bytes", type=int, default=1024 * 1024)
    parser.add_argument(
        "--slow-ms", type=float, default=500.0, help="Slow holds a call at most this long ..."
    )
    parser.add_argument(
        "--pile-up",
        type=int,
        default=1000,
        help="... or until this many Slow calls are held at once",
    )
    args = parser.parse_args(argv)
    if args.role != "agent" and not (args.upstream and args.cert and args.key and args.ca):
        parser.error(f"{args.role} needs --upstream, --cert, --key and --ca")
    pem = (
        {}
        if args.role == "agent"
        else {name: Path(getattr(args, name)).read_bytes() for name in ("cert", "key", "ca")}
    )
    return asyncio.run(_run(args, pem))


if __name__ == "__main__":
    sys.exit(main())
