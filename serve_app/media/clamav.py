"""Malware scanning of whole uploads with clamd, over its INSTREAM command.

`ClamdScanner(address, timeout_s).scan(source)` reads the upload from a binary file object in
CHUNK_BYTES pieces and streams every byte of it (so the bytes of a polyglot that no audio decoder
reads are scanned too), holding one chunk in memory whatever the upload's size. It returns a
ScanResult: clean, or infected with clamd's signature name exactly as clamd reported it. That name
is for the audit log only; the client is told "malware detected", nothing more.

The time limit grows with the stream: a scan may take `timeout_s` plus one second for every
MIN_SCAN_BYTES_PER_S bytes streamed so far, one deadline for the whole exchange, extended as each
chunk is accepted. clamd must receive a 2 GiB upload and then scan all of it before it answers (47 s
measured for 2 GiB on a busy 2-core host with the test signatures, about 45 MB/s), so a fixed
timeout would either refuse long uploads or let a frozen clamd hold small ones for minutes. A
frozen clamd still costs at most `timeout_s` plus what the bytes it accepted earned, and a clamd
that accepts bytes slower than MIN_SCAN_BYTES_PER_S runs out of budget.

Fail closed: anything short of a complete verdict raises ScannerUnavailable with a short reason
(connection-refused, timeout, stream-too-long, connection-lost, scan-error, protocol-error). The
caller refuses the upload; it never treats "not scanned" as clean.

Verdicts named Heuristics.Limits.Exceeded.* (clamd's `AlertExceedsMax yes`, which production must
set: without it content over MaxFileSize/MaxScanSize comes back OK) are reported as INFECTED, not
as unavailable. clamd stops scanning at a limit, so the upload was not fully scanned and must be
refused; with the upload cap below clamd's MaxFileSize and StreamMaxLength, as the deployment is
configured, only what is nested inside an upload can trip one (an archive bomb appended to a WAV,
archives nested past MaxRecursion or holding more than MaxFiles). That is the client's doing, and
the same bytes would trip it again: a 503 would invite endless retries, while "malware detected"
refuses it and counts it as abuse. A stream over StreamMaxLength is different: clamd answers it
with an error, not a verdict, so it raises ScannerUnavailable("stream-too-long").

Limits for 2 GiB uploads (measured with ClamAV 1.4): clamd lowers MaxFileSize to 2147483645 bytes
(INT_MAX - 2) whatever is configured, and every size option to 4 GiB. So the configuration
(tools.local_services, deploy/kuberay/dependencies.yaml) sets MaxFileSize 2147483645,
StreamMaxLength 2G, MaxScanSize 4G and MaxScanTime 300000 (ms; 2 GiB took 47 s to receive and scan,
the 120 s default would be close). Every upload the 2 GiB body cap admits is scanned whole: its
audio part is smaller than the body by at least the multipart framing and the transcript part. A
stream of 2147483646 bytes up to 2 GiB comes back Heuristics.Limits.Exceeded.MaxFileSize, refused.

The INSTREAM protocol (`zINSTREAM\\0`, chunks of <uint32 big-endian length><bytes>, a zero length
to finish, a NUL-terminated reply) is spoken here directly rather than through pyclamd 0.4.0,
which was measured to be unsafe for this: it writes chunks with socket.send(), whose partial writes
make clamd read upload bytes as chunk lengths (seen with 1 MiB chunks: "requested: 3413893169");
an upload crafted so that such a length reads as zero would end the stream early and have only its
prefix scanned. It also sends a second terminator when the length is a multiple of its chunk size
(a spurious BrokenPipeError whenever clamd closes first) and retries each timed-out read five
times. Here every write is sendall() and one deadline (above) bounds the whole exchange.

Thread-safe: every call opens its own connection and shares no mutable state, so one scanner
serves concurrent worker threads, and when clamd comes back after an outage the next call works.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import BinaryIO, Literal
from urllib.parse import urlsplit

UnavailableReason = Literal[
    "connection-refused",  # nothing listens at the address (clamd down or restarting)
    "timeout",  # no complete verdict within timeout_s plus the time the streamed bytes earned
    "stream-too-long",  # the upload exceeds clamd's StreamMaxLength
    "connection-lost",  # clamd closed the connection before answering
    "scan-error",  # clamd answered with an ERROR
    "protocol-error",  # clamd's reply could not be understood
]

CHUNK_BYTES = 64 * 1024  # clamd takes any chunk size; larger chunks mean fewer system calls
# Each byte streamed extends the deadline by 1/MIN_SCAN_BYTES_PER_S s (receiving and scanning it):
# a fifth of the rate measured on a busy 2-core host, so 2 GiB may take timeout_s + 256 s.
MIN_SCAN_BYTES_PER_S = 8 * 1024 * 1024
_MAX_REPLY_BYTES = 4096  # a verdict line is short; a longer reply is not clamd's
_STREAM_TOO_LONG_REPLY = "INSTREAM size limit exceeded. ERROR"
_AFTER_BROKEN_PIPE_READ_S = 0.5  # reading clamd's reason for closing is best effort
LIMITS_EXCEEDED_PREFIX = "Heuristics.Limits.Exceeded"


class ScannerUnavailable(Exception):
    """The upload could not be scanned: the caller must refuse it (503), never accept it."""

    def __init__(self, reason: UnavailableReason):
        super().__init__(reason)  # in args, so the exception pickles across Ray processes
        self.reason: UnavailableReason = reason

    def __str__(self) -> str:
        return f"malware scanner unavailable: {self.reason}"


@dataclass(frozen=True)
class ScanResult:
    """clamd's verdict on one upload."""

    signature: str | None = None  # clamd's name for what it found, e.g. "Eicar-Test-Signature"

    @property
    def infected(self) -> bool:
        return self.signature is not None

    @property
    def limits_exceeded(self) -> bool:
        """clamd gave up at one of its scan limits (reported as infected; see the module doc)."""
        return self.infected and self.signature.startswith(LIMITS_EXCEEDED_PREFIX)


