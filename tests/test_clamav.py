"""ClamdScanner against a real clamd with the generated signatures (EICAR, the project marker).

Failure tests stop, freeze (SIGSTOP) or shrink a real clamd; only the reply parser's odd cases use a
one-shot socket server that answers what clamd never should.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import socket
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serve_app.media.clamav import (
    MIN_SCAN_BYTES_PER_S,
    ClamdScanner,
    ScannerUnavailable,
    ScanResult,
    TcpAddress,
    UnixAddress,
    parse_clamd_address,
)
from tests.support.hostile import embedded_mid_file, tone_wav
from tools.local_services import EICAR_SIGNATURE, MARKER, MARKER_SIGNATURE, ClamdServer, eicar, free_port

TIMEOUT_S = 2.0
SMALL_STREAM_MAX = 1024 * 1024  # the small clamd's StreamMaxLength ("1M")
SMALL_FILE_MAX = 512 * 1024  # and its MaxFileSize ("512K")


@pytest.fixture(scope="module")
def scanner(clamd_server) -> ClamdScanner:
    return ClamdScanner(f"unix://{clamd_server.socket_path}", timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def small_clamd(tmp_path_factory) -> ClamdServer:
    """A second clamd with small limits, listening on loopback TCP as well as its unix socket."""
    server = ClamdServer(
        tmp_path_factory.mktemp("small-clamd"),
        stream_max_length="1M",
        max_file_size="512K",
        tcp_port=free_port(),
    ).start()
    yield server
    server.stop()


def wav_of_size(size: int) -> bytes:
    """A real WAV of at least `size` bytes (16 kHz mono 16-bit: 32 000 bytes a second)."""
    return tone_wav(seconds=size / 32_000 + 0.1)


# --- verdicts -------------------------------------------------------------------------------


def test_clean_audio_is_clean(scanner):
    result = scanner.scan(io.BytesIO(tone_wav()))
    assert not result.infected and result.signature is None


def test_eicar_alone_is_detected(scanner):
    result = scanner.scan(io.BytesIO(eicar()))
    assert result.infected and result.signature.startswith(EICAR_SIGNATURE)
    assert not result.limits_exceeded


def test_eicar_mid_file_in_a_real_wav_is_detected(scanner):
    upload = embedded_mid_file(tone_wav(3.0), eicar())
    assert upload.find(eicar()) > 40_000  # well past anything a header-only scan would read
    assert scanner.scan(io.BytesIO(upload)).signature.startswith(EICAR_SIGNATURE)


def test_project_marker_is_detected_with_its_own_name(scanner):
    result = scanner.scan(io.BytesIO(embedded_mid_file(tone_wav(), MARKER)))
    assert result.signature.startswith(MARKER_SIGNATURE)


def test_empty_upload_is_clean(scanner):
    assert not scanner.scan(io.BytesIO(b"")).infected


def test_concurrent_scans_from_threads_each_get_their_own_verdict(scanner):
    uploads = [tone_wav(), embedded_mid_file(tone_wav(), eicar()), embedded_mid_file(tone_wav(), MARKER)] * 8
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(scanner.scan, map(io.BytesIO, uploads)))
    assert [result.signature is None for result in results] == [True, False, False] * 8
    found = {result.signature.split(".")[0] for result in results if result.infected}
    assert found == {EICAR_SIGNATURE, MARKER_SIGNATURE.split(".")[0]}


def test_results_and_errors_pickle(scanner):
    """Both cross Ray process boundaries between the scanner and the ingress."""
    result = scanner.scan(io.BytesIO(eicar()))
    assert pickle.loads(pickle.dumps(result)) == result
    error = pickle.loads(pickle.dumps(ScannerUnavailable("timeout")))
    assert isinstance(error, ScannerUnavailable) and error.reason == "timeout"


def test_ping(scanner):
    assert scanner.ping()


def test_a_file_is_streamed_in_chunks_with_bounded_memory(scanner, tmp_path):
    """32 MiB from disk with EICAR in its last chunk: all of it scanned, one chunk in memory."""
    path = tmp_path / "upload.wav"
    with open(path, "wb") as upload:
        for _ in range(32):
            upload.write(bytes(1024 * 1024))
        upload.write(eicar())
    with open(path, "rb") as source:
        tracemalloc.start()
        try:
            result = scanner.scan(source)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert result.signature.startswith(EICAR_SIGNATURE)
    assert peak < 512 * 1024


# --- clamd down, frozen, back ----------------------------------------------------------------


def test_stopped_clamd_fails_fast_and_the_same_scanner_recovers(clamd_server):
    scanner = ClamdScanner(f"unix://{clamd_server.socket_path}", timeout_s=30)
    assert scanner.scan(io.BytesIO(eicar())).infected
    clamd_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(ScannerUnavailable) as caught:
            scanner.scan(io.BytesIO(tone_wav()))
        assert caught.value.reason == "connection-refused"
        assert time.monotonic() - started < 1.0  # refused at once, not after the 30 s timeout
        assert not scanner.ping()
    finally:
        clamd_server.start()
    assert scanner.ping()
    assert scanner.scan(io.BytesIO(eicar())).infected
    assert not scanner.scan(io.BytesIO(tone_wav())).infected


@pytest.mark.parametrize(
    "upload_bytes", [1_000, 8 * 1024 * 1024], ids=["waiting-for-verdict", "blocked-sending"]
)
def test_frozen_clamd_times_out_within_the_budget(clamd_server, upload_bytes):
    """A clamd that accepts connections but never answers (SIGSTOP) costs at most timeout_s."""
    scanner = ClamdScanner(f"unix://{clamd_server.socket_path}", timeout_s=0.5)
    os.kill(clamd_server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ScannerUnavailable) as caught:
            scanner.scan(io.BytesIO(bytes(upload_bytes)))
        elapsed = time.monotonic() - started
    finally:
        os.kill(clamd_server.process.pid, signal.SIGCONT)
    assert caught.value.reason == "timeout"
    assert 0.4 < elapsed < 1.5
    assert ClamdScanner(f"unix://{clamd_server.socket_path}", timeout_s=TIMEOUT_S).ping()


# --- the deadline grows with the stream -----------------------------------------------------------

# A stream long enough to earn one second on top of the timeout: half a second of timeout alone
# would refuse it at the pace the slow fake below reads it.
EARNING_STREAM_BYTES = MIN_SCAN_BYTES_PER_S
EARNING_STREAM = b"\x01" * EARNING_STREAM_BYTES  # no run of four NULs: the fakes wait for the terminator
DEADLINE_TIMEOUT_S = 0.5


def _reading_at(path: Path, bytes_per_s: float | None, reply: bytes | None) -> threading.Thread:
    """A fake clamd that reads the INSTREAM at `bytes_per_s` (None: as fast as it can), then sends
    `reply` (None: holds the connection open without answering, as a frozen scan would)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        with listener, listener.accept()[0] as connection:
            started, received, tail = time.monotonic(), 0, b""
            while not tail.endswith(b"\0\0\0\0"):
                piece = connection.recv(256 * 1024)
                if not piece:
                    return
                received += len(piece)
                tail = (tail + piece)[-4:]
                if bytes_per_s:
                    time.sleep(max(0.0, started + received / bytes_per_s - time.monotonic()))
            if reply is None:
                time.sleep(10 * DEADLINE_TIMEOUT_S + EARNING_STREAM_BYTES / MIN_SCAN_BYTES_PER_S)
            else:
                connection.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_long_stream_earns_time_beyond_the_timeout(tmp_path):
    socket_path = tmp_path / "slow-clamd.sock"
    # Twice the minimum rate: ~0.5 s of reading, which alone would use up the 0.5 s timeout.
    server = _reading_at(socket_path, 2 * MIN_SCAN_BYTES_PER_S, b"stream: OK\0")
    started = time.monotonic()
    result = ClamdScanner(f"unix://{socket_path}", timeout_s=DEADLINE_TIMEOUT_S).scan(io.BytesIO(EARNING_STREAM))
    assert result == ScanResult()
    assert time.monotonic() - started > DEADLINE_TIMEOUT_S
    server.join(5)


