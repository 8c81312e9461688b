"""Server mode's domain following (frontend/gdbserver/multi.py) with real servers and clients.

Xen cannot run here, so the XenStore watch stream is a scripted test double
(``ScriptedWatch``) and the domain list a scripted one; the servers are real ``DomainServer``s
on real sockets, serving a real emulated domain, and the clients speak real RSP.  The same
loop runs against Xen's XenStore in the lab's domain-follow scenario.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from polling import wait_until
from serverproc import RspClient
from xendbg.backend.emu import EmuDomain
from xendbg.frontend.gdbserver.multi import WATCH_TOKEN, DomainRef, Follower, PortServer, follow
from xendbg.frontend.gdbserver.server import DomainServer

INTRODUCE, RELEASE = "@introduceDomain", "@releaseDomain"


class ScriptedWatch:
    """Test double of the XenStore watch stream: scripted (path, token) events, with a pipe
    that is readable while some are queued, as ``xs_fileno`` is."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self._queue: deque[tuple[str, str]] = deque()
        self._lock = threading.Lock()

    def fire(self, path: str) -> None:
        with self._lock:
            self._queue.append((path, WATCH_TOKEN))
        os.write(self._w, b"!")

    def fileno(self) -> int:
        return self._r

    def events(self) -> list[tuple[str, str]]:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        with self._lock:
            out = list(self._queue)
            self._queue.clear()
        return out

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


class Host:
    """What the lister sees: the live domains (scripted), and the watch that reports changes."""

    def __init__(self, *domains: DomainRef) -> None:
        self.domains = {d.domid: d for d in domains}
        self.watch = ScriptedWatch()
        self._lock = threading.Lock()

    def lister(self) -> list[DomainRef]:
        with self._lock:
            return sorted(self.domains.values(), key=lambda d: d.domid)

    def create(self, domid: int, name: str) -> None:
        with self._lock:
            self.domains[domid] = DomainRef(domid, name)
        self.watch.fire(INTRODUCE)

    def destroy(self, domid: int) -> None:
        with self._lock:
            del self.domains[domid]
        self.watch.fire(RELEASE)


