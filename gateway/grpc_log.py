"""grpc's own log, read by `fedgate serve`: a refused TLS handshake becomes one line of ours.

A TLS handshake that the federation listener refuses (no client certificate, a self-signed one,
one of another CA, an expired one) never reaches Python: grpc's C core logs it through absl
straight to file descriptor 2, without the peer's address, and grpcio has no callback for it
(grpc/grpc#38665, #32893). What does carry the address and the reason is grpc's `handshaker`
trace. So `fedgate serve`:

1. turns that trace on before grpc loads (`prepare_for_serve`, from the command line's first
   lines: grpc reads GRPC_TRACE once, when it is imported), at INFO verbosity, and
2. puts a pipe on descriptor 2 and reads it on a thread (`GrpcLogTap`):
   - a refused handshake becomes `TLS handshake refused on the federation listener from
     ADDRESS: REASON (refused since start: N)` on logger `fedgate.tls`, at most one line per
     peer host and reason a minute; the others are counted and summed up in one line;
   - a handshake of ours that a partner's gateway refuses is logged the same way (`outbound`);
   - a connection closed before any TLS (a load balancer's TCP check) is counted, at DEBUG;
   - the trace lines themselves, and grpc's line for a port it cannot bind (serve says that in
     one line of its own), are dropped;
   - every other byte goes on to the real stderr unchanged and in order, filtered by the
     verbosity the operator asked of grpc (GRPC_VERBOSITY).

Python's own stderr is pointed straight at the real stderr, so the gateway's log never waits on
the thread. If the thread ever fails, descriptor 2 is handed back to the real stderr.

This module must not import grpc: `prepare_for_serve` runs before grpc is loaded.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import re
import select
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("fedgate.tls")

# What `prepare_for_serve` found and set, read by GrpcLogTap.
_ENV_TRACE_ADDED = "FEDGATE_GRPC_TRACE_ADDED"
_ENV_VERBOSITY_ASKED = "FEDGATE_GRPC_VERBOSITY_ASKED"
_SEVERITY_ORDER = "DIWEF"  # absl: D only with GRPC_VERBOSITY=DEBUG
# The lowest severity of grpc's lines passed on, for each GRPC_VERBOSITY ("Z": none).
_VERBOSITY_LOWEST = {"DEBUG": "D", "INFO": "I", "WARNING": "W", "ERROR": "E", "NONE": "Z"}

# "I1201 21:43:08.829606   20584 handshaker.cc:155] CallNextHandshakerLocked: error=..."
_PREFIX = re.compile(rb"^([DIWEF])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ([^ :\]]+):\d+\] ")
_PEER = re.compile(r"grpc\.internal\.endpoint_peer_address=([^,}\s]+)")
_LOCAL = re.compile(r"grpc\.internal\.endpoint_local_address=([^,}\s]+)")
_SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)(?:: ([^:\n]+))?")

WINDOW_SECONDS = 60.0
_MAX_TRACKED = 256


def prepare_for_serve(environ: dict[str, str] | None = None) -> bool:
    """Turn on grpc's handshaker trace for this process; False if grpc is already loaded."""
    env = os.environ if environ is None else environ
    if "grpc" in sys.modules:
        return False
    tracers = [t.strip() for t in env.get("GRPC_TRACE", "").split(",") if t.strip()]
    if "handshaker" not in tracers and "all" not in tracers:
        env["GRPC_TRACE"] = ",".join([*tracers, "handshaker"])
        env[_ENV_TRACE_ADDED] = "1"
    asked = env.get("GRPC_VERBOSITY", "").strip().upper() or "INFO"
    env[_ENV_VERBOSITY_ASKED] = asked
    if asked not in ("DEBUG", "INFO"):
        env["GRPC_VERBOSITY"] = "INFO"  # trace lines are INFO; the tap applies what was asked
    return True


def _reason(text: str) -> tuple[str, bool]:
    """A readable reason for a failed handshake, and whether it was a refusal (not a hang-up)."""
    match = _SSL_REASON.search(text)
    if match is None:
        if any(
            s in text
            for s in ("Socket closed", "Handshake read failed", "Handshake write failed", "EOF")
        ):
            return "the connection closed during the handshake", False
        if "Hostname Verification Check failed" in text:
            return "the server's certificate is not that of the organization dialed", True
        if "Deadline" in text or "timed out" in text.lower():
            return "the handshake timed out", True
        first = text.strip().splitlines()[0] if text.strip() else "unknown"
        return first[:160], True
    code, detail = match.group(1), (match.group(2) or "").strip()
    if code == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no client certificate", True
    if code == "CERTIFICATE_VERIFY_FAILED":
        known = {
            "unable to get local issuer certificate": "certificate not issued by the federation CA",
            "self signed certificate": "self-signed certificate",
            "self-signed certificate": "self-signed certificate",
            "self signed certificate in certificate chain": (
                "certificate chain ends in a CA that is not the federation's"
            ),
            "certificate has expired": "certificate expired",
            "certificate is not yet valid": "certificate not yet valid",
            "certificate revoked": "certificate revoked",
            "unsupported certificate purpose": "certificate not meant for TLS clients (key usage)",
        }
        return known.get(detail, f"certificate refused: {detail or code}"), True
    if code in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
        return "not TLS (a plaintext client, or another protocol)", True
    if code in ("NO_SHARED_CIPHER", "UNSUPPORTED_PROTOCOL", "NO_APPLICATION_PROTOCOL"):
        return f"no protocol in common ({code})", True
    return f"{code}{': ' + detail if detail else ''}"[:160], True


