"""Real Redis, Redis Sentinel and clamd on loopback, for `make serve` and the tests (never mocks).

    python -m tools.local_services start var/services   # daemons for `make serve`; prints env lines
    python -m tools.local_services stop var/services

clamd gets a small signature database generated here: the EICAR test signature (assembled at run
time, so no file in the repo trips a scanner) and a project marker signature the hostile-input tests
embed in audio. Production uses freshclam's official database instead (README, "Malware scanning").
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# EICAR's standard test string, in two halves so this file is not itself a detection.
_EICAR_HEAD = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$"
_EICAR_TAIL = r"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# A project-specific marker: any upload containing it is "malware" for the tests.
MARKER = b"FORCED-ALIGNER-TEST-MARKER-" + b"7d41c0e2"
MARKER_SIGNATURE = "ForcedAligner.Test.Marker"
EICAR_SIGNATURE = "Eicar-Test-Signature"


def eicar() -> bytes:
    return (_EICAR_HEAD + _EICAR_TAIL).encode("ascii")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until(ready, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not come up in {timeout_s} s")


@dataclass
class RedisServer:
    """A redis-server on 127.0.0.1; stop() and start() keep the port and the data (failure tests)."""

    directory: Path
    port: int = field(default_factory=free_port)
    replica_of: int | None = None  # the primary's port, for a replica
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, daemonize: bool = False) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            shutil.which("redis-server") or "redis-server",
            "--bind", "127.0.0.1", "--port", str(self.port), "--protected-mode", "yes",
            # Append-only file: keys and bans survive a restart (tests stop Redis mid-run).
            "--save", "", "--appendonly", "yes", "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
            "--pidfile", str(self.directory / "redis.pid"),
            "--daemonize", "yes" if daemonize else "no",
        ]  # fmt: skip
        if self.replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        if daemonize:
            subprocess.run(command, check=True)
        else:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until(self.answers, 10, "redis-server")
        return self

    def answers(self) -> bool:
        return _answers_ping(socket.AF_INET, ("127.0.0.1", self.port), b"PING\r\n", b"+PONG")

    def stop(self) -> None:
        _stop(self.process, self.directory / "redis.pid")
        self.process = None


SENTINEL_SERVICE = "aligner"


@dataclass
class RedisSentinelSetup:
    """A primary, one replica and three sentinels on loopback, tuned to fail over in seconds:
    the primary counts as down after `down_after_ms` without an answer (quorum 2 of 3)."""

    directory: Path
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    primary: RedisServer = field(init=False)
    replica: RedisServer = field(init=False)
    sentinel_ports: list[int] = field(default_factory=lambda: [free_port() for _ in range(3)])
    _sentinels: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.primary = RedisServer(self.directory / "primary")
        self.replica = RedisServer(self.directory / "replica", replica_of=self.primary.port)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.sentinel_ports]

    @property
    def environment(self) -> dict[str, str]:
        """What the service reads (serve_app.settings.Environment) to use this setup."""
        return {
            "ALIGNER_REDIS_SENTINELS": ",".join(f"{host}:{port}" for host, port in self.addresses),
            "ALIGNER_REDIS_SENTINEL_SERVICE": SENTINEL_SERVICE,
        }

    def start(self) -> "RedisSentinelSetup":
        self.primary.start()
        self.replica.start()
        for index, port in enumerate(self.sentinel_ports):
            directory = self.directory / f"sentinel-{index}"
            directory.mkdir(parents=True, exist_ok=True)
            config = directory / "sentinel.conf"  # a sentinel rewrites its config: one file each
            config.write_text(
                "\n".join(
                    [
                        f"port {port}",
                        "bind 127.0.0.1",
                        f"dir {directory}",
                        f"logfile {directory / 'sentinel.log'}",
                        f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {self.primary.port} 2",
                        f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {self.down_after_ms}",
                        f"sentinel failover-timeout {SENTINEL_SERVICE} {self.failover_timeout_ms}",
                        f"sentinel parallel-syncs {SENTINEL_SERVICE} 1",
                    ]
                )
                + "\n"
            )
            command = [shutil.which("redis-sentinel") or "redis-sentinel", str(config)]
            self._sentinels.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # A failover needs the sentinels to know each other and the replica (hello messages).
        _wait_until(self._sentinels_agree, 30, "redis-sentinel quorum")
        return self

    def master_port(self) -> int | None:
        """The primary's port as the first sentinel that answers reports it."""
        for port in self.sentinel_ports:
            reply = _sentinel_command(port, f"SENTINEL get-master-addr-by-name {SENTINEL_SERVICE}")
            if reply and reply[-1].isdigit():
                return int(reply[-1])
        return None

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            reply = _sentinel_command(port, f"SENTINEL master {SENTINEL_SERVICE}")
            fields = dict(zip(reply[::2], reply[1::2]))
            if fields.get("num-slaves") != "1" or fields.get("num-other-sentinels") != str(len(self.sentinel_ports) - 1):
                return False
        return self.replica_in_sync()

    def replica_in_sync(self) -> bool:
        reply = _sentinel_command(self.replica.port, "INFO replication")
        return any(line == "master_link_status:up" for line in reply)

    def stop(self) -> None:
        for process in self._sentinels:
            process.terminate()
            process.wait(10)
        self._sentinels.clear()
        self.replica.stop()
        self.primary.stop()


