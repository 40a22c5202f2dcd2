"""deploy/nginx/aligner.conf in a real nginx on loopback, in front of a tiny upstream.

The shipped file is used as is, except for its addresses (loopback ports of the test's own, no TLS)
and its timeouts, shortened to 1 s so each cut-off shows within seconds: header trickle, an idle
connection, an idle keep-alive connection, a stalled body (which never reaches the upstream), an
oversized body, X-Forwarded-For appended rather than replaced, and the per-address flood limits
(requests a second, requests in flight), refused with a 429 problem document.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "aligner.conf"
SHORT_TIMEOUT_S = 1.0
SLOW_UPSTREAM_S = 1.5
RATE_PER_S, BURST, CONNECTIONS = 50, 100, 64  # aligner.conf's limits per client address


class _Upstream(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/slow":
            time.sleep(SLOW_UPSTREAM_S)  # a request in flight, for the connection limit
        self._answer()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._answer()

    def _answer(self) -> None:
        _Upstream.seen.append({name.lower(): value for name, value in self.headers.items()})
        body = self.headers.get("x-forwarded-for", "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _UpstreamServer(ThreadingHTTPServer):
    request_queue_size = 256  # nginx opens one upstream connection per request in flight (the connection-limit test)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rendered(upstream_port: int, listen_port: int) -> str:
    text = CONFIG.read_text()
    text = text.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
    text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{listen_port};")
    for directive in ("client_header_timeout", "client_body_timeout", "keepalive_timeout", "send_timeout"):
        text, count = re.subn(rf"^(\s*{directive}) \d+s;", rf"\1 {SHORT_TIMEOUT_S:g}s;", text, flags=re.M)
        assert count >= 1, f"{directive} is missing from {CONFIG.name}"
    return text


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is required (Makefile APT_PACKAGES)"
    upstream = _UpstreamServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    root = tmp_path_factory.mktemp("nginx")
    port = _free_port()
    (root / "aligner.conf").write_text(_rendered(upstream.server_address[1], port))
    temp = "".join(f"{kind}_temp_path {root / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (root / "nginx.conf").write_text(
        # One process and no user switch: a test harness, not how production runs nginx.
        f"daemon off;\nmaster_process off;\npid {root / 'nginx.pid'};\nerror_log {root / 'error.log'} info;\n"
        f"events {{ worker_connections 1024; }}\n"
        f"http {{\naccess_log off;\n{temp}include {root / 'aligner.conf'};\n}}\n"
    )
    process = subprocess.Popen([nginx, "-p", str(root), "-c", str(root / "nginx.conf")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "nginx did not start listening"
            time.sleep(0.05)
    yield port
    process.terminate()
    process.wait(timeout=10)
    upstream.shutdown()


def _closed_after(connection: socket.socket, send_every_s: float | None = None, limit_s: float = 5.0) -> tuple[float, bytes]:
    """Seconds until the proxy closes `connection` (trickling a header byte meanwhile), and what it sent."""
    started = time.monotonic()
    connection.settimeout(send_every_s or limit_s)
    received = b""
    while time.monotonic() - started < limit_s:
        try:
            chunk = connection.recv(4096)
        except TimeoutError:
            try:
                connection.sendall(b"a")
            except OSError:
                return time.monotonic() - started, received
            continue
        except ConnectionResetError:
            return time.monotonic() - started, received
        if not chunk:
            return time.monotonic() - started, received
        received += chunk
    raise AssertionError(f"the proxy kept the connection open for {limit_s} s")


def test_requests_pass_and_x_forwarded_for_is_appended(proxy):
    with socket.create_connection(("127.0.0.1", proxy)) as connection:
        connection.sendall(
            b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n"
            b"X-Request-Timeout-Seconds: 0\r\nConnection: close\r\n\r\n"
        )
        answer = b""
        while chunk := connection.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"203.0.113.9, 127.0.0.1")  # the client's claim kept, the real peer appended
    assert "x-request-timeout-seconds" not in _Upstream.seen[-1]


def test_a_header_trickle_is_cut_off(proxy):
    with socket.create_connection(("127.0.0.1", proxy)) as connection:
        connection.sendall(b"GET /v1/health HTTP/1.1\r\nX-Slow: ")
        elapsed, _ = _closed_after(connection, send_every_s=0.2)  # one byte every 0.2 s, never finishing
    assert SHORT_TIMEOUT_S * 0.8 < elapsed < SHORT_TIMEOUT_S + 1.5


def test_a_connection_that_sends_nothing_is_closed(proxy):
    with socket.create_connection(("127.0.0.1", proxy)) as connection:
        elapsed, received = _closed_after(connection)
    assert received == b"" and elapsed < SHORT_TIMEOUT_S + 1.5


def test_an_idle_keep_alive_connection_is_closed(proxy):
    with socket.create_connection(("127.0.0.1", proxy)) as connection:
        connection.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        elapsed, received = _closed_after(connection)
    assert received.startswith(b"HTTP/1.1 200") and elapsed < SHORT_TIMEOUT_S + 1.5


def test_a_stalled_body_is_cut_off_before_reaching_the_upstream(proxy):
    before = len(_Upstream.seen)
    with socket.create_connection(("127.0.0.1", proxy)) as connection:
        connection.sendall(b"POST /v1/align HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        elapsed, received = _closed_after(connection)
    assert elapsed < SHORT_TIMEOUT_S + 1.5
    assert not received.startswith(b"HTTP/1.1 200")
    assert len(_Upstream.seen) == before  # buffered at the proxy: the service never held a slot for it


def test_an_oversized_body_is_refused_by_its_content_length(proxy):
    before = len(_Upstream.seen)
    with socket.create_connection(("127.0.0.1", proxy)) as connection:
        connection.sendall(b"POST /v1/align HTTP/1.1\r\nHost: x\r\nContent-Length: 30000000\r\nConnection: close\r\n\r\n")
        answer = connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413") and len(_Upstream.seen) == before


def _get(connection: socket.socket, path: str = "/v1/ready") -> tuple[int, bytes, bytes]:
    """One keep-alive GET: status, head and body."""
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(65536)
    head, body = answer.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += connection.recv(65536)
    return int(head.split(b" ", 2)[1]), head, body


def _assert_flood_problem(head: bytes, body: bytes) -> None:
    assert re.search(rb"(?im)^content-type: application/problem\+json", head), head
    assert re.search(rb"(?im)^retry-after: 1\r?$", head), head
    problem = json.loads(body)
    assert (problem["type"], problem["status"]) == ("urn:forced-aligner:problem:abnormal-usage-detected", 429)


def test_a_flood_from_one_address_is_refused_past_its_rate_and_burst(proxy):
    statuses: list[int] = []
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy)) as connection:
        for _ in range(4 * BURST):
            status, head, body = _get(connection)
            statuses.append(status)
            if status == 429:
                refused = (head, body)
    elapsed = time.monotonic() - started
    assert set(statuses) == {200, 429}
    assert BURST <= statuses.count(200) <= BURST + 1 + RATE_PER_S * elapsed + 1  # the burst passes, then the rate
    _assert_flood_problem(*refused)
    time.sleep(0.1)  # the bucket refills: not a ban
    with socket.create_connection(("127.0.0.1", proxy)) as connection:
        assert _get(connection)[0] == 200


def test_requests_in_flight_from_one_address_are_capped(proxy):
    time.sleep(BURST / RATE_PER_S + 0.5)  # the flood test's burst drained: only the connection limit refuses here
    extra = 6
    connections = [socket.create_connection(("127.0.0.1", proxy)) for _ in range(CONNECTIONS + extra)]
    try:
        for connection in connections:
            connection.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        answers = []
        for connection in connections:
            connection.settimeout(SLOW_UPSTREAM_S + 5)
            answers.append(connection.recv(65536))
    finally:
        for connection in connections:
            connection.close()
    statuses = [int(answer.split(b" ", 2)[1]) for answer in answers]
    assert (statuses.count(200), statuses.count(429)) == (CONNECTIONS, extra)
    assert time.monotonic() - started < SLOW_UPSTREAM_S * CONNECTIONS  # the upstream served them at once