def _address(value: str) -> str:
    """'ipv4:127.0.0.1:46570' -> '127.0.0.1:46570'; 'ipv6:%5B::1%5D:5' -> '[::1]:5'."""
    for scheme in ("ipv4:", "ipv6:"):
        if value.startswith(scheme):
            value = value[len(scheme) :]
    return value.replace("%5B", "[").replace("%5D", "]")


def _host(address: str) -> str:
    return address.rpartition(":")[0] or address


@dataclass
class HandshakeCounts:
    """Failed TLS handshakes seen since start, by reason (what a metric would export)."""

    refused: int = 0
    outbound_failed: int = 0
    closed_early: int = 0
    by_reason: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass
class _Window:
    started: float
    suppressed: int = 0
    last_address: str = ""


class HandshakeLog:
    """Turns failed handshakes into Fedgate's log lines, rate-limited per peer host and reason."""

    def __init__(
        self,
        *,
        window_seconds: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self.counts = HandshakeCounts()
        # Local port -> listener name ("federation", "participant"), set once serve has bound.
        self.listeners: dict[int, str] = {}
        self._window_seconds = window_seconds
        self._clock = clock
        self._log = logger
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._lock = threading.Lock()

    def record(self, text: str) -> None:
        """One failed-handshake record of grpc's handshaker trace."""
        server_side = "grpc.internal.server_credentials=" in text
        peer = _PEER.search(text)
        local = _LOCAL.search(text)
        address = _address(peer.group(1)) if peer else "an unknown address"
        reason, refused = _reason(text.partition("error=")[2])
        with self._lock:
            if not refused:
                self.counts.closed_early += 1
                self._log.debug("connection from %s closed before its TLS handshake", address)
                return
            if server_side:
                self.counts.refused += 1
                self.counts.by_reason[reason] += 1
                where = self._listener(local.group(1) if local else "")
                self._emit(
                    ("in", _host(address), reason),
                    address,
                    f"TLS handshake refused on {where} from %s: {reason} "
                    f"(refused since start: {self.counts.refused})",
                )
            else:
                self.counts.outbound_failed += 1
                self._emit(
                    ("out", _host(address), reason),
                    address,
                    f"outbound TLS handshake to %s failed: {reason}",
                )

    def _listener(self, local: str) -> str:
        port = _address(local).rpartition(":")[2]
        name = self.listeners.get(int(port)) if port.isdigit() else None
        return f"the {name} listener" if name else f"port {port or '?'}"

    def _emit(self, key: tuple[str, str, str], address: str, message: str) -> None:
        now = self._clock()
        self._expire(now)
        window = self._windows.get(key)
        if window is not None:
            window.suppressed += 1
            window.last_address = address
            return
        if len(self._windows) >= _MAX_TRACKED:
            key = (key[0], "(other hosts)", key[2])
            if key in self._windows:
                self._windows[key].suppressed += 1
                return
        self._windows[key] = _Window(now, last_address=address)
        self._log.warning(message, address)

    def flush(self) -> None:
        """Sum up the windows that have passed (called on every record and when idle)."""
        with self._lock:
            self._expire(self._clock())

    def _expire(self, now: float) -> None:
        for key, window in list(self._windows.items()):
            if now - window.started < self._window_seconds:
                continue
            del self._windows[key]
            if window.suppressed:
                direction, host, reason = key
                what = "refused from" if direction == "in" else "failed to"
                self._log.warning(
                    "%d more TLS handshakes %s %s in the last %.0f s: %s",
                    window.suppressed,
                    what,
                    host,
                    self._window_seconds,
                    reason,
                )


class GrpcLogTap:
    """Reads what is written to descriptor 2 (grpc's log) on a thread; see the module docstring."""

    def __init__(self, handshakes: HandshakeLog | None = None) -> None:
        self.handshakes = handshakes or HandshakeLog()
        self.trace_added = os.environ.get(_ENV_TRACE_ADDED) == "1"
        asked = os.environ.get(_ENV_VERBOSITY_ASKED, "INFO")
        self._lowest = _VERBOSITY_LOWEST.get(asked, "I")
        self._real_stderr: int | None = None
        self._read_end: int | None = None
        self._thread: threading.Thread | None = None
        self._pending = b""
        # The record being read: (kind, lines); kind is "forward", "drop" or "handshake".
        self._record_kind = "forward"
        self._record: list[bytes] = []

    @property
    def active(self) -> bool:
        """Whether handshakes are watched (grpc was loaded with the trace on)."""
        return self.trace_added or "handshaker" in os.environ.get("GRPC_TRACE", "")

    def install(self) -> None:
        """Put the pipe on descriptor 2 and point Python's stderr at the real one."""
        sys.stderr.flush()
        real = os.dup(2)
        read_end, write_end = os.pipe()
        os.set_inheritable(real, False)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._real_stderr, self._read_end = real, read_end
        sys.stderr = io.TextIOWrapper(
            open(os.dup(real), "wb", buffering=0),  # noqa: SIM115 (lives as long as the process)
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
        )
        self._thread = threading.Thread(target=self._run, name="fedgate-grpc-log", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Hand descriptor 2 back to the real stderr and let the thread write what is left."""
        if self._real_stderr is None:
            return
        with contextlib.suppress(OSError):
            os.dup2(self._real_stderr, 2)  # closes the pipe's write end: the thread reads EOF
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        assert self._read_end is not None and self._real_stderr is not None
        try:
            while True:
                ready, _, _ = select.select([self._read_end], [], [], 1.0)
                if not ready:
                    self._end_record()  # a record with nothing after it is complete by now
                    self.handshakes.flush()
                    continue
                chunk = os.read(self._read_end, 65536)
                if not chunk:
                    break
                self._feed(chunk)
            if self._pending:
                self._line(self._pending)
            self._end_record()
        except Exception:  # never leave grpc writing into a pipe nobody reads
            with contextlib.suppress(OSError):
                os.dup2(self._real_stderr, 2)
            with contextlib.suppress(Exception):
                log.exception("reading grpc's log failed; grpc logs to stderr directly again")
            with contextlib.suppress(OSError):
                while os.read(self._read_end, 65536):
                    pass
        finally:
            with contextlib.suppress(OSError):
                os.close(self._read_end)

    def _feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            self._line(line + b"\n")

    def _line(self, line: bytes) -> None:
        match = _PREFIX.match(line)
        if match is None:  # a continuation of the record being read, or not grpc's at all
            if self._record_kind == "forward":
                self._write(line)
            else:
                self._record.append(line)
            return
        self._end_record()
        severity, source = match.group(1).decode(), match.group(2).decode()
        text = line[match.end() :]
        kind = self._classify(source, text)
        if kind == "forward" and _severity_rank(severity) < _severity_rank(self._lowest):
            kind = "drop"  # below the verbosity the operator asked of grpc
        self._record_kind, self._record = kind, [line]
        if kind == "forward":
            self._write(line)

    def _classify(self, source: str, text: bytes) -> str:
        if source == "add_port.cc" and text.startswith(b"Failed to add port"):
            return "drop"  # serve names the listener and the fix in a line of its own
        if not self.active:
            return "forward"
        handshaker = source == "handshaker.cc" or (
            source == "channel_trace.h" and text.startswith(b"handshake manager")
        )
        if handshaker:
            if text.startswith(b"CallNextHandshakerLocked: error=") and not text.startswith(
                b"CallNextHandshakerLocked: error=OK "
            ):
                return "handshake"
            return "forward" if not self.trace_added else "drop"
        if source == "ssl_transport_security.cc" and text.startswith(b"Handshake failed"):
            return "drop"  # the handshaker record that follows says it, with the address
        if source == "trace.cc" and text.startswith(b"gRPC Tracers:") and self.trace_added:
            return "drop"
        return "forward"

    def _end_record(self) -> None:
        if self._record_kind == "handshake" and self._record:
            raw = b"".join(self._record)
            if not self.trace_added:
                self._write(raw)  # the operator asked for the trace: it gets it as well
            try:
                self.handshakes.record(raw.decode("utf-8", errors="replace"))
            except Exception:
                log.exception("could not read a failed TLS handshake from grpc's log")
        self._record_kind, self._record = "forward", []

    def _write(self, data: bytes) -> None:
        assert self._real_stderr is not None
        view = memoryview(data)
        while view:
            written = os.write(self._real_stderr, view)
            view = view[written:]


def _severity_rank(letter: str) -> int:
    return _SEVERITY_ORDER.index(letter) if letter in _SEVERITY_ORDER else len(_SEVERITY_ORDER)
