"""grpc's log as `fedgate serve` reads it: refused handshakes become rate-limited lines of ours."""

from __future__ import annotations

import logging
import os

import pytest

from gateway.grpc_log import GrpcLogTap, HandshakeLog, prepare_for_serve

# grpc 1.85's handshaker trace for a client that sent no certificate (abridged args).
REFUSED = (
    b"I1201 21:43:08.829606   20584 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN:"
    b" Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000c0:SSL routines:"
    b"OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification "
    b"context: OK\n"
    b"=== Source Location Trace: === \n"
    b"src/core/util/status_helper.cc:68\n"
    b" shutdown=false index=2, args={endpoint=0x7f7308001c00, args={grpc.internal.endpoint_lo"
    b"cal_address=ipv4:127.0.0.1:7443, grpc.internal.endpoint_peer_address=ipv4:10.1.2.3:4657"
    b"0, grpc.internal.server_credentials=0x55a126a53f20}}\n"
)
SSL_LINE = (
    b"I1201 21:43:08.829582   20584 ssl_transport_security.cc:2563] Handshake failed with error "
    b"SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIF"
    b"ICATE: Invalid certificate verification context\n"
)
TRACE = b"I1201 21:43:08.828831   20584 channel_trace.h:396] handshake manager 0x7f: calling\n"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedgate.tls"]


def test_one_line_per_host_and_reason_a_minute_then_a_sum(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    handshakes = HandshakeLog(clock=clock, window_seconds=60)
    handshakes.listeners[7443] = "federation"
    caplog.set_level(logging.DEBUG, "fedgate.tls")
    text = REFUSED.decode()
    for _ in range(5):
        handshakes.record(text)
    assert _records(caplog) == [
        "TLS handshake refused on the federation listener from 10.1.2.3:46570: no client "
        "certificate (refused since start: 1)"
    ]
    # Another host is its own line at once.
    handshakes.record(text.replace("10.1.2.3", "10.9.9.9"))
    assert len(_records(caplog)) == 2
    clock.now += 61
    handshakes.flush()
    assert _records(caplog)[2:] == [
        "4 more TLS handshakes refused from 10.1.2.3 in the last 60 s: no client certificate"
    ]
    assert handshakes.counts.refused == 6
    assert handshakes.counts.by_reason["no client certificate"] == 6
    # After the window, the next refusal is a line again.
    handshakes.record(text)
    assert _records(caplog)[-1].endswith("(refused since start: 7)")


def test_a_closed_connection_is_counted_not_a_refusal(caplog: pytest.LogCaptureFixture) -> None:
    handshakes = HandshakeLog()
    caplog.set_level(logging.INFO, "fedgate.tls")
    handshakes.record(
        "CallNextHandshakerLocked: error=UNAVAILABLE: Handshake read failed (Socket closed)\n"
        " args={grpc.internal.endpoint_peer_address=ipv4:10.0.0.1:5, "
        "grpc.internal.server_credentials=0x1}"
    )
    assert handshakes.counts.closed_early == 1 and handshakes.counts.refused == 0
    assert _records(caplog) == []


def test_an_outbound_failure_names_the_partner_address(caplog: pytest.LogCaptureFixture) -> None:
    handshakes = HandshakeLog()
    caplog.set_level(logging.INFO, "fedgate.tls")
    handshakes.record(
        "CallNextHandshakerLocked: error=UNKNOWN: Custom verification check failed with error: "
        "UNAUTHENTICATED: Hostname Verification Check failed.\n args={"
        "grpc.internal.endpoint_peer_address=ipv4:192.0.2.7:7443, "
        "grpc.internal.channel_credentials=0x1}"
    )
    assert _records(caplog) == [
        "outbound TLS handshake to 192.0.2.7:7443 failed: the server's certificate is not that "
        "of the organization dialed"
    ]
    assert handshakes.counts.outbound_failed == 1 and handshakes.counts.refused == 0


def _tap(monkeypatch: pytest.MonkeyPatch, verbosity: str = "INFO") -> tuple[GrpcLogTap, int]:
    monkeypatch.setenv("FEDGATE_GRPC_TRACE_ADDED", "1")
    monkeypatch.setenv("FEDGATE_GRPC_VERBOSITY_ASKED", verbosity)
    tap = GrpcLogTap()
    read_end, write_end = os.pipe()
    tap._real_stderr = write_end
    return tap, read_end


def test_the_tap_passes_other_output_on_and_drops_what_it_replaces(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tap, out = _tap(monkeypatch)
    caplog.set_level(logging.INFO, "fedgate.tls")
    other = b"E1201 21:43:09.000000   20584 chttp2_transport.cc:1] something else\n"
    plain = b"a line that is not grpc's, with \xff bytes\n"
    add_port = b"E1201 21:48:40.842642 27246 add_port.cc:83] Failed to add port to server: x\n"
    # Split at odd places, as a pipe delivers it.
    stream = TRACE + SSL_LINE + REFUSED + other + plain + add_port
    for start in range(0, len(stream), 37):
        tap._feed(stream[start : start + 37])
    tap._end_record()
    os.close(tap._real_stderr)  # type: ignore[arg-type]
    with os.fdopen(out, "rb") as handle:
        passed = handle.read()
    assert passed == other + plain
    assert len(_records(caplog)) == 1 and "no client certificate" in _records(caplog)[0]


def test_the_tap_applies_the_verbosity_asked_of_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    tap, out = _tap(monkeypatch, verbosity="ERROR")
    info = b"I1201 21:43:09.000000   20584 chttp2_transport.cc:1] chatty\n"
    error = b"E1201 21:43:09.000000   20584 chttp2_transport.cc:1] bad\ncontinued\n"
    tap._feed(info + error)
    tap._end_record()
    os.close(tap._real_stderr)  # type: ignore[arg-type]
    with os.fdopen(out, "rb") as handle:
        assert handle.read() == error


def test_prepare_adds_the_trace_and_keeps_the_operators() -> None:
    environ = {"GRPC_TRACE": "http", "GRPC_VERBOSITY": "error"}
    import sys

    grpc = sys.modules.pop("grpc")
    try:
        assert prepare_for_serve(environ)
    finally:
        sys.modules["grpc"] = grpc
    assert environ["GRPC_TRACE"] == "http,handshaker"
    assert environ["GRPC_VERBOSITY"] == "INFO"
    assert environ["FEDGATE_GRPC_VERBOSITY_ASKED"] == "ERROR"
    assert not prepare_for_serve({}), "too late once grpc is loaded"