CLEAN = ScanResult()


@dataclass(frozen=True)
class UnixAddress:
    path: str


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int


def parse_clamd_address(address: str) -> UnixAddress | TcpAddress:
    """Parse "unix:///absolute/path" or "tcp://host:port"; raise ValueError for anything else."""
    parts = urlsplit(address)
    if parts.query or parts.fragment:
        raise ValueError("a clamd address has no query or fragment")
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError("a unix clamd address is unix:// and an absolute path: unix:///run/clamd.sock")
        return UnixAddress(parts.path)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None or parts.username or parts.path not in ("", "/"):
            raise ValueError("a tcp clamd address is tcp://host:port")
        return TcpAddress(parts.hostname, port)
    raise ValueError("a clamd address starts with unix:// or tcp://")


class ClamdScanner:
    """A clamd client that opens a fresh connection for every scan and every ping.

    `address` is Environment.clamd_address ("unix:///path" or "tcp://host:port"; anything else is a
    ValueError). `timeout_s` bounds a ping, and a scan together with the time its streamed bytes
    earn (see the module doc), connecting included (not a DNS lookup).
    """

    def __init__(self, address: str, timeout_s: float):
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._address = parse_clamd_address(address)
        self._timeout_s = timeout_s

    def scan(self, source: BinaryIO) -> ScanResult:
        """Scan every byte `source` reads from its current position to its end; raise
        ScannerUnavailable unless clamd gives a verdict. Errors reading `source` propagate."""
        deadline = time.monotonic() + self._timeout_s
        buffer = bytearray(CHUNK_BYTES)  # the one chunk in memory, reused
        with self._connect(deadline) as connection:
            _send(connection, b"zINSTREAM\0", deadline)
            while length := source.readinto(buffer):
                _send(connection, struct.pack("!L", length), deadline)
                _send(connection, memoryview(buffer)[:length], deadline)
                deadline += length / MIN_SCAN_BYTES_PER_S
            _send(connection, struct.pack("!L", 0), deadline)
            return _verdict(_read_reply(connection, deadline))

    def ping(self) -> bool:
        """True when clamd answers PING within timeout_s."""
        deadline = time.monotonic() + self._timeout_s
        try:
            with self._connect(deadline) as connection:
                _send(connection, b"zPING\0", deadline)
                return _read_reply(connection, deadline) == "PONG"
        except ScannerUnavailable:
            return False

    def _connect(self, deadline: float) -> socket.socket:
        try:
            if isinstance(self._address, UnixAddress):
                connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    connection.settimeout(_remaining(deadline))
                    connection.connect(self._address.path)
                except BaseException:
                    connection.close()
                    raise
                return connection
            address = (self._address.host, self._address.port)
            return socket.create_connection(address, timeout=_remaining(deadline))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ScannerUnavailable("connection-refused") from None
        except TimeoutError:
            raise ScannerUnavailable("timeout") from None
        except OSError:  # unresolvable host, permission denied on the socket file ...
            raise ScannerUnavailable("connection-refused") from None


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ScannerUnavailable("timeout")
    return remaining


def _send(connection: socket.socket, payload: bytes | memoryview, deadline: float) -> None:
    try:
        connection.settimeout(_remaining(deadline))
        connection.sendall(payload)
    except TimeoutError:
        raise ScannerUnavailable("timeout") from None
    except OSError:
        # clamd closes the connection when the stream passes StreamMaxLength; its reply, when
        # still readable, tells that apart from clamd going away mid-scan.
        raise ScannerUnavailable(_reason_for_closing(connection, deadline)) from None


def _reason_for_closing(connection: socket.socket, deadline: float) -> UnavailableReason:
    try:
        reply = _read_reply(connection, min(deadline, time.monotonic() + _AFTER_BROKEN_PIPE_READ_S))
    except ScannerUnavailable:
        return "connection-lost"
    return "stream-too-long" if reply == _STREAM_TOO_LONG_REPLY else "connection-lost"


def _read_reply(connection: socket.socket, deadline: float) -> str:
    """One NUL-terminated reply (the `z` command form), decoded and stripped."""
    received = bytearray()
    while not received.endswith(b"\0"):
        try:
            connection.settimeout(_remaining(deadline))
            piece = connection.recv(_MAX_REPLY_BYTES)
        except TimeoutError:
            raise ScannerUnavailable("timeout") from None
        except OSError:
            raise ScannerUnavailable("connection-lost") from None
        if not piece:
            raise ScannerUnavailable("connection-lost")
        received += piece
        if len(received) > _MAX_REPLY_BYTES:
            raise ScannerUnavailable("protocol-error")
    try:
        return received[:-1].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ScannerUnavailable("protocol-error") from None


def _verdict(reply: str) -> ScanResult:
    """Read "stream: OK", "stream: <signature> FOUND" or "... ERROR" (clamd's INSTREAM replies)."""
    if reply == _STREAM_TOO_LONG_REPLY:
        raise ScannerUnavailable("stream-too-long")
    if reply.endswith(" ERROR"):
        raise ScannerUnavailable("scan-error")
    subject, separator, outcome = reply.partition(": ")
    if subject != "stream" or not separator:
        raise ScannerUnavailable("protocol-error")
    if outcome == "OK":
        return CLEAN
    signature, _, status = outcome.rpartition(" ")
    if status != "FOUND" or not signature:
        raise ScannerUnavailable("protocol-error")
    return ScanResult(signature)