def _sentinel_command(port: int, command: str) -> list[str]:
    """A command's reply as a flat list of strings, by redis-cli (empty when nothing answers)."""
    try:
        done = subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "-p", str(port), *command.split()],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


@dataclass
class ClamdServer:
    """clamd on a unix socket with the generated signature database.

    The limits and the optional loopback TCP listener exist for the scanner client's tests (an
    oversized stream, a file over MaxFileSize, the tcp:// address form); defaults suit the service:
    2 GiB uploads, at the most clamd accepts (see serve_app.media.clamav, "Limits for 2 GiB").
    """

    directory: Path
    stream_max_length: str = "2G"
    max_file_size: str = "2147483645"  # clamd's ceiling (INT_MAX - 2); a larger value is lowered to it
    tcp_port: int | None = None  # also listen on 127.0.0.1:tcp_port
    process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "clamd.sock"

    def write_config(self) -> Path:
        database = self.directory / "db"
        database.mkdir(parents=True, exist_ok=True)
        (database / "forced-aligner-test.ndb").write_text(
            f"{EICAR_SIGNATURE}:0:*:{eicar().hex()}\n{MARKER_SIGNATURE}:0:*:{MARKER.hex()}\n"
        )
        config = self.directory / "clamd.conf"
        config.write_text(
            "\n".join(
                [
                    f"LocalSocket {self.socket_path}",
                    "LocalSocketMode 660",
                    "Foreground yes",
                    f"DatabaseDirectory {database}",
                    f"PidFile {self.directory / 'clamd.pid'}",
                    f"LogFile {self.directory / 'clamd.log'}",
                    # Oversized content is flagged, never passed as clean.
                    "AlertExceedsMax yes",
                    f"StreamMaxLength {self.stream_max_length}",
                    f"MaxFileSize {self.max_file_size}",
                    "MaxScanSize 4G",  # clamd's ceiling: the upload plus what is unpacked from it
                    "MaxScanTime 300000",  # ms; scanning 2 GiB took 47 s, the default is 120 s
                    "MaxThreads 4",
                    "User root",
                ]
                + ([f"TCPSocket {self.tcp_port}", "TCPAddr 127.0.0.1"] if self.tcp_port else [])
            )
            + "\n"
        )
        return config

    def start(self, daemonize: bool = False) -> "ClamdServer":
        config = self.write_config()
        self.socket_path.unlink(missing_ok=True)
        command = [shutil.which("clamd") or "/usr/sbin/clamd", f"--config-file={config}"]
        # A daemon gets its own session, so it outlives the shell that ran `make serve`.
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=daemonize
        )
        _wait_until(self.answers, 30, "clamd")
        return self

    def answers(self) -> bool:
        return _answers_ping(socket.AF_UNIX, str(self.socket_path), b"zPING\0", b"PONG")

    def stop(self) -> None:
        _stop(self.process, self.directory / "clamd.pid")
        self.process = None
        self.socket_path.unlink(missing_ok=True)


def _answers_ping(family: socket.AddressFamily, address, request: bytes, reply: bytes) -> bool:
    """Whether a server at `address` answers `request` with `reply` within half a second."""
    try:
        with socket.socket(family) as connection:
            connection.settimeout(0.5)
            connection.connect(address)
            connection.sendall(request)
            return connection.recv(16).startswith(reply)
    except OSError:
        return False


def _stop(process: subprocess.Popen | None, pidfile: Path) -> None:
    """Stop a server this process started, or else the daemon its pid file names."""
    if process is not None:
        process.terminate()
        process.wait(10)
    else:
        _kill_pidfile(pidfile)


def _kill_pidfile(pidfile: Path) -> None:
    try:
        os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__)
        return 2
    base = Path(argv[1]).resolve()
    redis_server = RedisServer(base / "redis", port=6380)
    clamd = ClamdServer(base / "clamd")
    if argv[0] == "stop":
        redis_server.stop()
        clamd.stop()
        return 0
    if not redis_server.answers():
        redis_server.start(daemonize=True)
    if not clamd.answers():
        clamd.start(daemonize=True)
    print(f"ALIGNER_REDIS_URL={redis_server.url}")
    print(f"ALIGNER_CLAMD_ADDRESS=unix://{clamd.socket_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