def test_a_scan_that_never_answers_times_out_after_what_its_bytes_earned(tmp_path):
    socket_path = tmp_path / "frozen-clamd.sock"
    server = _reading_at(socket_path, None, None)
    started = time.monotonic()
    with pytest.raises(ScannerUnavailable) as caught:
        ClamdScanner(f"unix://{socket_path}", timeout_s=DEADLINE_TIMEOUT_S).scan(io.BytesIO(EARNING_STREAM))
    elapsed = time.monotonic() - started
    assert caught.value.reason == "timeout"
    budget = DEADLINE_TIMEOUT_S + EARNING_STREAM_BYTES / MIN_SCAN_BYTES_PER_S  # 1.5 s
    assert budget - 0.1 < elapsed < budget + 0.5
    server.join(0)


# --- clamd's limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_stream_over_stream_max_length_fails_closed(small_clamd, transport):
    if transport == "unix":
        address = f"unix://{small_clamd.socket_path}"
    else:
        address = f"tcp://127.0.0.1:{small_clamd.tcp_port}"
    scanner = ClamdScanner(address, timeout_s=TIMEOUT_S)
    upload = embedded_mid_file(wav_of_size(2 * SMALL_STREAM_MAX), eicar())
    with pytest.raises(ScannerUnavailable) as caught:
        scanner.scan(io.BytesIO(upload))
    assert caught.value.reason == "stream-too-long"
    assert scanner.scan(io.BytesIO(eicar())).infected  # the same scanner, over the same transport, still works


