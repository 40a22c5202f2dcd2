"""ClamdScanner against a real clamd with the generated signatures (EICAR, the project marker).

Failure tests stop, freeze (SIGSTOP) or shrink a real clamd; only the reply parser's odd cases use a
one-shot socket server that answers what clamd never should.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serve_app.media.clamav import (
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
    result = scanner.scan(tone_wav())
    assert not result.infected and result.signature is None


def test_eicar_alone_is_detected(scanner):
    result = scanner.scan(eicar())
    assert result.infected and result.signature.startswith(EICAR_SIGNATURE)
    assert not result.limits_exceeded


def test_eicar_mid_file_in_a_real_wav_is_detected(scanner):
    upload = embedded_mid_file(tone_wav(3.0), eicar())
    assert upload.find(eicar()) > 40_000  # well past anything a header-only scan would read
    assert scanner.scan(upload).signature.startswith(EICAR_SIGNATURE)


def test_project_marker_is_detected_with_its_own_name(scanner):
    result = scanner.scan(embedded_mid_file(tone_wav(), MARKER))
    assert result.signature.startswith(MARKER_SIGNATURE)


def test_empty_upload_is_clean(scanner):
    assert not scanner.scan(b"").infected


def test_concurrent_scans_from_threads_each_get_their_own_verdict(scanner):
    uploads = [tone_wav(), embedded_mid_file(tone_wav(), eicar()), embedded_mid_file(tone_wav(), MARKER)] * 8
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(scanner.scan, uploads))
    assert [result.signature is None for result in results] == [True, False, False] * 8
    found = {result.signature.split(".")[0] for result in results if result.infected}
    assert found == {EICAR_SIGNATURE, MARKER_SIGNATURE.split(".")[0]}


def test_results_and_errors_pickle(scanner):
    """Both cross Ray process boundaries between the scanner and the ingress."""
    result = scanner.scan(eicar())
    assert pickle.loads(pickle.dumps(result)) == result
    error = pickle.loads(pickle.dumps(ScannerUnavailable("timeout")))
    assert isinstance(error, ScannerUnavailable) and error.reason == "timeout"


def test_ping(scanner):
    assert scanner.ping()


# --- clamd down, frozen, back ----------------------------------------------------------------


def test_stopped_clamd_fails_fast_and_the_same_scanner_recovers(clamd_server):
    scanner = ClamdScanner(f"unix://{clamd_server.socket_path}", timeout_s=30)
    assert scanner.scan(eicar()).infected
    clamd_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(ScannerUnavailable) as caught:
            scanner.scan(tone_wav())
        assert caught.value.reason == "connection-refused"
        assert time.monotonic() - started < 1.0  # refused at once, not after the 30 s timeout
        assert not scanner.ping()
    finally:
        clamd_server.start()
    assert scanner.ping()
    assert scanner.scan(eicar()).infected
    assert not scanner.scan(tone_wav()).infected


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
            scanner.scan(bytes(upload_bytes))
        elapsed = time.monotonic() - started
    finally:
        os.kill(clamd_server.process.pid, signal.SIGCONT)
    assert caught.value.reason == "timeout"
    assert 0.4 < elapsed < 1.5
    assert ClamdScanner(f"unix://{clamd_server.socket_path}", timeout_s=TIMEOUT_S).ping()


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
        scanner.scan(upload)
    assert caught.value.reason == "stream-too-long"
    assert scanner.scan(eicar()).infected  # the same scanner, over the same transport, still works


def test_stream_over_max_file_size_is_reported_as_infected(small_clamd):
    """AlertExceedsMax: clamd did not scan it all, so it is refused (see serve_app.media.clamav)."""
    scanner = ClamdScanner(f"unix://{small_clamd.socket_path}", timeout_s=TIMEOUT_S)
    upload = wav_of_size(SMALL_FILE_MAX + 64 * 1024)
    assert len(upload) < SMALL_STREAM_MAX
    result = scanner.scan(upload)
    assert result.infected and result.limits_exceeded
    assert result.signature == "Heuristics.Limits.Exceeded.MaxFileSize"


def test_tcp_address_scans(small_clamd):
    scanner = ClamdScanner(f"tcp://localhost:{small_clamd.tcp_port}", timeout_s=TIMEOUT_S)
    assert scanner.ping()
    assert scanner.scan(embedded_mid_file(tone_wav(), eicar())).signature.startswith(EICAR_SIGNATURE)
    assert scanner.scan(tone_wav()) == ScanResult()


def test_nothing_listening_on_tcp_is_connection_refused():
    scanner = ClamdScanner(f"tcp://127.0.0.1:{free_port()}", timeout_s=TIMEOUT_S)
    with pytest.raises(ScannerUnavailable) as caught:
        scanner.scan(b"audio")
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
        ClamdScanner(f"unix://{socket_path}", timeout_s=TIMEOUT_S).scan(b"some audio")
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
