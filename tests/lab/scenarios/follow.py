"""``domain-follow``: `xendbg serve` without --attach opens a GDB port when a guest domain is
created and closes it when the domain is destroyed (XenStore @introduceDomain /
@releaseDomain watches), and a client attached to a domain that vanishes gets a clear answer
(X09 while the guest runs, an error reply while it is stopped) while the server goes on.
"""

from __future__ import annotations

import errno
import re
import socket
import sys
import time

from labkit import (
    LONGMODE_BANNER,
    PV_BANNER,
    PY_ENV,
    Background,
    check,
    create_guest,
    log,
    run,
    scenario,
)

BASE_PORT = 1240


class RspClient:
    """Just enough of the GDB remote protocol (ack mode) to ask and to listen."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def send(self, payload: bytes) -> None:
        self.sock.sendall(b"$%s#%02x" % (payload, sum(payload) & 0xFF))

    def packet(self, timeout: float = 30.0) -> bytes | None:
        """The next packet's payload (acked), or None when the server hung up."""
        self.sock.settimeout(timeout)
        while True:
            m = re.search(rb"\$([^#]*)#[0-9a-fA-F]{2}", self.buf)
            if m:
                self.buf = self.buf[m.end() :]
                self.sock.sendall(b"+")
                return m.group(1)
            data = self.sock.recv(4096)
            if not data:
                return None
            self.buf += data

    def ask(self, payload: bytes) -> bytes | None:
        self.send(payload)
        return self.packet()

    def close(self) -> None:
        self.sock.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError as exc:
        return exc.errno == errno.ECONNREFUSED
    return False


def opened(server: Background, domid: int, name: str, start: int) -> int:
    m = server.wait_for(rf"domain {domid} \({re.escape(name)}\) on port (\d+)", 60, start)
    return int(m.group(1))


def closed(server: Background, domid: int, port: int, start: int) -> None:
    server.wait_for(rf"domain {domid} \(.*\) gone: port {port} closed", 60, start)


@scenario("domain-follow", timeout=360)
def domain_follow() -> None:
    argv = [sys.executable, "-m", "xendbg.frontend.cli", "serve", "--port", str(BASE_PORT)]
    with Background(argv, env=PY_ENV) as server:
        server.wait_for("following Xen guest domains", 60)
        check(refused(BASE_PORT), "a port is open before any guest exists")

        pvh = create_guest("longmode-pvh.cfg", "xenlab-follow1", LONGMODE_BANNER)
        port1 = opened(server, pvh.domid, pvh.name, 0)
        check(port1 == BASE_PORT, f"first guest on port {port1}, not {BASE_PORT}")
        running = RspClient(port1)
        stop = running.ask(b"?")
        log(f"'?' on port {port1}: {stop!r}")
        check(stop is not None and stop[:1] in (b"T", b"S"), f"'?' reply {stop!r}")
        running.send(b"c")  # the guest runs; the reply comes when it stops

        pv = create_guest("pv64-pv.cfg", "xenlab-follow2", PV_BANNER, pv_console=True)
        port2 = opened(server, pv.domid, pv.name, 0)
        check(port2 == BASE_PORT + 1, f"second guest on port {port2} (first still open)")
        idle = RspClient(port2)
        check((idle.ask(b"?") or b"")[:1] in (b"T", b"S"), "'?' on the PV guest's port")

        mark = len(server.lines)
        run(["xl", "destroy", pvh.name])
        closed(server, pvh.domid, port1, mark)
        reply = running.packet()
        log(f"running client after destroy: {reply!r}")
        check(reply == b"X09", f"a running client gets X09 when its domain goes, not {reply!r}")
        check(refused(port1), f"port {port1} still accepts connections")

        mark = len(server.lines)
        run(["xl", "destroy", pv.name])
        closed(server, pv.domid, port2, mark)
        reply = idle.ask(b"g")
        log(f"stopped client after destroy: {reply!r}")
        named = reply is not None and reply.startswith(b"E") and b"destroyed" in reply
        check(named, f"a stopped client's next packet gets an error saying why: {reply!r}")
        running.close()
        idle.close()
        check(server.proc.poll() is None, "the server exited with its domains")

        # Ports are reused from the lowest: a new guest gets the first port again.
        mark = len(server.lines)
        again = create_guest("longmode-pvh.cfg", "xenlab-follow3", LONGMODE_BANNER)
        check(opened(server, again.domid, again.name, mark) == BASE_PORT, "port not reused")
        client = RspClient(BASE_PORT)
        check((client.ask(b"?") or b"")[:1] in (b"T", b"S"), "'?' on the reused port")
        check(client.ask(b"D") == b"OK", "detach")
        client.close()
        time.sleep(0.5)
    check(server.proc.returncode == 0, f"serve exit status {server.proc.returncode}")