def test_stream_over_max_file_size_is_reported_as_infected(small_clamd):
    """AlertExceedsMax: clamd did not scan it all, so it is refused (see serve_app.media.clamav)."""
    scanner = ClamdScanner(f"unix://{small_clamd.socket_path}", timeout_s=TIMEOUT_S)
    upload = wav_of_size(SMALL_FILE_MAX + 64 * 1024)
    assert len(upload) < SMALL_STREAM_MAX
    result = scanner.scan(io.BytesIO(upload))
    assert result.infected and result.limits_exceeded
    assert result.signature == "Heuristics.Limits.Exceeded.MaxFileSize"


def test_tcp_address_scans(small_clamd):
    scanner = ClamdScanner(f"tcp://localhost:{small_clamd.tcp_port}", timeout_s=TIMEOUT_S)
    assert scanner.ping()
    assert scanner.scan(io.BytesIO(embedded_mid_file(tone_wav(), eicar()))).signature.startswith(EICAR_SIGNATURE)
    assert scanner.scan(io.BytesIO(tone_wav())) == ScanResult()


def test_nothing_listening_on_tcp_is_connection_refused():
    scanner = ClamdScanner(f"tcp://127.0.0.1:{free_port()}", timeout_s=TIMEOUT_S)
    with pytest.raises(ScannerUnavailable) as caught:
        scanner.scan(io.BytesIO(b"audio"))
    assert caught.value.reason == "connection-refused"


# --- replies clamd should never send ----------------------------------------------------------


def _answer_once(path: Path, reply: bytes | None) -> threading.Thread:
    """Serve one connection on a unix socket: read the whole INSTREAM, then send `reply` (or just
    close when it is None)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        with listener, listener.accept()[0] as connection:
            received = b""
            while not received.endswith(b"\0\0\0\0"):  # the zero-length terminator
                piece = connection.recv(65536)
                if not piece:
                    return
                received += piece
            if reply is not None:
                connection.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"stream: Can't allocate memory ERROR\0", "scan-error"),
        (b"stream: something unexpected\0", "protocol-error"),
        (b"UNKNOWN COMMAND\0", "protocol-error"),
        (b"stream: OK" + b" " * 5000 + b"\0", "protocol-error"),  # longer than any verdict
        (b"\xff\xfe: OK\0", "protocol-error"),
        (b"stream: OK", "connection-lost"),  # closed before the reply's terminator
        (None, "connection-lost"),
    ],
)
def test_unexpected_replies_fail_closed(tmp_path, reply, reason):
    socket_path = tmp_path / "fake-clamd.sock"
    server = _answer_once(socket_path, reply)
    with pytest.raises(ScannerUnavailable) as caught:
        ClamdScanner(f"unix://{socket_path}", timeout_s=TIMEOUT_S).scan(io.BytesIO(b"some audio"))
    assert caught.value.reason == reason
    server.join(TIMEOUT_S)


# --- addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("unix:///run/clamav/clamd.ctl", UnixAddress("/run/clamav/clamd.ctl")),
        ("tcp://clamd.internal:3310", TcpAddress("clamd.internal", 3310)),
        ("tcp://[::1]:3310", TcpAddress("::1", 3310)),
    ],
)
def test_supported_addresses(address, expected):
    assert parse_clamd_address(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "/run/clamav/clamd.ctl",
        "unix://run/clamav/clamd.ctl",  # relative: "run" would be a host
        "unix:///run/clamd.ctl?mode=1",
        "tcp://clamd.internal",
        "tcp://clamd.internal:notaport",
        "tcp://:3310",
        "tcp://user@clamd.internal:3310",
        "tcp://clamd.internal:3310/scan",
        "http://clamd.internal:3310",
    ],
)
def test_other_addresses_are_refused(address):
    with pytest.raises(ValueError):
        ClamdScanner(address, timeout_s=TIMEOUT_S)