def free_base(span: int = 6) -> int:
    """A port P such that P … P+span-1 are free right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + span < 65535 and all(not connects(p) for p in range(base, base + span)):
            return base
    raise AssertionError("no free port range")


def connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def silent(client: RspClient, seconds: float) -> bool:
    """Nothing but acks arrives for ``seconds``."""
    client.sock.settimeout(seconds)
    try:
        client.buf += client.sock.recv(4096)
    except TimeoutError:
        return b"$" not in client.buf
    finally:
        client.sock.settimeout(10.0)
    return b"$" not in client.buf


@pytest.fixture(scope="module")
def emu(guests: Path) -> Iterator[EmuDomain]:
    with EmuDomain(guests / "longmode.elf", start_paused=False) as dom:
        yield dom


class Running:
    """``follow`` on a thread, announcing into a list, stopped through its stop pipe."""

    def __init__(self, host: Host, emu: EmuDomain, base: int, only: int | None = None) -> None:
        self.host = host
        self.lines: list[str] = []
        self.follower = Follower(
            host.lister,
            self.factory(emu),
            base_port=base,
            announce=self.lines.append,
            only=only,
        )
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(
            target=follow, args=(host.watch, self.follower, self._stop_r), daemon=True
        )

    @staticmethod
    def factory(emu: EmuDomain):  # type: ignore[no-untyped-def]
        def make(ref: DomainRef, port: int) -> PortServer:
            return DomainServer(emu, host="127.0.0.1", port=port)

        return make

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        os.write(self._stop_w, b"x")
        self.thread.join(30)
        assert not self.thread.is_alive()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self.host.watch.close()

    def announced(self, text: str) -> bool:
        return wait_until(lambda: text in self.lines, timeout=10.0)


def test_ports_count_up_and_follow_domains(emu: EmuDomain) -> None:
    base = free_base()
    host = Host(DomainRef(1, "alpha"))
    with Running(host, emu, base) as run:
        assert run.announced(f"domain 1 (alpha) on port {base}")
        host.create(2, "beta")
        assert run.announced(f"domain 2 (beta) on port {base + 1}")
        assert connects(base) and connects(base + 1)
        host.destroy(1)
        assert run.announced(f"domain 1 (alpha) gone: port {base} closed")
        assert not connects(base)
        assert run.follower.ports() == {2: base + 1}
        # The lowest free port is reused: a restarted guest gets its port back.
        host.create(3, "gamma")
        assert run.announced(f"domain 3 (gamma) on port {base}")
        assert run.follower.ports() == {2: base + 1, 3: base}
    assert run.follower.servers == {}
    assert not connects(base) and not connects(base + 1)


def test_a_port_in_use_is_skipped(emu: EmuDomain) -> None:
    base = free_base()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base))
        squatter.listen(1)
        host = Host(DomainRef(4, "delta"))
        with Running(host, emu, base) as run:
            assert run.announced(f"domain 4 (delta) on port {base + 1}")


def test_events_without_changes_leave_ports_alone(emu: EmuDomain) -> None:
    base = free_base()
    host = Host(DomainRef(1, "alpha"))
    with Running(host, emu, base) as run:
        assert run.announced(f"domain 1 (alpha) on port {base}")
        client = RspClient(base)
        assert client.request(b"?").startswith(b"T05")
        host.watch.fire(RELEASE)  # e.g. another domain's shutdown: nothing of ours changed
        host.watch.fire(INTRODUCE)
        assert client.request(b"?").startswith(b"T05")  # same session, still served
        assert client.request(b"D") == b"OK"
        client.close()
        assert run.lines == [f"domain 1 (alpha) on port {base}"]


def test_attach_mode_serves_one_domain_until_it_goes(emu: EmuDomain) -> None:
    base = free_base()
    host = Host(DomainRef(1, "alpha"), DomainRef(2, "beta"))
    run = Running(host, emu, base, only=2)
    with run:
        assert run.announced(f"domain 2 (beta) on port {base}")
        host.create(3, "gamma")
        host.destroy(2)
        run.thread.join(10)
        assert not run.thread.is_alive(), "follow must return once the domain is gone"
    assert run.lines == [
        f"domain 2 (beta) on port {base}",
        f"domain 2 (beta) gone: port {base} closed",
    ]
    assert run.follower.finished


def test_a_running_client_gets_x09_when_its_domain_vanishes(emu: EmuDomain) -> None:
    base = free_base()
    host = Host(DomainRef(7, "victim"))
    with Running(host, emu, base) as run:
        assert run.announced(f"domain 7 (victim) on port {base}")
        client = RspClient(base)
        assert client.request(b"?").startswith(b"T05")
        client.send_raw(b"$c#63")  # the guest runs; no reply until it stops
        assert silent(client, 0.3)
        host.destroy(7)
        assert client.read_packet() == b"X09"
        assert run.announced(f"domain 7 (victim) gone: port {base} closed")
        client.close()
        # The server goes on: a new domain is served (on the port just freed).
        host.create(8, "next")
        assert run.announced(f"domain 8 (next) on port {base}")
        again = RspClient(base)
        assert again.request(b"?").startswith(b"T05")
        assert again.request(b"D") == b"OK"
        again.close()


def test_a_stopped_client_gets_an_error_saying_why(emu: EmuDomain) -> None:
    base = free_base()
    host = Host(DomainRef(9, "gone"))
    with Running(host, emu, base) as run:
        assert run.announced(f"domain 9 (gone) on port {base}")
        client = RspClient(base)
        assert client.request(b"?").startswith(b"T05")
        host.destroy(9)
        assert run.announced(f"domain 9 (gone) gone: port {base} closed")
        reply = client.request(b"g")
        assert reply == b"E.domain 9 (gone) was destroyed"
        with pytest.raises(ConnectionError):
            client.request(b"g")
        client.close()
    assert not emu.paused, "the emulated domain is left running"


def test_serve_without_emu_needs_xen() -> None:
    """On a machine without Xen, `xendbg serve` says why and points at --emu."""
    res = subprocess.run(
        [sys.executable, "-m", "xendbg.frontend.cli", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    err = res.stderr.strip()
    assert err.startswith("xendbg: serving Xen domains is not supported: Xen is not available")
    assert err.endswith("serve an emulated guest with --emu GUEST.elf instead")
