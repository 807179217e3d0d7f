"""A real ``clamd`` for tests, with its own config and a tiny signature database.

No freshclam and no network: the database is two ``.ndb`` body signatures
written here (clamav's signatures.md, "Extended signature format"), one for
the EICAR test string and one for a harmless marker, so a test can make
"infected" files of any shape. clamd loads them in well under a second and
listens on a free loopback port and a unix socket in the work directory.

    with ThrowawayClamd(tmp_path) as clamd:
        clamd.address        # "127.0.0.1:PORT"
        clamd.unix_address   # "unix:/.../clamd.sock"
        clamd.stop()         # an outage
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from gateway.testing.require import require_tool
from gateway.testing.services import free_port, wait_for_port

__all__ = ["EICAR", "EICAR_SIGNATURE", "MARKER", "MARKER_SIGNATURE", "ThrowawayClamd"]

# The EICAR anti-virus test file (eicar.org): harmless, recognised by every scanner.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SIGNATURE = "Eicar-Test"
# A harmless string of our own: "infected" content that no real database knows.
MARKER = b"GATEWAY-AV-TEST-MARKER-7f3a9c"
MARKER_SIGNATURE = "Gateway-Test-Marker"

START_TIMEOUT = 30.0


def _database() -> str:
    # Name:TargetType:Offset:HexSignature; target 0 = any file, offset * = anywhere.
    return f"{EICAR_SIGNATURE}:0:*:{EICAR.hex()}\n{MARKER_SIGNATURE}:0:*:{MARKER.hex()}\n"


class ThrowawayClamd:
    """``clamd`` in the foreground on a free port and a unix socket under ``workdir``."""

    def __init__(self, workdir: Path, *, stream_max_length: str = "25M") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.socket = workdir / "clamd.sock"
        self.stream_max_length = stream_max_length
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def unix_address(self) -> str:
        return f"unix:{self.socket}"

    def _write_config(self) -> Path:
        db = self.workdir / "db"
        db.mkdir(parents=True, exist_ok=True)
        (db / "gateway-test.ndb").write_text(_database())
        conf = self.workdir / "clamd.conf"
        conf.write_text(
            "\n".join(
                [
                    "Foreground yes",
                    f"TCPSocket {self.port}",
                    "TCPAddr 127.0.0.1",
                    f"LocalSocket {self.socket}",
                    f"DatabaseDirectory {db}",
                    f"StreamMaxLength {self.stream_max_length}",
                    f"PidFile {self.workdir / 'clamd.pid'}",
                    f"LogFile {self.workdir / 'clamd.log'}",
                    "MaxThreads 10",
                    "MaxQueue 200",
                    "SelfCheck 0",
                    "",
                ]
            )
        )
        return conf

    def start(self) -> ThrowawayClamd:
        binary = require_tool("clamd", "apt-get install clamav-daemon, or make test")
        conf = self._write_config()
        if self.socket.exists():
            self.socket.unlink()
        self.proc = subprocess.Popen(
            [binary, "--config-file", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port(self.port, self.proc, "clamd")
            deadline = time.monotonic() + START_TIMEOUT
            while not self.socket.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"clamd did not create {self.socket}")
                time.sleep(0.02)
        except RuntimeError as exc:
            log = self.workdir / "clamd.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            self.stop()
            raise RuntimeError(f"{exc}; clamd.log:\n{tail}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def __enter__(self) -> ThrowawayClamd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def clamd_available() -> bool:
    """Is a clamd binary installed (for benchmarks that skip without one)?"""
    return bool(shutil.which("clamd") or shutil.which("clamd", path="/usr/sbin:/sbin")) or (
        os.access("/usr/sbin/clamd", os.X_OK)
    )
