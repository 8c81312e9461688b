"""Run `xendbg serve` as a real subprocess and talk to it (helpers for the client tests)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from xendbg.rsp.framing import checksum


class Server:
    """`xendbg serve --emu GUEST` on a free loopback port."""

    def __init__(self, guest: Path, *extra: str) -> None:
        self.guest = guest
        cmd = [
            sys.executable,
            "-m",
            "xendbg.frontend.cli",
            "serve",
            "--emu",
            str(guest),
            "--port",
            "0",
            "-v",
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r":(\d+) \(target remote", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()!r}")
        self.port = int(m.group(1))

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc.poll() is None


class RspClient:
    """A minimal raw GDB remote client (ack mode) for protocol-level tests."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.ack = True

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def read_packet(self) -> bytes:
        while True:
            self.buf = self.buf.lstrip(b"+")
            start = self.buf.find(b"$")
            end = self.buf.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self.buf) >= end + 3:
                payload = self.buf[start + 1 : end]
                cs = int(self.buf[end + 1 : end + 3], 16)
                assert checksum(payload) == cs, "bad checksum from server"
                self.buf = self.buf[end + 3 :]
                if self.ack:
                    self.sock.sendall(b"+")
                return payload
            self._recv()

    def request(self, payload: bytes) -> bytes:
        self.sock.sendall(b"$%s#%02x" % (payload, checksum(payload)))
        return self.read_packet()

    def no_ack(self) -> None:
        assert self.request(b"QStartNoAckMode") == b"OK"
        self.ack = False
